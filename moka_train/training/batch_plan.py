"""Which samples every rank reads at every optimizer step: the data order, exactly resumable.

Each epoch is one permutation of the dataset, drawn from ``(seed, epoch)`` alone, cut into global batches of
``global_batch_size`` samples. Global batch ``s`` is split by position: micro-step ``a`` of rank ``r`` reads
positions ``[(a * world + r) * micro, ... + micro)``. So one optimizer step always sees the same samples,
however many ranks and accumulation steps share it; with the loss normalised by the step's global label count
(DESIGN.md), 1 process and N processes compute the same update. A resumed run recomputes the permutation
and starts at the next global batch: the data order is a pure function of the position, which the checkpoint
keeps (``epoch``, ``step_in_epoch``).

An epoch trains every sample once: the samples left after its last full global batch (fewer than
``global_batch_size``) make one last, smaller step, dealt over every rank and micro-step as evenly as they go
(contiguous runs of the permutation, in slot order). A slot left without a sample is an empty micro-batch: the
collator makes it one pad token with no label, which the loop runs and learns nothing from (a *filler*). Every
rank still runs all its micro-steps, so DeepSpeed's accumulation boundary and ZeRO-3's gathers stay in lockstep,
and with the label-count normalisation the step's update is the same for any layout. ``drop_last=True`` leaves the
remainder out instead (the next epoch's permutation puts others last), for runs that want every step at the full
batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler


def check_batch_split(global_batch_size: int, micro_batch_size: int, world_size: int) -> None:
    """A global batch must split into micro-batches on every rank and whole accumulation steps: a ValueError
    naming the keys otherwise (the training app calls it before it loads anything)."""
    per_pass = micro_batch_size * world_size
    if micro_batch_size < 1 or global_batch_size < 1:
        raise ValueError("stage.global_batch_size and stage.micro_batch_size must be >= 1")
    if global_batch_size % per_pass:
        raise ValueError(
            f"stage.global_batch_size={global_batch_size} is not a multiple of stage.micro_batch_size="
            f"{micro_batch_size} x {world_size} ranks = {per_pass}"
        )


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    seed: int
    shuffle: bool = True
    drop_last: bool = False

    def __post_init__(self) -> None:
        check_batch_split(self.global_batch_size, self.micro_batch_size, self.world_size)
        if self.num_samples < (self.global_batch_size if self.drop_last else 1):
            raise ValueError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch "
                f"(stage.global_batch_size={self.global_batch_size}) with stage.drop_last=true"
                if self.num_samples
                else "the dataset has no samples"
            )

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    @property
    def remainder(self) -> int:
        """The samples of an epoch's last, smaller step (0: every step is a full global batch)."""
        return 0 if self.drop_last else self.num_samples % self.global_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size + (1 if self.remainder else 0)

    def describe(self) -> str:
        left = self.num_samples % self.global_batch_size
        tail = ""
        if self.remainder:
            tail = f"; the last holds the other {left} samples"
        elif left:
            tail = f"; {left} samples per epoch wait for the next epoch's shuffle (stage.drop_last=true)"
        return (
            f"{self.num_samples} samples, {self.steps_per_epoch} steps per epoch of {self.global_batch_size} "
            f"({self.world_size} ranks x {self.micro_batch_size} x {self.accumulation_steps} accumulation){tail}"
        )

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def _slot_sizes(self, step_in_epoch: int) -> list[int]:
        """Samples per slot (slot ``a * world + rank``: micro-step ``a`` of ``rank``) at this step: the
        micro-batch size everywhere in a full step; the remainder dealt as evenly as it goes in the last."""
        slots = self.world_size * self.accumulation_steps
        full = self.num_samples // self.global_batch_size
        if step_in_epoch < full:
            return [self.micro_batch_size] * slots
        base, extra = divmod(self.remainder, slots)
        return [base + (slot < extra) for slot in range(slots)]

    def micro_batches(self, epoch: int, step_in_epoch: int, rank: int) -> list[list[int]]:
        """The ``accumulation_steps`` micro-batches (dataset indices) of ``rank`` in one optimizer step; in an
        epoch's last step, a slot left without a sample is empty (a filler, see the module docstring)."""
        start = step_in_epoch * self.global_batch_size
        batch = self.order(epoch)[start : start + self.global_batch_size].tolist()
        sizes = self._slot_sizes(step_in_epoch)
        offsets = list(itertools.accumulate(sizes, initial=0))
        slots = [a * self.world_size + rank for a in range(self.accumulation_steps)]
        return [batch[offsets[s] : offsets[s] + sizes[s]] for s in slots]


class PlanSampler(Sampler[list[int]]):
    """A batch sampler for ``DataLoader(batch_sampler=...)``: this rank's micro-batches from a position on,
    through ``epochs`` epochs (or ``max_steps`` optimizer steps in all)."""

    def __init__(
        self, plan: BatchPlan, rank: int, epochs: int, start_step: int = 0, max_steps: int | None = None
    ) -> None:
        self.plan, self.rank, self.start_step = plan, rank, start_step
        self.total_steps = plan.steps_per_epoch * epochs if max_steps is None else max_steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            epoch, in_epoch = divmod(step, self.plan.steps_per_epoch)
            yield from self.plan.micro_batches(epoch, in_epoch, self.rank)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.plan.accumulation_steps
