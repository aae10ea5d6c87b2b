"""The learning-rate schedule against its formula, and DeepSpeed presets completed from our config (batch
sizes, precision, clipping) with scheduler blocks refused, checked on a real engine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moka_train.training.deepspeed_config import CONFIG_DIR, load_deepspeed_config, resolve_deepspeed_config
from moka_train.training.schedule import build_lr_scheduler, warmup_steps_for

ROOT = Path(__file__).parents[1]
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def lrs(schedule: str, total: int, warmup_ratio: float, peak: float = 1e-3) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_lr_scheduler(optimizer, schedule, total, warmup_ratio)
    values = []
    for _ in range(total):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


def expected(schedule: str, step: int, total: int, warmup: int, peak: float = 1e-3) -> float:
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
    return peak * decay[schedule]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_follows_its_formula(schedule):
    total, ratio = 40, 0.1
    warmup = warmup_steps_for(total, ratio)
    assert warmup == 4
    for step, value in enumerate(lrs(schedule, total, ratio)):
        assert value == pytest.approx(expected(schedule, step, total, warmup), abs=1e-12), step


def test_warmup_rounding_and_bad_values():
    assert [warmup_steps_for(n, 0.03) for n in (1000, 37, 1404, 10)] == [30, 2, 43, 1]
    assert warmup_steps_for(50, 0.0) == 0
    with pytest.raises(ValueError, match="warmup_ratio must be in"):
        warmup_steps_for(10, 1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        build_lr_scheduler(optimizer, "warmup_decay", 10)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_completed_from_our_config(preset):
    resolved = resolve_deepspeed_config(
        load_deepspeed_config(preset),
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        world_size=8,
        precision="bf16",
        gradient_clipping=1.0,
    )
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"]) == (4, 2)
    assert resolved["train_batch_size"] == 64  # the paper's global batch 32 is 4 x 1 x 8
    # bf16: DeepSpeed's check for NaN gradients is asked for, whatever the installed version's default.
    assert resolved["bf16"] == {"enabled": True, "check_grad_overflow": True} and resolved["fp16"] == {"enabled": False}
    assert resolved["gradient_clipping"] == 1.0
    assert "scheduler" not in resolved and "optimizer" not in resolved
    assert resolved["zero_optimization"]["stage"] in (2, 3)


def test_conflicts_and_refused_blocks_name_the_key(tmp_path):
    base = load_deepspeed_config("zero2")
    settings = dict(
        micro_batch_size=4, gradient_accumulation_steps=1, world_size=2, precision="fp32", gradient_clipping=1.0
    )
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu is 8, but the training config gives 4"):
        resolve_deepspeed_config({**base, "train_micro_batch_size_per_gpu": 8}, **settings)
    with pytest.raises(ValueError, match=r"\[bf16\]: enabled is True, but the training config gives False"):
        resolve_deepspeed_config({**base, "bf16": {"enabled": True}}, **settings)
    scheduler = {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}
    with pytest.raises(ValueError, match="has a 'scheduler' block; remove it: the learning-rate schedule comes from"):
        resolve_deepspeed_config({**base, "scheduler": scheduler}, **settings)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_deepspeed_config(base, **{**settings, "precision": "int8"})
    with pytest.raises(FileNotFoundError, match=r"presets: \['zero2', 'zero2_offload', 'zero3'\]"):
        load_deepspeed_config("zero4")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_deepspeed_config(tmp_path / "bad.json")


def test_a_preset_without_the_source_checkout_says_so(tmp_path, monkeypatch):
    """After a non-editable install the package's configs/deepspeed is not there: the error says where presets
    come from rather than listing no presets."""
    from moka_train.training import deepspeed_config

    monkeypatch.setattr(deepspeed_config, "CONFIG_DIR", tmp_path / "site-packages" / "configs" / "deepspeed")
    with pytest.raises(FileNotFoundError, match=r"read from a source checkout .*deepspeed.json=<path"):
        deepspeed_config.load_deepspeed_config("zero2")


@pytest.mark.parametrize(
    "change, key",
    [
        ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage is 0"),
        ({"zero_optimization": None}, "zero_optimization.stage is 0"),  # DeepSpeed's default stage
        ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "zero_optimization.compute_grad_norm"),
        ({"bf16": {"check_grad_overflow": False}}, "bf16.check_grad_overflow is false"),
    ],
)
def test_settings_that_hide_nonfinite_gradients_are_refused(change, key):
    """on_nonfinite rests on DeepSpeed's own check of the gradient norm: a file that turns it off is refused."""
    settings = dict(
        micro_batch_size=4, gradient_accumulation_steps=1, world_size=2, precision="bf16", gradient_clipping=0.0
    )
    with pytest.raises(ValueError, match=rf"{key}.*lets NaN or inf gradients reach the weights unseen"):
        resolve_deepspeed_config({**load_deepspeed_config("zero2"), **change}, **settings)
    # Stated the way DeepSpeed's defaults are, the file is accepted.
    fine = {"zero_optimization": {"stage": 1, "compute_grad_norm": True}, "bf16": {"check_grad_overflow": True}}
    stage_1 = resolve_deepspeed_config({**load_deepspeed_config("zero2"), **fine}, **settings)
    assert stage_1["bf16"]["enabled"] and "data_types" not in stage_1  # fp32 accumulation for ZeRO-2/3 only


@pytest.fixture(scope="module")
def deepspeed_engine() -> dict[str, dict]:
    """What tests/distributed/deepspeed_engine.py's checks found, all in one run under torchrun (one process,
    CPU), keyed by ``check:argument``."""
    requests = ["schedule:zero2", "nonfinite:resolved", "nonfinite:unchecked", "accumulation:fp32", "accumulation:bf16"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        str(ROOT / "tests" / "distributed" / "deepspeed_engine.py"), *requests,
    ]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_engine_runs_our_schedule_and_clipping(deepspeed_engine: dict[str, dict]):
    """A real DeepSpeed engine keeps the scheduler we hand it and the clipping we resolved."""
    report = deepspeed_engine["schedule:zero2"]
    assert report["ours"] and report["clipping"] == 0.5
    # Steps 1..6 of a 10-step cosine schedule with 2 warmup steps, peak 1e-3 (the lr after each step).
    assert report["lrs"] == pytest.approx([expected("cosine", s, 10, 2) for s in range(1, 7)], abs=1e-12)


def test_deepspeed_bf16_never_applies_nan_gradients_unseen(deepspeed_engine: dict[str, dict]):
    """ZeRO-2 in bf16, a NaN in the bias's gradient behind a finite loss. As resolved, DeepSpeed's overflow check
    is on: the step is not applied and is reported. With the check off (DeepSpeed's default before its PR #8035,
    which an older install would have) DeepSpeed applies the NaN: our engine must stop the run rather than go on."""
    resolved = deepspeed_engine["nonfinite:resolved"]
    assert resolved == {**resolved, "check_grad_overflow": True, "applied": False, "nonfinite": True, "unchanged": True}
    assert math.isfinite(resolved["loss"])
    unchecked = deepspeed_engine["nonfinite:unchecked"]
    assert "DeepSpeed applied non-finite gradients" in unchecked["error"] and not unchecked["unchanged"]


def test_deepspeed_bf16_sums_micro_steps_in_fp32(deepspeed_engine: dict[str, dict]):
    """As resolved, ZeRO-2 in bf16 sums the micro-steps' gradients in fp32 (263 from 256 + 7 x 1), as the plain
    engine does; DeepSpeed's default, the weights' bf16, loses every 1 (256)."""
    assert deepspeed_engine["accumulation:fp32"] == {"grad_accum_dtype": "fp32", "norm": 263.0}
    assert deepspeed_engine["accumulation:bf16"] == {"grad_accum_dtype": "bf16", "norm": 256.0}


def test_fp32_stage_on_a_bf16_backbone_is_told():
    """stage.precision=fp32 (the official stage 1) keeps the trainables in fp32, but a frozen backbone loaded in
    bf16 (every 7B preset's model.backbone.dtype) still computes in bf16: the run says so."""
    from moka_train.training.recipe import frozen_precision_note
    from tests.helpers import tiny_llama

    llm = tiny_llama().requires_grad_(False)
    assert frozen_precision_note(llm, "fp32") is None  # an fp32 backbone: nothing to tell
    llm = llm.to(torch.bfloat16)
    note = frozen_precision_note(llm, "fp32")
    assert note and "frozen backbone is bfloat16" in note and "model.backbone.dtype=fp32" in note
    assert frozen_precision_note(llm, "bf16") is None  # bf16 asked for: as asked
