"""Batched building blocks shared by the adapter methods. No loops over samples or tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def fused_down(x: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """``x @ [A_1; A_2; ...]^T`` in one matmul, so every A takes part in every forward (DDP and ZeRO-3 need
    each parameter in the graph even when a batch lacks a modality). Returns ``[..., sum of ranks]``."""
    weight = weights[0] if len(weights) == 1 else torch.cat(list(weights), dim=0)
    return F.linear(x, weight)


def fused_up(a: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """``[B_1, B_2, ...] @ a`` in one matmul: the sum over modalities of ``B_m a_m`` when ``a`` holds the
    columns of every modality side by side."""
    weight = weights[0] if len(weights) == 1 else torch.cat(list(weights), dim=1)
    return F.linear(a, weight)


def select_own_modality(a_all: Tensor, onehot: Tensor) -> Tensor:
    """Per token, the low-rank output of its own modality's A.

    ``a_all``: ``[B, L, M * r]`` (every A on every token), ``onehot``: ``[B, L, M]`` (all zero for pads).
    Returns ``[B, L, r]``; pads get zeros.
    """
    batch, length, width = a_all.shape
    num_modalities = onehot.shape[-1]
    per_modality = a_all.view(batch, length, num_modalities, width // num_modalities)
    # A product and a sum: einsum makes this a batched matmul of B*L tiny (1 x M) @ (M x r) products, with more
    # operations in the forward and the backward (about 6 % of a 64-wide adapted layer's step on the CPU).
    return (per_modality * onehot.unsqueeze(-1)).sum(dim=2)


def compact_index(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Positions of the True entries of ``mask`` [B, L], packed to the front of each row.

    Returns ``index`` [B, N] (N = the largest count, at least 1), ``valid`` [B, N] (which slots hold a real
    position) and ``count`` [B]. Invalid slots point at distinct non-selected positions, so a scatter back
    through ``index`` never collides.
    """
    count = mask.sum(dim=1)
    width = max(int(count.max()) if mask.numel() else 0, 1)
    width = min(width, mask.shape[1])
    # A stable sort of "not selected" puts selected positions first, in their original order.
    index = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < count[:, None]
    return index, valid, count


def gather_tokens(values: Tensor, index: Tensor) -> Tensor:
    """``values`` [B, L, r] at ``index`` [B, N] -> [B, N, r]."""
    return torch.gather(values, 1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


@dataclass(frozen=True)
class AttentionKeys:
    """The key slots of a batched attention in the low-rank space, built once per forward from the routing
    and shared by every layer: ``index`` [B, N] (positions, see ``compact_index``), ``count`` [B],
    ``invalid`` [B, N, 1] (slots to zero) and ``allowed`` [B, 1, 1, N] (the SDPA mask)."""

    index: Tensor
    valid: Tensor
    count: Tensor
    invalid: Tensor
    allowed: Tensor

    @classmethod
    def from_mask(cls, mask: Tensor) -> AttentionKeys:
        index, valid, count = compact_index(mask)
        # A sample with no key attends uniformly to its zeroed slots (output 0, finite gradients) instead
        # of a fully masked row, which gives NaN.
        allowed = valid | (count == 0).unsqueeze(1)
        return cls(index, valid, count, (~valid).unsqueeze(-1), allowed[:, None, None, :])


def cross_attend(queries: Tensor, keys: Tensor, slots: AttentionKeys, query_scale: Tensor | float) -> Tensor:
    """``softmax(q K^T * scale) K`` per sample, keys doubling as values.

    ``queries`` [B, Lq, r], ``keys`` [B, N, r] gathered at ``slots.index``, ``query_scale`` a float or a
    [B, 1, 1] tensor (folded into the queries, because ``scaled_dot_product_attention`` takes one float).
    """
    if not _fused_attention_applies(queries):
        return cross_attend_with_weights(queries, keys, slots, query_scale)[0]
    keys = keys.masked_fill(slots.invalid, 0.0)
    out = F.scaled_dot_product_attention(
        (queries * query_scale).unsqueeze(1),
        keys.unsqueeze(1),
        keys.unsqueeze(1),
        attn_mask=slots.allowed,
        scale=1.0,
    )
    return out.squeeze(1)


def _fused_attention_applies(queries: Tensor) -> bool:
    """Whether ``scaled_dot_product_attention`` has a fused kernel for these queries. The CPU's takes any head
    size; CUDA's need a multiple of 8, so at the usual ranks (4) SDPA would fall back to its math path, which
    computes what ``cross_attend_with_weights`` computes after a costly kernel selection (on an H100, one
    adapted 2048-wide linear: 3.6 ms per training step through SDPA, 2.9 ms explicit)."""
    return queries.device.type == "cpu" or queries.shape[-1] % 8 == 0


def cross_attend_with_weights(
    queries: Tensor, keys: Tensor, slots: AttentionKeys, query_scale: Tensor | float
) -> tuple[Tensor, Tensor]:
    """``cross_attend`` computed explicitly, also returning the attention weights ``[B, Lq, N]`` (0 on the
    invalid slots of samples that have keys). The fused kernel returns no weights, so the attention maps
    (``moka_train.evaluation.attention_maps``) take this path; so does ``cross_attend`` where no fused kernel
    applies."""
    keys = keys.masked_fill(slots.invalid, 0.0)
    logits = (queries * query_scale) @ keys.transpose(1, 2)
    logits = logits.masked_fill(~slots.allowed[:, 0], float("-inf"))
    weights = logits.softmax(dim=-1)
    return weights @ keys, weights
