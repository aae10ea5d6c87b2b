"""Two ways to run the optimizer, behind one small interface: the DeepSpeed engine (ZeRO-2, ZeRO-2 with CPU
offload, ZeRO-3) or plain PyTorch (DDP across ranks, or one process).

We drive DeepSpeed's engine directly rather than through accelerate: the engine takes our optimizer and our
learning-rate schedule as objects (no scheduler block can silently replace it), the batch sizes come from one
place (``resolve_deepspeed_config``), and on a CPU it needs no launcher flags (accelerate's DeepSpeed plugin
mis-sizes the batch there, see stack_cpu.md section 5c).

The loss contract: the training loop passes each micro-batch's loss as ``summed token losses / the step's
global label count``. The update must use the sum of those over ranks and micro-batches, so each engine undoes
its own averaging: DDP and DeepSpeed average gradients over ranks (x world size), and DeepSpeed divides by the
accumulation steps unless told not to.

Non-finite gradients (an overflow in the backward pass behind a finite loss) are never applied: the plain engine
checks the global gradient norm before its optimizer step; DeepSpeed's ZeRO optimizers check it themselves, over
all ranks, and skip the whole step (``resolve_deepspeed_config`` refuses the settings that turn that check off).
``step`` reports it, and the training loop stops or goes on as ``on_nonfinite`` says.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from moka_train.models.mllm import MultimodalLM, MultimodalOutput
from moka_train.models.trainables import load_trainables

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepResult:
    """What an optimizer step did. ``grad_norm``: the global gradient norm before clipping (None when the step was
    skipped before its backward, or the engine computed none); ``nonfinite_gradients``: the gradients held a NaN
    or inf, so the weights were left as they were."""

    applied: bool
    grad_norm: float | None = None
    nonfinite_gradients: bool = False


def global_grad_norm(gradients: list[Tensor]) -> Tensor:
    """The L2 norm of all ``gradients`` together (what ``clip_grad_norm_`` returns), without scaling them."""
    if not gradients:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in gradients]))


class TorchEngine:
    """One process, or DDP across processes; bf16 through autocast over fp32 weights."""

    def __init__(
        self,
        model: MultimodalLM,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
        world_size: int,
        precision: str,
        gradient_clipping: float,
    ) -> None:
        if precision == "fp16":
            raise ValueError("stage.precision=fp16 needs DeepSpeed (its loss scaler): use bf16, or deepspeed=zero2")
        self.module = model.to(device)
        self.device = device
        self.world_size = world_size
        self.optimizer, self.scheduler = optimizer, scheduler
        self.gradient_clipping = gradient_clipping
        self.autocast_dtype = PRECISIONS[precision] if precision != "fp32" else None
        # Every projector runs on every step (MultimodalLM does), so no parameter goes unused.
        self.wrapped = DistributedDataParallel(model) if world_size > 1 else model
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Gradients are all-reduced only on the step's last micro-batch."""
        sync = contextlib.nullcontext() if last or self.world_size == 1 else self.wrapped.no_sync()
        with sync:
            yield

    def forward(self, batch: dict[str, Any], label_normalizer: int) -> MultimodalOutput:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.wrapped(batch, label_normalizer=label_normalizer)

    def evaluate(self, batch: dict[str, Any]) -> MultimodalOutput:
        """A validation forward: no gradient, and the module itself rather than DDP, whose forward would
        broadcast buffers. The loss is the sum over the batch's label tokens."""
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None),
        ):
            return self.module(batch, label_normalizer=1)

    def backward(self, loss: Tensor, skip: bool = False) -> None:
        if not skip:  # a skipped step's gradients are never applied: no need to compute them
            (loss * self.world_size).backward()

    def step(self, skip: bool = False) -> StepResult:
        """Apply the step's gradients, unless ``skip`` or they are not finite; the schedule steps either way. Under
        DDP every rank holds the same all-reduced gradients, so every rank decides alike without a collective."""
        result = StepResult(applied=False)
        if not skip:
            if self.gradient_clipping > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.gradient_clipping)
            else:
                norm = global_grad_norm([p.grad for p in self.trainable if p.grad is not None])
            grad_norm = float(norm)
            finite = math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
            result = StepResult(applied=finite, grad_norm=grad_norm, nonfinite_gradients=not finite)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_state(self, directory: Path, rank: int) -> None:
        """Optimizer and scheduler (identical on every rank: rank 0 writes); the weights are the trainables."""
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                directory / "optimizer.pt",
            )

    def load_state(self, directory: Path, trainables: Path) -> None:
        load_trainables(self.module, trainables)
        state = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedEngine:
    """DeepSpeed's engine with our optimizer (trainable parameters only) and our scheduler."""

    TAG = "engine"

    def __init__(
        self,
        model: MultimodalLM,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        config: dict[str, Any],
        world_size: int,
    ) -> None:
        import deepspeed

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        if self.scheduler is not scheduler:
            raise RuntimeError("DeepSpeed replaced the learning-rate scheduler; remove its scheduler block")
        self.module: MultimodalLM = self.engine.module
        self.device = self.engine.device
        self.world_size = world_size
        # A skipped step still runs every micro-batch's backward and DeepSpeed's boundary (its micro-step count,
        # gradient reduction and collectives must stay in lockstep across ranks), but at the boundary our
        # optimizer, which DeepSpeed calls on its fp32 partitions, sees no gradient: torch's AdamW and
        # DeepSpeed's CPU Adam leave a parameter without one untouched, moments included. The gradients are
        # handed back after the call (with CPU offload DeepSpeed reuses those buffers) and cleared as usual.
        self._skipping = False
        self._withheld: list[tuple[Tensor, Tensor | None]] = []
        optimizer.register_step_pre_hook(self._withhold_gradients_when_skipping)
        optimizer.register_step_post_hook(self._restore_withheld_gradients)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        yield  # DeepSpeed counts micro-steps itself and reduces at the accumulation boundary

    def forward(self, batch: dict[str, Any], label_normalizer: int) -> MultimodalOutput:
        return self.engine(batch, label_normalizer=label_normalizer)

    def evaluate(self, batch: dict[str, Any]) -> MultimodalOutput:
        """A validation forward without gradients, through DeepSpeed's engine (its precision; under ZeRO-3 it
        gathers the parameters, so every rank must run as many). The loss is the sum over the label tokens."""
        with torch.no_grad():
            return self.engine(batch, label_normalizer=1)

    def backward(self, loss: Tensor, skip: bool = False) -> None:
        self._skipping = skip
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        # DeepSpeed's step() is per micro-batch: it counts them and applies the update (and our scheduler's
        # step) only at the accumulation boundary.
        self.engine.step()

    def step(self, skip: bool = False) -> StepResult:
        # Nothing left to apply: the last micro-batch's engine.step() did. Gradients with a NaN or inf (a skipped
        # step's, or a finite loss's) make DeepSpeed declare an overflow and skip the update, leaving the schedule
        # alone: the schedule steps anyway, as the plain engine's does. Under fp16 an overflow is the loss
        # scaler's business (it lowers the scale and goes on), not a fault.
        applied = self.engine.was_step_applied()
        if not applied:
            self.scheduler.step()
        self._skipping = False
        if skip:
            return StepResult(applied=False)
        norm = self.engine.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
        if applied and grad_norm is not None and not math.isfinite(grad_norm):  # every rank sees the global norm
            raise RuntimeError(
                f"DeepSpeed applied non-finite gradients (global norm {grad_norm}): the weights are no longer "
                "finite. This DeepSpeed does not skip such steps in bf16 (bf16.check_grad_overflow, on by default "
                "since DeepSpeed PR #8035); install the version in constraints.txt"
            )
        nonfinite = not applied and not self.engine.fp16_enabled()
        return StepResult(applied=applied, grad_norm=grad_norm, nonfinite_gradients=nonfinite)

    def _withhold_gradients_when_skipping(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self._skipping:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    self._withheld.append((parameter, parameter.grad))
                    parameter.grad = None

    def _restore_withheld_gradients(self, *_: Any) -> None:
        for parameter, grad in self._withheld:
            parameter.grad = grad
        self._withheld.clear()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save_state(self, directory: Path, rank: int) -> None:
        # Every rank writes its optimizer shard; the frozen backbone is not saved (the trainables are).
        self.engine.save_checkpoint(str(directory), tag=self.TAG, exclude_frozen_parameters=True)

    def load_state(self, directory: Path, trainables: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=self.TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"{directory} holds no DeepSpeed checkpoint {self.TAG!r}")


Engine = TorchEngine | DeepSpeedEngine
