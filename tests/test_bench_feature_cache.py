"""The cache benchmark runs end to end (tiny sizes); its numbers are for the README, not asserted here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_feature_cache.py"


def test_quick_run_reports_both_paths_on_the_same_batches(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_feature_cache", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--quick", "--steps", "1", "--json", str(tmp_path / "report.json")])
    on_the_fly_loss, cached_loss = report["loss_check"]
    assert cached_loss == pytest.approx(on_the_fly_loss, rel=1e-4)  # the two paths feed the same batches
    assert report["on_the_fly_s"] > 0 and report["cached_s"] > 0
    assert (tmp_path / "report.json").is_file()
