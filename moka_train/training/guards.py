"""The non-finite loss guard: a NaN or inf loss stops the run naming the step and the samples, or skips the
step (``on_nonfinite: skip``), decided the same way on every rank so that none steps alone."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

ON_NONFINITE = ("error", "skip")
logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def any_rank_nonfinite(loss: Tensor) -> bool:
    """Whether the loss is NaN or inf on this rank or any other (one all-reduce when distributed)."""
    flag = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def check_loss(loss: Tensor, step: int, sample_ids: Sequence[str], on_nonfinite: str = "error") -> bool:
    """True when the step may go on; False when it must be skipped (``skip``, after a warning). With
    ``error`` a non-finite loss raises, naming the step and this rank's samples."""
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"train.on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    if not any_rank_nonfinite(loss):
        return True
    here = "" if torch.isfinite(loss.detach()).all() else f" (this rank's loss: {float(loss.detach())})"
    message = f"non-finite loss at step {step}{here}; samples on this rank: {list(sample_ids)}"
    if on_nonfinite == "error":
        raise NonFiniteLossError(message + " (train.on_nonfinite: skip skips such steps)")
    logger.warning("skipping the step: %s", message)
    return False
