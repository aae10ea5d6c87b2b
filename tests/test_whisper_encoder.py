"""The Whisper speech encoder against openai-whisper's own encoder forward, on clips shorter and longer
than Whisper's 30 s window."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import whisper
from whisper.audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE
from whisper.model import ModelDimensions, Whisper

from moka_train.models.encoders.whisper_encoder import (
    WhisperSpeechEncoder,
    build_whisper_encoder,
    load_whisper_encoder,
)

DIMS = ModelDimensions(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=32,
    n_audio_head=2,
    n_audio_layer=2,
    n_vocab=64,
    n_text_ctx=16,
    n_text_state=32,
    n_text_head=2,
    n_text_layer=1,
)


@pytest.fixture(scope="module")
def model() -> Whisper:
    torch.manual_seed(0)
    return Whisper(DIMS).eval()


def clip(seconds: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return 0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn(t.shape, generator=generator)


def encoder_for(model: Whisper, output_layer=None) -> WhisperSpeechEncoder:
    encoder = build_whisper_encoder(DIMS, output_layer)
    encoder.encoder.load_state_dict(model.encoder.state_dict())
    return encoder


def whisper_windows(model: Whisper, audio: torch.Tensor) -> list[torch.Tensor]:
    """What whisper.transcribe feeds its encoder: the padded clip's log-mel, cut into 30 s windows, each
    through openai-whisper's own AudioEncoder.forward."""
    mel = whisper.log_mel_spectrogram(audio, DIMS.n_mels, padding=N_SAMPLES)
    frames = mel.shape[-1] - N_FRAMES
    with torch.no_grad():
        return [
            model.encoder(whisper.pad_or_trim(mel[:, s : s + N_FRAMES], N_FRAMES)[None])[0]
            for s in range(0, frames, N_FRAMES)
        ]


@pytest.mark.parametrize("seconds,tokens", [(30.0, 1500), (5.0, 250), (40.0, 2000), (0.05, 3)])
def test_matches_whisper_and_trims_or_chunks(model, seconds, tokens):
    """50 tokens per second: a short clip is trimmed to its length, a long one chunked, never truncated."""
    audio = clip(seconds)
    features, valid = encoder_for(model)([audio])
    assert features.shape == (1, tokens, DIMS.n_audio_state) and bool(valid.all())
    windows = whisper_windows(model, audio)
    expected = torch.cat([*windows[:-1], windows[-1][: tokens - 1500 * (len(windows) - 1)]])
    torch.testing.assert_close(features[0], expected, rtol=1e-5, atol=1e-5)


def test_batch_equals_clips_alone_and_padded_input(model):
    encoder = encoder_for(model)
    clips = [clip(5.0, seed=1), clip(40.0, seed=2), clip(12.3, seed=3)]
    features, valid = encoder(clips)
    assert valid.sum(1).tolist() == [250, 2000, 615]
    for row, audio in enumerate(clips):
        alone, _ = encoder([audio])
        torch.testing.assert_close(features[row, valid[row]], alone[0], rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(features[row, ~valid[row]]) == 0
    padded = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)
    lengths = torch.tensor([len(c) for c in clips])
    torch.testing.assert_close(encoder(padded, lengths)[0], features)


def test_output_layer_is_a_block_output(model):
    captured = {}
    hook = model.encoder.blocks[0].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    audio = clip(30.0)
    whisper_windows(model, audio)
    hook.remove()
    features, _ = encoder_for(model, output_layer=0)([audio])
    torch.testing.assert_close(features[0], captured["x"][0], rtol=1e-5, atol=1e-5)


def test_loads_a_whisper_checkpoint(model, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save({"dims": dataclasses.asdict(DIMS), "model_state_dict": model.state_dict()}, path)
    loaded = load_whisper_encoder(path)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert not hasattr(loaded, "decoder")
    audio = clip(3.0)
    torch.testing.assert_close(loaded([audio])[0], encoder_for(model)([audio])[0], rtol=0, atol=0)
    state = model.state_dict()
    del state["encoder.ln_post.weight"]
    torch.save({"dims": dataclasses.asdict(DIMS), "model_state_dict": state}, path)
    with pytest.raises(ValueError, match=r"tiny.pt: encoder keys do not match: missing \['ln_post.weight'\]"):
        load_whisper_encoder(path)
    torch.save({"weights": state}, path)
    with pytest.raises(ValueError, match="not an openai-whisper checkpoint"):
        load_whisper_encoder(path)


def test_bad_input():
    encoder = build_whisper_encoder(DIMS)
    with pytest.raises(ValueError, match="shorter than one mel frame"):
        encoder([torch.zeros(100)])
    with pytest.raises(ValueError, match="lengths .* do not fit"):
        encoder(torch.zeros(2, 1000), torch.tensor([1000, 2000]))
    with pytest.raises(ValueError, match="n_audio_ctx=1500"):
        build_whisper_encoder({**dataclasses.asdict(DIMS), "n_audio_ctx": 250})
    with pytest.raises(ValueError, match="output_layer 5 is out of range"):
        build_whisper_encoder(DIMS, output_layer=5)


def test_config_presets_instantiate(model, tmp_path):
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    configs = Path(__file__).parents[1] / "configs" / "encoder" / "speech"
    tiny = instantiate(OmegaConf.load(configs / "whisper_tiny_random.yaml"))
    assert isinstance(tiny, WhisperSpeechEncoder) and tiny.hidden_size == 32
    path = tmp_path / "model.pt"
    torch.save({"dims": dataclasses.asdict(DIMS), "model_state_dict": model.state_dict()}, path)
    preset = OmegaConf.load(configs / "whisper_large_v3.yaml")
    preset.path = str(path)
    assert isinstance(instantiate(preset), WhisperSpeechEncoder)
