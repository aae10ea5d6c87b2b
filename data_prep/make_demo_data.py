"""Write a small synthetic dataset in the MUSIC-AVQA layout, learnable by the tiny models of the tests and the demo.

Usage::

    python data_prep/make_demo_data.py --out demo_data            # 48 videos, ~430 questions, a few seconds
    python data_prep/make_demo_data.py --out demo_data --num-videos 480 --questions-per-video 12

Why synthetic: the real MUSIC-AVQA is 48 GB of 60 s videos, and nothing a random 32 px ViT and a 2-layer LLM can
learn in minutes on a CPU. This set keeps the benchmark's *interface* (the published layout, the annotation
schema, the question templates and the nine question types, answers from its 42-word vocabulary) so the real
builder (``moka_train.data.datasets.music_avqa.build_music_avqa``), the real media decoding and the real audio
windows run on it unchanged, while the content is simple enough to learn:

* **Picture.** A 64x64 frame (``--size``) with a left and a right half. Each half shows one instrument or
  nothing: a solid shape on a dark background, whose colour names the instrument (piano = red square, violin =
  green disc, ...; ``INSTRUMENTS``). The frame is static for the whole clip, so any of the 10 sampled frames
  shows it. 64 px become the tiny CLIP's 32 px input with the halves on whole 8 px patch columns (two columns
  per side).
* **Sound.** Each sounding instrument is a sine at its own frequency (the default four: cello 280 Hz, piano
  620 Hz, violin 1370 Hz, flute 3 kHz; all eight ~1.48x apart, none a multiple of another, so no tone is a
  harmonic of another), either loud (amplitude 0.4-0.5) or soft (0.10-0.14). One or two instruments sound:
  one over the whole clip or only its first or second half; two one after the other (``sequence``: first
  half, then second half) or together. A visible instrument may stay silent, and an instrument off screen may
  be heard (then "Is this sound from the instrument in the video?" is "no"). The sound never shows in the
  picture, so audio questions need the audio.
* **Questions.** Two sets (``--questions``). ``demo`` (the default, what ``scripts/demo.py`` trains on):
  one fixed question per type, answered from the media by counting, naming or comparing counts
  (``DEMO_TEMPLATES``: three official templates, the official "<LRer>" one asked for the left half only, and
  three audio-visual questions of the same form that need a fact of each modality). ``musicavqa``:
  MUSIC-AVQA's own templates (``TEMPLATES``: 23 of the 33 official ones, written exactly as in
  the release, trailing space and full-width question mark included, plus "Where is the <Object>?" for visual
  left/right), in all nine (modality, type) pairs: what you see (Visual Counting / Location), what you hear
  (Audio Counting / Comparative) and both (Audio-Visual Existential, Counting, Location, Comparative, Temporal).
  The answer of every question is computed from the scene, so it is in the media; ``tests/test_demo_data.py``
  decodes the files and answers every question again from the pixels and the waveform alone.
* **Balance.** Each video gets ``--questions-per-video`` questions, chosen greedily to even out, per split,
  the question types and the answers within each type and each template; a model that answers one constant
  per type, or one per template (ignoring the media), stays near chance. ``summary.json`` and the printout
  give, per split and type, both baselines ("chance").

Layout under ``--out`` (what ``configs/data/demo.yaml`` reads)::

    json_update/avqa-{train,val,test}.json     annotations in the official schema (7 fields, "anser" included)
    MUSIC-AVQA-Videos/<8-digit id>.mp4         H.264 (lossless, qp 0) 64x64 at 10 fps + AAC 16 kHz mono
    demo_settings.json                         what the media depend on (checked when resuming)
    summary.json                               settings, instruments, the scene of every video, chance levels

Videos are split train / val / test by video (no video in two splits; ``--val-videos``, ``--test-videos``, the
rest train). Deterministic: a video's scene depends only on ``--seed``, its index and the media settings, so
asking for more videos or questions keeps the videos already there. Resumable: existing mp4 files (written
to a temporary name, then renamed, so one that exists is complete) are kept, and files whose content would
not change are not rewritten; ``--overwrite`` rebuilds everything. A folder made with other media settings is
refused rather than mixed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Any

import av
import numpy as np
from tqdm import tqdm

ANNOTATION_DIR = "json_update"
VIDEO_DIR = "MUSIC-AVQA-Videos"
SETTINGS_FILE = "demo_settings.json"
SUMMARY_FILE = "summary.json"
SPLITS = ("train", "val", "test")
SIDES = ("left", "right")
NUMBERS = ("zero", "one", "two")
_VIDEO_NAME = re.compile(r"\d{8}\.mp4")


# ---------------------------------------------------------------------------------------------------------------
# The instruments: what they look like and how they sound
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instrument:
    """One demo instrument: a MUSIC-AVQA answer word, the colour and shape that show it, the tone it plays."""

    name: str
    colour: tuple[int, int, int]
    shape: str
    tone: float  # Hz


# The first four (the default palette) are the most distinct in colour and in pitch. Tones are ~1.48x apart
# (5+ mel bins of a 128-bin fbank) and no tone is a multiple of another; colours are >= 70 apart (RGB distance),
# far beyond the per-video jitter (+-12) and the lossless encoder's rounding (+-3).
INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument("piano", (220, 45, 45), "square", 620.0),
    Instrument("violin", (45, 200, 70), "disc", 1370.0),
    Instrument("flute", (55, 95, 235), "bar", 3000.0),
    Instrument("cello", (230, 210, 45), "diamond", 280.0),
    Instrument("trumpet", (215, 70, 205), "cross", 930.0),
    Instrument("accordion", (45, 205, 215), "ring", 2030.0),
    Instrument("tuba", (240, 140, 30), "triangle", 190.0),
    Instrument("xylophone", (235, 235, 235), "stripe", 420.0),
)
BACKGROUND = (25, 45)  # range of the dark grey background level (per video)
LOUD, SOFT = (0.40, 0.50), (0.10, 0.14)  # sine amplitude ranges: ~11 dB apart at the least
FADE_S = 0.02  # raised-cosine on/off ramps: no clicks that would smear a tone across the spectrum


@dataclass(frozen=True)
class Source:
    """A sounding instrument: where it is (``None``: off screen), when it plays (seconds), how loud."""

    instrument: str
    side: str | None
    start: float
    end: float
    amplitude: float


@dataclass(frozen=True)
class Scene:
    """Everything one video shows and plays; the questions' answers are computed from it alone."""

    video_id: str
    seconds: float
    visible: dict[str, str | None]  # side -> instrument name or None (empty half)
    sources: tuple[Source, ...]  # sorted by start time
    timing: str  # whole | first_half | second_half | sequence | together
    background: int
    colours: dict[str, tuple[int, int, int]]  # side -> jittered colour of what it shows
    offsets: dict[str, tuple[int, int]]  # side -> (dy, dx) jitter of the shape's position

    @property
    def shown(self) -> list[str]:
        return [name for name in self.visible.values() if name is not None]

    @property
    def heard(self) -> list[str]:
        return [source.instrument for source in self.sources]

    def side_of(self, name: str) -> str | None:
        return next((side for side, shown in self.visible.items() if shown == name), None)

    def source(self, name: str) -> Source | None:
        return next((source for source in self.sources if source.instrument == name), None)

    def always_playing(self, name: str) -> bool:
        source = self.source(name)
        return source is not None and source.start == 0 and source.end == self.seconds

    def louder(self) -> Source:
        return max(self.sources, key=lambda source: source.amplitude)


@dataclass(frozen=True)
class MediaSettings:
    """What the media depend on: a folder written with other settings is not resumed."""

    seed: int = 0
    instruments: int = 4
    seconds: float = 4.0
    fps: int = 10
    size: int = 64
    sample_rate: int = 16000
    audio_bitrate: int = 48000


def sample_scene(index: int, settings: MediaSettings) -> Scene:
    """The scene of video ``index``, from its own random stream (seed, index): independent of how many videos or
    questions are asked for, so a larger set keeps the videos of a smaller one."""
    rng = np.random.default_rng([settings.seed, index])
    palette = [instrument.name for instrument in INSTRUMENTS[: settings.instruments]]
    order = [palette[i] for i in rng.permutation(len(palette))]
    # Two visible instruments most of the time: most audio-visual questions compare or order two of them.
    num_visible = 2 if rng.random() < 0.7 else 1
    visible: dict[str, str | None] = dict.fromkeys(SIDES)
    for side, name in zip(rng.permutation(SIDES)[:num_visible].tolist(), order[:num_visible], strict=True):
        visible[side] = name
    shown = [name for name in visible.values() if name is not None]  # left to right
    offscreen = order[num_visible] if rng.random() < 0.35 else None
    # At most two instruments sound: with one off screen, at most one of those in view.
    if offscreen is not None:
        sounding = [shown[i] for i in rng.permutation(len(shown))[: int(rng.random() < 0.5)]] + [offscreen]
    elif len(shown) == 2 and rng.random() < 0.6:
        sounding = list(shown)
    else:
        sounding = [shown[int(rng.integers(len(shown)))]]
    sounding = [sounding[i] for i in rng.permutation(len(sounding))]  # the order they come in, for sequences
    seconds, half = settings.seconds, settings.seconds / 2
    if len(sounding) == 1:
        timing = str(rng.choice(["whole", "whole", "whole", "first_half", "second_half"]))
        spans = [{"whole": (0.0, seconds), "first_half": (0.0, half), "second_half": (half, seconds)}[timing]]
        loud = [bool(rng.random() < 0.5)]
    else:
        timing = "sequence" if rng.random() < 0.6 else "together"
        spans = [(0.0, half), (half, seconds)] if timing == "sequence" else [(0.0, seconds)] * 2
        loud = [True, False] if rng.random() < 0.5 else [False, True]
    sources = tuple(
        Source(
            instrument=name,
            side=next((side for side, shown_name in visible.items() if shown_name == name), None),
            start=start,
            end=end,
            amplitude=round(float(rng.uniform(*(LOUD if is_loud else SOFT))), 4),
        )
        for name, (start, end), is_loud in zip(sounding, spans, loud, strict=True)
    )
    colour_of = {instrument.name: instrument.colour for instrument in INSTRUMENTS}
    colours, offsets = {}, {}
    shift = settings.size // 20  # 3 px at 64 px: less than the margins around a shape's box
    for side in SIDES:
        jitter = rng.integers(-12, 13, size=3)
        offset = rng.integers(-shift, shift + 1, size=2)
        if visible[side] is not None:
            colours[side] = tuple(int(c) for c in np.clip(np.array(colour_of[visible[side]]) + jitter, 0, 255))
            offsets[side] = (int(offset[0]), int(offset[1]))
    return Scene(
        video_id=f"{index:08d}",
        seconds=seconds,
        visible=visible,
        sources=tuple(sorted(sources, key=lambda source: source.start)),
        timing=timing,
        background=int(rng.integers(BACKGROUND[0], BACKGROUND[1] + 1)),
        colours=colours,
        offsets=offsets,
    )


# ---------------------------------------------------------------------------------------------------------------
# Rendering: the frame and the sound track
# ---------------------------------------------------------------------------------------------------------------
def _shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """A boolean mask of ``shape`` filling a height x width box."""
    y, x = np.mgrid[0:height, 0:width]
    v = (y + 0.5) / height * 2 - 1  # -1 .. 1 down the box
    u = (x + 0.5) / width * 2 - 1  # -1 .. 1 across it
    masks: dict[str, Callable[[], np.ndarray]] = {
        "square": lambda: np.ones((height, width), dtype=bool),
        "disc": lambda: u**2 + v**2 <= 1,
        "bar": lambda: np.abs(u) <= 0.45,
        "diamond": lambda: np.abs(u) + np.abs(v) <= 1,
        "cross": lambda: (np.abs(u) <= 0.35) | (np.abs(v) <= 0.25),
        "ring": lambda: (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.3),
        "triangle": lambda: np.abs(u) <= (v + 1) / 2,
        "stripe": lambda: np.abs(v) <= 0.3,
    }
    return masks[shape]()


def render_frame(scene: Scene, size: int) -> np.ndarray:
    """The video's (static) frame, uint8 RGB ``[size, size, 3]``: the left and right halves each show the shape
    of the instrument there in its colour, on the background."""
    frame = np.full((size, size, 3), scene.background, dtype=np.uint8)
    half = size // 2
    box_h, box_w = round(size * 0.62), round(half * 0.72)
    shape_of = {instrument.name: instrument.shape for instrument in INSTRUMENTS}
    for column, side in enumerate(SIDES):
        name = scene.visible[side]
        if name is None:
            continue
        dy, dx = scene.offsets[side]
        top = (size - box_h) // 2 + dy
        left = column * half + (half - box_w) // 2 + dx
        region = frame[top : top + box_h, left : left + box_w]
        region[_shape_mask(shape_of[name], box_h, box_w)] = scene.colours[side]
    return frame


def render_audio(scene: Scene, sample_rate: int) -> np.ndarray:
    """The sound track, float32 mono ``[seconds * sample_rate]``: each source's sine over its span, with short
    fades so a span's edges do not click."""
    num_samples = round(scene.seconds * sample_rate)
    t = np.arange(num_samples) / sample_rate
    tone_of = {instrument.name: instrument.tone for instrument in INSTRUMENTS}
    audio = np.zeros(num_samples, dtype=np.float64)
    for source in scene.sources:
        start, end = round(source.start * sample_rate), round(source.end * sample_rate)
        ramp = min(round(FADE_S * sample_rate), (end - start) // 2)
        envelope = np.ones(end - start)
        fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        envelope[:ramp], envelope[len(envelope) - ramp :] = fade, fade[::-1]
        audio[start:end] += source.amplitude * envelope * np.sin(2 * np.pi * tone_of[source.instrument] * t[start:end])
    return audio.astype(np.float32)


def write_video(path: Path, frame: np.ndarray, audio: np.ndarray, settings: MediaSettings) -> None:
    """An mp4 with the frame repeated for the clip (H.264 at qp 0: lossless in YUV, so colours come back to +-3)
    and the sound as AAC. Written under a temporary name and renamed: a file that exists is complete."""
    partial = path.with_name(path.name + ".partial")
    with av.open(str(partial), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=settings.fps)
        video.width, video.height, video.pix_fmt = frame.shape[1], frame.shape[0], "yuv420p"
        video.options = {"qp": "0", "preset": "ultrafast"}
        sound = out.add_stream("aac", rate=settings.sample_rate, layout="mono")
        sound.bit_rate = settings.audio_bitrate
        for k in range(round(settings.seconds * settings.fps)):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = k
            out.mux(video.encode(picture))
        out.mux(video.encode(None))
        # The AAC encoder takes fixed 1024-sample frames in planar float.
        for start in range(0, len(audio), 1024):
            chunk = av.AudioFrame.from_ndarray(audio[None, start : start + 1024].copy(), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = settings.sample_rate, start
            out.mux(sound.encode(chunk))
        out.mux(sound.encode(None))
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------------------------
# Questions: MUSIC-AVQA templates and their answers from a scene
# ---------------------------------------------------------------------------------------------------------------
Candidate = tuple[list[str], str]  # (templ_values, answer)


@dataclass(frozen=True)
class Template:
    """A question template of one (modality, type) and how to ask it of a scene: every (values, answer) pair
    the scene supports (none when the question would not make sense there, e.g. "first" without a sequence)."""

    modality: str
    qtype: str
    content: str  # the question_content, as written in the release
    answers: tuple[str, ...] | None  # the answers it can have; None: the instrument names of the palette
    ask: Callable[[Scene, list[str]], list[Candidate]]  # (scene, palette) -> candidates
    official: bool = True

    @property
    def key(self) -> str:
        return f"{self.modality}/{self.qtype}: {self.content}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _sequence(scene: Scene) -> tuple[Source, Source] | None:
    """(first, last) when two instruments play one after the other."""
    return (scene.sources[0], scene.sources[1]) if scene.timing == "sequence" else None


def _fl(scene: Scene) -> list[tuple[str, Source]]:
    pair = _sequence(scene)
    return [] if pair is None else [("first", pair[0]), ("last", pair[1])]


def _visible_sources(scene: Scene) -> list[Source]:
    return [source for source in scene.sources if source.side is not None]


def _louder_pairs(sources: Sequence[Source]) -> list[tuple[Source, Source, bool]]:
    """(a, b, a louder than b) for both orders of two sources."""
    return [(a, b, a.amplitude > b.amplitude) for a, b in permutations(sources, 2)]


def _before_after(scene: Scene) -> list[Candidate]:
    pair = _sequence(scene)
    if pair is None:
        return []
    first, last = pair
    return [(["before", last.instrument], first.instrument), (["after", first.instrument], last.instrument)]


def _loudest_side(scene: Scene) -> list[Candidate]:
    # Only with two instruments in view and every sound coming from them: otherwise "where" has no side.
    if len(scene.shown) < 2 or any(source.side is None for source in scene.sources):
        return []
    return [(["loudest"], scene.louder().side or "")]


YES_NO = ("yes", "no")


TEMPLATES: tuple[Template, ...] = (
    # -- Audio: what you hear ------------------------------------------------------------------------------------
    Template(
        "Audio",
        "Counting",
        "How many musical instruments were heard throughout the video?",
        NUMBERS[1:],
        lambda s, p: [([], NUMBERS[len(s.sources)])],
    ),
    Template(
        "Audio",
        "Counting",
        "Is there a <Object> sound?",
        YES_NO,
        lambda s, p: [([n], _yes(n in s.heard)) for n in p],
    ),
    Template(
        "Audio",
        "Counting",
        "Are there <Object> and <Object> sound? ",  # sic, trailing space as in the release
        YES_NO,
        lambda s, p: [([a, b], _yes(a in s.heard and b in s.heard)) for a, b in permutations(p, 2)],
    ),
    Template(
        "Audio",
        "Comparative",
        "Is the <Object> louder than the <Object>?",
        YES_NO,
        lambda s, p: [([a.instrument, b.instrument], _yes(louder)) for a, b, louder in _louder_pairs(s.sources)],
    ),
    # -- Visual: what you see ------------------------------------------------------------------------------------
    Template(
        "Visual",
        "Counting",
        "How many types of musical instruments appeared in the entire video?",
        NUMBERS[1:],
        lambda s, p: [([], NUMBERS[len(s.shown)])],
    ),
    Template(
        "Visual",
        "Counting",
        "Is there a <Object> in the entire video?",
        YES_NO,
        lambda s, p: [([n], _yes(n in s.shown)) for n in p],
    ),
    Template(
        "Visual",
        "Counting",
        "Are there <Object> and <Object> instruments in the video?",
        YES_NO,
        lambda s, p: [([a, b], _yes(a in s.shown and b in s.shown)) for a, b in permutations(p, 2)],
    ),
    Template(
        "Visual",
        "Counting",
        "How many <Object> are in the entire video?",
        NUMBERS[:2],
        lambda s, p: [([n], NUMBERS[s.shown.count(n)]) for n in p],
    ),
    Template(
        "Visual",
        "Location",
        "What kind of musical instrument is it?",
        None,
        lambda s, p: [([], s.shown[0])] if len(s.shown) == 1 else [],
    ),
    Template(
        "Visual",
        "Location",
        "What kind of instrument is the <LRer> instrument? ",  # sic, trailing space as in the release
        None,
        lambda s, p: [([f"{side}est"], s.visible[side] or "") for side in SIDES] if len(s.shown) == 2 else [],
    ),
    Template(
        "Visual",
        "Location",
        "Where is the <Object>?",  # not an official template: the visual left/right question the demo wants
        SIDES,
        lambda s, p: [([n], s.side_of(n) or "") for n in s.shown],
        official=False,
    ),
    # -- Audio-Visual: both ---------------------------------------------------------------------------------------
    Template(
        "Audio-Visual",
        "Existential",
        "Is the <Object> in the video always playing?",
        YES_NO,
        lambda s, p: [([n], _yes(s.always_playing(n))) for n in s.shown],
    ),
    Template(
        "Audio-Visual",
        "Existential",
        "Is this sound from the instrument in the video?",
        YES_NO,
        lambda s, p: [([], _yes(all(source.side is not None for source in s.sources)))],
    ),
    Template(
        "Audio-Visual",
        "Counting",
        "How many instruments are sounding in the video?",
        NUMBERS,
        lambda s, p: [([], NUMBERS[len(_visible_sources(s))])],
    ),
    Template(
        "Audio-Visual",
        "Counting",
        "How many instruments in the video did not sound from beginning to end?",
        NUMBERS,
        lambda s, p: [([], NUMBERS[len(s.shown) - len(_visible_sources(s))])],
    ),
    Template(
        "Audio-Visual",
        "Counting",
        "How many sounding <Object> in the video\uff1f",  # sic, full-width question mark as in the release
        NUMBERS[:2],
        lambda s, p: [([n], NUMBERS[int(n in s.shown and n in s.heard)]) for n in p],
    ),
    Template(
        "Audio-Visual",
        "Location",
        "Where is the <LL> instrument?",
        SIDES,
        lambda s, p: _loudest_side(s),
    ),
    Template(
        "Audio-Visual",
        "Location",
        "Is the <FL> sound coming from the <LR> instrument?",
        YES_NO,
        lambda s, p: [
            ([fl, side], _yes(source.side == side)) for fl, source in _fl(s) for side in SIDES if s.visible[side]
        ],
    ),
    Template(
        "Audio-Visual",
        "Location",
        "Which is the musical instrument that sounds at the same time as the <Object>?",
        None,
        lambda s, p: (
            [([a.instrument], b.instrument) for a, b in permutations(s.sources, 2) if a.side is not None]
            if s.timing == "together"
            else []
        ),
    ),
    Template(
        "Audio-Visual",
        "Comparative",
        "Is the instrument on the <LR> louder than the instrument on the <LR>?",
        YES_NO,
        lambda s, p: [([a.side, b.side], _yes(louder)) for a, b, louder in _louder_pairs(_visible_sources(s))],
    ),
    Template(
        "Audio-Visual",
        "Comparative",
        "Is the <Object> on the <LR> louder than the <Object> on the <LR>?",
        YES_NO,
        lambda s, p: [
            ([a.instrument, a.side, b.instrument, b.side], _yes(louder))
            for a, b, louder in _louder_pairs(_visible_sources(s))
        ],
    ),
    Template(
        "Audio-Visual",
        "Temporal",
        "Where is the <FL> sounding instrument?",
        SIDES,
        lambda s, p: [([fl], source.side) for fl, source in _fl(s) if source.side is not None],
    ),
    Template(
        "Audio-Visual",
        "Temporal",
        "Which instrument makes sounds <BA> the <Object>?",
        None,
        lambda s, p: _before_after(s),
    ),
    Template(
        "Audio-Visual",
        "Temporal",
        "What is the <TH> instrument that comes in?",
        None,
        lambda s, p: (
            [(["first"], s.sources[0].instrument), (["second"], s.sources[1].instrument)]
            if s.timing == "sequence"
            else [(["first"], s.sources[0].instrument)]
            if len(s.sources) == 1
            else []
        ),
    ),
)
# The nine (modality, type) pairs in the order of the paper's tables (and of the printout).
TYPES: tuple[tuple[str, str], ...] = tuple(dict.fromkeys((t.modality, t.qtype) for t in TEMPLATES))
COUNTS = ("zero", "one", "two", "three", "four")


def _official(content: str) -> Template:
    return next(template for template in TEMPLATES if template.content == content)


# The demo's question set: one fixed question per type (no word of the question picks an object or a side), each
# answered from the media by counting, naming or comparing counts; the three audio-visual ones need a fact of each
# modality (how far one modality goes on each: the README's demo table). A 2-layer random LLM learns these in a few
# hundred steps; the MUSIC-AVQA templates above bind a word of the question to an object of the media (which
# instrument, which side, which comes first), which it does not learn within CPU minutes even with the scene
# given as words (README, "The CPU demo").
DEMO_TEMPLATES: tuple[Template, ...] = (
    _official("How many musical instruments were heard throughout the video?"),
    _official("How many types of musical instruments appeared in the entire video?"),
    _official("What kind of musical instrument is it?"),
    # The official template with its slot fixed to "leftest": naming what one half shows.
    Template(
        "Visual",
        "Location",
        "What kind of instrument is the <LRer> instrument? ",
        None,
        lambda s, p: [(["leftest"], s.visible["left"] or "")] if len(s.shown) == 2 else [],
    ),
    Template(
        "Audio-Visual",
        "Existential",
        "Are there two instruments in the video and two sounds?",
        YES_NO,
        lambda s, p: [([], _yes(len(s.shown) == 2 and len(s.sources) == 2))],
        official=False,
    ),
    Template(
        "Audio-Visual",
        "Counting",
        "How many instruments and sounds are there in all?",
        COUNTS[2:],
        lambda s, p: [([], COUNTS[len(s.shown) + len(s.sources)])],
        official=False,
    ),
    Template(
        "Audio-Visual",
        "Comparative",
        "Are there more instruments in the video than sounds?",
        YES_NO,
        lambda s, p: [([], _yes(len(s.shown) > len(s.sources)))],
        official=False,
    ),
)
QUESTION_SETS: dict[str, tuple[Template, ...]] = {"demo": DEMO_TEMPLATES, "musicavqa": TEMPLATES}


@dataclass
class Balancer:
    """Greedy per-split balancing of question types and of answers.

    A template may give an answer only if, given, it leads the template's rarest possible answer by at most
    ``slack``: "two instruments heard" is rarer than "one", so the template waits for a two-instrument
    video rather than piling up "one". A media-blind model answering one constant per template therefore stays
    at about 1 / (number of answers). Among the allowed candidates, the least-asked type goes first, then the
    rarest answer within the template and within the type, then the least-used template (ties at random).
    A video whose types are all blocked gets fewer questions."""

    rng: np.random.Generator
    palette: list[str]
    question_set: tuple[Template, ...] = TEMPLATES
    slack: int = 1
    types: Counter = field(default_factory=Counter)
    type_answers: Counter = field(default_factory=Counter)
    template_answers: Counter = field(default_factory=Counter)
    templates: Counter = field(default_factory=Counter)

    def allowed(self, template: Template, answer: str) -> bool:
        answers = self.palette if template.answers is None else template.answers
        floor = min(self.template_answers[template.key, other] for other in answers)
        return self.template_answers[template.key, answer] <= floor + self.slack - 1

    def choose(self, scene: Scene, count: int) -> list[tuple[Template, list[str], str]]:
        pool: dict[tuple[str, str], list[tuple[Template, list[str], str]]] = {}
        for template in self.question_set:
            for values, answer in template.ask(scene, self.palette):
                pool.setdefault((template.modality, template.qtype), []).append((template, values, answer))
        chosen: list[tuple[Template, list[str], str]] = []
        while len(chosen) < count:
            pool = {qtype: [c for c in pool[qtype] if self.allowed(c[0], c[2])] for qtype in pool}
            pool = {qtype: candidates for qtype, candidates in pool.items() if candidates}
            if not pool:
                break
            qtype = min(pool, key=lambda t: (self.types[t], self.rng.random()))
            candidates = pool[qtype]
            template, values, answer = candidates.pop(
                min(
                    range(len(candidates)),
                    key=lambda i: (
                        self.template_answers[candidates[i][0].key, candidates[i][2]],
                        self.type_answers[qtype, candidates[i][2]],
                        self.templates[candidates[i][0].key],
                        self.rng.random(),
                    ),
                )
            )
            chosen.append((template, values, answer))
            self.types[qtype] += 1
            self.type_answers[qtype, answer] += 1
            self.template_answers[template.key, answer] += 1
            self.templates[template.key] += 1
        return chosen


def annotation(scene: Scene, question_id: int, template: Template, values: list[str], answer: str) -> dict[str, Any]:
    """One record in the official schema: the seven fields, ``type`` and ``templ_values`` as JSON text."""
    return {
        "video_id": scene.video_id,
        "question_id": question_id,
        "type": json.dumps([template.modality, template.qtype]),
        "question_content": template.content,
        "templ_values": json.dumps(values),
        "question_deleted": 0,
        "anser": answer,
    }


# ---------------------------------------------------------------------------------------------------------------
# Chance levels
# ---------------------------------------------------------------------------------------------------------------
def chance_report(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per (modality, type): the count, the answer counts, and what two media-blind baselines score: one constant
    answer per type (``constant``) and one per template (``per_template``); the same pooled over all types."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        modality, qtype = json.loads(record["type"])
        by_type.setdefault(f"{modality} {qtype}", []).append(record)
    report: dict[str, Any] = {}
    totals = Counter()
    for name in [f"{m} {t}" for m, t in TYPES if f"{m} {t}" in by_type]:
        items = by_type[name]
        answers = Counter(item["anser"] for item in items)
        per_template: dict[str, Counter] = {}
        for item in items:
            per_template.setdefault(item["question_content"], Counter())[item["anser"]] += 1
        best_constant = answers.most_common(1)[0][1]
        best_per_template = sum(counter.most_common(1)[0][1] for counter in per_template.values())
        report[name] = {
            "questions": len(items),
            "answers": dict(sorted(answers.items())),
            "constant": round(best_constant / len(items), 4),
            "per_template": round(best_per_template / len(items), 4),
        }
        totals.update(questions=len(items), constant=best_constant, per_template=best_per_template)
    if totals["questions"]:
        report["all"] = {
            "questions": totals["questions"],
            "constant": round(totals["constant"] / totals["questions"], 4),
            "per_template": round(totals["per_template"] / totals["questions"], 4),
        }
    return report


def format_chance(summary: dict[str, Any]) -> str:
    """The chance table of ``summary`` as text: one line per type; per split the count and the two baselines."""
    splits = [split for split in SPLITS if summary["splits"][split]["questions"]]
    header = f"{'question type':<26}" + "".join(f"{split + ' n':>9}{'const':>7}{'tmpl':>7}" for split in splits)
    lines = [header, "-" * len(header)]
    present = {name for split in splits for name in summary["splits"][split]["chance"]}
    names = [f"{m} {t}" for m, t in TYPES if f"{m} {t}" in present] + ["all"]
    for name in names:
        row = f"{name:<26}"
        for split in splits:
            entry = summary["splits"][split]["chance"].get(name)
            row += (
                f"{entry['questions']:>9}{entry['constant']:>7.0%}{entry['per_template']:>7.0%}"
                if entry
                else f"{'-':>9}{'':>14}"
            )
        lines.append(row)
    lines.append(
        "const: one constant answer per type; tmpl: one constant answer per template (media ignored; both the best "
        "constants for the split itself, so small splits read high)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The whole dataset
# ---------------------------------------------------------------------------------------------------------------
def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` unless the file already holds it (a rerun then touches nothing); atomic via rename."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return True


def _to_json(data: Any) -> str:
    # As the release: indent 2, ASCII only (the full-width question mark becomes \uff1f).
    return json.dumps(data, indent=2, ensure_ascii=True) + "\n"


def generate(
    out: str | Path,
    *,
    num_videos: int = 48,
    val_videos: int = 8,
    test_videos: int = 8,
    questions_per_video: int = 9,
    questions: str = "demo",
    settings: MediaSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the dataset under ``out`` (see the module docstring) and return the summary (also in
    ``summary.json``) with ``written`` added: how many videos and files this call wrote or skipped."""
    settings = settings or MediaSettings()
    if questions not in QUESTION_SETS:
        raise ValueError(f"questions must be one of {sorted(QUESTION_SETS)}, got {questions!r}")
    if not 1 <= settings.instruments <= len(INSTRUMENTS):
        raise ValueError(f"instruments must be 1..{len(INSTRUMENTS)}, got {settings.instruments}")
    if settings.instruments < 3:
        raise ValueError("instruments must be at least 3 (two in view and one off screen)")
    if num_videos < 1 or val_videos < 0 or test_videos < 0 or val_videos + test_videos >= num_videos:
        raise ValueError(
            f"need num_videos >= 1 with val + test < num_videos, got {num_videos}, {val_videos}, {test_videos}"
        )
    if questions_per_video < 1:
        raise ValueError(f"questions_per_video must be at least 1, got {questions_per_video}")
    if settings.size % 16 or settings.size < 16:
        raise ValueError(
            f"size must be a multiple of 16 (H.264 macroblocks, halves on patch columns), got {settings.size}"
        )
    if settings.seconds <= 0 or settings.fps < 1 or settings.sample_rate < 2 * max(i.tone for i in INSTRUMENTS) + 1:
        raise ValueError(f"bad media settings {settings}")

    out = Path(out)
    videos_dir, annotations_dir = out / VIDEO_DIR, out / ANNOTATION_DIR
    settings_text = _to_json(asdict(settings))
    settings_path = out / SETTINGS_FILE
    theirs = sorted(annotations_dir.glob("avqa-*.json")) if annotations_dir.is_dir() else []
    if theirs and not settings_path.is_file():  # MUSIC-AVQA's own layout, and no sign this script made it
        raise ValueError(
            f"{out} holds annotations ({theirs[0]}) that this script did not write (no {SETTINGS_FILE}): a real "
            "MUSIC-AVQA copy? Choose another --out (nothing is overwritten)"
        )
    if settings_path.is_file() and settings_path.read_text(encoding="utf-8") != settings_text and not overwrite:
        raise ValueError(
            f"{out} holds demo data made with other media settings ({settings_path}); pass --overwrite to rebuild "
            f"it or choose another --out"
        )
    if overwrite and videos_dir.is_dir():
        for path in videos_dir.iterdir():  # only the files this script names, never anything else
            if _VIDEO_NAME.fullmatch(path.name) or path.name.endswith(".mp4.partial"):
                path.unlink()
    videos_dir.mkdir(parents=True, exist_ok=True)
    annotations_dir.mkdir(parents=True, exist_ok=True)
    files_written = int(_write_if_changed(settings_path, settings_text))

    palette = [instrument.name for instrument in INSTRUMENTS[: settings.instruments]]
    num_train = num_videos - val_videos - test_videos
    split_of = ["train"] * num_train + ["val"] * val_videos + ["test"] * test_videos
    scenes = [sample_scene(index, settings) for index in range(1, num_videos + 1)]

    started = time.perf_counter()
    written = skipped = 0
    for scene in tqdm(scenes, desc="demo videos", unit="video", disable=not progress):
        path = videos_dir / f"{scene.video_id}.mp4"
        if path.is_file():
            skipped += 1
            continue
        write_video(path, render_frame(scene, settings.size), render_audio(scene, settings.sample_rate), settings)
        written += 1
    video_seconds = time.perf_counter() - started

    question_id = 0
    splits: dict[str, Any] = {}
    for split_index, split in enumerate(SPLITS):
        # One balancer per split: each split is balanced on its own, so val and test chance levels hold too.
        balancer = Balancer(
            np.random.default_rng([settings.seed, 7919, split_index]), palette, QUESTION_SETS[questions]
        )
        records = []
        split_scenes = [scene for scene, name in zip(scenes, split_of, strict=True) if name == split]
        for scene in split_scenes:
            for template, values, answer in balancer.choose(scene, questions_per_video):
                question_id += 1
                records.append(annotation(scene, question_id, template, values, answer))
        files_written += _write_if_changed(annotations_dir / f"avqa-{split}.json", _to_json(records))
        splits[split] = {
            "videos": [scene.video_id for scene in split_scenes],
            "questions": len(records),
            "chance": chance_report(records),
        }

    summary = {
        "settings": asdict(settings),
        "num_videos": num_videos,
        "questions_per_video": questions_per_video,
        "question_set": questions,
        "instruments": [asdict(instrument) for instrument in INSTRUMENTS[: settings.instruments]],
        "templates": [
            {"type": [t.modality, t.qtype], "question_content": t.content, "official": t.official}
            for t in QUESTION_SETS[questions]
        ],
        "splits": splits,
        "scenes": {scene.video_id: asdict(scene) for scene in scenes},
    }
    files_written += _write_if_changed(out / SUMMARY_FILE, _to_json(summary))
    summary["written"] = {
        "videos": written,
        "videos_skipped": skipped,
        "files": files_written,
        "video_seconds": round(video_seconds, 3),
    }
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = MediaSettings()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--out",
        default=os.environ.get("MOKA_DEMO_DATA", "demo_data"),
        help="dataset folder (default: $MOKA_DEMO_DATA, else ./demo_data; what configs/data/demo.yaml reads)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-videos", type=int, default=48)
    parser.add_argument("--val-videos", type=int, default=8)
    parser.add_argument("--test-videos", type=int, default=8, help="the rest of --num-videos is train")
    parser.add_argument("--questions-per-video", type=int, default=9, help="9: one per question type where it fits")
    parser.add_argument(
        "--questions",
        choices=sorted(QUESTION_SETS),
        default="demo",
        help="demo: one fixed question per type, learnable in CPU minutes (the default); musicavqa: 23 official "
        "MUSIC-AVQA templates and a visual Where, in all nine types",
    )
    parser.add_argument(
        "--instruments", type=int, default=defaults.instruments, help=f"palette size, 3..{len(INSTRUMENTS)}"
    )
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--fps", type=int, default=defaults.fps)
    parser.add_argument("--size", type=int, default=defaults.size, help="frame side in pixels (multiple of 16)")
    parser.add_argument("--sample-rate", type=int, default=defaults.sample_rate)
    parser.add_argument("--overwrite", action="store_true", help="rebuild everything instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line: generate, print what was written and the chance table; returns the summary."""
    args = parse_args(argv)
    settings = MediaSettings(
        seed=args.seed,
        instruments=args.instruments,
        seconds=args.seconds,
        fps=args.fps,
        size=args.size,
        sample_rate=args.sample_rate,
    )
    started = time.perf_counter()
    try:
        summary = generate(
            args.out,
            num_videos=args.num_videos,
            val_videos=args.val_videos,
            test_videos=args.test_videos,
            questions_per_video=args.questions_per_video,
            questions=args.questions,
            settings=settings,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ValueError as error:
        raise SystemExit(f"make_demo_data: {error}") from None
    written = summary["written"]
    counts = ", ".join(f"{split} {summary['splits'][split]['questions']}" for split in SPLITS)
    print(
        f"{args.out}: {written['videos']} videos written, {written['videos_skipped']} already there, "
        f"{written['files']} annotation/summary files written; questions: {counts} "
        f"({time.perf_counter() - started:.1f} s)"
    )
    print(format_chance(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
