"""SEED-Bench v1 (multiple choice over 12 evaluation dimensions: 9 on images, 3 on videos).

Files (HF ``AILab-CVC/SEED-Bench``) under ``root``: ``SEED-Bench.json`` = ``{"questions": [...],
"question_type": {dimension name: id}}`` and the images in ``SEED-Bench-image/``. A question:
``{"answer": "A", "choice_a".."choice_d", "data_id": "1454426_2591111986", "data_type": "image", "question",
"question_id": "101669", "question_type_id": 5}`` (+ ``segment`` [start, end] for dimensions 11 and 12).
``data_id`` is the image's file name, with or without its extension: ``<image_folder>/<data_id>`` is tried,
then ``<data_id>.jpg``.

Image dimensions 1-9 by default (the generation-style setup papers such as LLaVA report). Video questions
(dimensions 10-12, ``data_id`` like ``94328.webm`` or ``P03/P03_24.MP4``) with ``include_video=True``: the
record then has kind ``video`` with the video file ``<video_folder>/<data_id>`` (read as ``frames`` frames by
the media loader; the ``segment`` of dimensions 11/12 is in metadata, not applied). The official MokA
evaluation ran all questions and fed a video question the video's *first frame* (a black image when it
could not be read). ``dimensions`` narrows the question types further.

Prompt styles (``style``; the question block after the image, and the target):

- ``moka`` (default, the official MokA evaluation): ``Question: {q}\\nOptions:\\n(A) ...\\n(D) ...\\nPlease
  select the correct answer from the options above. Output only the selected option in the format (A), (B),
  (C), or (D). No explanation or extra text.`` in the user turn ``This is an image:\\n<image_start><image>
  <image_end>. {question}`` (the official ". " after the image included); target ``(A)``.
- ``llava`` (LLaVA-1.5's generation prompt): ``{q}\\nA. ...\\nD. ...\\nAnswer with the option's letter from
  the given choices directly.``; target ``A``.

The official SEED-Bench score ranks the four choices by likelihood instead; ``choices`` in metadata allows it.

Record ids: ``seed_bench/<question_id>``.

Metadata:

====================  ===============================================================================
key                   value
====================  ===============================================================================
``question_id``       the question's id (a string: ``"101669"``, video ones ``"v1738"``)
``question_type_id``  the dimension id, 1-12
``dimension``         the dimension's name (``Instances Counting``), from the file's ``question_type``
``question``          the question text
``choices``           letter -> choice text (A-D)
``answer``            the GT letter
``data_type``         ``image`` or ``video``
``data_id``           ``data_id`` as written
``segment``           ``[start, end]`` for dimensions 11 (seconds) and 12 (frames at 15 fps), else None
``split``             ``test`` (SEED-Bench has one split)
====================  ===============================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moka_train.data.datasets.common import MOKA_CHOICE_INSTRUCTION, check_unique, id_field, load_json, resolve_root
from moka_train.data.prompts import Prompt
from moka_train.data.records import MediaRef, Record, check_media

SPLITS = ("test",)
LETTERS = ("A", "B", "C", "D")
CHOICE_FIELDS = {letter: f"choice_{letter.lower()}" for letter in LETTERS}
STRING_FIELDS = ("answer", *CHOICE_FIELDS.values(), "data_id", "data_type", "question")
DATA_TYPES = ("image", "video")
# The dimensions of SEED-Bench v1, for files without a "question_type" table.
DIMENSIONS = {
    "Scene Understanding": 1,
    "Instance Identity": 2,
    "Instance Attributes": 3,
    "Instance Location": 4,
    "Instances Counting": 5,
    "Spatial Relation": 6,
    "Instance Interaction": 7,
    "Visual Reasoning": 8,
    "Text Understanding": 9,
    "Action Recognition": 10,
    "Action Prediction": 11,
    "Procedure Understanding": 12,
}
MOKA_PROMPT = Prompt("This is an image:\n<image_start><image><image_end>. {question}")
MOKA_INSTRUCTION = MOKA_CHOICE_INSTRUCTION


def _moka_question(question: str, choices: dict[str, str]) -> str:
    options = "".join(f"\n({letter}) {choice}" for letter, choice in choices.items())
    return f"Question: {question}\nOptions:{options}\n{MOKA_INSTRUCTION}"


def _llava_question(question: str, choices: dict[str, str]) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in choices.items())
    return f"{question}{options}\nAnswer with the option's letter from the given choices directly."


# style -> (question block builder, target format with {letter})
STYLES: dict[str, tuple[Callable[[str, dict[str, str]], str], str]] = {
    "moka": (_moka_question, "({letter})"),
    "llava": (_llava_question, "{letter}"),
}


def build_seed_bench(
    root: str | os.PathLike,
    split: str = "test",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    *,
    include_video: bool = False,
    dimensions: Sequence[int] | None = None,
    style: str = "moka",
    annotation: str = "SEED-Bench.json",
    image_folder: str = "SEED-Bench-image",
    video_folder: str = "videos",
) -> list[Record]:
    """Records of SEED-Bench v1 in file order: image questions, plus video ones with ``include_video``,
    of the ``dimensions`` given (all by default)."""
    if split not in SPLITS:
        raise ValueError(f"SEED-Bench has one split, {SPLITS[0]!r}; got {split!r}")
    if style not in STYLES:
        raise ValueError(f"unknown SEED-Bench prompt style {style!r}; known: {list(STYLES)}")
    build_question, target_format = STYLES[style]
    prompt = prompt or MOKA_PROMPT
    root = resolve_root(root)
    path = root / annotation
    questions, names = _load(path)
    wanted = None if dimensions is None else {int(d) for d in dimensions}
    if wanted is not None and not wanted <= set(names):
        raise ValueError(f"unknown SEED-Bench dimensions {sorted(wanted - set(names))}; known: {sorted(names)}")
    folders = {"image": root / image_folder, "video": root / video_folder}
    kinds = DATA_TYPES if include_video else ("image",)

    records, seen = [], {}
    for position, item in enumerate(questions):
        known_id = isinstance(item, dict) and isinstance(item.get("question_id"), (str, int))
        where = f"{path}: question {position}" + (f" (id {item['question_id']})" if known_id else "")
        try:
            _check(item, names)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        qid = str(item["question_id"])
        check_unique(seen, qid, "question_id", where=where, place=f"question {position}")
        if item["data_type"] not in kinds or (wanted is not None and item["question_type_id"] not in wanted):
            continue
        choices = {letter: item[field] for letter, field in CHOICE_FIELDS.items()}
        messages, span = prompt.messages(
            build_question(item["question"], choices), target_format.format(letter=item["answer"])
        )
        media_path = _media_path(folders[item["data_type"]], item["data_id"], item["data_type"])
        metadata = {
            "question_id": qid,
            "question_type_id": item["question_type_id"],
            "dimension": names[item["question_type_id"]],
            "question": item["question"],
            "choices": choices,
            "answer": item["answer"],
            "data_type": item["data_type"],
            "data_id": item["data_id"],
            "segment": item.get("segment"),
            "split": split,
        }
        media = [MediaRef("visual", str(media_path), item["data_type"])]
        records.append(Record(f"seed_bench/{qid}", messages, span, media, metadata))
    return check_media(records, on_missing, source=str(path))


def _load(path: Path) -> tuple[list[Any], dict[int, str]]:
    """The question list and ``dimension id -> name``."""
    content = load_json(path, "SEED-Bench annotations")
    if not isinstance(content, dict) or not isinstance(content.get("questions"), list):
        raise ValueError(f"{path}: expected an object with a 'questions' list (SEED-Bench.json)")
    table = content.get("question_type", DIMENSIONS)
    if not isinstance(table, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in table.values()):
        raise ValueError(f"{path}: 'question_type' must map dimension names to integer ids, got {table!r}")
    return content["questions"], {v: k for k, v in table.items()}


def _check(item: Any, names: dict[int, str]) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"expected an object, got {type(item).__name__}")
    for field in STRING_FIELDS:
        if not isinstance(item.get(field), str):
            raise ValueError(f"'{field}' must be a string, got {item.get(field)!r}")
    id_field(item, "question_id")
    type_id = item.get("question_type_id")
    if isinstance(type_id, bool) or not isinstance(type_id, int) or type_id not in names:
        raise ValueError(f"question_type_id {type_id!r} is not a known dimension {sorted(names)}")
    if item["answer"] not in LETTERS:
        raise ValueError(f"answer must be one of {LETTERS}, got {item['answer']!r}")
    if item["data_type"] not in DATA_TYPES:
        raise ValueError(f"data_type must be one of {DATA_TYPES}, got {item['data_type']!r}")
    if not item["data_id"]:
        raise ValueError("empty data_id")


def _media_path(folder: Path, data_id: str, data_type: str) -> Path:
    """``folder/data_id``; an image id without its extension (the README's form) gets ``.jpg`` when only
    that file exists. A missing file is left for ``check_media`` to report."""
    path = folder / data_id
    if data_type == "image" and not path.is_file() and (folder / f"{data_id}.jpg").is_file():
        return folder / f"{data_id}.jpg"
    return path
