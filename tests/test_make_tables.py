"""scripts/make_tables.py and moka_train.evaluation.tables: the paper's numbers (checked against values transcribed
here from moka_reference.md §7), a folder of evaluated runs turned into Tables 1-4 (seeds averaged, missing cells
marked and counted, runs that are no cell listed, a valid PNG and a parsable CSV per table), the refusals of bad
input, and the experiment presets and the paper data kept in step.

Run configs are composed from the real experiment presets, as scripts/train.py saves them (resolved, with the
user's paths filled in), so a change in the presets that loses a run's cell fails here."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from moka_train.evaluation import tables
from moka_train.evaluation.metrics import BenchmarkScore
from moka_train.evaluation.scoring import ADAPTER_PATH_FILE
from moka_train.evaluation.tables import (
    BACKBONES,
    BENCHMARKS,
    TABLES,
    CellKey,
    NotACellError,
    Run,
    adapter_preset,
    build_tables,
    cell_key,
    experiment_for,
    load_paper_numbers,
)
from tests.helpers import loaded_script

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "make_tables.py"
CONFIG_DIR = ROOT / "configs"
EXPERIMENT_DIR = CONFIG_DIR / "experiment"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def script():
    with loaded_script(SCRIPT) as module:
        yield module


@pytest.fixture(scope="module")
def preset_config():
    """``preset_config(experiment, *overrides)``: the dict a training run of that preset saves as config.yaml."""
    GlobalHydra.instance().clear()  # another test module may have left Hydra initialised
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):

        def make(experiment: str, *overrides: str) -> dict[str, Any]:
            cfg = compose("train", overrides=[f"experiment={experiment}", *overrides])
            for key in missing_keys(cfg):  # the paths a user must supply (model, data, encoder checkpoints)
                OmegaConf.update(cfg, key, f"/user/{key}")
            return yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))

        yield make
    GlobalHydra.instance().clear()


def missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    found = []
    for key in node:
        if OmegaConf.is_missing(node, key):
            found.append(f"{prefix}{key}")
        elif not OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            found += missing_keys(node[key], f"{prefix}{key}.")
    return found


def write_run(folder: Path, config: dict[str, Any] | None, scores: dict[str, BenchmarkScore], at: str = "") -> Path:
    """A run folder: config.yaml (if given) and, in ``folder/at``, score.json as scripts/score.py writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (folder / at).mkdir(parents=True, exist_ok=True)
    text = json.dumps({mode: score.to_dict() for mode, score in scores.items()}, indent=2)
    (folder / at / "score.json").write_text(text, encoding="utf-8")
    return folder


def score(benchmark: str, main: float, mode: str = "official", main_name: str = "accuracy") -> BenchmarkScore:
    return BenchmarkScore(benchmark, mode, main_name, main, counts={"total": 10, "scored": 10, "unparsable": 0})


def both(benchmark: str, official: float, moka_compat: float) -> dict[str, BenchmarkScore]:
    return {"official": score(benchmark, official), "moka_compat": score(benchmark, moka_compat, "moka_compat")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, preset_config) -> Path:
    """Evaluated runs: two seeds of one cell, a run scored on two benchmarks, a MokA variant's row, a backbone
    named by model.name, and three runs that are no cell."""
    root = tmp_path_factory.mktemp("runs")
    ave_moka = preset_config("table1/llama2_ave")
    # Table 1, LLaMA2, AVE, MokA: two seeds (official 74.10 and 74.50; moka_compat 76.00 and 76.50).
    write_run(root / "seed42", ave_moka, both("ave", 74.10, 76.00))
    write_run(root / "nested" / "seed43", {**ave_moka, "seed": 43}, both("ave", 74.50, 76.50))
    # Table 2, LLaMA2, LoRA: one trained run, its evaluations below it; official scores only.
    visual_lora = root / "visual_lora"
    write_run(visual_lora, preset_config("table2/llama2_visual", "adapter=lora"), {"official": score("mme", 950.0)})
    write_run(visual_lora, None, {"official": score("pope", 71.0, main_name="accuracy (mean over splits)")}, "e/pope")
    # The official AV code's MokA: a row of its own under MokA (Tables 1 and 4).
    write_run(root / "official_av", preset_config("table1/llama2_ave", "adapter=moka_official_av"), both("ave", 75, 77))
    # Table 3, Qwen2, MMAU, MokA, the backbone named by model.name (stage1_dir moved elsewhere).
    named = preset_config("table3/qwen2_speech", "stage1_dir=/elsewhere/s1")
    write_run(root / "named", named, {"official": score("mmau", 55.0)})
    # No cell: an ablation of no table, Table 4's variant on a backbone Table 4 lacks, an AVE model on MUSIC-AVQA.
    write_run(root / "ablation", preset_config("table1/llama2_ave", "adapter=moka_no_ca"), both("ave", 70, 71))
    write_run(
        root / "qwen_tq", preset_config("table1/qwen2_music_avqa", "adapter=text_query"), both("music_avqa", 1, 2)
    )
    write_run(root / "cross", ave_moka, both("music_avqa", 60, 61), "eval_avqa")
    return root


@pytest.fixture(scope="module")
def official(script, runs, tmp_path_factory) -> tuple[Path, str]:
    """make_tables.py on ``runs`` (official mode): the output folder and what it printed."""
    out = tmp_path_factory.mktemp("tables")
    printed = io.StringIO()  # capsys is per test; this output is shared by the tests below
    with contextlib.redirect_stdout(printed):
        script.main([str(runs), "--out", str(out)])
    return out, printed.getvalue()


@pytest.fixture
def no_charts(monkeypatch):
    """Skip drawing: the charts are checked once, on the shared output above; drawing four more takes seconds."""
    monkeypatch.setattr(tables, "plot", lambda table, path: path.write_bytes(b""))


def read_csv(path: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as file:
        return {(r["table"], r["backbone"], r["benchmark"], r["adapter"]): r for r in csv.DictReader(file)}


# ------------------------------------------------------------------------------------------ the paper's numbers
def test_paper_numbers_match_moka_reference():
    paper = {(c.table, c.backbone, c.benchmark, c.method): c.value for c in load_paper_numbers()}
    # moka_reference.md §7, Table 1, row MokA, column LLaMA2: 75.71/74.68 (MUSIC-AVQA / AVE).
    assert paper[(1, "llama2", "music_avqa", "MokA")] == 75.71
    assert paper[(1, "llama2", "ave", "MokA")] == 74.68
    # Table 1, row LoRA, column Qwen2.5-VL: 73.00/71.38.
    assert paper[(1, "qwen2_5_vl", "music_avqa", "LoRA")] == 73.00
    # Table 1, row Uni+MM LoRA+Gate, column LLaMA3: "–" (not reported).
    assert (1, "llama3", "ave", "Uni+MM LoRA+Gate") not in paper
    # Table 2, row LoRA, column LLaMA2: 908.52/50.64/70.28/39.71 (MME-p / MMBench / POPE / SEED).
    assert paper[(2, "llama2", "mme", "LoRA")] == 908.52
    assert paper[(2, "llama2", "pope", "LoRA")] == 70.28
    # Table 2, row "+Gate" (Uni+MM LoRA+Gate), column Qwen2: 1201.49/57.91/81.72/57.18.
    assert paper[(2, "qwen2", "seed_bench", "Uni+MM LoRA+Gate")] == 57.18
    # Table 3, row MokA, column Qwen2: 55.26/49.17 (MMAU mini speech / AIR-Bench speech-en).
    assert paper[(3, "qwen2", "mmau", "MokA")] == 55.26
    # Table 3, row DoRA, column LLaMA2: 26.73/34.36.
    assert paper[(3, "llama2", "air_bench", "DoRA")] == 34.36
    # Table 4, row Cross-attention*: 74.94 / 72.59 / 955.18 / 51.25 / 72.94 / 39.91 (AVQA / AVE / MME / ...).
    assert paper[(4, "llama2", "mme", "Cross-attention*")] == 955.18
    assert paper[(4, "llama2", "seed_bench", "Cross-attention*")] == 39.91


def test_paper_numbers_cover_every_table_cell_and_name_our_adapters():
    cells = load_paper_numbers()  # refuses a table, backbone or benchmark outside TABLES (tested below)
    # Tables 1-3: nine methods by every backbone but LLaMA-3, which has three; Table 4: three variants.
    counts = {n: sum(c.table == n for c in cells) for n in TABLES}
    assert counts == {1: 9 * 3 * 2 + 3 * 2, 2: 9 * 2 * 4 + 3 * 4, 3: 9 * 2 * 2 + 3 * 2, 4: 3 * 6}
    for cell in cells:
        assert cell.backbone in BACKBONES and cell.benchmark in BENCHMARKS
        assert math.isfinite(cell.value) and cell.metric
    # Every column of every table has a number for MokA.
    for number, spec in TABLES.items():
        for backbone in spec.backbones:
            for benchmark in spec.benchmarks:
                assert any(
                    (c.table, c.backbone, c.benchmark, c.adapter) == (number, backbone, benchmark, "moka")
                    for c in cells
                )
    # One adapter per paper method, and each is a preset of configs/adapter.
    adapter_of = {c.method: c.adapter for c in cells}
    assert len(set(adapter_of.values())) == len(adapter_of)
    presets = {path.stem for path in (CONFIG_DIR / "adapter").glob("*.yaml")}
    assert set(adapter_of.values()) <= presets
    # Table 4's MokA row repeats the LLaMA-2 MokA numbers of Tables 1 and 2.
    value = {(c.table, c.backbone, c.benchmark, c.adapter): c.value for c in cells}
    for benchmark in TABLES[4].benchmarks:
        other = 1 if benchmark in TABLES[1].benchmarks else 2
        assert value[(4, "llama2", benchmark, "moka")] == value[(other, "llama2", benchmark, "moka")]


@pytest.mark.parametrize(
    "line, error",
    [
        ("5,llama2,ave,MokA,moka,accuracy,1.0", "no column .* in table 5"),
        ("4,qwen2,ave,MokA,moka,accuracy,1.0", r"no column \(qwen2, ave\) in table 4"),
        ("1,llama2,ave,MokA,moka,accuracy,high", "line 2: could not convert"),
    ],
)
def test_paper_numbers_refuse_a_cell_outside_the_tables(line, error):
    with pytest.raises(ValueError, match=error):
        load_paper_numbers("table,backbone,benchmark,method,adapter,metric,value\n" + line + "\n")


def test_every_experiment_preset_is_a_column_of_the_paper_data(preset_config):
    presets = {str(path.relative_to(EXPERIMENT_DIR).with_suffix("")) for path in EXPERIMENT_DIR.glob("table*/*.yaml")}
    cells = load_paper_numbers()
    # Both ways: every preset has paper cells, every paper cell is evaluated on a preset's model.
    assert {experiment_for(c.backbone, c.benchmark) for c in cells} == presets
    # And a run of each preset (its default method, MokA) is known as that cell from its config alone.
    for preset in sorted(presets):
        # The file name starts with the backbone key (the longest that fits: qwen2_5_vl_ave is not qwen2's).
        backbone = next(b for b in sorted(BACKBONES, key=len, reverse=True) if preset.split("/")[1].startswith(b))
        config = preset_config(preset)
        for benchmark in (b for b in BENCHMARKS if experiment_for(backbone, b) == preset):
            key = cell_key(config, benchmark)
            assert key == CellKey(backbone, benchmark, "moka"), preset
            _, ignored = build_tables(cells, [Run(Path(preset), Path("config.yaml"), key, 42, 1.0, "accuracy")])
            assert not ignored, (preset, ignored)


@pytest.mark.parametrize(
    "adapter", ["lora", "multi_lora", "uni_lora", "moka", "moka_official_av", "moka_official_vt", "naive", "text_query"]
)
def test_a_run_config_names_its_adapter_preset(preset_config, adapter):
    config = preset_config("table1/llama2_music_avqa", f"adapter={adapter}")
    assert adapter_preset(config["adapter"]) == adapter


@pytest.mark.parametrize(
    "experiment, overrides, reason",
    [
        ("stage1/llama2_visual", [], "trained no adapter"),
        # A config without model.name (saved before the model presets had one) falls back to stage1_dir.
        ("table2/llama2_visual", ["~model.name", "stage1_dir=/mine/first_stage"], "backbone is unknown"),
        ("table2/llama2_visual", ["model=tiny_llama"], "model.name 'tiny_llama' is no backbone"),
        ("table2/llama2_visual", ["adapter.attn_scale=rank"], "a MokA variant of no preset"),
        # The official VT code's keys on the paper's MokA: neither preset (it once counted as the paper's MokA).
        ("table2/llama2_visual", ["adapter.question_keys=after_media"], r"a MokA variant of no preset .*after_media"),
    ],
)
def test_a_config_that_names_no_cell_says_why(preset_config, experiment, overrides, reason):
    with pytest.raises(NotACellError, match=reason):
        cell_key(preset_config(experiment, *overrides), "mme")


def test_the_model_presets_name_lets_a_user_choose_the_stage1_dir(preset_config):
    # model.name (in every model preset) identifies the backbone, whatever folder the user trained stage 1 in.
    config = preset_config("table2/llama2_visual", "stage1_dir=/mine/first_stage")
    assert cell_key(config, "mme") == CellKey("llama2", "mme", "moka")


# ---------------------------------------------------------------------------------------------- the script
def test_tables_put_our_numbers_beside_the_papers(official, runs):
    out, printed = official
    table1 = read_csv(out / "table1.csv")
    cell = table1[("1", "llama2", "ave", "moka")]
    # Table 1, LLaMA2, MokA, AVE: paper 74.68; ours the mean of 74.10 and 74.50 = 74.30, sample std
    # sqrt((0.2^2 + 0.2^2) / 1) = 0.2828, delta 74.30 - 74.68 = -0.38.
    assert cell["paper"] == "74.68"
    assert float(cell["ours"]) == pytest.approx(74.30)
    assert float(cell["ours_std"]) == pytest.approx(0.2828, abs=1e-4)
    assert cell["ours_n"] == "2"
    assert float(cell["delta"]) == pytest.approx(-0.38)
    assert sorted(cell["seeds"].split(";")) == ["42", "43"] and cell["experiment"] == "table1/llama2_ave"
    assert sorted(cell["runs"].split(";")) == ["nested/seed43", "seed42"]
    # The same runs fill Table 4's MokA / AVE cell (paper 74.68, LLaMA-2 only).
    table4 = read_csv(out / "table4.csv")
    assert float(table4[("4", "llama2", "ave", "moka")]["ours"]) == pytest.approx(74.30)
    # The official AV code's MokA: its own row, compared with MokA's 74.68: 75 - 74.68 = +0.32.
    variant = table1[("1", "llama2", "ave", "moka_official_av")]
    assert variant["paper"] == "74.68" and float(variant["delta"]) == pytest.approx(0.32)
    # Table 2, LLaMA2, LoRA: MME paper 908.52, ours 950 (+41.48); POPE paper 70.28, ours 71 (+0.72).
    table2 = read_csv(out / "table2.csv")
    assert float(table2[("2", "llama2", "mme", "lora")]["delta"]) == pytest.approx(41.48)
    assert float(table2[("2", "llama2", "pope", "lora")]["delta"]) == pytest.approx(0.72)
    assert table2[("2", "llama2", "pope", "lora")]["our_metric"] == "accuracy (mean over splits)"
    # Table 3, Qwen2, MokA, MMAU (backbone from model.name): paper 55.26, ours 55 (-0.26).
    table3 = read_csv(out / "table3.csv")
    assert float(table3[("3", "qwen2", "mmau", "moka")]["delta"]) == pytest.approx(-0.26)
    # A cell with no run: marked, no delta; one the paper does not report (LLaMA-3 DoRA) is not listed.
    assert table1[("1", "qwen2", "music_avqa", "lora")]["ours"] == "—"
    assert table1[("1", "qwen2", "music_avqa", "lora")]["delta"] == "—"
    assert table1[("1", "qwen2", "music_avqa", "lora")]["ours_n"] == "0"
    assert ("1", "llama3", "ave", "dora") not in table1

    # The Markdown: the same numbers, missing cells marked, the counts.
    markdown = (out / "table1.md").read_text(encoding="utf-8")
    assert "| LLaMA2 | MokA | moka | 75.71 | — | — | 74.68 | 74.30 ± 0.28 (n=2) | -0.38 |" in markdown
    assert "| LLaMA2 | MokA (official AV code) | moka_official_av | 75.71 | — | — | 74.68 | 75.00 | +0.32 |" in markdown
    # Missing: every paper cell but the one filled (the variant row is extra): Table 1 reports 60, Table 2 84 (two
    # filled), Table 3 42 (one), Table 4 18 (one).
    assert "Missing: 59 of the 60 cells the paper reports." in markdown
    assert "Table 1: 59 of 60 paper cells missing" in printed
    assert "Table 2: 82 of 84 paper cells missing" in printed
    assert "Table 3: 41 of 42 paper cells missing" in printed
    assert "Table 4: 17 of 18 paper cells missing" in printed
    assert markdown in printed  # the tables are printed as written


def test_runs_that_are_no_cell_are_listed_with_the_reason(official):
    _, printed = official
    assert "6 evaluated run(s) in the tables, 3 ignored." in printed
    assert "ablation: adapter=moka_no_ca is no method of the paper's tables" in printed
    assert "qwen_tq: no table has adapter=text_query on Qwen2 MUSIC-AVQA" in printed
    assert "cross/eval_avqa: it trained on build_ave_moka, not on MUSIC-AVQA" in printed


@pytest.mark.parametrize("steps", ["best_steps", "checkpoints"])
def test_a_runs_best_or_intermediate_step_is_not_counted_as_another_seed(tmp_path, preset_config, steps):
    """evaluate.py run_dir=<run_dir>/best scores best_steps/step-N, and run_dir=<run_dir>/checkpoints/step-N an
    intermediate checkpoint; each holds a copy of the run's config.yaml: still the same trained run, so the tables
    count its last step's score and list the step's."""
    config = preset_config("table2/llama2_visual", "adapter=lora")
    run = write_run(tmp_path / "run", config, {"official": score("mme", 950.0)}, "eval/mme/test")
    write_run(run / steps / "step-00000003", config, {"official": score("mme", 990.0)}, "eval/mme/test")
    found, ignored = tables.find_runs(tmp_path, "official")
    assert [(r.folder, r.score) for r in found] == [(run / "eval/mme/test", 950.0)]
    assert [i.folder for i in ignored] == [run / steps / "step-00000003/eval/mme/test"]
    assert "a second mme score of the run" in ignored[0].reason
    from moka_train.training.best import STEPS_DIR
    from moka_train.training.checkpoints import CheckpointManager

    assert tables.BEST_STEPS_DIR == STEPS_DIR
    assert CheckpointManager(tmp_path, 1, 0, lambda: None).directory.name == tables.CHECKPOINTS_DIR


def test_seed_bench_scored_by_likelihood_is_no_cell_of_the_paper(tmp_path, preset_config):
    """Two seeds of one SEED-Bench cell, one evaluated with seed_mode=likelihood (its evaluation.json says so): the
    paper's column scores generated answers, so only the other is counted and the likelihood one is listed."""
    config = preset_config("table2/qwen2_visual")
    generated = write_run(tmp_path / "s42", config, {"official": score("seed_bench", 58.0)}, "eval/seed_bench/test")
    ranked = write_run(tmp_path / "s43", {**config, "seed": 43}, {"official": score("seed_bench", 64.0)}, "eval/s")
    (ranked / "eval/s" / "evaluation.json").write_text(json.dumps({"seed_mode": "likelihood"}), encoding="utf-8")
    (generated / "eval/seed_bench/test" / "evaluation.json").write_text(
        json.dumps({"seed_mode": "generate"}), encoding="utf-8"
    )
    found, ignored = tables.find_runs(tmp_path, "official")
    assert [(r.folder, r.score) for r in found] == [(generated / "eval/seed_bench/test", 58.0)]
    assert [(i.folder, i.reason) for i in ignored] == [
        (ranked / "eval/s", "SEED-Bench's likelihood rule (seed_mode=likelihood), not the paper's")
    ]
    (ranked / "eval/s" / "evaluation.json").write_text("[]", encoding="utf-8")
    with pytest.raises(tables.RunsError, match=r"evaluation.json: not an evaluation record"):
        tables.find_runs(tmp_path, "official")


def write_evaluation(folder: Path, builder: dict[str, Any]) -> None:
    """An evaluation.json as scripts/evaluate.py writes it, with the data builder's settings that matter here."""
    record = {"split": builder.get("split"), "data": {"builder": builder}, "seed_mode": "generate"}
    (folder / "evaluation.json").write_text(json.dumps(record), encoding="utf-8")


def test_a_score_of_other_questions_than_the_papers_is_no_cell(tmp_path, preset_config):
    """One trained run scored on POPE's adversarial split and on all three (the paper's column), on two of MME's
    subtasks, and on MMAU's sound and speech questions: only the POPE `all` score is counted. The adversarial
    folder sorts first, and was counted before the tables read evaluation.json."""
    config = preset_config("table2/llama2_visual", "adapter=lora")
    run = write_run(tmp_path / "run", config, {"official": score("pope", 66.0)}, "eval/pope/adversarial")
    write_evaluation(run / "eval/pope/adversarial", {"split": "adversarial", "dataset": "coco"})
    write_run(run, None, {"official": score("pope", 74.0)}, "eval/pope/all")
    write_evaluation(run / "eval/pope/all", {"split": "all", "dataset": "coco"})
    write_run(run, None, {"official": score("mme", 400.0)}, "eval/mme/test")
    write_evaluation(run / "eval/mme/test", {"split": "test", "subtasks": ["existence", "count"]})
    speech_config = preset_config("table3/qwen2_speech")
    speech = write_run(tmp_path / "speech", speech_config, {"official": score("mmau", 60.0)}, "eval/mmau/test-mini")
    write_evaluation(speech / "eval/mmau/test-mini", {"split": "test-mini", "tasks": ["sound", "speech"]})
    found, ignored = tables.find_runs(tmp_path, "official")
    assert [(r.folder, r.score) for r in found] == [(run / "eval/pope/all", 74.0)]
    assert {i.folder: i.reason for i in ignored} == {
        run / "eval/mme/test": "other questions than the paper's: subtasks=['existence', 'count'] (the paper's: None)",
        run / "eval/pope/adversarial": "other questions than the paper's: split='adversarial' (the paper's: 'all')",
        speech / "eval/mmau/test-mini": "other questions than the paper's: tasks=['sound', 'speech'] "
        "(the paper's: ['speech'])",
    }


def test_the_paper_questions_are_those_of_the_data_presets():
    """tables.PAPER_QUESTIONS, what the tables check evaluation.json against, is what each benchmark's data preset
    (the one its column is evaluated with) sets."""
    presets = {"music_avqa": ["music_avqa", "music_avqa_moka"], "ave": ["ave", "ave_moka"]}
    assert set(tables.PAPER_QUESTIONS) == set(BENCHMARKS)
    for benchmark, expected in tables.PAPER_QUESTIONS.items():
        for preset in presets.get(benchmark, [benchmark]):
            builder = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / f"{preset}.yaml").builder)
            assert {key: builder[key] for key in expected} == expected, preset


def test_a_score_that_counts_no_answer_is_no_cell(tmp_path, preset_config):
    """AIR-Bench's official rule leaves unparsable answers out: all of them unparsable gives main 0 over 0 scored,
    which is no result, not a 0 % cell."""
    config = preset_config("table3/qwen2_speech")
    empty = BenchmarkScore("air_bench", "official", "accuracy", 0.0, counts={"total": 50, "scored": 0})
    write_run(tmp_path / "run", config, {"official": empty}, "eval/air_bench/Foundation")
    found, ignored = tables.find_runs(tmp_path, "official")
    assert found == []
    assert [i.reason for i in ignored] == ["its 'official' score counts no answer (50 given, 0 scored)"]


def test_the_official_vt_codes_moka_has_a_row_under_moka(tmp_path, preset_config):
    """adapter=moka_official_vt (the official VT code's MokA) fills a row of its own under MokA in Table 2,
    compared with the paper's MokA: MME 1025.86 (moka_reference.md §7, Table 2, LLaMA2)."""
    config = preset_config("table2/llama2_visual", "adapter=moka_official_vt")
    write_run(tmp_path / "vt", config, {"official": score("mme", 1000.0)}, "eval/mme/test")
    found, ignored = tables.find_runs(tmp_path, "official")
    assert not ignored and [r.key for r in found] == [CellKey("llama2", "mme", "moka_official_vt")]
    built, not_placed = build_tables(load_paper_numbers(), found)
    assert not not_placed
    cell = built[1].cell("llama2", "moka_official_vt", "mme")
    assert cell.method == "MokA (official VT code)" and cell.paper == 1025.86
    assert cell.delta == pytest.approx(1000.0 - 1025.86)


def test_each_table_has_a_png_bar_chart(official):
    out, _ = official
    for number in TABLES:
        data = (out / f"table{number}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
        width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk follows the signature
        assert width > 500 and height > 300


def test_moka_compat_mode_uses_those_scores(script, runs, tmp_path, capsys, no_charts):
    script.main([str(runs), "--out", str(tmp_path), "--mode", "moka_compat"])
    printed = capsys.readouterr().out
    # The two seeds' moka_compat scores: (76.00 + 76.50) / 2 = 76.25.
    cell = read_csv(tmp_path / "table1.csv")[("1", "llama2", "ave", "moka")]
    assert float(cell["ours"]) == pytest.approx(76.25)
    assert "ours: `moka_compat` scores" in (tmp_path / "table1.md").read_text(encoding="utf-8")
    # Runs scored under official only are listed, not averaged in.
    assert "visual_lora: its score.json has no 'moka_compat' score (only official)" in printed
    assert "named: its score.json has no 'moka_compat' score (only official)" in printed


def test_default_output_folder_is_under_runs_dir(script, tmp_path, preset_config, capsys, no_charts):
    write_run(tmp_path / "run", preset_config("table2/qwen2_visual"), {"official": score("seed_bench", 58.0)})
    script.main([str(tmp_path)])
    assert read_csv(tmp_path / "tables" / "official" / "table2.csv")[("2", "qwen2", "seed_bench", "moka")]["ours"]
    assert f"wrote 14 files to {tmp_path / 'tables' / 'official'}" in capsys.readouterr().out


def test_of_a_runs_steps_alone_the_latest_counts_wherever_runs_dir_lies(tmp_path, preset_config):
    """Only intermediate checkpoints evaluated: the latest step is the run's cell (not the first in path order),
    also when RUNS_DIR itself lies in a folder named like a step folder (only the path below RUNS_DIR counts)."""
    config = preset_config("table2/llama2_visual", "adapter=lora")
    runs_dir = tmp_path / "checkpoints" / "runs"
    run = write_run(runs_dir / "run", config, {"official": score("mme", 950.0)}, "eval/mme/test")
    write_run(run / "best_steps" / "step-00000003", config, {"official": score("mme", 990.0)}, "eval/mme/test")
    found, _ = tables.find_runs(runs_dir, "official")
    assert [(r.folder, r.score) for r in found] == [(run / "eval/mme/test", 950.0)]
    steps_only = tmp_path / "steps_only"
    for step, value in ((100, 500.0), (900, 990.0), (40, 300.0)):
        write_run(steps_only / "run" / "checkpoints" / f"step-{step:08d}", config, {"official": score("mme", value)})
    (steps_only / "run" / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    found, ignored = tables.find_runs(steps_only, "official")
    assert [r.score for r in found] == [990.0] and len(ignored) == 2


def test_every_evaluated_run_is_listed_with_its_scored_answers(script, tmp_path, preset_config, no_charts):
    """runs.md / runs.csv list every score, paper cell or not: a paper cell (in the tables), the demo's own tiny
    MokA run and a stage-1 run (no cell, with the reason), and a headline over 1 scored answer of 50 given."""
    write_run(
        tmp_path / "paper", preset_config("table2/llama2_visual", "adapter=lora"), {"official": score("mme", 950.0)}
    )
    demo = preset_config("demo", "stage=instruct", "adapter=moka")
    write_run(tmp_path / "demo", demo, {"official": score("music_avqa", 99.5)}, "eval/music_avqa/test")
    few = BenchmarkScore("air_bench", "official", "accuracy", 100.0, counts={"total": 50, "scored": 1})
    write_run(tmp_path / "demo_speech", demo, {"official": few})
    write_run(tmp_path / "stage1", preset_config("demo", "stage=pretrain"), {"official": score("mme", 10.0)})
    partial = write_run(tmp_path / "partial", demo, {"official": score("music_avqa", 50.0)})
    (partial / ADAPTER_PATH_FILE).write_text("{}", encoding="utf-8")
    (partial / "score.json").write_text("{not json", encoding="utf-8")  # unread by the tables: no row, no error
    script.main([str(tmp_path)])
    with (tmp_path / "tables" / "official" / "runs.csv").open(encoding="utf-8", newline="") as file:
        rows = {row["run"]: row for row in csv.DictReader(file)}
    assert set(rows) == {"paper", "demo/eval/music_avqa/test", "demo_speech", "stage1"}
    assert rows["paper"] | {"in_tables": "yes"} == rows["paper"]
    assert (rows["paper"]["backbone"], rows["paper"]["method"], rows["paper"]["score"]) == (
        "llama2_7b_chat",
        "lora",
        "950.00",
    )
    demo_row = rows["demo/eval/music_avqa/test"]
    assert (demo_row["backbone"], demo_row["method"], demo_row["benchmark"]) == ("tiny_llama", "moka", "music_avqa")
    assert demo_row["in_tables"] not in ("yes", "?") and demo_row["score"] == "99.50"
    assert (rows["demo_speech"]["scored"], rows["demo_speech"]["total"]) == ("1", "50")
    assert rows["stage1"]["method"] == "none (stage 1)"
    markdown = (tmp_path / "tables" / "official" / "runs.md").read_text(encoding="utf-8")
    assert "| demo_speech | tiny_llama | moka | air_bench | accuracy | 100.00 | 1 | 50 |" in markdown


# ----------------------------------------------------------------------------------------------- bad input
def refused(script, capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        script.main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "content, error",
    [
        ("{not json", "not a readable JSON file"),
        ('{"official": {"benchmark": "ave", "main": "high"}}', "no string 'benchmark' and number 'main'"),
        ("[1, 2]", "not a score.json"),
    ],
)
def test_a_malformed_score_json_is_named(script, tmp_path, preset_config, capsys, content, error):
    write_run(tmp_path / "good", preset_config("table1/llama2_ave"), both("ave", 74, 75))
    bad = tmp_path / "bad" / "score.json"
    bad.parent.mkdir()
    bad.write_text(content, encoding="utf-8")
    message = refused(script, capsys, str(tmp_path), "--out", str(tmp_path / "out"))
    assert str(bad) in message and error in message
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_malformed_config_is_named(script, tmp_path, capsys):
    write_run(tmp_path / "run", None, both("ave", 74, 75))
    (tmp_path / "run" / "config.yaml").write_text("adapter: [unclosed\n", encoding="utf-8")
    message = refused(script, capsys, str(tmp_path))
    assert str(tmp_path / "run" / "config.yaml") in message and "not a readable YAML file" in message


def test_a_missing_or_empty_runs_dir_is_refused(script, tmp_path, capsys):
    assert "no such folder" in refused(script, capsys, str(tmp_path / "nowhere"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 1\n", encoding="utf-8")
    message = refused(script, capsys, str(tmp_path))
    # It says what it looked for: config.yaml from train.py and score.json from score.py.
    assert "no score.json found" in message and "config.yaml" in message and "scripts/score.py" in message
