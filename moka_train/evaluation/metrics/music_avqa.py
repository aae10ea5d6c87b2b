"""MUSIC-AVQA (CVPR'22) accuracy: overall, per modality and per question type (benchmarks.md §1).

Record format (``moka_train.evaluation.generate`` over ``moka_train.data.datasets.music_avqa`` or
``moka_official.build_music_avqa_moka`` records); the fields read:

=====================  ==========================================================================================
field                  value
=====================  ==========================================================================================
``id``                 the record id (names the record in errors; de-duplication key)
``prediction``         the model's text
``answer``             the ground truth: the answer word, or a target holding it as ``<answer>X</answer>`` (the
                       first tag's content is taken); it must be one of the 42 ``ANSWERS`` (else a ValueError)
``question_modality``  ``Audio`` | ``Visual`` | ``Audio-Visual``
``question_type``      one of the modality's types in ``QUESTION_TYPES`` (9 pairs in all)
=====================  ==========================================================================================

**official** (MUSIC-AVQA ``main_avst.py`` ``test``: a 42-way classifier, accuracy = correct / all questions).
The prediction is read as one answer class: the content of its ``<answer>X</answer>`` tags (tags
case-insensitive, spanning lines; several tags must agree), or the whole text when it has none; lower-cased,
whitespace collapsed, trailing punctuation dropped (``accuracy.normalize_answer``), and a space may stand for
the class names' underscore (``acoustic guitar`` = ``acoustic_guitar``). It is correct iff that class equals
the ground truth. Anything else (empty, "No, there are two.", a word outside the 42 classes, disagreeing tags)
is unparsable and counted **wrong**: every question stays in the denominator, as with the classifier. Records
repeating an ``id`` are scored once (the first), ``counts["duplicates"]`` says how many were dropped.

**moka_compat** (MokA ``AudioVisualText/scripts/evaluation/avqa_eval.py``, its 77.76 over 9,059 of 9,129):
``re.findall(r'<answer>(.*?)</answer>', prediction)`` (case-sensitive, one line) must find exactly one tag, and
its content, stripped and lower-cased, must be one of the 42 answer words; otherwise the question is
**dropped from the denominator** (unparsable). A parsed answer is correct iff the stripped, lower-cased ground
truth is a **substring** of it (MokA's bug kept: ground truth "no" matches "piano"). Every record is scored,
repeated ids included, as the script does with its file.

Groups, in the paper's order: the nine ``Modality/Type`` pairs, each modality pooled over its types, and
``Overall``; each row has ``accuracy`` (percent), ``correct``, ``total`` (its denominator) and ``unparsable``.
``main`` is the overall accuracy in percent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from moka_train.evaluation.accuracy import normalize_answer
from moka_train.evaluation.metrics import MOKA_COMPAT, BenchmarkScore, check_mode, require_fields
from moka_train.evaluation.metrics.common import accuracy_row, dropped_note, first_per_id, percent

BENCHMARK = "music_avqa"
FIELDS = ("id", "prediction", "answer", "question_modality", "question_type")

# The benchmark's definitions (benchmarks.md §1), as in moka_train.data.datasets.music_avqa; written out here so
# that scoring a predictions file needs neither torch nor the data stack the builders import.
QUESTION_TYPES: dict[str, tuple[str, ...]] = {
    "Audio": ("Counting", "Comparative"),
    "Visual": ("Counting", "Location"),
    "Audio-Visual": ("Existential", "Counting", "Location", "Comparative", "Temporal"),
}
# MokA's answer_list: the 42 classes (val/test use 41, no "ten").
ANSWERS: frozenset[str] = frozenset(
    {
        *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "more than ten"),
        *("yes", "no", "left", "middle", "right", "indoor", "outdoor", "simultaneously"),
        *("accordion", "acoustic_guitar", "bagpipe", "banjo", "bassoon", "cello", "clarinet", "congas", "drum"),
        *("electric_bass", "erhu", "flute", "guzheng", "piano", "pipa", "saxophone", "suona", "trumpet", "tuba"),
        *("ukulele", "violin", "xylophone"),
    }
)
OVERALL = "Overall"

_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_MOKA_TAG = re.compile(r"<answer>(.*?)</answer>")  # avqa_eval.py's pattern: case-sensitive, no DOTALL


def parse_official(prediction: Any) -> str | None:
    """The answer class a prediction names under the official reading (module docstring), or None."""
    text = "" if prediction is None else str(prediction)
    tags = _TAG.findall(text)
    candidates = {_answer_class(tag) for tag in tags} if tags else {_answer_class(text)}
    # Several tags naming different classes are ambiguous; one class named (once or repeatedly) is an answer.
    return candidates.pop() if len(candidates) == 1 else None


def _answer_class(text: str) -> str | None:
    word = normalize_answer(text)
    if word in ANSWERS:
        return word
    underscored = word.replace(" ", "_")  # "acoustic guitar": the class names' underscore is a naming artefact
    return underscored if underscored in ANSWERS else None


def parse_moka(prediction: Any) -> str | None:
    """The answer avqa_eval.py reads from a prediction (exactly one tag, content in the 42 words), or None."""
    matches = _MOKA_TAG.findall("" if prediction is None else str(prediction))
    if len(matches) != 1:
        return None
    word = matches[0].strip().lower()
    return word if word in ANSWERS else None


def ground_truth(record: Mapping[str, Any]) -> str:
    """The record's answer class (``answer``: the word or a ``<answer>X</answer>`` target), checked."""
    word = normalize_answer(record["answer"])
    if word not in ANSWERS:
        raise ValueError(
            f"{BENCHMARK}: prediction {record['id']!r} has the ground truth {record['answer']!r}, which is not one "
            f"of the 42 MUSIC-AVQA answers"
        )
    return word


def question_group(record: Mapping[str, Any]) -> tuple[str, str]:
    modality, question_type = record["question_modality"], record["question_type"]
    if (
        not isinstance(modality, str)
        or not isinstance(question_type, str)
        or question_type not in QUESTION_TYPES.get(modality, ())
    ):
        known = "; ".join(f"{m}: {', '.join(types)}" for m, types in QUESTION_TYPES.items())
        raise ValueError(
            f"{BENCHMARK}: prediction {record['id']!r} has the unknown question type "
            f"({modality!r}, {question_type!r}); known: {known}"
        )
    return modality, question_type


def score(predictions: Sequence[Mapping[str, Any]], mode: str = "official") -> BenchmarkScore:
    """MUSIC-AVQA accuracy of ``predictions`` under ``mode`` (``official`` | ``moka_compat``; module docstring)."""
    check_mode(mode)
    require_fields(predictions, FIELDS, BENCHMARK)
    if mode == MOKA_COMPAT:
        records, duplicates = list(predictions), len(predictions) - len({p["id"] for p in predictions})
    else:
        records, duplicates = first_per_id(predictions)

    # (modality, type) -> [correct, denominator, unparsable]
    tallies: dict[tuple[str, str], list[int]] = {}
    for record in records:
        key = question_group(record)
        truth = ground_truth(record)
        tally = tallies.setdefault(key, [0, 0, 0])
        if mode == MOKA_COMPAT:
            answer = parse_moka(record["prediction"])
            if answer is None:
                tally[2] += 1  # dropped from the denominator, as avqa_eval.py's `continue`
                continue
            right = truth in answer  # avqa_eval.py: `if answer in pred` (substring)
        else:
            answer = parse_official(record["prediction"])
            tally[2] += answer is None  # counted wrong, still in the denominator
            right = answer == truth
        tally[0] += right
        tally[1] += 1

    groups: dict[str, dict[str, float | int]] = {}
    for modality, types in QUESTION_TYPES.items():
        present = [(modality, t) for t in types if (modality, t) in tallies]
        for key in present:
            groups[f"{modality}/{key[1]}"] = accuracy_row(*tallies[key])
        if present:
            groups[modality] = accuracy_row(*_pool(tallies[key] for key in present))
    overall = _pool(tallies.values())
    groups[OVERALL] = accuracy_row(*overall)

    unparsable = overall[2]
    if mode == MOKA_COMPAT:
        notes = [
            f"moka_compat (MokA avqa_eval.py): {unparsable} prediction(s) without exactly one <answer> tag holding "
            "one of the 42 answer words were dropped from the denominator; a parsed answer is correct when the "
            "ground truth is a substring of it",
        ]
        if duplicates:
            notes.append(f"{duplicates} record(s) repeat an id and were all scored, as avqa_eval.py does")
    else:
        notes = [
            f"official: {unparsable} prediction(s) naming none of the 42 answer classes were counted wrong "
            "(kept in the denominator)",
            *dropped_note(duplicates),
        ]
    return BenchmarkScore(
        benchmark=BENCHMARK,
        mode=mode,
        main_name="accuracy",
        main=percent(overall[0], overall[1]),
        groups=groups,
        counts={"total": len(predictions), "scored": overall[1], "unparsable": unparsable, "duplicates": duplicates},
        notes=notes,
    )


def _pool(tallies: Any) -> list[int]:
    pooled = [0, 0, 0]
    for tally in tallies:
        pooled = [a + b for a, b in zip(pooled, tally, strict=True)]
    return pooled
