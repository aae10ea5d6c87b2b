"""Whole training steps of none / lora / moka on the same model and the same batches: time, tokens/s, memory.

    python scripts/bench_train.py                        # tiny and mid on the CPU (a few minutes on 2 cores)
    python scripts/bench_train.py --quick                # tiny only, 2 timed steps (what the test runs)
    python scripts/bench_train.py --device cuda --configs tiny,mid,large --json bench_train.json

One step is the training step of ``moka_train/training/recipe.py`` with ``deepspeed=none``, on one process and
one micro-batch per optimizer step: the forward with the loss summed over tokens and divided by the step's
label count, the non-finite-loss guard, backward, gradient clipping, AdamW, the learning-rate schedule and
``zero_grad(set_to_none=True)``, all through the recipe's own ``TorchEngine`` (``build_engine``). The data and
the model come through the real config path: ``configs/train.yaml`` composed with ``experiment=demo`` (as
``scripts/demo.py`` does), then ``build_data_and_model`` and ``build_engine``. Methods:

- ``none``: ``stage=pretrain`` (the projectors and the added tokens' rows train, no adapter);
- ``lora``: ``stage=instruct adapter=lora``;
- ``moka``: ``stage=instruct adapter=moka``.

Data: the synthetic demo set (``data_prep/make_demo_data.py``) written into ``--data`` (a temporary folder by
default; a folder that already holds the set is reused) and its encoder features cached once
(``features.cache_dir=<data>/feature_cache``), so the frozen encoders are not part of the timed step (nor is
loading and collating: the batches are collated once, before timing). Every method steps through the same
list of batches (the first micro-batches of the recipe's ``BatchPlan``, same samples, same order); after the
warm-up, the methods take turns step by step, in an order rotated every round, so drift (another process, the
CPU's clock) falls on all of them alike.

Configurations: ``tiny`` is the demo preset as is (a 2-layer Llama of width 64, 4 queries per segment, fp32);
``mid`` the same with a wider, deeper backbone and projector (Hydra overrides, see ``CONFIGURATIONS``); ``wide``
4 layers of TinyLlama-1.1B's width (2048) in fp32, the widest a CPU steps in seconds (``--configs wide``);
``large`` (GPU only) a Llama of TinyLlama-1.1B's shape with random weights (bf16 weights, bf16 autocast as
``stage.precision=bf16``, the vocabulary of 32,000 rows of the real model, the demo tokenizer using the first
~400 ids) behind the official projector (32 queries: 320 video + 320 audio tokens per sample, as in the paper),
which reads the demo's tiny encoders' features (their width, not CLIP-L's or BEATs-base's: the projector's input
layer is smaller than the paper's; every other shape is the paper's).

Reported per method: the median step time, tokens/s (the batch's ``attention_mask`` sum over the timed steps
divided by their summed time), and memory. On the CPU, memory is the bytes of the tensors saved for backward
over one step (``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters and buffers left
out; tensors inside gradient-checkpointed blocks are not seen) plus the trainable parameters' bytes and the
optimizer state's: what is held at the end of the forward, the frozen weights (the same for every method)
left out. On a GPU, it is the peak of ``torch.cuda.max_memory_allocated`` over one step, less what was
allocated before it (the weights and the optimizer state are in that; gradients, activations and
temporaries are in the peak). Ratios are against ``lora`` and ``none``; the targets are MokA <= 1.05x LoRA
in step time and in memory (judged on the ratio of the medians; the median of the per-round ratios, each of
two steps run seconds apart, is printed beside it, as it suffers less from a shared machine's load swings).
Nothing is assumed or hard-coded: the tables show what was measured, and timings on a shared machine are
noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from moka_train.benchmarking import SavedTensorMeter, machine_info, synchronize
from moka_train.data.collate import batch_to_device
from moka_train.models.mllm import count_label_tokens, encode_media
from moka_train.training.batch_plan import BatchPlan, PlanSampler
from moka_train.training.config_checks import check_config
from moka_train.training.distributed import DistributedContext, init_distributed
from moka_train.training.engine import TorchEngine
from moka_train.training.guards import check_loss
from moka_train.training.recipe import build_data_and_model, build_engine

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("none", "lora", "moka")
METHOD_OVERRIDES = {
    "none": ["stage=pretrain"],
    "lora": ["stage=instruct", "adapter=lora"],
    "moka": ["stage=instruct", "adapter=moka"],
}
TARGET = 1.05  # MokA <= 1.05x LoRA, in step time and in memory


# ---------------------------------------------------------------------------------------------------
# Configurations and settings
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Configuration:
    name: str
    description: str
    overrides: tuple[str, ...]
    batch: int  # the default micro-batch (= global batch: one micro-batch per optimizer step)
    gpu_only: bool = False


_BACKBONE = "model.backbone."
CONFIGURATIONS = {
    "tiny": Configuration(
        "tiny",
        "the demo preset (configs/experiment/demo.yaml): Llama 2 layers x 64 wide, projector 4 queries x 32, fp32",
        (),
        batch=8,
    ),
    "mid": Configuration(
        "mid",
        "demo preset, Llama 8 layers x 512 (intermediate 1408, 8 heads, 4 KV heads), projector 8 queries x 128, fp32",
        (
            f"{_BACKBONE}hidden_size=512",
            f"{_BACKBONE}intermediate_size=1408",
            f"{_BACKBONE}num_hidden_layers=8",
            f"{_BACKBONE}num_attention_heads=8",
            f"{_BACKBONE}num_key_value_heads=4",
            "projector.num_queries=8",
            "projector.qformer_hidden_size=128",
            "projector.qformer_heads=4",
            "projector.qformer_intermediate_size=512",
        ),
        batch=8,
    ),
    "wide": Configuration(
        "wide",
        "demo preset, Llama 4 layers x 2048 (intermediate 5632, 32 heads, 4 KV heads: TinyLlama-1.1B's layer), "
        "projector 8 queries x 128, fp32: how the ratios move with the width a CPU can still step",
        (
            f"{_BACKBONE}hidden_size=2048",
            f"{_BACKBONE}intermediate_size=5632",
            f"{_BACKBONE}num_hidden_layers=4",
            f"{_BACKBONE}num_attention_heads=32",
            f"{_BACKBONE}num_key_value_heads=4",
            f"{_BACKBONE}initializer_range=0.02",
            "projector.num_queries=8",
            "projector.qformer_hidden_size=128",
            "projector.qformer_heads=4",
            "projector.qformer_intermediate_size=512",
        ),
        batch=8,
    ),
    "large": Configuration(
        "large",
        "Llama of TinyLlama-1.1B's shape, random (22 layers x 2048, intermediate 5632, 32 heads, 4 KV heads, "
        "vocab 32000), bf16 weights and autocast; official projector (32 queries x 768) on the demo's tiny "
        "encoders' features",
        (
            f"{_BACKBONE}hidden_size=2048",
            f"{_BACKBONE}intermediate_size=5632",
            f"{_BACKBONE}num_hidden_layers=22",
            f"{_BACKBONE}num_attention_heads=32",
            f"{_BACKBONE}num_key_value_heads=4",
            # The real model's vocabulary; the demo tokenizer's ids (384 + the added tokens) lie inside it,
            # and AddedTokenEmbedding serves the added ones from its own trainable rows.
            f"{_BACKBONE}vocab_size=32000",
            f"{_BACKBONE}dtype=bf16",
            # transformers' default init for a model this size (the demo's 0.1 suits its 2-layer, 64-wide LLM).
            f"{_BACKBONE}initializer_range=0.02",
            "stage.precision=bf16",
            "projector=qformer_official",
        ),
        batch=8,
        gpu_only=True,
    ),
}


@dataclass(frozen=True)
class Settings:
    device: torch.device
    configs: tuple[str, ...]
    methods: tuple[str, ...]
    warmup: int
    steps: int
    batch: int | None  # None: each configuration's own
    gradient_checkpointing: bool
    videos: int
    quick: bool


def make_settings(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.quick:
        configs, warmup, steps, videos = ("tiny",), 2, 2, 8
    else:
        # On 2 idle CPU cores a mid step takes about 2 s: 10 steps keep the default run near 2 minutes.
        configs, warmup, steps, videos = ("tiny", "mid"), (3 if cuda else 2), (20 if cuda else 10), 32
    if args.configs is not None:
        configs = tuple(args.configs)
    return Settings(
        device=device,
        configs=configs,
        methods=tuple(args.methods),
        warmup=args.warmup if args.warmup is not None else warmup,
        steps=args.steps if args.steps is not None else steps,
        batch=args.batch if args.batch is not None else (4 if args.quick else None),
        gradient_checkpointing=args.gradient_checkpointing,
        videos=args.videos if args.videos is not None else videos,
        quick=args.quick,
    )


# ---------------------------------------------------------------------------------------------------
# Data and models, through the real config path
# ---------------------------------------------------------------------------------------------------
def make_demo_data(root: Path, videos: int, log: Callable[[str], None]) -> str:
    """The demo set under ``root``: reused when ``root`` already holds one, else written (a few seconds).
    (A small local copy of scripts/demo.py's loader: one script does not import another.)"""
    if (root / "summary.json").is_file():
        log(f"data: reusing the demo set in {root}")
        return "reused"
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "data_prep" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    held_out = max(2, videos // 12)
    log(f"data: writing {videos} demo videos into {root}")
    module.generate(root, num_videos=videos, val_videos=held_out, test_videos=held_out, progress=False)
    return "written"


def compose_config(overrides: list[str]) -> DictConfig:
    """configs/train.yaml with ``experiment=demo`` and ``overrides``, as scripts/demo.py composes it."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=["experiment=demo", *overrides])


def config_overrides(configuration: Configuration, settings: Settings, data: Path) -> list[str]:
    """The overrides every method of ``configuration`` shares (the method's own come first)."""
    batch = settings.batch or configuration.batch
    total_steps = settings.warmup + settings.steps + 1  # + the CUDA memory step
    return [
        f"data.builder.root={data}",
        f"features.cache_dir={data / 'feature_cache'}",
        "deepspeed=none",
        "logger=none",
        "loader.num_workers=0",
        f"stage.micro_batch_size={batch}",
        f"stage.global_batch_size={batch}",
        f"stage.max_steps={total_steps}",
        f"stage.gradient_checkpointing={str(settings.gradient_checkpointing).lower()}",
        *configuration.overrides,
    ]


@dataclass
class Built:
    """One method of one configuration, ready to step."""

    method: str
    cfg: DictConfig
    engine: TorchEngine
    trainable_params: int
    trainable_bytes: int
    frozen_bytes: int


def build_method(
    configuration: Configuration, method: str, settings: Settings, data: Path, ctx: DistributedContext
) -> tuple[Built, Any, Any]:
    """The recipe's ``_train`` up to its loop: seed, ``build_data_and_model``, ``BatchPlan``, ``build_engine``.
    Returns the method, its dataset and its collator."""
    cfg = compose_config([*METHOD_OVERRIDES[method], *config_overrides(configuration, settings, data)])
    check_config(cfg)
    torch.manual_seed(cfg.seed)  # as _train: identical initialisation of every method's common parts
    dataset, model, collator, encoders = build_data_and_model(cfg, ctx)
    if encoders:
        raise RuntimeError("the encoders should be cached (features.cache_dir), not part of the timed step")
    plan = BatchPlan(len(dataset), cfg.stage.global_batch_size, cfg.stage.micro_batch_size, ctx.world_size, cfg.seed)
    engine = build_engine(cfg, model, plan, int(cfg.stage.max_steps), ctx)
    if not isinstance(engine, TorchEngine):
        raise RuntimeError(f"deepspeed=none should give the TorchEngine, got {type(engine).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    built = Built(
        method,
        cfg,
        engine,
        trainable_params=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        frozen_bytes=sum(p.numel() * p.element_size() for p in frozen),
    )
    return built, dataset, collator


def check_same_setup(built: list[Built]) -> None:
    """Only the method may differ: the stage's settings (but its name), the model and the projector."""
    first = built[0]

    def comparable(cfg: DictConfig) -> dict[str, Any]:
        stage = OmegaConf.to_container(cfg.stage, resolve=True)
        stage.pop("name")
        return {
            "stage": stage,
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "projector": OmegaConf.to_container(cfg.projector, resolve=True),
        }

    for other in built[1:]:
        if comparable(other.cfg) != comparable(first.cfg):
            raise RuntimeError(
                f"{first.method} and {other.method} differ in more than the method: "
                f"{comparable(first.cfg)} vs {comparable(other.cfg)}"
            )


def make_batches(dataset, collator, cfg: DictConfig, count: int, device: torch.device) -> list[dict[str, Any]]:
    """The first ``count`` micro-batches of the recipe's plan (cycled when the data holds fewer), collated
    once and moved to ``device``, with ``encode_media`` applied as the loop does (a no-op with cached features)."""
    batch = int(cfg.stage.micro_batch_size)
    plan = BatchPlan(len(dataset), batch, batch, 1, int(cfg.seed), drop_last=True)  # full batches only
    available = plan.steps_per_epoch * plan.accumulation_steps
    indices = list(PlanSampler(plan, rank=0, epochs=1))[: min(count, available)]
    batches = []
    for sample_indices in indices:
        collated = collator([dataset[i] for i in sample_indices])
        batches.append(encode_media({}, batch_to_device(collated, device)))
    return batches


# ---------------------------------------------------------------------------------------------------
# One step, and measuring it
# ---------------------------------------------------------------------------------------------------
def train_step(engine: TorchEngine, batch: dict[str, Any], step: int) -> float:
    """One optimizer step as ``recipe._train`` runs it with one micro-batch per step on one process."""
    global_labels = count_label_tokens(batch["labels"])
    with engine.micro_step(last=True):
        output = engine.forward(batch, label_normalizer=max(global_labels, 1))
        check_loss(output.loss, step, batch["ids"], "error")
        engine.backward(output.loss)
    loss = float(output.loss.detach().double().cpu())
    engine.step()
    return loss


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )


@dataclass
class Row:
    method: str
    stage: str
    adapter: str | None
    trainable_params: int
    time_ms: float  # median over the timed steps
    times_ms: list[float]
    tokens: int  # attention-mask tokens over the timed steps
    tokens_per_s: float
    memory_bytes: int  # what the table shows: CPU: saved + trainable + optimizer state; CUDA: peak_delta_bytes
    saved_bytes: int | None
    trainable_bytes: int
    optimizer_state_bytes: int
    peak_delta_bytes: int | None
    frozen_bytes: int
    losses: list[float]
    time_vs_lora: float | None = None
    time_vs_none: float | None = None
    memory_vs_lora: float | None = None
    memory_vs_none: float | None = None


@dataclass
class ConfigResult:
    name: str
    description: str
    batch: int
    batches: int
    tokens_per_batch: list[int]
    overrides: list[str]
    rows: list[Row] = field(default_factory=list)
    targets: dict[str, Any] = field(default_factory=dict)


def run_configuration(
    name: str, settings: Settings, data: Path, ctx: DistributedContext, log: Callable[[str], None]
) -> ConfigResult:
    configuration = CONFIGURATIONS[name]
    device = settings.device
    built, datasets = [], []
    for method in settings.methods:
        started = time.perf_counter()
        one, dataset, collator = build_method(configuration, method, settings, data, ctx)
        built.append(one)
        datasets.append((dataset, collator))
        log(
            f"  {name} {method}: built in {time.perf_counter() - started:.1f} s, "
            f"{one.trainable_params:,} trainable parameters"
        )
    check_same_setup(built)

    cfg = built[0].cfg
    dataset, collator = datasets[0]
    batches = make_batches(dataset, collator, cfg, settings.warmup + settings.steps, device)
    # Every method's own collator gives the same first batch (same tokenizer, same number of queries).
    for other_dataset, other_collator in datasets[1:]:
        again = other_collator([other_dataset[i] for i in range(min(4, len(other_dataset)))])
        mine = collator([dataset[i] for i in range(min(4, len(dataset)))])
        if not torch.equal(again["input_ids"], mine["input_ids"]):
            raise RuntimeError("the methods' collators disagree on the same samples")
    del datasets
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    batch_size = int(cfg.stage.micro_batch_size)
    log(
        f"  {name}: {len(batches)} batches of {batch_size}, {min(tokens)}-{max(tokens)} tokens each; "
        f"{settings.warmup} warm-up + {settings.steps} timed steps per method, methods taking turns"
    )

    def batch_of(step: int) -> dict[str, Any]:
        return batches[step % len(batches)]

    # Warm-up; the first step of each method also counts the tensors saved for backward (the hooks slow it
    # down, but it is not timed).
    saved: dict[str, int] = {}
    losses: dict[str, list[float]] = {b.method: [] for b in built}
    for w in range(settings.warmup):
        for one in built:
            if w == 0:
                model = one.engine.module
                exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
                meter = SavedTensorMeter(exclude)
                with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda tensor: tensor):
                    losses[one.method].append(train_step(one.engine, batch_of(w), w + 1))
                saved[one.method] = meter.total
            else:
                losses[one.method].append(train_step(one.engine, batch_of(w), w + 1))

    times: dict[str, list[float]] = {b.method: [] for b in built}
    for r in range(settings.steps):
        step = settings.warmup + r
        order = built[r % len(built) :] + built[: r % len(built)]
        for one in order:
            synchronize(device)
            started = time.perf_counter()
            losses[one.method].append(train_step(one.engine, batch_of(step), step + 1))
            synchronize(device)
            times[one.method].append((time.perf_counter() - started) * 1e3)
        log(
            f"  {name} step {r + 1}/{settings.steps} (batch {step % len(batches)}, {tokens[step % len(batches)]} "
            "tokens): " + ", ".join(f"{b.method} {times[b.method][-1]:.1f} ms" for b in built)
        )

    peaks: dict[str, int] = {}
    if device.type == "cuda":
        step = settings.warmup + settings.steps
        for one in built:
            # engine.step() set the gradients to None: the delta holds this step's activations, temporaries
            # and new gradients; the weights and the optimizer state are already in `before`.
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            losses[one.method].append(train_step(one.engine, batch_of(0), step + 1))
            synchronize(device)
            peaks[one.method] = torch.cuda.max_memory_allocated(device) - before

    timed_tokens = sum(tokens[(settings.warmup + r) % len(batches)] for r in range(settings.steps))
    result = ConfigResult(
        name,
        configuration.description,
        batch_size,
        len(batches),
        tokens,
        config_overrides(configuration, settings, data),
    )
    for one in built:
        state = optimizer_state_bytes(one.engine.optimizer)
        cpu_memory = saved[one.method] + one.trainable_bytes + state
        result.rows.append(
            Row(
                method=one.method,
                stage=str(one.cfg.stage.name),
                adapter=None if one.cfg.get("adapter") is None else str(one.cfg.adapter.method),
                trainable_params=one.trainable_params,
                time_ms=statistics.median(times[one.method]),
                times_ms=times[one.method],
                tokens=timed_tokens,
                tokens_per_s=timed_tokens / (sum(times[one.method]) / 1e3),
                memory_bytes=peaks[one.method] if device.type == "cuda" else cpu_memory,
                saved_bytes=saved[one.method],
                trainable_bytes=one.trainable_bytes,
                optimizer_state_bytes=state,
                peak_delta_bytes=peaks.get(one.method),
                frozen_bytes=one.frozen_bytes,
                losses=losses[one.method],
            )
        )
    add_ratios(result)
    return result


def _divide(value: float, reference: Row | None, attribute: str) -> float | None:
    if reference is None:
        return None
    denominator = getattr(reference, attribute)
    return value / denominator if denominator else None


def add_ratios(result: ConfigResult) -> None:
    by_method = {row.method: row for row in result.rows}
    lora, none = by_method.get("lora"), by_method.get("none")
    for row in result.rows:
        row.time_vs_lora = _divide(row.time_ms, lora, "time_ms")
        row.time_vs_none = _divide(row.time_ms, none, "time_ms")
        row.memory_vs_lora = _divide(row.memory_bytes, lora, "memory_bytes")
        row.memory_vs_none = _divide(row.memory_bytes, none, "memory_bytes")
    moka = by_method.get("moka")
    if moka is not None and lora is not None:
        # Also the median over rounds of moka / lora within one round (the two ran seconds apart), which a
        # shared machine's load swings disturb less than the ratio of the two medians.
        paired = statistics.median(m / r for m, r in zip(moka.times_ms, lora.times_ms, strict=True))
        result.targets = {
            "time": {
                "moka_vs_lora": moka.time_vs_lora,
                "paired_median": paired,
                "target": TARGET,
                "met": moka.time_vs_lora <= TARGET,
            },
            "memory": {"moka_vs_lora": moka.memory_vs_lora, "target": TARGET, "met": moka.memory_vs_lora <= TARGET},
        }


# ---------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------
def memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "peak torch.cuda.max_memory_allocated over one step, less the memory allocated before it "
            "(weights and optimizer state already in it)"
        )
    return (
        "bytes of tensors saved for backward over one step (saved_tensors_hooks; each storage once; parameters "
        "and buffers excluded) + trainable parameters + optimizer state; frozen weights (same for all) excluded"
    )


def _ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def format_table(result: ConfigResult) -> str:
    lines = [
        "| method | trainable params | median step ms | x none | x lora | tokens/s | memory MiB | x none | x lora |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result.rows:
        lines.append(
            f"| {row.method} | {row.trainable_params:,} | {row.time_ms:.1f} | {_ratio(row.time_vs_none)} "
            f"| {_ratio(row.time_vs_lora)} | {row.tokens_per_s:,.0f} | {row.memory_bytes / 2**20:.2f} "
            f"| {_ratio(row.memory_vs_none)} | {_ratio(row.memory_vs_lora)} |"
        )
    return "\n".join(lines)


def format_targets(result: ConfigResult) -> str:
    if not result.targets:
        return "targets: not checked (needs both lora and moka)"
    lines = []
    for what, label in (("time", "step time"), ("memory", "memory")):
        target = result.targets[what]
        verdict = "met" if target["met"] else "NOT met"
        paired = f" (median of per-round ratios {target['paired_median']:.3f}x)" if "paired_median" in target else ""
        lines.append(f"target MokA <= {TARGET}x LoRA {label}: {target['moka_vs_lora']:.3f}x, {verdict}{paired}")
    return "\n".join(lines)


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose among {', '.join(choices)} (comma-separated), got {text!r}")
        return list(dict.fromkeys(items))

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--configs", type=_csv(tuple(CONFIGURATIONS)), default=None, help="default tiny,mid")
    parser.add_argument("--methods", type=_csv(METHODS), default=list(METHODS), help="default none,lora,moka")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default 10 CPU, 20 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 2 CPU, 3 GPU)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default: 8, the configuration's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device, help=f"default {default_device}")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="stage.gradient_checkpointing=true")
    parser.add_argument("--videos", type=int, default=None, help="demo videos to write (default 32; --quick 8)")
    parser.add_argument("--quick", action="store_true", help="tiny only, 2 timed steps of 4 samples (the test)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--data", type=Path, default=None, help="the demo set (reused if present; default: temp)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "videos"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup is not None and args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first warm-up step measures the saved tensors)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no GPU")
    gpu_only = [c for c in args.configs or () if CONFIGURATIONS[c].gpu_only]
    if gpu_only and args.device != "cuda":
        parser.error(
            f"--configs {','.join(gpu_only)} runs on a GPU only (a ~1.1B backbone in bf16; a CPU step would take "
            "minutes): use --device cuda, or --configs tiny,mid"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables and return everything that ``--json`` writes."""
    args = parse_args(argv)
    settings = make_settings(args)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    ctx = init_distributed(use_deepspeed=False)
    if ctx.world_size > 1:
        raise SystemExit("bench_train.py runs in one process: start it with python, not torchrun")
    if ctx.device.type != settings.device.type:
        ctx = replace(ctx, device=settings.device)  # --device cpu on a GPU machine

    with contextlib.ExitStack() as stack:
        if args.data is None:
            data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_train_")))
        else:
            data = args.data.resolve()
            data.mkdir(parents=True, exist_ok=True)
        data_state = make_demo_data(data, settings.videos, log)
        data_s = time.perf_counter() - started
        results = []
        for name in settings.configs:
            log(f"{name}: {CONFIGURATIONS[name].description}")
            results.append(run_configuration(name, settings, data, ctx, log))
            gc.collect()  # this configuration's models and optimizers, before the next one builds its own
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()

    wall_s = time.perf_counter() - started
    report: dict[str, Any] = {
        "machine": machine_info(settings.device),
        "device": str(settings.device),
        "memory_measure": memory_measure(settings.device),
        "settings": {
            "quick": settings.quick,
            "configs": list(settings.configs),
            "methods": list(settings.methods),
            "warmup": settings.warmup,
            "steps": settings.steps,
            "gradient_checkpointing": settings.gradient_checkpointing,
            "videos": settings.videos,
            "data": None if args.data is None else str(args.data),
            "data_state": data_state,
        },
        "target": TARGET,
        "configs": {r.name: asdict(r) for r in results},
        "data_s": data_s,
        "wall_s": wall_s,
    }

    machine = report["machine"]
    print(
        f"machine: {machine['cpu']}"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else "")
        + f"; torch {machine['torch']}; {machine['threads']} threads; device {settings.device}"
        + f"; commit {machine['commit']}"
    )
    print(f"memory: {report['memory_measure']}")
    print(
        f"time: median of {settings.steps} training steps per method (recipe step, deepspeed=none, one micro-batch "
        f"per step) after {settings.warmup} warm-up, methods taking turns; tokens/s = attention-mask tokens / time"
    )
    for result in results:
        print(
            f"\n### {result.name}: {result.description}; batch {result.batch}, "
            f"{statistics.mean(result.tokens_per_batch):.0f} tokens per batch on average\n"
        )
        print(format_table(result))
        print()
        print(format_targets(result))
    print(f"\nwall time {wall_s:.0f} s (data {data_s:.0f} s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
