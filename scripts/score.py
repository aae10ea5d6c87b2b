"""Score a predictions file by its benchmark's rules, without a model.

    python scripts/score.py outputs/run/predictions.jsonl                  # the benchmark read from the ids
    python scripts/score.py predictions.jsonl --benchmark pope --mode both
    python scripts/score.py predictions.jsonl --mode moka_compat --out scores/avqa_moka.json

The input is what ``moka_train.evaluation.generate`` writes: one JSON record per line, with ``id``,
``prediction``, ``answer`` and the benchmark record's metadata. The benchmark is the one the ids name (their
first part, ``music_avqa/test/4`` -> ``music_avqa``; MokA's own files' ``music_avqa_moka`` and ``ave_moka`` too:
``moka_train.evaluation.metrics.ID_PREFIXES``) unless ``--benchmark`` names it; records naming several
benchmarks, or none known, are refused. ``--mode`` picks the rule (``moka_train.evaluation.metrics``):
``official`` (the default), ``moka_compat`` (the official MokA scripts') or ``both``. MMAU and AIR-Bench have
no ``moka_compat`` rule: ``both`` scores them under ``official`` only and says so, ``moka_compat`` is refused.

Each score is printed (``BenchmarkScore.format()``) and all are written, atomically, to ``score.json`` beside
the predictions (or ``--out``) as ``{mode: BenchmarkScore.to_dict()}``. A mode that file already holds is
scored again from these predictions and kept, so ``--mode moka_compat`` after an evaluation's ``official``
score adds to the file rather than dropping what make_tables reads, and no kept score is stale (a file of
another benchmark's scores is replaced). Bad input (a missing file, a line that is not a JSON record, an
unknown benchmark, a mode the benchmark has no rule for, records the scorer cannot read) is one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moka_train.evaluation.metrics import BENCHMARKS, MODES, MOKA_COMPAT, OFFICIAL, BenchmarkScore, read_predictions
from moka_train.evaluation.scoring import (
    BOTH,
    SCORE_FILE,
    UsageError,
    infer_benchmark,
    score_modes,
    write_scores,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", type=Path, help="the predictions JSONL file")
    parser.add_argument("--benchmark", choices=BENCHMARKS, help="the scorer (default: read from the records' ids)")
    parser.add_argument("--mode", choices=(*MODES, BOTH), default=OFFICIAL, help="the rule (default: official)")
    parser.add_argument("--out", type=Path, help=f"the scores' JSON file (default: {SCORE_FILE} beside the input)")
    return parser.parse_args(argv)


def load(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions file; an unreadable file or line is a UsageError naming it."""
    if not path.is_file():
        raise UsageError(f"{path}: {'a folder, not a predictions file' if path.is_dir() else 'no such file'}")
    try:
        records = read_predictions(path)
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from None
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    if not records:
        raise UsageError(f"{path}: no prediction records (the file is empty)")
    return records


def modes_in(path: Path, benchmark: str) -> list[str]:
    """The scoring modes a score.json of ``benchmark`` at ``path`` holds; none when there is no such file, or it
    is not one, or it scores another benchmark."""
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(scores, dict):
        return []
    return [
        mode
        for mode, score in scores.items()
        if mode in MODES and isinstance(score, dict) and score.get("benchmark") == benchmark
    ]


def run(args: argparse.Namespace) -> dict[str, BenchmarkScore]:
    out = args.out or args.predictions.with_name(SCORE_FILE)
    if out.is_dir():
        raise UsageError(f"--out {out}: a folder; name the JSON file to write")
    records = load(args.predictions)
    benchmark = args.benchmark or infer_benchmark(records)
    modes = [OFFICIAL, MOKA_COMPAT] if args.mode == BOTH else [args.mode]
    scores, skipped = score_modes(records, benchmark, modes)
    print("\n\n".join(score.format() for score in scores.values()))
    for note in skipped:
        print(f"\nnote: {note}")
    kept = [mode for mode in modes_in(out, benchmark) if mode not in modes]
    if kept:
        scores.update(score_modes(records, benchmark, kept)[0])
        print(f"\nnote: {out} also held {', '.join(kept)}: scored again from these predictions and kept")
    write_scores(scores, out)
    print(f"\nwrote {out}")
    return scores


def main(argv: Sequence[str] | None = None) -> dict[str, BenchmarkScore]:
    """Score the file named in ``argv``; returns ``{mode: score}``. Bad input exits with status 2."""
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        print(f"score.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
