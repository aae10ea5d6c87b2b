"""POPE (object hallucination: "Is there a {object} in the image?", yes / no).

Files (the POPE repository): ``output/<dataset>/<dataset>_pope_{random,popular,adversarial}.json`` under
``root`` (``dataset`` coco by default; aokvqa and gqa exist too), which are JSON Lines despite the ``.json``:
one ``{"question_id": int, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the
image?", "label": "yes"|"no"}`` per line, 3,000 lines per file in the current version (500 images x 6; the
version LLaVA-1.5 used has 2,910 in random and "imange" typos, kept as written). The images are COCO val2014:
``image_folder`` (relative to ``root``, or absolute) holds them.

``split``: ``random``, ``popular``, ``adversarial`` or ``all`` (the three, in that order: what the official
MokA evaluation pooled, 9,000 questions from the HF copy, which calls the split ``category``). The official
POPE metrics (accuracy, precision, recall, F1, yes-ratio) are per split, with yes as the positive class.

Prompt: the official MokA user turn ``This is an image:\\n<image_start><image><image_end>\\nPlease answer this
question with yes or no, and no other content. Question: {question}`` (default); target = the label.

Record ids: ``pope/<dataset>/<split>/<question_id>``.

Metadata:

===============  ========================================================================================
key              value
===============  ========================================================================================
``question_id``  the line's ``question_id`` (int, 1..3000 within a split)
``image``        the image file name
``question``     the ``text`` field
``label``        ``yes`` or ``no`` (the GT)
``split``        ``random`` / ``popular`` / ``adversarial``
``category``     the same as ``split`` (the name lmms-eval's copy uses)
``dataset``      ``coco`` / ``aokvqa`` / ``gqa``
``line``         the line number in its file (answers are scored in file order)
===============  ========================================================================================
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moka_train.data.datasets.common import MOKA_YES_NO_PROMPT, check_unique, require_file, resolve_root
from moka_train.data.prompts import Prompt
from moka_train.data.records import MediaRef, Record, check_media

SPLITS = ("random", "popular", "adversarial")
LABELS = ("yes", "no")
FIELDS: dict[str, type] = {"question_id": int, "image": str, "text": str, "label": str}
MOKA_PROMPT = MOKA_YES_NO_PROMPT


def build_pope(
    root: str | os.PathLike,
    split: str = "all",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    *,
    dataset: str = "coco",
    image_folder: str = "val2014",
    annotation_folder: str | None = None,
) -> list[Record]:
    """Records of one POPE split (or ``all`` three). ``annotation_folder`` defaults to ``output/<dataset>``."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"POPE split must be one of {(*SPLITS, 'all')}, got {split!r}")
    prompt = prompt or MOKA_PROMPT
    root = resolve_root(root)
    annotations = root / (annotation_folder or f"output/{dataset}")
    images = root / image_folder
    records = []
    for name in SPLITS if split == "all" else (split,):
        path = annotations / f"{dataset}_pope_{name}.json"
        seen: dict[int, str] = {}
        for line, item in _read_lines(path):
            qid = item["question_id"]
            check_unique(seen, qid, "question_id", where=f"{path}:{line}", place=f"line {line}")
            messages, span = prompt.messages(item["text"], item["label"])
            metadata = {
                "question_id": qid,
                "image": item["image"],
                "question": item["text"],
                "label": item["label"],
                "split": name,
                "category": name,
                "dataset": dataset,
                "line": line,
            }
            media = [MediaRef("visual", str(images / item["image"]), "image")]
            records.append(Record(f"pope/{dataset}/{name}/{qid}", messages, span, media, metadata))
    return check_media(records, on_missing, source=str(annotations))


def _read_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` per non-blank line, each checked for POPE's four fields."""
    require_file(path, "POPE annotations")
    items = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line}: not a JSON object ({error}); POPE files are JSON Lines") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{line}: expected a JSON object, got {type(item).__name__}")
        for field, kind in FIELDS.items():
            value = item.get(field)
            if not isinstance(value, kind) or isinstance(value, bool) or value == "":
                raise ValueError(f"{path}:{line}: '{field}' must be a non-empty {kind.__name__}, got {value!r}")
        if item["label"] not in LABELS:
            raise ValueError(f"{path}:{line}: label must be one of {LABELS}, got {item['label']!r}")
        items.append((line, item))
    if not items:
        raise ValueError(f"{path}: no questions")
    return items
