"""The official MokA repository's own MUSIC-AVQA and AVE files (GeWu-Lab/MokA, AudioVisualText; HF
``yake0409/MokA_AudioVisualText``), to train and test on exactly the samples and targets the paper used.

Layout as the MokA README asks (``root`` = ``MUSIC_AVQA_data`` or ``AVE_data``)::

    MUSIC_AVQA_data/train_samples_with_reasoning_avqa.json, test_samples_avqa.json
    MUSIC_AVQA_data/video_data/<video_id>.mp4, audio_data/<video_id>.mp3   (``video_dir``, ``audio_dir``)
    AVE_data/train_samples_ave.json, test_samples_ave.json
    AVE_data/AVE/<vid>.mp4, audio_data/<vid>.mp3                         (``video_dir``, ``audio_dir``)
    AVE_data/converted_label/<vid>.txt                                   (``label_dir``)

Unlike the benchmarks' own releases, the audio comes from a separate mp3 (``audio`` media of kind ``audio``); the
frames from the mp4 (``visual``, kind ``video``).

**MUSIC-AVQA** (``build_music_avqa_moka``): each file is a JSON array of records with ``video_id``,
``question_id``, ``type`` (a ``[modality, type]`` list; JSON text of one is accepted too), ``video_path``,
``audio_path`` (the authors' absolute paths), ``question`` (already filled), ``answer``, and in the train file
``label``: a reasoning text ending in ``<answer> X </answer>``, the official training target. The media paths are
rebased onto ``root`` by file name: ``root/<video_dir>/<file name of video_path>`` and likewise for audio. The
target (``target_format``): ``auto`` = ``label`` where the record has one (train) and the answer word otherwise
(the official test "output"); or ``label`` (required), ``word``, ``tagged`` (``<answer>X</answer>``). Ids:
``music_avqa_moka/<split>/<question_id>``; metadata as ``music_avqa.py`` minus the template fields:

=====================  =========================================================================
key                    value
=====================  =========================================================================
``split``              ``train`` | ``test``
``question_id``        as in the file
``video_id``           as in the file (str)
``question_modality``  ``Audio`` | ``Visual`` | ``Audio-Visual``
``question_type``      ``Counting`` | ``Comparative`` | ``Location`` | ``Existential`` | ``Temporal``
``answer``             the ground-truth answer (stripped)
``question``           the question (without "Please answer this question: ")
=====================  =========================================================================

**AVE** (``build_ave_moka``): a JSON array of records with ``event`` (one of the 28 categories), ``vid``,
``start_time``, ``end_time`` (the Annotations.txt values: end-exclusive seconds). The target (``target_format``):
``auto`` = the ``converted_label/<vid>.txt`` text for train (the official reasoning targets, ending
"... <event> X </event>, and the time range is <range> s,e </range>.") and the official ground-truth string
``event:{event} start_time:{s} end_time:{e}`` for test (the "output" of MokA's released predictions); or
``label`` / ``ground_truth`` explicitly. A label file is keyed by video, so a video with two events shares one
label text (as in the official code). Ids: ``ave_moka/<split>/<index>`` (index in the JSON array: videos may
repeat). Metadata:

=================  ==========================================================================================
key                value
=================  ==========================================================================================
``split``          ``train`` | ``test``
``index``          the record's index in the JSON array (int)
``video_id``       ``vid`` (str)
``category``       ``event``, one of ``ave.CATEGORIES``
``start``, ``end``  the event's seconds (int); ``end`` exclusive as in Annotations.txt
``end_exclusive``  ``True`` (MokA's own scorer reads the range inclusively: a scorer must choose on purpose)
``ground_truth``   the official ground-truth string ``event:{event} start_time:{start} end_time:{end}``
=================  ==========================================================================================
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moka_train.data.datasets import ave, music_avqa
from moka_train.data.datasets.common import (
    audio_visual_media,
    id_field,
    load_json_array,
    prompt_media_order,
    record_error,
    require_fields,
    resolve_root,
    text_field,
)
from moka_train.data.datasets.music_avqa import parse_question_type
from moka_train.data.prompts import Prompt
from moka_train.data.records import Record, check_media

AVQA_FILES = {"train": "train_samples_with_reasoning_avqa.json", "test": "test_samples_avqa.json"}
AVE_FILES = {"train": "train_samples_ave.json", "test": "test_samples_ave.json"}
AVQA_TARGET_FORMATS = ("auto", "label", "word", "tagged")
AVE_TARGET_FORMATS = ("auto", "label", "ground_truth")
_AVQA_FIELDS = ("video_id", "question_id", "type", "video_path", "audio_path", "question", "answer")
_AVE_FIELDS = ("event", "vid", "start_time", "end_time")


def build_music_avqa_moka(
    root: str | Path,
    split: str = "test",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    *,
    video_dir: str = "video_data",
    audio_dir: str = "audio_data",
    target_format: str = "auto",
) -> list[Record]:
    """Records of MokA's MUSIC-AVQA files (``train`` = with reasoning labels, ``test`` = its 9,129 questions),
    media rebased onto ``root/<video_dir>`` and ``root/<audio_dir>`` by file name."""
    root = resolve_root(root)
    path = root / _split_file(AVQA_FILES, split, "MokA MUSIC-AVQA")
    if target_format not in AVQA_TARGET_FORMATS:
        raise ValueError(f"target_format must be one of {AVQA_TARGET_FORMATS}, got {target_format!r}")

    def parse(item: Any) -> music_avqa.ParsedQuestion:
        fields, (video, audio), label = _parse_avqa(item)
        target = _avqa_target(target_format, fields["answer"], label)
        return fields, target, root / video_dir / video, root / audio_dir / audio

    return music_avqa.avqa_records(
        path,
        parse,
        dataset="MokA MUSIC-AVQA",
        name="music_avqa_moka",
        split=split,
        prompt=music_avqa.DEFAULT_PROMPT if prompt is None else prompt,
        on_missing=on_missing,
    )


def build_ave_moka(
    root: str | Path,
    split: str = "test",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    *,
    video_dir: str = "AVE",
    audio_dir: str = "audio_data",
    label_dir: str = "converted_label",
    question: str = ave.INSTRUCTION,
    target_format: str = "auto",
) -> list[Record]:
    """Records of MokA's AVE files (``train`` with the converted reasoning labels, ``test`` = its 402 videos),
    media under ``root/<video_dir>`` (mp4) and ``root/<audio_dir>`` (mp3)."""
    root = resolve_root(root)
    path = root / _split_file(AVE_FILES, split, "MokA AVE")
    if target_format not in AVE_TARGET_FORMATS:
        raise ValueError(f"target_format must be one of {AVE_TARGET_FORMATS}, got {target_format!r}")
    use_label = target_format == "label" or (target_format == "auto" and split == "train")
    prompt = ave.DEFAULT_PROMPT if prompt is None else prompt
    order = prompt_media_order(prompt, ("visual", "audio"), "MokA AVE")

    records = []
    for index, item in enumerate(load_json_array(path, "MokA AVE annotations")):
        try:
            item = require_fields(item, _AVE_FIELDS)
            category = ave.check_category(item["event"])
            video_id = text_field(item, "vid")
            start = ave.parse_seconds(item["start_time"], "start_time")
            end = ave.parse_seconds(item["end_time"], "end_time")
            ave.check_range(start, end)
        except ValueError as error:
            raise record_error(path, index, item, "vid", error) from None
        ground_truth = f"event:{category} start_time:{start} end_time:{end}"
        target = _read_label(root / label_dir / f"{video_id}.txt", path, index) if use_label else ground_truth
        video, audio = root / video_dir / f"{video_id}.mp4", root / audio_dir / f"{video_id}.mp3"
        messages, span = prompt.messages(question, target)
        records.append(
            Record(
                id=f"ave_moka/{split}/{index}",
                messages=messages,
                question_span=span,
                media=audio_visual_media(order, video, audio),
                metadata={
                    "split": split,
                    "index": index,
                    "video_id": video_id,
                    "category": category,
                    "start": start,
                    "end": end,
                    "end_exclusive": True,
                    "ground_truth": ground_truth,
                },
            )
        )
    return check_media(records, on_missing, source=str(path))


def _split_file(files: dict[str, str], split: str, what: str) -> str:
    if split not in files:
        raise ValueError(f"{what} split must be one of {sorted(files)}, got {split!r}")
    return files[split]


def _parse_avqa(item: Any) -> tuple[dict[str, Any], tuple[str, str], str | None]:
    item = require_fields(item, _AVQA_FIELDS)
    modality, question_type = parse_question_type(item["type"])
    fields = {
        "question_id": id_field(item, "question_id"),
        "video_id": text_field(item, "video_id"),
        "question_modality": modality,
        "question_type": question_type,
        "answer": text_field(item, "answer").strip(),
        "question": text_field(item, "question").strip(),
    }
    label = text_field(item, "label") if "label" in item else None
    return fields, (file_name(item, "video_path"), file_name(item, "audio_path")), label


def file_name(item: Any, key: str) -> str:
    """The last component of a path written on another machine (``/`` or ``\\`` separators)."""
    name = re.split(r"[\\/]", text_field(item, key).strip())[-1]
    if not name:
        raise ValueError(f"{key!r} names no file: {item[key]!r}")
    return name


def _avqa_target(target_format: str, answer: str, label: str | None) -> str:
    if target_format == "label" and label is None:
        raise ValueError("target_format 'label' needs a 'label' field (only the train file has one)")
    if target_format in ("label", "auto") and label is not None:
        return label.strip()
    return music_avqa.target_formatter("tagged" if target_format == "tagged" else "word")(answer)


def _read_label(label: Path, source: Path, index: int) -> str:
    """A converted_label text (the official training target). It is annotation, not media: a missing file is
    an error whatever ``on_missing`` says, since training without its target would be silently wrong."""
    if not label.is_file():
        raise FileNotFoundError(
            f"{source}: record {index} needs its target {label}, which does not exist "
            "(target_format: ground_truth trains on the ground-truth string instead)"
        )
    text = label.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{source}: record {index}: the label file {label} is empty")
    return text
