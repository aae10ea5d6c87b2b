"""Evaluating a trained run, in steps that scripts/evaluate.py runs once and scripts/partial_modality.py runs once
per adapter path:

1. ``check_settings``: the run directory and the scoring modes (bad settings are a ``UsageError``, raised before
   torch is imported);
2. ``load_run``: the run's model built from ``<run_dir>/config.yaml`` with the data named in the settings, its
   ``trainables`` loaded, and the dataset of the split to answer;
3. ``answer``: every question answered once over the ranks (rank r takes r, r + w, ...; no sampler padding),
   by greedy generation or, for SEED-Bench with ``seed_mode=likelihood``, by the choice with the lowest LM loss;
   inside ``adapter_path`` for partial-modality inference;
4. ``write_and_score`` (rank 0): ``predictions.jsonl`` and ``score.json`` in the output folder, with
   ``evaluation.json``, the settings that decided them (``evaluation_record``). ``claim_out_dir`` refuses, before
   step 3, a folder that holds the predictions of an evaluation with other settings: a SEED likelihood run with
   another prompt, music_avqa_moka after music_avqa, other generation settings would otherwise replace them.

Partial-modality inference keeps the adapter path only for the tokens of chosen modalities (every other token
sees the frozen W0 alone). Its outputs go to ``<run_dir>/eval/<benchmark>/<split>_adapter-<modalities>/`` with
an ``adapter_path.json`` beside the score, which tells scripts/make_tables.py that the folder is an analysis,
not a table cell.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from moka_train.evaluation.metrics import BENCHMARKS, MODES, MOKA_COMPAT, OFFICIAL, BenchmarkScore
from moka_train.evaluation.scoring import (
    ADAPTER_PATH_FILE,
    BOTH,
    EVALUATION_FILE,
    SCORE_FILE,
    UsageError,
    infer_benchmark,
    score_modes,
    write_scores,
)
from moka_train.modality import Modality

if TYPE_CHECKING:  # torch and the model stack load in seconds; the refusals of bad settings need not wait
    from moka_train.models.mllm import MultimodalLM
    from moka_train.training.distributed import DistributedContext

GENERATE, LIKELIHOOD = "generate", "likelihood"
SEED_MODES = (GENERATE, LIKELIHOOD)
# MokA's max_new_tokens per benchmark (benchmarks.md: the VisualText scripts and AudioVisualText inference_cut.py);
# 500 for the others (MokA has no script for MMAU or AIR-Bench).
MAX_NEW_TOKENS = {"mme": 50, "pope": 50, "mmbench": 5, "seed_bench": 500, "music_avqa": 500, "ave": 500}
DEFAULT_MAX_NEW_TOKENS = 500
PREDICTIONS_FILE = "predictions.jsonl"


# Training's config groups and sections: an evaluation app reads none of them from its own command line.
TRAINING_GROUPS = (
    "model", "adapter", "stage", "encoder", "projector", "deepspeed", "logger", "experiment", "checkpoint", "loader",
    "validation",
)  # fmt: skip


def check_settings(cfg: DictConfig) -> tuple[Path, list[str]]:
    """The run directory and the scoring modes; bad settings are a UsageError, raised before anything is built."""
    # configs/ is shared with training, so +adapter=lora composes, and was silently not read.
    unread = [key for key in TRAINING_GROUPS if key in cfg]
    if unread:
        raise UsageError(
            f"{', '.join(unread)}: the run's model comes from its <run_dir>/config.yaml, so these are not read "
            "(evaluate another run with run_dir=...; data=... and features=... are read)"
        )
    if cfg.seed_mode not in SEED_MODES:
        raise UsageError(f"seed_mode must be one of {SEED_MODES}, got {cfg.seed_mode!r}")
    if cfg.mode not in (*MODES, BOTH):
        raise UsageError(f"mode must be one of {(*MODES, BOTH)}, got {cfg.mode!r}")
    if cfg.seed_mode == LIKELIHOOD and cfg.mode == MOKA_COMPAT:
        raise UsageError("seed_mode=likelihood is scored by the official rule only (MokA generated answers)")
    if cfg.benchmark is not None and cfg.benchmark not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {cfg.benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if cfg.seed_mode != LIKELIHOOD:
        from moka_train.evaluation.generate import check_generation_settings

        try:
            check_generation_settings(OmegaConf.to_container(cfg.generation, resolve=True))
        except ValueError as error:
            raise UsageError(str(error)) from None
    adapter_modalities(cfg)
    run_dir = check_run_dir(cfg.run_dir)
    if cfg.mode == BOTH:
        modes = [OFFICIAL] if cfg.seed_mode == LIKELIHOOD else list(MODES)
    else:
        modes = [cfg.mode]
    return run_dir, modes


def check_run_dir(value: Any, key: str = "run_dir") -> Path:
    """A finished run of scripts/train.py: a folder with config.yaml and trainables/."""
    if value is None:
        raise UsageError(f"{key} is not set: name a run of scripts/train.py ({key}=runs/s2)")
    run_dir = Path(str(value)).expanduser().resolve()
    if not run_dir.is_dir():
        raise UsageError(f"{key} {run_dir}: no such folder (a run of scripts/train.py)")
    for needed, what in (("config.yaml", "file"), ("trainables", "folder")):
        path = run_dir / needed
        if not (path.is_file() if what == "file" else path.is_dir()):
            raise UsageError(
                f"{key} {run_dir} has no {needed} {what}: not a finished run of scripts/train.py (it writes "
                "config.yaml at the start and trainables/ at the end)"
            )
    return run_dir


def run_adapter_method(run_dir: Path, action: str) -> str:
    """The adapter method of a run checked by ``check_run_dir``; a UsageError for a run without one (stage 1),
    saying there is nothing to ``action``."""
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    if run_cfg.get("adapter") is None:
        raise UsageError(f"{run_dir} has no adapter (a stage-1 run): there is nothing to {action}")
    return str(run_cfg.adapter.method)


def one_line(error: BaseException) -> str:
    """An error's message on one line (Hydra's InstantiationException spans several, naming full_key)."""
    return " ".join(str(error).split())


def run_app(prog: str, app: Callable[[DictConfig], object], cfg: DictConfig) -> None:
    """An evaluation app's body: a UsageError, or a setting left without a value (run_dir, data.builder.root),
    is one ``<prog>: error: ...`` line on stderr and exit status 2, not a traceback."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        app(cfg)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except MissingMandatoryValue as error:
        print(f"{prog}: error: set {error.full_key}=... (it has no value)", file=sys.stderr)
        raise SystemExit(2) from None


def load_adapted_backbone(run_dir: Path) -> tuple[Any, DictConfig]:
    """``adapters.merge.load_run_backbone`` (the run's backbone carrying its trained adapter, and the run's
    config), with a checkpoint that does not load reported as a UsageError."""
    from hydra.errors import InstantiationException

    from moka_train.adapters.merge import load_run_backbone

    try:
        return load_run_backbone(run_dir)
    except (OSError, ValueError, InstantiationException) as error:  # Hydra wraps a checkpoint that fails to load
        raise UsageError(f"cannot load the run's backbone and adapter: {one_line(error)}") from None


def check_new_folder(out: Path, run_dir: Path) -> Path:
    """``out`` (resolved) for a tool's output folder: not a file, not a folder with files in it (another
    export's, which would be mixed with this one), not inside the run folder ``run_dir``; else a UsageError."""
    out = out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} already holds files: choose a new folder (nothing is overwritten)")
    if out == run_dir or run_dir in out.parents:
        raise UsageError(f"--out {out} is inside the run folder {run_dir}: write elsewhere")
    return out


def adapter_modalities(cfg: DictConfig) -> list[str] | None:
    """``cfg.adapter_modalities``: None (the whole adapter) or the modality names whose tokens keep the adapter
    path (``[]``: none, the frozen backbone with the trained projectors)."""
    value = cfg.get("adapter_modalities")
    if value is None:
        return None
    if not isinstance(value, (ListConfig, list, tuple)) or not all(isinstance(m, str) for m in value):
        raise UsageError(f"adapter_modalities must be a list of modality names (e.g. [text]) or null, got {value!r}")
    return parse_modalities(value, "adapter_modalities")


def parse_modalities(names: Iterable[str], key: str) -> list[str]:
    """Modality names as their sorted keys; a UsageError naming ``key`` for an unknown one."""
    try:
        return sorted({Modality.parse(m).key for m in names})
    except ValueError as error:
        raise UsageError(f"{key}: {error}") from None


def check_adapter_paths(modalities: Sequence[str], configured: Sequence[str], key: str) -> None:
    """A UsageError naming ``key`` when the adapter (of ``configured`` modalities) has no path for one of them."""
    unknown = [m for m in modalities if m not in configured]
    if unknown:
        raise UsageError(f"{key} names {unknown}, which the run's adapter has no path for: {list(configured)}")


def adapter_path_name(modalities: Sequence[str] | None) -> str:
    """``all`` (None), ``none`` ([]) or the modalities joined by ``+``: the folder suffix and the table's column."""
    if modalities is None:
        return "all"
    return "+".join(sorted(modalities)) if modalities else "none"


def run_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The run's config with this evaluation's data, split and features, set up for inference."""
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg.get("data") is not None:
        run_cfg.data = cfg.data
    split = cfg.split
    if split is None and cfg.get("data") is None:
        split = "test"  # the run's own data section names the split it trained on
    if split is not None:  # otherwise the named preset's split: the one its benchmark is scored on
        run_cfg.data.builder.split = split
    if cfg.features is not None:
        run_cfg.features = OmegaConf.merge(run_cfg.features, cfg.features)
    run_cfg.stage.init_from = None  # the trainables below hold everything trained
    run_cfg.stage.gradient_checkpointing = False
    run_cfg.probe_media = False
    # A training limit on sample length: every benchmark question is answered, whatever the run trained on (it
    # used to apply here, so a longer question failed the evaluation or, with on_overflow=drop, counted wrong).
    run_cfg.loader.max_length = None
    return run_cfg


@dataclass
class LoadedRun:
    """A trained run ready to answer a benchmark's questions."""

    run_dir: Path
    model: MultimodalLM
    dataset: Any  # MultimodalDataset, inference=True
    collator: Any  # MultimodalCollator, left padding
    benchmark: str
    split: str
    data: dict[str, Any]  # the resolved data section the questions come from (builder, prompt, media settings)


def load_run(cfg: DictConfig, run_dir: Path, ctx: DistributedContext) -> LoadedRun:
    """Build the run's model for the data of ``cfg`` and load its trainables, on ``ctx.device``."""
    from hydra.errors import InstantiationException

    from moka_train.models.trainables import load_trainables
    from moka_train.training.recipe import build_data_and_model

    run_cfg = run_config(cfg, run_dir)
    try:
        dataset, model, collator, encoders = build_data_and_model(run_cfg, ctx, inference=True)
    except InstantiationException as error:
        # A data root, split or checkpoint that is not there (the builders' and loaders' own errors name it):
        # one line, where Hydra's message spans four. Anything else keeps its traceback.
        if not isinstance(error.__cause__, (OSError, ValueError, KeyError)):
            raise
        raise UsageError(one_line(error)) from None
    benchmark = check_benchmark(cfg.benchmark, [{"id": record.id} for record in dataset.records])
    if cfg.seed_mode == LIKELIHOOD and benchmark != "seed_bench":
        raise UsageError(f"seed_mode=likelihood is SEED-Bench's rule; this data is {benchmark}")
    model.encoders.update(encoders)  # raw media (no feature cache): the model encodes them itself
    # The projectors of the modalities this data has: a run trained on audio-visual data answers image questions.
    load_trainables(model, run_dir / "trainables", modalities=sorted(model.projectors))
    model.to(ctx.device)
    split = str(run_cfg.data.builder.get("split", "all"))
    data = OmegaConf.to_container(run_cfg.data, resolve=True)
    return LoadedRun(run_dir, model, dataset, collator, benchmark, split, data)


def check_benchmark(named: str | None, records: Sequence[Mapping[str, Any]]) -> str:
    """The benchmark to score ``records`` (``{"id": ...}``) with: ``named``, or the one their ids name. A name
    the ids contradict is a UsageError now, before every question is answered (the scorer would refuse the
    predictions only then); ids that name no known benchmark leave the choice to ``named``."""
    if named is None:
        return infer_benchmark(records)
    try:
        inferred = infer_benchmark(records)
    except UsageError:
        return named
    if inferred != named:
        raise UsageError(f"benchmark={named}, but the data's ids are {inferred}'s (e.g. {records[0]['id']!r})")
    return named


def default_out_dir(cfg: DictConfig, run: LoadedRun, path_name: str | None = None) -> Path:
    """``<run_dir>/eval/<benchmark>/<split>`` (where scripts/make_tables.py looks), with ``_likelihood`` for SEED's
    likelihood rule and ``_adapter-<path_name>`` for partial-modality inference."""
    suffix = "_likelihood" if cfg.seed_mode == LIKELIHOOD else ""
    if path_name is not None:
        suffix += f"_adapter-{path_name}"
    return run.run_dir / "eval" / run.benchmark / f"{run.split}{suffix}"


@contextlib.contextmanager
def keep_adapter_path(model: MultimodalLM, modalities: Sequence[str] | None) -> Iterator[None]:
    """Partial-modality inference for the block: the adapter path only for tokens of ``modalities`` (None: all)."""
    if modalities is None:
        yield
        return
    from moka_train.adapters import active_modalities, carries_adapters, get_adapter_config

    if not carries_adapters(model.llm):
        raise UsageError("adapter_modalities limits the adapter path, but this run has no adapter (a stage-1 run)")
    check_adapter_paths(modalities, get_adapter_config(model.llm).modalities, "adapter_modalities")
    with active_modalities(model.llm, modalities):
        yield


def generation_settings(cfg: DictConfig, benchmark: str) -> dict[str, Any]:
    """The keyword arguments of ``MultimodalLM.generate``: ``cfg.generation`` with MokA's ``max_new_tokens`` for
    the benchmark where it is null."""
    settings = OmegaConf.to_container(cfg.generation, resolve=True)
    if settings.get("max_new_tokens") is None:
        settings["max_new_tokens"] = MAX_NEW_TOKENS.get(benchmark, DEFAULT_MAX_NEW_TOKENS)
    return settings


def evaluation_record(cfg: DictConfig, run: LoadedRun, modalities: Sequence[str] | None) -> dict[str, Any]:
    """What decides the predictions (``evaluation.json``): the trained run, the data section, the rule and its
    settings, the adapter path. Not what leaves the answers as they are: batch size, feature cache, progress."""
    record: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "benchmark": run.benchmark,
        "split": run.split,
        "data": run.data,
        "seed_mode": cfg.seed_mode,
        "adapter_modalities": None if modalities is None else list(modalities),
    }
    if cfg.seed_mode == LIKELIHOOD:
        record["likelihood_prompt"] = cfg.likelihood.prompt
    else:
        record["generation"] = generation_settings(cfg, run.benchmark)
    return json.loads(json.dumps(record, default=str))


def out_dir_conflict(out_dir: Path, record: dict[str, Any]) -> str | None:
    """Why ``out_dir`` may not take the predictions of the evaluation ``record`` describes, or None: it holds
    predictions or a score recorded with other settings, or with none recorded (written by scripts/score.py, or
    before evaluation.json was)."""
    if not any((out_dir / name).exists() for name in (PREDICTIONS_FILE, SCORE_FILE)):
        return None
    replace = f"pass out_dir=<another folder>, or remove {out_dir} to replace them"
    try:
        previous = json.loads((out_dir / EVALUATION_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{out_dir} holds predictions whose settings were not recorded (no {EVALUATION_FILE}); {replace}"
    except (OSError, ValueError) as error:
        return f"{out_dir / EVALUATION_FILE}: not readable ({error}); {replace}"
    from moka_train.training.checkpoints import describe_differences

    if not isinstance(previous, dict):
        return f"{out_dir / EVALUATION_FILE}: not an evaluation record (a JSON object); {replace}"
    differences = describe_differences(previous, record)
    if differences:
        return f"{out_dir} holds the predictions of an evaluation with other settings ({differences}); {replace}"
    return None


def claim_out_dir(out_dir: Path, record: dict[str, Any], ctx: DistributedContext) -> None:
    """A UsageError on every rank when ``out_dir`` holds another evaluation's predictions (``out_dir_conflict``),
    decided on rank 0, which writes there, before any question is answered."""
    from moka_train.training.distributed import broadcast_object

    conflict = broadcast_object(out_dir_conflict(out_dir, record) if ctx.is_main else None, ctx)
    if conflict is not None:
        raise UsageError(str(conflict))


def answer(cfg: DictConfig, run: LoadedRun, ctx: DistributedContext) -> list[dict[str, Any]]:
    """Every question of ``run.dataset`` answered once over the ranks; every rank gets all, in dataset order."""
    from moka_train.evaluation.generate import gather_predictions, generate_predictions
    from moka_train.evaluation.likelihood import likelihood_predictions

    shard = {"batch_size": cfg.batch_size, "rank": ctx.rank, "world_size": ctx.world_size, "progress": cfg.progress}
    if cfg.seed_mode == LIKELIHOOD:
        predictions = likelihood_predictions(
            run.model, run.dataset, run.collator, prompt=cfg.likelihood.prompt, **shard
        )
    else:
        settings = generation_settings(cfg, run.benchmark)
        predictions = generate_predictions(run.model, run.dataset, run.collator, **shard, **settings)
    return gather_predictions(predictions)


def write_and_score(
    predictions: list[dict[str, Any]],
    benchmark: str,
    modes: Sequence[str],
    out_dir: Path,
    record: dict[str, Any],
    adapter_path: tuple[str, Sequence[str] | None] | None = None,
    verbose: bool = True,
) -> dict[str, BenchmarkScore]:
    """Write ``evaluation.json`` (``record``, from ``evaluation_record``), ``predictions.jsonl`` and ``score.json``
    into ``out_dir``; returns ``{mode: score}``. For partial-modality inference ``adapter_path`` is (its name, its
    modalities or None for all), written to ``adapter_path.json`` beside them."""
    from moka_train.checkpoint_io import write_text_atomic
    from moka_train.evaluation.generate import write_predictions

    out_dir.mkdir(parents=True, exist_ok=True)
    # First: predictions never sit in a folder without the settings that decided them.
    text = json.dumps(record, indent=2) + "\n"
    write_text_atomic(out_dir / EVALUATION_FILE, text)
    path = write_predictions(out_dir / PREDICTIONS_FILE, predictions)
    if adapter_path is not None:
        # Written before the score: a score.json never sits in an analysis folder without its marker.
        name, modalities = adapter_path
        marker = {"name": name, "adapter_modalities": None if modalities is None else list(modalities)}
        (out_dir / ADAPTER_PATH_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    scores, skipped = score_modes(predictions, benchmark, modes)
    write_scores(scores, out_dir / SCORE_FILE)
    if verbose:
        print(f"wrote {len(predictions)} predictions to {path}")
        print("\n\n".join(score.format() for score in scores.values()))
        for note in skipped:
            print(f"\nnote: {note}")
        print(f"\nwrote {out_dir / SCORE_FILE}")
    return scores


def evaluate(cfg: DictConfig) -> dict[str, BenchmarkScore]:
    """Predict, write and score (configs/evaluate.yaml); returns ``{mode: score}`` on rank 0, ``{}`` elsewhere."""
    run_dir, modes = check_settings(cfg)
    modalities = adapter_modalities(cfg)
    from moka_train.training.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed(use_deepspeed=False)
    try:
        run = load_run(cfg, run_dir, ctx)
        path = None if modalities is None else (adapter_path_name(modalities), modalities)
        out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg, run, path and path[0])
        record = evaluation_record(cfg, run, modalities)
        claim_out_dir(out_dir, record, ctx)
        if ctx.is_main:
            where = "" if modalities is None else f", adapter path on {adapter_path_name(modalities)} tokens"
            print(
                f"evaluating {run_dir} on {run.benchmark} ({run.split}, {len(run.dataset)} questions, "
                f"{ctx.world_size} rank(s){where})"
            )
        with keep_adapter_path(run.model, modalities):
            predictions = answer(cfg, run, ctx)
        scores = write_and_score(predictions, run.benchmark, modes, out_dir, record, path) if ctx.is_main else {}
        ctx.barrier()  # the other ranks leave once the files are written
        return scores
    finally:
        shutdown_distributed()
