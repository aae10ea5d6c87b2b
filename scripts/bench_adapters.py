"""Forward+backward time and memory of every adapter method, against a frozen base and peft's LoRA.

    python scripts/bench_adapters.py                     # the CPU defaults (a few minutes on 2 cores)
    python scripts/bench_adapters.py --quick             # tiny sizes, seconds (what the tests run)
    python scripts/bench_adapters.py --device cuda --dtype bf16 --json bench.json

Two cases, each timed for every method on the same frozen weights and the same token layout:

- ``linear``: one adapted linear of LLaMA-7B width (k = d = 4096), batch 2 x 1,024 tokens, of which
  320 visual then 320 audio tokens and a 48-token question span, the rest text.
- ``stack``: a few transformers ``LlamaDecoderLayer``-s (``LlamaModel`` fed ``inputs_embeds``) with every
  q/k/v/o/gate/up/down adapted; mid-size on the CPU, LLaMA-7B width with ``--device cuda``.

Methods: ``base`` (frozen W0 only), ``peft_lora`` (the real ``peft`` package, the honest baseline), our
``lora``, the MokA variants, ``multi_lora``, ``uni_lora``, and ``official_loop_moka``: MokA written the way
the official audio-visual code computes it (every modality's A on the whole masked sequence, then a
Python loop over samples for the cross-attention; ``OfficialLoopMoka`` below). Before timing, the script
checks that ``OfficialLoopMoka`` and our ``moka`` (official settings) give the same outputs and gradients,
so the loop baseline provably computes the same thing.

Every input requires grad, as a layer inside a network does (its input gradient flows to the layers
below), so ``base`` measures forward plus the input gradient through W0. ``--dtype bf16`` runs under autocast,
as training does (the adapters keep fp32 weights).

Time: every method is built and warmed up first; then each round times one step of every method, in an order
rotated each round. A method's time is its median over the rounds, and its ratios to ``base`` and ``peft_lora``
are medians of the per-round ratios, so the machine's drift between rounds cancels.

Memory: on the CPU, the bytes of the tensors the forward saves for backward (each storage counted once,
the model's parameters and buffers excluded), seen through ``torch.autograd.graph.saved_tensors_hooks``;
on a GPU, the peak of ``torch.cuda.max_memory_allocated`` over one forward+backward, less what was
allocated before it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moka_train.adapters import AdapterConfig, inject_adapters, set_routing
from moka_train.benchmarking import SavedTensorMeter, machine_info, synchronize
from moka_train.modality import Modality

RANK = 4
ALPHA = 16.0
DROPOUT = 0.05
STACK_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OUR_METHODS = [
    "lora", "moka", "moka_no_ca", "text_query", "naive", "multi_lora", "uni_lora", "dora", "loramoe", "hydralora",
    "uni_mm_lora", "uni_mm_lora_gate",
]  # fmt: skip
METHODS = ["base", "peft_lora", *OUR_METHODS, "official_loop_moka"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLayout:
    """One sample: ``prefix`` text (system prompt, markers), ``visual`` then ``audio`` tokens, a short text
    gap, the ``question`` span, and text up to ``tokens`` (the response). Every sample of the batch is
    alike, as in the official data (always 320 video and 320 audio tokens)."""

    batch: int
    tokens: int
    visual: int
    audio: int
    question: int
    prefix: int = 32
    gap: int = 8

    def routing(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``modality_ids`` [B, L] and ``question_mask`` [B, L], as ``set_routing`` takes them."""
        segments = [
            (Modality.TEXT, self.prefix, False),
            (Modality.VISUAL, self.visual, False),
            (Modality.AUDIO, self.audio, False),
            (Modality.TEXT, self.gap, False),
            (Modality.TEXT, self.question, True),
        ]
        used = sum(n for _, n, _ in segments)
        if used > self.tokens:
            raise ValueError(f"layout needs {used} tokens but a sample has {self.tokens}")
        segments.append((Modality.TEXT, self.tokens - used, False))
        ids = torch.cat([torch.full((n,), int(m), dtype=torch.long) for m, n, _ in segments])
        question = torch.cat([torch.full((n,), q, dtype=torch.bool) for _, n, q in segments])
        return ids.repeat(self.batch, 1).to(device), question.repeat(self.batch, 1).to(device)


@dataclass(frozen=True)
class StackSize:
    hidden: int
    intermediate: int
    heads: int
    layers: int


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    layout: TokenLayout
    linear_width: int
    stack: StackSize
    warmup: int
    linear_repeats: int
    stack_repeats: int


def make_settings(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.quick:
        layout = TokenLayout(batch=2, tokens=48, visual=8, audio=8, question=6, prefix=4, gap=2)
        linear_width, stack = 64, StackSize(hidden=64, intermediate=128, heads=4, layers=2)
        warmup, linear_repeats, stack_repeats = 1, 2, 2
    else:
        layout = TokenLayout(batch=2, tokens=1024, visual=320, audio=320, question=48)
        linear_width = 4096
        # The 7B-width stack only on a GPU: four of its layers take tens of seconds per step on a small CPU.
        stack = (
            StackSize(hidden=4096, intermediate=11008, heads=32, layers=4)
            if cuda
            else StackSize(hidden=1024, intermediate=2816, heads=16, layers=4)
        )
        # Few rounds on the CPU, where one step takes about 1 s (linear) or 3 s (stack) on 2 cores and the
        # default run must finish in minutes (about 6 on an idle 2-core machine).
        warmup, linear_repeats, stack_repeats = (3, 20, 10) if cuda else (1, 7, 5)
    if args.repeats is not None:
        linear_repeats = stack_repeats = args.repeats
    return Settings(device, DTYPES[args.dtype], layout, linear_width, stack, warmup, linear_repeats, stack_repeats)


# ---------------------------------------------------------------------------------------------------
# The official per-sample loop
# ---------------------------------------------------------------------------------------------------
class OfficialMasks:
    """The masks the official code threads through every adapted layer: ``[text, video, audio, question]``,
    each [B, L, 1] int32, 0 at pads. Shared by the layers of one model, like our routing state."""

    def __init__(self) -> None:
        self.masks: list[Tensor] | None = None

    def bind(self, modality_ids: Tensor, question_mask: Tensor) -> None:
        kinds = [
            modality_ids == int(Modality.TEXT),
            modality_ids == int(Modality.VISUAL),
            modality_ids == int(Modality.AUDIO),
            question_mask,
        ]
        self.masks = [kind.to(torch.int32).unsqueeze(-1) for kind in kinds]


class OfficialLoopMoka(nn.Module):
    """MokA computed as the official audio-visual code does it (moka_reference.md §2a), for comparison only.

    ``a_m = A_m(dropout(x * mask_m)) * s`` for m in text / video / audio, each A over the whole sequence;
    then, per sample and once for video and once for audio, the media tokens attend to the question span
    (keys = values = the text A's outputs there, logits scaled by 1/sqrt(r) as in the newest official code)
    and add the result with weight ``blc_weight`` (1, the official value); ``h = W0 x + B(a_t + a_v' + a_a')``.
    The loop, the three full-length A's and the in-place writes are kept on purpose: they are what is
    being measured. Adapter weights are fp32 and the delta is added in the base's dtype, as in our layers
    and in peft, so the comparison is about the computation only.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        masks: OfficialMasks,
        rank: int = RANK,
        alpha: float = ALPHA,
        dropout: float = DROPOUT,
        blc_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.masks = masks
        self.rank = rank
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A0 = nn.Linear(base_layer.in_features, rank, bias=False, **factory)  # text
        self.lora_A1 = nn.Linear(base_layer.in_features, rank, bias=False, **factory)  # video
        self.lora_A2 = nn.Linear(base_layer.in_features, rank, bias=False, **factory)  # audio
        self.lora_B0 = nn.Linear(rank, base_layer.out_features, bias=False, **factory)
        for down in (self.lora_A0, self.lora_A1, self.lora_A2):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B0.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        self.blc_weight = blc_weight

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.masks.masks is None:
            raise RuntimeError("OfficialLoopMoka ran with no masks bound")
        text_mask, video_mask, audio_mask, question_mask = self.masks.masks
        x = x.to(self.lora_A0.weight.dtype)
        only_inputs = [x * text_mask, x * video_mask, x * audio_mask]
        downs = [self.lora_A0, self.lora_A1, self.lora_A2]
        output_a = [down(self.lora_dropout(part)) * self.scaling for down, part in zip(downs, only_inputs, strict=True)]
        question_token = output_a[0] * question_mask
        attended = []
        for media_token, media_mask in ((output_a[1], video_mask), (output_a[2], audio_mask)):
            new_media = torch.zeros_like(media_token)
            for i in range(question_token.size(0)):
                query = media_token[i].unsqueeze(0)
                indices = torch.where(question_mask[i] == 1)[0]
                key = question_token[i, indices[0] : indices[-1] + 1].unsqueeze(0)
                score = torch.softmax(torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(self.rank), dim=-1)
                output = torch.matmul(score, key)  # values = keys
                new_media[i] = media_token[i] + media_mask[i] * output[0] * self.blc_weight
            attended.append(new_media)
        delta = self.lora_B0(output_a[0] + attended[0] + attended[1])
        return result + delta.to(result.dtype)


def inject_official_loop(
    model: nn.Module, target_modules: list[str], masks: OfficialMasks, dropout: float = DROPOUT
) -> nn.Module:
    """Wrap the named ``nn.Linear``-s of ``model`` in ``OfficialLoopMoka`` and freeze everything else."""
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf in target_modules and isinstance(module, nn.Linear):
            setattr(model.get_submodule(parent_name), leaf, OfficialLoopMoka(module, masks, dropout=dropout))
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in f".{parameter_name}")
    return model


# ---------------------------------------------------------------------------------------------------
# Equivalence of the loop baseline and our moka
# ---------------------------------------------------------------------------------------------------
class _OneLinear(nn.Module):
    """A model holding one linear named ``proj``, so both injections find it by name."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def official_settings_config(dropout: float = 0.0) -> AdapterConfig:
    """Our ``moka`` configured as the official audio-visual code: s before the attention, lambda 1, 1/sqrt(r)."""
    return AdapterConfig(
        method="moka",
        rank=RANK,
        alpha=ALPHA,
        dropout=dropout,
        target_modules=["proj"],
        modalities=["text", "visual", "audio"],
        cross_attn_lambda=1.0,
        attn_scale="rank",
        scaling_position="before_attention",
    )


def check_official_loop_matches_moka(device: torch.device | str = "cpu", seed: int = 0, atol: float = 1e-5) -> float:
    """Run ``OfficialLoopMoka`` and our ``moka`` (official settings) on the same random weights (B non-zero)
    and a ragged batch with padding; raise if outputs or gradients differ by more than ``atol`` (fp32),
    relative to each tensor's largest magnitude when that exceeds 1. Returns the largest difference seen."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    in_features, out_features = 40, 24
    # Three samples of one padded length: different spans, positions and question lengths, left padding.
    layouts = [
        [("pad", 0), ("text", 3), ("visual", 6), ("audio", 5), ("text", 1), ("question", 4), ("text", 5)],
        [("pad", 6), ("text", 2), ("visual", 3), ("audio", 2), ("question", 7), ("text", 4)],
        [("pad", 3), ("text", 1), ("audio", 4), ("visual", 4), ("text", 2), ("question", 1), ("text", 9)],
    ]
    kinds = {"pad": int(Modality.PAD), "text": 0, "question": 0, "visual": 1, "audio": 2}
    ids = torch.tensor([[kinds[k] for k, n in lay for _ in range(n)] for lay in layouts], device=device)
    question = torch.tensor([[k == "question" for k, n in lay for _ in range(n)] for lay in layouts], device=device)

    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.2)
    masks = OfficialMasks()
    # No dropout: the two draw their masks differently (the official code draws one per modality).
    official = inject_official_loop(_OneLinear(copy.deepcopy(linear)), ["proj"], masks, dropout=0.0).to(device)
    ours = inject_adapters(_OneLinear(copy.deepcopy(linear)), official_settings_config()).to(device)
    layer = official.proj
    with torch.no_grad():
        layer.lora_B0.weight.copy_(torch.randn(layer.lora_B0.weight.shape, generator=generator) * 0.5)
        for ours_name, theirs in (("text", layer.lora_A0), ("visual", layer.lora_A1), ("audio", layer.lora_A2)):
            ours.proj.lora_A[ours_name].weight.copy_(theirs.weight)
        ours.proj.lora_B.weight.copy_(layer.lora_B0.weight)

    x = torch.randn(ids.shape[0], ids.shape[1], in_features, generator=generator).to(device)
    grad_out = torch.randn(ids.shape[0], ids.shape[1], out_features, generator=generator).to(device)
    masks.bind(ids, question)
    set_routing(ours, ids, question)
    results = []
    for model in (official, ours):
        x_in = x.clone().requires_grad_(True)
        out = model(x_in)
        out.backward(grad_out)
        results.append((out.detach(), x_in.grad, model))
    (out_official, dx_official, _), (out_ours, dx_ours, _) = results
    pairs = {
        "output": (out_official, out_ours),
        "input grad": (dx_official, dx_ours),
        "grad B": (layer.lora_B0.weight.grad, ours.proj.lora_B.weight.grad),
        "grad A text": (layer.lora_A0.weight.grad, ours.proj.lora_A["text"].weight.grad),
        "grad A visual": (layer.lora_A1.weight.grad, ours.proj.lora_A["visual"].weight.grad),
        "grad A audio": (layer.lora_A2.weight.grad, ours.proj.lora_A["audio"].weight.grad),
    }
    worst = 0.0
    for what, (theirs, mine) in pairs.items():
        # Relative to the tensor's scale (at least 1): gradients summed over ~100 tokens reach tens, where
        # fp32 rounding alone exceeds an absolute 1e-5.
        diff = float((theirs - mine).abs().max()) / max(1.0, float(theirs.abs().max()))
        if not diff <= atol:  # also catches NaN
            raise AssertionError(
                f"OfficialLoopMoka and moka (official settings) differ: {what} max |diff| / max(1, max |value|) "
                f"= {diff:.3g} > {atol}; the loop baseline would not measure the same computation"
            )
        worst = max(worst, diff)
    # A B of zeros would hide a wrong cross-attention; make sure the interaction actually mattered.
    if float(out_ours.abs().max()) == 0.0:
        raise AssertionError("the equivalence check ran with a zero adapter output")
    return worst


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """One method ready to run: ``step`` does one forward and returns the output to backpropagate."""

    model: nn.Module
    step: Callable[[], Tensor]
    inputs: list[Tensor]


@dataclass
class Row:
    method: str
    time_ms: float
    times_ms: list[float]
    saved_bytes: int
    peak_bytes: int | None
    trainable_params: int
    ratio_base: float = math.nan
    ratio_peft: float = math.nan
    memory_ratio_peft: float = math.nan


@dataclass
class CaseResult:
    case: str
    description: str
    rows: list[Row] = field(default_factory=list)


def _autocast(settings: Settings) -> contextlib.AbstractContextManager:
    """bf16 runs under autocast, as training does (engine.py): the adapters' fp32 weights then take bf16
    inputs as they are, where without it every adapted layer would copy its input up to fp32."""
    if settings.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(settings.device.type, dtype=settings.dtype)


def _run_once(work: Workload, grad_out: Tensor, trainable: list[nn.Parameter], settings: Settings) -> None:
    # As an optimizer's zero_grad(set_to_none=True): no gradient accumulation into old buffers.
    for tensor in (*trainable, *work.inputs):
        tensor.grad = None
    with _autocast(settings):
        out = work.step()
    out.backward(grad_out)


def warm_up(work: Workload, grad_out: Tensor, settings: Settings) -> int:
    """``settings.warmup`` untimed steps; the first counts the bytes saved for backward, which it returns."""
    trainable = [p for p in work.model.parameters() if p.requires_grad]
    exclude = {t.untyped_storage().data_ptr() for t in (*work.model.parameters(), *work.model.buffers())}
    meter = SavedTensorMeter(exclude)
    for tensor in (*trainable, *work.inputs):
        tensor.grad = None
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda tensor: tensor), _autocast(settings):
        out = work.step()
    out.backward(grad_out)
    del out
    for _ in range(settings.warmup - 1):
        _run_once(work, grad_out, trainable, settings)
    return meter.total


def timed_step(work: Workload, grad_out: Tensor, settings: Settings) -> float:
    trainable = [p for p in work.model.parameters() if p.requires_grad]
    synchronize(settings.device)
    start = time.perf_counter()
    _run_once(work, grad_out, trainable, settings)
    synchronize(settings.device)
    return (time.perf_counter() - start) * 1e3


def peak_step_bytes(work: Workload, grad_out: Tensor, settings: Settings) -> int:
    """On a GPU: the peak allocated over one forward+backward, less what was allocated before it."""
    device = settings.device
    trainable = [p for p in work.model.parameters() if p.requires_grad]
    # Gradients of the last step stay allocated, as they would between steps; drop them first so that
    # the delta holds this step's activations, temporaries and new gradients.
    for tensor in (*trainable, *work.inputs):
        tensor.grad = None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _run_once(work, grad_out, trainable, settings)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """The median over rounds of time / the reference's time in the same round: drift of the machine between
    rounds (which moves whole runs here) cancels, as it does not between separately timed blocks."""
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))


def add_ratios(rows: list[Row], gpu: bool) -> None:
    by_name = {row.method: row for row in rows}
    base, peft = by_name["base"], by_name["peft_lora"]
    for row in rows:
        row.ratio_base = paired_ratio(row.times_ms, base.times_ms)
        row.ratio_peft = paired_ratio(row.times_ms, peft.times_ms)
        mine, theirs = (row.peak_bytes, peft.peak_bytes) if gpu else (row.saved_bytes, peft.saved_bytes)
        row.memory_ratio_peft = mine / theirs if theirs else math.nan


# ---------------------------------------------------------------------------------------------------
# Building each method on a case
# ---------------------------------------------------------------------------------------------------
def _peft_lora(model: nn.Module, targets: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=targets, bias="none")
    with warnings.catch_warnings():
        # peft asks transformers' deprecated is_gradient_checkpointing; not ours to fix, and noise here.
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def adapt(
    method: str, base: nn.Module, targets: list[str], routing: tuple[Tensor, Tensor]
) -> tuple[nn.Module, Callable[[], None]]:
    """A copy of ``base`` carrying ``method``, and the call that binds the batch's routing to it. The copies share
    ``base``'s frozen parameters (every method freezes them): all methods are alive at once while they take turns,
    and one set of 7B-width weights per method would not fit a GPU."""
    model = copy.deepcopy(base, memo={id(parameter): parameter for parameter in base.parameters()})
    if method == "base":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model, lambda: None
    if method == "peft_lora":
        return _peft_lora(model, targets), lambda: None
    if method == "official_loop_moka":
        masks = OfficialMasks()
        model = inject_official_loop(model, targets, masks)
        return model, lambda: masks.bind(*routing)
    config = AdapterConfig(
        method=method,
        rank=RANK,
        alpha=ALPHA,
        dropout=DROPOUT,
        target_modules=targets,
        modalities=["text", "visual", "audio"],
    )
    model = inject_adapters(model, config)
    return model, lambda: set_routing(model, *routing)


def linear_workloads(settings: Settings) -> tuple[str, Callable[[str], Workload], Tensor]:
    """One k x d linear (no bias, as in LLaMA). The routing is bound once: in a model, its per-batch views
    are built once and shared by every adapted layer, so a single layer's steady state reuses them."""
    width, layout, device, dtype = settings.linear_width, settings.layout, settings.device, settings.dtype
    torch.manual_seed(0)
    base = _OneLinear(nn.Linear(width, width, bias=False)).to(device=device, dtype=dtype).requires_grad_(False)
    routing = layout.routing(device)
    x = torch.randn(layout.batch, layout.tokens, width, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(layout.batch, layout.tokens, width, device=device, dtype=dtype)

    def build(method: str) -> Workload:
        model, bind = adapt(method, base, ["proj"], routing)
        model.train()
        bind()
        return Workload(model, lambda: model(x), [x])

    description = (
        f"one linear, k = d = {width}, batch {layout.batch} x {layout.tokens} tokens "
        f"({layout.visual} visual, {layout.audio} audio, {layout.question} question), r = {RANK}"
    )
    return description, build, grad_out


def stack_workloads(settings: Settings) -> tuple[str, Callable[[str], Workload], Tensor]:
    """A ``LlamaModel`` of a few decoder layers, fed ``inputs_embeds`` (no vocabulary to speak of). The
    routing is bound in every step, as a training step binds each new batch."""
    from transformers import LlamaConfig, LlamaModel

    size, layout, device, dtype = settings.stack, settings.layout, settings.device, settings.dtype
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=layout.tokens,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    base = LlamaModel(config).to(device=device, dtype=dtype).requires_grad_(False)
    routing = layout.routing(device)
    embeds = torch.randn(layout.batch, layout.tokens, size.hidden, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(layout.batch, layout.tokens, size.hidden, device=device, dtype=dtype)

    def build(method: str) -> Workload:
        model, bind = adapt(method, base, STACK_TARGETS, routing)
        model.train()

        def step() -> Tensor:
            bind()
            return model(inputs_embeds=embeds, use_cache=False).last_hidden_state

        return Workload(model, step, [embeds])

    description = (
        f"{size.layers} LlamaDecoderLayer-s, hidden {size.hidden}, intermediate {size.intermediate}, "
        f"{size.heads} heads, q/k/v/o/gate/up/down adapted, batch {layout.batch} x {layout.tokens} tokens"
    )
    return description, build, grad_out


def run_case(case: str, settings: Settings, log: Callable[[str], None]) -> CaseResult:
    """Every method built on the case and warmed up, then ``repeats`` rounds that time one step of each, the
    order rotated each round (bench_train does the same): time is each method's median, and the ratios are
    medians of the per-round ratios."""
    workloads = {"linear": linear_workloads, "stack": stack_workloads}[case]
    repeats = settings.linear_repeats if case == "linear" else settings.stack_repeats
    description, build, grad_out = workloads(settings)
    works, saved = {}, {}
    for method in METHODS:
        works[method] = build(method)
        saved[method] = warm_up(works[method], grad_out, settings)
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_ in range(repeats):
        shift = round_ % len(METHODS)
        for method in METHODS[shift:] + METHODS[:shift]:
            times[method].append(timed_step(works[method], grad_out, settings))
        log(f"  {case:6s} round {round_ + 1}/{repeats}: peft_lora {times['peft_lora'][-1]:.1f} ms")
    result = CaseResult(case, description)
    for method in METHODS:
        work = works.pop(method)
        peak = peak_step_bytes(work, grad_out, settings) if settings.device.type == "cuda" else None
        trainable = sum(p.numel() for p in work.model.parameters() if p.requires_grad)
        result.rows.append(Row(method, statistics.median(times[method]), times[method], saved[method], peak, trainable))
        del work  # free this copy of the weights
    add_ratios(result.rows, gpu=settings.device.type == "cuda")
    for row in result.rows:
        log(f"  {case:6s} {row.method:20s} {row.time_ms:10.1f} ms  {row.ratio_peft:.3f}x peft_lora")
    return result


# ---------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------
def memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak torch.cuda.max_memory_allocated over one forward+backward, less the memory allocated before it"
    return (
        "bytes of tensors saved for backward (saved_tensors_hooks; each storage once; parameters and buffers excluded)"
    )


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _milliseconds(value: float) -> str:
    """Three significant digits below 10 ms: a frozen linear's 0.04 ms must not print as 0.0."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def format_table(result: CaseResult, gpu: bool) -> str:
    memory = "peak MiB" if gpu else "saved MiB"
    lines = [
        f"| method | time ms | x base | x peft LoRA | {memory} | x peft LoRA memory |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result.rows:
        value = row.peak_bytes if gpu else row.saved_bytes
        lines.append(
            f"| {row.method} | {_milliseconds(row.time_ms)} | {_ratio(row.ratio_base)} | {_ratio(row.ratio_peft)} "
            f"| {value / 2**20:.1f} | {_ratio(row.memory_ratio_peft)} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the frozen model")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per method (median reported)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests (seconds)")
    parser.add_argument("--case", choices=["linear", "stack", "all"], default="all")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no GPU")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables and return everything that ``--json`` writes."""
    args = parse_args(argv)
    settings = make_settings(args)
    gpu = settings.device.type == "cuda"

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    worst = check_official_loop_matches_moka(settings.device)
    log(f"OfficialLoopMoka == moka (before_attention, lambda 1, 1/sqrt(r)): max |diff| {worst:.2g}")

    cases = ["linear", "stack"] if args.case == "all" else [args.case]
    started = time.perf_counter()
    results = [run_case(case, settings, log) for case in cases]
    report: dict[str, Any] = {
        "machine": machine_info(settings.device),
        "device": str(settings.device),
        "dtype": args.dtype,
        "memory_measure": memory_measure(settings.device),
        "settings": {
            "quick": args.quick,
            "warmup": settings.warmup,
            "linear_repeats": settings.linear_repeats,
            "stack_repeats": settings.stack_repeats,
            "rank": RANK,
            "alpha": ALPHA,
            "dropout": DROPOUT,
            "layout": asdict(settings.layout),
            "linear_width": settings.linear_width,
            "stack": asdict(settings.stack),
        },
        "official_loop_max_abs_diff": worst,
        "cases": {r.case: {"description": r.description, "rows": [asdict(row) for row in r.rows]} for r in results},
        "wall_s": time.perf_counter() - started,
    }

    machine = report["machine"]
    print(
        f"machine: {machine['cpu']}"
        + (f", GPU {machine['gpu']}" if gpu else "")
        + f"; torch {machine['torch']}; {machine['threads']} threads; device {settings.device}, {args.dtype}"
        + f"; commit {machine['commit']}"
    )
    print(f"memory: {report['memory_measure']}")
    print(
        f"time: median of {settings.linear_repeats} (linear) / {settings.stack_repeats} (stack) rounds of one "
        f"forward+backward step per method (order rotated each round; ratios are medians of per-round ratios) "
        f"after {settings.warmup} warm-up; r = {RANK}, alpha = {ALPHA:g}, dropout {DROPOUT} "
        "(our methods at library defaults)" + ("; bf16 under autocast" if settings.dtype != torch.float32 else "")
    )
    for result in results:
        print(f"\n### {result.case}: {result.description}\n")
        print(format_table(result, gpu))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, allow_nan=True))
    return report


if __name__ == "__main__":
    main()
