"""A training set whose batches mix modalities, for the distributed training tests: the demo's MUSIC-AVQA
questions, every third one with both media, the others with the video only or the audio only. Shuffled
into micro-batches, some ranks then hold no audio (or no video) in a step while others do, which is what
hangs ZeRO-3 in frameworks that skip the projector of an absent modality."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from moka_train.data.datasets.music_avqa import build_music_avqa
from moka_train.data.prompts import Prompt
from moka_train.data.records import Record

VIDEO_BLOCK = "This is a video:\n<video_start><video><video_end>\n"
AUDIO_BLOCK = "This is an audio:\n<audio_start><audio><audio_end>\n"


def mixed_modality_records(
    root: str | Path, split: str, prompt: Prompt, limit: int | None = None, **options: Any
) -> list[Record]:
    """``prompt`` must be the audio-visual one (configs/data/demo.yaml's); ``options`` go to the builder.
    ``limit``: the first records only (so that a short run reaches the end of an epoch)."""
    if VIDEO_BLOCK not in prompt.template or AUDIO_BLOCK not in prompt.template:
        raise ValueError("mixed_modality_records needs the audio-visual prompt")
    variants = [
        ("av", prompt),
        ("v", dataclasses.replace(prompt, template=prompt.template.replace(AUDIO_BLOCK, ""))),
        ("a", dataclasses.replace(prompt, template=prompt.template.replace(VIDEO_BLOCK, ""))),
    ]
    built = {tag: build_music_avqa(root, split, p, **options) for tag, p in variants}
    records = []
    for i in range(len(built["av"])):
        tag = variants[i % 3][0]
        records.append(dataclasses.replace(built[tag][i], id=f"{built[tag][i].id}-{tag}"))
    return records[:limit]
