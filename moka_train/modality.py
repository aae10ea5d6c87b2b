"""Token modalities. The integer ids are a contract: collators write them, checkpoints and configs name them."""

from __future__ import annotations

from enum import IntEnum


class Modality(IntEnum):
    """What produced a token. Start/end markers such as ``<video_start>`` are TEXT; only projector outputs
    carry a media modality. PAD marks padding positions in routing tensors."""

    PAD = -1
    TEXT = 0
    VISUAL = 1
    AUDIO = 2
    SPEECH = 3

    @property
    def key(self) -> str:
        """The lower-case name used in configs and parameter names (``lora_A.visual.weight``)."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | int | Modality) -> Modality:
        """Accept ``"visual"``, ``1`` or ``Modality.VISUAL``; raise a ValueError naming the bad value."""
        if isinstance(value, Modality):
            return value
        known = ", ".join(m.key for m in cls if m is not cls.PAD)
        if isinstance(value, str):
            try:
                modality = cls[value.strip().upper()]
            except KeyError:
                raise ValueError(f"unknown modality {value!r}; known modalities: {known}") from None
        else:
            try:
                modality = cls(int(value))
            except ValueError:
                raise ValueError(f"unknown modality id {value!r}; known: {known} (ids 0-3)") from None
        if modality is cls.PAD:
            raise ValueError("'pad' is not a modality an adapter can be configured for")
        return modality
