"""The learning-rate schedule, always ours: linear warmup, then cosine or linear decay to zero (or constant).

The official audio-visual runs asked for cosine but decayed linearly, because a ``WarmupDecayLR`` block in
their DeepSpeed JSON silently took precedence (moka_reference.md §4). Here the schedule is built from our
config and handed to the engine; DeepSpeed configs with a scheduler block are refused
(``deepspeed_config.resolve_deepspeed_config``).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup steps for a ratio of the run: ``ceil(total_steps * warmup_ratio)``, as the HF Trainer computes
    them for the official visual-text runs (0.03 of 1,000 steps: 30; of 37 steps: 2)."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)


def build_lr_scheduler(optimizer: Optimizer, schedule: str, total_steps: int, warmup_ratio: float = 0.03) -> LambdaLR:
    """transformers' schedule ``schedule`` over ``total_steps`` optimizer steps, warming up linearly for
    ``warmup_ratio`` of them (``constant``: warmup, then the peak learning rate)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps_for(total_steps, warmup_ratio),
        num_training_steps=total_steps,
    )
