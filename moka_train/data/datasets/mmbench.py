"""MMBench (multiple choice, images embedded in the TSV), as VLMEvalKit distributes it.

Files: ``MMBench_{DEV,TEST}_{EN,CN}[_V11].tsv`` or ``*_legacy.tsv`` under ``root``; ``split`` names the file
(``split="DEV_EN_legacy"`` reads ``MMBench_DEV_EN_legacy.tsv``, the file the official MokA evaluation used;
``tsv`` overrides the name). Tab-separated with a header row: ``index``, ``question``, ``hint`` (may be empty
/ NaN), option columns ``A`` ``B`` [``C`` ``D`` ``E``] (later ones may be empty), ``answer`` (a letter; absent
in TEST files), ``category``, ``l2-category``, ``image`` (base64), ``source``, ``split``, ...

Circular copies are extra rows with the options rotated and ``index = original + k * 1_000_000``:
``group_index = index % 1_000_000`` groups them for CircularEval, ``circular_offset = k`` tells which pass
a row is. Legacy TSVs repeat the base64 image in every copy; VLMEvalKit's newer TSVs keep it once and the
copies' ``image`` holds the index of the row that has it (a value of at most 64 characters, VLMEvalKit's own
rule); both are resolved here, so every record carries its decoded image bytes (``MediaRef.data``, kind
image, ``path = "<tsv>#<index>"``). ``circular_copies=False`` keeps only the original rows (a single-pass,
"vanilla" evaluation); the official MokA run used all rows of the legacy DEV-EN file (4,329).

Empty cells and ``nan`` are missing values (how pandas writes NaN); other text, ``None`` or ``NA`` included,
is kept as written, where pandas-based readers (VLMEvalKit, MokA) would turn those two into NaN and drop such
an option.

Prompt styles (``style``): the question block after the image, and the assistant target:

- ``moka`` (default, the official MokA evaluation): ``Hint: {hint}\\n`` (if any) ``Question: {question}\\n
  Options:\\n(A) ...\\n(B) ...\\n\\nPlease select the correct answer from the options above. Output only the
  selected option in the format (A), (B), (C), or (D). No explanation or extra text.``; target ``(A)``. Its
  prompt (the default) is the official one byte for byte: user turn ``\\n This is an image:\\n<image_start>
  <image><image_end>\\n{question}`` and the system turn ``You are a classification assistant. You need to
  classify the image into the correct option.``
- ``vlmevalkit`` (VLMEvalKit's ``build_prompt``): ``Hint: {hint}\\n`` (if any) ``Question: {question}\\n
  Options:\\nA. ...\\nB. ...\\nPlease select the correct answer from the options above. \\n``; target ``A``.

Record ids: ``mmbench/<split>/<index>``.

Metadata:

===================  ==================================================================================
key                  value
===================  ==================================================================================
``index``            the row's ``index`` (int)
``group_index``      ``index % 1_000_000``: the question its circular copies share
``circular_offset``  ``index // 1_000_000``: 0 for the original row, k for the k-th rotation
``question``         the ``question`` cell
``hint``             the ``hint`` cell, or None
``options``          letter -> option text, the non-empty option columns in order
``answer``           the GT letter, or None (TEST files)
``category``         the ``category`` cell (L3 ability), or None
``l2_category``      the ``l2-category`` cell, or None
``source``           the ``source`` cell, or None
``split``            the ``split`` argument (which file)
===================  ==================================================================================
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import string
from collections.abc import Callable
from pathlib import Path

from moka_train.data.datasets.common import MOKA_CHOICE_INSTRUCTION, require_file, resolve_root
from moka_train.data.prompts import Prompt
from moka_train.data.records import MediaRef, Record, check_media

CIRCULAR_STRIDE = 1_000_000
REQUIRED_COLUMNS = ("index", "question", "image", "A", "B")
IMAGE_REFERENCE_MAX_CHARS = 64  # VLMEvalKit: an image cell this short names the row that holds the image
MISSING = ("", "nan")
MOKA_SYSTEM = "You are a classification assistant. You need to classify the image into the correct option."
MOKA_PROMPT = Prompt("\n This is an image:\n<image_start><image><image_end>\n{question}", system=MOKA_SYSTEM)
MOKA_INSTRUCTION = MOKA_CHOICE_INSTRUCTION


def _moka_question(question: str, hint: str | None, options: dict[str, str]) -> str:
    text = (f"Hint: {hint}\n" if hint is not None else "") + f"Question: {question}\nOptions:"
    text += "".join(f"\n({letter}) {option}" for letter, option in options.items())
    return text + "\n\n" + MOKA_INSTRUCTION


def _vlmevalkit_question(question: str, hint: str | None, options: dict[str, str]) -> str:
    text = (f"Hint: {hint}\n" if hint is not None else "") + f"Question: {question}\nOptions:\n"
    text += "".join(f"{letter}. {option}\n" for letter, option in options.items())
    return text + "Please select the correct answer from the options above. \n"


# style -> (question block builder, target format with {letter})
STYLES: dict[str, tuple[Callable[[str, str | None, dict[str, str]], str], str]] = {
    "moka": (_moka_question, "({letter})"),
    "vlmevalkit": (_vlmevalkit_question, "{letter}"),
}


def build_mmbench(
    root: str | os.PathLike,
    split: str = "DEV_EN_legacy",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    *,
    style: str = "moka",
    circular_copies: bool = True,
    tsv: str | None = None,
) -> list[Record]:
    """Records of one MMBench TSV, in file order (``style``: ``moka`` | ``vlmevalkit``)."""
    if style not in STYLES:
        raise ValueError(f"unknown MMBench prompt style {style!r}; known: {list(STYLES)}")
    build_question, target_format = STYLES[style]
    prompt = prompt or MOKA_PROMPT
    path = resolve_root(root) / (tsv or f"MMBench_{split}.tsv")
    header, rows = _read_tsv(path)
    by_index = {index: cells for index, (_, cells) in rows.items()}
    letters = [c for c in header if len(c) == 1 and c in string.ascii_uppercase]
    decoded: dict[str, bytes] = {}  # base64 text -> bytes: legacy copies repeat an image, decode it once

    records = []
    for index, (line, cells) in rows.items():
        where = f"{path}:{line} (index {index})"
        if not circular_copies and index >= CIRCULAR_STRIDE:
            continue
        options = {letter: cells[letter] for letter in letters if not _missing(cells[letter])}
        answer = None if _missing(cells.get("answer", "")) else cells["answer"].strip()
        if answer is not None and answer not in options:
            raise ValueError(f"{where}: answer {answer!r} is not one of its options {list(options)}")
        hint = None if _missing(cells.get("hint", "")) else cells["hint"]
        question = build_question(cells["question"], hint, options)
        target = None if answer is None else target_format.format(letter=answer)
        messages, span = prompt.messages(question, target)
        image = _image_bytes(cells["image"], by_index, decoded, where)
        metadata = {
            "index": index,
            "group_index": index % CIRCULAR_STRIDE,
            "circular_offset": index // CIRCULAR_STRIDE,
            "question": cells["question"],
            "hint": hint,
            "options": options,
            "answer": answer,
            "category": _optional(cells, "category"),
            "l2_category": _optional(cells, "l2-category"),
            "source": _optional(cells, "source"),
            "split": split,
        }
        media = [MediaRef("visual", f"{path}#{index}", "image", data=image)]
        records.append(Record(f"mmbench/{split}/{index}", messages, span, media, metadata))
    return check_media(records, on_missing, source=str(path))


def _missing(value: str) -> bool:
    return value.strip().lower() in MISSING


def _optional(cells: dict[str, str], column: str) -> str | None:
    value = cells.get(column, "")
    return None if _missing(value) else value


def _read_tsv(path: Path) -> tuple[list[str], dict[int, tuple[int, dict[str, str]]]]:
    """The header and ``index -> (line number, column -> cell)``, in file order."""
    require_file(path, "MMBench TSV")
    # A base64 image is far longer than csv's default 128 KiB field limit; restore the limit afterwards.
    previous = csv.field_size_limit(2**31 - 1)
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            reader = csv.reader(file, delimiter="\t")
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file (expected a header row)")
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{path}: header lacks the columns {missing} (has {header})")
            rows: dict[int, tuple[int, dict[str, str]]] = {}
            line = reader.line_num + 1  # where the next row starts (a quoted cell may span lines)
            for row in reader:
                if len(row) != len(header):
                    raise ValueError(f"{path}:{line}: {len(row)} columns, the header has {len(header)}")
                cells = dict(zip(header, row, strict=True))
                try:
                    index = int(cells["index"])
                except ValueError:
                    raise ValueError(f"{path}:{line}: index {cells['index']!r} is not an integer") from None
                if index in rows:
                    raise ValueError(f"{path}:{line}: index {index} repeats line {rows[index][0]}")
                rows[index] = (line, cells)
                line = reader.line_num + 1
    except csv.Error as error:
        raise ValueError(f"{path}: malformed TSV ({error})") from None
    finally:
        csv.field_size_limit(previous)
    return header, rows


def _image_bytes(cell: str, by_index: dict[int, dict[str, str]], decoded: dict[str, bytes], where: str) -> bytes:
    text = cell.strip()
    if len(text) <= IMAGE_REFERENCE_MAX_CHARS:
        # A circular copy pointing at the row that holds the image (one level, as VLMEvalKit resolves it).
        target = by_index.get(int(text)) if text.isdigit() else None
        if target is None or len(target["image"].strip()) <= IMAGE_REFERENCE_MAX_CHARS:
            raise ValueError(f"{where}: image {text!r} is neither base64 data nor the index of a row holding an image")
        text = target["image"].strip()
    if text not in decoded:
        try:
            decoded[text] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"{where}: the image is not valid base64 ({error})") from None
    return decoded[text]
