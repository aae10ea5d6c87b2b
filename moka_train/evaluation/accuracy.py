"""Exact-match accuracy of predictions (``generate.generate_predictions``), overall and per group.

A prediction is right when it equals the answer after ``normalize_answer`` on both: the text inside the first
``<answer>X</answer>`` if there is one (the official MokA output form), lower-cased, whitespace collapsed and
stripped, trailing punctuation dropped ("Two." == "two", "<answer>Yes</answer>" == "yes"). Nothing else: no
answer-vocabulary check, no synonyms (a full benchmark scorer is separate).

Grouping: ``key`` names the prediction field to pool by, or a sequence of fields whose values are joined with
``sep``. MUSIC-AVQA records (``moka_train.data.datasets.music_avqa``) carry the question type in two metadata
fields, ``question_modality`` (``Audio`` | ``Visual`` | ``Audio-Visual``) and ``question_type`` (``Counting``,
``Location``, ...); the benchmark's nine types are their pairs, so ``key=MUSIC_AVQA_TYPE`` gives groups like
``Audio-Visual/Counting``, and ``key="question_modality"`` the per-modality pooling of the official report.
(``data_prep/make_demo_data.py``'s ``summary.json`` names the same types with a space: ``sep=" "``.)
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

OVERALL = "overall"
# The nine MUSIC-AVQA question types as (modality, type) metadata pairs: "Audio-Visual/Counting".
MUSIC_AVQA_TYPE = ("question_modality", "question_type")
TAGGED = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


def normalize_answer(text: Any) -> str:
    """``<answer>X</answer>`` -> X, then lower-case, collapse whitespace, drop trailing punctuation."""
    text = "" if text is None else str(text)
    tagged = TAGGED.search(text)
    if tagged:
        text = tagged.group(1)
    text = " ".join(text.lower().split())
    while text and unicodedata.category(text[-1]).startswith("P"):
        text = text[:-1].rstrip()
    return text


def _group(prediction: Mapping[str, Any], key: str | Sequence[str], sep: str) -> str:
    keys = [key] if isinstance(key, str) else list(key)
    missing = [k for k in keys if k not in prediction]
    if missing:
        raise KeyError(
            f"prediction {prediction.get('id', '?')!r} has no {missing} field to group by "
            f"(fields: {sorted(prediction)})"
        )
    return sep.join(str(prediction[k]) for k in keys)


def accuracy_by(
    predictions: Iterable[Mapping[str, Any]],
    key: str | Sequence[str] | None,
    normalize: Callable[[Any], str] = normalize_answer,
    sep: str = "/",
) -> dict[str, dict[str, float | int]]:
    """``{group: {"correct", "total", "accuracy"}}`` per value of ``key`` (sorted), then ``"overall"``; with
    ``key=None`` only ``"overall"``. A prediction is correct when ``normalize(prediction["prediction"]) ==
    normalize(prediction["answer"])``. The accuracy of an empty group is 0."""
    counts: dict[str, list[int]] = {}
    overall = [0, 0]
    for prediction in predictions:
        right = int(normalize(prediction["prediction"]) == normalize(prediction["answer"]))
        overall[0] += right
        overall[1] += 1
        if key is not None:
            group = _group(prediction, key, sep)
            if group == OVERALL:
                raise ValueError(f"a group is named {OVERALL!r}, which is reserved for the pooled result")
            tally = counts.setdefault(group, [0, 0])
            tally[0] += right
            tally[1] += 1
    results = {group: counts[group] for group in sorted(counts)}
    results[OVERALL] = overall
    return {
        group: {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}
        for group, (correct, total) in results.items()
    }


def format_accuracy_table(
    results: Mapping[str, Mapping[str, float | int]], chance: Mapping[str, float] | None = None
) -> str:
    """``accuracy_by``'s results as a plain-text table: one line per group with its accuracy (percent), correct
    and total counts, and the chance accuracy (a fraction, shown as percent; ``-`` where a group has none) when
    ``chance`` is given."""
    width = max([len("group"), *(len(group) for group in results)])
    header = f"{'group':<{width}}  {'accuracy':>8}  {'correct':>7}  {'n':>6}" + (f"  {'chance':>7}" if chance else "")
    lines = [header, "-" * len(header)]
    for group, entry in results.items():
        line = f"{group:<{width}}  {entry['accuracy']:>8.2%}  {entry['correct']:>7}  {entry['total']:>6}"
        if chance:
            line += f"  {chance[group]:>7.2%}" if group in chance else f"  {'-':>7}"
        lines.append(line)
    return "\n".join(lines)
