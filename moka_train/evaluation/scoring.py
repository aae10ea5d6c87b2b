"""What scripts/score.py and scripts/evaluate.py share: which benchmark a predictions file is, scoring it under
several modes, and writing ``score.json`` (``{mode: BenchmarkScore.to_dict()}``). Bad input is a ``UsageError``,
which the scripts print as one line (exit status 2)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moka_train.evaluation.metrics import ID_PREFIXES, BenchmarkScore, UnavailableModeError, get_scorer

BOTH = "both"
SCORE_FILE = "score.json"
# Beside the score.json of a partial-modality evaluation (adapter path on some modalities only): an analysis of a
# run, not a result of it, so scripts/make_tables.py leaves it out.
ADAPTER_PATH_FILE = "adapter_path.json"
# Beside the predictions of scripts/evaluate.py: the settings that decided them (run, data, rule), so a later
# evaluation with other settings cannot replace them unnoticed, and scripts/make_tables.py can tell the rules apart.
EVALUATION_FILE = "evaluation.json"
EXAMPLES = 3  # ids quoted per problem in an error message


class UsageError(Exception):
    """Bad input, reported as one line on stderr with exit status 2 (no traceback)."""


def infer_benchmark(records: Sequence[Mapping[str, Any]]) -> str:
    """The benchmark every record's id names (``<prefix>/...``, ``ID_PREFIXES``), else a UsageError quoting ids."""
    hint = "name the benchmark with --benchmark"
    no_id = [number for number, record in enumerate(records, 1) if not isinstance(record.get("id"), str)]
    if no_id:
        raise UsageError(f"{len(no_id)} record(s) have no string 'id' (record(s) {no_id[:EXAMPLES]}); {hint}")
    by_benchmark: dict[str | None, list[str]] = {}
    for record in records:
        by_benchmark.setdefault(ID_PREFIXES.get(record["id"].split("/")[0]), []).append(record["id"])
    unknown = by_benchmark.pop(None, [])
    if unknown:
        raise UsageError(
            f"{len(unknown)} id(s) name no known benchmark, e.g. {unknown[:EXAMPLES]} (known id prefixes: "
            f"{', '.join(ID_PREFIXES)}); {hint}"
        )
    if len(by_benchmark) > 1:
        named = "; ".join(f"{name}: {ids[:EXAMPLES]}" for name, ids in by_benchmark.items())
        raise UsageError(f"the ids name several benchmarks ({named}): score one benchmark per file, or {hint}")
    return next(iter(by_benchmark))


def score_modes(
    records: list[dict[str, Any]], benchmark: str, modes: Sequence[str]
) -> tuple[dict[str, BenchmarkScore], list[str]]:
    """``{mode: score}`` for each mode the benchmark has a rule for, and a note for each mode skipped: a mode it
    has no rule for is refused (UsageError) when it is the only one asked, else skipped."""
    scorer = get_scorer(benchmark)
    scores, skipped = {}, []
    for mode in modes:
        try:
            scores[mode] = scorer(records, mode=mode)
        except UnavailableModeError as error:
            if len(modes) == 1:
                raise UsageError(str(error)) from None
            skipped.append(f"no {mode} score: {error}")
        except KeyError as error:  # a field the scorer reads is missing (the message is its argument)
            raise UsageError(error.args[0] if error.args else str(error)) from None
        except ValueError as error:  # a record the scorer cannot read (unknown answer, type, ...)
            raise UsageError(str(error)) from None
    return scores, skipped


def write_scores(scores: Mapping[str, BenchmarkScore], path: Path) -> None:
    """``{mode: score.to_dict()}`` as JSON at ``path``, written atomically."""
    # Imported here: checkpoint_io loads torch (seconds), which nothing else here needs, so --help and the
    # refusals of bad input stay instant.
    from moka_train.checkpoint_io import write_text_atomic

    text = json.dumps({mode: score.to_dict() for mode, score in scores.items()}, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    except OSError as error:
        raise UsageError(f"{path}: cannot write the scores ({error.strerror or error})") from None
