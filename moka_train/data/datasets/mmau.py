"""MMAU test-mini (Sakshi et al., 2024): audio multiple-choice questions; the speech subset by default.

Files as users download them (github.com/Sakshi113/MMAU, HF gamma-lab-umd/MMAU-test-mini):
``<root>/mmau-test-mini.json``, a JSON array of 1,000 questions (sound 333, music 334, speech 333 in version
v05.15.25), and the clips ``<root>/test-mini-audios/<id>.wav``, named by each record's ``audio_id``
(``./test-mini-audios/<id>.wav``, relative to ``root``). Fields (benchmarks.md §7): ``id``, ``audio_id``,
``question``, ``choices`` (2 to 8 strings), ``answer`` (one of the choices, as text), ``dataset``, ``task``
(``sound|music|speech``), ``category``, ``sub-category``, ``difficulty``.

**Choices as text.** The official ``evaluation.py`` scores the prediction's word tokens against the choices'
*text* (correct iff it holds every token of the answer and none that only other choices have), so a letter
answer scores wrong and a "(A) " prefix can collide with a choice containing the word "a". The default
``choice_format: text`` lists the choices as lines and asks for the choice text; the target is the answer
text. ``choice_format: letter`` is lmms-eval's form (``A. ...`` lines, "Answer with the option's letter from
the given choices directly.", target the letter): its scorer must map the letter back through
``metadata["letters"]`` before the official rule applies. MMAU publishes no prompt of its own.

``category`` is normalised: 13 records of v05.15.25 hold the string ``"['Reasoning']"`` (a Python list
printed into the JSON) for ``Reasoning``; ``category_raw`` keeps what the file says.

Speech questions use ``prompt`` (the ``<speech>`` user turn: Whisper's modality), sound and music ones
``audio_prompt`` (``<audio>``: BEATs). The question span is the question with its choices and the answer
instruction: all of the task text.

Metadata (what scorers read; the keys of the official JSON are recoverable from it):

================== ==========================================================================
key                value
================== ==========================================================================
``id``             str, the record's uuid (the official JSON's ``id``)
``question``       str, the question as in the file
``choices``        list[str], the choices in file order
``answer``         str, the correct choice's text (the official ``answer``)
``answer_letter``  str, its letter in ``choices`` order (A = first)
``letters``        dict letter -> choice text, for letter-form predictions
``choice_format``  ``text`` or ``letter``: the form the prompt asked for
``task``           ``sound`` / ``music`` / ``speech``
``category``       ``Reasoning`` / ``Information Extraction`` (normalised)
``category_raw``   the file's ``category`` value
``sub_category``   str (the file's ``sub-category``)
``difficulty``     ``easy`` / ``medium`` / ``hard``
``dataset``        str, the source corpus (``meld``, ``iemocap``, ``synthetic``, ...)
``split``          the annotation file's split (``test-mini``)
================== ==========================================================================
"""

from __future__ import annotations

import ast
import os
import string
from collections.abc import Callable, Sequence
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

TASKS = ("sound", "music", "speech")
CATEGORIES = ("Reasoning", "Information Extraction")
REQUIRED = (
    "id",
    "audio_id",
    "question",
    "choices",
    "answer",
    "dataset",
    "task",
    "category",
    "sub-category",
    "difficulty",
)
TEXT_INSTRUCTION = "Answer with the exact text of the correct choice and nothing else."
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."  # lmms-eval's
# Which modality (and so which encoder and prompt) each task's clips go to.
TASK_MODALITY = {"sound": "audio", "music": "audio", "speech": "speech"}


def _text_form(question: str, choices: list[str], answer: str, instruction: str | None) -> tuple[str, str]:
    lines = "\n".join(f"- {choice}" for choice in choices)
    return f"{question}\nChoices:\n{lines}\n{instruction or TEXT_INSTRUCTION}", answer


def _letter_form(question: str, choices: list[str], answer: str, instruction: str | None) -> tuple[str, str]:
    letters = string.ascii_uppercase
    lines = "\n".join(f"{letters[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{question}\n{lines}\n{instruction or LETTER_INSTRUCTION}", letters[choices.index(answer)]


# choice_format -> (question, choices, answer, instruction) -> (question text, target)
CHOICE_FORMATS: dict[str, Callable[[str, list[str], str, str | None], tuple[str, str]]] = {
    "text": _text_form,
    "letter": _letter_form,
}


def normalise_category(value: str) -> str:
    """``"['Reasoning']"`` (a printed one-item list) -> ``"Reasoning"``; other values unchanged."""
    if value.startswith("["):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
        if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], str):
            return parsed[0]
    return value


def _check_item(item: Any) -> str:
    """Validate one question; return its category, normalised."""
    item = require_fields(item, REQUIRED)
    require_strings(item, ("id", "audio_id", "question", "answer", "task", "category"))
    if not item["id"] or not item["audio_id"]:
        raise ValueError("id and audio_id must not be empty")
    choices = item["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"choices must be a list of two or more strings, got {choices!r}")
    if item["answer"] not in choices:
        raise ValueError(f"the answer {item['answer']!r} is not one of the choices {choices}")
    if item["task"] not in TASKS:
        raise ValueError(f"unknown task {item['task']!r}; MMAU tasks are {TASKS}")
    category = normalise_category(item["category"])
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {item['category']!r}; MMAU categories are {CATEGORIES}")
    if Path(item["audio_id"]).is_absolute():
        raise ValueError(f"audio_id {item['audio_id']!r} must be relative to the dataset folder")
    return category


def build_mmau(
    root: str | Path,
    split: str = "test-mini",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    tasks: Sequence[str] = ("speech",),
    choice_format: str = "text",
    instruction: str | None = None,
    audio_prompt: Prompt | None = None,
) -> list[Record]:
    """Records of ``<root>/mmau-<split>.json`` whose task is in ``tasks``, with the answer as the target.

    ``tasks``: any of ``sound``, ``music``, ``speech``. ``choice_format``: ``text`` (the official scorer's
    form, default) or ``letter`` (lmms-eval's). ``instruction``: the line after the choices (default: the
    format's own). ``prompt``: the user turn of speech questions (default ``<speech>``); ``audio_prompt``:
    that of sound and music questions (default ``<audio>``).
    """
    root = absolute_root(root)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown MMAU task(s) {unknown}; tasks are {TASKS}")
    if choice_format not in CHOICE_FORMATS:
        raise ValueError(f"choice_format must be one of {sorted(CHOICE_FORMATS)}, got {choice_format!r}")
    prompts = {"speech": prompt or Prompt(SPEECH), "audio": audio_prompt or Prompt(AUDIO)}
    source = root / f"mmau-{split}.json"
    records = []
    seen: dict[str, str] = {}
    for index, item in enumerate(load_json_array(source, "MMAU annotations")):
        try:
            category = _check_item(item)
        except ValueError as error:
            raise record_error(source, index, item, "id", error) from None
        check_unique(seen, item["id"], "id", where=f"{source}: record {index}", place=f"record {index}")
        if item["task"] not in tasks:
            continue
        choices, answer = item["choices"], item["answer"]
        question, target = CHOICE_FORMATS[choice_format](item["question"], choices, answer, instruction)
        modality = TASK_MODALITY[item["task"]]
        messages, span = prompts[modality].messages(question, target)
        letters = dict(zip(string.ascii_uppercase, choices, strict=False))
        records.append(
            Record(
                id=f"mmau/{split}/{item['id']}",
                messages=messages,
                question_span=span,
                media=[MediaRef(modality, os.path.normpath(root / item["audio_id"]), "audio")],
                metadata={
                    "id": item["id"],
                    "question": item["question"],
                    "choices": list(choices),
                    "answer": answer,
                    "answer_letter": string.ascii_uppercase[choices.index(answer)],
                    "letters": letters,
                    "choice_format": choice_format,
                    "task": item["task"],
                    "category": category,
                    "category_raw": item["category"],
                    "sub_category": item["sub-category"],
                    "difficulty": item["difficulty"],
                    "dataset": item["dataset"],
                    "split": split,
                },
            )
        )
    return check_media(records, on_missing, source=str(source))
