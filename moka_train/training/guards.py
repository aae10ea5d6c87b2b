"""The non-finite guards: a NaN or inf loss, or NaN or inf gradients behind a finite loss (an overflow in the
backward pass), stop the run naming the step and the samples, or skip the step (``on_nonfinite: skip``), decided
the same way on every rank so that none steps alone. The gradients are checked by the engines
(``StepResult.nonfinite_gradients``), which never apply them."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

ON_NONFINITE = ("error", "skip")
logger = logging.getLogger(__name__)
# With checkpoints saved before the bad step, resume=auto continues the run (on_nonfinite may change on resume).
SKIP_ADVICE = " (on_nonfinite=skip skips such steps; resume=auto on_nonfinite=skip continues this run)"


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGradientsError(RuntimeError):
    pass


def _check_policy(on_nonfinite: str) -> None:
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")


def any_rank_nonfinite(loss: Tensor) -> bool:
    """Whether the loss is NaN or inf on this rank or any other (one all-reduce when distributed)."""
    flag = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def check_loss(loss: Tensor, step: int, sample_ids: Sequence[str], on_nonfinite: str = "error") -> bool:
    """True when the step may go on; False when it must be skipped (``skip``, after a warning). With
    ``error`` a non-finite loss raises, naming the step and this rank's samples."""
    _check_policy(on_nonfinite)
    if not any_rank_nonfinite(loss):
        return True
    here = "" if torch.isfinite(loss.detach()).all() else f" (this rank's loss: {float(loss.detach())})"
    message = f"non-finite loss at step {step}{here}; samples on this rank: {list(sample_ids)}"
    if on_nonfinite == "error":
        raise NonFiniteLossError(message + SKIP_ADVICE)
    logger.warning("skipping the step: %s", message)
    return False


def report_nonfinite_gradients(
    step: int, grad_norm: float | None, sample_ids: Sequence[str], on_nonfinite: str = "error"
) -> None:
    """A step whose gradients held a NaN or inf behind a finite loss, which the engine did not apply: with
    ``error`` the run stops naming the step and this rank's samples; with ``skip`` a warning, and it goes on."""
    _check_policy(on_nonfinite)
    norm = "" if grad_norm is None else f", gradient norm {grad_norm}"
    message = (
        f"non-finite gradients at step {step} behind a finite loss{norm}; the weights were left as they were; "
        f"samples on this rank: {list(sample_ids)}"
    )
    if on_nonfinite == "error":
        raise NonFiniteGradientsError(message + SKIP_ADVICE)
    logger.warning("skipped the step: %s", message)
