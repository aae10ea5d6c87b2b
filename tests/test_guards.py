"""The non-finite loss guard names the step and the samples, or skips the step."""

from __future__ import annotations

import logging

import pytest
import torch

from moka_train.training.guards import NonFiniteLossError, check_loss


def test_finite_loss_goes_on():
    assert check_loss(torch.tensor(2.5), step=3, sample_ids=["a", "b"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_loss_stops_naming_step_and_samples(value):
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 7 .*samples on this rank: \['q1', 'q2'\]"):
        check_loss(torch.tensor(value), step=7, sample_ids=["q1", "q2"])


def test_skip_policy_warns_and_skips(caplog):
    with caplog.at_level(logging.WARNING):
        assert not check_loss(torch.tensor(float("nan")), step=4, sample_ids=["x"], on_nonfinite="skip")
    assert "skipping the step: non-finite loss at step 4" in caplog.text
    with pytest.raises(ValueError, match="train.on_nonfinite must be one of"):
        check_loss(torch.tensor(1.0), step=1, sample_ids=[], on_nonfinite="ignore")


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    results[rank] = check_loss(loss, step=2, sample_ids=[f"r{rank}"], on_nonfinite="skip")
    dist.barrier()
    dist.destroy_process_group()


def test_every_rank_skips_when_one_rank_is_nonfinite():
    """Rank 0's loss is finite, rank 1's NaN: both skip, or rank 0 would step alone and the ranks diverge."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank, args=(port, results), nprocs=2, start_method="spawn", join=True)
        assert dict(results) == {0: False, 1: False}
