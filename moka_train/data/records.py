"""What a dataset builder returns: light, JSON-able records that name their media files.

A ``Record`` is a sample before its media are read: the chat turns (placeholders where media go), the
question's character span in the last user turn, one ``MediaRef`` per placeholder in order of appearance,
and the benchmark's own fields in ``metadata`` (question type, ground truth, options, split, ...). Records
are cheap to build for a whole benchmark, to count, filter and write out; the dataset turns one into a
``Sample`` by reading its media (or their cached features) when the loader asks for it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from moka_train.data.sample import PLACEHOLDER_PATTERN
from moka_train.modality import Modality
from moka_train.models.tokenizer import PLACEHOLDERS

MEDIA_KINDS = ("image", "video", "audio")
ON_MISSING = ("error", "skip")


@dataclass
class MediaRef:
    """One media item. ``kind``: ``image`` (a picture), ``video`` (frames of a video file) or ``audio`` (the
    audio of an audio file or of a video's sound track). ``data`` holds the file's bytes when the benchmark
    embeds its media (MMBench's base64 images); ``path`` then names where they came from."""

    modality: str
    path: str
    kind: str
    data: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.modality = Modality.parse(self.modality).key
        if self.modality == "text":
            raise ValueError(f"media {self.path}: text is not a media modality")
        if self.kind not in MEDIA_KINDS:
            raise ValueError(f"media {self.path}: kind must be one of {MEDIA_KINDS}, got {self.kind!r}")
        self.path = str(self.path)


@dataclass
class Record:
    id: str
    messages: list[dict[str, str]]
    question_span: tuple[int, int] | None
    media: list[MediaRef]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.question_span is not None:
            self.question_span = (int(self.question_span[0]), int(self.question_span[1]))
        placeholders = [
            PLACEHOLDERS[m.group()].key for turn in self.messages for m in PLACEHOLDER_PATTERN.finditer(turn["content"])
        ]
        if placeholders != [ref.modality for ref in self.media]:
            raise ValueError(
                f"record {self.id!r}: placeholders {placeholders} do not match its media "
                f"{[ref.modality for ref in self.media]} (one media item per placeholder, in order)"
            )

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (embedded media bytes are left out: write them to files to keep them)."""
        record = asdict(self)
        for ref in record["media"]:
            ref.pop("data")
        return record

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Record:
        return cls(
            id=raw["id"],
            messages=raw["messages"],
            question_span=raw["question_span"],
            media=[MediaRef(**ref) for ref in raw["media"]],
            metadata=raw.get("metadata", {}),
        )


def check_media(
    records: Iterable[Record], on_missing: str = "error", source: str = "", probe: bool = False
) -> list[Record]:
    """Records whose media files exist (and, with ``probe``, open and decode a first frame: PyAV, about a
    millisecond per file). ``on_missing="error"``: the first missing or unreadable file is an error naming it
    and its record; ``"skip"``: such records are left out, counted and reported in one warning."""
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
    prefix = f"{source}: " if source else ""
    kept, skipped = [], []
    for record in records:
        problem = _media_problem(record, probe)
        if problem is None:
            kept.append(record)
        elif on_missing == "error":
            raise FileNotFoundError(
                f"{prefix}record {record.id!r} {problem} (on_missing: skip leaves such records out)"
            )
        else:
            skipped.append((record.id, problem))
    if skipped:
        shown = "; ".join(f"{rid}: {problem}" for rid, problem in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(
            f"{prefix}skipped {len(skipped)} of {len(kept) + len(skipped)} records whose media are missing or "
            f"unreadable: {shown}{more}",
            stacklevel=2,
        )
    return kept


def _media_problem(record: Record, probe: bool) -> str | None:
    for ref in record.media:
        if ref.data is None and not os.path.isfile(ref.path):
            return f"needs {ref.path}, which does not exist"
    if probe:
        from moka_train.data.media import probe_media  # media imports this module

        for ref in record.media:
            try:
                probe_media(ref)
            except (OSError, ValueError) as error:
                return f"cannot read {ref.path}: {error}"
    return None
