"""LLaVA's conversation JSON: visual instruction tuning (stage 2) and the LLaVA-Pretrain captions (stage 1).

The files (``llava_instruct_150k.json``, ``llava_v1_5_mix665k.json``, MokA's
``llava_instruct_150k_aokvqa12k.json``, LLaVA-Pretrain's ``blip_laion_cc_sbu_558k.json``) are one JSON list of
``{"id", "image", "conversations": [{"from": "human" | "gpt", "value"}, ...]}``; ``image`` is relative to the
image folder (``000000033471.jpg`` under COCO ``train2017`` for the 150K file, ``coco/train2017/...`` in the
665K mix, ``00453/004539375.jpg`` under LLaVA-Pretrain's ``images/``). The first human turn carries the
``<image>`` token, before or after its text.

Single turns, as the official MokA VisualText training code does (``VisualText/train/train.py``): turns are
taken in pairs (0, 1), (2, 3), ...; each human/gpt pair becomes one record with the image, that pair's
question and answer and no dialogue history. ``<image>`` is removed from the human text, which is then
stripped, and the prompt puts the image first (``prompts.VISUAL``); the official user turn is
``This is an image:\\n<image_start><image><image_end>\\nPlease answer this question: {q}``, the default here.
Where the official code silently skips (a pair whose roles are not human then gpt, a dangling last turn),
this builder raises a ValueError naming the file, the entry and the turn: such a file is not what its
producer meant, and a silent skip changes the training set unnoticed.

Entries without ``image`` (the text-only ShareGPT part of the 665K mix) follow ``text_only``: ``"skip"``
(default; counted and reported in one warning, since the official VT code has no text-only path: it would
fail on them), ``"keep"`` (records with no media whose user turn is the bare question, with the prompt's
system turn and question prefix) or ``"error"``.

LLaVA-Pretrain (stage 1): the same format with one pair per entry, the human turn a captioning instruction
("Give a brief description of the image.") and the gpt turn the caption. The instruction is the question
(MokA's cross-attention keys read it); the default prompt has no "Please answer this question" lead-in.

Video-LLaVA's pretraining corpus (the official AVT stage 1 of the visual projector, through Crab's
``PretrainDataset``): under one root, ``train_json/llava_image_.json`` (the same 558K image captions, the
``image`` paths relative to the root) and ``train_json/valid_valley_.json`` (Valley's video captions: the
same format with ``video`` for ``image`` and ``<video>`` in the human turn). Both parts are one builder's
records, so one stage-1 run trains the visual projector on images and videos mixed in its batches (an image
is one frame, a video ``media.frames`` frames, 8 in the official run).

Record ids: ``<name>/<entry id>/<pair>`` (``llava_instruct/000000033471/0``); an entry id that occurs more
than once in the file (the 665K mix has such ids) becomes ``<entry id>@<position in the file>`` for every
occurrence, so ids are unique within a build and stable for the same file.

Metadata:

=============  =========================================================================================
key            value
=============  =========================================================================================
``source_id``  the entry's ``id`` as a string
``index``      the entry's position in the JSON list
``turn``       the pair's number in the conversation (0-based)
``num_turns``  how many human/gpt pairs the conversation has
``image``      the entry's ``image`` as written (None for a kept text-only entry); ``video`` for Valley
``answer``     the gpt turn (the target; also the record's assistant turn)
``split``      ``"train"``
=============  =========================================================================================
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from moka_train.data.datasets.common import id_field, load_json_array, require_fields, resolve_root
from moka_train.data.prompts import QUESTION_FIELD, VIDEO, VISUAL, Prompt
from moka_train.data.records import MediaRef, Record, check_media

TEXT_ONLY = ("skip", "keep", "error")
SPLITS = ("train",)
INSTRUCT_PROMPT = Prompt(VISUAL, question_prefix="Please answer this question: ")
PRETRAIN_PROMPT = Prompt(VISUAL)
VIDEO_PRETRAIN_PROMPT = Prompt(VIDEO)


def build_llava_instruct(
    root: str | os.PathLike,
    split: str = "train",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    *,
    annotation: str = "llava_instruct_150k.json",
    image_folder: str = "coco/train2017",
    text_only: str = "skip",
) -> list[Record]:
    """Records of a LLaVA conversation file, one per human/gpt pair (the official MokA VT split into single
    turns). ``annotation`` and ``image_folder`` are relative to ``root`` (absolute paths work too);
    ``text_only``: what to do with entries without an image (``skip`` | ``keep`` | ``error``)."""
    return _build(
        "llava_instruct", root, split, prompt or INSTRUCT_PROMPT, on_missing, annotation, image_folder, text_only
    )


def build_llava_pretrain(
    root: str | os.PathLike,
    split: str = "train",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    *,
    annotation: str = "blip_laion_cc_sbu_558k.json",
    image_folder: str = "images",
    text_only: str = "error",
) -> list[Record]:
    """Records of LLaVA-Pretrain (``blip_laion_cc_sbu_558k.json`` + ``images/``): the captioning instruction
    is the question, the caption the target. Every entry has an image, so a text-only one is an error by
    default."""
    return _build(
        "llava_pretrain", root, split, prompt or PRETRAIN_PROMPT, on_missing, annotation, image_folder, text_only
    )


def build_video_llava_pretrain(
    root: str | os.PathLike,
    split: str = "train",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    *,
    image_annotation: str | None = "train_json/llava_image_.json",
    video_annotation: str | None = "train_json/valid_valley_.json",
    media_folder: str = ".",
    video_prompt: Prompt | None = None,
) -> list[Record]:
    """Records of Video-LLaVA's pretraining corpus: the image captions of ``image_annotation`` (ids
    ``llava_image/...``, ``prompt``) then the Valley video captions of ``video_annotation`` (ids ``valley/...``,
    ``video_prompt``), media paths relative to ``root / media_folder``. Either annotation may be None to
    leave that part out. Every entry must have its image or video."""
    if image_annotation is None and video_annotation is None:
        raise ValueError("video_llava_pretrain: image_annotation and video_annotation are both None (no records)")
    records: list[Record] = []
    if image_annotation is not None:
        records += _build(
            "llava_image", root, split, prompt or PRETRAIN_PROMPT, on_missing, image_annotation, media_folder, "error"
        )
    if video_annotation is not None:
        video_prompt = video_prompt or VIDEO_PRETRAIN_PROMPT
        records += _build(
            "valley", root, split, video_prompt, on_missing, video_annotation, media_folder, "error", media="video"
        )
    return records


def _build(
    name: str,
    root: str | os.PathLike,
    split: str,
    prompt: Prompt,
    on_missing: str,
    annotation: str,
    media_folder: str,
    text_only: str,
    media: str = "image",
) -> list[Record]:
    """One LLaVA-format file; ``media`` names the entry key, the placeholder (``<image>``) and the media kind."""
    if split not in SPLITS:
        raise ValueError(f"{name}: split must be one of {SPLITS} (LLaVA's files are training data), got {split!r}")
    if text_only not in TEXT_ONLY:
        raise ValueError(f"{name}: text_only must be one of {TEXT_ONLY}, got {text_only!r}")
    root = resolve_root(root)
    path = root / annotation
    folder = root / media_folder
    entries = _load_entries(path)
    # Text-only entries still carry the system turn and the question prefix of the configured prompt.
    text_prompt = Prompt(QUESTION_FIELD, system=prompt.system, question_prefix=prompt.question_prefix)
    id_counts = Counter(str(entry.get("id")) for entry in entries)

    records: list[Record] = []
    skipped_text_only: list[str] = []
    for index, entry in enumerate(entries):
        try:
            source_id = str(id_field(require_fields(entry, ("id",)), "id"))
        except ValueError as error:
            raise ValueError(f"{path}: entry {index}: {error}") from None
        where = f"{path}: entry {index} (id {source_id!r})"
        item = entry.get(media)
        if item is None:
            if text_only == "error":
                raise ValueError(f"{where} has no {media} (text_only: skip or keep accepts such entries)")
            if text_only == "skip":
                skipped_text_only.append(source_id)
                continue
        elif not isinstance(item, str) or not item:
            raise ValueError(f"{where}: {media!r} must be a non-empty string, got {item!r}")
        record_key = source_id if id_counts[source_id] == 1 else f"{source_id}@{index}"
        pairs = _pairs(entry, where, f"<{media}>")
        for turn, (question, answer) in enumerate(pairs):
            refs = [] if item is None else [MediaRef("visual", str(folder / item), media)]
            messages, span = (text_prompt if item is None else prompt).messages(question, answer)
            metadata = {
                "source_id": source_id,
                "index": index,
                "turn": turn,
                "num_turns": len(pairs),
                media: item,
                "answer": answer,
                "split": split,
            }
            try:
                records.append(Record(f"{name}/{record_key}/{turn}", messages, span, refs, metadata))
            except ValueError as error:  # e.g. a media placeholder such as "<video>" written inside the text
                raise ValueError(f"{where}, turn {turn}: {error}") from None
    if skipped_text_only:
        more = len(skipped_text_only) - 5
        shown = ", ".join(skipped_text_only[:5]) + (f" and {more} more" if more > 0 else "")
        warnings.warn(
            f"{path}: skipped {len(skipped_text_only)} of {len(entries)} entries with no {media} "
            f"(text_only: skip): {shown}",
            stacklevel=3,
        )
    return check_media(records, on_missing, source=str(path))


def _load_entries(path: Path) -> list[dict[str, Any]]:
    """The conversations of a LLaVA file, each checked to be a JSON object."""
    entries = load_json_array(path, "LLaVA annotations")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {index} must be an object, got {type(entry).__name__}")
    return entries


def _pairs(entry: dict[str, Any], where: str, placeholder: str) -> list[tuple[str, str]]:
    """(question, answer) per human/gpt pair: turns 2k and 2k+1, the human text without ``placeholder``."""
    conversation = entry.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of turns, got {conversation!r}")
    if len(conversation) % 2:
        raise ValueError(f"{where}: {len(conversation)} turns; expected human/gpt pairs (the last turn has no answer)")
    pairs = []
    for turn in range(0, len(conversation), 2):
        values = []
        for offset, role in enumerate(("human", "gpt")):
            item = conversation[turn + offset]
            if not isinstance(item, dict) or item.get("from") != role or not isinstance(item.get("value"), str):
                raise ValueError(
                    f"{where}, turn {turn + offset}: expected {{'from': {role!r}, 'value': <text>}} "
                    f"(turns alternate human, gpt), got {item!r}"
                )
            values.append(item["value"])
        pairs.append((values[0].replace(placeholder, "").strip(), values[1]))
    return pairs
