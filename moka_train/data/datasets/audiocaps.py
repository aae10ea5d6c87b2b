"""AudioCaps (Kim et al., NAACL 2019): the audio captions of the official stage-1 audio pretraining.

Files as users download them: ``<root>/{train,val,test}.csv`` with the header
``audiocap_id,youtube_id,start_time,caption`` (one caption per row; captions with commas are quoted) and the
10 s clips cut from YouTube, one file per row. AudioCaps distributes no audio, so the clips' names depend on
the tool that fetched them: ``audio_path`` is a format string relative to ``root`` with the fields
``{split}``, ``{audiocap_id}``, ``{youtube_id}`` and ``{start_time}`` (as written in the CSV). The default,
``{split}/{audiocap_id}.wav``, is the layout of the ``audiocaps-download`` package; clips named after their
YouTube segment are ``audio_path="{split}/{youtube_id}_{start_time}.wav"``.

The official MokA stage 1 (moka_reference.md §4) trains the audio projector on AudioCaps with the instruction
"Please describe this audio." and the caption as the answer; the instruction is the record's question (the
span MokA's cross-attention reads). Train has one caption per clip; val and test have five per clip, each in
its own row with its own ``audiocap_id``: ``one_per_clip=True`` gives one record per clip (for captioning
evaluation), whose target is the clip's first caption and whose ``references`` hold all of them.

Metadata (what scorers read):

================ ==================================================================================
key              value
================ ==================================================================================
``split``        the CSV read (``train`` / ``val`` / ``test``)
``audiocap_id``  int, the row's id (the clip's first row with ``one_per_clip``)
``audiocap_ids`` list[int], every row of the record's clip in this split, in file order
``youtube_id``   str
``start_time``   float, seconds into the YouTube video where the clip starts
``caption``      str, the target caption
``references``   list[str], every caption of the clip in this split (file order): the reference set
================ ==================================================================================
"""

from __future__ import annotations

import csv
from pathlib import Path

from moka_train.data.datasets.common import absolute_root, check_unique, require_file
from moka_train.data.prompts import AUDIO, Prompt
from moka_train.data.records import MediaRef, Record, check_media

HEADER = ["audiocap_id", "youtube_id", "start_time", "caption"]
DEFAULT_INSTRUCTION = "Please describe this audio."  # the official stage-1 instruction
DEFAULT_AUDIO_PATH = "{split}/{audiocap_id}.wav"  # audiocaps-download's layout


def _read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` for every data row; a wrong header or column count is an error naming the line."""
    require_file(path, "AudioCaps annotations")
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != HEADER:
            raise ValueError(f"{path}: expected the header {','.join(HEADER)}, got {header!r}")
        for row in reader:
            if not row:  # a blank line holds no row (e.g. a trailing newline)
                continue
            if len(row) != len(HEADER):
                raise ValueError(
                    f"{path}, line {reader.line_num}: expected {len(HEADER)} columns ({','.join(HEADER)}), "
                    f"got {len(row)}: {row!r}"
                )
            rows.append((reader.line_num, dict(zip(HEADER, (value.strip() for value in row), strict=True))))
    return rows


def _parse(path: Path, line: int, row: dict[str, str]) -> tuple[int, float]:
    """The row's ``audiocap_id`` and ``start_time``; empty or non-numeric fields are errors naming the line."""
    for key in HEADER:
        if not row[key]:
            raise ValueError(f"{path}, line {line}: the field {key!r} is empty")
    try:
        return int(row["audiocap_id"]), float(row["start_time"])
    except ValueError:
        raise ValueError(
            f"{path}, line {line}: audiocap_id must be an integer and start_time a number, got "
            f"{row['audiocap_id']!r}, {row['start_time']!r}"
        ) from None


def _check_audio_path(audio_path: str) -> None:
    """Fail before reading any row when the file-name pattern names a field the CSV does not have."""
    try:
        audio_path.format(split="train", **dict.fromkeys(HEADER, "0"))
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"audio_path {audio_path!r} is not a pattern of the fields split, {', '.join(HEADER[:3])}: {error!r}"
        ) from None


def build_audiocaps(
    root: str | Path,
    split: str = "train",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    audio_path: str = DEFAULT_AUDIO_PATH,
    instruction: str = DEFAULT_INSTRUCTION,
    one_per_clip: bool = False,
) -> list[Record]:
    """Records of ``<root>/<split>.csv``: the clip (modality audio) and its caption as the answer.

    ``audio_path``: the clip's path relative to ``root`` (fields ``split``, ``audiocap_id``, ``youtube_id``,
    ``start_time``). ``instruction``: the user's request, which is the question span. ``one_per_clip``: one
    record per clip instead of one per caption row. ``prompt`` defaults to the official audio user turn.
    """
    root = absolute_root(root)
    prompt = prompt or Prompt(AUDIO)
    _check_audio_path(audio_path)
    source = root / f"{split}.csv"
    # Parse every row first, so that a clip's reference set is complete wherever its rows are in the file.
    rows: list[tuple[int, int, float, dict[str, str]]] = []
    clips: dict[tuple[str, float], list[int]] = {}  # clip -> indices into rows, in file order
    seen: dict[int, str] = {}
    for line, row in _read_rows(source):
        audiocap_id, start_time = _parse(source, line, row)
        check_unique(seen, audiocap_id, "audiocap_id", where=f"{source}, line {line}", place=f"line {line}")
        clips.setdefault((row["youtube_id"], start_time), []).append(len(rows))
        rows.append((line, audiocap_id, start_time, row))

    records = []
    for index, (_, audiocap_id, start_time, row) in enumerate(rows):
        clip = clips[(row["youtube_id"], start_time)]
        if one_per_clip and index != clip[0]:
            continue
        messages, span = prompt.messages(instruction, row["caption"])
        records.append(
            Record(
                id=f"audiocaps/{split}/{audiocap_id}",
                messages=messages,
                question_span=span,
                media=[MediaRef("audio", root / audio_path.format(split=split, **row), "audio")],
                metadata={
                    "split": split,
                    "audiocap_id": audiocap_id,
                    "audiocap_ids": [rows[i][1] for i in clip],
                    "youtube_id": row["youtube_id"],
                    "start_time": start_time,
                    "caption": row["caption"],
                    "references": [rows[i][3]["caption"] for i in clip],
                },
            )
        )
    return check_media(records, on_missing, source=str(source))
