"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory) -> dict[str, Path]:
    """The demo set (``data``) and a MokA and a LoRA run trained on it (``moka``, ``lora``); see
    tests/trained_runs.py. Built once per session, by the first test that asks."""
    from tests.trained_runs import train_run, write_demo_data

    data = write_demo_data(tmp_path_factory.mktemp("demo_data"))
    runs = tmp_path_factory.mktemp("runs")
    return {"data": data, **{adapter: train_run(data, runs / adapter, adapter) for adapter in ("moka", "lora")}}
