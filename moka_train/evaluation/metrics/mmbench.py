"""MMBench: multiple choice, scored with CircularEval (benchmarks.md §4, VLMEvalKit).

Record format (``moka_train.data.datasets.mmbench`` metadata plus ``generate``'s fields): ``id``,
``prediction``, ``answer`` (the GT letter, bare ``A`` or as the MokA target ``(A)``), ``options`` (letter ->
option text, this row's order), ``group_index`` (``index % 1_000_000``: the question a row's circular copies
share). Read when present: ``circular_offset`` (which pass; the pass-0 row names the group's categories),
``l2_category`` and ``category`` (the L2 / L3 abilities; MokA's released file has neither).

``official`` (VLMEvalKit ``multiple_choice.py`` under ``exact_matching``, option extraction from
``vlmeval/utils/matching_util.py`` ``can_infer``):

- de-duplication by ``id`` (the first record of an id is kept): sampler padding repeats records;
- option match: ``.()[],:;!*#{}`` become spaces, the text is split on whitespace; if exactly one option
  letter is a token and (first occurrence) among the last 4 tokens -> that letter ("Apple" holds no token
  "A"; "A" as an article *is* one, as in VLMEvalKit); with no letter token and a lone ``Z`` token -> Z;
  else ``(correct )?answer is **X**`` (the words in any case, X a bold capital) -> X; refusal phrases -> Z;
  then text match: if the answer is at most twice the options' total length and exactly one option text
  (lower-cased) is a substring -> that letter. Anything else would go to an LLM judge, which
  ``exact_matching`` replaces by "wrong": unparsable (and Z) answers are wrong and counted in ``unparsable``;
- CircularEval: a question (``group_index``) scores 1 only if every one of its rows maps to that row's GT;
  Overall = mean over questions, x100 (the headline); then per L2 and L3 category when the records have
  them. The row ``single_pass`` is the plain accuracy over all rows with the same parser, for comparison.

``moka_compat`` (MokA's ``eval_mmbench.py`` ``check``): every row scored alone (no CircularEval), sampler
padding duplicates counted; the response stripped and lower-cased, then the first of ``'a '``, ``'b '``,
``'c '``, ``'d '``, ``'e '`` that is a substring gives the option (so "a cat" -> A); none -> wrong (and
counted in ``unparsable``). MokA decoded with special tokens kept, so a finished answer reads ``A </s>``
(Llama-2-chat's format generates a space before ``</s>``); the rule reads ``raw_output`` where a record has it
(``generate`` decodes the same way there; ``prediction`` is the bare ``A``, which has no ``'a '``), else
``prediction`` (MokA's released outputs). ``(A) </s>`` fails too (``a)``, not ``a ``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from moka_train.evaluation.metrics import MOKA_COMPAT, OFFICIAL, BenchmarkScore, check_mode, require_fields
from moka_train.evaluation.metrics.common import accuracy_row, first_per_id, read_release_lines, sampler_slots

BENCHMARK = "mmbench"
FIELDS = ("id", "prediction", "answer", "options", "group_index")
MOKA_FIELDS = ("id", "prediction", "answer")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MOKA_LETTERS = "abcde"
PUNCTUATION = ".()[],:;!*#{}"
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
API_FAILURE = "Failed to obtain answer via API"
# The letter must be bold and upper case: "The answer is **B**". A plain "answer is dog" is left to the text
# match (a loose pattern read it as D, the word's first letter).
VERBOSE_ANSWER = re.compile(r"(?i:(?:correct\s+)?answer\s+is)\s+\*\*([A-Z])\*\*")


# ---------------------------------------------------------------------------------------------- parsers
def can_infer_option(answer: str, choices: Mapping[str, Any]) -> str | None:
    """VLMEvalKit's ``can_infer_option``: an option letter (or ``Z``) named in ``answer``, else None."""
    if API_FAILURE in answer:
        return None
    if any(phrase in answer for phrase in REFUSALS):
        return "Z"
    text = answer
    for character in PUNCTUATION:
        text = text.replace(character, " ")
    tokens = text.split()
    count = sum(letter in tokens for letter in choices)
    if count == 1:
        for letter in choices:
            # only a letter near the end: "A is wrong, so the answer is C" has two letters anyway
            if letter in tokens and tokens.index(letter) > len(tokens) - 5:
                return letter
    elif count == 0 and "Z" in tokens:
        return "Z"
    match = VERBOSE_ANSWER.search(answer)
    if match and match.group(1) in choices:
        return match.group(1)
    return None


def can_infer_text(answer: str, choices: Mapping[str, Any]) -> str | None:
    """VLMEvalKit's ``can_infer_text``: the one option whose text is in a short enough answer, else None."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(text)) for text in choices.values()):
        return None
    hits = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: Any, choices: Mapping[str, Any]) -> str | None:
    """VLMEvalKit's ``can_infer``: option match, then text match; None when neither decides."""
    answer = "" if answer is None else str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def moka_response(record: Mapping[str, Any]) -> Any:
    """The text MokA's scripts scored: ``raw_output`` (special tokens kept, as they decoded) when the record has
    it, else ``prediction``."""
    return record["raw_output"] if "raw_output" in record else record["prediction"]


def parse_moka(response: Any) -> str | None:
    """MokA's rule: the first of ``'a '`` ... ``'e '`` in the stripped, lower-cased response -> that letter
    (upper case), else None."""
    pred = ("" if response is None else str(response)).strip().lower()
    for letter in MOKA_LETTERS:
        if f"{letter} " in pred:
            return letter.upper()
    return None


def gt_letter(record: Mapping[str, Any], position: int, benchmark: str = BENCHMARK) -> str:
    """The GT letter of a record whose ``answer`` is ``A`` or ``(A)``."""
    answer = record["answer"]
    letter = "" if answer is None else str(answer).strip().strip("()").strip().upper()
    if len(letter) != 1 or letter not in LETTERS:
        hidden = " (MMBench TEST answers are hidden: submit to the evaluation server)" if answer is None else ""
        raise ValueError(
            f"{benchmark}: prediction {record.get('id', position)!r} has answer {answer!r}, not an option "
            f"letter{hidden}"
        )
    return letter


def _options(record: Mapping[str, Any], position: int) -> dict[str, Any]:
    options = record["options"]
    if not isinstance(options, Mapping) or not options or not all(k in LETTERS for k in options):
        raise ValueError(
            f"{BENCHMARK}: prediction {record.get('id', position)!r} has options {options!r}; "
            "expected a mapping of option letters to texts"
        )
    return dict(options)


# ---------------------------------------------------------------------------------------------- scoring
def score(predictions: Sequence[Mapping[str, Any]], mode: str = OFFICIAL) -> BenchmarkScore:
    """MMBench accuracy: CircularEval (official) or MokA's single-pass substring rule (see the module docstring)."""
    check_mode(mode)
    if mode == OFFICIAL:
        require_fields(predictions, FIELDS, BENCHMARK)
        return _score_official(predictions)
    require_fields(predictions, MOKA_FIELDS, BENCHMARK)
    return _score_moka(predictions)


def _score_official(predictions: Sequence[Mapping[str, Any]]) -> BenchmarkScore:
    kept, duplicates = first_per_id(predictions)

    groups: dict[Any, list[tuple[Mapping[str, Any], bool]]] = {}
    unparsable = 0
    for position, record in enumerate(kept):
        options = _options(record, position)
        truth = gt_letter(record, position)
        if truth not in options:
            raise ValueError(
                f"{BENCHMARK}: prediction {record.get('id', position)!r} has answer {truth!r}, which is not among "
                f"its options {sorted(options)}"
            )
        pred = can_infer(record["prediction"], options)
        unparsable += pred in (None, "Z")
        groups.setdefault(record["group_index"], []).append((record, pred == truth))

    hits = {key: all(right for _, right in rows) for key, rows in groups.items()}
    result: dict[str, dict[str, float | int]] = {"overall": accuracy_row(sum(hits.values()), len(hits))}
    notes = [
        "official (VLMEvalKit exact matching): unparsable answers (no option by can_infer) count as wrong, "
        "and fail their whole circular group",
        f"{duplicates} duplicate record(s) (same id, sampler padding) scored once, the first kept",
    ]
    for field, prefix in (("l2_category", "l2"), ("category", "l3")):
        tallies: dict[str, list[int]] = {}
        missing = 0
        for key, rows in groups.items():
            first = min(rows, key=lambda row: row[0].get("circular_offset", 0))[0]  # the pass-0 row
            name = first.get(field)
            if name is None:
                missing += 1
                continue
            tally = tallies.setdefault(f"{prefix}/{name}", [0, 0])
            tally[0] += hits[key]
            tally[1] += 1
        for name in sorted(tallies):
            result[name] = accuracy_row(*tallies[name])
        if missing:
            notes.append(f"{missing} question(s) without {field}: no {prefix} breakdown for them")
    rows = [right for rows in groups.values() for _, right in rows]
    result["single_pass"] = accuracy_row(sum(rows), len(rows))
    passes = [len(rows) for rows in groups.values()]
    if passes and max(passes) == 1:
        notes.append("every question has one row: CircularEval reduces to single-pass accuracy")
    counts = {
        "total": len(predictions),
        "scored": len(kept),
        "unparsable": unparsable,
        "duplicates": duplicates,
        "questions": len(groups),
    }
    return BenchmarkScore(
        BENCHMARK, OFFICIAL, "circular accuracy", result["overall"]["accuracy"], result, counts, notes
    )


def _score_moka(predictions: Sequence[Mapping[str, Any]]) -> BenchmarkScore:
    correct = unparsable = 0
    for position, record in enumerate(predictions):
        pred = parse_moka(moka_response(record))
        unparsable += pred is None
        correct += pred == gt_letter(record, position)
    result = {"overall": accuracy_row(correct, len(predictions))}
    notes = [
        "MokA rule: an answer with none of 'a '..'e ' is counted wrong (kept in the denominator)",
        "no CircularEval and no de-duplication: every row, sampler padding included, scores alone",
    ]
    counts = {"total": len(predictions), "scored": len(predictions), "unparsable": unparsable}
    return BenchmarkScore(BENCHMARK, MOKA_COMPAT, "accuracy", result["overall"]["accuracy"], result, counts, notes)


# ------------------------------------------------------------------------------------- MokA's release file
PROMPT = re.compile(r"<image_end>\n(?P<body>.*)\nOptions:\n(?P<options>.*?)\n\nPlease select", re.DOTALL)
OPTION = re.compile(r"^\(([A-E])\) (.*)$", re.MULTILINE)


def _parse_prompt(text: str, where: str) -> tuple[str | None, str, dict[str, str]]:
    """(hint, question, options) from MokA's user turn ``...<image_end>\\n[Hint: h\\n]Question: q\\nOptions:
    \\n(A) a\\n...\\n\\nPlease select ...``."""
    match = PROMPT.search(text)
    if match is None:
        raise ValueError(f"{where}: question is not MokA's MMBench prompt (no 'Options:' block)")
    body = match.group("body")
    hint = None
    if body.startswith("Hint: "):
        hint, _, body = body[len("Hint: ") :].rpartition("\nQuestion: ")
    elif body.startswith("Question: "):
        body = body[len("Question: ") :]
    options = dict(OPTION.findall(match.group("options")))
    if not options:
        raise ValueError(f"{where}: no '(A) ...' options in the prompt")
    return hint, body, options


def _circular_groups(items: Sequence[tuple[str, dict[str, str], str]]) -> list[tuple[int, int]]:
    """(group, pass) per row, in dataset order, for a legacy MMBench file: the originals first, then each
    pass of circular copies in the originals' order (only the originals with that many options); a copy is
    the next original in order with the same question and option multiset and the same GT option text.
    ``items``: (hint + question, options, GT letter) per row. Raises ValueError when the rows do not fit."""
    key = [(question, tuple(sorted(options.values()))) for question, options, _ in items]
    gt_text = [options.get(letter) for _, options, letter in items]
    originals = next((i for i in range(1, len(items)) if key[i] == key[0]), len(items))
    assigned = [(i, 0) for i in range(originals)]
    passes = [1] * originals  # rows so far per original
    current, pointer = 1, 0
    for row in range(originals, len(items)):
        for attempt in range(2):
            candidate = next(
                (
                    o
                    for o in range(pointer, originals)
                    if key[o] == key[row] and gt_text[o] == gt_text[row] and passes[o] == current
                ),
                None,
            )
            if candidate is not None or attempt:
                break
            current, pointer = current + 1, 0  # a new pass over the originals
        if candidate is None:
            raise ValueError(f"row {row} is not a circular copy of an earlier question")
        assigned.append((candidate, current))
        passes[candidate] += 1
        pointer = candidate + 1
    return assigned


def records_from_moka_release(path: str | os.PathLike, *, circular: bool = True) -> list[dict[str, Any]]:
    """Prediction records from MokA's released MMBench ``merged.jsonl`` (``{"rank", "index", "image_path":
    null, "question": <the full user turn>, "answer": "A", "output": [text]}``; 4,332 lines = the 4,329 rows of
    ``MMBench_DEV_EN_legacy.tsv`` + sampler padding), in file order.

    The file has no TSV index and no category. ``options``, ``hint`` and ``question`` are parsed from the
    prompt; with ``circular`` the circular groups are rebuilt from the legacy layout (originals first, then
    each pass of rotated copies: ``group_index`` = the original's dataset position, ``circular_offset`` = the
    pass), a ValueError if the file does not fit it; ``circular=False`` leaves those fields out
    (``moka_compat`` needs none). Padding lines keep the id of the row they repeat (``moka_padding: True``)."""
    rows = read_release_lines(path)
    slots, size = sampler_slots(rows, lambda row: (row["question"], row["answer"]))
    items: dict[int, tuple[str, dict[str, str], str]] = {}  # dataset position -> (hint + question, options, GT)
    parsed = []
    for number, (slot, row) in enumerate(zip(slots, rows, strict=True), 1):
        hint, question, options = _parse_prompt(str(row["question"]), f"{path}: line {number}")
        parsed.append((hint, question, options))
        items.setdefault(slot % size, (f"{hint}\n{question}", options, str(row["answer"])))
    groups: list[tuple[int, int]] | None = None
    if circular:
        try:
            groups = _circular_groups([items[position] for position in range(size)])
        except ValueError as error:
            raise ValueError(f"{path}: cannot rebuild the circular groups ({error}); use circular=False") from None
    records = []
    for slot, row, (hint, question, options) in zip(slots, rows, parsed, strict=True):
        position = slot % size
        record: dict[str, Any] = {
            "index": position,
            "id": f"{BENCHMARK}/moka_release/{position}",
            "prediction": row["output"][0],
            "answer": row["answer"],
            "question": question,
            "hint": hint,
            "options": options,
            "category": None,
            "l2_category": None,
            "split": "DEV_EN_legacy",
            "moka_padding": slot >= size,
        }
        if groups is not None:
            record["group_index"], record["circular_offset"] = groups[position]
        records.append(record)
    return records
