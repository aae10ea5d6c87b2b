"""The non-finite loss guard names the step and the samples, or skips the step; samples over the length limit
are counted per step and named per rank."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from moka_train.training.guards import NonFiniteLossError, check_loss
from tests.launch import free_port


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
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
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
    import torch.multiprocessing as mp

    port = free_port()
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank, args=(port, results), nprocs=2, start_method="spawn", join=True)
        assert dict(results) == {0: False, 1: False}


def test_dropped_samples_are_counted_per_step_and_named_per_rank(tmp_path):
    """``loader.on_overflow=drop``: the run's metrics count the samples left out at each step (summed over ranks
    with the step's other totals), this rank's ids land in ``dropped_samples.rank0.tsv`` with their step, and
    the run ends with a warning giving the total. One sample per micro-batch, so a dropped sample leaves its
    micro-batch empty: the collator gives one pad token in its place, which runs as a filler and counts no
    token. Expected: the over-length samples of the steps' batches and the kept ones' lengths, found by encoding
    each planned sample."""
    from moka_train.training.batch_plan import BatchPlan, PlanSampler
    from moka_train.training.recipe import build_data_and_model, train
    from moka_train.training.run_logger import read_metrics
    from tests.trained_runs import CPU, compose_config, write_demo_data

    data_root = write_demo_data(tmp_path / "data")
    overrides = [
        "experiment=demo", "stage=instruct", "adapter=moka", f"run_dir={tmp_path / 'run'}",
        f"data.builder.root={data_root}", f"features.cache_dir={data_root / 'feature_cache'}",
        "stage.global_batch_size=4", "stage.micro_batch_size=1", "stage.max_steps=3", "logger.bar=false",
        "loader.num_workers=0",
    ]  # fmt: skip
    cfg = compose_config("train", overrides)
    dataset, _, collator, _ = build_data_and_model(cfg, CPU)
    lengths = [len(collator.encode(dataset[i])) for i in range(len(dataset))]
    plan = BatchPlan(len(dataset), 4, 1, 1, cfg.seed)
    planned = list(PlanSampler(plan, rank=0, epochs=1, max_steps=3))
    # A limit that leaves out some, not all, of the planned samples.
    limit = sorted(lengths[i] for (i,) in planned)[-3]
    steps, tokens = [[], [], []], [0, 0, 0]
    for n, (i,) in enumerate(planned):
        if lengths[i] > limit:
            steps[n // 4].append(dataset[i].id)
        else:
            tokens[n // 4] += lengths[i]
    assert 0 < sum(map(len, steps)) < len(planned)

    cfg = compose_config("train", [*overrides, f"loader.max_length={limit}", "loader.on_overflow=drop"])
    with pytest.warns(UserWarning, match="dropped sample"):
        run_dir = train(cfg)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [r["dropped_samples"] for r in metrics] == [float(len(ids)) for ids in steps]
    assert [r["tokens"] for r in metrics] == [float(t) for t in tokens]
    assert all(math.isfinite(r["loss"]) for r in metrics)
    lines = (run_dir / "dropped_samples.rank0.tsv").read_text().splitlines()
    assert lines == [f"{step}\t{sample_id}" for step, ids in enumerate(steps, 1) for sample_id in ids]
    assert f"{sum(map(len, steps))} time(s) a sample was left out of its batch" in (run_dir / "train.log").read_text()


def test_a_step_with_no_answer_token_leaves_the_weights_as_they_are(tmp_path):
    """Step 1 keeps a sample, every sample of step 2 is over loader.max_length: step 2's micro-batches are all
    fillers, so its loss and gradients are zero, yet AdamW would move the weights on step 1's momentum. The step
    is skipped: the final trainables equal step 1's checkpoint. (A seed is searched for whose plan does this.)"""
    from moka_train.training.batch_plan import BatchPlan, PlanSampler
    from moka_train.training.recipe import build_data_and_model, train
    from moka_train.training.run_logger import read_metrics
    from tests.trained_runs import CPU, compose_config, write_demo_data

    data_root = write_demo_data(tmp_path / "data")
    overrides = [
        "experiment=demo", "stage=instruct", "adapter=moka", f"run_dir={tmp_path / 'run'}",
        f"data.builder.root={data_root}", f"features.cache_dir={data_root / 'feature_cache'}",
        "stage.global_batch_size=2", "stage.micro_batch_size=1", "stage.max_steps=2", "stage.warmup_ratio=0",
        "checkpoint.every_steps=1", "logger.bar=false", "loader.num_workers=0",
    ]  # fmt: skip
    dataset, _, collator, _ = build_data_and_model(compose_config("train", overrides), CPU)
    lengths = [len(collator.encode(dataset[i])) for i in range(len(dataset))]
    for seed in range(100):
        planned = [i for (i,) in PlanSampler(BatchPlan(len(dataset), 2, 1, 1, seed), rank=0, epochs=1, max_steps=2)]
        limit = min(lengths[i] for i in planned[:2])
        if min(lengths[i] for i in planned[2:]) > limit:
            break
    else:
        pytest.fail("no seed below 100 plans a step 2 longer than step 1's shortest sample")
    cfg = compose_config("train", [*overrides, f"seed={seed}", f"loader.max_length={limit}", "loader.on_overflow=drop"])
    with pytest.warns(UserWarning, match="dropped sample"):
        run_dir = train(cfg)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert metrics[1]["dropped_samples"] == 2.0 and "loss" in metrics[0] and "loss" not in metrics[1]
    assert "step 2 has no answer token on any rank" in (run_dir / "train.log").read_text()
    for name in ("trainables.safetensors", "adapter/adapter_model.safetensors"):
        after_step_1 = load_file(run_dir / "checkpoints" / "step-00000001" / "trainables" / name)
        final = load_file(run_dir / "trainables" / name)
        assert sorted(final) == sorted(after_step_1)
        assert all(torch.equal(final[k], after_step_1[k]) for k in final), name


def _plain_engine(clipping: float):
    from moka_train.training.engine import TorchEngine
    from moka_train.training.schedule import build_lr_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = build_lr_scheduler(optimizer, "cosine", 4, 0.0)
    engine = TorchEngine(model, optimizer, scheduler, torch.device("cpu"), 1, "fp32", clipping)
    return model, optimizer, engine


@pytest.mark.parametrize("clipping", [0.0, 1e-3])
def test_the_plain_engine_reports_the_gradient_norm_before_clipping(clipping):
    """The norm of all gradients together, by hand: sqrt of the sum of every element's square."""
    model, _, engine = _plain_engine(clipping)
    model(torch.randn(5, 3)).square().sum().backward()
    expected = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    result = engine.step()
    assert result.applied and not result.nonfinite_gradients
    assert result.grad_norm == pytest.approx(expected, rel=1e-6)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("clipping", [0.0, 1.0])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_plain_engine_never_applies_nonfinite_gradients(clipping, value):
    """One gradient element NaN or inf behind a finite loss: the weights and AdamW's moments stay as they were,
    the schedule advances, and the next finite step applies as usual."""
    model, optimizer, engine = _plain_engine(clipping)
    model(torch.randn(5, 3)).square().sum().backward()
    engine.step()
    state = {k: v.clone() for k, v in optimizer.state[model[0].weight].items()}
    weights = [p.detach().clone() for p in model.parameters()]
    lr = engine.lr()

    loss = model(torch.randn(5, 3)).square().sum()
    loss.backward()
    model[1].bias.grad[0] = value
    result = engine.step()
    assert math.isfinite(loss.item()) and not result.applied and result.nonfinite_gradients
    assert not math.isfinite(result.grad_norm)
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))
    assert all(torch.equal(v, optimizer.state[model[0].weight][k]) for k, v in state.items())
    assert engine.lr() < lr  # cosine: the schedule went on
    assert all(p.grad is None for p in model.parameters())

    model(torch.randn(5, 3)).square().sum().backward()
    assert engine.step().applied
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_gradients_stop_the_run_or_are_skipped(caplog):
    from moka_train.training.guards import NonFiniteGradientsError, report_nonfinite_gradients

    with pytest.raises(NonFiniteGradientsError, match=r"non-finite gradients at step 5 .*norm nan.*\['q1'\]"):
        report_nonfinite_gradients(5, float("nan"), ["q1"])
    with caplog.at_level(logging.WARNING):
        report_nonfinite_gradients(6, None, ["q2"], on_nonfinite="skip")
    assert "skipped the step: non-finite gradients at step 6" in caplog.text
