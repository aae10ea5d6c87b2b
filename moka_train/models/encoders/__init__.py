"""Frozen media encoders: CLIP (images, video frames), BEATs (audio), Whisper (speech)."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class SegmentEncoder(Protocol):
    """What the multimodal model needs of an encoder: its output width and the features of a batch of
    segments (frames, audio windows, speech clips) with a mask True at real tokens (None: all real)."""

    hidden_size: int

    def encode_segments(self, media: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]: ...
