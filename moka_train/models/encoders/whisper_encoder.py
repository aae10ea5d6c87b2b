"""The Whisper speech encoder (openai-whisper), frozen, with Whisper's own log-mel front end.

Whisper's encoder takes exactly 30 s (3000 mel frames -> 1500 tokens, 50 tokens per second). Like
``whisper.transcribe``, each clip's log-mel is computed once over the whole clip (its normalisation uses the
clip's maximum) with 30 s of zero padding, then cut into 30 s windows: a short clip is padded and its
output trimmed to the real length, a long clip is chunked rather than truncated. Every window of the batch
goes through the encoder in one call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from whisper.model import AudioEncoder, ModelDimensions

# The encoder of large-v3, the preset the speech experiments use (openai-whisper's ModelDimensions).
LARGE_V3_DIMS = {"n_mels": 128, "n_audio_ctx": 1500, "n_audio_state": 1280, "n_audio_head": 20, "n_audio_layer": 32}
_AUDIO_FIELDS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")


class WhisperSpeechEncoder(nn.Module):
    """A frozen Whisper ``AudioEncoder`` that takes 16 kHz waveforms of any length.

    ``output_layer``: None for the encoder's output (after ``ln_post``, what Whisper's decoder reads), or
    the index of a block (Python indexing, -1 = the last block, before ``ln_post``).
    """

    def __init__(self, encoder: AudioEncoder, n_mels: int, output_layer: int | None = None) -> None:
        super().__init__()
        if encoder.positional_embedding.shape[0] * 2 != N_FRAMES:
            raise ValueError(
                f"the encoder has n_audio_ctx={encoder.positional_embedding.shape[0]}; 30 s windows of "
                f"{N_FRAMES} mel frames need n_audio_ctx={N_FRAMES // 2}"
            )
        num_blocks = len(encoder.blocks)
        if output_layer is not None and not -num_blocks <= output_layer < num_blocks:
            raise ValueError(f"output_layer {output_layer} is out of range for {num_blocks} encoder blocks")
        self.encoder = encoder
        self.n_mels = n_mels
        self.output_layer = output_layer
        self.hidden_size = encoder.ln_post.normalized_shape[0]
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> WhisperSpeechEncoder:
        """Stay in eval mode: the encoder is frozen, whatever the model around it does."""
        return super().train(False)

    def encode_segments(self, media: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The multimodal model's entry point: one speech clip per segment, ``media`` [S, T] at 16 kHz with
        ``lengths`` [S] in samples (None: all T); features [S, N, D] and a mask True at real tokens."""
        return self(media, lengths)

    @property
    def tokens_per_window(self) -> int:
        return N_FRAMES // 2

    def log_mel(self, waveform: Tensor) -> tuple[Tensor, int]:
        """Whisper's log-mel of one clip with 30 s of padding: ``([n_mels, frames + 3000], frames)``."""
        if waveform.dim() != 1:
            raise ValueError(f"expected a 1-D waveform, got shape {tuple(waveform.shape)}")
        frames = waveform.shape[0] // HOP_LENGTH
        if frames == 0:
            raise ValueError(
                f"a clip of {waveform.shape[0]} samples is shorter than one mel frame ({HOP_LENGTH} samples at "
                f"{SAMPLE_RATE} Hz)"
            )
        device = self.encoder.conv1.weight.device
        mel = log_mel_spectrogram(waveform.float(), self.n_mels, padding=N_SAMPLES, device=device)
        return mel, frames

    def encode_windows(self, mels: Tensor) -> Tensor:
        """The encoder on a batch of 30 s windows [W, n_mels, 3000] -> [W, 1500, D] (the chosen layer)."""
        encoder = self.encoder
        x = torch.nn.functional.gelu(encoder.conv1(mels.to(encoder.conv1.weight.dtype)))
        x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
        x = (x + encoder.positional_embedding).to(x.dtype)
        last = len(encoder.blocks) - 1 if self.output_layer is None else self.output_layer % len(encoder.blocks)
        for block in encoder.blocks[: last + 1]:
            x = block(x)
        return encoder.ln_post(x) if self.output_layer is None else x

    @torch.no_grad()
    def forward(self, waveforms: Sequence[Tensor] | Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Features of each clip, ``([B, N, D], valid [B, N] bool)``, N = the longest clip's token count.

        ``waveforms``: a list of 1-D 16 kHz clips, or a padded [B, T] tensor with ``lengths`` [B] in samples.
        """
        clips = _as_clips(waveforms, lengths)
        windows, spans = [], []
        for clip in clips:
            mel, frames = self.log_mel(clip)
            starts = range(0, frames, N_FRAMES)
            for start in starts:
                windows.append(mel[:, start : start + N_FRAMES])
            # Tokens of the last window that cover real frames: the stride-2 convolution halves the frames.
            last_frames = frames - starts[-1]
            spans.append((len(starts), (last_frames + 1) // 2))
        encoded = self.encode_windows(torch.stack(windows))
        per_clip, index = [], 0
        for count, last_tokens in spans:
            pieces = [encoded[index + i] for i in range(count - 1)]
            pieces.append(encoded[index + count - 1, :last_tokens])
            per_clip.append(torch.cat(pieces))
            index += count
        width = max(len(features) for features in per_clip)
        features = encoded.new_zeros(len(per_clip), width, encoded.shape[-1])
        valid = torch.zeros(len(per_clip), width, dtype=torch.bool, device=encoded.device)
        for row, clip_features in enumerate(per_clip):
            features[row, : len(clip_features)] = clip_features
            valid[row, : len(clip_features)] = True
        return features, valid


def _as_clips(waveforms: Sequence[Tensor] | Tensor, lengths: Tensor | None) -> list[Tensor]:
    if isinstance(waveforms, Tensor):
        if waveforms.dim() == 1:
            waveforms = waveforms.unsqueeze(0)
        if waveforms.dim() != 2:
            raise ValueError(f"expected waveforms [B, T], got shape {tuple(waveforms.shape)}")
        if lengths is None:
            return list(waveforms)
        if lengths.shape != (waveforms.shape[0],) or bool((lengths > waveforms.shape[1]).any()):
            raise ValueError(f"lengths {lengths.tolist()} do not fit waveforms of shape {tuple(waveforms.shape)}")
        return [waveform[: int(n)] for waveform, n in zip(waveforms, lengths, strict=True)]
    if lengths is not None:
        raise ValueError("lengths go with a padded [B, T] tensor, not with a list of clips")
    return list(waveforms)


def build_whisper_encoder(
    dims: ModelDimensions | dict, output_layer: int | None = None, seed: int | None = None
) -> WhisperSpeechEncoder:
    """A randomly initialised encoder of the given dimensions (tests, the demo); ``seed`` makes the weights
    reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    fields = dataclasses.asdict(dims) if isinstance(dims, ModelDimensions) else dict(dims)
    audio = _audio_dims(fields, "dims")
    encoder = AudioEncoder(
        audio["n_mels"], audio["n_audio_ctx"], audio["n_audio_state"], audio["n_audio_head"], audio["n_audio_layer"]
    )
    return WhisperSpeechEncoder(encoder, audio["n_mels"], output_layer)


def load_whisper_encoder(path: str | os.PathLike, output_layer: int | None = None) -> WhisperSpeechEncoder:
    """The encoder of a local openai-whisper checkpoint (``{"dims": ..., "model_state_dict": ...}``, e.g.
    ``large-v3.pt``); the decoder's weights are not kept. Keys must match exactly."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise ValueError(f"{path} is not an openai-whisper checkpoint (expected keys 'dims' and 'model_state_dict')")
    model = build_whisper_encoder(_audio_dims(checkpoint["dims"], str(path)), output_layer)
    state = {
        k.removeprefix("encoder."): v for k, v in checkpoint["model_state_dict"].items() if k.startswith("encoder.")
    }
    expected = set(model.encoder.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: encoder keys do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.encoder.load_state_dict(state, strict=True)
    return model


def _audio_dims(fields: dict, source: str) -> dict:
    missing = [name for name in _AUDIO_FIELDS if name not in fields]
    if missing:
        raise ValueError(f"{source}: Whisper dimensions lack {missing}")
    return {name: int(fields[name]) for name in _AUDIO_FIELDS}
