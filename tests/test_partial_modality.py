"""Partial-modality inference: the column names resolved by hand, the table's cells and deltas, and
scripts/partial_modality.py end to end on tiny MokA and LoRA runs, checked against independent paths (the plain
evaluation for ``all``, a model with every B zeroed for ``none``, ``evaluate.py adapter_modalities=`` for a
column); scripts/make_tables.py leaves the analysis folders out."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from moka_train.adapters import adapter_named_parameters
from moka_train.evaluation.generate import generate_predictions
from moka_train.evaluation.partial_modality import (
    AdapterPathError,
    PartialModalityTable,
    RunRow,
    check_path_name,
    resolve_path,
)
from moka_train.evaluation.runner import UsageError, load_run
from moka_train.evaluation.tables import find_runs
from moka_train.training.distributed import init_distributed, shutdown_distributed
from tests.helpers import loaded_script
from tests.launch import ROOT, run
from tests.trained_runs import compose_config

SCRIPT = ROOT / "scripts" / "partial_modality.py"
EVALUATE = ROOT / "scripts" / "evaluate.py"
FAST = ["generation.max_new_tokens=4", "batch_size=3", "progress=false"]
AV = ["text", "visual", "audio"]


# ------------------------------------------------------------------------------------------- column names
@pytest.mark.parametrize(
    ("name", "configured", "expected"),
    [
        ("all", AV, None),
        ("none", AV, []),
        ("media", AV, ["visual", "audio"]),
        ("media", ["text", "speech"], ["speech"]),
        ("text", AV, ["text"]),
        ("audio+text", AV, ["audio", "text"]),
        ("VISUAL", AV, ["visual"]),
    ],
)
def test_columns_resolve_to_the_modalities_that_keep_the_adapter(name, configured, expected):
    assert resolve_path(name, configured) == expected


def test_a_column_the_adapter_has_no_path_for_is_not_available():
    with pytest.raises(KeyError, match=r"no path for \['speech'\]"):
        resolve_path("speech", AV)
    with pytest.raises(KeyError, match="audio"):
        resolve_path("text+audio", ["text", "visual"])


@pytest.mark.parametrize("name", ["vidual", "text+", "media+text", ""])
def test_unknown_column_names_are_refused(name):
    with pytest.raises(AdapterPathError, match="is no modality"):
        check_path_name(name)


# ------------------------------------------------------------------------------------------------- table
def test_the_table_gives_each_cell_and_its_change_from_all(tmp_path):
    table = PartialModalityTable("music_avqa", "accuracy", "official", ["all", "text", "speech"])
    table.rows.append(RunRow("moka (a)", "/runs/a", {"all": 80.0, "text": 62.5, "speech": None}))
    table.rows.append(RunRow("lora (b)", "/runs/b", {"all": 70.0, "text": 71.25, "speech": None}))
    markdown = table.markdown()
    assert "| moka (a) | 80.00 | 62.50 (-17.50) | n/a |" in markdown
    assert "| lora (b) | 70.00 | 71.25 (+1.25) | n/a |" in markdown
    rows = list(csv.DictReader(io.StringIO(table.csv_text())))
    assert [(r["run"], r["adapter_path"], r["score"], r["delta_vs_all"]) for r in rows] == [
        ("moka (a)", "all", "80.0000", "0.0000"),
        ("moka (a)", "text", "62.5000", "-17.5000"),
        ("moka (a)", "speech", "", ""),
        ("lora (b)", "all", "70.0000", "0.0000"),
        ("lora (b)", "text", "71.2500", "1.2500"),
        ("lora (b)", "speech", "", ""),
    ]
    paths = table.write(tmp_path / "out")
    assert [p.name for p in paths] == ["partial_modality.md", "partial_modality.csv", "partial_modality.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- end to end
def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def analysed(demo_runs, tmp_path_factory):
    """The analysis of both runs with the columns all, text, media, speech (n/a), none."""
    table_dir = tmp_path_factory.mktemp("table")
    overrides = [
        f"run_dirs=[{demo_runs['moka']},{demo_runs['lora']}]", "adapter_paths=[all,text,media,speech,none]",
        f"table_dir={table_dir}", *FAST,
    ]  # fmt: skip
    with loaded_script(SCRIPT) as script:
        table = script.analyse(compose_config("partial_modality", overrides))
    return table, table_dir


def test_every_run_and_column_is_scored_and_written(demo_runs, analysed):
    table, table_dir = analysed
    assert [row.label for row in table.rows] == ["moka (moka)", "lora (lora)"]
    for row, run_dir in zip(table.rows, (demo_runs["moka"], demo_runs["lora"]), strict=True):
        assert row.scores["speech"] is None  # an audio-visual adapter has no speech path
        for column, modalities in (("all", None), ("text", ["text"]), ("media", ["visual", "audio"]), ("none", [])):
            folder = run_dir / "eval" / "music_avqa" / f"test_adapter-{column}"
            score = json.loads((folder / "score.json").read_text())["official"]
            assert row.scores[column] == score["main"]
            assert json.loads((folder / "adapter_path.json").read_text()) == {
                "name": column,
                "adapter_modalities": modalities,
            }
            assert len(_predictions(folder)) == score["counts"]["total"] == 6  # 2 test videos x 3 questions
        assert not (run_dir / "eval" / "music_avqa" / "test_adapter-speech").exists()
    markdown = (table_dir / "partial_modality.md").read_text()
    assert markdown == table.markdown()
    assert "| moka (moka) |" in markdown and "n/a" in markdown


def test_all_is_the_plain_evaluation_and_none_the_model_without_adapter(demo_runs, analysed, tmp_path):
    run_dir = demo_runs["moka"]
    columns = run_dir / "eval" / "music_avqa"
    with loaded_script(EVALUATE) as script:
        script.evaluate(compose_config("evaluate", [f"run_dir={run_dir}", f"out_dir={tmp_path / 'plain'}", *FAST]))
    answers = [p["prediction"] for p in _predictions(tmp_path / "plain")]
    assert answers == [p["prediction"] for p in _predictions(columns / "test_adapter-all")]

    # The adapter limited to no token is the model whose every B is zero.
    ctx = init_distributed(use_deepspeed=False)
    try:
        loaded = load_run(compose_config("evaluate", [f"run_dir={run_dir}", *FAST]), run_dir, ctx)
    finally:
        shutdown_distributed()
    with torch.no_grad():
        for name, parameter in adapter_named_parameters(loaded.model.llm):
            if ".lora_B." in name:
                parameter.zero_()
    zeroed = generate_predictions(loaded.model, loaded.dataset, loaded.collator, batch_size=3, max_new_tokens=4)
    none = [p["prediction"] for p in _predictions(columns / "test_adapter-none")]
    assert [p["prediction"] for p in zeroed] == none
    # ... and the trained adapter does change the answers, so the two comparisons above can fail.
    assert none != answers


def test_evaluate_limits_the_adapter_path_as_the_analysis_does(demo_runs, analysed):
    run_dir = demo_runs["lora"]
    with loaded_script(EVALUATE) as script:
        scores = script.evaluate(compose_config("evaluate", [f"run_dir={run_dir}", "adapter_modalities=[text]", *FAST]))
    folder = run_dir / "eval" / "music_avqa" / "test_adapter-text"  # the analysis's own folder, rewritten
    assert json.loads((folder / "adapter_path.json").read_text())["adapter_modalities"] == ["text"]
    table, _ = analysed
    assert scores["official"].main == table.rows[1].scores["text"]


def test_make_tables_leaves_the_analysis_folders_out(demo_runs, analysed):
    runs, ignored = find_runs(demo_runs["moka"], "official")
    partial = [i for i in ignored if "partial-modality" in i.reason]
    assert {i.folder.name for i in partial} >= {"test_adapter-all", "test_adapter-text", "test_adapter-none"}
    assert all(r.folder.name.startswith("test_adapter-") is False for r in runs)


def test_bad_settings_are_refused(demo_runs, tmp_path):
    moka = demo_runs["moka"]
    cases = {
        "is no modality": [f"run_dirs=[{moka}]", "adapter_paths=[all,vidual]"],
        "repeats a column": [f"run_dirs=[{moka}]", "adapter_paths=[text,text]"],
        "set per column": [f"run_dirs=[{moka}]", "adapter_modalities=[text]"],
        "names a run twice": [f"run_dirs=[{moka},{moka}]"],
        r"run_dirs\[1\] .* no such folder": [f"run_dirs=[{moka},{tmp_path / 'nothing'}]"],
    }
    with loaded_script(SCRIPT) as script:
        for message, overrides in cases.items():
            with pytest.raises(UsageError, match=message):
                script.analyse(compose_config("partial_modality", overrides))
    with loaded_script(EVALUATE) as script:
        with pytest.raises(UsageError, match="unknown modality 'vidual'"):
            script.evaluate(compose_config("evaluate", [f"run_dir={moka}", "adapter_modalities=[vidual]"]))
        with pytest.raises(UsageError, match=r"no path for: \['text', 'visual', 'audio'\]|has no path for"):
            script.evaluate(compose_config("evaluate", [f"run_dir={moka}", "adapter_modalities=[speech]", *FAST]))


def test_the_command_line_reports_a_bad_column_in_one_line(demo_runs):
    code, output = run([sys.executable, str(SCRIPT), f"run_dirs=[{demo_runs['moka']}]", "adapter_paths=[vidual]"])
    assert code == 2, output
    assert output.strip().startswith("partial_modality.py: error: adapter path 'vidual'"), output
    assert "Traceback" not in output
