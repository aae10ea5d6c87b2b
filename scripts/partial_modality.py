"""Partial-modality inference: how much of each run's score rides on the adapter path of each modality's tokens
(configs/partial_modality.yaml documents every setting):

    python scripts/partial_modality.py run_dirs=[runs/moka,runs/lora] data=music_avqa data.builder.root=/data/AVQA
    torchrun --nproc_per_node 8 scripts/partial_modality.py run_dirs=[runs/moka,runs/lora] ...
    python scripts/partial_modality.py run_dirs=[outputs/demo/stage2_moka,outputs/demo/stage2_lora]

Each run is built once; for every column of ``adapter_paths`` it answers the benchmark with the adapter path kept
only for the tokens of those modalities (``moka_train.adapters.active_modalities``: the others see the frozen W0
alone), writes ``predictions.jsonl``, ``score.json`` and ``adapter_path.json`` to
``<run_dir>/eval/<benchmark>/<split>_adapter-<column>/`` (scripts/make_tables.py leaves these out), and prints
one line. Rank 0 then writes ``<table_dir>/partial_modality.md``, ``.csv`` and ``.png`` and prints the table.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig

from moka_train.evaluation.partial_modality import (
    NOT_AVAILABLE,
    AdapterPathError,
    PartialModalityTable,
    RunRow,
    check_path_name,
    resolve_path,
)
from moka_train.evaluation.runner import (
    UsageError,
    answer,
    check_run_dir,
    check_settings,
    claim_out_dir,
    default_out_dir,
    evaluation_record,
    keep_adapter_path,
    load_run,
    run_app,
    write_and_score,
)


def check_analysis_settings(cfg: DictConfig) -> tuple[list[Path], list[str], list[str]]:
    """The run directories, the columns and the scoring modes; a UsageError before anything is built."""
    if not isinstance(cfg.run_dirs, (ListConfig, list)) or not cfg.run_dirs:
        raise UsageError(
            f"run_dirs must be a non-empty list of runs (run_dirs=[runs/moka,runs/lora]), got {cfg.run_dirs}"
        )
    if cfg.get("adapter_modalities") is not None:
        raise UsageError("adapter_modalities is set per column here: list the columns in adapter_paths instead")
    if cfg.out_dir is not None:
        raise UsageError("out_dir is per column here (<run_dir>/eval/<benchmark>/<split>_adapter-<column>): unset it")
    columns = [str(name) for name in cfg.adapter_paths or []]
    if not columns:
        raise UsageError("adapter_paths is empty: name the columns, e.g. [all, text, media, none]")
    if len(set(columns)) != len(columns):
        raise UsageError(f"adapter_paths repeats a column: {columns}")
    try:
        for name in columns:
            check_path_name(name)
    except AdapterPathError as error:
        raise UsageError(str(error)) from None
    run_dirs = [check_run_dir(value, key=f"run_dirs[{number}]") for number, value in enumerate(cfg.run_dirs)]
    if len(set(run_dirs)) != len(run_dirs):
        raise UsageError(f"run_dirs names a run twice: {[str(d) for d in run_dirs]}")
    _, modes = check_settings(_for_run(cfg, run_dirs[0]))
    return run_dirs, columns, modes


def _for_run(cfg: DictConfig, run_dir: Path) -> DictConfig:
    one = cfg.copy()
    one.run_dir = str(run_dir)
    return one


def analyse(cfg: DictConfig) -> PartialModalityTable | None:
    """Answer, write and score every (run, column); returns the table on rank 0, None on the other ranks."""
    run_dirs, columns, modes = check_analysis_settings(cfg)
    from moka_train.adapters import carries_adapters, get_adapter_config
    from moka_train.training.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed(use_deepspeed=False)
    table: PartialModalityTable | None = None
    try:
        for run_dir in run_dirs:
            run = load_run(cfg, run_dir, ctx)  # load_run reads the run from run_dir, not cfg.run_dir
            if not carries_adapters(run.model.llm):
                raise UsageError(f"{run_dir} trained no adapter (a stage-1 run): there is no adapter path to limit")
            config = get_adapter_config(run.model.llm)
            if table is None:
                table = PartialModalityTable(run.benchmark, "", modes[0], columns)
            elif run.benchmark != table.benchmark:
                raise UsageError(
                    f"{run_dir} answers {run.benchmark}, the runs before it {table.benchmark}: compare one"
                )
            row = RunRow(f"{config.method} ({run_dir.name})", str(run_dir))
            table.rows.append(row)
            for column in columns:
                try:
                    modalities = resolve_path(column, config.modalities)
                except KeyError as why:
                    row.scores[column] = None
                    if ctx.is_main:
                        print(f"{run_dir.name} [{column}]: {NOT_AVAILABLE}, {why.args[0]}")
                    continue
                out_dir = default_out_dir(cfg, run, column)
                record = evaluation_record(cfg, run, modalities)
                claim_out_dir(out_dir, record, ctx)
                with keep_adapter_path(run.model, modalities):
                    predictions = answer(cfg, run, ctx)
                if ctx.is_main:
                    score = write_and_score(
                        predictions, run.benchmark, modes, out_dir, record, (column, modalities), verbose=False
                    )[modes[0]]
                    table.metric = score.main_name
                    row.scores[column] = score.main
                    print(f"{run_dir.name} [{column}]: {score.main_name} {score.main:.2f} -> {out_dir}")
            del run  # one model in memory at a time
        if ctx.is_main:
            paths = table.write(Path(cfg.table_dir))
            print("\n" + table.markdown())
            print("wrote " + ", ".join(str(p) for p in paths))
        ctx.barrier()
        return table if ctx.is_main else None
    finally:
        shutdown_distributed()


@hydra.main(version_base="1.3", config_path="../configs", config_name="partial_modality")
def main(cfg: DictConfig) -> None:
    run_app("partial_modality.py", analyse, cfg)


if __name__ == "__main__":
    main()
