"""The validation set's share per rank, its subset, and the sum over ranks the validation loss (and the loop's
per-step totals) go through. The validation loss of a real run is checked in tests/test_train_app.py."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import psutil
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from moka_train.training.distributed import all_reduce_sum
from moka_train.training.engine import TorchEngine
from moka_train.training.validation import spread_evenly, validation_batches, validation_loss
from tests.launch import free_port
from tests.test_mllm import build, make_batch


def test_validation_batches_by_hand():
    # 5 samples, 2 ranks, 2 per micro-batch: rank 1 has one micro-batch fewer and runs a filler (empty) instead.
    assert validation_batches(5, 2, 0, 2) == [[0, 2], [4]]
    assert validation_batches(5, 2, 1, 2) == [[1, 3], []]
    assert validation_batches(3, 8, 0, 1) == [[0, 1, 2]]
    assert validation_batches(1, 1, 2, 3) == [[]]  # more ranks than samples: a filler each


@pytest.mark.parametrize(("size", "micro", "world"), list(itertools.product([1, 6, 7, 17], [1, 2, 3], [1, 2, 3, 4])))
def test_validation_batches_cover_every_sample_once_in_lockstep(size, micro, world):
    per_rank = [validation_batches(size, micro, rank, world) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # every rank runs as many forwards
    taken = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert taken == list(range(size))
    assert all(len(batch) <= micro for batches in per_rank for batch in batches)


def test_spread_evenly():
    items = list(range(10))
    assert spread_evenly(items, 4) == [0, 2, 5, 7]
    assert spread_evenly(items, 1) == [0]
    assert spread_evenly(items, None) == items
    assert spread_evenly(items, 10) == items and spread_evenly(items, 50) == items


class _BadSecondBatch(Dataset):
    """Collated validation batches, the second of which fails to load (as a corrupt media file would)."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict:
        if index == 1:
            raise ValueError("validation record 1: unreadable media")
        return make_batch(seed=index)


def test_an_error_mid_validation_restores_the_modes_and_ends_the_loaders_worker():
    """The error reaches the caller, every module gets its training mode back, and the DataLoader's worker is
    gone as soon as validation_loss returns, though the traceback the caller holds keeps its frame alive."""
    model = build(adapter="moka").train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine = TorchEngine(model, optimizer, scheduler, torch.device("cpu"), 1, "fp32", 0.0)
    batches = DataLoader(_BadSecondBatch(), batch_size=None, num_workers=1)
    before = set(psutil.Process().children(recursive=True))  # other tests' helpers (a resource tracker) may stay
    # ``raised`` holds the traceback (with validation_loss's frame) through the checks below, as a caller would.
    with pytest.raises(ValueError, match="validation record 1") as raised:
        validation_loss(engine, batches, encoders={})
    assert all(module.training for module in model.modules())
    left = set(psutil.Process().children(recursive=True)) - before
    assert not left, f"the validation DataLoader's worker outlived the error: {left}"
    del raised


def test_all_reduce_sum_without_a_group_is_a_copy():
    values = torch.tensor([1.5, 2.0], dtype=torch.float64)
    summed = all_reduce_sum(values)
    assert torch.equal(summed, values) and summed.data_ptr() != values.data_ptr()


GROUP_OF_ONE = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from moka_train.training.distributed import all_reduce_sum
    backend = sys.argv[1]
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
    values = torch.tensor([1.5, 2.0], dtype=torch.float64)  # on the CPU, as the loop's per-step totals
    summed = all_reduce_sum(values)
    assert summed.device == values.device and torch.equal(summed, values), summed
    dist.destroy_process_group()
    print("ok")
    """
)


@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param(
            "nccl",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA device"),
        ),
    ],
)
def test_all_reduce_sum_of_a_cpu_tensor_in_a_process_group(backend):
    """Under NCCL, which reduces CUDA tensors only, a CPU tensor used to fail with "No backend type associated
    with device type cpu": the loop's totals are CPU tensors. A group of one runs the real collective."""
    assert not dist.is_initialized()
    done = subprocess.run(
        [sys.executable, "-c", GROUP_OF_ONE, backend, str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
