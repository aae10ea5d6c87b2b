"""The sample every dataset builder produces and the collator consumes (DESIGN.md, "The data contract").

A sample is text with placeholders plus the media they stand for, nothing tokenized: the collator renders
the backbone's chat template and tokenizes, so one builder serves every backbone. Its structure is
validated here, when the builder makes it, so that a bad sample fails with its id at the line that built
it rather than as a shape error deep inside a training step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from moka_train.modality import Modality
from moka_train.models.tokenizer import PLACEHOLDERS

ROLES = ("system", "user", "assistant")
# Placeholders are special tokens, so the tokenizer splits them out of any text exactly as this pattern does.
PLACEHOLDER_PATTERN = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))


@dataclass
class Sample:
    """One example: chat turns with media placeholders, the question's location and the media.

    ``messages``: ``{"role", "content"}`` turns (roles ``system`` / ``user`` / ``assistant``). A training
    sample ends with the assistant's answer, an inference sample with the user's turn. Only the last answer
    is supervised: earlier turns are context (a conversation whose every answer should train is split into one
    sample per answer, as the LLaVA builder and the official VT code do). Placeholders
    (``<image>``, ``<video>``, ``<audio>``, ``<speech>``) go in user (or system) contents, one per media item.

    ``question_span``: ``(start, end)`` characters of the question inside the content of the *last* user
    turn (MokA's cross-attention queries read these tokens); None: the sample has no question tokens.

    ``media``: modality key -> one tensor per placeholder of that modality, in order of appearance in the
    text (``<image>`` and ``<video>`` both consume ``visual`` items). Raw: pixels ``[S, 3, H, W]`` (S frames),
    audio windows ``[S, T]``, a speech clip ``[1, T]``; or cached encoder features ``[S, N, D]``. S, the
    item's segment count, decides how many projector tokens its placeholder expands to.

    ``feature_masks``: for cached features, modality -> one ``[S, N]`` bool mask per item (True = real
    token); items without one are all real. ``metadata``: free for builders (question type, ground truth).
    """

    id: str
    messages: list[dict[str, str]]
    question_span: tuple[int, int] | None = None
    media: dict[str, list[Tensor]] = field(default_factory=dict)
    feature_masks: dict[str, list[Tensor]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- what the collator reads ---------------------------------------------------------------------
    @property
    def is_training(self) -> bool:
        """A training sample ends with the assistant's answer (the labels); an inference one with the user."""
        return self.messages[-1]["role"] == "assistant"

    @property
    def last_user_index(self) -> int:
        """Index in ``messages`` of the last user turn, the one ``question_span`` points into."""
        return max(i for i, m in enumerate(self.messages) if m["role"] == "user")

    def placeholders(self) -> list[tuple[str, str]]:
        """``(placeholder, modality key)`` for every placeholder in the messages, in order of appearance."""
        return [
            (match.group(), PLACEHOLDERS[match.group()].key)
            for message in self.messages
            for match in PLACEHOLDER_PATTERN.finditer(message["content"])
        ]

    def placeholder_counts(self) -> dict[str, int]:
        """Modality key -> how many placeholders of it the messages hold."""
        counts: dict[str, int] = {}
        for _, modality in self.placeholders():
            counts[modality] = counts.get(modality, 0) + 1
        return counts

    # -- validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Normalise (modality keys such as ``"VISUAL"`` -> ``"visual"``, the span to a tuple) and check the
        structure; raise a ValueError naming the sample. The collator calls it again, since a dataclass can
        be changed after it was built."""
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"a sample id must be a non-empty string, got {self.id!r}")
        # Normalised copies: the builder's dicts stay untouched, keys become modality keys ("visual").
        self.media = self._by_modality(self.media, "media")
        self.feature_masks = self._by_modality(self.feature_masks, "feature_masks")
        if self.question_span is not None:
            span = self.question_span
            if (
                not isinstance(span, Sequence)
                or len(span) != 2
                or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in span)
            ):
                raise ValueError(f"sample {self.id!r}: question_span must be two ints (start, end), got {span!r}")
            self.question_span = (int(span[0]), int(span[1]))
        self._check_messages()
        self._check_question_span()
        self._check_media()

    def _error(self, message: str) -> ValueError:
        return ValueError(f"sample {self.id!r}: {message}")

    def _by_modality(self, value: Mapping[str, Sequence[Tensor]] | None, name: str) -> dict[str, list[Tensor]]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self._error(f"{name} must map modality -> list of tensors, got {type(value).__name__}")
        normalised: dict[str, list[Tensor]] = {}
        for key, items in value.items():
            try:
                modality = Modality.parse(key)
            except ValueError as error:
                raise self._error(f"{name}: {error}") from None
            if modality is Modality.TEXT:
                raise self._error(f"{name}: text is not a media modality")
            if modality.key in normalised:
                raise self._error(f"{name} names {modality.key} twice (as {key!r})")
            if isinstance(items, Tensor) or not isinstance(items, Sequence):
                raise self._error(
                    f"{name}[{key!r}] must be a list with one tensor per placeholder, got {type(items).__name__}"
                )
            normalised[modality.key] = list(items)
        return normalised

    def _check_messages(self) -> None:
        if not isinstance(self.messages, Sequence) or isinstance(self.messages, str) or not self.messages:
            raise self._error("messages must be a non-empty list of {'role', 'content'} turns")
        for index, message in enumerate(self.messages):
            if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
                raise self._error(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise self._error(f"message {index} has role {role!r}; roles are {ROLES}")
            if not isinstance(content, str):
                raise self._error(f"message {index}'s content must be a string, got {type(content).__name__}")
            if role == "assistant" and PLACEHOLDER_PATTERN.search(content):
                raise self._error(
                    f"message {index} (assistant) holds a media placeholder; media go in user (or system) turns"
                )
        if not any(m["role"] == "user" for m in self.messages):
            raise self._error("messages hold no user turn")
        if self.messages[-1]["role"] not in ("user", "assistant"):
            raise self._error(
                f"the last message is a {self.messages[-1]['role']} turn; a training sample ends with the "
                "assistant's answer, an inference sample with the user's turn"
            )

    def _check_question_span(self) -> None:
        if self.question_span is None:
            return
        start, end = self.question_span
        content = self.messages[self.last_user_index]["content"]
        if not 0 <= start < end <= len(content):
            raise self._error(
                f"question_span {self.question_span} is not a non-empty span inside the last user turn's content "
                f"({len(content)} characters)"
            )

    def _check_media(self) -> None:
        counts = self.placeholder_counts()
        for modality in sorted(set(counts) | set(self.media)):
            given = len(self.media.get(modality, []))
            if counts.get(modality, 0) != given:
                raise self._error(
                    f"{counts.get(modality, 0)} {modality} placeholder(s) in the messages but {given} {modality} "
                    "media item(s); each placeholder needs exactly one item, in order of appearance"
                )
            for index, item in enumerate(self.media.get(modality, [])):
                if not isinstance(item, Tensor):
                    raise self._error(f"{modality} item {index} is a {type(item).__name__}, not a tensor")
                if item.dim() not in (2, 3, 4) or 0 in item.shape:
                    raise self._error(
                        f"{modality} item {index} has shape {tuple(item.shape)}; expected pixels [S, 3, H, W], "
                        "waveforms [S, T] or features [S, N, D], with S >= 1 segments"
                    )
        for modality, masks in self.feature_masks.items():
            items = self.media.get(modality, [])
            if len(masks) != len(items):
                raise self._error(f"{len(masks)} {modality} feature mask(s) for {len(items)} {modality} item(s)")
            for index, (mask, item) in enumerate(zip(masks, items, strict=True)):
                if item.dim() != 3:
                    raise self._error(
                        f"{modality} item {index} has a feature mask but is not features [S, N, D] "
                        f"(shape {tuple(item.shape)})"
                    )
                if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != item.shape[:2]:
                    raise self._error(
                        f"{modality} feature mask {index} must be a bool tensor of shape {tuple(item.shape[:2])}, "
                        f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
                    )
                if not bool(mask.any(dim=1).all()):
                    raise self._error(f"{modality} feature mask {index} has a segment with no real token")
