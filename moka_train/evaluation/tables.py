"""The paper's Tables 1-4 with our numbers beside them: the paper's numbers, evaluated runs, and the three
outputs per table (Markdown, CSV, a bar chart). ``scripts/make_tables.py`` is the command.

**The paper's numbers** are ``paper_numbers.csv`` beside this module, transcribed from moka_reference.md §7
(the paper's Tables 1-4, branch ``page`` of GeWu-Lab/MokA), one number per line::

    table,backbone,benchmark,method,adapter,metric,value
    1,llama2,music_avqa,LoRA,lora,accuracy (%),73.41

``backbone`` and ``benchmark`` are our keys (``BACKBONES``, ``BENCHMARKS``: the names of the experiment presets
and of the scorers), ``method`` the paper's own row name, ``adapter`` our ``adapter=`` preset for it,
``value`` the number as the paper prints it. A cell the paper leaves empty ("–": LLaMA-3 has only LoRA,
Multiple LoRA and MokA) has no line.

**A table cell** is (table, backbone, benchmark, method). A run fills every table that has its (backbone,
benchmark, adapter): a LLaMA-2 MokA run on AVE is in Table 1 and in Table 4.

**Our number** for a cell is the mean of its runs' ``main`` score (``BenchmarkScore``, in the paper's units)
under one scoring mode, with the sample standard deviation and the count when several runs (seeds) share it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from moka_train.evaluation.metrics.air_bench import SPEECH_TASKS
from moka_train.evaluation.scoring import ADAPTER_PATH_FILE, EVALUATION_FILE, SCORE_FILE

PAPER_NUMBERS = "paper_numbers.csv"
BEST_STEPS_DIR = "best_steps"  # training/best.py's STEPS_DIR, not imported: that would load torch for the tables
CHECKPOINTS_DIR = "checkpoints"  # training/checkpoints.py's; each step-N/ there holds the run's config.yaml too
STEP_FOLDERS = (BEST_STEPS_DIR, CHECKPOINTS_DIR)
PAPER_COLUMNS = ("table", "backbone", "benchmark", "method", "adapter", "metric", "value")
CONFIG_FILE = "config.yaml"  # scripts/train.py, the run's resolved config, in its run_dir
MISSING = "—"  # a cell the paper reports and we have no run for
NOT_REPORTED = "n/r"  # a cell the paper leaves empty


@dataclass(frozen=True)
class TableSpec:
    """A paper table's title and its column layout: backbones (column groups) by benchmarks, in the paper's
    order."""

    title: str
    backbones: tuple[str, ...]
    benchmarks: tuple[str, ...]


TABLES = {
    1: TableSpec("Table 1: audio-visual-text", ("llama2", "qwen2", "qwen2_5_vl", "llama3"), ("music_avqa", "ave")),
    2: TableSpec("Table 2: visual-text", ("llama2", "qwen2", "llama3"), ("mme", "mmbench", "pope", "seed_bench")),
    3: TableSpec("Table 3: speech-text", ("llama2", "qwen2", "llama3"), ("mmau", "air_bench")),
    4: TableSpec(
        "Table 4: interaction variants (LLaMA-2)",
        ("llama2",),
        ("music_avqa", "ave", "mme", "mmbench", "pope", "seed_bench"),
    ),
}

# Our backbone key (the prefix of the experiment presets' names, configs/experiment/table*/<backbone>_*.yaml)
# -> the paper's column header and our model preset (configs/model/<preset>.yaml).
BACKBONES = {
    "llama2": ("LLaMA2", "llama2_7b_chat"),
    "qwen2": ("Qwen2", "qwen2_7b_instruct"),
    "qwen2_5_vl": ("Qwen2.5-VL", "qwen2_5_vl_7b_instruct_lm"),
    "llama3": ("LLaMA3", "llama3_8b_instruct"),
}

AV = frozenset({"text", "visual", "audio"})
VT = frozenset({"text", "visual"})
ST = frozenset({"text", "speech"})


@dataclass(frozen=True)
class BenchmarkSpec:
    """How a benchmark column is produced: the paper's header, the experiment preset whose trained model it
    evaluates (``{backbone}`` filled in), the adapter modalities of that setting (the experiments set them:
    configs/experiment/_shared/*_instruct.yaml), and, where a setting trains one model per benchmark (Table 1),
    the dataset builders a run of this column trains on."""

    label: str
    experiment: str
    modalities: frozenset[str]
    trained_on: tuple[str, ...] = ()


# Keyed by the scorers' names (moka_train.evaluation.metrics.BENCHMARKS), as score.json names its benchmark.
BENCHMARKS = {
    "music_avqa": BenchmarkSpec(
        "MUSIC-AVQA", "table1/{backbone}_music_avqa", AV, ("build_music_avqa_moka", "build_music_avqa")
    ),
    "ave": BenchmarkSpec("AVE", "table1/{backbone}_ave", AV, ("build_ave_moka", "build_ave")),
    "mme": BenchmarkSpec("MME-p", "table2/{backbone}_visual", VT),
    "mmbench": BenchmarkSpec("MMBench", "table2/{backbone}_visual", VT),
    "pope": BenchmarkSpec("POPE", "table2/{backbone}_visual", VT),
    "seed_bench": BenchmarkSpec("SEED", "table2/{backbone}_visual", VT),
    "mmau": BenchmarkSpec("MMAU mini (speech)", "table3/{backbone}_speech", ST),
    "air_bench": BenchmarkSpec("AIR-Bench (speech-en)", "table3/{backbone}_speech", ST),
}

# The questions a paper column is scored on: the data builder's settings that choose them, as the benchmark's
# data preset (configs/data/<benchmark>.yaml, and MokA's own files' presets) sets them; test_make_tables keeps
# them in step. A run's evaluation.json records its data section, so a score of other questions (another split,
# some of MME's subtasks, MMAU's sound questions) is listed as ignored rather than filling the paper's cell.
PAPER_QUESTIONS: dict[str, dict[str, Any]] = {
    "music_avqa": {"split": "test"},
    "ave": {"split": "test"},
    "mme": {"split": "test", "subtasks": None},
    "mmbench": {"split": "DEV_EN_legacy", "circular_copies": True},
    "pope": {"split": "all"},
    "seed_bench": {"split": "test", "dimensions": None},
    "mmau": {"split": "test-mini", "tasks": ["speech"]},
    "air_bench": {"split": "Foundation", "tasks": list(SPEECH_TASKS)},
}

# Our presets that reproduce a paper row another way: their runs get a row of their own under that row (never
# averaged with it), compared with the same paper number, shown only when there are such runs.
VARIANTS = {
    "moka_official_av": ("moka", "MokA (official AV code)"),
    "moka_official_vt": ("moka", "MokA (official VT code)"),
}

# A resolved config keeps an adapter's fields, not its preset's name, and three presets share method "moka"
# (configs/adapter/moka.yaml, moka_official_av.yaml, moka_official_vt.yaml): the fields that tell them apart
# (attn_scale, scaling_position, question_keys) -> the preset. A config from before question_keys has "span".
MOKA_PRESETS = {
    ("question_tokens", "after_b", "span"): "moka",
    ("rank", "before_attention", "span"): "moka_official_av",
    ("rank", "after_b", "after_media"): "moka_official_vt",
}


def experiment_for(backbone: str, benchmark: str) -> str:
    """The experiment preset (``configs/experiment/<name>.yaml``) whose trained model a cell evaluates."""
    return BENCHMARKS[benchmark].experiment.format(backbone=backbone)


# ----------------------------------------------------------------------------------------- the paper's numbers
@dataclass(frozen=True)
class PaperCell:
    table: int
    backbone: str
    benchmark: str
    method: str
    adapter: str
    metric: str
    value: float


def load_paper_numbers(text: str | None = None) -> list[PaperCell]:
    """The paper's numbers (``paper_numbers.csv``, or ``text`` in its format), in file order. A line naming a
    table, backbone or benchmark outside ``TABLES``, a value that is not a number, a cell given twice or a method
    given two adapters is a ValueError naming the line."""
    if text is None:
        text = resources.files(__package__).joinpath(PAPER_NUMBERS).read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != PAPER_COLUMNS:
        raise ValueError(f"{PAPER_NUMBERS}: columns must be {','.join(PAPER_COLUMNS)}, got {reader.fieldnames}")
    cells: list[PaperCell] = []
    seen: set[tuple[int, str, str, str]] = set()
    adapter_of: dict[str, str] = {}
    for row in reader:
        where = f"{PAPER_NUMBERS} line {reader.line_num}"
        try:
            table, value = int(row["table"]), float(row["value"])
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        cell = PaperCell(table, row["backbone"], row["benchmark"], row["method"], row["adapter"], row["metric"], value)
        spec = TABLES.get(cell.table)
        if spec is None or cell.backbone not in spec.backbones or cell.benchmark not in spec.benchmarks:
            raise ValueError(f"{where}: no column ({cell.backbone}, {cell.benchmark}) in table {cell.table}")
        key = (cell.table, cell.backbone, cell.benchmark, cell.adapter)
        if key in seen:
            raise ValueError(f"{where}: the cell {key} is given twice")
        if adapter_of.setdefault(cell.method, cell.adapter) != cell.adapter:
            raise ValueError(f"{where}: {cell.method!r} is adapter={adapter_of[cell.method]} elsewhere")
        seen.add(key)
        cells.append(cell)
    return cells


# ------------------------------------------------------------------------------------------------ our runs
class RunsError(ValueError):
    """Unusable input (a missing folder, an unreadable score.json or config.yaml): one line naming it."""


class NotACellError(Exception):
    """A run that fills no table cell; the message says why (the run is listed as ignored)."""


@dataclass(frozen=True)
class CellKey:
    backbone: str
    benchmark: str
    adapter: str


@dataclass(frozen=True)
class Run:
    """One evaluated run: a score.json, the config.yaml of the run it scored, and the cell they name."""

    folder: Path  # the score.json's folder
    config: Path
    key: CellKey
    seed: int | None
    score: float
    metric: str  # BenchmarkScore.main_name


@dataclass(frozen=True)
class Ignored:
    folder: Path
    reason: str


def adapter_preset(adapter: Mapping[str, Any]) -> str:
    """Our ``adapter=`` preset name for a resolved adapter config (NotACellError for a MokA variant of no preset)."""
    method = adapter.get("method")
    if not isinstance(method, str):
        raise NotACellError("its config.yaml's adapter has no method")
    if method != "moka":
        return method
    settings = (adapter.get("attn_scale"), adapter.get("scaling_position"), adapter.get("question_keys", "span"))
    if settings not in MOKA_PRESETS:
        raise NotACellError(
            "a MokA variant of no preset (attn_scale={}, scaling_position={}, question_keys={})".format(*settings)
        )
    return MOKA_PRESETS[settings]


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; None where a part is missing or not a mapping."""
    node: Any = config
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def backbone_of(config: Mapping[str, Any]) -> str:
    """The backbone key of a resolved run config.

    The resolved config keeps no preset names, and the model presets differ only in a checkpoint path the user
    chooses. So: ``model.name`` when the config has one (a model preset's file name, or a backbone key), else the
    last part of ``stage1_dir``, which every stage-2 experiment preset sets to ``runs/stage1/<backbone>``."""
    name = _get(config, "model.name")
    if name is not None:
        for key, (_, preset) in BACKBONES.items():
            if name in (key, preset):
                return key
        raise NotACellError(f"model.name {name!r} is no backbone of the paper's tables")
    stage1_dir = config.get("stage1_dir")
    last = Path(str(stage1_dir)).name if stage1_dir else None
    if last in BACKBONES:
        return last
    raise NotACellError(
        f"its backbone is unknown: config.yaml has no model.name, and stage1_dir ({stage1_dir}) does not end in a "
        f"backbone ({', '.join(BACKBONES)}) as the experiment presets' runs/stage1/<backbone> does"
    )


def cell_key(config: Mapping[str, Any], benchmark: str) -> CellKey:
    """The cell a run of ``config`` scored on ``benchmark`` fills (whether a table has it is checked later);
    NotACellError says why it fills none."""
    if benchmark not in BENCHMARKS:
        raise NotACellError(f"benchmark {benchmark!r} is in no table")
    spec = BENCHMARKS[benchmark]
    adapter = config.get("adapter")
    if not isinstance(adapter, Mapping):
        raise NotACellError("it trained no adapter (a stage-1 run)")
    preset = adapter_preset(adapter)
    backbone = backbone_of(config)
    # A column is one setting: a model trained with other modalities (another table's setting) is not its cell.
    modalities = frozenset(adapter.get("modalities") or ())
    if modalities != spec.modalities:
        raise NotACellError(
            f"its adapter modalities {sorted(modalities)} are not {spec.label}'s setting {sorted(spec.modalities)}"
        )
    # Table 1 trains one model per benchmark: an AVE-trained model scored on MUSIC-AVQA is no cell.
    builder = str(_get(config, "data.builder._target_") or "").rsplit(".", 1)[-1]
    if spec.trained_on and builder not in spec.trained_on:
        raise NotACellError(
            f"it trained on {builder or 'unknown data'}, not on {spec.label} ({', '.join(spec.trained_on)})"
        )
    return CellKey(backbone, benchmark, preset)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunsError(f"{path}: not a readable JSON file ({error})") from None


def _load_config(path: Path) -> Mapping[str, Any]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise RunsError(f"{path}: not a readable YAML file ({error})") from None
    if not isinstance(config, Mapping):
        raise RunsError(f"{path}: not a run config (a YAML mapping), got {type(config).__name__}")
    return config


def read_score(path: Path, mode: str) -> tuple[str, float, str]:
    """(benchmark, main, main_name) of ``mode`` in a score.json (``{mode: BenchmarkScore.to_dict()}``). A file not
    in that format is a RunsError naming it; one with no score under ``mode`` a NotACellError."""
    scores = _load_json(path)
    if not isinstance(scores, dict) or not scores or not all(isinstance(s, dict) for s in scores.values()):
        raise RunsError(f"{path}: not a score.json ({{mode: score}}, as scripts/score.py writes)")
    score = scores.get(mode)
    if score is None:
        raise NotACellError(f"its {SCORE_FILE} has no {mode!r} score (only {', '.join(scores)})")
    benchmark, main, name = score.get("benchmark"), score.get("main"), score.get("main_name", "")
    if not isinstance(benchmark, str) or isinstance(main, bool) or not isinstance(main, (int, float)):
        raise RunsError(f"{path}: its {mode!r} score has no string 'benchmark' and number 'main'")
    if not math.isfinite(main):
        raise RunsError(f"{path}: its {mode!r} score's 'main' is {main}")
    counts = score.get("counts")
    if isinstance(counts, dict) and counts.get("scored") == 0:  # e.g. AIR-Bench drops unparsable answers
        raise NotACellError(f"its {mode!r} score counts no answer ({counts.get('total', '?')} given, 0 scored)")
    return benchmark, float(main), str(name)


def find_config(folder: Path, runs_dir: Path) -> Path | None:
    """The config.yaml of the run a score.json in ``folder`` belongs to: in that folder or the nearest one above
    it, up to ``runs_dir`` (so a run's evaluations may sit in subfolders of its run_dir)."""
    for candidate in (folder, *folder.parents):
        if (candidate / CONFIG_FILE).is_file():
            return candidate / CONFIG_FILE
        if candidate == runs_dir:
            return None
    return None


def step_order(relative: Path) -> tuple[bool, int, Path]:
    """Sort key of a score.json's path under RUNS_DIR: a run's own evaluation first, then its steps' (best or
    intermediate), the latest step first."""
    parts = relative.parts
    for i, name in enumerate(parts[:-1]):
        if name in STEP_FOLDERS and parts[i + 1].startswith("step-") and parts[i + 1][5:].isdigit():
            return True, -int(parts[i + 1][5:]), relative
    return False, 0, relative


def training_run(config_path: Path) -> Path:
    """The config.yaml of the training run ``config_path`` belongs to: a best step's folder
    (``<run_dir>/best_steps/step-N/``, validation.keep_best) and a checkpoint's (``<run_dir>/checkpoints/step-N/``)
    hold a copy of their run's config.yaml."""
    step_folder = config_path.parent
    if step_folder.parent.name in STEP_FOLDERS and (step_folder.parent.parent / CONFIG_FILE).is_file():
        return step_folder.parent.parent / CONFIG_FILE
    return config_path


def read_evaluation(folder: Path) -> Mapping[str, Any] | None:
    """The evaluation.json in ``folder`` (what scripts/evaluate.py records of the settings behind its
    predictions), or None where there is none (predictions scored from elsewhere: nothing to check)."""
    path = folder / EVALUATION_FILE
    if not path.is_file():
        return None
    record = _load_json(path)
    if not isinstance(record, dict):
        raise RunsError(f"{path}: not an evaluation record (a JSON object)")
    return record


def other_questions(evaluation: Mapping[str, Any] | None, benchmark: str) -> str | None:
    """Why the evaluation recorded in ``evaluation`` scored other questions than the paper's column (the
    builder settings of PAPER_QUESTIONS that differ), or None. A setting the record lacks is not checked."""
    builder = _get(evaluation or {}, "data.builder")
    if not isinstance(builder, Mapping):
        return None
    differing = [
        f"{key}={builder[key]!r} (the paper's: {expected!r})"
        for key, expected in PAPER_QUESTIONS.get(benchmark, {}).items()
        if key in builder and builder[key] != expected
    ]
    return f"other questions than the paper's: {', '.join(differing)}" if differing else None


def find_runs(runs_dir: Path, mode: str) -> tuple[list[Run], list[Ignored]]:
    """Every score.json under ``runs_dir`` as a run with its cell, or as ignored with the reason. RunsError: the
    folder is missing, holds no score.json, or a score.json / config.yaml cannot be read."""
    if not runs_dir.is_dir():
        raise RunsError(f"{runs_dir}: {'not a folder' if runs_dir.exists() else 'no such folder'}")
    # A run's last step before its best or an intermediate step (evaluate.py run_dir=<run_dir>/best, or
    # run_dir=<run_dir>/checkpoints/step-N), and the latest of those: the tables count the first seen.
    score_files = sorted(runs_dir.rglob(SCORE_FILE), key=lambda path: step_order(path.relative_to(runs_dir)))
    if not score_files:
        raise RunsError(
            f"{runs_dir}: no {SCORE_FILE} found; expected evaluated runs: a run folder with {CONFIG_FILE} (written "
            f"by scripts/train.py into its run_dir) and {SCORE_FILE} (written by scripts/score.py beside the "
            "run's predictions.jsonl) in that folder or below it"
        )
    runs: list[Run] = []
    ignored: list[Ignored] = []
    counted: dict[tuple[Path, str], Path] = {}
    for path in score_files:
        folder = path.parent
        if (folder / ADAPTER_PATH_FILE).is_file():
            ignored.append(Ignored(folder, "a partial-modality evaluation (adapter path on some modalities only)"))
            continue
        evaluation = read_evaluation(folder)
        if evaluation is not None and evaluation.get("seed_mode") == "likelihood":
            # the paper's SEED-Bench numbers score generated answers
            ignored.append(Ignored(folder, "SEED-Bench's likelihood rule (seed_mode=likelihood), not the paper's"))
            continue
        try:
            benchmark, main, metric = read_score(path, mode)
            reason = other_questions(evaluation, benchmark)
            if reason is not None:
                raise NotACellError(reason)
            config_path = find_config(folder, runs_dir)
            if config_path is None:
                raise NotACellError(f"no {CONFIG_FILE} in its folder or above it (up to {runs_dir})")
            config = _load_config(config_path)
            key = cell_key(config, benchmark)
        except NotACellError as reason:
            ignored.append(Ignored(folder, str(reason)))
            continue
        # One trained run scored twice on a benchmark is not two seeds: the first is counted, the other listed.
        first = counted.setdefault((training_run(config_path), benchmark), folder)
        if first != folder:
            ignored.append(Ignored(folder, f"a second {benchmark} score of the run {first} already counted"))
            continue
        seed = config.get("seed")
        runs.append(Run(folder, config_path, key, seed if isinstance(seed, int) else None, main, metric))
    return runs, ignored


# ------------------------------------------------------------------------------------------------- tables
@dataclass
class Cell:
    table: int
    backbone: str
    benchmark: str
    method: str  # the row's name: the paper's method, or one of VARIANTS
    adapter: str
    metric: str
    paper: float | None  # None: the paper reports none
    variant: bool = False  # a row of VARIANTS: compared with its base row's paper number, never "missing"
    runs: list[Run] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(run.score for run in self.runs) if self.runs else None

    @property
    def std(self) -> float | None:
        """The sample standard deviation over the runs (seeds); None for fewer than two."""
        return statistics.stdev(run.score for run in self.runs) if self.n > 1 else None

    @property
    def delta(self) -> float | None:
        mean = self.mean
        return None if mean is None or self.paper is None else mean - self.paper

    @property
    def missing(self) -> bool:
        """The paper reports it and we have no run (a variant row is extra: never missing)."""
        return self.paper is not None and not self.runs and not self.variant


@dataclass
class Table:
    number: int
    spec: TableSpec
    rows: list[tuple[str, str, str]]  # (backbone, method, adapter) shown: the paper or we have a number
    cells: dict[tuple[str, str, str], Cell]  # (backbone, adapter, benchmark) -> the cell

    def cell(self, backbone: str, adapter: str, benchmark: str) -> Cell:
        return self.cells[(backbone, adapter, benchmark)]

    @property
    def missing(self) -> list[Cell]:
        return [cell for cell in self.cells.values() if cell.missing]

    @property
    def reported(self) -> int:
        """How many cells the paper reports (its own rows only)."""
        return sum(cell.paper is not None and not cell.variant for cell in self.cells.values())


def empty_table(number: int, paper: Sequence[PaperCell]) -> Table:
    """Table ``number`` with no runs yet: a cell for each backbone, method and benchmark of its grid (the paper's
    methods in its order, each followed by its VARIANTS rows), with the paper's number where it has one."""
    spec = TABLES[number]
    mine = [cell for cell in paper if cell.table == number]
    values = {(c.backbone, c.adapter, c.benchmark): c.value for c in mine}
    metric_of = {c.benchmark: c.metric for c in mine}
    methods: list[tuple[str, str]] = []
    for method, adapter in dict.fromkeys((c.method, c.adapter) for c in mine):
        methods.append((method, adapter))
        methods += [(label, variant) for variant, (base, label) in VARIANTS.items() if base == adapter]
    cells = {}
    for backbone in spec.backbones:
        for method, adapter in methods:
            compared = VARIANTS.get(adapter, (adapter, ""))[0]  # a variant is compared with its base row
            for benchmark in spec.benchmarks:
                cells[(backbone, adapter, benchmark)] = Cell(
                    table=number, backbone=backbone, benchmark=benchmark, method=method, adapter=adapter,
                    metric=metric_of[benchmark], paper=values.get((backbone, compared, benchmark)),
                    variant=adapter in VARIANTS,
                )  # fmt: skip
    return Table(number, spec, [(b, m, a) for b in spec.backbones for m, a in methods], cells)


def build_tables(paper: Sequence[PaperCell], runs: Iterable[Run]) -> tuple[list[Table], list[Ignored]]:
    """Tables 1-4 with each run in every cell of its key; the runs no table has are returned as ignored."""
    tables = [empty_table(number, paper) for number in TABLES]
    ignored = []
    for run in runs:
        key = (run.key.backbone, run.key.adapter, run.key.benchmark)
        homes = [table.cells[key] for table in tables if key in table.cells]
        for cell in homes:
            cell.runs.append(run)
        if not homes:
            ignored.append(Ignored(run.folder, _why_no_table(run.key, paper)))
    for table in tables:
        # A row is shown where the paper or we have a number: LLaMA-3's LoRAMoE only once someone ran it, a
        # variant row only with runs.
        shown = {
            (c.backbone, c.adapter) for c in table.cells.values() if c.runs or (c.paper is not None and not c.variant)
        }
        table.rows = [row for row in table.rows if (row[0], row[2]) in shown]
    return tables, ignored


def _why_no_table(key: CellKey, paper: Sequence[PaperCell]) -> str:
    adapters = {cell.adapter for cell in paper} | set(VARIANTS)
    if key.adapter not in adapters:
        return f"adapter={key.adapter} is no method of the paper's tables ({', '.join(sorted(adapters))})"
    return f"no table has adapter={key.adapter} on {BACKBONES[key.backbone][0]} {BENCHMARKS[key.benchmark].label}"


# ----------------------------------------------------------------------------------------------- rendering
def _number(value: float | None, empty: str) -> str:
    return empty if value is None else f"{value:.2f}"


def _ours(cell: Cell) -> str:
    if not cell.runs:
        return MISSING
    return f"{cell.mean:.2f} ± {cell.std:.2f} (n={cell.n})" if cell.n > 1 else f"{cell.mean:.2f}"


def _delta(cell: Cell) -> str:
    return MISSING if cell.delta is None else f"{cell.delta:+.2f}"


def our_metrics(table: Table) -> dict[str, str]:
    """benchmark -> the metric names of our runs (``BenchmarkScore.main_name``), for the benchmarks with runs: the
    official rule's headline may differ from the paper's (MMBench's circular accuracy, POPE's mean over splits)."""
    names: dict[str, set[str]] = {}
    for cell in table.cells.values():
        names.setdefault(cell.benchmark, set()).update(run.metric for run in cell.runs if run.metric)
    return {benchmark: " / ".join(sorted(found)) for benchmark, found in names.items() if found}


PARTS = ("paper", "ours", "Δ")  # the three columns of each benchmark in the Markdown table


def to_markdown(table: Table, mode: str) -> str:
    """One Markdown table: a row per (backbone, method), paper / ours / Δ per benchmark, then the notes."""
    labels = [BENCHMARKS[b].label for b in table.spec.benchmarks]
    header = ["Backbone", "Method", "`adapter=`"] + [f"{label} {part}" for label in labels for part in PARTS]
    lines = [
        f"## {table.spec.title}: {' / '.join(labels)} (ours: `{mode}` scores)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * 3 + "---:|" * (len(header) - 3),
    ]
    for backbone, method, adapter in table.rows:
        # "Cross-attention*": a lone asterisk may start emphasis in some renderers.
        row = [BACKBONES[backbone][0], method.replace("*", "\\*"), adapter]
        for benchmark in table.spec.benchmarks:
            cell = table.cell(backbone, adapter, benchmark)
            row += [_number(cell.paper, NOT_REPORTED), _ours(cell), _delta(cell)]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Ours: the `{mode}` score of {SCORE_FILE}, mean ± sample std over n runs (seeds) where n > 1. "
        f"Δ = ours − paper. {MISSING}: no run of ours; {NOT_REPORTED}: the paper reports none.",
    ]
    metrics = our_metrics(table)
    if metrics:
        lines.append("Our metrics: " + "; ".join(f"{BENCHMARKS[b].label} {name}" for b, name in metrics.items()) + ".")
    lines.append(f"Missing: {len(table.missing)} of the {table.reported} cells the paper reports.")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (
    "table",
    "backbone",
    "benchmark",
    "method",
    "adapter",
    "experiment",
    "metric",
    "paper",
    "ours",
    "ours_std",
    "ours_n",
    "delta",
    "our_metric",
    "seeds",
    "runs",
)


def csv_rows(table: Table, runs_dir: Path) -> list[dict[str, str]]:
    """One row per shown cell (a row of ``table.rows`` by a benchmark). ``experiment`` and ``adapter`` are the
    command that fills the cell (``scripts/train.py experiment=<experiment> adapter=<adapter>``); ``runs`` its run
    folders relative to ``runs_dir``."""

    def exact(value: float | None, empty: str) -> str:
        return empty if value is None else f"{value:.4f}"

    rows = []
    for backbone, method, adapter in table.rows:
        for benchmark in table.spec.benchmarks:
            cell = table.cell(backbone, adapter, benchmark)
            rows.append(
                {
                    "table": str(table.number),
                    "backbone": backbone,
                    "benchmark": benchmark,
                    "method": method,
                    "adapter": adapter,
                    "experiment": experiment_for(backbone, benchmark),
                    "metric": cell.metric,
                    "paper": _number(cell.paper, NOT_REPORTED),
                    "ours": exact(cell.mean, MISSING),
                    "ours_std": exact(cell.std, ""),
                    "ours_n": str(cell.n),
                    "delta": exact(cell.delta, MISSING),
                    "our_metric": " / ".join(sorted({run.metric for run in cell.runs})),
                    "seeds": ";".join(str(run.seed) for run in cell.runs),
                    "runs": ";".join(_relative(run.folder, runs_dir) for run in cell.runs),
                }
            )
    return rows


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def write_csv(table: Table, path: Path, runs_dir: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(table, runs_dir))


def plot(table: Table, path: Path) -> None:
    """Grouped bars, paper against ours, per method: one panel per (backbone, benchmark), backbones as rows.
    Our bar carries the std over seeds as an error bar; a missing one is marked with MISSING."""
    # matplotlib's object API on the Agg canvas: no pyplot state, no display needed; imported here because it
    # takes about a second and only this function draws.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    backbones = [b for b in table.spec.backbones if any(row[0] == b for row in table.rows)]
    benchmarks = table.spec.benchmarks
    # Fixed margins in inches, not constrained layout (which draws the figure twice, doubling the time): room for
    # the title and legend above, and under each row of panels for its rotated method names.
    most = max(sum(row[0] == b for row in table.rows) for b in backbones)  # methods in the widest panel
    panel_width, panel, below, above = max(3.3, 0.42 * most + 0.6), 2.0, 1.15, 0.75
    width, height = panel_width * len(benchmarks), len(backbones) * (panel + below) + above
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    figure.subplots_adjust(
        left=0.5 / width, right=0.99, top=1 - above / height, bottom=below / height, wspace=0.3, hspace=below / panel
    )
    axes = figure.subplots(len(backbones), len(benchmarks), squeeze=False)
    bar = 0.4
    for r, backbone in enumerate(backbones):
        rows = [(method, adapter) for b, method, adapter in table.rows if b == backbone]
        for c, benchmark in enumerate(benchmarks):
            ax = axes[r][c]
            cells = [table.cell(backbone, adapter, benchmark) for _, adapter in rows]
            xs = range(len(cells))
            # A variant row repeats its base row's paper bar only where it has a bar of ours to compare.
            paper = [
                math.nan if cell.paper is None or (cell.variant and not cell.runs) else cell.paper for cell in cells
            ]
            ours = [cell.mean if cell.runs else math.nan for cell in cells]
            errors = [cell.std or 0.0 for cell in cells]
            ax.bar([x - bar / 2 for x in xs], paper, bar, color="0.65", label="paper")
            ax.bar([x + bar / 2 for x in xs], ours, bar, yerr=errors, color="tab:blue", capsize=2, label="ours")
            lows = [v for v in paper + ours if not math.isnan(v)]
            highs = [v for v in paper if not math.isnan(v)]
            highs += [v + e for v, e in zip(ours, errors, strict=True) if not math.isnan(v)]
            if lows:
                # The methods differ by a few points: a zero baseline would hide them (the axis says where it starts).
                bottom, top = 0.9 * min(lows), max(highs)
                ax.set_ylim(bottom, top + 0.08 * (top - bottom) + 1e-9)
                for x, cell in zip(xs, cells, strict=True):
                    if cell.missing:
                        ax.text(x + bar / 2, bottom, MISSING, ha="center", va="bottom", color="tab:blue")
            ax.set_xticks(list(xs), [method for method, _ in rows], rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{BACKBONES[backbone][0]} · {BENCHMARKS[benchmark].label}", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper right", ncols=2, fontsize=8)
    figure.suptitle(f"{table.spec.title} (a blue {MISSING}: no run of ours)", fontsize=11, x=0.02, ha="left")
    figure.savefig(path, dpi=90)


def write_outputs(tables: Sequence[Table], out_dir: Path, runs_dir: Path, mode: str) -> list[Path]:
    """``table{N}.md``, ``.csv`` and ``.png`` per table in ``out_dir`` (created); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        stem = out_dir / f"table{table.number}"
        markdown, table_csv, chart = stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".png")
        markdown.write_text(to_markdown(table, mode), encoding="utf-8")
        write_csv(table, table_csv, runs_dir)
        plot(table, chart)
        written += [markdown, table_csv, chart]
    return written


# -- every evaluated run, paper cell or not ------------------------------------------------------------
RUN_COLUMNS = ("run", "backbone", "method", "benchmark", "metric", "score", "scored", "total", "in_tables")


@dataclass
class RunScore:
    """One score.json's ``mode`` score with what its run trained: a row of runs.md / runs.csv."""

    folder: Path
    backbone: str
    method: str
    benchmark: str
    metric: str
    score: float
    scored: int | None
    total: int | None
    in_tables: str  # "yes", or why the paper's tables leave it out


def every_run(runs_dir: Path, mode: str, runs: Sequence[Run], ignored: Sequence[Ignored]) -> list[RunScore]:
    """Every score.json under ``runs_dir`` that has a ``mode`` score, paper cell or not (your own backbones, the
    demo's tiny runs, ablations), with the answers it scored out of those given: a headline over few scored
    answers (AIR-Bench drops the unparsable ones) shows as such. ``runs`` and ``ignored`` are ``find_runs``'s."""
    reasons = {run.folder: "yes" for run in runs} | {item.folder: item.reason for item in ignored}
    rows = []
    for path in sorted(runs_dir.rglob(SCORE_FILE)):
        try:  # files find_runs left unread (a partial-modality folder's): an unreadable one is no row
            scores = _load_json(path)
            score = scores.get(mode) if isinstance(scores, dict) else None
            if not isinstance(score, dict) or not isinstance(score.get("main"), (int, float)):
                continue
            config_path = find_config(path.parent, runs_dir)
            config = _load_config(config_path) if config_path is not None else {}
        except RunsError:
            continue
        adapter = config.get("adapter")
        counts = score.get("counts") if isinstance(score.get("counts"), dict) else {}
        rows.append(
            RunScore(
                folder=path.parent,
                backbone=str(_get(config, "model.name") or "?"),
                method=str(adapter.get("method")) if isinstance(adapter, Mapping) else "none (stage 1)",
                benchmark=str(score.get("benchmark", "?")),
                metric=str(score.get("main_name", "")),
                score=float(score["main"]),
                scored=counts.get("scored"),
                total=counts.get("total"),
                in_tables=reasons.get(path.parent, "?"),
            )
        )
    return rows


def _run_row(row: RunScore, runs_dir: Path) -> dict[str, Any]:
    return {
        "run": str(row.folder.relative_to(runs_dir)),
        "backbone": row.backbone,
        "method": row.method,
        "benchmark": row.benchmark,
        "metric": row.metric,
        "score": f"{row.score:.2f}",
        "scored": "" if row.scored is None else row.scored,
        "total": "" if row.total is None else row.total,
        "in_tables": row.in_tables,
    }


def runs_markdown(rows: Sequence[RunScore], runs_dir: Path, mode: str) -> str:
    lines = [
        f"### Every evaluated run ({mode})",
        "",
        "| " + " | ".join(RUN_COLUMNS) + " |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(value) for value in _run_row(row, runs_dir).values()) + " |")
    return "\n".join(lines) + "\n"


def write_runs(rows: Sequence[RunScore], out_dir: Path, runs_dir: Path, mode: str) -> list[Path]:
    """``runs.md`` and ``runs.csv`` in ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, table_csv = out_dir / "runs.md", out_dir / "runs.csv"
    markdown.write_text(runs_markdown(rows, runs_dir, mode), encoding="utf-8")
    with table_csv.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        writer.writerows(_run_row(row, runs_dir) for row in rows)
    return [markdown, table_csv]
