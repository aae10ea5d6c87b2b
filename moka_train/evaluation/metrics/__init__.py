"""Benchmark scorers: the official rule of each benchmark, and ``moka_compat``, the official MokA scripts' rule.

One module per benchmark (``music_avqa``, ``ave``, ``mme``, ``mmbench``, ``pope``, ``seed_bench``, ``mmau``,
``air_bench``), each with ``score(predictions, mode="official") -> BenchmarkScore`` over prediction records
(``moka_train.evaluation.generate``: ``id``, ``prediction``, ``answer`` and the benchmark record's metadata
fields; each module's docstring lists the fields it reads). ``get_scorer(name)`` finds a module by its
benchmark name, so adding a benchmark is adding a module.

Every score counts what it could not parse (``counts["unparsable"]``), whatever the mode does with it. A scorer
asked for a mode its benchmark has no rule for raises ``UnavailableModeError`` (a ValueError): MMAU and AIR-Bench
have no ``moka_compat``. Helpers the scorers share are in ``common``.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from moka_train.evaluation.metrics.common import UnavailableModeError as UnavailableModeError
from moka_train.evaluation.metrics.common import jsonl_lines

OFFICIAL = "official"
MOKA_COMPAT = "moka_compat"
MODES = (OFFICIAL, MOKA_COMPAT)
BENCHMARKS = ("music_avqa", "ave", "mme", "mmbench", "pope", "seed_bench", "mmau", "air_bench")
# The first part of a record id (``<prefix>/...``, moka_train.data.datasets) -> the benchmark scoring it;
# MokA's own files (moka_train.data.datasets.moka_official) have prefixes of their own.
ID_PREFIXES = {**{name: name for name in BENCHMARKS}, "music_avqa_moka": "music_avqa", "ave_moka": "ave"}

Scorer = Callable[..., "BenchmarkScore"]


@dataclass
class BenchmarkScore:
    """A benchmark's result under one mode.

    ``main`` is the headline number in the unit the paper reports (accuracy in percent, MME's perception sum,
    POPE's accuracy, ...), named by ``main_name``. ``groups`` holds the breakdown as rows of named values
    (``{"Audio-Visual/Counting": {"accuracy": 81.2, "correct": 13, "total": 16}}``; MME's subtasks, POPE's
    splits, ...), in the order to print. ``counts`` always has ``total`` (records given), ``scored`` (records
    in the denominator) and ``unparsable``; a module may add more (``duplicates``, ``excluded``).
    ``notes`` says, in words, what the mode did with what it could not parse."""

    benchmark: str
    mode: str
    main_name: str
    main: float
    groups: dict[str, dict[str, float | int]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A plain-text report: the headline, the counts, then one line per group with its values."""
        headline = f"{self.main:.2f}"
        if self.counts.get("scored") == 0:  # the rule could read no answer: a 0.00 would look like a result
            headline = f"n/a (no answer of {self.counts.get('total', 0)} could be scored by this rule)"
        lines = [f"{self.benchmark} ({self.mode}): {self.main_name} {headline}"]
        lines.append("  " + ", ".join(f"{name} {value}" for name, value in self.counts.items()))
        columns = list(dict.fromkeys(column for row in self.groups.values() for column in row))
        if columns:
            width = max(len(name) for name in self.groups) + 2
            lines.append(" " * width + "".join(f"{column:>12}" for column in columns))
            for name, row in self.groups.items():
                cells = "".join(f"{_cell(row.get(column)):>12}" for column in columns)
                lines.append(f"{name:<{width}}{cells}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _cell(value: float | int | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def require_fields(predictions: Sequence[Mapping[str, Any]], fields: Iterable[str], benchmark: str) -> None:
    """Fail, naming the record and the missing fields, when a prediction lacks a field the scorer reads."""
    fields = list(fields)
    for position, record in enumerate(predictions):
        missing = [name for name in fields if name not in record]
        if missing:
            raise KeyError(
                f"{benchmark}: prediction {record.get('id', position)!r} has no {missing} "
                f"(fields: {sorted(record)}); see moka_train.evaluation.metrics.{benchmark} for the record format"
            )


def get_scorer(benchmark: str) -> Scorer:
    """The ``score`` function of ``moka_train.evaluation.metrics.<benchmark>``."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"{__name__}.{benchmark}").score


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A predictions JSONL file (one JSON object per line; blank lines ignored), with the line of a bad one named."""
    records = []
    for number, record in jsonl_lines(path):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON record (an object): {json.dumps(record)[:60]}")
        records.append(record)
    return records
