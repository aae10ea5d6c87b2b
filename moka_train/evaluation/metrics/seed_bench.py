"""SEED-Bench v1 (generation mode): the option letter of the model's answer, accuracy per evaluation
dimension (benchmarks.md §6).

Record format (``moka_train.data.datasets.seed_bench`` metadata plus ``generate``'s fields): ``id``
(``seed_bench/<question_id>``), ``prediction``, ``answer`` (the GT letter, bare ``A`` or as the MokA target
``(A)``), ``question_type_id`` (the dimension, 1-12). Read when present: ``choices`` (letter -> choice text;
without it the option letters are A-D and no text matching is possible).

SEED-Bench's own score ranks the four choices by likelihood (a different inference path, not this
module). In generation mode (the LLaVA-style setup: ask for the letter) the rules are:

``official``: de-duplication by ``id`` (the first record of an id is kept; sampler padding repeats
records); the letter is extracted with VLMEvalKit's ``can_infer`` (``mmbench.can_infer``: a lone option
letter token near the end, ``answer is X``, or the one choice text the answer contains), which is how
VLMEvalKit scores SEED-Bench's image set (``SEEDBench_IMG``) under exact matching; no letter -> wrong
(counted in ``unparsable``). Accuracy per dimension and pooled over the questions (question-weighted, as
SEED-Bench's ``eval.py``), in percent; the rows ``image`` (dimensions 1-9, what generation-style papers
report) and ``video`` (10-12) pool the questions of each kind present. Headline: the pooled accuracy over all
records given (build the records with image dimensions only for the usual image score).

``moka_compat`` (the official MokA scoring, the same ``'a '`` substring rule as its MMBench script,
``mmbench.parse_moka``): every record scored, padding duplicates included; the first of ``'a '``..``'e '`` in
the stripped, lower-cased answer gives the option, none -> wrong (counted in ``unparsable``); it reads
``raw_output`` (decoded with special tokens, as MokA's script did) where a record has it. MokA ran all
questions, video ones on their first frame (40.80).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moka_train.evaluation.metrics import MOKA_COMPAT, OFFICIAL, BenchmarkScore, check_mode, require_fields
from moka_train.evaluation.metrics.common import accuracy_row, first_per_id
from moka_train.evaluation.metrics.mmbench import (
    can_infer_option,
    can_infer_text,
    gt_letter,
    moka_response,
    parse_moka,
)

BENCHMARK = "seed_bench"
FIELDS = ("id", "prediction", "answer", "question_type_id")
# SEED-Bench v1's dimensions (as moka_train.data.datasets.seed_bench; not imported: it pulls in torch).
DIMENSIONS = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attributes",
    4: "Instance Location",
    5: "Instances Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Understanding",
    10: "Action Recognition",
    11: "Action Prediction",
    12: "Procedure Understanding",
}
IMAGE_DIMENSIONS = range(1, 10)
DEFAULT_CHOICES = {letter: "" for letter in "ABCD"}


def _dimension(record: Mapping[str, Any], position: int) -> int:
    value = record["question_type_id"]
    try:
        dimension = int(value)
    except (TypeError, ValueError):
        dimension = None
    if dimension not in DIMENSIONS or isinstance(value, bool):
        raise ValueError(
            f"{BENCHMARK}: prediction {record.get('id', position)!r} has question_type_id {value!r}; "
            f"SEED-Bench v1 dimensions are 1-12"
        )
    return dimension


def parse_official(record: Mapping[str, Any]) -> str | None:
    """The option letter of a record's prediction by VLMEvalKit's ``can_infer`` over its ``choices``."""
    choices = record.get("choices") or DEFAULT_CHOICES
    if not isinstance(choices, Mapping):
        raise ValueError(f"{BENCHMARK}: prediction {record.get('id')!r} has choices {choices!r}, not a mapping")
    answer = "" if record["prediction"] is None else str(record["prediction"])
    # A choice without text would be "in" every answer: text matching only over the choices that have one.
    texts = {letter: text for letter, text in choices.items() if str(text)}
    letter = can_infer_option(answer, choices) or (can_infer_text(answer, texts) if texts else None)
    return None if letter in (None, "Z") else letter


def _score(
    records: Sequence[Mapping[str, Any]], parse: Callable[[Mapping[str, Any]], str | None]
) -> tuple[dict[str, dict[str, float | int]], int]:
    tallies: dict[int, list[int]] = {}
    unparsable = 0
    for position, record in enumerate(records):
        pred = parse(record)
        unparsable += pred is None
        tally = tallies.setdefault(_dimension(record, position), [0, 0])
        tally[0] += pred == gt_letter(record, position, BENCHMARK)
        tally[1] += 1
    rows = {f"{d}. {DIMENSIONS[d]}": accuracy_row(*tallies[d]) for d in sorted(tallies)}
    for kind, dims in (("image", IMAGE_DIMENSIONS), ("video", range(10, 13))):
        present = [tallies[d] for d in dims if d in tallies]
        if present:
            rows[kind] = accuracy_row(sum(c for c, _ in present), sum(t for _, t in present))
    rows["overall"] = accuracy_row(sum(c for c, _ in tallies.values()), sum(t for _, t in tallies.values()))
    return rows, unparsable


def score(predictions: Sequence[Mapping[str, Any]], mode: str = OFFICIAL) -> BenchmarkScore:
    """SEED-Bench accuracy per dimension and overall (see the module docstring)."""
    check_mode(mode)
    require_fields(predictions, FIELDS, BENCHMARK)
    if mode == MOKA_COMPAT:
        rows, unparsable = _score(predictions, lambda record: parse_moka(moka_response(record)))
        counts = {"total": len(predictions), "scored": len(predictions), "unparsable": unparsable}
        notes = [
            "MokA rule: an answer with none of 'a '..'e ' is counted wrong (kept in the denominator)",
            "no de-duplication: sampler padding duplicates are scored like any record",
        ]
        return BenchmarkScore(
            BENCHMARK, MOKA_COMPAT, "accuracy", float(rows["overall"]["accuracy"]), rows, counts, notes
        )
    kept, duplicates = first_per_id(predictions)
    rows, unparsable = _score(kept, parse_official)
    counts = {"total": len(predictions), "scored": len(kept), "unparsable": unparsable, "duplicates": duplicates}
    notes = [
        "generation mode, option letter by VLMEvalKit's can_infer: an answer without one is counted wrong",
        f"{duplicates} duplicate record(s) (same id, sampler padding) scored once, the first kept",
    ]
    return BenchmarkScore(BENCHMARK, OFFICIAL, "accuracy", float(rows["overall"]["accuracy"]), rows, counts, notes)
