"""MokA's low-rank path (own-modality A, cross-attention over the question span, shared B) as one autograd node.

Per layer, the composite of ``lowrank``'s building blocks records about ten autograd nodes, each with its own
backward dispatch; at the sizes where MokA is used every one of those small ops costs more to dispatch (on a GPU,
to launch) than to compute. Here the forward runs the same batched ops outside autograd and the backward is
written out, so a layer costs one node and fewer kernels: no masked fills, no zero-filled gather backward, no
gradient accumulation between the uses of ``a``. The README's benchmark section has the measurements.

Forward, with ``columns`` holding s (or 1) on each token's own-modality block and 0 at pads, ``c`` the key scale
(per sample or one float) and ``l`` each token's lambda (0 for text, pads and samples without question tokens):

    a   = (x [A_1; ...; A_M]^T * columns) E       E sums the M column blocks: each token's own A
    K   = a[question slots]                        keys = values, [B, N, r]
    P   = softmax(c a K^T + bias)                  bias: 0 on a sample's question slots, -inf on the others
    a'  = a + l P K
    out = a' B^T

The invalid key slots of a sample are never zeroed: their weights are exactly 0 (exp(-inf)), so they add
nothing forward and receive exact zeros backward. A sample without question tokens attends uniformly over
slots that all hold finite values, and its ``l`` of 0 drops the result (forward) and every gradient through it.

Under autocast everything runs in the autocast dtype except the softmax (float32, as autocast runs it); the
gradients come back in each input's own dtype.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from moka_train.adapters.lowrank import AttentionKeys, column_block_sum


def fused_moka_delta(
    x: Tensor,
    a_weights: Sequence[Tensor],
    b_weight: Tensor,
    columns: Tensor,
    keys: AttentionKeys,
    key_scale: Tensor | float,
    lambdas: Tensor,
) -> Tensor:
    """MokA's delta ``B a'`` for ``x`` [B, L, k] (see the module docstring): ``a_weights`` the M A's ([r, k] each,
    in ``columns``' block order), ``b_weight`` [d, r], ``columns`` [B, L, M * r], ``keys`` the question slots,
    ``key_scale`` a float or [B, 1, 1], ``lambdas`` [B, L, 1]. Returns [B, L, d] in the compute dtype."""
    dtype = compute_dtype(x)
    scale = _cast(key_scale, dtype) if isinstance(key_scale, Tensor) else _scalar(key_scale, dtype, x.device)
    arguments = (dtype, x, b_weight, _cast(columns, dtype), _cast(lambdas, dtype), keys.index, keys.bias(dtype), scale)
    # Every op inside runs in ``dtype`` already, so autocast, which would re-dispatch each one, is turned off.
    with _autocast_off(x.device.type):
        return _FusedMokaDelta.apply(*arguments, *a_weights)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the delta of ``x`` is computed in: autocast's where it is on for x's device, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    # Without the dtype check a no-op ``to`` still costs a dispatch, which is what this module saves.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


@functools.cache
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-d tensor, made once: a new one per call would be a host-to-device copy per layer on a GPU. Made
    outside inference mode, as ``column_block_sum`` is: the backward saves it."""
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=dtype, device=device)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _narrow_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for a product whose last dimension is narrow (the rank r), computed as ``(b^T a^T)^T``: the same
    sums, but MKL's CPU matmul writes a [.., n, r] result two to three times slower than a [.., r, n] one at
    MokA's sizes (2 CPU threads: P K for [8, 199, 43] x [8, 43, 4] weights and keys 26 against 9 us, the
    gradient of B 43 against 17 us). cuBLAS takes either form as a transpose flag. The result is a transposed
    view, which the elementwise ops, the scatter and the matmuls that follow read as it is."""
    return torch.matmul(b.transpose(-1, -2), a.transpose(-1, -2)).transpose(-1, -2)


def _attention_weights(a: Tensor, keys: Tensor, bias: Tensor, scale: Tensor) -> Tensor:
    """softmax(c a K^T + bias), [B, L, N]; below float32 the softmax runs in float32, as under autocast."""
    logits = torch.baddbmm(bias, a, (keys * scale).transpose(1, 2))
    if a.dtype in (torch.bfloat16, torch.float16):
        return logits.softmax(-1, dtype=torch.float32).to(a.dtype)
    return logits.softmax(-1)


class _FusedMokaDelta(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        dtype: torch.dtype,
        x: Tensor,
        b_weight: Tensor,
        columns: Tensor,
        lambdas: Tensor,
        index: Tensor,
        bias: Tensor,
        scale: Tensor,
        *a_weights: Tensor,
    ) -> Tensor:
        rank = b_weight.shape[1]
        # Joined before the cast: under autocast one cast of the joined weight instead of one per modality.
        a_weight = _cast(torch.cat(a_weights) if len(a_weights) > 1 else a_weights[0], dtype)
        x_c, b_c = _cast(x, dtype), _cast(b_weight, dtype)
        a = (F.linear(x_c, a_weight) * columns) @ column_block_sum(a_weight.shape[0], rank, dtype, x.device)
        index = index.unsqueeze(-1).expand(-1, -1, rank)
        keys = torch.gather(a, 1, index)
        attended = torch.addcmul(a, lambdas, _narrow_matmul(_attention_weights(a, keys, bias, scale), keys))
        # The weights [B, L, N] are recomputed in backward rather than kept: at the demo's width they would hold
        # as much as the layer's input.
        ctx.save_for_backward(x_c, a_weight, b_c, columns, lambdas, index, bias, scale, a, keys, attended)
        ctx.dtypes = (x.dtype, b_weight.dtype, *(w.dtype for w in a_weights))
        ctx.ranks = [w.shape[0] for w in a_weights]
        return F.linear(attended, b_c)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, a_weight, b_weight, columns, lambdas, index, bias, scale, a, keys, attended = ctx.saved_tensors
        x_dtype, b_dtype, *a_dtypes = ctx.dtypes
        needs_x, needs_b, needs_a = ctx.needs_input_grad[1], ctx.needs_input_grad[2], any(ctx.needs_input_grad[8:])
        grad = _cast(grad, a.dtype)
        rank = a.shape[-1]
        with _autocast_off(grad.device.type):
            weights = _attention_weights(a, keys, bias, scale)
            grad_2d = grad.reshape(-1, grad.shape[-1])
            grad_b = _narrow_matmul(grad_2d.t(), attended.reshape(-1, rank)) if needs_b else None
            grad_a = _narrow_matmul(grad_2d, b_weight).view(a.shape)  # d out / d a', also the direct part of d a
            grad_attended = grad_a * lambdas
            # The softmax's backward, times the key scale c: d logits / d a = c K and d logits / d K = c a.
            grad_logits = (
                torch._softmax_backward_data(grad_attended @ keys.transpose(1, 2), weights, -1, weights.dtype) * scale
            )
            # d K = P^T d a' + d logits^T a, built as its transpose [B, r, N] (see _narrow_matmul).
            grad_keys = torch.baddbmm(grad_attended.transpose(1, 2) @ weights, a.transpose(1, 2), grad_logits)
            grad_a.add_(_narrow_matmul(grad_logits, keys))
            grad_a.scatter_add_(1, index, grad_keys.transpose(1, 2))
            # Back through the own-modality selection: each token's r gradients to its own block of columns.
            grad_all = (grad_a @ column_block_sum(a_weight.shape[0], rank, a.dtype, a.device).t()) * columns
            grad_x = _cast(grad_all @ a_weight, x_dtype) if needs_x else None
            grad_as = [None] * len(a_dtypes)
            if needs_a:
                grad_a_weight = grad_all.reshape(-1, grad_all.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
                # Cast before the split (one cast when, as usual, every A has the same dtype).
                grad_a_weight = _cast(grad_a_weight, a_dtypes[0])
                grad_as = [_cast(g, t) for g, t in zip(grad_a_weight.split(ctx.ranks), a_dtypes, strict=True)]
        grad_b = None if grad_b is None else _cast(grad_b, b_dtype)
        return None, grad_x, grad_b, None, None, None, None, None, *grad_as
