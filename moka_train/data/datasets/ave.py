"""AVE (Audio-Visual Event localisation, ECCV'18): which of 28 events a 10 s video shows and when.

Published layout (``root`` = the unpacked ``AVE_Dataset`` folder; benchmarks.md §2)::

    root/Annotations.txt                         every annotation line (4,143), split = ``all``
    root/trainSet.txt, valSet.txt, testSet.txt   the splits (3,339 / 402 / 402 lines), same line format
    root/AVE/<video_id>.mp4                      the videos (``video_dir``)

A line is ``Category&VideoID&Quality&StartTime&EndTime``, e.g. ``Church bell&MH3m4AwEcRY&good&6&8``: split on
``&`` (category names contain commas, never ``&``; video ids may start with ``-``). The zip's copies may start
with that very text as a header line, the GitHub copies do not: a first line equal to it is skipped. Blank lines
are skipped; any other line must have exactly 5 fields, one of the 28 categories, integer seconds
0 <= start <= end <= 10 (``0&0`` occurs: an empty event), or the build stops with a ValueError naming the file
and the line.

**Times are end-exclusive seconds**: segment t (of the 10 one-second segments) holds the event iff
start <= t < end, which is how the official labels (``labels_closs.h5``) were made. MokA's scorer reads ranges
as inclusive instead; metadata says ``end_exclusive: True`` so a scorer can follow either rule on purpose.

Some videos have several lines (45 ids, e.g. ``-ccciEuH9FE``: male and female speech), so samples are keyed by
line: ``ave/<split>/<index>``, the 0-based index among the file's annotation lines (header and blank lines not
counted). For ``all`` that is the row index the official ``*_order.h5`` files use.

Both media come from the one mp4 (``visual`` kind ``video``, ``audio`` kind ``audio``). The question is the
official MokA instruction "Please describe the events and time range that occurred in the video." inside the
official audio-visual prompt. The target names the event and its range as written in the file, by default
"The audible and visible event in the video is <event>Church bell</event>, and the time range is
<range>6,8</range>." (``target_template``, fields ``{event}``, ``{start}``, ``{end}``): the tail of the official
MokA training targets, whose tags its scorer parses.

Metadata (what the scorers read):

=================  ===========================================================================================
key                value
=================  ===========================================================================================
``split``          ``train`` | ``val`` | ``test`` | ``all``
``index``          0-based index of the line among the file's annotation lines (int)
``line_number``    1-based line number in the file (int), for messages
``video_id``       the YouTube id (str)
``category``       the event, one of ``CATEGORIES`` (str, as written: ``Baby cry, infant cry``)
``quality``        the file's quality field (``good``)
``start``          first second of the event (int)
``end``            end of the event, **exclusive** (int)
``end_exclusive``  ``True``: segment t is in the event iff start <= t < end
=================  ===========================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moka_train.data.datasets.common import audio_visual_media, prompt_media_order, require_file, resolve_root
from moka_train.data.prompts import AUDIO_VISUAL, Prompt
from moka_train.data.records import Record, check_media

# The 28 AVE categories, spelled as in Annotations.txt.
CATEGORIES: tuple[str, ...] = (
    "Accordion",
    "Acoustic guitar",
    "Baby cry, infant cry",
    "Banjo",
    "Bark",
    "Bus",
    "Cat",
    "Chainsaw",
    "Church bell",
    "Clock",
    "Female speech, woman speaking",
    "Fixed-wing aircraft, airplane",
    "Flute",
    "Frying (food)",
    "Goat",
    "Helicopter",
    "Horse",
    "Male speech, man speaking",
    "Mandolin",
    "Motorcycle",
    "Race car, auto racing",
    "Rodents, rats, mice",
    "Shofar",
    "Toilet flush",
    "Train horn",
    "Truck",
    "Ukulele",
    "Violin, fiddle",
)
SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt", "all": "Annotations.txt"}
NUM_SECONDS = 10  # every AVE video is 10 one-second segments
HEADER = ("category", "videoid", "quality", "starttime", "endtime")

# The official MokA AVE instruction; it is the whole question span (no lead-in).
INSTRUCTION = "Please describe the events and time range that occurred in the video."
DEFAULT_PROMPT = Prompt(AUDIO_VISUAL)
DEFAULT_TARGET = (
    "The audible and visible event in the video is <event>{event}</event>, "
    "and the time range is <range>{start},{end}</range>."
)


@dataclass(frozen=True)
class AveEvent:
    """One annotation line. ``end`` is exclusive (see the module docstring)."""

    index: int
    line_number: int
    category: str
    video_id: str
    quality: str
    start: int
    end: int


def build_ave(
    root: str | Path,
    split: str = "test",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    *,
    video_dir: str = "AVE",
    question: str = INSTRUCTION,
    target_template: str = DEFAULT_TARGET,
) -> list[Record]:
    """Records of one AVE split (``train`` | ``val`` | ``test``, or ``all`` = Annotations.txt), one per
    annotation line, videos under ``root/<video_dir>``. ``target_template``: the assistant target, formatted
    with ``event``, ``start`` and ``end`` (end-exclusive seconds, as in the file)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"AVE split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    check_target_template(target_template)
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    root = resolve_root(root)
    path = root / SPLIT_FILES[split]
    order = prompt_media_order(prompt, ("visual", "audio"), "AVE")

    records = []
    for event in read_annotations(path):
        video = root / video_dir / f"{event.video_id}.mp4"
        target = target_template.format(event=event.category, start=event.start, end=event.end)
        messages, span = prompt.messages(question, target)
        records.append(
            Record(
                id=f"ave/{split}/{event.index}",
                messages=messages,
                question_span=span,
                media=audio_visual_media(order, video, video),
                metadata={
                    "split": split,
                    "index": event.index,
                    "line_number": event.line_number,
                    "video_id": event.video_id,
                    "category": event.category,
                    "quality": event.quality,
                    "start": event.start,
                    "end": event.end,
                    "end_exclusive": True,
                },
            )
        )
    return check_media(records, on_missing, source=str(path))


def read_annotations(path: Path) -> list[AveEvent]:
    """The annotation lines of one AVE file (Annotations.txt or a split file), header and blank lines skipped."""
    require_file(path, "AVE annotations")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    events: list[AveEvent] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split("&")]
        if number == 1 and tuple(field.lower() for field in fields) == HEADER:
            continue
        try:
            events.append(_parse_line(fields, index=len(events), line_number=number))
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: {error}: {line!r}") from None
    return events


def _parse_line(fields: list[str], index: int, line_number: int) -> AveEvent:
    if len(fields) != 5:
        raise ValueError(
            f"expected 5 '&'-separated fields (Category&VideoID&Quality&StartTime&EndTime), got {len(fields)}"
        )
    category, video_id, quality, start, end = fields
    check_category(category)
    if not video_id:
        raise ValueError("empty video id")
    start, end = parse_seconds(start, "start"), parse_seconds(end, "end")
    check_range(start, end)
    return AveEvent(index, line_number, category, video_id, quality, start, end)


# -- shared with moka_official.py -----------------------------------------------------------------------------------


def check_category(category: Any) -> str:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r} (not one of the 28 AVE categories)")
    return category


def parse_seconds(value: Any, name: str) -> int:
    """A whole second: an int, or a string of digits (the text files, converted JSON copies)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number of seconds, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ValueError(f"{name} must be a whole number of seconds, got {value!r}")


def check_range(start: int, end: int) -> None:
    if not 0 <= start <= end <= NUM_SECONDS:
        raise ValueError(f"times must satisfy 0 <= start <= end <= {NUM_SECONDS}, got start {start}, end {end}")


def check_target_template(template: str) -> None:
    """Fail at build time, not on the first record, when the template names unknown fields."""
    try:
        template.format(event="Church bell", start=6, end=8)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"target_template may use the fields {{event}}, {{start}} and {{end}} only ({error!r}): {template!r}"
        ) from None
