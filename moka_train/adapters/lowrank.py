"""Batched building blocks shared by the adapter methods. No loops over samples or tokens."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

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


def select_own_modality(a_all: Tensor, own_columns: Tensor, rank: int) -> Tensor:
    """Per token, the low-rank output of its own modality's A.

    ``a_all``: ``[B, L, M * r]`` (every A on every token); ``own_columns``: ``[B, L, M * r]``, 1 (or a scale that
    the selection then applies) on the r columns of the token's modality and 0 elsewhere (all zero for pads;
    ``TokenRouting.own_columns``). Returns ``[B, L, r]``; pads get zeros.
    """
    # A same-shape product, then one matmul adding the M column blocks (exact: one term is kept, the others
    # are zeros). Broadcasting a [B, L, M] one-hot over [B, L, M, r] and summing over M (or an einsum: B*L
    # batched 1 x M products) costs more on small tensors: 255 against 179 us per forward and backward of a
    # [8, 199, 12] selection on 2 CPU threads.
    return (a_all * own_columns) @ column_block_sum(a_all.shape[-1], rank, a_all.dtype, a_all.device)


@functools.cache
def column_block_sum(width: int, rank: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[width, rank]``: identities stacked, so that ``a @ it`` adds the ``width / rank`` column blocks of a.

    Made once per process: a cached tensor first asked for under ``torch.inference_mode`` would otherwise be
    an inference tensor, which autograd refuses to save in every later training step."""
    with torch.inference_mode(False):
        return torch.eye(rank, dtype=dtype, device=device).repeat(width // rank, 1)


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
    and shared by every layer: ``index`` [B, N] (positions, see ``compact_index``), ``valid`` [B, N],
    ``count`` [B], ``invalid`` [B, N, 1] (slots to zero) and ``allowed`` [B, 1, 1, N] (the SDPA mask)."""

    index: Tensor
    valid: Tensor
    count: Tensor
    invalid: Tensor
    allowed: Tensor
    _biases: dict[torch.dtype, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_mask(cls, mask: Tensor) -> AttentionKeys:
        index, valid, count = compact_index(mask)
        # A sample with no key attends uniformly to its zeroed slots (output 0, finite gradients) instead
        # of a fully masked row, which gives NaN.
        allowed = valid | (count == 0).unsqueeze(1)
        return cls(index, valid, count, (~valid).unsqueeze(-1), allowed[:, None, None, :])

    def bias(self, dtype: torch.dtype) -> Tensor:
        """``[B, 1, N]``: 0 on the allowed slots, -inf elsewhere; added to the attention logits."""
        if dtype not in self._biases:
            allowed = self.allowed[:, 0]
            zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self._biases[dtype] = zeros.masked_fill(~allowed, float("-inf"))
        return self._biases[dtype]


def cross_attend(queries: Tensor, keys: Tensor, slots: AttentionKeys, scale: Tensor | float) -> Tensor:
    """``softmax(q K^T * scale) K`` per sample, keys doubling as values.

    ``queries`` [B, Lq, r], ``keys`` [B, N, r] gathered at ``slots.index``, ``scale`` a float or a [B, 1, 1] tensor
    (folded into the queries for ``scaled_dot_product_attention``, which takes one float).
    """
    if not _fused_attention_applies(queries):
        return cross_attend_with_weights(queries, keys, slots, scale)[0]
    keys = keys.masked_fill(slots.invalid, 0.0)
    out = F.scaled_dot_product_attention(
        (queries * scale).unsqueeze(1),
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
    adapted 2048-wide linear: 3.6 ms per training step through SDPA, 2.9 ms explicit).

    On the CPU the fused kernel is kept although the explicit form is faster there (forward and backward of
    [8, L, 4] queries over 12-26 keys on 2 threads: 0.32 against 0.44 ms at L = 199, 0.77 against 1.23 ms at
    L = 750): the explicit form keeps the [B, L, N] weights for backward, which made the demo model's step
    hold 1.14x LoRA's memory instead of 1.05x (when MokA's training path still came through here; it is
    ``fused_moka`` now), for a step time within noise of the fused kernel's.
    """
    return queries.device.type == "cpu" or queries.shape[-1] % 8 == 0


def cross_attend_with_weights(
    queries: Tensor, keys: Tensor, slots: AttentionKeys, scale: Tensor | float
) -> tuple[Tensor, Tensor]:
    """``cross_attend`` computed explicitly, also returning the attention weights ``[B, Lq, N]`` (0 on the
    invalid slots of samples that have keys). The fused kernel returns no weights, so the attention maps
    (``moka_train.evaluation.attention_maps``) take this path; so does ``cross_attend`` where no fused kernel
    applies."""
    keys = keys.masked_fill(slots.invalid, 0.0)
    bias = slots.bias(queries.dtype)
    if isinstance(scale, Tensor):  # per sample: scale the (fewer) keys, not the queries
        logits = torch.baddbmm(bias, queries, (keys * scale).transpose(1, 2))
    else:
        logits = torch.baddbmm(bias, queries, keys.transpose(1, 2), alpha=scale)
    weights = logits.softmax(dim=-1)
    return weights @ keys, weights
