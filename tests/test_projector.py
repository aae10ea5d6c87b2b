"""The Q-Former + MLP projector: token counts per segment, segment order, masking, and a pinned
state-dict layout (projector checkpoints must survive a transformers upgrade)."""

from __future__ import annotations

import pytest
import torch

from moka_train.models.projector import ProjectorConfig, QFormerProjector

TINY = dict(
    encoder_width=16,
    llm_hidden_size=24,
    num_queries=4,
    qformer_layers=2,
    qformer_hidden_size=32,
    qformer_heads=4,
    qformer_intermediate_size=64,
)


def projector(**overrides) -> QFormerProjector:
    torch.manual_seed(0)
    return QFormerProjector(ProjectorConfig(**{**TINY, **overrides})).eval()


def test_ten_segments_of_32_queries_give_320_tokens():
    model = projector(num_queries=32)
    out = model.forward_segments(torch.randn(2, 10, 7, 16))
    assert out.shape == (2, 320, 24)


def test_segments_are_projected_independently_and_in_order():
    model = projector()
    features = torch.randn(2, 3, 5, 16)
    with torch.no_grad():
        batched = model.forward_segments(features)
        for b in range(2):
            for s in range(3):
                alone = model(features[b, s : s + 1])[0]
                torch.testing.assert_close(batched[b, 4 * s : 4 * (s + 1)], alone, rtol=1e-5, atol=1e-5)


def test_masked_features_do_not_matter():
    model = projector()
    features = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    changed = features.clone()
    changed[1, 3:] = torch.randn(3, 16) * 10
    with torch.no_grad():
        out, out_changed = model(features, mask), model(changed, mask)
        trimmed = model(features[1:, :3])
    torch.testing.assert_close(out, out_changed)
    torch.testing.assert_close(out[1:], trimmed, rtol=1e-5, atol=1e-5)


def test_every_parameter_trains():
    model = projector().train()
    model.forward_segments(torch.randn(1, 2, 5, 16)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def expected_layout(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The checkpoint layout, written out by hand from the architecture."""
    h, e, i, out = (
        cfg["qformer_hidden_size"],
        cfg["encoder_width"],
        cfg["qformer_intermediate_size"],
        cfg["llm_hidden_size"],
    )
    layout = {
        "queries": (1, cfg["num_queries"], h),
        "feature_norm.weight": (e,),
        "feature_norm.bias": (e,),
        "qformer.layernorm.weight": (h,),
        "qformer.layernorm.bias": (h,),
        "mlp.0.weight": (out, h),
        "mlp.0.bias": (out,),
        "mlp.2.weight": (out, out),
        "mlp.2.bias": (out,),
    }
    for n in range(cfg["qformer_layers"]):
        p = f"qformer.encoder.layer.{n}."
        for block, key_width in (("attention", h), ("crossattention", e)):
            layout |= {
                f"{p}{block}.attention.query.weight": (h, h),
                f"{p}{block}.attention.query.bias": (h,),
                f"{p}{block}.attention.key.weight": (h, key_width),
                f"{p}{block}.attention.key.bias": (h,),
                f"{p}{block}.attention.value.weight": (h, key_width),
                f"{p}{block}.attention.value.bias": (h,),
                f"{p}{block}.output.dense.weight": (h, h),
                f"{p}{block}.output.dense.bias": (h,),
                f"{p}{block}.output.LayerNorm.weight": (h,),
                f"{p}{block}.output.LayerNorm.bias": (h,),
            }
        layout |= {
            f"{p}intermediate_query.dense.weight": (i, h),
            f"{p}intermediate_query.dense.bias": (i,),
            f"{p}output_query.dense.weight": (h, i),
            f"{p}output_query.dense.bias": (h,),
            f"{p}output_query.LayerNorm.weight": (h,),
            f"{p}output_query.LayerNorm.bias": (h,),
        }
    return layout


def test_state_dict_layout_is_pinned():
    state = {name: tuple(t.shape) for name, t in projector().state_dict().items()}
    assert state == expected_layout(TINY)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"qformer_heads": 5}, "not divisible"),
        ({"num_queries": 0}, "num_queries must be >= 1"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        ProjectorConfig(**{**TINY, **overrides})


def test_input_errors():
    model = projector()
    with pytest.raises(ValueError, match=r"features \[segments, tokens, 16\]"):
        model(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="feature_mask shape"):
        model(torch.randn(2, 5, 16), torch.ones(2, 4, dtype=torch.bool))
