"""The paper's Tables 1-4 with our numbers beside them, from a folder of evaluated runs.

    python scripts/make_tables.py runs                       # writes runs/tables/official/table{1..4}.{md,csv,png}
    python scripts/make_tables.py runs --mode moka_compat --out tables/moka_compat

**A folder of evaluated runs** (RUNS_DIR) holds, at any depth, one ``score.json`` per evaluated run and
benchmark (``scripts/score.py`` writes it beside the run's ``predictions.jsonl``: ``{mode:
BenchmarkScore.to_dict()}``), and the ``config.yaml`` of the run it scored (``scripts/train.py`` writes the
resolved config into the run's ``run_dir``), in the score.json's folder or the nearest folder above it, up to
RUNS_DIR. So a training run evaluated on several benchmarks is::

    runs/table2/llama2_visual/lora-seed42/config.yaml
    runs/table2/llama2_visual/lora-seed42/eval/mme/{predictions.jsonl,score.json}
    runs/table2/llama2_visual/lora-seed42/eval/pope/{predictions.jsonl,score.json}

Folder names are yours: nothing is read from them. **A run's cell** (table, backbone, benchmark, method) comes
from its files (``moka_train.evaluation.tables.cell_key``): the benchmark from score.json; the method from the
config's ``adapter`` (the ``adapter=`` preset its fields match: ``lora``, ``multi_lora``, ``uni_lora``, ``moka``,
``text_query``, ``naive``, ...); the backbone from ``model.name`` if the config has one, else from ``stage1_dir``,
which the experiment presets set to ``runs/stage1/<backbone>``. The adapter's modalities must be the benchmark's
setting, and a Table 1 run must have trained on that benchmark's data. A run fills every table that has its cell
(a LLaMA-2 MokA run on AVE: Tables 1 and 4).

Our number for a cell is the mean of its runs' headline score (``main``, in the paper's units) under ``--mode``
(``official`` by default, or ``moka_compat``: the official MokA scripts' rule), with the sample std and the count
when several runs (seeds) share a cell. The paper's numbers are ``moka_train/evaluation/paper_numbers.csv``.

Written to ``--out`` (default ``RUNS_DIR/tables/<mode>``), per table: ``table{N}.md`` and ``table{N}.csv`` (paper,
ours and their delta for every cell; ``—`` where we have no run, ``n/r`` where the paper reports none) and
``table{N}.png`` (grouped bars, paper against ours, per method and benchmark); and ``runs.md`` / ``runs.csv``:
every evaluated run, paper cell or not (your own backbones, the demo's runs), with its backbone, method,
benchmark, score and the answers scored out of those given, and whether the tables counted it. The Markdown
tables are printed, then the missing cells per table, the runs that fill no cell (each with the reason), the
list of every run and the files written. Bad
input (RUNS_DIR missing, no score.json in it, a score.json or config.yaml that cannot be read) is one line on
stderr naming the file, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from moka_train.evaluation.metrics import MODES, OFFICIAL
from moka_train.evaluation.tables import (
    RunsError,
    Table,
    build_tables,
    every_run,
    find_runs,
    load_paper_numbers,
    runs_markdown,
    to_markdown,
    write_outputs,
    write_runs,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, metavar="RUNS_DIR", help="the folder of evaluated runs")
    parser.add_argument("--out", type=Path, help="where the tables go (default: RUNS_DIR/tables/<mode>)")
    parser.add_argument("--mode", choices=MODES, default=OFFICIAL, help="the scoring rule (default: official)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Table]:
    """Write the tables for the RUNS_DIR named in ``argv``; returns them. Bad input exits with status 2."""
    args = parse_args(argv)
    runs_dir = args.runs_dir.resolve()
    out = args.out or runs_dir / "tables" / args.mode
    try:
        runs, ignored = find_runs(runs_dir, args.mode)
    except RunsError as error:
        print(f"make_tables.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    tables, not_in_tables = build_tables(load_paper_numbers(), runs)
    ignored += not_in_tables

    print("\n".join(to_markdown(table, args.mode) for table in tables))
    used = len(runs) - len(not_in_tables)
    print(f"{used} evaluated run(s) in the tables, {len(ignored)} ignored.")
    for table in tables:
        print(f"Table {table.number}: {len(table.missing)} of {table.reported} paper cells missing (marked —)")
    if ignored:
        print(f"\nIgnored ({len(ignored)}), not a cell of the paper's tables:")
        for run in sorted(ignored, key=lambda run: run.folder):
            print(f"  {run.folder.relative_to(runs_dir)}: {run.reason}")
    every = every_run(runs_dir, args.mode, runs, ignored)
    print("\n" + runs_markdown(every, runs_dir, args.mode))
    try:
        written = write_outputs(tables, out, runs_dir, args.mode) + write_runs(every, out, runs_dir, args.mode)
    except OSError as error:
        print(f"make_tables.py: error: --out {out}: cannot write the tables ({error})", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"\nwrote {len(written)} files to {out}: " + ", ".join(path.name for path in written))
    return tables


if __name__ == "__main__":
    main()
