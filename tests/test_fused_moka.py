"""MokA's fused low-rank path (one autograd node with a written-out backward) against independent expectations:
its gradients against finite differences (``torch.autograd.gradcheck``, float64), and its output and every
gradient against the composite path of ``lowrank``'s building blocks, which autograd differentiates, on a real
adapted layer in every MokA configuration and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moka_train.adapters import AdapterConfig, inject_adapters, set_routing
from moka_train.adapters.fused_moka import fused_moka_delta
from moka_train.adapters.methods.moka import MokaFamilyLinear, MokaLinear
from moka_train.adapters.routing import TokenRouting
from tests.helpers import routing_batch

LAYOUTS = [
    [("text", 2), ("visual", 3), ("audio", 2), ("question", 4), ("text", 1)],
    [("text", 1), ("visual", 2), ("question", 1), ("text", 1)],  # one key, no audio
    [("text", 3), ("visual", 2), ("audio", 3), ("text", 1)],  # media but no question: no cross-attention
    [("audio", 2), ("text", 1), ("question", 2), ("text", 2)],
]


def routing(pad_side: str) -> TokenRouting:
    ids, question, _ = routing_batch(LAYOUTS, pad_side=pad_side)
    # With the modalities text, visual, audio configured, the index of each is its id (pads -1).
    return TokenRouting(ids.shape[0], ids.shape[1], torch.device("cpu"), 3, ids, question)


@pytest.mark.parametrize("pad_side", ["left", "right"])
@pytest.mark.parametrize("per_sample_scale", [True, False], ids=["per-sample-scale", "float-scale"])
def test_gradients_equal_finite_differences(pad_side, per_sample_scale):
    torch.manual_seed(0)
    tokens = routing(pad_side)
    rank, k, d = 3, 5, 4
    x = torch.randn(tokens.batch, tokens.length, k, dtype=torch.float64, requires_grad=True)
    a_weights = [torch.randn(rank, k, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    b_weight = torch.randn(d, rank, dtype=torch.float64, requires_grad=True)
    slots = tokens.question
    scale = tokens.inverse_sqrt_count(slots, torch.float64, 0.7) if per_sample_scale else 0.4
    columns = tokens.own_columns(rank, torch.float64, 2.0)
    lambdas = tokens.query_lambdas((0.0, 1.5, 0.6), torch.float64)

    def delta(x, b_weight, *a_weights):
        return fused_moka_delta(x, a_weights, b_weight, columns, slots, scale, lambdas)

    assert torch.autograd.gradcheck(delta, (x, b_weight, *a_weights))
    # The cross-attention really is on the path that was checked: without it the output changes.
    no_attention = fused_moka_delta(x, a_weights, b_weight, columns, slots, scale, lambdas * 0)
    assert (delta(x, b_weight, *a_weights) - no_attention).abs().max() > 0.1


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def fused_and_composite(
    cfg: AdapterConfig,
    pad_side: str,
    dtype: torch.dtype,
    autocast: bool,
    layouts: list = LAYOUTS,
    device: str = "cpu",
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """The output and the gradients (x, every adapter weight) of the fused and of the composite delta."""
    torch.manual_seed(0)
    model = inject_adapters(OneLinear(), cfg).to(device=device, dtype=dtype)
    layer = model.q_proj
    assert isinstance(layer, MokaLinear)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.5)
    ids, question, _ = routing_batch(layouts, pad_side=pad_side)
    set_routing(model, ids.to(device), question.to(device))
    x0 = torch.randn(*ids.shape, 6, dtype=dtype).to(device)
    upstream = torch.randn(*ids.shape, 5, dtype=dtype).to(device)
    parameters = [p for name, p in layer.named_parameters() if not name.startswith("base_layer")]
    results = []
    for delta in (MokaLinear.delta, MokaFamilyLinear.delta):  # fused, then composite
        x = x0.clone().requires_grad_()
        tokens = layer.routing.tokens_for(x, required=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = delta(layer, x, tokens)
        grads = torch.autograd.grad(out, [x, *parameters], upstream.to(out.dtype))
        results.append((out, grads))
    return results


@pytest.mark.parametrize("pad_side", ["left", "right"])
@pytest.mark.parametrize("attn_scale", ["question_tokens", "rank"])
@pytest.mark.parametrize("scaling_position", ["after_b", "before_attention"])
def test_the_fused_delta_and_its_gradients_equal_the_composite_path(pad_side, attn_scale, scaling_position):
    cfg = AdapterConfig(
        method="moka",
        rank=4,
        alpha=16,
        target_modules=["q_proj"],
        cross_attn_lambda={"text": 0.0, "visual": 2.0, "audio": 0.3},
        attn_scale=attn_scale,
        scaling_position=scaling_position,
    )
    assert_fused_equals_composite(cfg, pad_side, LAYOUTS)


def assert_fused_equals_composite(cfg: AdapterConfig, pad_side: str, layouts: list, device: str = "cpu") -> None:
    fused, composite = fused_and_composite(cfg, pad_side, torch.float32, False, layouts, device)
    (fused, fused_grads), (composite, composite_grads) = fused, composite
    torch.testing.assert_close(fused, composite, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, composite_grads, strict=True):
        assert got.dtype == want.dtype
        assert want.abs().max() > 0  # every weight takes part
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_fused_delta_and_its_gradients_equal_the_composite_path():
    """On CUDA the composite takes the explicit attention (no SDPA kernel at rank 4): the same comparison."""
    cfg = AdapterConfig(method="moka", rank=4, alpha=16, target_modules=["q_proj"])
    assert_fused_equals_composite(cfg, "left", LAYOUTS, device="cuda")


def test_two_modalities_as_in_the_visual_and_speech_tables():
    """Tables 2 and 3 configure two modalities (two A's side by side, text's and the media's)."""
    cfg = AdapterConfig(method="moka", rank=4, alpha=16, target_modules=["q_proj"], modalities=["text", "speech"])
    layouts = [
        [("text", 2), ("speech", 5), ("question", 3), ("text", 1)],
        [("speech", 3), ("text", 1), ("question", 1)],
    ]
    assert_fused_equals_composite(cfg, "right", layouts)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_under_bf16_autocast_it_computes_in_bf16_and_returns_each_gradient_in_its_inputs_dtype(device):
    cfg = AdapterConfig(method="moka", rank=4, alpha=16, target_modules=["q_proj"])
    fused, composite = fused_and_composite(cfg, "left", torch.float32, True, device=device)
    (fused, fused_grads), (composite, composite_grads) = fused, composite
    assert fused.dtype == composite.dtype == torch.bfloat16
    torch.testing.assert_close(fused, composite, rtol=2e-2, atol=2e-2)
    for got, want in zip(fused_grads, composite_grads, strict=True):
        assert got.dtype == want.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cosine > 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_as_deepspeed_runs_them(dtype):
    """DeepSpeed's bf16 and fp16 modes hold the model, adapter included, in half precision, without autocast:
    the delta and every gradient stay in that dtype, and equal the composite path's run in it."""
    cfg = AdapterConfig(method="moka", rank=4, alpha=16, target_modules=["q_proj"])
    fused, composite = fused_and_composite(cfg, "left", dtype, False)
    (fused, fused_grads), (composite, composite_grads) = fused, composite
    assert fused.dtype == composite.dtype == dtype
    torch.testing.assert_close(fused, composite, rtol=2e-2, atol=2e-2)
    for got, want in zip(fused_grads, composite_grads, strict=True):
        assert got.dtype == want.dtype == dtype
        assert want.abs().max() > 0
        cosine = torch.nn.functional.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0)
        assert cosine > 0.999


def test_the_attention_maps_and_batches_without_cross_attention_take_the_composite_path(monkeypatch):
    """The fused path needs media and question tokens and returns no attention weights; the other cases keep
    the building blocks (and stay correct, as test_adapter_formulas checks)."""
    calls = []
    monkeypatch.setattr(
        "moka_train.adapters.methods.moka.fused_moka_delta", lambda *args: calls.append(1) or args[0][..., :5] * 0
    )
    cfg = AdapterConfig(method="moka", rank=4, alpha=16, target_modules=["q_proj"])
    model = inject_adapters(OneLinear(), cfg)
    ids, question, _ = routing_batch(LAYOUTS)
    x = torch.randn(*ids.shape, 6)
    set_routing(model, ids, question)
    model(x)
    assert len(calls) == 1
    set_routing(model, ids, torch.zeros_like(question))  # no question span anywhere
    model(x)
    set_routing(model, None)  # text only
    model(x)
    set_routing(model, ids, question)
    model.q_proj.attention_recorder = lambda *args: None
    model(x)
    assert len(calls) == 1
