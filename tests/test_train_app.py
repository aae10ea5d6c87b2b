"""scripts/train.py end to end on the CPU: the real Hydra app, torchrun, gloo and DeepSpeed, on the demo data.

Every run trains MokA (fp32) for a few steps on questions whose batches mix modalities
(tests/train_data.py). The reference is one process without DeepSpeed, one micro-batch per step; with the loss
normalised by each step's global label count, a 2-node torchrun (DDP) and 2-rank DeepSpeed ZeRO-2, ZeRO-2 with
CPU offload and ZeRO-3 (2 ranks x 2 samples x 2 accumulation steps) must end with the same trainables and log
the same losses and token counts, up to fp32 summation order. The 4 steps are one epoch of 27 samples: the last
step holds the 3 left over, so on 2 ranks one of rank 1's micro-steps is a filler whose loss must count for
nothing (the reference has none); they also log the reference's validation loss, with a filler on rank 1. A
run with a validation loss trains exactly the weights of one without. A run killed
after a step, or in the middle of a save, or stopped by a SIGTERM (a checkpoint at the step boundary), and resumed
with resume=auto ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from moka_train.evaluation.runner import check_run_dir
from moka_train.models.build import build_multimodal_lm
from moka_train.models.mllm import encode_media
from moka_train.models.trainables import load_trainables, trainables_state_dict
from moka_train.training.recipe import FAULT_EXIT_CODE, build_data_and_model, build_records
from moka_train.training.run_logger import read_metrics
from tests.launch import ROOT, describe, environment, free_port, run, torchrun
from tests.test_demo_data import demo
from tests.trained_runs import CPU

pytestmark = pytest.mark.distributed

TRAIN = ROOT / "scripts" / "train.py"
ATOL = 1e-6  # resumed vs uninterrupted: the same computation, repeated
# Across process layouts the gradients agree to fp32 summation order only, and Adam divides by sqrt(v): on a weight
# whose gradient is nearly zero that noise becomes a visible fraction of a step (lr 1e-3 here).
ATOL_LAYOUTS = 1e-5
# The rate each of FAST's 4 steps uses: cosine from 1e-3, no warmup.
COSINE_RATES = [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
FAST = [
    "stage.precision=fp32",
    "stage.global_batch_size=8",
    "stage.micro_batch_size=2",
    "stage.max_steps=4",
    "stage.gradient_checkpointing=false",
    "stage.lr=1e-3",
    "stage.warmup_ratio=0",
    "loader.num_workers=0",
    "logger.bar=false",
    "data.builder._target_=tests.train_data.mixed_modality_records",
    "+data.builder.limit=27",
]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_data")
    demo.generate(root, num_videos=16, val_videos=2, test_videos=2, progress=False)
    return root


def command(run_dir: Path, demo_root: Path, *overrides: str, nproc: int = 1, launcher: tuple[str, ...] = ()) -> list:
    stage = [] if "stage=pretrain" in overrides else ["stage=instruct", "adapter=moka", "adapter.dropout=0"]
    args = [f"run_dir={run_dir}", f"data.builder.root={demo_root}", *stage, *FAST, *overrides]
    if nproc == 1 and not launcher:
        return [sys.executable, str(TRAIN), *args]
    return torchrun(TRAIN, *args, nproc=nproc, launcher=launcher or ("--standalone",))


def train(run_dir: Path, demo_root: Path, *overrides: str, nproc: int = 1, expect: int = 0) -> str:
    cmd = command(run_dir, demo_root, *overrides, nproc=nproc)
    returncode, output = run(cmd)
    if returncode != expect:
        raise AssertionError(describe(cmd, returncode, output))
    return output


def trainables(run_dir: Path, where: str = "trainables") -> dict[str, torch.Tensor]:
    directory = run_dir / where
    state = load_file(directory / "trainables.safetensors")
    state.update({f"adapter.{k}": v for k, v in load_file(directory / "adapter" / "adapter_model.safetensors").items()})
    return state


def assert_same_trainables(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    assert sorted(a) == sorted(b)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= atol, f"trainables differ by up to {worst}"


def token_counts(run_dir: Path) -> list[float]:
    """The logged tokens per step (a filler's are not counted)."""
    return [row["tokens"] for row in read_metrics(run_dir / "metrics.jsonl")]


def losses(run_dir: Path) -> list[float]:
    """The logged losses (a skipped step logs none)."""
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]


def grad_norms(run_dir: Path) -> list[float]:
    """The logged global gradient norms, before clipping."""
    return [row["grad_norm"] for row in read_metrics(run_dir / "metrics.jsonl")]


# A validation loss after the last step, over 5 samples of the val split: 1 micro-batch in the reference; on 2 ranks
# with 2 per micro-batch, rank 1 has one fewer than rank 0 and runs a filler (ZeRO-3 would hang without it).
VALIDATE = ("validation.split=val", "validation.max_samples=5")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(run_dir, demo_root, "deepspeed=none", "stage.micro_batch_size=8", *VALIDATE)
    return run_dir


def validation_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["val_loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in row}


def test_reference_run_writes_a_complete_run_directory(reference: Path):
    assert (reference / "config.yaml").is_file() and (reference / "train.log").is_file()
    assert "27 samples, 4 steps per epoch of 8" in (reference / "train.log").read_text()
    rows = read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["tokens"] > 0 for r in rows)
    assert list(validation_losses(reference)) == [4]
    assert [r["lr"] for r in rows] == pytest.approx(COSINE_RATES)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert [p.name for p in (reference / "checkpoints").iterdir()] == ["step-00000004"]
    assert (reference / "loss_curve.png").stat().st_size > 0
    # The last checkpoint's trainables are the run's result.
    assert_same_trainables(trainables(reference), trainables(reference, "checkpoints/step-00000004/trainables"), 0)


def test_two_node_launch_matches_one_process(reference: Path, demo_root: Path, tmp_path: Path):
    """Two torchrun processes, one rank each, rendezvous over 127.0.0.1 as two nodes would (DDP, gloo)."""
    run_dir = tmp_path / "run"
    port = free_port()
    commands = [
        command(
            run_dir, demo_root, "deepspeed=none", *VALIDATE, nproc=1,
            launcher=("--nnodes", "2", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                      "--master_port", str(port)),
        )
        for node in (0, 1)
    ]  # fmt: skip
    processes = [
        subprocess.Popen(c, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
    for c, p, out in zip(commands, processes, outputs, strict=True):
        assert p.returncode == 0, describe(c, p.returncode, out)
    assert "(2 rank(s) on cpu)" in outputs[0]
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6)
    assert token_counts(run_dir) == token_counts(reference)
    assert validation_losses(run_dir) == pytest.approx(validation_losses(reference), rel=1e-6)
    # The global norm before clipping: DDP gradients off by the world size show here, not only through the clip.
    assert grad_norms(run_dir) == pytest.approx(grad_norms(reference), rel=1e-5)
    assert_same_trainables(trainables(run_dir), trainables(reference), ATOL_LAYOUTS)


def every_parameter_partitioned(directory: Path) -> Path:
    """configs/deepspeed/zero3.json with every parameter partitioned. By default ZeRO-3 keeps a parameter of fewer
    than 100,000 elements whole on every rank (``stage3_param_persistence_threshold``): every parameter of the
    tiny model, so nothing would be gathered, and a rank that skipped a forward would go unnoticed."""
    config = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = directory / "zero3_partitioned.json"
    path.write_text(json.dumps(config))
    return path


def small_buckets(directory: Path) -> Path:
    """configs/deepspeed/zero2_offload.json with gradient buckets of 1000 elements: the tiny model's gradients
    are reduced in many buckets during each backward, as a real model's are in the preset's 5e8, and each
    reduction must know whether its micro-step ends the step (with the optimizer offloaded, one that does not
    accumulates on the CPU; DeepSpeed learns it from hooks it only puts on a tensor, tuple, list or dict output:
    with our output a dataclass, micro-steps' gradients were lost)."""
    config = json.loads((ROOT / "configs" / "deepspeed" / "zero2_offload.json").read_text())
    config["zero_optimization"].update(reduce_bucket_size=1000, allgather_bucket_size=1000)
    path = directory / "zero2_offload_small_buckets.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("preset", ["zero2", "zero2_offload", "zero3"])
def test_deepspeed_matches_one_process(preset: str, reference: Path, demo_root: Path, tmp_path: Path):
    """ZeRO-3 (every parameter partitioned) gathers the projectors too: ranks whose micro-batch lacks a modality
    still run its projector (on a dummy segment), and a rank with fewer validation samples runs a filler, or the
    other rank would wait forever in a gather; saving the best trainables gathers on every rank too. ZeRO-2 with
    the optimizer offloaded runs with small gradient buckets (2 micro-steps a step)."""
    run_dir = tmp_path / "run"
    json_file = {"zero3": every_parameter_partitioned, "zero2_offload": small_buckets}.get(preset)
    custom = [f"deepspeed.json={json_file(tmp_path)}"] if json_file else []
    train(run_dir, demo_root, f"deepspeed={preset}", *custom, *VALIDATE, nproc=2)
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6)
    assert token_counts(run_dir) == token_counts(reference)
    assert validation_losses(run_dir) == pytest.approx(validation_losses(reference), rel=1e-6)
    assert grad_norms(run_dir) == pytest.approx(grad_norms(reference), rel=1e-5)
    assert_same_trainables(trainables(run_dir), trainables(reference), ATOL_LAYOUTS)
    # The one validation, after the last step, kept its trainables as the best: saved by every rank (gathered).
    assert_same_trainables(trainables(run_dir, "best/trainables"), trainables(run_dir), atol=0)
    if preset == "zero3":
        # The trainables of a partitioned run load into a fresh model built from the run's own config,
        # without DeepSpeed, and give the reference's weights.
        cfg = OmegaConf.load(run_dir / "config.yaml")
        model = build_multimodal_lm(
            instantiate(cfg.model.backbone),
            instantiate(cfg.model.tokenizer),
            encoders={m: instantiate(cfg.encoder[m]) for m in ("visual", "audio")},
            projector=OmegaConf.to_container(cfg.projector),
            adapter=instantiate(cfg.adapter),
            chat_template=cfg.model.chat_template,
        )
        load_trainables(model, run_dir / "trainables")
        loaded = trainables_state_dict(model)
        expected = load_file(reference / "trainables" / "trainables.safetensors")
        assert_same_trainables(loaded, expected, ATOL_LAYOUTS)


# Six steps with adapter dropout on: a resumed run must restore the RNG states as well as the optimizer, schedule
# and data position.
SIX_STEPS = ("deepspeed=none", "adapter.dropout=0.1", "stage.max_steps=6", "checkpoint.every_steps=2",
             "stage.schedule=cosine", "stage.warmup_ratio=0.2")  # fmt: skip


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Path:
    """The uninterrupted run that the killed and stopped ones must end at."""
    run_dir = tmp_path_factory.mktemp("six_steps") / "run"
    train(run_dir, demo_root, *SIX_STEPS)
    return run_dir


def test_killed_after_a_step_resumes_to_the_same_weights(six_steps: Path, demo_root: Path, tmp_path: Path):
    """A run killed mid-save keeps its previous checkpoint and resumes from it."""
    common, whole = SIX_STEPS, six_steps

    killed = tmp_path / "killed"
    train(killed, demo_root, *common, "fault.exit_after_step=3", expect=FAULT_EXIT_CODE)
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step-00000002"]
    output = train(killed, demo_root, *common, "resume=auto")
    assert "resumed from" in output and "step-00000002 at step 2" in output
    assert_same_trainables(trainables(killed), trainables(whole))
    assert losses(killed) == pytest.approx(losses(whole), rel=1e-6)  # steps 3 of the killed part superseded

    mid_save = tmp_path / "mid_save"
    train(mid_save, demo_root, *common, "fault.exit_during_save_at_step=4", expect=FAULT_EXIT_CODE)
    names = sorted(p.name for p in (mid_save / "checkpoints").iterdir())
    assert names == [".staging-step-00000004", "step-00000002"]  # the torn save is never read
    train(mid_save, demo_root, *common, "resume=auto")
    assert_same_trainables(trainables(mid_save), trainables(whole))
    assert sorted(p.name for p in (mid_save / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    # An intermediate checkpoint is a run directory to the evaluation tools: the run's config beside its trainables.
    step_4 = mid_save / "checkpoints" / "step-00000004"
    assert check_run_dir(step_4) == step_4
    assert (step_4 / "config.yaml").read_text() == (mid_save / "config.yaml").read_text()


def test_stopped_by_sigterm_saves_at_the_step_boundary_and_resumes_to_the_same_weights(
    six_steps: Path, demo_root: Path, tmp_path: Path
):
    """SIGTERM to the whole process group, its DataLoader workers included, from another process (as a
    scheduler or a terminal sends it) after step 3: the run checkpoints step 3, between its periodic saves, and
    exits as if killed by the signal. Workers killed by it would fail the main process mid-step; workers left
    running at exit would hang it (then the launch times out)."""
    common, whole, stopped = SIX_STEPS, six_steps, tmp_path / "stopped"
    signal_at_3 = ("fault.signal_after_step=3", "fault.signal_to=group", "loader.num_workers=2")
    output = train(stopped, demo_root, *common, *signal_at_3, expect=128 + signal.SIGTERM)
    assert "SIGTERM received" in output and "stopped after step 3 (SIGTERM)" in output
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert not (stopped / "trainables").exists()  # the run is not done
    output = train(stopped, demo_root, *common, "resume=auto")
    assert "step-00000003 at step 3" in output
    assert_same_trainables(trainables(stopped), trainables(whole))
    assert losses(stopped) == pytest.approx(losses(whole), rel=1e-6)


def mean_answer_loss(run_dir: Path, trainables_dir: Path, split: str) -> float:
    """The mean loss per answer token over ``split``, computed here sample by sample (a batch of one, no padding)
    from the model's logits, with the run's config and the given trainables loaded into a fresh model."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.data.builder.split = split
    dataset, model, collator, encoders = build_data_and_model(cfg, CPU)
    load_trainables(model, trainables_dir)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = encode_media(encoders, collator([dataset[i]]))
            logits, targets = model(batch).logits[0, :-1].double(), batch["labels"][0, 1:]
            answer = targets != -100
            total -= torch.log_softmax(logits[answer], dim=-1).gather(1, targets[answer, None]).sum().item()
            count += int(answer.sum())
    return total / count


def test_validation_loss_is_logged_and_changes_no_weight(six_steps: Path, demo_root: Path, tmp_path: Path):
    """validation.split=val after every 4 steps and the last. The run trains exactly the weights and logs exactly
    the losses of the same run without validation, adapter dropout on (validation draws no random number and
    gives the modules their modes back); each val_loss is the mean answer-token loss of that step's checkpoint,
    computed independently, over all the samples of the split (3 per micro-batch: the last one is short)."""
    run_dir = tmp_path / "run"
    validate = ("validation.split=val", "validation.every_steps=4", "validation.micro_batch_size=3")
    output = train(run_dir, demo_root, *SIX_STEPS, *validate, "loader.num_workers=1")
    assert "validation: 11 samples of split val, every 4 steps and after the last" in output
    assert losses(run_dir) == losses(six_steps)
    assert_same_trainables(trainables(run_dir), trainables(six_steps), atol=0)
    measured = validation_losses(run_dir)
    assert list(measured) == [4, 6]
    for step, val_loss in measured.items():
        expected = mean_answer_loss(run_dir, run_dir / f"checkpoints/step-{step:08d}/trainables", "val")
        assert val_loss == pytest.approx(expected, rel=1e-5)
    assert measured[6] < measured[4]


def test_deepspeed_resume_matches_uninterrupted(demo_root: Path, tmp_path: Path):
    """ZeRO-2 on 2 ranks, one run interrupted twice: stopped by a SIGTERM that only rank 1 receives, after step 1
    (rank 0 learns of it in the step's all-reduce, both save their shards of step 1's checkpoint); resumed from
    it, then killed after step 3; resumed from step 2's periodic checkpoint, it ends with the uninterrupted run's
    weights."""
    whole, run_dir = tmp_path / "whole", tmp_path / "run"
    every_2 = ("deepspeed=zero2", "checkpoint.every_steps=2")
    train(whole, demo_root, *every_2, nproc=2)

    output = train(run_dir, demo_root, *every_2, "fault.signal_after_step=1", nproc=2, expect=1)
    assert "[rank 1] WARNING moka_train.training.stop_signals: SIGTERM received" in output
    assert "stopped after step 1 (a stop signal on another rank)" in output  # rank 0's log
    assert output.count("stopped after step 1") == 1  # a run-wide warning, said by rank 0 alone
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    assert checkpoint.name == "step-00000001"
    assert len(list(checkpoint.glob("state/**/*optim_states.pt"))) == 2  # both ranks' optimizer shards
    # Each rank its own dropout stream: the random states saved by the two ranks differ (no dropout drew here).
    states = [torch.load(checkpoint / "rng" / f"rank-{r:05d}.pt", weights_only=True)["torch"] for r in (0, 1)]
    assert not torch.equal(*states)

    output = train(run_dir, demo_root, *every_2, "resume=auto", "fault.exit_after_step=3", nproc=2, expect=1)
    assert "step-00000001 at step 1" in output  # (torchrun reports the failed worker as 1)
    output = train(run_dir, demo_root, *every_2, "resume=auto", nproc=2)
    assert "step-00000002 at step 2" in output
    assert_same_trainables(trainables(run_dir), trainables(whole))


def test_resume_refuses_another_configuration_and_none_refuses_an_existing_run(reference: Path, demo_root: Path):
    output = train(reference, demo_root, "deepspeed=none", "resume=auto", "stage.lr=2e-3", expect=1)
    assert "another configuration" in output and "stage.lr: 0.001 -> 0.002" in output
    output = train(reference, demo_root, "deepspeed=none", expect=1)
    assert "already holds checkpoints" in output


def test_resume_refuses_training_data_changed_since_the_checkpoint(demo_root: Path, tmp_path: Path):
    """The same config over an annotation file that lost a question: the first 27 questions are other questions,
    so the resumed run would repeat and skip samples. The checkpoint records the data (27 samples and their ids);
    resume=auto refuses, naming it, where it used to continue silently."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    run_dir = tmp_path / "run"
    train(run_dir, root, "deepspeed=none", "stage.max_steps=2", "checkpoint.every_steps=1")
    meta = json.loads((run_dir / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["data"]["samples"] == 27 and meta["world_size"] == 1
    # (Resuming over the same data is what the kill-and-resume tests do.)
    annotations = root / "json_update" / "avqa-train.json"
    annotations.write_text(json.dumps(json.loads(annotations.read_text())[1:]))
    output = train(run_dir, root, "deepspeed=none", "stage.max_steps=2", "checkpoint.every_steps=1", "resume=auto",
                   expect=1)  # fmt: skip
    assert "was saved over other training data (27 samples" in output and "now 27 samples" in output


def test_a_stage1_run_initialised_from_a_stage2_run_takes_no_adapter(reference: Path, demo_root: Path, tmp_path: Path):
    """stage=pretrain trains no adapter (the config says adapter: null): from a stage-2 run's trainables it takes
    the projectors and added-token rows only. It used to inject and train the MokA adapter too, and save it."""
    stage1 = tmp_path / "stage1"
    output = train(stage1, demo_root, "deepspeed=none", "stage=pretrain", "stage.max_steps=1",
                   f"stage.init_from={reference}/trainables")  # fmt: skip
    assert "initialised from" in output and "'adapter'" not in output
    assert not (stage1 / "trainables" / "adapter").exists()
    (trains,) = [line for line in output.splitlines() if "trainable parameters:" in line]  # the log says what trains
    assert "projector.visual" in trains and "added_tokens 768 of 768" in trains and "adapter" not in trains


def test_a_run_directory_in_use_by_another_run_is_refused(demo_root: Path, tmp_path: Path):
    """A job submitted twice (both resume=auto): the second finds the first's lock on run_dir and stops, naming
    its holder, where the two used to remove each other's checkpoints in progress."""
    import fcntl

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w", encoding="utf-8") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7\n")
        held.flush()
        output = train(run_dir, demo_root, "deepspeed=none", "resume=auto", expect=1)
    assert f"{run_dir} is in use by another run (pid 4242 on node7)" in output
    assert not (run_dir / "checkpoints").exists()


def test_stage1_trainables_start_stage2(demo_root: Path, tmp_path: Path):
    stage1 = tmp_path / "stage1"
    train(stage1, demo_root, "deepspeed=none", "stage=pretrain", "stage.max_steps=2")
    assert not (stage1 / "trainables" / "adapter").exists()  # stage 1 trains no adapter
    projectors = load_file(stage1 / "trainables" / "trainables.safetensors")
    # A learning rate of 1e-30 leaves the loaded weights as they are: stage 2 starts from stage 1's.
    stage2 = tmp_path / "stage2"
    output = train(stage2, demo_root, "deepspeed=none", f"stage.init_from={stage1}/trainables",
                   "stage.max_steps=1", "stage.lr=1e-30")  # fmt: skip
    assert "initialised from" in output
    assert "; 1 optimizer steps (stage.max_steps; stage.epochs=3 is not used)" in output
    after = load_file(stage2 / "trainables" / "trainables.safetensors")
    assert_same_trainables(after, projectors, 1e-12)
    # Without init_from, the same stage 2 would start elsewhere (its model built here, as the run builds it).
    cfg = OmegaConf.load(stage2 / "config.yaml")
    cfg.stage.init_from = None
    torch.manual_seed(cfg.seed)
    _, model, _, _ = build_data_and_model(cfg, CPU)
    untouched = trainables_state_dict(model)
    assert max((untouched[k] - projectors[k]).abs().max().item() for k in projectors) > 1e-4


def test_nonfinite_loss_stops_naming_the_step(demo_root: Path, tmp_path: Path):
    output = train(tmp_path / "stop", demo_root, "deepspeed=none", "fault.nonfinite_loss_at_step=2", expect=1)
    assert "non-finite loss at step 2" in output and "samples on this rank: [" in output


def test_a_media_error_in_a_loader_worker_ends_the_run_naming_the_file(demo_root: Path, tmp_path: Path):
    """A video that fails to decode in a DataLoader worker ends the run with the error. The worker ignores the stop
    signals, and the error's traceback used to keep it alive, so the process hung at exit after printing it."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    first = json.loads((root / "json_update" / "avqa-train.json").read_text())[0]
    video = root / "MUSIC-AVQA-Videos" / f"{first['video_id']}.mp4"
    video.write_bytes(b"not a video")
    cmd = command(tmp_path / "run", root, "deepspeed=none", "loader.num_workers=1")
    returncode, output = run(cmd, timeout=90)  # ~9 s; it used to hang until killed
    assert returncode == 1 and str(video) in output, describe(cmd, returncode, output)


def test_probe_media_finds_an_unreadable_video_before_training(demo_root: Path, tmp_path: Path):
    """probe_media=true decodes every file before training: a corrupt video is an error naming it, or with
    data.builder.on_missing=skip its questions are left out and counted, as a missing file's would be."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    questions = json.loads((root / "json_update" / "avqa-train.json").read_text())
    broken = questions[0]["video_id"]
    video = root / "MUSIC-AVQA-Videos" / f"{broken}.mp4"
    video.write_bytes(b"not a video")
    on_it = sum(q["video_id"] == broken for q in questions)

    def records(*overrides: str) -> list:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(
                "train", overrides=["adapter=moka", f"data.builder.root={root}", "probe_media=true", *overrides]
            )
        return build_records(cfg)

    with pytest.raises(FileNotFoundError, match=f"probe_media: record .* cannot read {video}"):
        records()
    with pytest.warns(UserWarning, match=f"probe_media: skipped {on_it} of {len(questions)} records"):
        kept = records("data.builder.on_missing=skip")
    assert len(kept) == len(questions) - on_it


# Step 2's last micro-batch on rank 0 is made NaN, after the step's earlier micro-batches were back-propagated.
SKIP_AT_2 = ("fault.nonfinite_loss_at_step=2", "on_nonfinite=skip", "checkpoint.every_steps=1",
             "checkpoint.keep_last=4")  # fmt: skip


def assert_step_2_skipped(run_dir: Path) -> None:
    """No weight moves at step 2, the schedule still advances (the rates are reference's cosine), and training
    goes on after it."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "loss" not in rows[1]
    assert [r["lr"] for r in rows] == pytest.approx(COSINE_RATES)
    step = {s: trainables(run_dir, f"checkpoints/step-{s:08d}/trainables") for s in (1, 2, 4)}
    assert_same_trainables(step[2], step[1], 0)
    assert all(torch.isfinite(t).all() for t in step[4].values())
    assert max((step[4][k] - step[2][k]).abs().max().item() for k in step[2]) > 1e-5


@pytest.fixture(scope="module")
def skipped_reference(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Path:
    """One process, no clipping: the plain engine leaves the skipped step out altogether."""
    run_dir = tmp_path_factory.mktemp("skipped") / "run"
    train(run_dir, demo_root, "deepspeed=none", "stage.gradient_clipping=0", *SKIP_AT_2)
    assert_step_2_skipped(run_dir)
    return run_dir


@pytest.mark.parametrize("preset, nonfinite_gradients", [("zero2", False), ("zero3", True), ("none", True)])
def test_deepspeed_skips_a_nonfinite_step_like_one_process(
    preset: str, nonfinite_gradients: bool, skipped_reference: Path, demo_root: Path, tmp_path: Path
):
    """Two ranks, one with a non-finite loss. An infinite loss with finite gradients passes DeepSpeed's own
    overflow check, so DeepSpeed would apply them: our optimizer must be handed none. NaN gradients make
    DeepSpeed declare an overflow and then leave the schedule alone: it must advance anyway. DDP (``none``): no
    rank back-propagates the step (the skip is decided on all ranks' losses), after a synchronising forward. Each
    way the run goes on as the one-process reference (which never back-propagates the skipped step)."""
    run_dir = tmp_path / "run"
    train(run_dir, demo_root, f"deepspeed={preset}", f"fault.nonfinite_gradients={nonfinite_gradients}",
          "stage.gradient_clipping=0", *SKIP_AT_2, nproc=2)  # fmt: skip
    assert_step_2_skipped(run_dir)
    assert losses(run_dir) == pytest.approx(losses(skipped_reference), rel=1e-6)
    assert_same_trainables(trainables(run_dir), trainables(skipped_reference), ATOL_LAYOUTS)


# Step 2's gradients on rank 0 get a NaN in one parameter (its loss stays finite), after the step's earlier
# micro-batches were back-propagated.
GRADIENT_AT_2 = ("fault.nonfinite_gradient_at_step=2", "checkpoint.every_steps=1", "checkpoint.keep_last=4",
                 "stage.gradient_clipping=0")  # fmt: skip


@pytest.mark.parametrize("preset, nproc", [("none", 1), ("zero2", 2), ("zero3", 2)])
def test_nonfinite_gradients_behind_a_finite_loss_are_skipped(
    preset: str, nproc: int, skipped_reference: Path, demo_root: Path, tmp_path: Path
):
    """No clipping, so nothing else looks at the gradient norm. One process: the plain engine must not apply the
    NaN (it used to, and every later loss was NaN). ZeRO-2 on two ranks: the NaN sits in one rank's gradient
    partition; DeepSpeed's overflow check skips the update on both, and the schedule must still advance. ZeRO-3:
    the same with the poisoned parameter itself partitioned. Each way the run ends as the reference whose step 2
    was skipped for its loss, and step 2's finite loss is logged."""
    run_dir = tmp_path / "run"
    output = train(run_dir, demo_root, f"deepspeed={preset}", "on_nonfinite=skip", *GRADIENT_AT_2, nproc=nproc)
    assert "skipped the step: non-finite gradients at step 2 behind a finite loss" in output
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx(COSINE_RATES)
    assert math.isfinite(rows[1]["loss"]) and rows[1].get("grad_norm") is None  # inf or NaN: null in the file
    assert all(r["grad_norm"] > 0 for r in rows if r["step"] != 2)
    step = {s: trainables(run_dir, f"checkpoints/step-{s:08d}/trainables") for s in (1, 2)}
    assert_same_trainables(step[2], step[1], 0)
    reference_losses = losses(skipped_reference)
    assert [r["loss"] for r in rows if r["step"] != 2] == pytest.approx(reference_losses, rel=1e-6)
    assert_same_trainables(trainables(run_dir), trainables(skipped_reference), ATOL if nproc == 1 else ATOL_LAYOUTS)


def test_nonfinite_gradients_stop_every_rank_naming_the_step(demo_root: Path, tmp_path: Path):
    """on_nonfinite=error (the default), ZeRO-2 with clipping: both ranks stop after step 2, naming it, where
    DeepSpeed alone would skip the update and go on without a word."""
    output = train(tmp_path / "run", demo_root, "deepspeed=zero2", "fault.nonfinite_gradient_at_step=2", nproc=2,
                   expect=1)  # fmt: skip
    assert output.count("NonFiniteGradientsError: non-finite gradients at step 2 behind a finite loss") == 2, output
    assert "samples on this rank: [" in output


def test_bf16_with_gradient_checkpointing_trains_the_adapter(demo_root: Path, tmp_path: Path):
    """Autocast bf16 over fp32 weights, non-reentrant checkpointing: B starts at zero, so a non-zero B after two
    steps shows the gradients crossed the checkpointed layers."""
    run_dir = tmp_path / "run"
    train(run_dir, demo_root, "deepspeed=none", "stage.precision=bf16", "stage.gradient_checkpointing=true",
          "stage.max_steps=2")  # fmt: skip
    assert all(math.isfinite(loss) for loss in losses(run_dir))
    b = {k: v for k, v in trainables(run_dir).items() if "lora_B" in k}
    assert b and all(v.abs().max() > 0 for v in b.values())


SRUN_STUB = """#!/bin/bash
# srun on one node: drop srun's options and run the task (torchrun). As the real srun does, a SIGTERM to srun
# itself kills the task with SIGKILL; the task's pid is where the scancel stand-in finds the job's step.
while [ "$1" != torchrun ]; do shift; done
"$@" &
TASK=$!
echo "$TASK" > "$SLURM_STEP_PIDS"
trap 'echo "srun: forcing job termination" >&2; kill -KILL "$TASK"' TERM HUP
while true; do
    wait "$TASK" && exit 0 || STATUS=$?
    kill -0 "$TASK" 2>/dev/null || exit "$STATUS"
done
"""
SCANCEL_STUB = """#!/bin/bash
# scancel --signal=NAME <job>: the signal to the job's steps (the task), not to srun or the batch script.
echo "$@" >> "$SCANCEL_LOG"
kill -"${1#--signal=}" "$(cat "$SLURM_STEP_PIDS")"
"""
SCONTROL_STUB = """#!/bin/bash
case "$1" in
    show) echo 127.0.0.1 ;;
    *) echo "$@" >> "$SCONTROL_LOG" ;;
esac
"""


def test_the_slurm_script_stops_at_the_time_limit_warning_and_requeues(demo_root: Path, tmp_path: Path):
    """scripts/slurm/train.sbatch under stand-ins for srun, scancel and scontrol (no SLURM here), with the real
    torchrun and app: SLURM's USR1 warning reaches the script once step 1 is logged; the script has the job's step
    signalled (a SIGTERM to srun itself, as the script once sent, makes srun SIGKILL it: nothing saved); the run
    stops after a step with a checkpoint and the script requeues the job, whose second start (resume=auto)
    finishes the run from there."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN_STUB), ("scancel", SCANCEL_STUB), ("scontrol", SCONTROL_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = environment()
    env.update(
        PATH=os.pathsep.join([str(stubs), str(Path(sys.executable).parent), env["PATH"]]),
        SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2", SLURM_JOB_ID="4242",
        MASTER_PORT=str(free_port()), SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        SCANCEL_LOG=str(tmp_path / "scancel.log"), SLURM_STEP_PIDS=str(tmp_path / "step.pid"),
    )  # fmt: skip
    sbatch = ["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch")]
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", f"data.builder.root={demo_root}", "stage=instruct", "adapter=moka", *FAST,
            "deepspeed=none", "stage.max_steps=8"]  # fmt: skip

    refused = subprocess.run([*sbatch, *args[1:]], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "give run_dir=" in refused.stderr

    def start() -> subprocess.Popen:
        return subprocess.Popen([*sbatch, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    with open(tmp_path / "job.log", "w+") as log:
        job = start()
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1) and job.poll() is None:
            assert time.monotonic() < deadline, "step 1 was never logged"
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
        returncode = job.wait(timeout=180)
        log.seek(0)
        output = log.read()
        assert returncode != 0 and "time limit near" in output, output[-4000:]
        assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
        assert (tmp_path / "scancel.log").read_text() == "--signal=TERM 4242\n"
        assert "forcing job termination" not in output
        (checkpoint,) = (run_dir / "checkpoints").iterdir()
        step = int(checkpoint.name.removeprefix("step-"))
        assert 1 <= step < 8 and f"stopped after step {step} (SIGTERM)" in output, output[-4000:]

        requeued = start()
        assert requeued.wait(timeout=180) == 0
        log.seek(0)
        assert f"at step {step}" in log.read()
    assert [row["step"] for row in read_metrics(metrics)][-1] == 8 and (run_dir / "trainables").is_dir()


# A rate that overshoots: the validation loss (after every step) is lowest between the first and the last step.
OVERSHOOTING = (*SIX_STEPS, "stage.lr=0.1", "checkpoint.every_steps=1", "checkpoint.keep_last=6",
                "validation.split=val", "validation.every_steps=1", "validation.max_samples=4")  # fmt: skip


@pytest.fixture(scope="module")
def overshooting(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> tuple[Path, str]:
    """The uninterrupted run, every step's checkpoint kept, and its output."""
    run_dir = tmp_path_factory.mktemp("overshooting") / "run"
    return run_dir, train(run_dir, demo_root, *OVERSHOOTING)


def test_the_lowest_validation_loss_keeps_its_trainables_through_a_kill_and_resume(
    overshooting: tuple[Path, str], demo_root: Path, tmp_path: Path
):
    """validation.keep_best (on by default): <run_dir>/best holds the trainables of the step with the lowest
    val_loss, here not the last step, equal to that step's checkpoint. A run killed after the next step and
    resumed from the best step's checkpoint keeps the same step, weights and record: the resumed run compares its
    validation losses with the best so far that the checkpoint recorded."""
    whole, output = overshooting
    measured = validation_losses(whole)
    lowest = min(measured, key=measured.get)
    assert 1 < lowest < 6, f"this test needs the lowest validation loss between the first and last steps: {measured}"
    assert os.readlink(whole / "best") == f"best_steps/step-{lowest:08d}"
    assert_same_trainables(
        trainables(whole, "best/trainables"), trainables(whole, f"checkpoints/step-{lowest:08d}/trainables"), atol=0
    )
    assert check_run_dir(whole / "best") == whole / f"best_steps/step-{lowest:08d}"  # what the evaluation apps take
    record = json.loads((whole / "best" / "best.json").read_text())
    validation = {"split": "val", "max_samples": 4}
    assert record == {
        "step": lowest,
        "val_loss": measured[lowest],
        "validation": validation,
        "name": f"step-{lowest:08d}",
    }
    assert f"the lowest validation loss, {measured[lowest]:.4f}, was at step {lowest}" in output

    killed = tmp_path / "killed"
    train(killed, demo_root, *OVERSHOOTING, f"fault.exit_after_step={lowest + 1}", expect=FAULT_EXIT_CODE)
    output = train(killed, demo_root, *OVERSHOOTING, "resume=auto")
    assert f"step-{lowest:08d} at step {lowest}" in output
    assert os.readlink(killed / "best") == f"best_steps/step-{lowest:08d}"
    assert json.loads((killed / "best" / "best.json").read_text()) == record
    assert_same_trainables(trainables(killed, "best/trainables"), trainables(whole, "best/trainables"))


def test_a_stop_signal_on_a_validation_step_leaves_the_validation_to_the_resumed_run(
    overshooting: tuple[Path, str], demo_root: Path, tmp_path: Path
):
    """SIGTERM right after the best step: the run saves and stops without validating, and the resumed run
    validates that step first; a second SIGTERM during that validation stops it right after (with the step's
    checkpoint saved again, validated), and the next resume goes on from there. Every step's val_loss, and the
    best, are the uninterrupted run's."""
    whole, _ = overshooting
    measured = validation_losses(whole)
    lowest = min(measured, key=measured.get)
    stopped = tmp_path / "stopped"
    signal_at_lowest = (f"fault.signal_after_step={lowest}", "fault.signal_to=self")
    output = train(stopped, demo_root, *OVERSHOOTING, *signal_at_lowest, expect=128 + signal.SIGTERM)
    assert f"stopped after step {lowest} (SIGTERM)" in output
    assert lowest not in validation_losses(stopped)
    during = (f"fault.signal_during_validation_at_step={lowest}", "fault.signal_to=self")
    output = train(stopped, demo_root, *OVERSHOOTING, "resume=auto", *during, expect=128 + signal.SIGTERM)
    assert f"step {lowest}: its validation, skipped by the stop signal, runs now" in output
    assert f"stopped after step {lowest} (SIGTERM)" in output and lowest in validation_losses(stopped)
    output = train(stopped, demo_root, *OVERSHOOTING, "resume=auto")
    assert "skipped by the stop signal" not in output and f"at step {lowest}" in output
    assert validation_losses(stopped) == pytest.approx(measured, rel=1e-5)
    rows = read_metrics(stopped / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 7)) and all("loss" in row for row in rows)
    assert os.readlink(stopped / "best") == f"best_steps/step-{lowest:08d}"
    assert_same_trainables(trainables(stopped, "best/trainables"), trainables(whole, "best/trainables"))


@pytest.mark.parametrize("during", ["validation", "save"])
def test_a_stop_signal_during_a_validation_or_a_save_stops_right_after_it(
    overshooting: tuple[Path, str], demo_root: Path, tmp_path: Path, during: str
):
    """SIGTERM as step 2's validation starts (no checkpoint due at step 2), or while step 2's checkpoint is written
    (checkpoints every step): the run finishes what it was doing, saves step 2 and stops, where it used to train
    step 3 first. Resumed, it does not validate step 2 again, and ends with the uninterrupted run's losses, weights
    and best."""
    whole, _ = overshooting
    measured = validation_losses(whole)
    stopped = tmp_path / "stopped"
    settings = (*OVERSHOOTING, "checkpoint.every_steps=3") if during == "validation" else OVERSHOOTING
    fault = (f"fault.signal_during_{during}_at_step=2", "fault.signal_to=self")
    output = train(stopped, demo_root, *settings, *fault, expect=128 + signal.SIGTERM)
    assert "stopped after step 2 (SIGTERM)" in output
    assert [row["step"] for row in read_metrics(stopped / "metrics.jsonl")] == [1, 2]
    assert validation_losses(stopped) == pytest.approx({1: measured[1], 2: measured[2]}, rel=1e-5)
    saved = sorted(path.name for path in (stopped / "checkpoints").iterdir())
    assert saved == (["step-00000002"] if during == "validation" else ["step-00000001", "step-00000002"])
    if during == "save":
        return  # resuming is the same as after the validation's signal
    output = train(stopped, demo_root, *settings, "resume=auto")
    assert "skipped by the stop signal" not in output
    assert validation_losses(stopped) == pytest.approx(measured, rel=1e-5)
    assert os.readlink(stopped / "best") == os.readlink(whole / "best")
    assert_same_trainables(trainables(stopped), trainables(whole))


def patience_runs_out(val_losses: dict[int, float], patience: int) -> int | None:
    """The step after which ``patience`` validations in a row have had no loss below the lowest before them."""
    lowest, since = math.inf, 0
    for step, loss in sorted(val_losses.items()):
        lowest, since = (loss, 0) if loss < lowest else (lowest, since + 1)
        if since == patience:
            return step
    return None


def test_patience_stops_early_stays_stopped_and_a_null_patience_goes_on(
    overshooting: tuple[Path, str], demo_root: Path, tmp_path: Path
):
    """validation.patience=2 ends the run after the second validation in a row without a lower loss (computed
    here from the uninterrupted run's losses), with that step's checkpoint and trainables; resumed with the same
    patience it trains nothing; resumed with patience null it goes on to the uninterrupted run's end."""
    whole, _ = overshooting
    measured = validation_losses(whole)
    stop = patience_runs_out(measured, 2)
    assert stop is not None and stop < 6, f"this test needs a run that runs out of patience: {measured}"
    early = tmp_path / "early"
    output = train(early, demo_root, *OVERSHOOTING, "validation.patience=2")
    assert f"early stop after step {stop} of 6" in output
    assert list(validation_losses(early)) == list(range(1, stop + 1))
    assert_same_trainables(trainables(early), trainables(whole, f"checkpoints/step-{stop:08d}/trainables"))
    assert (early / f"checkpoints/step-{stop:08d}").is_dir()
    lowest_so_far = min(range(1, stop + 1), key=measured.get)
    assert os.readlink(early / "best") == f"best_steps/step-{lowest_so_far:08d}"

    output = train(early, demo_root, *OVERSHOOTING, "validation.patience=2", "resume=auto")
    assert f"the run stopped early at step {stop}" in output and "nothing to train" in output
    assert list(validation_losses(early)) == list(range(1, stop + 1))

    train(early, demo_root, *OVERSHOOTING, "resume=auto")  # patience null: every planned step
    assert list(validation_losses(early)) == list(range(1, 7))
    assert_same_trainables(trainables(early), trainables(whole))
    assert os.readlink(early / "best") == os.readlink(whole / "best")
