"""Adapters inside real transformers backbones: peft parity, identity at init, gradient checkpointing,
bf16, parameter counts and placement."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from moka_train.adapters import (
    DEFAULT_TARGET_MODULES,
    AdaptedLinear,
    AdapterConfig,
    adapted_layers,
    adapter_named_parameters,
    available_methods,
    count_parameters,
    inject_adapters,
    load_adapter,
    set_routing,
)
from tests.helpers import VOCAB, position_ids, randomize_adapters, routing_batch, tiny_llama, tiny_qwen2

BACKBONES = {"llama": tiny_llama, "qwen2": tiny_qwen2}
LAYOUTS = [
    [("text", 3), ("visual", 6), ("audio", 4), ("question", 5), ("text", 3)],
    [("text", 2), ("visual", 3), ("question", 2), ("text", 2)],
]


def batch(pad_side: str = "left", seed: int = 0):
    ids, question, mask = routing_batch(LAYOUTS, pad_side=pad_side)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, ids.shape, generator=generator)
    return tokens, ids, question, mask


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_lora_equals_peft_lora(backbone, tmp_path):
    """Our lora on the same base weights and the same A/B equals peft's LoRA, via peft's own checkpoint."""
    tokens, _, _, mask = batch()
    peft_model = get_peft_model(
        BACKBONES[backbone](), LoraConfig(r=4, lora_alpha=16, target_modules=list(DEFAULT_TARGET_MODULES))
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    peft_model.save_pretrained(tmp_path)
    ours = load_adapter(BACKBONES[backbone](), tmp_path)
    assert ours.get_submodule("model.layers.0.self_attn.q_proj").method == "lora"
    with torch.no_grad():
        want = peft_model(input_ids=tokens, attention_mask=mask).logits
        got = ours(input_ids=tokens, attention_mask=mask).logits
        base = BACKBONES[backbone]()(input_ids=tokens, attention_mask=mask).logits
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", available_methods())
def test_zero_init_is_the_base_model(backbone, method):
    tokens, ids, question, mask = batch()
    base = BACKBONES[backbone]()
    model = inject_adapters(BACKBONES[backbone](), AdapterConfig(method=method))
    set_routing(model, ids, question)
    with torch.no_grad():
        want = base(input_ids=tokens, attention_mask=mask).logits
        got = model(input_ids=tokens, attention_mask=mask).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_sample_alone_equals_sample_in_padded_batch(backbone):
    model = inject_adapters(BACKBONES[backbone](), AdapterConfig(method="moka"))
    randomize_adapters(model)
    for pad_side in ("left", "right"):
        tokens, ids, question, mask = batch(pad_side)
        set_routing(model, ids, question)
        with torch.no_grad():
            batched = model(input_ids=tokens, attention_mask=mask, position_ids=position_ids(mask)).logits
        for row in range(len(LAYOUTS)):
            keep = mask[row].bool()
            set_routing(model, ids[row : row + 1, keep], question[row : row + 1, keep])
            with torch.no_grad():
                alone = model(input_ids=tokens[row : row + 1, keep]).logits
            torch.testing.assert_close(alone[0], batched[row, keep], rtol=1e-5, atol=1e-5)


def _adapter_grads(use_checkpointing: bool, reentrant: bool, method: str) -> dict[str, torch.Tensor]:
    model = inject_adapters(tiny_llama(layers=3), AdapterConfig(method=method, dropout=0.1))
    randomize_adapters(model)
    model.train()
    if use_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        # The embeddings are frozen: without inputs that require grad, reentrant checkpointing would
        # cut the graph and leave every adapter gradient at None.
        model.enable_input_require_grads()
    tokens, ids, question, mask = batch()
    set_routing(model, ids, question)
    torch.manual_seed(123)  # the same dropout masks in every run; checkpointing replays the RNG
    loss = model(input_ids=tokens, attention_mask=mask, labels=tokens).loss
    loss.backward()
    return {name: p.grad.clone() for name, p in adapter_named_parameters(model)}


@pytest.mark.parametrize("method", ["moka", "uni_lora", "uni_mm_lora", "uni_mm_lora_gate"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(method, reentrant):
    want = _adapter_grads(False, reentrant, method)
    got = _adapter_grads(True, reentrant, method)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    a_grads = [g for name, g in got.items() if ".lora_A.text." in name]
    assert a_grads and all(g.abs().sum() > 0 for g in a_grads)
    assert all(g.abs().sum() > 0 for name, g in got.items() if ".lora_B" in name or ".lora_gate" in name)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["moka", "text_query", "lora"])
def test_bf16_backbone(method, adapter_dtype):
    """A bf16 backbone with fp32 or bf16 adapters trains, and the adapter changes the logits the way it does
    in fp32 (compared through the adapter's own effect, since bf16 rounds the whole model)."""
    tokens, ids, question, mask = batch()
    reference = inject_adapters(tiny_llama(), AdapterConfig(method=method))
    randomize_adapters(reference)
    model = inject_adapters(tiny_llama().to(torch.bfloat16), AdapterConfig(method=method))
    model.load_state_dict(reference.state_dict())
    for _, parameter in adapter_named_parameters(model):
        parameter.data = parameter.data.to(adapter_dtype)
    for m in (reference, model):
        set_routing(m, ids, question)
    out = model(input_ids=tokens, attention_mask=mask, labels=tokens)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits).all()
    with torch.no_grad():
        effect_fp32 = (
            reference(input_ids=tokens, attention_mask=mask).logits
            - tiny_llama()(input_ids=tokens, attention_mask=mask).logits
        )
        effect_bf16 = (
            out.logits.float() - tiny_llama().to(torch.bfloat16)(input_ids=tokens, attention_mask=mask).logits.float()
        )
    cosine = torch.nn.functional.cosine_similarity(effect_bf16.flatten(), effect_fp32.flatten(), dim=0)
    assert cosine > 0.98
    grads = [p.grad for _, p in adapter_named_parameters(model)]
    assert all(g is not None and g.dtype == adapter_dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("method", ["moka", "lora", "uni_mm_lora_gate", "loramoe"])
def test_autocast_keeps_the_input_dtype_and_every_result(method, monkeypatch):
    """Under autocast the adapter takes the bf16 input as it is instead of a full fp32 copy: every matmul of the
    delta runs in bf16 either way, so logits and fp32 adapter gradients are bit for bit those of the cast-first
    path (``AdaptedLinear.adapter_input``). LoRAMoE's router reads the input beside its A's: the two input
    gradients are then summed in bf16, where the fp32 copy summed them in fp32, so the gradients below the last
    layer agree to bf16 rounding (measured: 1.7 % of a gradient's norm at worst) and the logits bit for bit."""
    tokens, ids, question, mask = batch()

    def run(cast_first: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = inject_adapters(tiny_llama().to(torch.bfloat16), AdapterConfig(method=method, dropout=0.0))
        randomize_adapters(model)
        if cast_first:
            monkeypatch.setattr(AdaptedLinear, "adapter_input", lambda self, x: x.to(self.adapter_dtype))
        set_routing(model, ids, question)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=tokens, attention_mask=mask, labels=tokens)
        out.loss.backward()
        monkeypatch.undo()
        return out.logits, {name: p.grad for name, p in adapter_named_parameters(model)}

    seen = []
    original = AdaptedLinear.adapter_input

    def record(self, x):
        taken = original(self, x)
        seen.append((x.dtype, taken.dtype))
        return taken

    monkeypatch.setattr(AdaptedLinear, "adapter_input", record)
    logits, grads = run(cast_first=False)
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    want_logits, want_grads = run(cast_first=True)
    assert torch.equal(logits, want_logits)
    assert grads.keys() == want_grads.keys()
    two_readers = method == "loramoe"
    for name, grad in grads.items():
        want = want_grads[name]
        assert grad.dtype == torch.float32, name
        if two_readers:
            assert (grad - want).norm() <= 0.05 * want.norm(), name
        else:
            assert torch.equal(grad, want), name


def _expected_count(model: nn.Module, cfg: AdapterConfig) -> int:
    """The closed form, per adapted linear of shape d x k."""
    total = 0
    for module in model.modules():
        if not isinstance(module, AdaptedLinear):
            continue
        k, d = module.in_features, module.out_features
        modalities = cfg.modalities
        n = len(modalities)
        if cfg.method == "lora":
            total += cfg.rank * (k + d)
        elif cfg.method == "dora":  # + the magnitude per output channel
            total += cfg.rank * (k + d) + d
        elif cfg.method in ("multi_lora", "uni_lora"):
            total += sum(cfg.rank_for(m) * (k + d) for m in modalities)
        elif cfg.method == "loramoe":  # N experts + an N x k router
            total += cfg.experts * (cfg.rank * (k + d) + k)
        elif cfg.method == "hydralora":  # one A, N B heads + the router
            total += cfg.rank * k + cfg.experts * (d * cfg.rank + k)
        elif cfg.method in ("uni_mm_lora", "uni_mm_lora_gate"):  # N + 1 A's, 2 B's (+ the gate's k + 1)
            total += (n + 1) * cfg.rank * k + 2 * d * cfg.rank + (k + 1 if cfg.method.endswith("gate") else 0)
        else:  # MokA family: N A's, one B
            total += n * cfg.rank * k + d * cfg.rank
    return total


@pytest.mark.parametrize(
    "method,rank",
    [
        ("moka", 4),
        ("naive", 2),
        ("lora", 8),
        ("multi_lora", {"text": 2, "visual": 4, "audio": 6}),
        ("uni_lora", 4),
        ("dora", 4),
        ("loramoe", 2),
        ("hydralora", 4),
        ("uni_mm_lora_gate", 4),
    ],
)
def test_parameter_counts_and_placement(method, rank):
    cfg = AdapterConfig(method=method, rank=rank)
    base_total = sum(p.numel() for p in tiny_llama().parameters())
    model = inject_adapters(tiny_llama(), cfg)
    counts = count_parameters(model)
    layers = list(adapted_layers(model))
    assert len(layers) == 7 * 2  # 7 target linears in each of the 2 decoder layers
    assert {name.rpartition(".")[2] for name, _ in layers} == set(DEFAULT_TARGET_MODULES)
    assert all(name.startswith("model.layers.") for name, _ in layers)
    assert counts.adapter == _expected_count(model, cfg)
    # hidden 64, intermediate 128, 4 heads of 16, 2 kv heads: q,o 64x64; k,v 32x64; gate,up 128x64; down 64x128.
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # (d, k)
    if method == "moka":
        assert counts.adapter == 2 * sum(3 * 4 * k + d * 4 for d, k in shapes)
    assert counts.trainable == counts.adapter
    assert counts.total == base_total + counts.adapter


def test_adapters_stay_in_the_backbone():
    """Only the backbone is passed to inject_adapters; an encoder with q_proj-named layers beside it is
    never touched, and the LM head / embeddings are frozen."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    class Multimodal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    image_size=32,
                    patch_size=8,
                )
            )
            self.llm = tiny_llama()

    model = Multimodal()
    assert any(name.endswith("q_proj") for name, _ in model.vision.named_modules())
    inject_adapters(model.llm, AdapterConfig(method="moka"))
    assert not any(isinstance(m, AdaptedLinear) for m in model.vision.modules())
    assert len(list(adapted_layers(model.llm))) == 14
    trainable = {name for name, p in model.llm.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in adapter_named_parameters(model.llm)}
    assert all(p.requires_grad for p in model.vision.parameters())  # untouched, not our business to freeze


def test_works_on_any_model_built_from_linear():
    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up_proj = nn.Linear(8, 16)
            self.down_proj = nn.Linear(16, 8)

        def forward(self, x):
            return self.down_proj(torch.relu(self.up_proj(x)))

    model = inject_adapters(Mlp(), AdapterConfig(method="moka", target_modules=["up_proj", "down_proj"]))
    randomize_adapters(model)
    ids, question, _ = routing_batch([[("text", 2), ("visual", 3), ("question", 2)]])
    set_routing(model, ids, question)
    out = model(torch.randn(1, 7, 8))
    out.sum().backward()
    assert model.up_proj.lora_A["visual"].weight.grad.abs().sum() > 0
