"""BEATs against the official implementation's outputs (../shared/reference/beats, a tiny random config
with the released fine-tuned checkpoint's structural switches), padding, and strict checkpoint loading."""

from __future__ import annotations

import math

import pytest
import torch

from moka_train.models.encoders.beats import (
    BEATs,
    BEATsConfig,
    build_beats,
    load_beats,
    relative_position_buckets,
    tiny_beats_config,
)
from moka_train.models.encoders.fbank import kaldi_num_frames
from tests.reference_files import shared_file

RTOL = 1e-4


def reference_checkpoint() -> str:
    return str(shared_file("reference", "beats", "beats_tiny_a.pt"))


@pytest.fixture(scope="module")
def model() -> BEATs:
    return load_beats(reference_checkpoint())


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return torch.load(shared_file("reference", "beats", "beats_tiny_a_io.pt"), weights_only=True)


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Max abs difference within ``rtol`` of the reference's largest magnitude."""
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rtol * scale, f"max abs diff {error:.3g} > {rtol} x {scale:.3g}"


def reference_state() -> dict:
    return torch.load(reference_checkpoint(), map_location="cpu", weights_only=True)


# (1) strict loading -------------------------------------------------------------------------------


def test_reference_checkpoint_loads_strictly(model: BEATs) -> None:
    checkpoint = reference_state()
    assert set(model.state_dict()) == set(checkpoint["model"])
    for key, value in checkpoint["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.cfg == BEATsConfig(**checkpoint["cfg"])
    # One relative position table, shared by every layer (its later-layer keys alias layer 0's).
    tables = {id(layer.self_attn.relative_attention_bias) for layer in model.encoder.layers}
    assert len(tables) == 1


def test_tiny_builder_matches_the_reference_structure() -> None:
    built = build_beats(tiny_beats_config(), seed=0)
    checkpoint = reference_state()
    assert built.cfg == BEATsConfig(**checkpoint["cfg"])
    shapes = {key: tuple(value.shape) for key, value in built.state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in checkpoint["model"].items()}


def test_saved_state_dict_reloads(tmp_path) -> None:
    built = build_beats(tiny_beats_config(), seed=1)
    path = tmp_path / "beats.pt"
    torch.save({"cfg": vars(built.cfg), "model": built.state_dict()}, path)
    loaded = load_beats(path)
    fbank = torch.randn(1, 40, 128)
    torch.testing.assert_close(loaded.features_from_fbank(fbank)[0], built.features_from_fbank(fbank)[0])


# (2), (3) the transformer on the reference fbank ----------------------------------------------------


@pytest.mark.parametrize("wave", ["wave_1s", "wave_2s"])
def test_features_from_reference_fbank(model: BEATs, io, wave: str) -> None:
    features, mask = model.features_from_fbank(io[f"{wave}_fbank"][None])
    assert mask is None
    assert_close_relative(features[0], io[f"{wave}_features"])  # measured: 1.9e-6 abs (4e-7 relative)


@pytest.mark.parametrize("wave", ["wave_1s", "wave_2s"])
def test_probabilities_from_reference_fbank(model: BEATs, io, wave: str) -> None:
    features, mask = model.features_from_fbank(io[f"{wave}_fbank"][None])
    probs = model.probabilities_from_features(features, mask)
    torch.testing.assert_close(probs[0], io[f"{wave}_probs"], rtol=0, atol=RTOL)  # measured: 9e-8


# (4) end to end from waveforms ---------------------------------------------------------------------


@pytest.mark.parametrize("wave", ["wave_1s", "wave_2s"])
def test_end_to_end_from_waveforms(model: BEATs, io, wave: str) -> None:
    features, mask = model.extract_features(io[wave][None])
    assert mask is None
    # The fbank itself differs from torchaudio's by up to ~4e-5; the features follow (measured 3e-5 abs).
    assert_close_relative(features[0], io[f"{wave}_features"])
    torch.testing.assert_close(model.classify(io[wave][None])[0], io[f"{wave}_probs"], rtol=0, atol=RTOL)


# (5) padding ---------------------------------------------------------------------------------------
#
# The official code makes the token mask by cutting the frame mask into N equal runs (N = tokens), as if
# tokens were ordered by time at frame resolution; tokens are time-major 16x16 patches (8 per time patch),
# so each token gets a run of ~2 frames. A sample batched with padding therefore equals the sample alone
# exactly when its valid frames end on a time-patch boundary (its valid tokens are then exactly the
# tokens it has alone); otherwise a few tokens of its first partly padded time patch count as valid.


def padded_batch(short: torch.Tensor, long: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    waves = torch.zeros(2, long.numel())
    waves[0, : short.numel()] = short
    waves[1] = long
    mask = torch.zeros(2, long.numel(), dtype=torch.bool)
    mask[0, short.numel() :] = True
    return waves, mask


def test_padding_aligned_on_patches_matches_alone(model: BEATs, io) -> None:
    # 38640 samples = 240 frames = 15 time patches, in a batch of 48000 samples (298 frames): the
    # official waveform -> frame mask marks frames from 38640 // 161 = 240 on, the frame -> token mask
    # tokens from 120 = 15 * 8 on, so the valid tokens are exactly those of the clip alone.
    long = torch.cat([io["wave_2s"], io["wave_1s"]])
    short = long[:38640]
    assert 1 + (short.numel() - 400) // 160 == 240  # Kaldi frames: 25 ms windows, 10 ms shift
    waves, mask = padded_batch(short, long)
    features, token_mask = model.extract_features(waves, mask)
    assert token_mask.shape == (2, 144)
    assert (~token_mask).sum(-1).tolist() == [120, 144]
    assert not token_mask[0, :120].any() and token_mask[0, 120:].all()

    alone, _ = model.extract_features(short[None])
    assert alone.shape == (1, 120, 64)
    assert_close_relative(features[0, :120], alone[0])  # measured: 2.3e-6 abs
    full, _ = model.extract_features(long[None])
    assert_close_relative(features[1], full[0])  # the unpadded row is untouched by its neighbour

    probs = model.classify(waves, mask)
    torch.testing.assert_close(probs[0], model.classify(short[None])[0], rtol=0, atol=RTOL)
    torch.testing.assert_close(probs[1], model.classify(long[None])[0], rtol=0, atol=RTOL)


def test_padding_from_fbank_frames_on_a_patch_boundary(model: BEATs, io) -> None:
    fbank = torch.zeros(2, 198, 128)
    fbank[0, :98] = io["wave_1s_fbank"]
    fbank[1] = io["wave_2s_fbank"]
    frame_mask = torch.zeros(2, 198, dtype=torch.bool)
    frame_mask[0, 96:] = True  # the 6 whole time patches the 1 s clip has alone (frames 96, 97 are cut)
    features, token_mask = model.features_from_fbank(fbank, frame_mask)
    assert (~token_mask).sum(-1).tolist() == [48, 96]
    assert_close_relative(features[0, :48], io["wave_1s_features"])
    assert_close_relative(features[1], io["wave_2s_features"])


def test_padding_1s_with_2s_follows_the_official_token_mask(model: BEATs, io) -> None:
    """The 1 s clip padded to 2 s: not equal to the clip alone, by the official semantics.

    Waveform -> frames: 32000 samples cut into 198 runs of 161 (122 dropped): frames 0..99 valid (the
    clip has 98 frames; frames 98, 99 straddle the end). Frames -> tokens: 192 frames cut into 96 runs
    of 2: tokens 0..49 valid, i.e. the 48 tokens of the clip alone plus frequency patches 0 and 1 of
    time patch 6 (frames 96..111, mostly padding), which the valid tokens then attend to.
    """
    waves, mask = padded_batch(io["wave_1s"], io["wave_2s"])
    features, token_mask = model.extract_features(waves, mask)
    assert features.shape == (2, 96, 64)
    expected = torch.zeros(2, 96, dtype=torch.bool)
    expected[0, 50:] = True
    assert torch.equal(token_mask, expected)
    assert_close_relative(features[1], io["wave_2s_features"])
    # The two extra valid tokens change the clip's features: what the official code computes too.
    assert (features[0, :48] - io["wave_1s_features"]).abs().max() > 1e-2
    assert torch.isfinite(features).all()


def test_no_padding_mask_entries_equals_no_mask(model: BEATs, io) -> None:
    wave = io["wave_2s"][None]
    features, token_mask = model.extract_features(wave, torch.zeros_like(wave, dtype=torch.bool))
    assert token_mask is not None and not token_mask.any()
    torch.testing.assert_close(features, model.extract_features(wave)[0])


def test_segments_of_different_lengths_are_encoded_as_each_alone() -> None:
    """The multimodal model's entry point: a clip's features must not depend on the clips batched with it
    (answers would change with the evaluation's batch size, and differ from the feature cache's). Each clip
    gets the features and the token count it has alone: 16-frame time patches x 8 frequency patches, the
    trailing frames of a partial patch dropped. Under the official padding mask the 1 s clip had extra valid
    tokens from its padding (the test above)."""
    model = build_beats(tiny_beats_config(), seed=0)
    seconds = (1.0, 2.2, 1.5, 1.0)
    clips = [torch.randn(int(s * 16000), generator=torch.Generator().manual_seed(i)) for i, s in enumerate(seconds)]
    waves = torch.stack([torch.nn.functional.pad(clip, (0, 35200 - clip.numel())) for clip in clips])
    features, mask = model.encode_segments(waves, torch.tensor([clip.numel() for clip in clips]))
    tokens = [kaldi_num_frames(clip.numel()) // 16 * 8 for clip in clips]
    assert tokens == [48, 104, 72, 48]
    assert features.shape == (4, 104, 64)
    assert mask.sum(-1).tolist() == tokens and all(mask[i, :n].all() for i, n in enumerate(tokens))
    for i, (clip, n) in enumerate(zip(clips, tokens, strict=True)):
        alone, alone_mask = model.encode_segments(clip[None])
        assert alone_mask is None and alone.shape == (1, n, 64)
        torch.testing.assert_close(features[i, :n], alone[0], rtol=1e-5, atol=1e-5)
        assert not features[i, n:].any()
    same, same_mask = model.encode_segments(waves[:1, :16000], torch.tensor([16000]))
    assert same_mask is None
    torch.testing.assert_close(same, features[:1, :48], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="within the waveforms"):
        model.encode_segments(waves, torch.tensor([16000, 35201, 24000, 16000]))


def test_a_sample_with_no_valid_token_is_an_error(model: BEATs, io) -> None:
    # Even 100 valid samples leave token 0 valid (its run of frames 0, 1 is not all padding); an empty
    # clip has none, and the official attention would return NaN for it.
    waves, mask = padded_batch(io["wave_1s"][:100], io["wave_2s"])
    assert (~model.extract_features(waves, mask)[1][0]).sum() == 1
    waves, mask = padded_batch(io["wave_1s"][:0], io["wave_2s"])
    with pytest.raises(ValueError, match="no valid token"):
        model.extract_features(waves, mask)


def test_bad_inputs(model: BEATs, io) -> None:
    wave = io["wave_1s"][None]
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model.extract_features(io["wave_1s"])
    with pytest.raises(TypeError, match="bool"):
        model.extract_features(wave, torch.zeros_like(wave, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match"):
        model.extract_features(wave, torch.zeros(1, 100, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 16 frames"):
        model.extract_features(wave[:, :2000])


def test_relative_position_buckets_follow_the_official_formula() -> None:
    # The official _relative_positions_bucket, transcribed, beyond max_distance (800) in both directions.
    num_buckets, max_distance, length = 320, 800, 1000
    positions = torch.arange(length)
    relative = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    expected = (relative > 0).long() * half
    distance = relative.abs()
    max_exact = half // 2
    with torch.no_grad():
        large = max_exact + (
            torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
        ).to(torch.long)
    large = torch.min(large, torch.full_like(large, half - 1))
    expected = expected + torch.where(distance < max_exact, distance, large)
    actual = relative_position_buckets(length, num_buckets, max_distance, torch.device("cpu"))
    assert torch.equal(actual, expected)


# (6) checkpoint errors ------------------------------------------------------------------------------


def _drop_key(checkpoint: dict) -> None:
    del checkpoint["model"]["encoder.layers.1.fc2.bias"]


def _add_key(checkpoint: dict) -> None:
    checkpoint["model"]["encoder.extra.weight"] = torch.zeros(1)


def _reshape(checkpoint: dict) -> None:
    checkpoint["model"]["predictor.bias"] = torch.zeros(10)


def _unknown_cfg(checkpoint: dict) -> None:
    checkpoint["cfg"]["rotary_embeddings"] = True


@pytest.mark.parametrize(
    "damage,match",
    [
        (_drop_key, r"missing \['encoder\.layers\.1\.fc2\.bias'\]"),
        (_add_key, r"unexpected \['encoder\.extra\.weight'\]"),
        (_reshape, r"size mismatch for predictor\.bias"),
        (_unknown_cfg, r"unknown BEATs config keys \['rotary_embeddings'\]"),
    ],
    ids=["missing-key", "unexpected-key", "wrong-shape", "unknown-cfg-key"],
)
def test_bad_checkpoint_raises_naming_file_and_key(tmp_path, damage, match) -> None:
    checkpoint = reference_state()
    damage(checkpoint)
    path = tmp_path / "damaged.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"(?s)damaged\.pt.*" + match):
        load_beats(path)


def test_differing_relative_position_tables_raise(tmp_path) -> None:
    checkpoint = reference_state()
    key = "encoder.layers.1.self_attn.relative_attention_bias.weight"
    checkpoint["model"][key] = checkpoint["model"][key] + 1  # a new tensor: torch.save kept the aliasing
    path = tmp_path / "tables.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"tables\.pt.*layers\.1\.self_attn\.relative_attention_bias"):
        load_beats(path)


def test_a_missing_checkpoint_is_named(tmp_path) -> None:
    # torch.load's own error names no path: FileNotFoundError(2, 'No such file or directory').
    with pytest.raises(FileNotFoundError, match=f"BEATs checkpoint {tmp_path / 'gone.pt'} does not exist"):
        load_beats(tmp_path / "gone.pt")


def test_not_a_checkpoint_raises(tmp_path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"plain\.pt is not a BEATs checkpoint"):
        load_beats(path)


def test_classify_without_predictor_raises() -> None:
    encoder = build_beats(tiny_beats_config(finetuned_model=False), seed=0)
    assert encoder.predictor is None and "predictor.weight" not in encoder.state_dict()
    with pytest.raises(RuntimeError, match="no predictor"):
        encoder.classify(torch.zeros(1, 16000))


# (7) frozen ----------------------------------------------------------------------------------------


def test_loaded_model_is_frozen_and_in_eval_mode(model: BEATs, io) -> None:
    assert not model.training
    assert all(not module.training for module in model.modules())
    assert all(not parameter.requires_grad for parameter in model.parameters())
    features, _ = model.features_from_fbank(io["wave_1s_fbank"][None])
    assert not features.requires_grad


def test_train_mode_does_not_change_outputs(io) -> None:
    # Dropouts are not implemented: a caller's model.train() on the whole MLLM leaves BEATs deterministic.
    encoder = load_beats(reference_checkpoint())
    fbank = io["wave_1s_fbank"][None]
    expected, _ = encoder.features_from_fbank(fbank)
    encoder.train()
    torch.testing.assert_close(encoder.features_from_fbank(fbank)[0], expected, rtol=0, atol=0)


# Structural switches of other configs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(relative_position_embedding=False, gru_rel_pos=False),
        dict(gru_rel_pos=False),
        dict(deep_norm=False, layer_norm_first=True),
        dict(embed_dim=64, conv_pos=15),
    ],
)
def test_other_configs_build_and_run(overrides: dict) -> None:
    encoder = build_beats(tiny_beats_config(**overrides), seed=0)
    keys = encoder.state_dict()
    assert (
        "encoder.layers.0.self_attn.relative_attention_bias.weight" in keys
    ) == encoder.cfg.relative_position_embedding
    assert ("encoder.layers.0.self_attn.grep_a" in keys) == encoder.cfg.gru_rel_pos
    assert ("post_extract_proj.weight" in keys) == (encoder.cfg.embed_dim != encoder.cfg.encoder_embed_dim)
    features, _ = encoder.features_from_fbank(torch.randn(2, 50, 128))
    assert features.shape == (2, 3 * 8, 64) and torch.isfinite(features).all()


def test_invalid_configs_raise() -> None:
    with pytest.raises(ValueError, match="deep_norm"):
        BEATs(tiny_beats_config(layer_norm_first=True))
    with pytest.raises(ValueError, match="activation_fn 'glu'"):
        BEATs(tiny_beats_config(activation_fn="glu"))
    with pytest.raises(ValueError, match="divisible"):
        BEATs(tiny_beats_config(encoder_attention_heads=3))


def test_bfloat16_runs_close_to_float32(model: BEATs, io) -> None:
    encoder = load_beats(reference_checkpoint()).to(torch.bfloat16)
    features, _ = encoder.extract_features(io["wave_1s"][None])
    assert features.dtype == torch.bfloat16
    assert_close_relative(features[0].float(), io["wave_1s_features"], rtol=0.1)
