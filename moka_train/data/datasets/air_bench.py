"""AIR-Bench Foundation (Yang et al., ACL 2024): single-choice questions on audio; the speech tasks by default.

Files as users download them (HF qyang1021/AIR-Bench-Dataset): ``<root>/Foundation/Foundation_meta.json``, a
JSON array, and the clips ``<root>/Foundation/<task_name>_<dataset_name>/<path>``. Fields (benchmarks.md §8):
``path``, ``question``, ``choice_a``, ``choice_b``, ``choice_c`` and ``choice_d`` (optional: absent or null
when a question has fewer options), ``answer_gt`` (the correct option's *text*), ``task_name``,
``dataset_name``, ``uniq_id`` (int). Task names keep the benchmark's spelling (``Speaker_Emotion_Recontion``,
``Speech_Entity_Reconition``).

**Audio file names.** The ``Audio_Grounding`` clips are ``.flac`` although ``path`` ends in ``wav`` (the
official ``Inference_Foundation.py`` swaps the extension for that task alone). The builder tries the listed
path, then the same name with the other of ``.wav`` / ``.flac``, for every task: it finds the file whichever
task's copy was re-encoded, and reports the listed path when neither exists.

**Prompt.** The official instruction, question and options, as ``Inference_Foundation.py`` writes them::

    Choose the most suitable answer from options A, B, C, and D to respond the question in next line, you may
    only choose A or B or C or D.
    {question}
    A. {choice_a}
    B. {choice_b}
    C. {choice_c}
    D. {choice_d}

The official script prints a missing option as ``None`` (``C. None``): ``missing_options: none`` (default)
keeps that, so prompts match the published setup byte for byte; ``omit`` drops the lines of missing options.
The instruction is the default prompts' ``question_prefix``, so the question span covers the instruction,
question and options (all of the task text). The target is the correct option's letter: the official
``score_foundation.py`` reads the first character of the response (or the one before its last, for "The
answer is A.") as the letter, and it also drops unparsable responses from the denominator.

Speech tasks use ``prompt`` (``<speech>``), the others ``audio_prompt`` (``<audio>``).

Metadata (what scorers read; the official result line is recoverable from it):

================= ===================================================================================
key               value
================= ===================================================================================
``uniq_id``       int, the benchmark's id
``task_name``     str, as in the file
``dataset_name``  str, as in the file
``group``         ``<task_name>_<dataset_name>``: the official per-dataset accuracy key
``question``      str, the question as in the file
``choices``       list of 4: the texts of options A-D, None where the option is missing
``answer_gt``     str, the correct option's text
``answer_letter`` str, its letter: the first option whose text equals ``answer_gt`` (the official rule)
``path``          str, the file's ``path`` (relative to the task folder)
``split``         ``Foundation``
================= ===================================================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moka_train.data.datasets.common import (
    absolute_root,
    check_unique,
    load_json_array,
    record_error,
    require_fields,
    require_strings,
)
from moka_train.data.prompts import AUDIO, SPEECH, Prompt
from moka_train.data.records import MediaRef, Record, check_media
from moka_train.evaluation.metrics.air_bench import SPEECH_TASKS

INSTRUCTION = (
    "Choose the most suitable answer from options A, B, C, and D to respond the question in next line, "
    "you may only choose A or B or C or D."
)
LETTERS = ("A", "B", "C", "D")
OPTION_FIELDS = ("choice_a", "choice_b", "choice_c", "choice_d")
REQUIRED = ("path", "question", "choice_a", "choice_b", "answer_gt", "task_name", "dataset_name", "uniq_id")
MISSING_OPTIONS = ("none", "omit")
# The other extension to try when the listed file is absent (Audio_Grounding's .flac files listed as wav).
OTHER_EXTENSION = {".wav": ".flac", ".flac": ".wav"}


def official_question(question: str, choices: Sequence[str | None], missing_options: str = "none") -> str:
    """The question and its options as the official script writes them after the instruction line."""
    lines = [
        f"{letter}. {choice}"
        for letter, choice in zip(LETTERS, choices, strict=True)
        if choice is not None or missing_options == "none"
    ]
    return "\n".join([question, *lines])


def _audio_file(folder: Path, listed: str) -> str:
    """The listed file, else its other-extension twin when that exists, else the listed one (reported missing)."""
    path = os.path.normpath(folder / listed)
    stem, extension = os.path.splitext(path)
    other = OTHER_EXTENSION.get(extension.lower())
    if not os.path.isfile(path) and other is not None and os.path.isfile(stem + other):
        return stem + other
    return path


def _check_item(item: Any) -> tuple[list[str | None], str]:
    """Validate one question; return its options A-D (None where missing) and the correct letter."""
    item = require_fields(item, REQUIRED, null_is_missing=True)
    if not isinstance(item["uniq_id"], int) or isinstance(item["uniq_id"], bool):
        raise ValueError("uniq_id must be an integer")
    require_strings(item, ("path", "question", "answer_gt", "task_name", "dataset_name"), optional=OPTION_FIELDS)
    choices = [item.get(field) for field in OPTION_FIELDS]
    # The official scorer's rule: the first option whose text equals answer_gt (it exits when none does).
    letter = next((lt for lt, choice in zip(LETTERS, choices, strict=True) if choice == item["answer_gt"]), None)
    if letter is None:
        raise ValueError(f"answer_gt {item['answer_gt']!r} is none of the options {choices}")
    return choices, letter


def build_air_bench(
    root: str | Path,
    split: str = "Foundation",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    tasks: Sequence[str] | None = SPEECH_TASKS,
    missing_options: str = "none",
    audio_prompt: Prompt | None = None,
) -> list[Record]:
    """Records of ``<root>/Foundation/Foundation_meta.json`` whose ``task_name`` is in ``tasks`` (None: all).

    ``split``: only ``Foundation`` (the Chat set is open-ended, scored by a GPT judge, in another format).
    ``missing_options``: ``none`` prints a missing option as ``None`` as the official script does; ``omit``
    leaves it out. ``prompt`` / ``audio_prompt``: the user turns of speech / other tasks, both with the
    official instruction as their ``question_prefix`` by default. A task in ``tasks`` that is neither one of
    ``SPEECH_TASKS`` nor in the file is an error (names are easy to misspell: the benchmark's have typos).
    """
    if split != "Foundation":
        raise ValueError(f"only the AIR-Bench Foundation split is supported, got {split!r}")
    if missing_options not in MISSING_OPTIONS:
        raise ValueError(f"missing_options must be one of {MISSING_OPTIONS}, got {missing_options!r}")
    root = absolute_root(root)
    prefix = INSTRUCTION + "\n"
    prompts = {
        "speech": prompt or Prompt(SPEECH, question_prefix=prefix),
        "audio": audio_prompt or Prompt(AUDIO, question_prefix=prefix),
    }
    wanted = None if tasks is None else ([tasks] if isinstance(tasks, str) else list(tasks))
    source = root / split / f"{split}_meta.json"
    items = load_json_array(source, "AIR-Bench annotations")
    checked = []
    for index, item in enumerate(items):
        try:
            checked.append(_check_item(item))
        except ValueError as error:
            raise record_error(source, index, item, "uniq_id", error) from None
    if wanted is not None:
        # A misspelt task would silently select nothing: a name that is neither a speech task nor in the file is
        # an error (a speech task missing from a partial copy of the file is not).
        in_file = {item["task_name"] for item in items}
        unknown = sorted(set(wanted) - in_file - set(SPEECH_TASKS))
        if unknown:
            raise ValueError(f"{source} has no question of the task(s) {unknown}; its tasks are {sorted(in_file)}")
    records = []
    seen: dict[int, str] = {}
    for index, (item, (choices, letter)) in enumerate(zip(items, checked, strict=True)):
        uniq_id = item["uniq_id"]
        check_unique(seen, uniq_id, "uniq_id", where=f"{source}: record {index}", place=f"record {index}")
        if wanted is not None and item["task_name"] not in wanted:
            continue
        group = f"{item['task_name']}_{item['dataset_name']}"
        modality = "speech" if item["task_name"] in SPEECH_TASKS else "audio"
        messages, span = prompts[modality].messages(
            official_question(item["question"], choices, missing_options), letter
        )
        records.append(
            Record(
                id=f"air_bench/{split.lower()}/{uniq_id}",
                messages=messages,
                question_span=span,
                media=[MediaRef(modality, _audio_file(root / split / group, item["path"]), "audio")],
                metadata={
                    "uniq_id": uniq_id,
                    "task_name": item["task_name"],
                    "dataset_name": item["dataset_name"],
                    "group": group,
                    "question": item["question"],
                    "choices": choices,
                    "answer_gt": item["answer_gt"],
                    "answer_letter": letter,
                    "path": item["path"],
                    "split": split,
                },
            )
        )
    return check_media(records, on_missing, source=str(source))
