"""Kaldi log mel filterbank features in plain torch, and the BEATs preprocessing built on them.

BEATs (microsoft/unilm ``beats/BEATs.py``) turns each waveform into features with
``torchaudio.compliance.kaldi.fbank(waveform * 2**15, num_mel_bins=128, sample_frequency=16000,
frame_length=25, frame_shift=10)`` and normalises them as ``(fbank - 15.41663) / (2 * 6.55582)``.
torchaudio cannot be installed beside our torch, so this module recomputes the same thing, batched
over ``[B, T]`` (frames by ``unfold``, one ``rfft`` for the whole batch).

Every other setting is torchaudio's default for ``fbank``, reproduced here:

- ``dither = 0.0``: no random noise, so the features are deterministic. (Kaldi's own
  ``compute-fbank-feats`` dithers by default with 1.0; torchaudio does not.)
- ``snip_edges = True``: only frames that lie wholly inside the waveform, so a waveform of ``N``
  samples gives ``1 + (N - window_size) // window_shift`` frames, and one shorter than a frame is an
  error here (torchaudio asserts as well).
- each frame: ``remove_dc_offset`` (subtract the frame's mean), then pre-emphasis with coefficient
  0.97 (``x[j] -= 0.97 * x[j - 1]``, with ``x[-1]`` taken as ``x[0]``, so the first sample becomes
  ``0.03 * x[0]``), then the 'povey' window ``hann(N, periodic=False) ** 0.85``;
- ``round_to_power_of_two = True``: the 400-sample frame is zero-padded to 512 samples for the FFT;
- ``use_power = True``: power spectrum ``|rfft|**2``, 257 bins for 512 samples;
- Kaldi mel banks, ``low_freq = 20`` Hz, ``high_freq = 0`` (meaning the Nyquist frequency), no VTLN:
  mel(f) = 1127 ln(1 + f / 700); ``num_mel_bins`` triangles equally spaced in mel between the two
  edges (``num_mel_bins + 2`` edge points), each evaluated at the mel value of the FFT bin centres
  ``k * sample_frequency / padded_size`` for ``k < padded_size // 2``; the last (Nyquist) FFT bin
  gets weight zero;
- ``use_log_fbank = True``: ``log(max(energy, eps))`` with ``eps`` the float32 machine epsilon
  (``2**-23``), so a mel bin with no energy reads ``log(2**-23) = -15.9424``. With 128 bins and a
  512-point FFT the lowest triangles are narrower than the 31.25 Hz FFT bin spacing, and triangle 3
  (about 94 to 125 Hz) holds no FFT bin at all: that bin is exactly ``log(eps)`` on every input,
  -2.3917 after BEATs' normalisation (Kaldi's C++ MelBanks rejects a bank with an empty bin, which
  is presumably why kaldi-native-fbank refuses this configuration; torchaudio does not check);
- ``use_energy = False`` (no energy column, so ``energy_floor`` and ``raw_energy`` play no part),
  ``subtract_mean = False``.

The computation is in float32 (the dtype the reference ran in; other real dtypes are converted),
on the input's device. The window and the mel banks are built once in float64 and cast.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "BEATS_FBANK_MEAN",
    "BEATS_FBANK_STD",
    "BEATS_NUM_MEL_BINS",
    "BEATS_SAMPLE_RATE",
    "beats_fbank",
    "kaldi_fbank",
    "kaldi_frame_geometry",
    "kaldi_mel_banks",
    "kaldi_num_frames",
    "mel_scale",
]

# BEATs' normalisation of the fbank (the defaults of ``BEATs.preprocess``): (x - mean) / (2 * std).
BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582
BEATS_SAMPLE_RATE = 16000
BEATS_NUM_MEL_BINS = 128
# BEATs feeds Kaldi 16-bit PCM magnitudes: a float waveform in [-1, 1] times 2**15.
BEATS_WAVEFORM_SCALE = 2.0**15

# torchaudio.compliance.kaldi.fbank defaults that BEATs leaves alone.
PREEMPHASIS_COEFFICIENT = 0.97
POVEY_WINDOW_EXPONENT = 0.85
LOW_FREQ_HZ = 20.0
HIGH_FREQ_HZ = 0.0  # <= 0 means an offset from the Nyquist frequency, so 0 is Nyquist itself.
# Floor before the log: std::numeric_limits<float>::epsilon(), whatever the computation dtype.
LOG_FLOOR = torch.finfo(torch.float32).eps


def mel_scale(freq_hz: Tensor | float) -> Tensor | float:
    """Kaldi's (HTK's) mel scale, 1127 ln(1 + f / 700), for a tensor or a Python float."""
    if isinstance(freq_hz, Tensor):
        return 1127.0 * torch.log1p(freq_hz / 700.0)
    return 1127.0 * math.log1p(freq_hz / 700.0)


def kaldi_frame_geometry(
    sample_frequency: float = 16000.0, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0
) -> tuple[int, int, int]:
    """``(window_size, window_shift, padded_window_size)`` in samples, as torchaudio's Kaldi computes them.

    Sizes truncate ``sample_frequency * ms * 0.001`` to an int (the same expression as torchaudio, so
    e.g. 16 kHz, 25 ms gives 400 and 10 ms gives 160); the FFT size is the window size rounded up to
    a power of two (400 -> 512).
    """
    if not sample_frequency > 0:
        raise ValueError(f"sample_frequency must be positive, got {sample_frequency}")
    window_size = int(sample_frequency * frame_length_ms * 0.001)
    window_shift = int(sample_frequency * frame_shift_ms * 0.001)
    if window_size < 2:
        raise ValueError(
            f"a frame of {frame_length_ms} ms at {sample_frequency} Hz is {window_size} samples; at least 2 are needed"
        )
    if window_shift < 1:
        raise ValueError(
            f"a frame shift of {frame_shift_ms} ms at {sample_frequency} Hz is {window_shift} samples; "
            "at least 1 is needed"
        )
    padded_window_size = 1 << (window_size - 1).bit_length()
    return window_size, window_shift, padded_window_size


def kaldi_num_frames(
    num_samples: int,
    sample_frequency: float = 16000.0,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> int:
    """Frames Kaldi makes of ``num_samples`` samples with ``snip_edges``: ``1 + (N - size) // shift``.

    0 when the waveform is shorter than one frame (``kaldi_fbank`` raises on such input).
    """
    window_size, window_shift, _ = kaldi_frame_geometry(sample_frequency, frame_length_ms, frame_shift_ms)
    if num_samples < window_size:
        return 0
    return 1 + (num_samples - window_size) // window_shift


@lru_cache(maxsize=16)
def _povey_window(window_size: int) -> Tensor:
    """Kaldi's 'povey' window: a symmetric Hann window raised to 0.85 (zero at both ends), float64 CPU."""
    n = torch.arange(window_size, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2.0 * math.pi * n / (window_size - 1))
    return hann.pow(POVEY_WINDOW_EXPONENT)


@lru_cache(maxsize=16)
def _mel_banks_float64(
    num_mel_bins: int, padded_window_size: int, sample_frequency: float, low_freq: float, high_freq: float
) -> Tensor:
    nyquist = 0.5 * sample_frequency
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(
            f"bad mel frequency range: low_freq {low_freq} Hz, high_freq {high_freq} Hz, Nyquist {nyquist} Hz"
        )
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high_freq)
    mel_step = (mel_high - mel_low) / (num_mel_bins + 1)
    # Triangle i rises from edge i to a peak at edge i + 1 and falls to zero at edge i + 2.
    edges = mel_low + mel_step * torch.arange(num_mel_bins + 2, dtype=torch.float64)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    # Mel value of each FFT bin's frequency; the Nyquist bin (index padded // 2) is left out here.
    num_fft_bins = padded_window_size // 2
    fft_bin_width = sample_frequency / padded_window_size
    fft_mel = mel_scale(fft_bin_width * torch.arange(num_fft_bins, dtype=torch.float64))[None, :]
    rising = (fft_mel - left) / (centre - left)
    falling = (right - fft_mel) / (right - centre)
    banks = torch.minimum(rising, falling).clamp_min(0.0)
    # Zero weight for the Nyquist bin, so the banks line up with the rfft's padded // 2 + 1 bins.
    return torch.nn.functional.pad(banks, (0, 1))


def kaldi_mel_banks(
    num_mel_bins: int,
    padded_window_size: int,
    sample_frequency: float,
    low_freq: float = LOW_FREQ_HZ,
    high_freq: float = HIGH_FREQ_HZ,
) -> Tensor:
    """Kaldi's triangular mel filterbank, ``[num_mel_bins, padded_window_size // 2 + 1]`` float64 (a copy).

    Triangles are linear in mel (not in Hz), ``num_mel_bins`` of them between ``low_freq`` and
    ``high_freq`` (``<= 0``: offset from Nyquist), each weighting the power spectrum bins; the last
    column (the Nyquist bin) is zero, as in Kaldi. No VTLN warping.
    """
    if num_mel_bins <= 3:
        raise ValueError(f"Kaldi needs more than 3 mel bins, got {num_mel_bins}")
    if padded_window_size < 2 or padded_window_size % 2:
        raise ValueError(f"the FFT size must be even and at least 2, got {padded_window_size}")
    return _mel_banks_float64(
        int(num_mel_bins), int(padded_window_size), float(sample_frequency), float(low_freq), float(high_freq)
    ).clone()


def kaldi_fbank(
    waveform: Tensor,
    num_mel_bins: int = 128,
    sample_frequency: float = 16000.0,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> Tensor:
    """Kaldi log mel filterbank energies of ``waveform`` ``[T]`` or ``[B, T]`` (no rescaling is applied).

    Equals ``torchaudio.compliance.kaldi.fbank(w[None], num_mel_bins=..., sample_frequency=...,
    frame_length=frame_length_ms, frame_shift=frame_shift_ms)`` for each waveform ``w`` with every
    other option at torchaudio's default (see the module docstring). Returns ``[frames, num_mel_bins]``
    or ``[B, frames, num_mel_bins]`` in float32 on the waveform's device, with
    ``frames = 1 + (T - window_size) // window_shift``.
    """
    if not isinstance(waveform, Tensor):
        raise TypeError(f"waveform must be a torch.Tensor, got {type(waveform).__name__}")
    if waveform.ndim not in (1, 2):
        raise ValueError(f"waveform must be [T] or [B, T], got {waveform.ndim} dims {tuple(waveform.shape)}")
    if waveform.is_complex() or waveform.dtype == torch.bool:
        raise ValueError(f"waveform must be real-valued, got dtype {waveform.dtype}")
    window_size, window_shift, padded_window_size = kaldi_frame_geometry(
        sample_frequency, frame_length_ms, frame_shift_ms
    )
    num_samples = waveform.shape[-1]
    if num_samples < window_size:
        raise ValueError(
            f"waveform has {num_samples} samples, shorter than one frame of {window_size} samples "
            f"({frame_length_ms} ms at {sample_frequency} Hz)"
        )
    banks = kaldi_mel_banks(num_mel_bins, padded_window_size, sample_frequency)

    device, dtype = waveform.device, torch.float32
    x = waveform.to(dtype)
    frames = x.unfold(-1, window_size, window_shift)  # [..., frames, window_size], a view
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove_dc_offset
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = frames - PREEMPHASIS_COEFFICIENT * previous
    frames = frames * _povey_window(window_size).to(device=device, dtype=dtype)
    # rfft with n > window_size zero-pads each frame on the right: round_to_power_of_two.
    power = torch.fft.rfft(frames, n=padded_window_size, dim=-1).abs().pow(2)  # [..., frames, padded // 2 + 1]
    energies = torch.matmul(power, banks.to(device=device, dtype=dtype).T)  # [..., frames, num_mel_bins]
    return energies.clamp_min(LOG_FLOOR).log()


def beats_fbank(waveforms: Tensor) -> Tensor:
    """BEATs' ``preprocess``: normalised Kaldi fbank of 16 kHz waveforms ``[B, T]`` -> ``[B, frames, 128]``.

    ``(kaldi_fbank(waveforms * 2**15) - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)`` with 128 mel
    bins, 25 ms frames and a 10 ms shift; the waveforms are floats in about [-1, 1].
    """
    if not isinstance(waveforms, Tensor):
        raise TypeError(f"waveforms must be a torch.Tensor, got {type(waveforms).__name__}")
    if waveforms.ndim != 2:
        raise ValueError(f"waveforms must be [B, T], got {waveforms.ndim} dims {tuple(waveforms.shape)}")
    fbank = kaldi_fbank(
        waveforms * BEATS_WAVEFORM_SCALE,
        num_mel_bins=BEATS_NUM_MEL_BINS,
        sample_frequency=float(BEATS_SAMPLE_RATE),
        frame_length_ms=25.0,
        frame_shift_ms=10.0,
    )
    return (fbank - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)
