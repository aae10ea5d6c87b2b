"""AIR-Bench Foundation accuracy by the official letter rule (benchmarks.md §8), per task and pooled.

Record format (``moka_train.evaluation.generate`` over ``moka_train.data.datasets.air_bench`` records); the
fields read:

=================  ==============================================================================================
field              value
=================  ==============================================================================================
``id``             the record id (names the record in errors; de-duplication key)
``prediction``     the model's text (the official output's ``response``)
``task_name``      as in Foundation_meta.json
``dataset_name``   as in Foundation_meta.json; the official accuracy key is ``<task_name>_<dataset_name>``
``answer_letter``  the correct option's letter (``A``-``D``), when present
``answer_gt``      otherwise the correct option's text, with ``choices`` (the texts of options A-D, None where
                   missing): the letter is the first option whose text equals it (the official rule)
=================  ==============================================================================================

**official** (OFA-Sys/AIR-Bench ``score_foundation.py``): ``p = prediction.strip().replace('\\n', '')``; an empty
``p`` or ``'None'`` fails; else the letter is ``p[0]`` if it is one of ``ABCD``, else ``p[-2]`` if ``p`` has two
or more characters and that is one of ``ABCD`` ("The answer is A."), else it fails. It is correct iff the
letter is the ground truth's. **Failed responses are excluded from the denominators** and counted
(``unparsable``; the script's ``fail_num``). The rule is kept as it is, quirks included: a response's first
character decides, so "Apple" reads as A, "Answer: B" as A and "A man is speaking" as A, while "I think C"
fails (its ``p[-2]`` is a space). The optional GPT re-mapping of free text (``align_in_foundation.py``) is not
part of the rule. Records repeating an ``id`` are scored once.

**moka_compat**: MokA publishes no AIR-Bench scoring script, so this mode raises a ValueError.

Groups: one row per ``<task_name>_<dataset_name>`` in order of first appearance (the official per-dataset
accuracy), with ``accuracy`` (percent), ``correct``, ``total`` (its denominator) and ``unparsable``; then
``mean of groups`` (the unweighted mean of their accuracies) and ``Overall``. The official script prints only
the per-dataset rows; ``main`` is the pooled accuracy over every scored response (``Overall``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moka_train.evaluation.metrics import MOKA_COMPAT, BenchmarkScore, check_mode, require_fields
from moka_train.evaluation.metrics.common import accuracy_row, dropped_note, first_per_id, no_moka_compat

# The speech tasks of the Foundation set (9 tasks in 11 task_dataset folders), spelled as in the file
# (the builder's default tasks, and what make_tables checks an AIR-Bench column against).
SPEECH_TASKS = (
    "Speech_Grounding",
    "Spoken_Language_Identification",
    "Speaker_Gender_Recognition",
    "Speaker_Emotion_Recontion",
    "Speaker_Age_Prediction",
    "Speech_Entity_Reconition",
    "Speaker_Intent_Classification",
    "Speaker_Number_Verification",
    "Synthesized_Voice_Detection",
)

BENCHMARK = "air_bench"
FIELDS = ("id", "prediction", "task_name", "dataset_name")
LETTERS = ("A", "B", "C", "D")
OVERALL = "Overall"
MEAN = "mean of groups"


def parse_letter(prediction: Any) -> str | None:
    """The official letter of a response (module docstring), or None where the official script fails it."""
    p = ("" if prediction is None else str(prediction)).strip().replace("\n", "")
    if not p or p == "None":
        return None
    if p[0] in LETTERS:
        return p[0]
    if len(p) > 1 and p[-2] in LETTERS:
        return p[-2]
    return None


def answer_letter(record: Mapping[str, Any]) -> str:
    """The record's correct letter: ``answer_letter``, else the first option equal to ``answer_gt``."""
    where = f"{BENCHMARK}: prediction {record['id']!r}"
    if "answer_letter" in record:
        if record["answer_letter"] not in LETTERS:
            raise ValueError(f"{where} has answer_letter {record['answer_letter']!r}, not one of {LETTERS}")
        return record["answer_letter"]
    if "answer_gt" not in record or "choices" not in record:
        raise KeyError(
            f"{where} has neither 'answer_letter' nor both 'answer_gt' and 'choices' (fields: {sorted(record)}); "
            f"see moka_train.evaluation.metrics.{BENCHMARK} for the record format"
        )
    if not isinstance(record["choices"], (list, tuple)):
        raise ValueError(f"{where} has choices {record['choices']!r}; expected a list of option texts")
    for letter, choice in zip(LETTERS, record["choices"], strict=False):
        if choice is not None and choice == record["answer_gt"]:
            return letter
    # The official script stops here (exit(1)): a ground truth naming no option is a broken record.
    raise ValueError(f"{where}: answer_gt {record['answer_gt']!r} is none of the options {record['choices']}")


def score(predictions: Sequence[Mapping[str, Any]], mode: str = "official") -> BenchmarkScore:
    """AIR-Bench accuracy of ``predictions`` by the official rule (module docstring); ``moka_compat`` is refused."""
    check_mode(mode)
    if mode == MOKA_COMPAT:
        raise no_moka_compat(BENCHMARK, "AIR-Bench")
    require_fields(predictions, FIELDS, BENCHMARK)
    records, duplicates = first_per_id(predictions)

    tallies: dict[str, list[int]] = {}  # task_dataset -> [correct, denominator, unparsable], first-seen order
    for record in records:
        truth = answer_letter(record)
        tally = tallies.setdefault(f"{record['task_name']}_{record['dataset_name']}", [0, 0, 0])
        letter = parse_letter(record["prediction"])
        if letter is None:
            tally[2] += 1  # the official fail_num: out of the denominator
            continue
        tally[0] += letter == truth
        tally[1] += 1

    groups: dict[str, dict[str, float | int]] = {name: accuracy_row(*tally) for name, tally in tallies.items()}
    rated = [row["accuracy"] for row in groups.values() if row["total"]]
    correct, total, unparsable = (sum(tally[i] for tally in tallies.values()) for i in range(3))
    groups[MEAN] = {"accuracy": sum(rated) / len(rated) if rated else 0.0, "groups": len(rated)}
    groups[OVERALL] = accuracy_row(correct, total, unparsable)
    notes = [
        f"official: {unparsable} response(s) with no letter by the official rule were excluded from the "
        "denominators (fail_num)",
        *dropped_note(duplicates),
    ]
    return BenchmarkScore(
        benchmark=BENCHMARK,
        mode=mode,
        main_name="accuracy",
        main=groups[OVERALL]["accuracy"],
        groups=groups,
        counts={
            "total": len(predictions),
            "scored": total,
            "unparsable": unparsable,
            "duplicates": duplicates,
        },
        notes=notes,
    )
