"""Media decoding and audio windows on real files written here with PyAV: an H.264 mp4 whose frame k is a solid
colour that encodes k (so a decoded frame tells which frame it is) with an AAC sine track, the same video in
mkv (no frame count in the header) and in MPEG-4 part 2, wav / flac / mp3 tones at 44.1 kHz stereo and 16 kHz
mono. Window arithmetic runs on synthetic waveforms whose sample i holds i + 1, so a window's values say
exactly which samples it took and zeros mark the padding; expectations are computed by hand from the
documented rules."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from moka_train.data import media
from moka_train.data.media import (
    WINDOW_PRESETS,
    AudioWindows,
    MediaLoader,
    PerImage,
    audio_duration,
    cut_windows,
    read_audio,
    read_image,
    read_video_frames,
    resolve_audio_windows,
    sample_frame_indices,
)
from moka_train.data.records import MediaRef

HEIGHT, WIDTH, FPS = 48, 64, 25
CLIP_FRAMES = 37  # frames of the test video: 10 picks are 0 3 7 11 14 18 22 25 29 33
PICKS_37 = [0, 3, 7, 11, 14, 18, 22, 25, 29, 33]  # floor(k * 37 / 10), k = 0..9
PICKS_4 = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]  # floor(k * 4 / 10): a 4-frame video repeats frames
VIDEO_TONE, TONE_44K, TONE_16K = 440.0, 1000.0, 440.0
AUDIO_SECONDS = 2.5


# -- writing media ---------------------------------------------------------------------------------------------
def colour(k: int) -> np.ndarray:
    """The RGB colour of frame k; neighbours differ by >= 4 levels per channel, far beyond x264 qp 0 rounding."""
    return np.array([(k * 6 + 8) % 256, (200 - k * 4) % 256, (k * 37) % 200 + 20], dtype=np.uint8)


COLOURS = np.stack([colour(k) for k in range(64)]).astype(np.int64)


def frame_numbers(frames: np.ndarray) -> list[int]:
    """Which frame each decoded frame is: the nearest colour of the table."""
    means = frames.reshape(len(frames), -1, 3).mean(axis=1)
    return [int(np.argmin(((COLOURS - mean) ** 2).sum(axis=1))) for mean in means]


def sine(tone: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * tone * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def encode_audio(out: av.container.OutputContainer, stream: av.audio.stream.AudioStream, channels: np.ndarray) -> None:
    """Push float channels [C, T] through the stream's encoder in its own sample format."""
    rate, layout = stream.codec_context.sample_rate, stream.codec_context.layout.name
    resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate)
    for start in range(0, channels.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(channels[:, start : start + 1024], dtype=np.float32), format="fltp", layout=layout
        )
        frame.sample_rate, frame.pts = rate, start
        for converted in resampler.resample(frame):
            out.mux(stream.encode(converted))
    out.mux(stream.encode(None))


def write_video(
    path: Path, num_frames: int, codec: str = "libx264", tone: float | None = None, faststart: bool = False
) -> Path:
    """Frame k solid ``colour(k)``; with ``tone``, an AAC 44.1 kHz stereo sine as long as the video."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        video = out.add_stream(codec, rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if codec == "libx264":
            video.options = {"qp": "0", "preset": "ultrafast"}  # lossless in YUV: colours survive to +-3
        audio = out.add_stream("aac", rate=44100, layout="stereo") if tone else None
        for k in range(num_frames):
            image = np.ascontiguousarray(np.broadcast_to(colour(k), (HEIGHT, WIDTH, 3)))
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode(None))
        if audio is not None:
            wave = sine(tone, 44100, num_frames / FPS)
            encode_audio(out, audio, np.stack([wave, wave]))
    return path


def write_audio(path: Path, codec: str, rate: int, channels: np.ndarray) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo" if len(channels) == 2 else "mono")
        encode_audio(out, stream, channels)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    made = {
        "clip": write_video(root / "clip.mp4", CLIP_FRAMES, tone=VIDEO_TONE),
        "short": write_video(root / "short.mp4", 4),
        "mkv": write_video(root / "clip.mkv", CLIP_FRAMES),
        "mpeg4": write_video(root / "mpeg4.mp4", CLIP_FRAMES, codec="mpeg4"),
        "faststart": write_video(root / "faststart.mp4", CLIP_FRAMES, faststart=True),
    }
    stereo_tone = sine(TONE_44K, 44100, AUDIO_SECONDS)
    mono_tone = sine(TONE_16K, 16000, AUDIO_SECONDS)
    for codec, ext in (("pcm_s16le", "wav"), ("flac", "flac"), ("libmp3lame", "mp3")):
        made[f"44k.{ext}"] = write_audio(root / f"tone44k.{ext}", codec, 44100, np.stack([stereo_tone, stereo_tone]))
        made[f"16k.{ext}"] = write_audio(root / f"tone16k.{ext}", codec, 16000, mono_tone[None])
    # Left channel a tone, right channel silent: the mono downmix must be the channel mean.
    made["left_only"] = write_audio(
        root / "left_only.wav", "pcm_s16le", 16000, np.stack([sine(TONE_16K, 16000, 1.0, 0.8), np.zeros(16000)])
    )
    # A truncated mp4 (the moov index is at the end, so it is cut off) and a truncated faststart mp4 (index
    # intact, media data cut: the damage shows only when decoding).
    data = made["clip"].read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    made["truncated"] = root / "truncated.mp4"
    data = made["faststart"].read_bytes()
    (root / "truncated_faststart.mp4").write_bytes(data[: int(len(data) * 0.6)])
    made["truncated_faststart"] = root / "truncated_faststart.mp4"
    (root / "garbage.mp4").write_bytes(b"\x00\x01not a video" * 64)
    made["garbage"] = root / "garbage.mp4"
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(colour(5), (40, 50, 3)))).save(root / "image.png")
    made["image"] = root / "image.png"
    return made


# -- frames ----------------------------------------------------------------------------------------------------
def test_frame_indices_are_the_official_uniform_sampling():
    assert sample_frame_indices(37, 10).tolist() == PICKS_37
    assert sample_frame_indices(4, 10).tolist() == PICKS_4
    assert sample_frame_indices(1800, 10).tolist() == list(range(0, 1800, 180))  # a 60 s MUSIC-AVQA clip, 30 fps
    assert sample_frame_indices(10, 10).tolist() == list(range(10))
    assert sample_frame_indices(1, 3).tolist() == [0, 0, 0]
    # The official expression, np.arange(0, vlen, vlen / n).astype(int), wherever it gives n indices.
    for vlen in (7, 250, 301, 999, 1797):
        assert sample_frame_indices(vlen, 10).tolist() == np.arange(0, vlen, vlen / 10).astype(int).tolist()
    with pytest.raises(ValueError, match="at least one frame"):
        sample_frame_indices(0, 10)


def test_ten_frames_of_a_video(files):
    frames = read_video_frames(files["clip"], 10)
    assert frames.shape == (10, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    assert frame_numbers(frames) == PICKS_37
    # Solid frames, RGB order (not BGR), within x264's lossless-YUV rounding.
    assert np.abs(frames.astype(np.int64) - COLOURS[PICKS_37][:, None, None, :]).max() <= 4
    # Decoding stops at the last frame needed: picks 0 and 3 decode 4 of the 37 frames.
    picked, decoded = media._decode_frames(files["clip"], "clip", np.array([0, 3]), None)
    assert sorted(picked) == [0, 3] and decoded == 4


def test_short_video_repeats_frames(files):
    assert frame_numbers(read_video_frames(files["short"], 10)) == PICKS_4
    assert frame_numbers(read_video_frames(files["short"], 4)) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("num_frames", "picks"),
    [
        (1, [0]),
        (8, [0, 4, 9, 13, 18, 23, 27, 32]),
        (37, list(range(37))),
        (50, np.arange(0, 37, 37 / 50).astype(int).tolist()),  # more frames than the video: repeats
    ],
)
def test_frame_counts(files, num_frames, picks):
    assert frame_numbers(read_video_frames(files["clip"], num_frames)) == picks


@pytest.mark.parametrize("key", ["mkv", "mpeg4", "faststart"])
def test_other_containers_and_codecs(files, key):
    """mkv has no frame count in its header (packets are counted); MPEG-4 part 2 is lossy but keeps colours."""
    assert frame_numbers(read_video_frames(files[key], 10)) == PICKS_37


def test_frames_scaled_and_from_bytes(files):
    scaled = read_video_frames(files["clip"], 10, size=(24, 40))  # (height, width), aspect ratio not kept
    assert scaled.shape == (10, 24, 40, 3) and frame_numbers(scaled) == PICKS_37
    in_memory = read_video_frames(files["clip"].read_bytes(), 10)
    np.testing.assert_array_equal(in_memory, read_video_frames(files["clip"], 10))


def test_header_promising_more_frames_than_decoded(files, monkeypatch, caplog):
    """Frames missing at the end: the indices are taken again over the 37 frames that exist, with a warning."""
    monkeypatch.setattr(media, "_frame_count", lambda container, stream: 74)
    with caplog.at_level(logging.WARNING, logger="moka_train.data.media"):
        frames = read_video_frames(files["clip"], 10)
    assert frame_numbers(frames) == PICKS_37
    assert "header says 74 frames, 37 decoded" in caplog.text
    monkeypatch.setattr(media, "_frame_count", lambda container, stream: 0)
    with pytest.raises(ValueError, match=r"clip\.mp4: the video stream has no frames"):
        read_video_frames(files["clip"], 10)


# -- images ----------------------------------------------------------------------------------------------------
def test_read_image_from_path_and_bytes(files, tmp_path):
    image = read_image(files["image"])
    assert image.mode == "RGB" and image.size == (50, 40)
    assert np.asarray(image)[0, 0].tolist() == colour(5).tolist()
    assert np.array_equal(np.asarray(read_image(files["image"].read_bytes())), np.asarray(image))
    grey = tmp_path / "grey.png"
    Image.new("L", (4, 3), 77).save(grey)
    assert read_image(grey).mode == "RGB" and np.asarray(read_image(grey))[0, 0].tolist() == [77, 77, 77]


def test_frame_size_squashes_images_keeping_their_sides(tmp_path, encoder):
    """The official visual-text scripts squash each image to 224 x 224 (PIL's ``image.resize``, bicubic by default)
    before CLIP's preprocessing; without it, CLIP's centre crop cuts a wide image's sides off."""
    wide = np.zeros((20, 100, 3), dtype=np.uint8)
    wide[:, :20, 0] = 255  # red left fifth, blue right fifth, black between
    wide[:, 80:, 2] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    ref = MediaRef("visual", path, "image")
    squashed = MediaLoader(frame_size=(24, 24)).load(ref)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(squashed, np.asarray(Image.fromarray(wide).resize((24, 24))))
    assert squashed[:, 0].tolist() == [[255, 0, 0]] * 24 and squashed[:, -1].tolist() == [[0, 0, 255]] * 24

    def side_contrast(loader: MediaLoader) -> float:  # how far the outer pixel columns differ from the middle one
        pixels = loader.load(ref)[0]
        middle = pixels[:, :, pixels.shape[2] // 2]
        return max(float((pixels[:, :, column] - middle).abs().max()) for column in (0, -1))

    assert side_contrast(MediaLoader.from_visual_encoder(encoder)) == 0  # the centre crop kept the black middle only
    assert side_contrast(MediaLoader.from_visual_encoder(encoder, frame_size=(224, 224))) > 1  # normalised units


# -- audio -----------------------------------------------------------------------------------------------------
# Allowed length error in 16 kHz samples: none for PCM and FLAC; one codec frame of the source for lossy codecs
# whose end padding the decoder keeps (mp3: 1152 samples at 44.1 kHz; AAC: 1024 samples at 44.1 kHz).
AUDIO_CASES = [
    ("44k.wav", TONE_44K, 0),
    ("44k.flac", TONE_44K, 0),
    ("44k.mp3", TONE_44K, 1152 * 16000 // 44100 + 1),
    ("16k.wav", TONE_16K, 0),
    ("16k.flac", TONE_16K, 0),
    ("16k.mp3", TONE_16K, 1152),
]


@pytest.mark.parametrize(("key", "tone", "tolerance"), AUDIO_CASES)
def test_audio_resampled_to_16k_mono(files, key, tone, tolerance):
    wave = read_audio(files[key])
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - AUDIO_SECONDS * 16000) <= tolerance
    assert np.abs(wave).max() <= 1.0
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - tone) <= 16000 / len(wave)  # within one FFT bin
    assert 0.45 < np.abs(wave).max() < 0.55  # a 0.5 sine: the stereo downmix does not boost it by sqrt 2


def test_lossless_audio_is_the_signal(files):
    """16 kHz mono PCM / FLAC: no resampling, samples are int16 / 32768 exactly; 44.1 kHz stereo resampled to
    16 kHz is the ideal sine away from the edges (where the resampling filter rings)."""
    expected = np.round(sine(TONE_16K, 16000, AUDIO_SECONDS) * 32768).clip(-32768, 32767).astype(np.int16) / 32768
    for key in ("16k.wav", "16k.flac"):
        np.testing.assert_allclose(read_audio(files[key]), expected, rtol=0, atol=1e-7)
    wave = read_audio(files["44k.wav"])
    ideal = 0.5 * np.sin(2 * np.pi * TONE_44K * np.arange(len(wave)) / 16000)
    assert np.abs(wave - ideal)[200:-200].max() < 1e-3


def test_downmix_is_the_channel_mean(files):
    left = np.round(sine(TONE_16K, 16000, 1.0, 0.8) * 32768).clip(-32768, 32767).astype(np.int16) / 32768
    np.testing.assert_allclose(read_audio(files["left_only"]), left / 2, rtol=0, atol=1e-7)


def test_sound_track_of_a_video(files):
    wave = read_audio(files["clip"])
    expected = CLIP_FRAMES / FPS * 16000
    assert abs(len(wave) - expected) <= 1024 * 16000 / 44100 + 1  # AAC: the last frame's padding stays
    # The AAC priming is dropped (mp4 edit list): the tone starts in phase at sample 0.
    ideal = 0.5 * np.sin(2 * np.pi * VIDEO_TONE * np.arange(len(wave)) / 16000)
    assert np.abs(wave - ideal)[200:22000].max() < 0.05
    assert abs(np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / len(wave) - VIDEO_TONE) <= 16000 / len(wave)


def test_other_sample_rate_and_duration(files):
    assert len(read_audio(files["44k.wav"], sample_rate=8000)) == AUDIO_SECONDS * 8000
    assert audio_duration(files["44k.wav"]) == pytest.approx(AUDIO_SECONDS)
    assert audio_duration(files["44k.flac"], exact=True) == pytest.approx(AUDIO_SECONDS)
    assert audio_duration(files["clip"]) == pytest.approx(CLIP_FRAMES / FPS, abs=1024 / 44100)
    assert audio_duration(files["clip"], exact=True) == pytest.approx(CLIP_FRAMES / FPS, abs=1024 / 44100)


# -- windows ---------------------------------------------------------------------------------------------------
def ramp(num_samples: int) -> np.ndarray:
    """Sample i holds i + 1: a window's values name the samples it took, 0 marks padding."""
    return np.arange(1, num_samples + 1, dtype=np.float32)


def expected_window(start: int, width: int, num_samples: int) -> np.ndarray:
    """Samples [start, start + width) of ``ramp(num_samples)``, zeros outside [0, num_samples)."""
    positions = np.arange(start, start + width)
    return np.where((positions >= 0) & (positions < num_samples), positions + 1, 0).astype(np.float32)


def check_windows(windows: np.ndarray, starts: list[int], width: int, num_samples: int) -> None:
    assert windows.shape == (len(starts), width) and windows.dtype == np.float32
    for window, start in zip(windows, starts, strict=True):
        np.testing.assert_array_equal(window, expected_window(start, width, num_samples))


def test_official_grid_on_a_60_second_clip():
    total = 60 * 16000
    windows = cut_windows(ramp(total), 16000, "music_avqa_official")
    # t = 0, 6, ..., 54 s; window [t - 0.5, t + 1.5) = samples [16000 t - 8000, 16000 t + 24000)
    starts = [-8000, 88000, 184000, 280000, 376000, 472000, 568000, 664000, 760000, 856000]
    check_windows(windows, starts, 32000, total)
    # Only the first window leaves the clip: 8000 zeros, then samples 0..23999.
    assert (windows[0, :8000] == 0).all() and windows[0, 8000] == 1 and windows[0, -1] == 24000
    assert (windows[1:] != 0).all()
    # The duration-spread preset puts its anchors at k * 60 / 10 = the same grid.
    np.testing.assert_array_equal(cut_windows(ramp(total), 16000, "music_avqa"), windows)


def test_official_grid_on_a_short_clip():
    total = 116800  # 7.3 s
    windows = cut_windows(ramp(total), 16000, "music_avqa_official")
    check_windows(windows, [-8000 + 96000 * k for k in range(10)], 32000, total)
    # Window 1 = [5.5 s, 7.5 s): 28800 samples of the clip, then 3200 zeros; windows from t = 12 s on: all zeros.
    assert windows[1, 0] == 88001 and windows[1, 28799] == total and (windows[1, 28800:] == 0).all()
    assert (windows[2:] == 0).all()


def test_spread_windows_on_a_short_clip():
    total = 116800  # 7.3 s: anchors at k * 0.73 s = 11680 k samples
    windows = cut_windows(ramp(total), 16000, "music_avqa")
    check_windows(windows, [11680 * k - 8000 for k in range(10)], 32000, total)
    # The last window [6.07 s, 8.07 s) leaves the clip after 19680 samples.
    assert windows[9, 19679] == total and (windows[9, 19680:] == 0).all()
    # A duration that is no whole number of samples per anchor: floor(k * 123457 / 10).
    total = 123457
    windows = cut_windows(ramp(total), 16000, "music_avqa")
    starts = [0, 12345, 24691, 37037, 49382, 61728, 74074, 86419, 98765, 111111]
    check_windows(windows, [s - 8000 for s in starts], 32000, total)


def test_ave_windows():
    total = 160000  # 10 s: window k = [k, k + 1) s exactly, no padding
    windows = cut_windows(ramp(total), 16000, "ave")
    np.testing.assert_array_equal(windows, ramp(total).reshape(10, 16000))
    total = 116800  # 7.3 s: windows start at 0.73 k s and last 1 s; the last leaves the clip after 11680 samples
    windows = cut_windows(ramp(total), 16000, "ave")
    check_windows(windows, [11680 * k for k in range(10)], 16000, total)
    assert (windows[9, 11680:] == 0).all() and windows[9, 11679] == total


def official_avqa_windows(audio: np.ndarray) -> np.ndarray:
    """The official MUSIC-AVQA loop, restated: "seconds" of int(len / 60) samples, t = 0, 6, ..., 54."""
    per_second = int(len(audio) / 60)
    segments = []
    for t in range(0, 60, 6):
        segment = audio[int(max(0, t - 0.5) * per_second) : int(per_second * min(60, t + 1.5))]
        if t - 0.5 < 0:
            segment = np.concatenate([np.zeros(2 * per_second - len(segment), dtype=audio.dtype), segment])
        segments.append(segment)
    return np.stack(segments)


def official_ave_windows(audio: np.ndarray) -> np.ndarray:
    """The official AVE loop, restated: ten windows of int(len / 10) samples, zero-padded at the end."""
    per_second = int(len(audio) / 10)
    segments = [audio[k * per_second : (k + 1) * per_second] for k in range(10)]
    return np.stack([np.pad(s, (0, per_second - len(s))) for s in segments])


def test_presets_equal_the_official_code_on_the_clips_it_assumes():
    wave = ramp(60 * 16000)
    np.testing.assert_array_equal(cut_windows(wave, 16000, "music_avqa_official"), official_avqa_windows(wave))
    np.testing.assert_array_equal(cut_windows(wave, 16000, "music_avqa"), official_avqa_windows(wave))
    wave = ramp(10 * 16000)
    np.testing.assert_array_equal(cut_windows(wave, 16000, "ave"), official_ave_windows(wave))
    # Off those durations the official windows change length with the clip (59.98 s: 31988 samples), which is
    # why the presets keep windows of fixed seconds instead.
    assert official_avqa_windows(ramp(959680)).shape == (10, 31988)
    assert cut_windows(ramp(959680), 16000, "music_avqa_official").shape == (10, 32000)


def test_whole_clip_and_other_rates():
    wave = ramp(12345)
    np.testing.assert_array_equal(cut_windows(wave, 16000, "whole"), wave[None])
    # 44.1 kHz: 88200-sample windows, offset -22050 samples.
    total = 60 * 44100
    windows = cut_windows(ramp(total), 44100, "music_avqa_official")
    check_windows(windows, [264600 * k - 22050 for k in range(10)], 88200, total)
    # 11025 Hz: the offset -0.5 s is -5512.5 samples, rounded half up to -5512.
    total = 60 * 11025
    windows = cut_windows(ramp(total), 11025, "music_avqa_official")
    check_windows(windows, [66150 * k - 5512 for k in range(10)], 22050, total)


def test_windows_keep_dtype_and_take_tensors():
    wave = torch.arange(1, 160001, dtype=torch.float64)
    windows = cut_windows(wave, 16000, "ave")
    assert windows.dtype == np.float64
    np.testing.assert_array_equal(windows, wave.numpy().reshape(10, 16000))


def test_custom_windows_and_config_blocks():
    windows = AudioWindows(length=0.5, anchors=[1, 2])  # a list, as a config gives it
    assert windows.count == 2 and windows.anchors == (1.0, 2.0)
    check_windows(cut_windows(ramp(48000), 16000, windows), [16000, 32000], 8000, 48000)
    block = OmegaConf.create({"count": 4, "length": 0.25, "offset": -0.125})
    resolved = resolve_audio_windows(block)
    assert resolved == AudioWindows(count=4, length=0.25, offset=-0.125)
    check_windows(cut_windows(ramp(32000), 16000, block), [-2000, 6000, 14000, 22000], 4000, 32000)
    anchored = resolve_audio_windows(OmegaConf.create({"length": 2.0, "anchors": [0, 6]}))
    assert anchored.anchors == (0.0, 6.0) and hash(anchored)
    assert resolve_audio_windows("ave") is WINDOW_PRESETS["ave"]
    assert set(WINDOW_PRESETS) >= {"music_avqa", "music_avqa_official", "ave", "whole"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 10, "length": 0.0}, "length must be positive"),
        ({"count": 0, "length": 1.0}, "count >= 1"),
        ({"length": 1.0}, "count >= 1"),
        ({"count": 3, "length": 1.0, "anchors": (0.0, 1.0)}, "do not give count=3"),
        ({"count": 10}, "whole clip"),
        ({"offset": 0.5}, "whole clip"),
    ],
)
def test_bad_windows(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AudioWindows(**kwargs)


def test_bad_window_inputs():
    with pytest.raises(ValueError, match="unknown audio window preset 'avqa'.*music_avqa"):
        resolve_audio_windows("avqa")
    with pytest.raises(TypeError, match="preset name"):
        resolve_audio_windows(10)
    with pytest.raises(ValueError, match="non-empty mono waveform"):
        cut_windows(np.zeros(0, dtype=np.float32), 16000, "ave")
    with pytest.raises(ValueError, match="non-empty mono waveform"):
        cut_windows(np.zeros((2, 100), dtype=np.float32), 16000, "ave")
    with pytest.raises(ValueError, match="sample_rate"):
        cut_windows(ramp(10), 0, "ave")


# -- the loader ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    from moka_train.models.encoders.clip import build_clip_encoder

    return build_clip_encoder("moka-tiny-vit")


def test_loader_with_a_tiny_clip_encoder(files, encoder):
    loader = MediaLoader.from_visual_encoder(encoder, frames=10, audio_windows="music_avqa")
    video = loader.load(MediaRef("visual", files["clip"], "video"))
    assert video.shape == (10, 3, 32, 32) and video.dtype == torch.float32
    torch.testing.assert_close(video, encoder.preprocess_frames(read_video_frames(files["clip"], 10)), rtol=0, atol=0)
    image = loader.load(MediaRef("visual", files["image"], "image"))
    assert image.shape == (1, 3, 32, 32)
    torch.testing.assert_close(image, encoder.preprocess(read_image(files["image"])), rtol=0, atol=0)
    embedded = loader.load(MediaRef("visual", "mmbench/0.png", "image", data=files["image"].read_bytes()))
    torch.testing.assert_close(embedded, image, rtol=0, atol=0)
    audio = loader.load(MediaRef("audio", files["44k.mp3"], "audio"))
    assert audio.shape == (10, 32000) and audio.dtype == torch.float32
    expected = cut_windows(read_audio(files["44k.mp3"]), 16000, "music_avqa")
    torch.testing.assert_close(audio, torch.from_numpy(expected), rtol=0, atol=0)
    # The encoder's own methods as transforms give the same pixels.
    bound = MediaLoader(image_transform=encoder.preprocess, frames_transform=encoder.preprocess_frames)
    torch.testing.assert_close(bound.load(MediaRef("visual", files["clip"], "video")), video, rtol=0, atol=0)


def test_loader_pickles_without_the_encoder(files, encoder):
    loader = MediaLoader.from_visual_encoder(encoder, frames=4, audio_windows="ave")
    payload = pickle.dumps(loader)
    assert len(payload) < 20_000 < len(pickle.dumps(encoder.preprocess))  # the tower stays out
    copy = pickle.loads(payload)
    assert copy.windows == WINDOW_PRESETS["ave"] and isinstance(copy.image_transform, PerImage)
    ref = MediaRef("visual", files["clip"], "video")
    torch.testing.assert_close(copy.load(ref), loader.load(ref), rtol=0, atol=0)


def test_loader_raw_pixels_and_whole_audio(files):
    loader = MediaLoader(frames=10, frame_size=(32, 32))
    video = loader.load(MediaRef("visual", files["clip"], "video"))
    assert video.shape == (10, 3, 32, 32) and video.dtype == torch.uint8
    assert frame_numbers(video.permute(0, 2, 3, 1).numpy()) == PICKS_37
    image = loader.load(MediaRef("visual", files["image"], "image"))  # a 40 x 50 image, squashed as the frames
    assert image.shape == (1, 3, 32, 32) and image[0, :, 0, 0].tolist() == colour(5).tolist()
    assert MediaLoader().load(MediaRef("visual", files["image"], "image")).shape == (1, 3, 40, 50)
    speech = loader.load(MediaRef("speech", files["16k.wav"], "audio"))
    assert speech.shape == (1, AUDIO_SECONDS * 16000) and speech.dtype == torch.float32


# -- errors ----------------------------------------------------------------------------------------------------
def test_missing_files(tmp_path):
    missing = tmp_path / "nope.mp4"
    for read in (read_video_frames, read_audio, read_image, audio_duration):
        with pytest.raises(FileNotFoundError, match="nope.mp4"):
            read(missing)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        MediaLoader().load(MediaRef("visual", missing, "video"))


@pytest.mark.parametrize("key", ["truncated", "truncated_faststart", "garbage"])
def test_corrupt_videos(files, key):
    with pytest.raises(ValueError, match=files[key].name):
        read_video_frames(files[key])
    with pytest.raises(ValueError, match=files[key].name):
        MediaLoader(audio_windows="music_avqa").load(MediaRef("audio", files[key], "audio"))


def test_missing_streams(files):
    with pytest.raises(ValueError, match=r"short\.mp4 has no audio stream"):
        MediaLoader(audio_windows="ave").load(MediaRef("audio", files["short"], "audio"))
    with pytest.raises(ValueError, match=r"tone16k\.wav has no video stream"):
        read_video_frames(files["16k.wav"])
    with pytest.raises(ValueError, match="mmbench/1.png could not be read as an image"):
        MediaLoader().load(MediaRef("visual", "mmbench/1.png", "image", data=b"\x89PNG broken"))
    with pytest.raises(ValueError, match=r"garbage\.mp4 could not be read as an image"):
        read_image(files["garbage"])


def test_bad_loader_settings(files):
    with pytest.raises(ValueError, match="frames must be at least 1"):
        MediaLoader(frames=0)
    with pytest.raises(ValueError, match="unknown audio window preset"):
        MediaLoader(audio_windows="music-avqa")
    with pytest.raises(ValueError, match="num_frames must be at least 1"):
        read_video_frames(files["clip"], 0)
    with pytest.raises(ValueError, match="sample_rate must be positive"):
        read_audio(files["16k.wav"], sample_rate=0)
    # A transform that returns the wrong layout is caught with the file's name.
    loader = MediaLoader(frames_transform=lambda frames: torch.zeros(len(frames), 32, 32, 3))
    with pytest.raises(ValueError, match=r"clip\.mp4: the transform gave \(10, 32, 32, 3\), expected \[10, 3, H, W\]"):
        loader.load(MediaRef("visual", files["clip"], "video"))
