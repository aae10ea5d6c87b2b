"""Reading media for the data pipeline: video frames, images, audio, and cutting audio into windows.

Everything is decoded with PyAV (FFmpeg), so one library reads every container the benchmarks ship (mp4, mkv,
webm, wav, flac, mp3, m4a), from a path or from bytes (benchmarks that embed their media). ``MediaLoader``
turns a ``MediaRef`` into the tensor a ``Sample`` carries: pixels ``[S, 3, H, W]`` for a video or an image,
audio windows ``[S, T]``.

How this follows, and where it leaves, the official MokA data code (``AudioVisualText/dataset/unified_dataset.py``):

* **Frames.** The official code reads with decord and takes ``np.arange(0, vlen, vlen / n).astype(int)`` over
  the video's frame count; ``sample_frame_indices`` computes the same indices in integer arithmetic
  (``k * vlen // n``: identical to numpy's float ``arange`` for every vlen up to 20,000 and n in 8, 10, 16, 32,
  and safe from float rounding giving n + 1 indices). The official code asks decord for 224x224 frames,
  squashing the aspect ratio, and its visual-text scripts squash images the same way (PIL's
  ``image.resize((224, 224))``); ``MediaLoader.frame_size`` does both (the presets of the paper's datasets set
  ``[224, 224]``). Without it, frames and images keep their size, and the visual encoder's preprocessing
  (resize the short side, centre crop) cuts a wide picture's sides off.
  A video with fewer than n frames: the official code takes each frame once (fewer than n segments); here the
  indices repeat (``k * vlen // n`` again), so every video gives exactly n frames and batches stay rectangular.
* **Audio.** The official code loads with librosa at 16 kHz mono (channel mean, soxr resampling). Here PyAV's
  ``AudioResampler`` (libswresample; this FFmpeg build has no soxr) converts to float32 mono at the target rate,
  with the downmix matrix scaled to unit gain: stereo becomes the channel mean, as in librosa (FFmpeg's default
  mono downmix is ``(L + R) / sqrt 2``, which leaves [-1, 1]); other layouts get FFmpeg's matrix at unit gain.
* **Windows.** MUSIC-AVQA: ten 2 s windows ``[t - 0.5, t + 1.5]``, t = 0, 6, ..., 54, zero-padded at the ends;
  the official code measures its "seconds" as ``int(len(audio) / 60)`` samples, so it is exact for 60 s clips and
  stretches or shrinks windows (different lengths per clip) for others. ``music_avqa_official`` keeps that grid
  in real seconds (fixed 2 s windows); ``music_avqa`` spreads the anchors over the clip's real duration D
  (``t_k = k * D / 10``), which is the same grid for a 60 s clip. AVE: ten 1 s windows (official: ``len / 10``
  samples each); ``ave`` starts window k at ``k * D / 10`` and makes it 1 s long, i.e. ``[k, k + 1]`` for the
  10 s clips. Speech: ``whole``, the clip as one segment.

Errors name the file: a missing file raises FileNotFoundError; an unreadable or corrupt file (a truncated mp4
included, whether its index or its media data is cut), a missing video or audio stream, or a stream with nothing
in it raises ValueError. Nothing is skipped here: a dataset that wants to drop unreadable files decides so itself.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import av
import numpy as np
import torch
from av.container import InputContainer
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from moka_train.data.records import MediaRef

__all__ = [
    "WINDOW_PRESETS",
    "AudioWindows",
    "MediaLoader",
    "PerImage",
    "audio_duration",
    "cut_windows",
    "read_audio",
    "read_image",
    "read_video_frames",
    "resolve_audio_windows",
    "sample_frame_indices",
]

logger = logging.getLogger(__name__)

MediaSource = str | os.PathLike | bytes

# libswresample option: scale the downmix matrix so that no output can exceed the inputs' peak. For stereo to
# mono that is (L + R) / 2, librosa's channel mean, instead of FFmpeg's default (L + R) / sqrt 2 for float output.
_DOWNMIX_OPTIONS = {"rematrix_maxval": "1.0"}


# ---------------------------------------------------------------------------------------------------------------
# Opening files
# ---------------------------------------------------------------------------------------------------------------
def _name(source: MediaSource, name: str | None = None) -> str:
    """How errors call a source: the given name, the path, or the size of in-memory bytes."""
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of media>"
    return os.fspath(source)


@contextmanager
def _opened(source: MediaSource, name: str) -> Iterator[InputContainer]:
    """An input container for a path or bytes; FFmpeg errors (while opening or decoding) become ValueError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        target: Any = io.BytesIO(bytes(source))
    else:
        target = os.fspath(source)
        if not os.path.isfile(target):
            raise FileNotFoundError(f"media file {target} does not exist")
    try:
        container = av.open(target, mode="r")
    except av.error.FFmpegError as error:
        raise ValueError(f"{name} could not be opened as a media file: {error}") from error
    try:
        yield container
    except av.error.FFmpegError as error:
        raise ValueError(f"{name} could not be decoded (corrupt or truncated?): {error}") from error
    finally:
        container.close()


def _video_stream(container: InputContainer, name: str) -> av.video.stream.VideoStream:
    # An mp3's cover art is a one-frame "video" stream marked attached_pic: it is not the clip's video.
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        raise ValueError(f"{name} has no video stream")
    return streams[0]


def _audio_stream(container: InputContainer, name: str) -> av.audio.stream.AudioStream:
    stream = container.streams.best("audio")
    if stream is None:
        raise ValueError(f"{name} has no audio stream")
    return stream


# ---------------------------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------------------------
def sample_frame_indices(num_available: int, num_frames: int) -> np.ndarray:
    """The official uniform sampling ``floor(arange(0, vlen, vlen / n))``, as exact integers ``k * vlen // n``.

    ``num_available < num_frames`` repeats indices (4 frames, n = 10: 0 0 0 1 1 2 2 2 3 3), so the result
    always has ``num_frames`` entries.
    """
    if num_available < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame to sample from and to take, got {num_available} and {num_frames}")
    return np.arange(num_frames, dtype=np.int64) * num_available // num_frames


def read_video_frames(
    source: MediaSource,
    num_frames: int = 10,
    *,
    size: tuple[int, int] | None = None,
    name: str | None = None,
) -> np.ndarray:
    """``num_frames`` frames sampled uniformly over the video, uint8 RGB ``[num_frames, H, W, 3]``.

    Frame indices: ``sample_frame_indices(vlen, num_frames)`` over the video's frame count vlen (from the
    container's header, else from counting its packets; no decoding). A video shorter than ``num_frames``
    frames gives repeated frames. ``size``: ``(height, width)`` to scale every frame to (the official decord
    read is ``(224, 224)``, aspect ratio not kept); None keeps the coded size.

    Frames are decoded in order and decoding stops after the last frame needed; frames that are not picked
    are never converted to RGB. (No seeking: it would only skip the keyframe intervals lying wholly between two
    picks, and staying frame-exact after a seek needs a map from timestamps to frame numbers that variable
    frame rates and edit lists make unreliable.) If the header promised more frames than the stream holds, the
    indices are taken again over the frames that exist.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    label = _name(source, name)
    with _opened(source, label) as container:
        vlen = _frame_count(container, _video_stream(container, label))
    if vlen == 0:
        raise ValueError(f"{label}: the video stream has no frames")
    indices = sample_frame_indices(vlen, num_frames)
    frames, decoded = _decode_frames(source, label, indices, size)
    if len(frames) < len(set(indices.tolist())):
        if decoded == 0:
            raise ValueError(f"{label}: no frame of the video stream could be decoded")
        logger.warning("%s: header says %d frames, %d decoded; sampling over those", label, vlen, decoded)
        indices = sample_frame_indices(decoded, num_frames)
        frames, _ = _decode_frames(source, label, indices, size)
    return np.stack([frames[i] for i in indices.tolist()])


def _frame_count(container: InputContainer, stream: av.video.stream.VideoStream) -> int:
    """The frame count in the header (mp4, avi), else the number of the stream's packets (mkv, webm have no
    count; one packet holds one frame), found by demuxing only."""
    return stream.frames or sum(1 for packet in container.demux(stream) if packet.size)


def _decode_frames(
    source: MediaSource, label: str, indices: np.ndarray, size: tuple[int, int] | None
) -> tuple[dict[int, np.ndarray], int]:
    """RGB arrays of the frames at ``indices`` (decode order = index) and how many frames were decoded."""
    wanted, last = set(indices.tolist()), int(indices.max())
    reformat = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    with _opened(source, label) as container:
        stream = _video_stream(container, label)
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index in wanted:
                frames[index] = frame.to_ndarray(format="rgb24", **reformat)
            if index >= last:
                break
    return frames, decoded


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------
def read_image(source: MediaSource, *, name: str | None = None) -> Image.Image:
    """An RGB PIL image from a path or from the file's bytes (benchmarks that embed images, e.g. base64 TSVs).

    The pixels are read at once (not lazily), so a corrupt file fails here, naming it, rather than later.
    """
    label = _name(source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        target: Any = io.BytesIO(bytes(source))
    else:
        target = os.fspath(source)
        if not os.path.isfile(target):
            raise FileNotFoundError(f"image file {target} does not exist")
    try:
        with Image.open(target) as image:
            return image.convert("RGB")  # convert() loads the pixels and returns a new image: the file can close
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL reports truncated data as OSError
        raise ValueError(f"{label} could not be read as an image: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------------------
def read_audio(source: MediaSource, sample_rate: int = 16000, *, name: str | None = None) -> np.ndarray:
    """The audio stream of an audio file, or the sound track of a video, as float32 mono ``[T]`` in [-1, 1].

    Resampled to ``sample_rate`` by PyAV's ``AudioResampler`` (libswresample, format ``flt``, layout mono,
    channels averaged), flushed at the end so the tail is not lost. Decoders drop the encoders' priming samples
    where the file says how many (mp4 edit lists for AAC, the LAME header for mp3). A stream whose format changes
    midway gets a fresh resampler from that frame on. The file's first (best) audio stream is read.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    label = _name(source, name)
    chunks: list[np.ndarray] = []
    with _opened(source, label) as container:
        stream = _audio_stream(container, label)
        resampler, setup = None, None
        for frame in container.decode(stream):
            frame_setup = (frame.format.name, frame.layout.name, frame.sample_rate)
            if frame_setup != setup:
                if resampler is not None:
                    chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
                resampler, setup = _mono_resampler(sample_rate), frame_setup
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
        if resampler is not None:
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    if not chunks or sum(chunk.size for chunk in chunks) == 0:
        raise ValueError(f"{label}: the audio stream has no samples")
    # Lossy decoders and resampling can overshoot full scale by a little.
    return np.clip(np.concatenate(chunks), -1.0, 1.0).astype(np.float32, copy=False)


def _mono_resampler(sample_rate: int) -> av.AudioResampler:
    return av.AudioResampler(format="flt", layout="mono", rate=sample_rate, options=_DOWNMIX_OPTIONS)


def audio_duration(source: MediaSource, *, exact: bool = False, name: str | None = None) -> float:
    """Seconds of audio in the file's (best) audio stream.

    ``exact=False`` reads the container's header (stream duration, else the container's), which for mp3
    without an index is an estimate from the bitrate; when the header has none, or with ``exact=True``, every
    frame is decoded and its samples counted at the stream's own rate.
    """
    label = _name(source, name)
    with _opened(source, label) as container:
        stream = _audio_stream(container, label)
        if not exact:
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
        samples, rate = 0, None
        for frame in container.decode(stream):
            samples += frame.samples
            rate = rate or frame.sample_rate
    if not samples:
        raise ValueError(f"{label}: the audio stream has no samples")
    return samples / rate


# ---------------------------------------------------------------------------------------------------------------
# Audio windows
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AudioWindows:
    """How to cut a waveform into S windows (segments), each encoded separately by the audio encoder.

    Window k covers seconds ``[t_k + offset, t_k + offset + length)``. The anchors t_k are ``anchors`` when
    given (a fixed grid, in seconds), else spread over the clip: ``t_k = k * D / count`` for a clip of D
    seconds. ``length=None`` means no windows: the whole clip is one segment (speech).

    Sample arithmetic, exact and the same for every clip: with T samples at rate r, a window is
    ``W = round(length * r)`` samples, the offset ``round(offset * r)`` samples, a fixed anchor
    ``round(t_k * r)``, a spread anchor ``floor(k * T / count)`` (the real ``k * D / count`` in samples,
    floored); rounding is to the nearest sample, halves up. Samples before 0 or from T on read as zeros, so
    every window has exactly W samples.
    """

    count: int | None = None
    length: float | None = None
    offset: float = 0.0
    anchors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.anchors is not None:  # Hydra gives a ListConfig; a tuple keeps the dataclass hashable
            object.__setattr__(self, "anchors", tuple(float(t) for t in self.anchors))
        if self.length is None:
            if self.count not in (None, 1) or self.anchors is not None or self.offset:
                raise ValueError(
                    f"AudioWindows without a length means the whole clip as one segment; count, anchors and "
                    f"offset do not apply (got {self})"
                )
            return
        if not self.length > 0:
            raise ValueError(f"window length must be positive seconds, got {self.length}")
        if self.anchors is not None:
            if not self.anchors or (self.count is not None and self.count != len(self.anchors)):
                raise ValueError(f"anchors {self.anchors} do not give count={self.count} windows")
            object.__setattr__(self, "count", len(self.anchors))
        elif self.count is None or self.count < 1:
            raise ValueError(f"windows spread over the clip need count >= 1, got {self.count}")

    @property
    def whole(self) -> bool:
        """True when the clip is one segment, not cut."""
        return self.length is None

    def window_samples(self, sample_rate: int) -> int:
        """Samples per window, ``round(length * sample_rate)`` (halves up)."""
        if self.length is None:
            raise ValueError("the whole-clip setting has no fixed window length")
        return _round_half_up(self.length * sample_rate)

    def starts(self, num_samples: int, sample_rate: int) -> np.ndarray:
        """First sample of each window (int64 ``[S]``; may be negative or past the end: zeros are read there)."""
        if self.length is None:
            return np.zeros(1, dtype=np.int64)
        if self.anchors is not None:
            anchors = np.floor(np.asarray(self.anchors, dtype=np.float64) * sample_rate + 0.5).astype(np.int64)
        else:
            anchors = np.arange(self.count, dtype=np.int64) * num_samples // self.count
        return anchors + _round_half_up(self.offset * sample_rate)


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


WINDOW_PRESETS: dict[str, AudioWindows] = {
    # MUSIC-AVQA, ten 2 s windows [t - 0.5, t + 1.5] spread over the clip's real duration (t_k = k * D / 10).
    "music_avqa": AudioWindows(count=10, length=2.0, offset=-0.5),
    # The official grid, t = 0, 6, ..., 54 s whatever the duration (the official code assumes 60 s clips).
    "music_avqa_official": AudioWindows(length=2.0, offset=-0.5, anchors=tuple(float(t) for t in range(0, 60, 6))),
    # AVE, ten 1 s windows starting at k * D / 10: [k, k + 1] for the 10 s clips.
    "ave": AudioWindows(count=10, length=1.0),
    # Speech: the whole clip, one segment.
    "whole": AudioWindows(),
}


def resolve_audio_windows(spec: str | AudioWindows | Mapping[str, Any]) -> AudioWindows:
    """A preset name from ``WINDOW_PRESETS``, an ``AudioWindows``, or its fields as a mapping (a config block)."""
    if isinstance(spec, AudioWindows):
        return spec
    if isinstance(spec, str):
        try:
            return WINDOW_PRESETS[spec]
        except KeyError:
            raise ValueError(f"unknown audio window preset {spec!r}; presets: {sorted(WINDOW_PRESETS)}") from None
    if isinstance(spec, Mapping):
        return AudioWindows(**{str(key): value for key, value in spec.items()})
    raise TypeError(f"audio windows must be a preset name, an AudioWindows or a mapping, got {type(spec).__name__}")


def cut_windows(
    waveform: np.ndarray | Tensor, sample_rate: int, windows: str | AudioWindows | Mapping[str, Any]
) -> np.ndarray:
    """The waveform ``[T]`` cut into windows ``[S, W]`` (see ``AudioWindows``); ``whole`` gives ``[1, T]``.

    Parts of a window outside the clip are zeros; the rest are the waveform's samples, unchanged (same dtype).
    One gather over a zero-padded copy, no per-window or per-sample loop.
    """
    windows = resolve_audio_windows(windows)
    array = waveform.numpy(force=True) if isinstance(waveform, Tensor) else np.asarray(waveform)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"expected a non-empty mono waveform [T], got shape {array.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if windows.whole:
        return np.ascontiguousarray(array)[None]
    num_samples = array.shape[0]
    starts = windows.starts(num_samples, sample_rate)
    width = windows.window_samples(sample_rate)
    pad_left = max(0, -int(starts.min()))
    pad_right = max(0, int(starts.max()) + width - num_samples)
    padded = np.pad(array, (pad_left, pad_right))
    return padded[(starts + pad_left)[:, None] + np.arange(width, dtype=np.int64)]


# ---------------------------------------------------------------------------------------------------------------
# The loader the dataset calls
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PerImage:
    """A per-image transform (open_clip's ``preprocess``: PIL image -> ``[3, H, W]``) applied to a list of images
    and stacked: ``[S, 3, H, W]``, what ``ClipVisualEncoder.preprocess`` does.

    It holds the transform only, so a ``MediaLoader`` pickled into DataLoader workers carries a few objects,
    where the encoder's bound ``preprocess`` method would carry the whole frozen vision tower.
    """

    transform: Callable[[Image.Image], Tensor]

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        if len(images) == 0:
            raise ValueError("no images to transform")
        return torch.stack([self.transform(image) for image in images])


@dataclass
class MediaLoader:
    """Reads one ``MediaRef`` into the tensor a ``Sample`` carries.

    * ``video``: ``frames`` frames (``read_video_frames``, optionally scaled to ``frame_size`` = (H, W)),
      through ``frames_transform`` (uint8 ``[N, H, W, 3]`` -> ``[N, 3, H', W']``, e.g. the encoder's
      ``preprocess_frames``); without one, ``image_transform`` on the frames as PIL images.
    * ``image``: the image (scaled to ``frame_size`` with bicubic resampling when given, as PIL's ``resize``
      does by default) through ``image_transform`` on ``[image]`` -> ``[1, 3, H, W]`` (e.g. the encoder's
      ``preprocess``).
    * ``audio``: ``read_audio`` at ``sample_rate``, cut by ``audio_windows`` (a ``WINDOW_PRESETS`` name, an
      ``AudioWindows`` or its fields) -> float32 ``[S, T]``.

    Without transforms, pixels come back raw: uint8 ``[S, 3, H, W]`` (for caching scripts that preprocess
    later). Embedded bytes (``ref.data``) are read in place of the file; errors name ``ref.path``.

    Picklable for DataLoader workers as long as the transforms are (module-level functions, torchvision
    transforms, ``PerImage``; not lambdas). ``from_visual_encoder`` builds one with the encoder's transform only.

    ``extracted_dir``: the ``out_dir`` of ``data_prep/extract_media.py`` (``moka_train.data.extraction``). Video
    frames and audio waveforms are then read from the arrays extracted there, with this loader's ``frames``,
    ``frame_size`` and ``sample_rate``, instead of decoding the files: the same tensors, without decoding a
    video every epoch. An item not extracted with these settings (or whose source changed since) is an error
    naming the file looked for; there is no silent fallback to decoding, which would hide an incomplete
    extraction behind slow epochs. Images and embedded bytes are always read from their source.
    """

    frames: int = 10
    audio_windows: str | AudioWindows | Mapping[str, Any] = "whole"
    image_transform: Callable[[list[Image.Image]], Tensor] | None = None
    frames_transform: Callable[[np.ndarray], Tensor] | None = None
    sample_rate: int = 16000
    frame_size: tuple[int, int] | None = None
    extracted_dir: str | os.PathLike | None = None
    windows: AudioWindows = field(init=False, repr=False)

    # kind -> method name (names, not bound methods, so that pickling the loader stays plain)
    _READERS: ClassVar[dict[str, str]] = {"video": "load_video", "image": "load_image", "audio": "load_audio"}

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be at least 1, got {self.frames}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        if self.frame_size is not None:
            self.frame_size = (int(self.frame_size[0]), int(self.frame_size[1]))
        self.windows = resolve_audio_windows(self.audio_windows)

    @classmethod
    def from_visual_encoder(cls, encoder: Any, **kwargs: Any) -> MediaLoader:
        """A loader preprocessing pixels as ``encoder.preprocess`` / ``preprocess_frames`` do (a
        ``ClipVisualEncoder``: its ``transform``), without holding the encoder itself."""
        return cls(image_transform=PerImage(encoder.transform), **kwargs)

    def load(self, ref: MediaRef) -> Tensor:
        """The tensor for one media item: pixels ``[S, 3, H, W]`` or audio windows ``[S, T]``."""
        try:
            reader = getattr(self, self._READERS[ref.kind])
        except KeyError:
            raise ValueError(
                f"media {ref.path}: no reader for kind {ref.kind!r} (kinds: {sorted(self._READERS)})"
            ) from None
        return reader(ref)

    def load_video(self, ref: MediaRef) -> Tensor:
        if self._extracted(ref):
            frames = self._read_extracted(ref)
        else:
            frames = read_video_frames(_source(ref), self.frames, size=self.frame_size, name=ref.path)
        if self.frames_transform is not None:
            pixels = self.frames_transform(frames)
        elif self.image_transform is not None:
            pixels = self.image_transform([Image.fromarray(frame) for frame in frames])
        else:
            pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
        return _checked_pixels(pixels, len(frames), ref)

    def load_image(self, ref: MediaRef) -> Tensor:
        image = read_image(_source(ref), name=ref.path)
        if self.frame_size is not None:
            height, width = self.frame_size
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        if self.image_transform is not None:
            pixels = self.image_transform([image])
        else:
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).contiguous()
        return _checked_pixels(pixels, 1, ref)

    def load_audio(self, ref: MediaRef) -> Tensor:
        if self._extracted(ref):
            waveform = self._read_extracted(ref)
        else:
            waveform = read_audio(_source(ref), self.sample_rate, name=ref.path)
        return torch.from_numpy(cut_windows(waveform, self.sample_rate, self.windows))

    def _extracted(self, ref: MediaRef) -> bool:
        """Whether ``ref`` is read from ``extracted_dir`` (files only: embedded bytes are never extracted)."""
        return self.extracted_dir is not None and ref.data is None

    def _read_extracted(self, ref: MediaRef) -> np.ndarray:
        # Imported here: moka_train.data.extraction imports this module (its decoders and MediaLoader).
        from moka_train.data.extraction import read_extracted

        return read_extracted(self.extracted_dir, ref, self)


def _source(ref: MediaRef) -> MediaSource:
    return ref.data if ref.data is not None else ref.path


def _checked_pixels(pixels: Any, segments: int, ref: MediaRef) -> Tensor:
    """A transform's output must be ``[S, 3, H, W]`` with one entry per image or frame."""
    if not isinstance(pixels, Tensor) or pixels.dim() != 4 or pixels.shape[0] != segments or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
        raise ValueError(f"media {ref.path}: the transform gave {shape}, expected [{segments}, 3, H, W]")
    return pixels


def build_media_loader(media: Mapping[str, Any], visual_encoder: Any | None = None) -> MediaLoader:
    """The loader a data config's ``media`` block describes (``frames``, ``audio_windows``, ...), with images
    and frames in ``visual_encoder``'s preprocessing when the data has any."""
    if visual_encoder is None:
        return MediaLoader(**media)
    return MediaLoader.from_visual_encoder(visual_encoder, **media)


def probe_media(ref: MediaRef) -> None:
    """Raise (naming the file) unless ``ref`` opens and its first frame of the needed kind decodes: a cheap
    check of a whole dataset before a run, which catches missing streams, broken headers and most truncated
    files (a file cut in its last seconds still passes; extraction and caching decode everything)."""
    source = _source(ref)
    if ref.kind == "image":
        read_image(source, name=ref.path)
        return
    with _opened(source, ref.path) as container:
        stream = _video_stream(container, ref.path) if ref.kind == "video" else _audio_stream(container, ref.path)
        for _ in container.decode(stream):
            return
        raise ValueError(f"{ref.path} has no decodable {ref.kind} frame")
