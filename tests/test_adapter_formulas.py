"""Every method against a slow per-sample, per-token reference written here from the formulas in
DESIGN.md, on random weights (B non-zero), ragged modality lengths and left / right padding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moka_train.adapters import AdapterConfig, inject_adapters, set_active_modalities, set_routing
from moka_train.modality import Modality
from tests.helpers import randomize_adapters, routing_batch

IN, OUT = 24, 20

LAYOUTS = [
    [("text", 3), ("visual", 5), ("audio", 3), ("question", 4), ("text", 2)],
    [("text", 2), ("visual", 2), ("question", 1), ("text", 1)],  # no audio
    [("text", 1), ("audio", 6), ("text", 1), ("question", 6), ("text", 3)],  # no visual
    [("text", 4), ("visual", 3), ("audio", 2), ("text", 2)],  # empty question span
    [("question", 3), ("text", 5)],  # text only
]


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(IN, OUT, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def weights_of(model: OneLinear) -> dict[str, torch.Tensor]:
    return {name: p.detach().double() for name, p in model.q_proj.named_parameters()}


def reference_delta(
    w: dict[str, torch.Tensor], cfg: AdapterConfig, x: torch.Tensor, ids: torch.Tensor, question: torch.Tensor
) -> torch.Tensor:
    """The adapter delta of each token, one sample and one token at a time, in float64."""
    x = x.double()
    batch, length, _ = x.shape
    out = torch.zeros(batch, length, OUT, dtype=torch.float64)
    for b in range(batch):
        for i in range(length):
            out[b, i] = _token_delta(w, cfg, x[b], ids[b], question[b], i)
    return out


def _name(modality_id: int) -> str:
    return Modality(modality_id).key


def _token_delta(w, cfg, x, ids, question, i) -> torch.Tensor:
    method, m = cfg.method, int(ids[i])
    if method == "lora":
        return cfg.alpha / cfg.rank * w["lora_B.default.weight"] @ (w["lora_A.default.weight"] @ x[i])
    if method == "multi_lora":
        return sum(
            cfg.scaling_for(k) * w[f"lora_B.{k}.weight"] @ (w[f"lora_A.{k}.weight"] @ x[i]) for k in cfg.modalities
        )
    if m == int(Modality.PAD):
        return torch.zeros(OUT, dtype=torch.float64)
    if method == "uni_lora":
        k = _name(m)
        return cfg.scaling_for(k) * w[f"lora_B.{k}.weight"] @ (w[f"lora_A.{k}.weight"] @ x[i])

    # MokA family: a_j = A_m(j) x_j, optionally pre-scaled; one shared B.
    s = cfg.alpha / cfg.rank
    pre = s if cfg.scaling_position == "before_attention" else 1.0
    post = 1.0 if cfg.scaling_position == "before_attention" else s

    def a(j: int) -> torch.Tensor:
        return pre * w[f"lora_A.{_name(int(ids[j]))}.weight"] @ x[j]

    question_tokens = [j for j in range(len(ids)) if question[j]]
    media_tokens = [j for j in range(len(ids)) if int(ids[j]) > 0]
    a_i = a(i)
    if method in ("moka", "naive") and m != int(Modality.TEXT) and question_tokens:
        keys = torch.stack([a(j) for j in question_tokens])
        if method == "moka":
            size = len(question_tokens) if cfg.attn_scale == "question_tokens" else cfg.rank
            weights = torch.softmax(keys @ a_i / math.sqrt(size), dim=0)
        else:
            weights = torch.full((len(question_tokens),), 1.0 / len(question_tokens), dtype=torch.float64)
        a_i = a_i + cfg.lambda_for(_name(m)) * weights @ keys
    if method == "text_query" and question[i] and media_tokens:
        values = torch.stack([a(j) for j in media_tokens])
        size = len(media_tokens) if cfg.attn_scale == "question_tokens" else cfg.rank
        weights = torch.softmax(values @ a_i / math.sqrt(size), dim=0)
        a_i = a_i + cfg.lambda_for("text") * weights @ values
    return post * w["lora_B.weight"] @ a_i


def run_case(cfg: AdapterConfig, pad_side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = inject_adapters(OneLinear(), cfg)
    randomize_adapters(model, seed=seed + 1, std=0.5)
    ids, question, _ = routing_batch(LAYOUTS, pad_side=pad_side)
    x = torch.randn(*ids.shape, IN)
    set_routing(model, ids, question)
    with torch.no_grad():
        got = model(x) - model.q_proj.base_layer(x)
    return got.double(), reference_delta(weights_of(model), cfg, x, ids, question)


MOKA_FAMILY = ["moka", "moka_no_ca", "text_query", "naive"]
LAMBDAS = [1.0, 0.05, {"text": 0.7, "visual": 2.0, "audio": 0.3}]


@pytest.mark.parametrize("method", MOKA_FAMILY)
@pytest.mark.parametrize("pad_side", ["left", "right"])
@pytest.mark.parametrize("attn_scale", ["question_tokens", "rank"])
@pytest.mark.parametrize("scaling_position", ["after_b", "before_attention"])
@pytest.mark.parametrize("cross_attn_lambda", LAMBDAS, ids=["1.0", "0.05", "per-modality"])
def test_moka_family_matches_reference(method, pad_side, attn_scale, scaling_position, cross_attn_lambda):
    cfg = AdapterConfig(
        method=method,
        rank=3,
        alpha=6.0,
        target_modules=["q_proj"],
        cross_attn_lambda=cross_attn_lambda,
        attn_scale=attn_scale,
        scaling_position=scaling_position,
    )
    got, want = run_case(cfg, pad_side)
    assert want.abs().max() > 0.1  # the adapter really contributes
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "multi_lora", "uni_lora"])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_lora_family_matches_reference(method, pad_side):
    cfg = AdapterConfig(method=method, rank=4, alpha=8.0, target_modules=["q_proj"])
    got, want = run_case(cfg, pad_side)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["multi_lora", "uni_lora"])
def test_per_modality_ranks(method):
    cfg = AdapterConfig(method=method, rank={"text": 2, "visual": 5, "audio": 3}, alpha=10.0, target_modules=["q_proj"])
    got, want = run_case(cfg, "right")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_variants_differ_from_each_other():
    """The interaction really changes the media tokens (guards against a variant silently doing nothing)."""
    deltas = {}
    for method in MOKA_FAMILY:
        cfg = AdapterConfig(method=method, rank=3, alpha=6.0, target_modules=["q_proj"], cross_attn_lambda=1.0)
        deltas[method] = run_case(cfg, "right")[0]
    for a in MOKA_FAMILY:
        for b in MOKA_FAMILY:
            if a < b:
                assert not torch.allclose(deltas[a], deltas[b], atol=1e-4), (a, b)


@pytest.mark.parametrize("method", ["lora", "moka", "text_query", "naive", "uni_mm_lora", "uni_mm_lora_gate"])
def test_scaling_in_the_rank_space_is_exact_for_a_power_of_two(method):
    """alpha / r multiplies the rank-r activations (inside the routing masks), not B's output, and MokA's
    attention scale undoes it on the logits: the delta is linear in s, so with the same weights s = 16 / 4 gives
    4 times the delta of s = 4 / 4, bit for bit since 4 is a power of two."""
    deltas = []
    for alpha in (4.0, 16.0):
        torch.manual_seed(0)
        cfg = AdapterConfig(method=method, rank=4, alpha=alpha, target_modules=["q_proj"])
        model = inject_adapters(OneLinear(), cfg)
        randomize_adapters(model, seed=1, std=0.5)
        ids, question, _ = routing_batch(LAYOUTS[:3], pad_side="right")
        x = torch.randn(*ids.shape, IN)
        set_routing(model, ids, question)
        layer = model.q_proj
        with torch.no_grad():
            deltas.append(layer.delta(x, layer.routing.tokens_for(x, required=layer.uses_routing)))
    assert deltas[0].abs().max() > 0.1
    assert torch.equal(deltas[1], 4 * deltas[0])


def test_moka_equals_no_ca_with_lambda_zero():
    lam0 = AdapterConfig(method="moka", rank=3, target_modules=["q_proj"], cross_attn_lambda=0.0)
    no_ca = AdapterConfig(method="moka_no_ca", rank=3, target_modules=["q_proj"])
    torch.testing.assert_close(run_case(lam0, "left")[0], run_case(no_ca, "left")[0], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["moka", "text_query", "naive", "moka_no_ca", "lora", "multi_lora", "uni_lora"])
@pytest.mark.parametrize("active", [["text"], ["visual"], ["visual", "audio"]])
def test_partial_modality_inference(method, active):
    """Tokens outside the chosen modalities see W0 only; the chosen ones keep their full adapter delta."""
    cfg = AdapterConfig(method=method, rank=3, alpha=6.0, target_modules=["q_proj"])
    torch.manual_seed(0)
    model = inject_adapters(OneLinear(), cfg)
    randomize_adapters(model, std=0.5)
    ids, question, _ = routing_batch(LAYOUTS, pad_side="left")
    x = torch.randn(*ids.shape, IN)
    set_routing(model, ids, question)
    with torch.no_grad():
        full = model(x) - model.q_proj.base_layer(x)
        set_active_modalities(model, active)
        partial = model(x) - model.q_proj.base_layer(x)
        set_active_modalities(model, None)
        restored = model(x) - model.q_proj.base_layer(x)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for name in active:
        keep |= ids == int(Modality.parse(name))
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(partial[keep], full[keep], rtol=0, atol=0)
    assert torch.count_nonzero(partial[~keep]) == 0
    torch.testing.assert_close(restored, full, rtol=0, atol=0)


def test_per_sample_invariance_in_padded_batch():
    """A sample alone gives the same adapter output as inside a padded batch of other samples."""
    cfg = AdapterConfig(method="moka", rank=3, target_modules=["q_proj"])
    torch.manual_seed(0)
    model = inject_adapters(OneLinear(), cfg)
    randomize_adapters(model, std=0.5)
    for pad_side in ("left", "right"):
        ids, question, mask = routing_batch(LAYOUTS, pad_side=pad_side)
        x = torch.randn(*ids.shape, IN)
        set_routing(model, ids, question)
        with torch.no_grad():
            batched = model(x)
        for row in range(len(LAYOUTS)):
            keep = mask[row].bool()
            set_routing(model, ids[row : row + 1, keep], question[row : row + 1, keep])
            with torch.no_grad():
                alone = model(x[row : row + 1, keep])
            torch.testing.assert_close(alone[0], batched[row, keep], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", MOKA_FAMILY)
def test_empty_question_span_is_finite(method):
    """A batch with no question token anywhere: no interaction, finite outputs and gradients."""
    cfg = AdapterConfig(method=method, rank=3, target_modules=["q_proj"])
    torch.manual_seed(0)
    model = inject_adapters(OneLinear(), cfg)
    randomize_adapters(model, std=0.5)
    ids, question, _ = routing_batch([[("text", 2), ("visual", 3), ("audio", 2), ("text", 2)]])
    no_ca = inject_adapters(OneLinear(), AdapterConfig(method="moka_no_ca", rank=3, target_modules=["q_proj"]))
    no_ca.load_state_dict(model.state_dict())
    x = torch.randn(*ids.shape, IN)
    set_routing(model, ids, question)
    set_routing(no_ca, ids, question)
    out = model(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(out, no_ca(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", [*MOKA_FAMILY, "lora", "multi_lora", "uni_lora"])
def test_training_drops_the_adapter_input_and_evaluation_does_not(method):
    """``dropout`` acts on the input of A (the LoRA convention; the MokA attention then mixes the dropped
    activations): in training the delta is the reference formula on ``dropout(x)`` with the same draw, and in
    evaluation on ``x`` itself. The base layer always sees ``x`` whole."""
    p = 0.4
    cfg = AdapterConfig(method=method, rank=3, alpha=6.0, target_modules=["q_proj"], dropout=p)
    torch.manual_seed(0)
    model = inject_adapters(OneLinear(), cfg)
    randomize_adapters(model, seed=1, std=0.5)
    ids, question, _ = routing_batch(LAYOUTS, pad_side="right")
    x = torch.randn(*ids.shape, IN)
    set_routing(model, ids, question)
    model.train()
    with torch.no_grad():
        torch.manual_seed(7)
        trained = (model(x) - model.q_proj.base_layer(x)).double()
        model.eval()
        evaluated = (model(x) - model.q_proj.base_layer(x)).double()
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(x, p, training=True)
    assert (dropped == 0).any()
    weights = weights_of(model)
    want_trained = reference_delta(weights, cfg, dropped, ids, question)
    assert (want_trained - reference_delta(weights, cfg, x, ids, question)).abs().max() > 0.1  # dropout matters
    torch.testing.assert_close(trained, want_trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(evaluated, reference_delta(weights, cfg, x, ids, question), rtol=1e-5, atol=1e-5)
