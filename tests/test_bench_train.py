"""scripts/bench_train.py: the quick run times the recipe's training step for none / lora / moka on the same
batches and reports sane numbers whose ratios are the measured values divided. No timing assertions:
timings are noisy."""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
from pathlib import Path

import pytest

from tests.helpers import loaded_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    with loaded_script(SCRIPT) as module:
        yield module


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    json_path = tmp_path_factory.mktemp("bench") / "bench_train.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report = bench.main(["--quick", "--json", str(json_path)])
    return report, stdout.getvalue(), json.loads(json_path.read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_reports_every_method(bench, quick_run):
    report, printed, written = quick_run
    assert written == json.loads(json.dumps(report))  # --json writes what main returns
    assert "saved_tensors_hooks" in printed and "threads" in printed
    assert set(written["configs"]) == {"tiny"}
    result = written["configs"]["tiny"]
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == set(bench.METHODS)
    table = printed.split("### tiny:")[1]
    for method, row in rows.items():
        assert f"| {method} |" in table
        assert _positive(row["time_ms"]) and _positive(row["tokens_per_s"]) and _positive(row["memory_bytes"])
        assert len(row["times_ms"]) == written["settings"]["steps"] and all(_positive(t) for t in row["times_ms"])
        assert _positive(row["saved_bytes"]) and _positive(row["optimizer_state_bytes"])
        assert row["memory_bytes"] == row["saved_bytes"] + row["trainable_bytes"] + row["optimizer_state_bytes"]
        assert all(math.isfinite(loss) for loss in row["losses"])
    assert (rows["none"]["stage"], rows["none"]["adapter"]) == ("pretrain", None)
    assert (rows["lora"]["stage"], rows["lora"]["adapter"]) == ("instruct", "lora")
    assert (rows["moka"]["stage"], rows["moka"]["adapter"]) == ("instruct", "moka")


def test_ratios_are_the_measured_values_divided(quick_run):
    _, _, written = quick_run
    result = written["configs"]["tiny"]
    rows = {row["method"]: row for row in result["rows"]}
    for row in rows.values():
        for reference in ("lora", "none"):
            assert row[f"time_vs_{reference}"] == pytest.approx(row["time_ms"] / rows[reference]["time_ms"])
            assert row[f"memory_vs_{reference}"] == pytest.approx(row["memory_bytes"] / rows[reference]["memory_bytes"])
        assert row["time_ms"] == pytest.approx(statistics.median(row["times_ms"]))
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / (sum(row["times_ms"]) / 1e3))
    targets = result["targets"]
    paired = [m / r for m, r in zip(rows["moka"]["times_ms"], rows["lora"]["times_ms"], strict=True)]
    assert targets["time"]["paired_median"] == pytest.approx(statistics.median(paired))
    for what, attribute in (("time", "time_vs_lora"), ("memory", "memory_vs_lora")):
        assert targets[what]["moka_vs_lora"] == pytest.approx(rows["moka"][attribute])
        assert targets[what]["met"] == (rows["moka"][attribute] <= targets[what]["target"])


def test_methods_differ_only_in_what_trains(quick_run):
    _, _, written = quick_run
    result = written["configs"]["tiny"]
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["lora"]["trainable_params"] > rows["none"]["trainable_params"]
    assert rows["moka"]["trainable_params"] > rows["none"]["trainable_params"]
    # The same batches in the same order: the same token count for every method.
    assert len({row["tokens"] for row in rows.values()}) == 1
    steps, warmup = written["settings"]["steps"], written["settings"]["warmup"]
    per_batch = result["tokens_per_batch"]
    assert rows["none"]["tokens"] == sum(per_batch[(warmup + r) % len(per_batch)] for r in range(steps))
    # The frozen backbone is the same model for every method.
    assert len({row["frozen_bytes"] for row in rows.values()}) == 1
    # fp32 trainables and AdamW's two moments of each (plus a one-element step count per tensor).
    for row in rows.values():
        assert row["trainable_bytes"] == 4 * row["trainable_params"]
        assert 2 * row["trainable_bytes"] <= row["optimizer_state_bytes"] <= 2.01 * row["trainable_bytes"]


def test_large_is_refused_on_the_cpu(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "large", "--device", "cpu"])
    assert "GPU only" in capsys.readouterr().err
