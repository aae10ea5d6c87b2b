"""Uni+MM LoRA and Uni+MM LoRA with a gate: against a slow per-token float64 reference written here from the
formulas, zero B's = the base model, the paper's matrix counts (N+1 A's, 2 B's), the gate's gradient,
partial-modality inference, gradient checkpointing, a bf16 backbone and cached decoding on tiny backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moka_train.adapters import (
    AdaptedLinear,
    AdapterConfig,
    adapted_layers,
    adapter_named_parameters,
    count_parameters,
    inject_adapters,
    set_active_modalities,
    set_routing,
)
from moka_train.modality import Modality
from tests.helpers import cached_greedy_steps, randomize_adapters, routing_batch, tiny_llama, tiny_qwen2
from tests.test_adapter_formulas import IN, OUT, OneLinear
from tests.test_adapters_on_backbones import batch as backbone_batch
from tests.test_generation import NEW_TOKENS, adapted, full_forward_logits

METHODS = ["uni_mm_lora", "uni_mm_lora_gate"]
BACKBONES = {"llama": tiny_llama, "qwen2": tiny_qwen2}

LAYOUTS = [
    [("text", 3), ("visual", 5), ("audio", 3), ("question", 4), ("text", 2)],
    [("text", 2), ("visual", 2), ("question", 1), ("text", 1)],  # no audio
    [("text", 1), ("audio", 6), ("text", 1), ("question", 6), ("text", 3)],  # no visual
    [("question", 3), ("text", 5)],  # text only
]


def randomize_gate(model: nn.Module, seed: int = 2, std: float = 0.3) -> None:
    """A gate away from its zero init, so that g differs from token to token."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter_named_parameters(model):
            if ".lora_gate." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def reference_delta(layer: AdaptedLinear, cfg: AdapterConfig, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The delta of each token from the formula, one sample and one token at a time, in float64:
    ``s (g B_uni A_m x + (1 - g) B_mm A_mm x)`` with g = sigmoid(w x + b), or g = 1 and 1 - g -> 1 ungated."""
    w = {name: p.detach().double() for name, p in layer.adapter_parameters()}
    s = cfg.alpha / cfg.rank
    x = x.double()
    out = torch.zeros(*ids.shape, OUT, dtype=torch.float64)
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1]):
            m = int(ids[b, i])
            if m == int(Modality.PAD):
                continue
            xi = x[b, i]
            uni = w["lora_B.unimodal.weight"] @ (w[f"lora_A.{Modality(m).key}.weight"] @ xi)
            mm = w["lora_B.multimodal.weight"] @ (w["lora_A.multimodal.weight"] @ xi)
            if cfg.method == "uni_mm_lora_gate":
                g = torch.sigmoid(w["lora_gate.weight"][0] @ xi + w["lora_gate.bias"][0])
                out[b, i] = s * (g * uni + (1 - g) * mm)
            else:
                out[b, i] = s * (uni + mm)
    return out


def one_linear(method: str, seed: int = 0, **overrides) -> tuple[OneLinear, AdapterConfig]:
    cfg = AdapterConfig(method=method, **{"rank": 3, "alpha": 6.0, "target_modules": ["q_proj"], **overrides})
    torch.manual_seed(seed)
    model = inject_adapters(OneLinear().double(), cfg)  # float64 base -> float64 adapters
    randomize_adapters(model, seed=seed + 1, std=0.5)
    randomize_gate(model, seed=seed + 2)
    return model, cfg


def delta_of(model: OneLinear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x) - model.q_proj.base_layer(x)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_matches_per_token_reference(method, pad_side):
    model, cfg = one_linear(method)
    ids, question, _ = routing_batch(LAYOUTS, pad_side=pad_side)
    x = torch.randn(*ids.shape, IN, dtype=torch.float64)
    set_routing(model, ids, question)
    got = delta_of(model, x)
    want = reference_delta(model.q_proj, cfg, x, ids)
    assert want.abs().max() > 0.1  # the adapter really contributes
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(got[ids == int(Modality.PAD)]) == 0


@pytest.mark.parametrize("method", METHODS)
def test_text_only_call_takes_the_text_a(method):
    """``set_routing(model, None)`` (and decode steps): every token is text."""
    model, cfg = one_linear(method, modalities=["text", "speech"])
    x = torch.randn(2, 5, IN, dtype=torch.float64)
    set_routing(model, None)
    want = reference_delta(model.q_proj, cfg, x, torch.zeros(2, 5, dtype=torch.long))
    torch.testing.assert_close(delta_of(model, x), want, rtol=1e-10, atol=1e-10)


def test_gate_mixes_the_two_paths():
    """A gate at its init (g = 0.5) gives half of the ungated sum; a trained gate gives something else."""
    ungated, _ = one_linear("uni_mm_lora")
    gated, _ = one_linear("uni_mm_lora_gate")
    gated.load_state_dict(ungated.state_dict(), strict=False)
    ids, question, _ = routing_batch(LAYOUTS, pad_side="left")
    x = torch.randn(*ids.shape, IN, dtype=torch.float64)
    for model in (ungated, gated):
        set_routing(model, ids, question)
    randomized = delta_of(gated, x)
    with torch.no_grad():
        gated.q_proj.lora_gate.weight.zero_()
        gated.q_proj.lora_gate.bias.zero_()
    torch.testing.assert_close(delta_of(gated, x), 0.5 * delta_of(ungated, x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(randomized, 0.5 * delta_of(ungated, x), atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_init_gate_is_half(method):
    layer = inject_adapters(OneLinear(), AdapterConfig(method=method, target_modules=["q_proj"])).q_proj
    assert all(torch.count_nonzero(p) == 0 for n, p in layer.adapter_parameters() if n.startswith("lora_B"))
    if method == "uni_mm_lora_gate":
        assert torch.count_nonzero(layer.lora_gate.weight) == 0 and torch.count_nonzero(layer.lora_gate.bias) == 0
    else:
        assert not hasattr(layer, "lora_gate")


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", METHODS)
def test_zero_b_is_the_base_model(backbone, method):
    """Zero B's (the init), even with a trained gate, give the base model exactly."""
    tokens, ids, question, mask = backbone_batch()
    base = BACKBONES[backbone]()
    model = inject_adapters(BACKBONES[backbone](), AdapterConfig(method=method))
    randomize_gate(model)
    set_routing(model, ids, question)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=tokens, attention_mask=mask).logits, base(input_ids=tokens, attention_mask=mask).logits
        )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("modalities", [["text", "visual", "audio"], ["text", "speech"], ["text"]])
def test_parameter_counts_are_the_closed_form(method, modalities):
    """N+1 A's and 2 B's per layer: (N+1) r k + 2 d r parameters, plus k + 1 for the gate."""
    rank, n = 4, len(modalities)
    model = inject_adapters(tiny_llama(), AdapterConfig(method=method, rank=rank, modalities=modalities))
    gated = method == "uni_mm_lora_gate"
    # hidden 64, intermediate 128, 2 kv heads of 16: (d, k) of q, k, v, o, gate, up, down.
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    per_block = sum((n + 1) * rank * k + 2 * d * rank + (k + 1 if gated else 0) for d, k in shapes)
    counts = count_parameters(model)
    assert counts.adapter == counts.trainable == 2 * per_block
    for _, layer in adapted_layers(model):
        names = [name for name, _ in layer.adapter_parameters()]
        assert sorted(names) == sorted(
            [f"lora_A.{m}.weight" for m in modalities]
            + ["lora_A.multimodal.weight", "lora_B.unimodal.weight", "lora_B.multimodal.weight"]
            + (["lora_gate.weight", "lora_gate.bias"] if gated else [])
        )
        assert sum(name.startswith("lora_A") for name in names) == n + 1
        assert sum(name.startswith("lora_B") for name in names) == 2


@pytest.mark.parametrize("method", METHODS)
def test_builds_on_the_meta_device(method):
    """The cost table counts on meta tensors (no values): the layer must build there with the same shapes."""
    with torch.device("meta"):
        model = inject_adapters(OneLinear(), AdapterConfig(method=method, target_modules=["q_proj"]))
    real = inject_adapters(OneLinear(), AdapterConfig(method=method, target_modules=["q_proj"]))
    shapes = {name: p.shape for name, p in adapter_named_parameters(real)}
    assert {name: p.shape for name, p in adapter_named_parameters(model)} == shapes
    assert all(p.is_meta for _, p in adapter_named_parameters(model))


@pytest.mark.parametrize("method", METHODS)
def test_per_modality_ranks_are_refused(method):
    with pytest.raises(ValueError, match="takes one rank"):
        AdapterConfig(method=method, rank={"text": 2, "visual": 4, "audio": 4})


@pytest.mark.parametrize("method", METHODS)
def test_every_parameter_gets_a_gradient(method):
    """Every adapter parameter takes part in every forward (a batch without audio, a text-only call), and the
    gate's gradient is non-zero once the B's are."""
    model, _ = one_linear(method)
    x = torch.randn(2, 6, IN, dtype=torch.float64)
    for ids in (routing_batch([LAYOUTS[1]] * 2)[0], None):
        model.zero_grad()
        set_routing(model, ids)
        model(x).square().sum().backward()
        grads = {name: p.grad for name, p in adapter_named_parameters(model)}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert grads["q_proj.lora_B.multimodal.weight"].abs().sum() > 0
        assert grads["q_proj.lora_A.text.weight"].abs().sum() > 0
        if method == "uni_mm_lora_gate":
            assert grads["q_proj.lora_gate.weight"].abs().sum() > 0 and grads["q_proj.lora_gate.bias"].abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("active", [["text"], ["visual"], ["visual", "audio"]])
def test_partial_modality_inference(method, active):
    """Tokens outside the chosen modalities see W0 only (both paths off); the chosen ones keep their delta."""
    model, _ = one_linear(method)
    ids, question, _ = routing_batch(LAYOUTS, pad_side="left")
    x = torch.randn(*ids.shape, IN, dtype=torch.float64)
    set_routing(model, ids, question)
    full = delta_of(model, x)
    set_active_modalities(model, active)
    partial = delta_of(model, x)
    set_active_modalities(model, None)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for name in active:
        keep |= ids == int(Modality.parse(name))
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(partial[keep], full[keep], rtol=0, atol=0)
    assert torch.count_nonzero(partial[~keep]) == 0
    torch.testing.assert_close(delta_of(model, x), full, rtol=0, atol=0)


# Gradient checkpointing: tests/test_adapters_on_backbones.py (parametrized with these methods too).


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_bf16_backbone(adapter_dtype):
    """A bf16 backbone with fp32 or bf16 adapters trains, and the adapter changes the logits the way it does in
    fp32 (compared through the adapter's own effect)."""
    tokens, ids, question, mask = backbone_batch()
    reference = inject_adapters(tiny_llama(), AdapterConfig(method="uni_mm_lora_gate"))
    randomize_adapters(reference)
    randomize_gate(reference)
    model = inject_adapters(tiny_llama().to(torch.bfloat16), AdapterConfig(method="uni_mm_lora_gate"))
    model.load_state_dict(reference.state_dict())
    for _, parameter in adapter_named_parameters(model):
        parameter.data = parameter.data.to(adapter_dtype)
    for m in (reference, model):
        set_routing(m, ids, question)
    out = model(input_ids=tokens, attention_mask=mask, labels=tokens)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    with torch.no_grad():
        base = tiny_llama()
        effect_fp32 = (
            reference(input_ids=tokens, attention_mask=mask).logits - base(input_ids=tokens, attention_mask=mask).logits
        )
        effect_bf16 = out.logits.float() - base.to(torch.bfloat16)(input_ids=tokens, attention_mask=mask).logits.float()
    assert torch.nn.functional.cosine_similarity(effect_bf16.flatten(), effect_fp32.flatten(), dim=0) > 0.98
    grads = [p.grad for _, p in adapter_named_parameters(model)]
    assert all(g is not None and g.dtype == adapter_dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", METHODS)
def test_prefill_and_cached_decode_equal_full_forward(backbone, method):
    """Greedy steps with a KV cache (decode steps are text) give the logits of one full forward."""
    model, prompt, mask = adapted(backbone, method)
    randomize_gate(model)
    step_logits, sequences, _ = cached_greedy_steps(model, prompt, mask, NEW_TOKENS)
    full = full_forward_logits(model, sequences, mask)
    length = prompt.shape[1]
    for step, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, full[:, length - 1 + step], rtol=1e-5, atol=1e-5)
