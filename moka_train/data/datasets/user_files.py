"""A question about the user's own media files, as a dataset of one record (what ``scripts/infer.py`` answers).

``build_user_records`` is a dataset builder like the benchmarks' ones, so it can stand in a run's ``data.builder``
(``_target_: moka_train.data.datasets.user_files.build_user_records``) and the run's model is built for it by the
same ``build_data_and_model`` that trains and evaluates the run::

    build_user_records(
        "How many instruments are playing?",
        [("visual", "clip.mp4", "video"), {"modality": "audio", "path": "clip.mp4", "kind": "audio"}],
        prompt=Prompt(AUDIO_VISUAL, question_prefix="Please answer this question: "),
    )

Without a prompt, the user turn is the official preset for the media given (``preset_prompt``): a block per item
("This is a video:" / "This is an image:" / "This is an audio:" / "This is a speech clip:", with its placeholder),
visual first, then audio, then speech, then the question; the blocks are cut from ``moka_train.data.prompts``'
presets, so one image gives ``VISUAL``, a video and its sound ``AUDIO_VISUAL``. ``prompt_for`` picks between a
run's own prompt and the preset: the run's when its placeholders name exactly the media given.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moka_train.data.prompts import AUDIO, AUDIO_VISUAL, DEFAULT_SYSTEM, QUESTION_FIELD, SPEECH, VISUAL, Prompt
from moka_train.data.records import MediaRef, Record
from moka_train.data.sample import PLACEHOLDER_PATTERN
from moka_train.models.tokenizer import PLACEHOLDERS

RECORD_ID = "user/0"

# One block of the user turn per media item, cut from the presets so that they stay the official text: the
# one-modality presets minus their question, and the video block of the audio-visual preset (it is the audio
# preset with the video block in front).
BLOCKS: dict[tuple[str, str], str] = {
    ("visual", "image"): VISUAL.removesuffix(QUESTION_FIELD),
    ("visual", "video"): AUDIO_VISUAL.removesuffix(AUDIO),
    ("audio", "audio"): AUDIO.removesuffix(QUESTION_FIELD),
    ("speech", "audio"): SPEECH.removesuffix(QUESTION_FIELD),
}
# The order of the blocks, as in AUDIO_VISUAL: what is seen, then what is heard.
MODALITY_ORDER = ("visual", "audio", "speech")

MediaSpec = MediaRef | Mapping[str, Any] | Sequence[str]


def media_ref(spec: MediaSpec) -> MediaRef:
    """A ``MediaRef`` from a ``{"modality", "path", "kind"}`` mapping (a config entry), a ``(modality, path,
    kind)`` triple or a ``MediaRef``; the combinations a preset block exists for (an image or video is ``visual``,
    a sound ``audio`` or ``speech`` of kind ``audio``)."""
    if isinstance(spec, MediaRef):
        ref = MediaRef(spec.modality, spec.path, spec.kind, spec.data)
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"modality", "path", "kind"})
        if unknown or not {"modality", "path", "kind"} <= set(spec):
            raise ValueError(f"a media entry takes modality, path and kind; got {dict(spec)!r}")
        ref = MediaRef(str(spec["modality"]), str(spec["path"]), str(spec["kind"]))
    elif isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 3:
        ref = MediaRef(str(spec[0]), str(spec[1]), str(spec[2]))
    else:
        raise ValueError(f"a media entry is a {{modality, path, kind}} mapping or a triple, got {spec!r}")
    if (ref.modality, ref.kind) not in BLOCKS:
        allowed = ", ".join(f"{m} ({k})" for m, k in BLOCKS)
        raise ValueError(f"media {ref.path}: {ref.modality} media of kind {ref.kind!r} is not supported ({allowed})")
    return ref


def prompt_modalities(prompt: Prompt) -> list[str]:
    """The modalities the prompt's placeholders stand for, in order (system turn included)."""
    turns, _ = prompt.messages("")
    return [PLACEHOLDERS[m.group()].key for turn in turns for m in PLACEHOLDER_PATTERN.finditer(turn["content"])]


def preset_prompt(media: Sequence[MediaSpec], system: str | None = DEFAULT_SYSTEM, question_prefix: str = "") -> Prompt:
    """The official user turn for these media: one preset block per item (visual, audio, speech; items of one
    modality in the order given), then the question. No media: the question alone."""
    refs = sorted((media_ref(spec) for spec in media), key=lambda ref: MODALITY_ORDER.index(ref.modality))
    template = "".join(BLOCKS[ref.modality, ref.kind] for ref in refs) + QUESTION_FIELD
    return Prompt(template, system=system, question_prefix=question_prefix)


def prompt_for(media: Sequence[MediaSpec], run_prompt: Prompt | None) -> Prompt:
    """The prompt to ask about ``media`` with a model trained on ``run_prompt``: that prompt itself when its
    placeholders are exactly these media's modalities (the model sees what it was trained on), else the preset for
    the media with the run prompt's system turn and question prefix (the defaults without a run prompt)."""
    modalities = Counter(media_ref(spec).modality for spec in media)
    if run_prompt is None:
        return preset_prompt(media)
    if Counter(prompt_modalities(run_prompt)) == modalities:
        return run_prompt
    return preset_prompt(media, system=run_prompt.system, question_prefix=run_prompt.question_prefix)


def build_user_records(
    question: str,
    media: Sequence[MediaSpec] = (),
    prompt: Prompt | None = None,
    *,
    record_id: str = RECORD_ID,
) -> list[Record]:
    """One inference record: ``question`` about the ``media`` files, in ``prompt`` (None: ``preset_prompt`` for
    the media, default system turn, no question prefix). The media are placed on the prompt's placeholders in the
    prompt's order (items of one modality in the order given), so the prompt must have one placeholder per item.
    Errors: a blank question, a media file that does not exist (named), a prompt whose placeholders do not
    match the media. Metadata: ``question`` (as asked, stripped)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"the question must be a non-empty string, got {question!r}")
    question = question.strip()  # a trailing newline from a shell or a file is not part of the question
    refs = [media_ref(spec) for spec in media]
    for ref in refs:
        ref.path = os.path.abspath(os.path.expanduser(ref.path))
        if not Path(ref.path).is_file():
            raise FileNotFoundError(f"media file {ref.path} does not exist ({ref.modality} {ref.kind})")
    prompt = preset_prompt(refs) if prompt is None else prompt
    placeholders = prompt_modalities(prompt)
    if Counter(placeholders) != Counter(ref.modality for ref in refs):
        raise ValueError(
            f"the prompt has placeholders for {placeholders} but the media are "
            f"{[ref.modality for ref in refs]} (one placeholder per media item): {prompt.template!r}"
        )
    queues = {modality: [ref for ref in refs if ref.modality == modality] for modality in set(placeholders)}
    ordered = [queues[modality].pop(0) for modality in placeholders]
    messages, span = prompt.messages(question)
    return [Record(id=record_id, messages=messages, question_span=span, media=ordered, metadata={"question": question})]
