"""The plain-torch Kaldi fbank and BEATs preprocessing (moka_train.models.encoders.fbank).

Checked against the official BEATs preprocess outputs (torchaudio's kaldi.fbank, in ../shared), and
independently of them: a naive float64 Kaldi written frame by frame with an explicit DFT, the frame
count of snip_edges, where a pure tone lands in the mel banks, and silence giving log(eps).
"""

from __future__ import annotations

import math

import pytest
import torch

from moka_train.models.encoders.fbank import (
    BEATS_FBANK_MEAN,
    BEATS_FBANK_STD,
    beats_fbank,
    kaldi_fbank,
    kaldi_frame_geometry,
    kaldi_num_frames,
)
from tests.reference_files import shared_file

LOG_EPS = math.log(2.0**-23)  # float32 machine epsilon, Kaldi's floor before the log


def _mel(freq_hz: float) -> float:
    return 1127.0 * math.log(1.0 + freq_hz / 700.0)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return torch.load(shared_file("reference", "beats", "beats_tiny_a_io.pt"), weights_only=True)


@pytest.mark.parametrize("name", ["wave_1s", "wave_2s"])
def test_reproduces_the_official_beats_fbank(reference, name):
    wave, expected = reference[name], reference[f"{name}_fbank"]
    got = beats_fbank(wave[None])[0]
    assert got.dtype == torch.float32
    assert got.shape == expected.shape == (kaldi_num_frames(wave.numel()), 128)
    # Measured: 9.6e-6 (1 s) and 4.1e-5 (2 s), both in the lowest mel bins, where a frame's
    # energy comes from one or two FFT bins next to DC after DC removal and pre-emphasis; the
    # reference itself is 3.8e-5 from a float64 computation there, so this is its float32 noise.
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_batch_equals_each_waveform(reference):
    waves = torch.stack([reference["wave_2s"][:16000], reference["wave_1s"] * 0.3 + 0.01])
    batched = beats_fbank(waves)
    assert batched.shape == (2, kaldi_num_frames(16000), 128)
    for row, wave in zip(batched, waves, strict=True):
        torch.testing.assert_close(row, beats_fbank(wave[None])[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(row, (kaldi_fbank(wave * 2**15) - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD))


def test_float64_input_is_computed_in_float32():
    wave = torch.randn(2, 4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.1
    got = beats_fbank(wave)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, beats_fbank(wave.float()), atol=1e-5, rtol=0)


def test_frame_geometry_and_count_by_hand():
    assert kaldi_frame_geometry(16000.0, 25.0, 10.0) == (400, 160, 512)
    assert kaldi_frame_geometry(8000.0, 25.0, 10.0) == (200, 80, 256)
    # snip_edges: 1 + (N - 400) // 160 whole frames, the tail that does not fill a frame is dropped.
    for num_samples, frames in [(400, 1), (559, 1), (560, 2), (1000, 4), (16000, 98), (32000, 198)]:
        assert kaldi_num_frames(num_samples) == frames
        assert kaldi_fbank(torch.zeros(num_samples)).shape == (frames, 128)
    assert kaldi_num_frames(399) == 0
    assert kaldi_fbank(torch.zeros(3, 1000), num_mel_bins=40).shape == (3, 4, 40)


def test_silence_and_a_constant_give_log_eps_everywhere():
    # A constant is all DC, which remove_dc_offset takes out of every frame.
    for wave in (torch.zeros(2, 1600), torch.full((2, 1600), 1234.0)):
        got = kaldi_fbank(wave)
        torch.testing.assert_close(got, torch.full_like(got, LOG_EPS), atol=0, rtol=0)


def test_mel_bank_holding_no_fft_bin_reads_log_eps():
    # With 128 bins and 31.25 Hz FFT bins, triangle 3 (about 94 to 125 Hz after the 20 Hz edge)
    # contains no FFT bin centre, so it has no weight at all: log(eps) on any input.
    delta = (_mel(8000.0) - _mel(20.0)) / 129
    fft_mels = [_mel(k * 31.25) for k in range(256)]
    empty = [
        m for m in range(128) if not any(_mel(20.0) + m * delta < x < _mel(20.0) + (m + 2) * delta for x in fft_mels)
    ]
    assert empty == [3]
    noise = torch.randn(8000, generator=torch.Generator().manual_seed(1)) * 3000
    got = kaldi_fbank(noise)
    assert torch.all(got[:, 3] == LOG_EPS)
    assert torch.all(got[:, [0, 1, 2, 4, 5]] > LOG_EPS + 10)


@pytest.mark.parametrize("fft_bin", [43, 72, 122, 182, 245])
def test_a_pure_tone_peaks_in_the_mel_bin_the_kaldi_formula_gives(fft_bin):
    """A sine on FFT bin k peaks in the triangle with the largest weight at mel(k * 31.25 Hz).

    The triangles come from the formula directly here: 130 edges equally spaced in mel = 1127 ln(1 +
    f / 700) between 20 Hz and 8 kHz, triangle m rising from edge m to edge m + 1 and falling to m + 2.
    The FFT bins are ones where a single triangle has weight above 0.85 (from about 1.3 to 7.7 kHz).
    """
    freq = fft_bin * 16000 / 512
    low, delta = _mel(20.0), (_mel(8000.0) - _mel(20.0)) / 129
    x = _mel(freq)
    weights = [max(0.0, min((x - low - m * delta) / delta, (low + (m + 2) * delta - x) / delta)) for m in range(128)]
    expected = max(range(128), key=weights.__getitem__)
    assert weights[expected] > 0.85  # the tone sits well inside one triangle, so leakage cannot move the peak
    t = torch.arange(8000, dtype=torch.float64) / 16000
    wave = (10000 * torch.sin(2 * math.pi * freq * t + 0.3)).float()
    got = kaldi_fbank(wave)
    assert torch.all(got.argmax(dim=-1) == expected)


def _naive_kaldi_fbank(wave: torch.Tensor, num_mel_bins: int) -> torch.Tensor:
    """Kaldi's compute-fbank-feats steps (dither 0, no energy) one frame at a time, float64, explicit DFT."""
    wave = wave.double()
    size, shift, fft_size, sample_rate = 400, 160, 512, 16000.0
    n = torch.arange(size, dtype=torch.float64)
    window = (0.5 - 0.5 * torch.cos(2 * math.pi * n / (size - 1))) ** 0.85
    k = torch.arange(fft_size // 2 + 1, dtype=torch.float64)
    phase = 2 * math.pi * torch.outer(k, torch.arange(fft_size, dtype=torch.float64)) / fft_size
    low, high = _mel(20.0), _mel(sample_rate / 2)
    delta = (high - low) / (num_mel_bins + 1)
    banks = torch.zeros(num_mel_bins, fft_size // 2 + 1, dtype=torch.float64)
    for m in range(num_mel_bins):
        left, centre, right = low + m * delta, low + (m + 1) * delta, low + (m + 2) * delta
        for b in range(fft_size // 2):  # the Nyquist bin keeps weight 0
            x = _mel(b * sample_rate / fft_size)
            if left < x <= centre:
                banks[m, b] = (x - left) / (centre - left)
            elif centre < x < right:
                banks[m, b] = (right - x) / (right - centre)
    rows = []
    for start in range(0, wave.numel() - size + 1, shift):
        frame = wave[start : start + size].clone()
        frame -= frame.mean()
        for j in range(size - 1, 0, -1):
            frame[j] -= 0.97 * frame[j - 1]
        frame[0] -= 0.97 * frame[0]
        padded = torch.cat([frame * window, torch.zeros(fft_size - size, dtype=torch.float64)])
        power = (phase.cos() @ padded) ** 2 + (phase.sin() @ padded) ** 2
        rows.append(torch.log(torch.clamp(banks @ power, min=2.0**-23)))
    return torch.stack(rows)


def test_matches_a_naive_float64_kaldi():
    gen = torch.Generator().manual_seed(2)
    t = torch.arange(1200) / 16000
    wave = 3000 * torch.randn(1200, generator=gen) + 8000 * torch.sin(2 * math.pi * 440 * t) + 500
    expected = _naive_kaldi_fbank(wave, num_mel_bins=40).float()
    torch.testing.assert_close(kaldi_fbank(wave, num_mel_bins=40), expected, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_input_device():
    wave = torch.randn(2, 8000, generator=torch.Generator().manual_seed(3)) * 0.2
    got = beats_fbank(wave.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), beats_fbank(wave), atol=1e-4, rtol=0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="399 samples, shorter than one frame of 400 samples"):
        kaldi_fbank(torch.zeros(399))
    with pytest.raises(ValueError, match="399 samples, shorter than one frame of 400 samples"):
        beats_fbank(torch.zeros(2, 399))
    with pytest.raises(ValueError, match=r"\[T\] or \[B, T\], got 3 dims \(1, 2, 16000\)"):
        kaldi_fbank(torch.zeros(1, 2, 16000))
    with pytest.raises(ValueError, match=r"\[B, T\], got 1 dims \(16000,\)"):
        beats_fbank(torch.zeros(16000))
    with pytest.raises(ValueError, match="real-valued"):
        kaldi_fbank(torch.zeros(1000, dtype=torch.complex64))
    with pytest.raises(ValueError, match="more than 3 mel bins, got 3"):
        kaldi_fbank(torch.zeros(1000), num_mel_bins=3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        beats_fbank([[0.0] * 1000])
