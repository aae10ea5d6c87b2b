"""The batched low-rank building blocks against independent references: the cross-attention, both the fused
kernel's path (the CPU's) and the explicit one (CUDA's at ranks that are not multiples of 8, and the attention
maps'), against PyTorch's attention run per sample; and the per-token choice of a modality's A against a loop
over tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moka_train.adapters.lowrank import (
    AttentionKeys,
    cross_attend,
    cross_attend_with_weights,
    gather_tokens,
    select_own_modality,
)
from moka_train.adapters.routing import TokenRouting


def key_slots() -> AttentionKeys:
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, [1, 2, 5]] = True
    mask[2, 1:6] = True  # sample 1 has no key at all
    return AttentionKeys.from_mask(mask)


def sdpa_reference(queries: torch.Tensor, keys: torch.Tensor, slots: AttentionKeys, scale: torch.Tensor):
    """PyTorch's attention per sample over its valid keys; 0 for a sample without keys."""
    rows = []
    for b in range(queries.shape[0]):
        k = keys[b, slots.valid[b]]
        if k.shape[0] == 0:
            rows.append(torch.zeros_like(queries[b]))
            continue
        rows.append(F.scaled_dot_product_attention(queries[b][None], k[None], k[None], scale=float(scale[b]))[0])
    return torch.stack(rows)


def explicit(queries, keys, slots, scale):
    return cross_attend_with_weights(queries, keys, slots, scale)[0]


@pytest.mark.parametrize("attend", [cross_attend, explicit], ids=["cross_attend", "explicit"])
@pytest.mark.parametrize("per_sample_scale", [True, False], ids=["per-sample-scale", "float-scale"])
def test_cross_attention_and_its_gradients_equal_pytorch_attention_per_sample(attend, per_sample_scale):
    torch.manual_seed(0)
    slots = key_slots()
    a = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    scale = slots.count.clamp(min=1).double().rsqrt().view(-1, 1, 1) if per_sample_scale else 0.5
    scales = scale.flatten() if per_sample_scale else torch.full((3,), 0.5, dtype=torch.float64)
    upstream = torch.randn(3, 7, 4, dtype=torch.float64)

    got = attend(a, gather_tokens(a, slots.index), slots, scale)
    (got_grad,) = torch.autograd.grad(got, a, upstream)
    want = sdpa_reference(a, gather_tokens(a, slots.index), slots, scales)
    (want_grad,) = torch.autograd.grad(want, a, upstream)

    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    assert torch.all(got[1] == 0)  # no key: nothing attended
    assert torch.isfinite(got_grad).all() and got_grad[[0, 2]].abs().sum() > 0


def test_select_own_modality_takes_each_tokens_own_columns_and_zero_for_pads():
    torch.manual_seed(3)
    rank, modalities = 3, 3
    modality_index = torch.tensor([[0, 1, 1, 2, -1], [2, 0, 1, -1, -1]])
    routing = TokenRouting(2, 5, torch.device("cpu"), modalities, modality_index)
    a_all = torch.randn(2, 5, modalities * rank, requires_grad=True)
    got = select_own_modality(a_all, routing.own_columns(rank, a_all.dtype), rank)
    want = torch.zeros(2, 5, rank)
    for b in range(2):
        for i in range(5):
            m = int(modality_index[b, i])
            if m >= 0:
                want[b, i] = a_all[b, i, m * rank : (m + 1) * rank]
    assert torch.equal(got, want)  # one term kept, the others exact zeros
    got.sum().backward()
    expected_grad = routing.onehot(torch.float32).repeat_interleave(rank, dim=-1)
    assert torch.equal(a_all.grad, expected_grad)
