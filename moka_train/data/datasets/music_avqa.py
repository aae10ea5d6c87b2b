"""MUSIC-AVQA (CVPR'22): audio-visual question answering on ~60 s music performance videos.

Published layout (``root`` = the folder holding both; benchmarks.md §1)::

    root/json_update/avqa-{train,val,test}.json     the corrected annotations (``annotation_dir``; ``json`` = original)
    root/MUSIC-AVQA-Videos/<video_id>.mp4           the videos (``video_dir``)

Each annotation file is one JSON array of records with the fields ``video_id``, ``question_id``, ``type`` (JSON
*text* of a 2-list, e.g. ``"[\\"Audio\\", \\"Counting\\"]"``), ``question_content`` (a template with placeholders
such as ``<Object>``, ``<LR>``), ``templ_values`` (JSON text of a list), ``question_deleted`` and ``anser`` (the
answer; the key is misspelled in the release). The question is the template with its placeholders (``<[^>]+>``)
replaced by the values left to right, punctuation kept ("Is the guzheng louder than the piano?"); the official
classifier code instead drops the question mark and lower-cases a word list, which an LLM prompt does not need.

Both media come from the one mp4: the frames (``visual``, kind ``video``) and its sound track (``audio``, kind
``audio``). The prompt defaults to the official MokA audio-visual user turn with the question span
"Please answer this question: {question}". The target is the answer word (``target_format="word"``) or the
official output form ``<answer>X</answer>`` (``"tagged"``), which MokA's scorer extracts.

Record ids: ``music_avqa/<split>/<question_id>``. ``question_id`` is unique in ``json_update``; the original
``json`` test file repeats some (9,185 rows, 9,130 ids), so a repeated id gets a ``#2``, ``#3``... suffix in
file order (stable across runs) and the build warns once with the count.

Metadata (what the scorers read):

=====================  ==============================================================================
key                    value
=====================  ==============================================================================
``split``              the split built (``test``, ``val``, ``train``, or e.g. ``test_real``)
``question_id``        the record's ``question_id`` as in the file (int)
``video_id``           the 8-digit video id (str)
``question_modality``  ``Audio`` | ``Visual`` | ``Audio-Visual`` (first item of ``type``)
``question_type``      ``Counting`` | ``Comparative`` | ``Location`` | ``Existential`` | ``Temporal``
``answer``             the ground-truth answer, as written but stripped (``acoustic_guitar``, ``more than ten``)
``question``           the filled question (without the prompt's "Please answer this question: ")
``question_content``   the template as written
``templ_values``       the values filled in, in order (list of str)
=====================  ==============================================================================

The official report pools accuracy per (``question_modality``, ``question_type``), per modality and overall;
``ANSWERS`` is the 42-word answer vocabulary that MokA's scorer requires a parsed answer to belong to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moka_train.data.datasets.common import (
    audio_visual_media,
    dedupe_ids,
    id_field,
    load_json_array,
    prompt_media_order,
    record_error,
    require_fields,
    resolve_root,
    text_field,
)
from moka_train.data.prompts import AUDIO_VISUAL, Prompt
from moka_train.data.records import Record, check_media

# The official MokA audio-visual prompt: the question span covers the lead-in, as its <question_start/end> did.
DEFAULT_PROMPT = Prompt(AUDIO_VISUAL, question_prefix="Please answer this question: ")

# The nine question types of the benchmark (modality -> types), as in the paper's result tables.
QUESTION_TYPES: dict[str, tuple[str, ...]] = {
    "Audio": ("Counting", "Comparative"),
    "Visual": ("Counting", "Location"),
    "Audio-Visual": ("Existential", "Counting", "Location", "Comparative", "Temporal"),
}

# The 42 answer classes (MokA's answer_list; val/test use 41 of them, no "ten").
ANSWERS: tuple[str, ...] = (
    *["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
    "more than ten",
    *["yes", "no", "left", "middle", "right", "indoor", "outdoor", "simultaneously"],
    *[
        "accordion",
        "acoustic_guitar",
        "bagpipe",
        "banjo",
        "bassoon",
        "cello",
        "clarinet",
        "congas",
        "drum",
        "electric_bass",
        "erhu",
        "flute",
        "guzheng",
        "piano",
        "pipa",
        "saxophone",
        "suona",
        "trumpet",
        "tuba",
        "ukulele",
        "violin",
        "xylophone",
    ],
)

TARGET_FORMATS = ("word", "tagged")
TEMPLATE_PLACEHOLDER = re.compile(r"<[^>]+>")
_SPLIT = re.compile(r"(train|val|test)(_real|_fake)?")


def build_music_avqa(
    root: str | Path,
    split: str = "test",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    *,
    annotation_dir: str = "json_update",
    video_dir: str = "MUSIC-AVQA-Videos",
    target_format: str = "word",
) -> list[Record]:
    """Records of one MUSIC-AVQA split: ``root/<annotation_dir>/avqa-<split>.json`` with the videos under
    ``root/<video_dir>``. ``split``: ``train`` | ``val`` | ``test`` (optionally ``_real`` / ``_fake``).
    ``target_format``: ``word`` (the answer) or ``tagged`` (``<answer>X</answer>``, the official output form).
    Malformed records raise a ValueError naming the file, the record's index and its question_id."""
    if not isinstance(split, str) or not _SPLIT.fullmatch(split):
        raise ValueError(f"MUSIC-AVQA split must be train, val or test (optionally _real / _fake), got {split!r}")
    target = target_formatter(target_format)
    root = resolve_root(root)

    def parse(item: Any) -> ParsedQuestion:
        fields = _parse_record(item)
        video = root / video_dir / f"{fields['video_id']}.mp4"
        return fields, target(fields["answer"]), video, video

    return avqa_records(
        root / annotation_dir / f"avqa-{split}.json",
        parse,
        dataset="MUSIC-AVQA",
        name="music_avqa",
        split=split,
        prompt=DEFAULT_PROMPT if prompt is None else prompt,
        on_missing=on_missing,
    )


# -- shared with moka_official.py -----------------------------------------------------------------------------------

# One question read by a builder's parser: its metadata fields (``question_id`` and ``question`` among them), the
# assistant target, and the files of its frames and of its sound.
ParsedQuestion = tuple[dict[str, Any], str, Path, Path]


def avqa_records(
    path: Path,
    parse: Callable[[Any], ParsedQuestion],
    *,
    dataset: str,
    name: str,
    split: str,
    prompt: Prompt,
    on_missing: str,
) -> list[Record]:
    """The records of a MUSIC-AVQA annotation file (the release's or MokA's: one JSON array), one per item as
    ``parse`` reads it; a ValueError from ``parse`` is re-raised naming the file, the item's index and its
    question_id. Ids: ``<name>/<split>/<question_id>``, repeats suffixed (``dedupe_ids``); metadata: ``split``
    and the parsed fields. ``dataset`` names the benchmark in messages ("MokA MUSIC-AVQA")."""
    order = prompt_media_order(prompt, ("visual", "audio"), dataset)
    records = []
    for index, item in enumerate(load_json_array(path, f"{dataset} annotations")):
        try:
            fields, target, video, audio = parse(item)
        except ValueError as error:
            raise record_error(path, index, item, "question_id", error) from None
        messages, span = prompt.messages(fields["question"], target)
        records.append(
            Record(
                id=f"{name}/{split}/{fields['question_id']}",
                messages=messages,
                question_span=span,
                media=audio_visual_media(order, video, audio),
                metadata={"split": split, **fields},
            )
        )
    dedupe_ids(records, str(path), stacklevel=4)
    return check_media(records, on_missing, source=str(path))


def parse_question_type(value: Any) -> tuple[str, str]:
    """``type`` -> (modality, question type). The release stores it as JSON text of a 2-list; a parsed list is
    accepted too (converted copies). Unknown modalities or types are errors: scorers pool by them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"'type' is not JSON text of a list: {value!r}") from None
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'type' must be a [modality, question type] pair of strings, got {value!r}")
    modality, question_type = value
    if question_type not in QUESTION_TYPES.get(modality, ()):
        known = "; ".join(f"{m}: {', '.join(types)}" for m, types in QUESTION_TYPES.items())
        raise ValueError(f"unknown question type {value!r} (known: {known})")
    return modality, question_type


def target_formatter(target_format: str) -> Callable[[str], str]:
    """The answer -> assistant target function for ``target_format`` (``word`` | ``tagged``)."""
    formats = {"word": lambda answer: answer, "tagged": lambda answer: f"<answer>{answer}</answer>"}
    if target_format not in formats:
        raise ValueError(f"target_format must be one of {TARGET_FORMATS}, got {target_format!r}")
    return formats[target_format]


# -- MUSIC-AVQA's own fields --------------------------------------------------------------------------------------

_FIELDS = ("video_id", "question_id", "type", "question_content", "templ_values", "anser")


def _parse_record(item: Any) -> dict[str, Any]:
    item = require_fields(item, _FIELDS)
    template = text_field(item, "question_content")
    values = item["templ_values"]
    if isinstance(values, str):
        try:
            values = json.loads(values)
        except json.JSONDecodeError:
            raise ValueError(f"'templ_values' is not JSON text of a list: {values!r}") from None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"'templ_values' must be a list of strings, got {values!r}")
    modality, question_type = parse_question_type(item["type"])
    return {
        "question_id": id_field(item, "question_id"),
        "video_id": text_field(item, "video_id"),
        "question_modality": modality,
        "question_type": question_type,
        "answer": text_field(item, "anser").strip(),
        "question": fill_template(template, values),
        "question_content": template,
        "templ_values": values,
    }


def fill_template(template: str, values: list[str]) -> str:
    """Replace the placeholders left to right by ``values``, keeping the punctuation; surrounding whitespace is
    dropped (two templates end with a space). The counts must agree: a mismatch means a corrupt record."""
    slots = TEMPLATE_PLACEHOLDER.findall(template)
    if len(slots) != len(values):
        raise ValueError(
            f"question_content has {len(slots)} placeholder(s) {slots} but templ_values has {len(values)} "
            f"value(s) {values}: {template!r}"
        )
    filled = iter(values)
    return TEMPLATE_PLACEHOLDER.sub(lambda _: next(filled), template).strip()
