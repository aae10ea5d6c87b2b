"""DoRA: parity with peft's DoRA (outputs and gradients, dropout included), a float64 reference written here from
the formula, identity at init, parameter counts, peft's checkpoint layout both ways, partial-modality inference,
gradient checkpointing, a bf16 backbone and cached generation on the tiny backbones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from moka_train.adapters import (
    DEFAULT_TARGET_MODULES,
    AdapterConfig,
    adapted_layers,
    adapter_named_parameters,
    count_parameters,
    inject_adapters,
    load_adapter,
    save_adapter,
    set_active_modalities,
    set_routing,
)
from moka_train.adapters.checkpoint import read_adapter_config
from moka_train.modality import Modality
from tests.helpers import VOCAB, randomize_adapters, routing_batch, tiny_llama, tiny_qwen2

BACKBONES = {"llama": tiny_llama, "qwen2": tiny_qwen2}  # qwen2's q/k/v carry a bias, llama's none
PEFT_PREFIX = "base_model.model."


def tokens(seed: int = 0, shape: tuple[int, int] = (2, 11)) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def randomize_dora(model: nn.Module, seed: int = 1) -> None:
    """Random B's (zero at init) and magnitudes away from ||W0||_c, so every part of the formula matters."""
    randomize_adapters(model, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in adapter_named_parameters(model):
            if ".lora_magnitude_vector." in name:
                parameter.mul_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))


def peft_dora(backbone: nn.Module, dropout: float = 0.0, rank: int = 4, alpha: float = 16.0) -> nn.Module:
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(DEFAULT_TARGET_MODULES), use_dora=True
    )
    return get_peft_model(backbone, config)


def copy_into_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    """Our adapter weights into peft's model, by name: ours are peft's names without its prefix."""
    weights = {PEFT_PREFIX + name: p.detach() for name, p in adapter_named_parameters(ours)}
    peft_names = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert set(weights) == peft_names
    _, unexpected = peft_model.load_state_dict(weights, strict=False)
    assert not unexpected


def adapter_grads(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {name[len(prefix) :]: p.grad for name, p in model.named_parameters() if p.requires_grad}


# -- peft parity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("dropout,training", [(0.0, False), (0.0, True), (0.1, False), (0.1, True)])
def test_equals_peft_dora(backbone, dropout, training):
    """Logits and adapter gradients equal peft's DoRA with the same weights; in training mode with dropout the same
    seed gives both the same masks (one dropout draw per layer, W0 on the dropped-out input, as in peft)."""
    ours = inject_adapters(BACKBONES[backbone](), AdapterConfig(method="dora", dropout=dropout))
    randomize_dora(ours)
    theirs = peft_dora(BACKBONES[backbone](), dropout)
    copy_into_peft(ours, theirs)
    ids = tokens()
    outputs = []
    for model in (ours, theirs):
        model.train(training)
        torch.manual_seed(7)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outputs.append(out.logits.detach())
    got, want = outputs
    with torch.no_grad():
        base = BACKBONES[backbone]()(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads, peft_grads = adapter_grads(ours), adapter_grads(theirs, PEFT_PREFIX)
    assert grads.keys() == peft_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-5, atol=1e-6, msg=name)
        assert grad.abs().sum() > 0, name


# -- the formula, by hand ------------------------------------------------------------------------------------

IN, OUT, RANK, ALPHA = 12, 7, 3, 6.0


class OneLinear(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.q_proj = nn.Linear(IN, OUT, bias=True, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def reference_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W' = m * (W0 + s B A) / ||W0 + s B A||_c, one output channel (row) at a time, in float64."""
    w0, a, b, m = (t.detach().double() for t in (w0, a, b, m))
    s = ALPHA / RANK
    merged = torch.empty(OUT, IN, dtype=torch.float64)
    for i in range(OUT):
        row = [w0[i, j] + s * sum(b[i, k] * a[k, j] for k in range(RANK)) for j in range(IN)]
        norm = sum(v * v for v in row) ** 0.5
        merged[i] = torch.stack([m[i] * v / norm for v in row])
    return merged


def one_dora_linear(dropout: float = 0.0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    cfg = AdapterConfig(method="dora", rank=RANK, alpha=ALPHA, dropout=dropout, target_modules=["q_proj"])
    model = inject_adapters(OneLinear(dtype), cfg)
    randomize_dora(model)
    return model


def test_matches_the_formula():
    model = one_dora_linear()
    layer = model.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float64  # a float64 layer gets float64 adapters
    want_weight = reference_weight(
        layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.magnitude
    )
    x = torch.randn(2, 5, IN, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
    want = x @ want_weight.T + layer.base_layer.bias.detach()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.merged_weight(), want_weight, rtol=1e-12, atol=1e-12)


def test_dropout_drops_the_input_of_the_whole_adapted_term():
    """In training, ``h = W0 x + b + (W' - W0) dropout(x)`` (peft's form): the same dropout mask on W0's part of
    the delta and on B A."""
    model = one_dora_linear(dropout=0.3)
    layer = model.q_proj
    want_weight = reference_weight(
        layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.magnitude
    )
    w0, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    x = torch.randn(2, 5, IN, dtype=torch.float64)
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        got = model(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.3, training=True)
    want = x @ w0.T + bias + dropped @ (want_weight - w0).T
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_norm_is_detached():
    """No gradient flows through ||W0 + s B A||_c: B's gradient is that of m / ||.||_c * s B A x alone."""
    model = one_dora_linear()
    layer = model.q_proj
    x = torch.randn(4, IN, dtype=torch.float64)
    model(x).sum().backward()
    a, b, m = (p.detach() for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.magnitude))
    w0 = layer.base_layer.weight.detach()
    norm = torch.linalg.norm(w0 + ALPHA / RANK * b @ a, dim=1)
    scale = (m / norm).unsqueeze(1)  # [OUT, 1]
    # d/dB sum_{tokens, i} scale_i * s * (B A x)_i = s * scale_i * sum_tokens (A x)_k
    want = ALPHA / RANK * scale * (x @ a.T).sum(0, keepdim=True)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_zero_b_is_the_base_model(backbone):
    """At init (B = 0) the magnitude is ||W0||_c and the output is the base model's, bit for bit."""
    ids = tokens()
    model = inject_adapters(BACKBONES[backbone](), AdapterConfig(method="dora"))
    for _, layer in adapted_layers(model):
        torch.testing.assert_close(layer.magnitude, torch.linalg.norm(layer.base_layer.weight, dim=1), rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, BACKBONES[backbone]()(input_ids=ids).logits)


def test_parameter_count():
    """Per adapted d x k linear: r (k + d) for A and B plus d for the magnitude; peft counts the same."""
    rank = 8
    model = inject_adapters(tiny_llama(), AdapterConfig(method="dora", rank=rank))
    counts = count_parameters(model)
    # hidden 64, intermediate 128, 4 heads of 16, 2 kv heads: q,o 64x64; k,v 32x64; gate,up 128x64; down 64x128.
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # (d, k)
    want = 2 * sum(rank * (k + d) + d for d, k in shapes)
    assert counts.adapter == counts.trainable == want
    names = [name for name, _ in adapter_named_parameters(model)]
    assert len(names) == 3 * 7 * 2
    assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight" in names
    theirs = peft_dora(tiny_llama(), rank=rank)
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == want


# -- peft's checkpoint layout --------------------------------------------------------------------------------


def test_saves_in_peft_layout_and_loads_in_peft(tmp_path):
    model = inject_adapters(tiny_llama(), AdapterConfig(method="dora", rank=4, alpha=8, dropout=0.05))
    randomize_dora(model)
    save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 3 * 7 * 2
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert peft_model.peft_config["default"].use_dora
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    loaded = load_adapter(tiny_llama(), tmp_path)  # and back into ours
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_peft_saved_dora_loads_into_ours(backbone, tmp_path):
    theirs = peft_dora(BACKBONES[backbone](), dropout=0.1, rank=2, alpha=5.0)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1.1)
    theirs.save_pretrained(tmp_path)
    config = read_adapter_config(tmp_path)
    assert (config.method, config.rank, config.alpha, config.dropout) == ("dora", 2, 5.0, 0.1)
    ours = load_adapter(BACKBONES[backbone](), tmp_path)
    ids = tokens()
    theirs.eval()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        base = BACKBONES[backbone]()(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_peft_lora_directory_with_use_dora_but_no_magnitudes_is_named(tmp_path):
    model = inject_adapters(tiny_llama(), AdapterConfig(method="lora"))
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ValueError, match=r"missing keys.*lora_magnitude_vector.*use_dora=True"):
        load_adapter(tiny_llama(), tmp_path)


# -- runtime: partial modalities, checkpointing, bf16, generation --------------------------------------------


def test_partial_modality_inference():
    """Tokens outside the active modalities see W0 x + b alone; the others keep DoRA's full delta."""
    model = one_dora_linear(dtype=torch.float32)
    layouts = [[("text", 2), ("visual", 4), ("question", 3), ("text", 2)], [("audio", 3), ("text", 4)]]
    ids, question, _ = routing_batch(layouts)
    x = torch.randn(*ids.shape, IN)
    set_routing(model, ids, question)
    with torch.no_grad():
        base = model.q_proj.base_layer(x)
        full = model(x)
        set_active_modalities(model, ["visual"])
        partial = model(x)
        set_active_modalities(model, [])
        none = model(x)
        set_active_modalities(model, None)
    keep = ids == int(Modality.VISUAL)
    assert torch.equal(partial[keep], full[keep]) and (full[keep] - base[keep]).abs().max() > 1e-3
    assert torch.equal(partial[~keep], base[~keep])
    assert torch.equal(none, base)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    grads = []
    for checkpointing in (False, True):
        model = inject_adapters(tiny_qwen2(), AdapterConfig(method="dora", dropout=0.1))
        randomize_dora(model)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        ids = tokens()
        torch.manual_seed(123)  # the same dropout masks; checkpointing replays the RNG
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in adapter_named_parameters(model)})
    want, got = grads
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
        assert got[name].abs().sum() > 0, name


def test_bf16_backbone_with_fp32_adapter():
    """fp32 adapter weights on a bf16 backbone: the delta runs in fp32 and is added before rounding (as in peft),
    gradients are finite fp32, and the logits equal peft's DoRA on the same bf16 backbone."""
    ours = inject_adapters(tiny_llama().to(torch.bfloat16), AdapterConfig(method="dora"))
    randomize_dora(ours)
    assert all(p.dtype == torch.float32 for _, p in adapter_named_parameters(ours))
    theirs = peft_dora(tiny_llama().to(torch.bfloat16))
    copy_into_peft(ours, theirs)
    ids = tokens()
    out = ours(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert all(
        p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for _, p in adapter_named_parameters(ours)
    )
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        base = tiny_llama().to(torch.bfloat16)(input_ids=ids).logits
    assert (want.float() - base.float()).abs().max() > 0.05
    torch.testing.assert_close(out.logits.detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_cached_generation(backbone):
    """Greedy generation with the KV cache equals generation without it, and peft's DoRA's."""
    ours = inject_adapters(BACKBONES[backbone](), AdapterConfig(method="dora"))
    randomize_dora(ours)
    theirs = peft_dora(BACKBONES[backbone]())
    copy_into_peft(ours, theirs)
    prompt = tokens(shape=(2, 6))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        cached = ours.generate(prompt, use_cache=True, **settings)
        uncached = ours.generate(prompt, use_cache=False, **settings)
        peft_cached = theirs.generate(input_ids=prompt, use_cache=True, **settings)
        base = BACKBONES[backbone]().generate(prompt, use_cache=True, **settings)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached) and torch.equal(cached, peft_cached)
    assert not torch.equal(cached, base)
