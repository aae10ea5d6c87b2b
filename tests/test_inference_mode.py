"""An evaluation under ``torch.inference_mode`` followed by training in the same process: the constant tensors the
adapters cache process-wide (the column-block sum of the modality selection, MokA's float key scale) must not be
made as inference tensors by the first pass, or every later training step fails in backward ("Inference tensors
cannot be saved for backward")."""

from __future__ import annotations

import pytest
import torch

from moka_train.adapters import AdapterConfig, available_methods, fused_moka, inject_adapters, lowrank, set_routing
from tests.helpers import randomize_adapters, routing_batch
from tests.test_adapter_formulas import IN, LAYOUTS, OneLinear


def clear_process_caches() -> None:
    # So that the next forward makes the cached constants afresh, whichever test ran before in this process.
    lowrank.column_block_sum.cache_clear()
    fused_moka._scalar.cache_clear()


def training_gradients(cfg: AdapterConfig, evaluate_first: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = inject_adapters(OneLinear(), cfg)
    randomize_adapters(model, std=0.5)
    ids, question, _ = routing_batch(LAYOUTS)
    x = torch.randn(*ids.shape, IN)
    clear_process_caches()
    if evaluate_first:
        model.eval()
        with torch.inference_mode():
            set_routing(model, ids, question)
            model(x)
        model.train()
    set_routing(model, ids, question)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(model(x).square().sum(), trainable))


@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize("attn_scale", ["question_tokens", "rank"])
def test_training_after_an_inference_mode_evaluation(method, attn_scale):
    cfg = AdapterConfig(method=method, rank=4, alpha=16, target_modules=["q_proj"], attn_scale=attn_scale)
    expected = training_gradients(cfg, evaluate_first=False)
    got = training_gradients(cfg, evaluate_first=True)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
