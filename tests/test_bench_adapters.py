"""scripts/bench_adapters.py: the quick run reports every method with sane numbers, and its per-sample
loop baseline computes exactly our moka (official settings). No timing assertions: timings are noisy."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from tests.helpers import loaded_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_adapters.py"


@pytest.fixture(scope="module")
def bench():
    with loaded_script(SCRIPT) as module:
        yield module


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    import contextlib
    import io

    json_path = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report = bench.main(["--quick", "--json", str(json_path)])
    return report, stdout.getvalue(), json_path


def test_quick_run_reports_every_method(bench, quick_run):
    report, printed, json_path = quick_run
    assert "saved_tensors_hooks" in printed  # the output says which memory measure it used
    assert "torch" in printed and "threads" in printed
    assert set(report["cases"]) == {"linear", "stack"}
    for case in ("linear", "stack"):
        table = printed.split(f"### {case}:")[1].split("###")[0]
        rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
        for method in bench.METHODS:
            assert method in rows, f"{case} table lacks {method}"
            cells = [cell.strip() for cell in rows[method].split("|")[2:-1]]
            time_ms, ratio_base, ratio_peft, saved_mib, _ = (float(cell) for cell in cells)
            assert all(math.isfinite(v) and v > 0 for v in (time_ms, ratio_base, ratio_peft))
            assert math.isfinite(saved_mib) and saved_mib >= 0
        for row in report["cases"][case]["rows"]:
            assert row["time_ms"] > 0 and all(t > 0 for t in row["times_ms"])
            if row["method"] != "base":  # the frozen base on the CPU may save nothing at all
                assert row["saved_bytes"] > 0 and math.isfinite(row["memory_ratio_peft"])
                assert row["trainable_params"] > 0
    assert json.loads(json_path.read_text())["cases"]["linear"]["rows"][0]["method"] == "base"


def test_official_loop_equals_moka(bench):
    worst = bench.check_official_loop_matches_moka("cpu", seed=3, atol=1e-5)
    assert worst <= 1e-5


def test_equivalence_check_catches_a_different_computation(bench, monkeypatch):
    """The check is not vacuous: a loop baseline with another lambda must fail it."""
    original = bench.OfficialLoopMoka.__init__

    def half_lambda(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.blc_weight = 0.5

    monkeypatch.setattr(bench.OfficialLoopMoka, "__init__", half_lambda)
    with pytest.raises(AssertionError, match="differ"):
        bench.check_official_loop_matches_moka("cpu")


def test_ratios_are_medians_of_the_rounds_ratios(quick_run):
    """The methods take turns within each round: a ratio is the median of the per-round ratios, not a ratio of
    medians timed in separate blocks (between which this machine drifts)."""
    report, _, _ = quick_run
    repeats = report["settings"]["linear_repeats"]
    for case in ("linear", "stack"):
        rows = {row["method"]: row for row in report["cases"][case]["rows"]}
        for row in rows.values():
            assert len(row["times_ms"]) == repeats
            for reference, key in (("peft_lora", "ratio_peft"), ("base", "ratio_base")):
                per_round = [t / r for t, r in zip(row["times_ms"], rows[reference]["times_ms"], strict=True)]
                assert row[key] == pytest.approx(statistics.median(per_round))


def test_bf16_runs_under_autocast(bench, capsys):
    """As training does: the fp32 adapters take the bf16 activations without a copy up to fp32."""
    report = bench.main(["--quick", "--dtype", "bf16", "--case", "linear"])
    assert "bf16 under autocast" in capsys.readouterr().out
    assert all(math.isfinite(row["time_ms"]) for row in report["cases"]["linear"]["rows"])
    settings = bench.make_settings(bench.parse_args(["--quick", "--dtype", "bf16"]))
    with bench._autocast(settings):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_methods_share_the_frozen_weights(bench):
    """Every method is alive at once while they take turns: their copies hold base's frozen weights, not copies
    of them (16 copies of the 7B-width stack would not fit a GPU), and only the adapters train."""
    settings = bench.make_settings(bench.parse_args(["--quick"]))
    _, build, _ = bench.stack_workloads(settings)
    works = {method: build(method) for method in ("base", "peft_lora", "moka", "official_loop_moka")}
    frozen = [{p.data_ptr() for p in w.model.parameters() if not p.requires_grad} for w in works.values()]
    assert frozen[0] and all(ptrs == frozen[0] for ptrs in frozen[1:])
    assert all(any(p.requires_grad for p in w.model.parameters()) for m, w in works.items() if m != "base")
