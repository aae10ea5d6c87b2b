"""The demo script end to end at smoke size: data written, stage 1 (stopped by a SIGTERM after its first step,
then continued by the same command), stage 2 from stage 1's trainables, greedy answers on the test videos scored
per question type (whether it learns needs the full-size demo: README)."""

from __future__ import annotations

import json
import signal
import sys

import pytest

from tests.launch import ROOT, describe, run

pytestmark = pytest.mark.distributed


def test_demo_runs_both_stages_and_scores_the_test_split(tmp_path):
    data, out = tmp_path / "demo_data", tmp_path / "demo"
    command = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--data", str(data), "--out", str(out),
               "--videos", "24", "--steps", "2", "--adapters", "moka", "logger.bar=false"]  # fmt: skip
    # Stopped after stage 1's first step (its checkpoint kept); the same command then continues from it.
    stopped = [*command, "fault.signal_after_step=1"]
    returncode, output = run(stopped, timeout=300)
    assert returncode == 128 + signal.SIGTERM, describe(stopped, returncode, output)
    assert "Run the same demo command again to continue" in output
    assert [p.name for p in (out / "stage1" / "checkpoints").iterdir()] == ["step-00000001"]
    returncode, output = run(command, timeout=300)
    assert returncode == 0, describe(command, returncode, output)
    assert "step-00000001 at step 1" in output
    assert "stage.init_from=" + str(out / "stage1" / "trainables") in output
    results = json.loads((out / "results.json").read_text())
    scores = results["stage2_moka"]
    test = [json.loads(line) for line in (out / "stage2_moka" / "predictions_test.jsonl").read_text().splitlines()]
    assert scores["overall"]["total"] == len(test) > 0
    assert scores["overall"]["correct"] == sum(p["prediction"].strip().lower() == p["answer"].lower() for p in test)
    assert (out / "stage1" / "trainables").is_dir() and (out / "stage2_moka" / "loss_curve.png").is_file()

    # Run again: the finished stages are kept, as they were trained with the same settings; with another setting
    # the demo refuses to reuse them, naming it, rather than reporting a run it did not train.
    returncode, output = run(command, timeout=300)
    assert returncode == 0 and output.count("trained with these settings: kept") == 2, output
    assert json.loads((out / "results.json").read_text()) == results
    changed = [*command, "stage.lr=0.5"]
    returncode, output = run(changed, timeout=300)
    assert returncode != 0 and f"{out / 'stage1'} holds a run with other settings (stage.lr: " in output, output
