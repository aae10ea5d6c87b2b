"""The process group: the same command on a laptop, a GPU node or a cluster.

Under torchrun (``RANK`` / ``WORLD_SIZE`` set) every process joins the group; without it the run is one process
and no group is created. A machine without CUDA takes the CPU paths itself: gloo instead of NCCL and
DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``, which must be set before DeepSpeed is first imported), so
nobody has to remember a flag. ``../shared/docs/stack_cpu.md`` records why each step is there.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def init_distributed(use_deepspeed: bool, timeout_minutes: float = 30.0) -> DistributedContext:
    """Join the process group torchrun describes (or run alone) on the right device and backend."""
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if use_deepspeed:
        import deepspeed

        if not cuda:
            # The CPU accelerator JIT-compiles a shared-memory collective (about 25 s of g++) that gloo does
            # not need; `import deepspeed.comm.torch as m` would bind the torch package, hence importlib.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        if not dist.is_initialized():
            # DeepSpeed wants a group even for one process; without torchrun it needs an address to bind.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("LOCAL_RANK", str(local_rank))
            os.environ.setdefault("WORLD_SIZE", str(world_size))
            deepspeed.init_distributed(
                dist_backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes)
            )
    elif world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
            **({"device_id": device} if cuda else {}),
        )
    return DistributedContext(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    """Leave the group. The barrier first: destroying the group right after a collective made a gloo rank
    abort about one time in ten (stack_cpu.md section 5a)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(value: object, ctx: DistributedContext) -> object:
    """Rank 0's ``value`` on every rank."""
    if not ctx.distributed:
        return value
    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, on ``values``' device (a copy when there is no process group). NCCL reduces CUDA
    tensors only ("No backend type associated with device type cpu"), so under NCCL a CPU tensor (the loop's
    per-step totals) makes the trip through this rank's GPU."""
    if not (dist.is_available() and dist.is_initialized()):
        return values.clone()
    if dist.get_backend() == "nccl" and values.device.type != "cuda":
        summed = values.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        summed = values.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(values.device)
