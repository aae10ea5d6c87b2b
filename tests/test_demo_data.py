"""The synthetic demo set (data_prep/make_demo_data.py): the real MUSIC-AVQA builder reads it, and its answers
are in its media.

The central check decodes every video with the project's own readers (``read_video_frames``, ``read_audio``)
and answers every question again from what it finds there alone: the colour on each side of the frame names
the instrument in view, the amplitude of each instrument's tone over time says what sounds, when and how
loud. That perception and the answer rules written here from the question wording are independent of the
generator's code; both must agree with the annotation on every question. A second check takes the FFT of each
of the ten audio windows the model will see and finds the tone the generator's scene says dominates there.
Then: the answers are balanced (a constant answer per type or per template stays near chance), runs are
deterministic, a rerun writes nothing, the CLI and configs/data/demo.yaml work."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moka_train.data.datasets.music_avqa import ANSWERS, QUESTION_TYPES, build_music_avqa
from moka_train.data.media import MediaLoader, cut_windows, read_audio, read_video_frames

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
SPEC = importlib.util.spec_from_file_location("make_demo_data", ROOT / "data_prep" / "make_demo_data.py")
demo = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = demo  # dataclasses look their module up while the file executes
SPEC.loader.exec_module(demo)

RATE = 16000
SMALL = dict(num_videos=6, val_videos=1, test_videos=1, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The default-size set (48 videos, the demo question set): what the demo and the config read."""
    root = tmp_path_factory.mktemp("demo")
    return root, demo.generate(root, progress=False)


@pytest.fixture(scope="module")
def musicavqa_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The same videos asked MUSIC-AVQA's templates, in all nine types."""
    root = tmp_path_factory.mktemp("demo_musicavqa")
    return root, demo.generate(root, questions="musicavqa", progress=False)


def load(root: Path, split: str) -> list[dict]:
    return json.loads((root / "json_update" / f"avqa-{split}.json").read_text(encoding="utf-8"))


# -- perception: what a decoded file shows and plays --------------------------------------------------------------
@dataclass
class Heard:
    onset: float  # seconds
    offset: float
    level: float  # median tone amplitude while it sounds


@dataclass
class Perceived:
    seconds: float
    visible: dict[str, str | None]  # side -> instrument seen there
    heard: dict[str, Heard]  # instrument -> its tone's activity

    @property
    def shown(self) -> list[str]:
        return [name for name in self.visible.values() if name is not None]

    def side_of(self, name: str) -> str | None:
        return next((side for side, shown in self.visible.items() if shown == name), None)

    def order(self) -> list[str]:
        """Heard instruments by onset; a list of one when two start together (no order)."""
        names = sorted(self.heard, key=lambda n: self.heard[n].onset)
        if len(names) == 2 and abs(self.heard[names[0]].onset - self.heard[names[1]].onset) < 0.3:
            return []
        return names

    def always(self, name: str) -> bool:
        heard = self.heard.get(name)
        return heard is not None and heard.onset < 0.2 and heard.offset > self.seconds - 0.2

    def louder(self, a: str, b: str) -> bool:
        return self.heard[a].level > self.heard[b].level


PALETTE = {instrument.name: instrument for instrument in demo.INSTRUMENTS}


def nearest_instrument(colour: np.ndarray) -> str:
    distances = {name: np.abs(np.array(i.colour) - colour).sum() for name, i in PALETTE.items()}
    name = min(distances, key=distances.get)
    assert distances[name] < 60, f"colour {colour} is no instrument's"
    return name


def perceive(path: Path) -> Perceived:
    frames = read_video_frames(path, 10)
    assert (np.abs(frames.astype(int) - frames[0].astype(int)) <= 3).all(), "the picture is static"
    frame, half = frames[0], frames.shape[2] // 2
    visible: dict[str, str | None] = {}
    for side, part in (("left", frame[:, :half]), ("right", frame[:, half:])):
        bright = part[part.max(axis=-1) > 120]  # the background is dark grey, every instrument has a bright channel
        visible[side] = nearest_instrument(np.median(bright, axis=0)) if len(bright) > 40 else None

    audio = read_audio(path, RATE)
    hop = RATE // 10  # 0.1 s frames, Hann-windowed: a tone's amplitude in each
    blocks = audio[: len(audio) // hop * hop].reshape(-1, hop) * np.hanning(hop)
    t = np.arange(hop) / RATE
    heard = {}
    for name, instrument in PALETTE.items():
        amplitude = 2 * np.abs(blocks @ np.exp(-2j * np.pi * instrument.tone * t)) / np.hanning(hop).sum()
        active = np.nonzero(amplitude > 0.05)[0]  # soft tones are >= 0.10, leakage from others << 0.01
        if len(active):
            heard[name] = Heard(active[0] * 0.1, (active[-1] + 1) * 0.1, float(np.median(amplitude[active])))
    return Perceived(seconds=4.0, visible=visible, heard=heard)


# -- answering from perception: the question wording, read independently of the generator ----------------------
NUMBER = ["zero", "one", "two", "three", "four"]


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _temporal_instrument(p: Perceived, v: list[str]) -> str:
    order = p.order()
    return order[0] if len(p.heard) == 1 else order[{"first": 0, "second": 1}[v[0]]]


def _before_after(p: Perceived, v: list[str]) -> str:
    first, last = p.order()
    return {("before", last): first, ("after", first): last}[v[0], v[1]]


ANSWER: dict[str, Callable[[Perceived, list[str]], str]] = {
    "How many musical instruments were heard throughout the video?": lambda p, v: NUMBER[len(p.heard)],
    "Is there a <Object> sound?": lambda p, v: yes(v[0] in p.heard),
    "Are there <Object> and <Object> sound? ": lambda p, v: yes(v[0] in p.heard and v[1] in p.heard),
    "Is the <Object> louder than the <Object>?": lambda p, v: yes(p.louder(v[0], v[1])),
    "How many types of musical instruments appeared in the entire video?": lambda p, v: NUMBER[len(p.shown)],
    "Is there a <Object> in the entire video?": lambda p, v: yes(v[0] in p.shown),
    "Are there <Object> and <Object> instruments in the video?": lambda p, v: yes(v[0] in p.shown and v[1] in p.shown),
    "How many <Object> are in the entire video?": lambda p, v: NUMBER[p.shown.count(v[0])],
    "What kind of musical instrument is it?": lambda p, v: p.shown[0] if len(p.shown) == 1 else "?",
    "What kind of instrument is the <LRer> instrument? ": lambda p, v: p.visible[v[0].removesuffix("est")] or "?",
    "Where is the <Object>?": lambda p, v: p.side_of(v[0]) or "?",
    "Is the <Object> in the video always playing?": lambda p, v: yes(p.always(v[0])),
    "Is this sound from the instrument in the video?": lambda p, v: yes(all(n in p.shown for n in p.heard)),
    "How many instruments are sounding in the video?": lambda p, v: NUMBER[sum(n in p.heard for n in p.shown)],
    "How many instruments in the video did not sound from beginning to end?": (
        lambda p, v: NUMBER[sum(n not in p.heard for n in p.shown)]
    ),
    "How many sounding <Object> in the video\uff1f": lambda p, v: NUMBER[int(v[0] in p.shown and v[0] in p.heard)],
    "Where is the <LL> instrument?": lambda p, v: p.side_of(max(p.heard, key=lambda n: p.heard[n].level)) or "?",
    "Is the <FL> sound coming from the <LR> instrument?": (
        lambda p, v: yes(p.side_of(p.order()[{"first": 0, "last": -1}[v[0]]]) == v[1])
    ),
    "Which is the musical instrument that sounds at the same time as the <Object>?": (
        lambda p, v: next(n for n in p.heard if n != v[0]) if not p.order() else "?"
    ),
    "Is the instrument on the <LR> louder than the instrument on the <LR>?": (
        lambda p, v: yes(p.louder(p.visible[v[0]], p.visible[v[1]]))
    ),
    "Is the <Object> on the <LR> louder than the <Object> on the <LR>?": (
        lambda p, v: yes(p.louder(v[0], v[2])) if (p.side_of(v[0]), p.side_of(v[2])) == (v[1], v[3]) else "?"
    ),
    "Where is the <FL> sounding instrument?": lambda p, v: p.side_of(p.order()[{"first": 0, "last": -1}[v[0]]]),
    "Which instrument makes sounds <BA> the <Object>?": _before_after,
    "What is the <TH> instrument that comes in?": _temporal_instrument,
    # The demo set's own audio-visual questions
    "Are there two instruments in the video and two sounds?": lambda p, v: yes(len(p.shown) == 2 and len(p.heard) == 2),
    "How many instruments and sounds are there in all?": lambda p, v: NUMBER[len(p.shown) + len(p.heard)],
    "Are there more instruments in the video than sounds?": lambda p, v: yes(len(p.shown) > len(p.heard)),
}


# The demo set asks six types (three of them audio-visual); the MUSIC-AVQA set all nine.
DEMO_TYPES = {
    ("Audio", "Counting"),
    ("Visual", "Counting"),
    ("Visual", "Location"),
    ("Audio-Visual", "Existential"),
    ("Audio-Visual", "Counting"),
    ("Audio-Visual", "Comparative"),
}
ALL_TYPES = {(m, t) for m, types in QUESTION_TYPES.items() for t in types}


@pytest.mark.parametrize("dataset, types", [("data", DEMO_TYPES), ("musicavqa_data", ALL_TYPES)])
def test_every_answer_is_in_the_media(request, dataset, types):
    root, summary = request.getfixturevalue(dataset)
    perceived: dict[str, Perceived] = {}
    checked: Counter = Counter()
    for split in demo.SPLITS:
        for record in build_music_avqa(root, split):
            meta = record.metadata
            video = meta["video_id"]
            if video not in perceived:
                perceived[video] = perceive(root / "MUSIC-AVQA-Videos" / f"{video}.mp4")
            answer = ANSWER[meta["question_content"]](perceived[video], meta["templ_values"])
            assert answer == meta["answer"], f"{record.id} {meta['question']!r}: media say {answer!r}"
            checked[meta["question_modality"], meta["question_type"]] += 1
    # Every video gets questions under MUSIC-AVQA's templates; the demo set's seven leave a few without.
    assert len(perceived) >= 0.9 * summary["num_videos"]
    assert set(checked) == types
    assert min(checked.values()) >= 20


def test_perception_matches_the_scenes(data):
    """What the decoded files show equals the scene the generator recorded (summary.json)."""
    root, summary = data
    for video, scene in list(summary["scenes"].items())[:12]:
        p = perceive(root / "MUSIC-AVQA-Videos" / f"{video}.mp4")
        assert p.visible == scene["visible"]
        assert sorted(p.heard) == sorted(source["instrument"] for source in scene["sources"])
        for source in scene["sources"]:
            heard = p.heard[source["instrument"]]
            assert heard.onset == pytest.approx(source["start"], abs=0.11)
            assert heard.offset == pytest.approx(source["end"], abs=0.11)
            assert heard.level == pytest.approx(source["amplitude"], rel=0.1)


def test_audio_windows_carry_the_dominant_tone(data):
    """Each of the ten 2 s windows the audio encoder sees peaks (FFT) at the tone of the source with the most
    energy in it (amplitude x seconds inside the window), within the FFT's 0.5 Hz bins; silent windows are
    silent."""
    root, summary = data
    tones = {name: i.tone for name, i in PALETTE.items()}
    checked = 0
    for video, scene in list(summary["scenes"].items())[:16]:
        audio = read_audio(root / "MUSIC-AVQA-Videos" / f"{video}.mp4", RATE)
        windows = cut_windows(audio, RATE, "music_avqa")
        assert windows.shape == (10, 2 * RATE)
        for k, window in enumerate(windows):
            start = k * len(audio) // 10 / RATE - 0.5
            energy = {
                s["instrument"]: s["amplitude"] * max(0.0, min(s["end"], start + 2) - max(s["start"], start))
                for s in scene["sources"]
            }
            ranked = [*sorted(energy.values(), reverse=True), 0.0]
            if ranked[0] == 0:
                assert np.abs(window).max() < 1e-2, f"{video} window {k} should be silent"
                continue
            if ranked[1] > ranked[0] / 1.5:
                continue  # too close to call
            spectrum = np.abs(np.fft.rfft(window * np.hanning(len(window))))
            peak = np.argmax(spectrum) * RATE / len(window)
            assert peak == pytest.approx(tones[max(energy, key=energy.get)], abs=1.0), f"{video} window {k}"
            checked += 1
    assert checked >= 80


@pytest.mark.parametrize("dataset, per_video", [("data", (3, 6)), ("musicavqa_data", (8, 9))])
def test_the_builder_reads_it(request, dataset, per_video):
    root, summary = request.getfixturevalue(dataset)
    videos = {}
    for split in demo.SPLITS:
        records = build_music_avqa(root, split)
        assert len(records) == summary["splits"][split]["questions"] == len(load(root, split)) > 0
        assert all(r.metadata["answer"] in ANSWERS for r in records)
        assert all(r.id.startswith(f"music_avqa/{split}/") for r in records)
        assert all(r.messages[-1] == {"role": "assistant", "content": r.metadata["answer"]} for r in records)
        assert all("<" not in r.metadata["question"] for r in records)
        videos[split] = {r.metadata["video_id"] for r in records}
        assert videos[split] <= set(summary["splits"][split]["videos"])
    assert tuple(len(summary["splits"][split]["videos"]) for split in demo.SPLITS) == (32, 8, 8)
    assert not (videos["train"] & videos["val"] or videos["train"] & videos["test"] or videos["val"] & videos["test"])
    questions = sum(summary["splits"][split]["questions"] for split in demo.SPLITS)
    assert 48 * per_video[0] <= questions <= 48 * per_video[1]
    ids = [r["question_id"] for split in demo.SPLITS for r in load(root, split)]
    assert len(set(ids)) == len(ids)


def test_annotations_follow_the_official_schema(data):
    root, _ = data
    records = load(root, "train")
    fields = ["video_id", "question_id", "type", "question_content", "templ_values", "question_deleted", "anser"]
    for record in records:
        assert list(record) == fields
        assert len(record["video_id"]) == 8 and record["video_id"].isdigit()
        assert isinstance(json.loads(record["type"]), list) and isinstance(json.loads(record["templ_values"]), list)
        assert record["question_deleted"] == 0
    text = (root / "json_update" / "avqa-train.json").read_text(encoding="utf-8")
    assert text.isascii() and '"type": "[\\"' in text  # type as JSON text, ASCII-escaped like the release
    if any(r["question_content"].endswith("\uff1f") for r in records):  # the full-width "?" of one template
        assert "in the video\\uff1f" in text


@pytest.mark.parametrize("dataset, best_constant", [("data", 0.5), ("musicavqa_data", 0.45)])
def test_answers_are_balanced(request, dataset, best_constant):
    """No type lets one constant answer score above 60 %; per template the best constant is near 1/answers."""
    root, summary = request.getfixturevalue(dataset)
    records = [r for split in demo.SPLITS for r in load(root, split)]
    report = demo.chance_report(records)
    for name, entry in report.items():
        if name != "all":
            assert entry["constant"] <= 0.6, (name, entry)
    by_template: dict[str, Counter] = {}
    for record in records:
        by_template.setdefault(record["question_content"], Counter())[record["anser"]] += 1
    for template, answers in by_template.items():
        # The balancer keeps every template's answers within one of each other (per split: 3 splits).
        assert max(answers.values()) - min(answers.values()) <= 3 or len(answers) == 1, (template, answers)
    assert summary["splits"]["train"]["chance"]["all"]["constant"] < best_constant


def test_chance_report_by_hand():
    records = [
        {"type": '["Audio", "Counting"]', "question_content": "A", "anser": a} for a in ["one", "one", "two", "yes"]
    ] + [{"type": '["Audio", "Counting"]', "question_content": "B", "anser": "yes"}]
    report = demo.chance_report(records)
    assert report["Audio Counting"] == {
        "questions": 5,
        "answers": {"one": 2, "two": 1, "yes": 2},
        "constant": 0.4,  # "one" (or "yes"): 2 of 5
        "per_template": 0.6,  # "one" for A (2), "yes" for B (1)
    }
    assert report["all"] == {"questions": 5, "constant": 0.4, "per_template": 0.6}


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    first = demo.generate(tmp_path / "a", **SMALL)
    second = demo.generate(tmp_path / "b", **SMALL)
    for split in demo.SPLITS:
        assert load(tmp_path / "a", split) == load(tmp_path / "b", split)
    assert first["scenes"] == second["scenes"]
    for video in first["scenes"]:
        path_a, path_b = (tmp_path / d / "MUSIC-AVQA-Videos" / f"{video}.mp4" for d in "ab")
        assert np.array_equal(read_video_frames(path_a, 10), read_video_frames(path_b, 10))
        assert np.array_equal(read_audio(path_a), read_audio(path_b))
    other = demo.generate(tmp_path / "c", settings=demo.MediaSettings(seed=1), **SMALL)
    assert other["scenes"] != first["scenes"]
    # A video's scene depends on (seed, index) only: a larger set starts with the same videos.
    larger = demo.generate(tmp_path / "d", num_videos=9, val_videos=1, test_videos=1, progress=False)
    assert all(larger["scenes"][video] == scene for video, scene in first["scenes"].items())


def test_rerun_writes_nothing_and_resumes(tmp_path):
    out = tmp_path / "demo"
    small = {**SMALL, "questions": "musicavqa"}  # enough templates that 12 questions per video differ from 9
    first = demo.generate(out, **small)
    assert first["written"]["videos"] == 6 and first["written"]["files"] == 5
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}
    again = demo.generate(out, **small)
    assert again["written"] == {**again["written"], "videos": 0, "videos_skipped": 6, "files": 0}
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()} == stamps
    # A killed run leaves a missing video (and perhaps a .partial file): the next run writes only that one.
    (out / "MUSIC-AVQA-Videos" / "00000003.mp4").unlink()
    (out / "MUSIC-AVQA-Videos" / "00000003.mp4.partial").write_bytes(b"cut off")
    resumed = demo.generate(out, **small)
    assert (resumed["written"]["videos"], resumed["written"]["files"]) == (1, 0)
    assert not (out / "MUSIC-AVQA-Videos" / "00000003.mp4.partial").exists()
    assert read_video_frames(out / "MUSIC-AVQA-Videos" / "00000003.mp4", 10).shape == (10, 64, 64, 3)
    # More questions per video: the videos stay, the annotations change.
    more = demo.generate(out, **{**small, "questions_per_video": 12})
    assert more["written"]["videos"] == 0 and more["written"]["files"] == 4  # 3 splits + summary
    # Another question set: the same videos, other annotations.
    switched = demo.generate(out, **SMALL)
    assert switched["written"]["videos"] == 0 and switched["written"]["files"] == 4
    assert switched["question_set"] == "demo" and {t["question_content"] for t in switched["templates"]} == {
        t.content for t in demo.DEMO_TEMPLATES
    }


def test_other_media_settings_need_overwrite(tmp_path):
    out = tmp_path / "demo"
    demo.generate(out, **SMALL)
    (out / "MUSIC-AVQA-Videos" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ValueError, match="other media settings.*--overwrite"):
        demo.generate(out, settings=demo.MediaSettings(seed=3), **SMALL)
    rebuilt = demo.generate(out, settings=demo.MediaSettings(seed=3), overwrite=True, **SMALL)
    assert rebuilt["written"]["videos"] == 6
    assert (out / "MUSIC-AVQA-Videos" / "notes.txt").exists()  # only the generator's own files are removed
    assert json.loads((out / "demo_settings.json").read_text(encoding="utf-8"))["seed"] == 3


def test_a_real_music_avqa_copy_is_never_overwritten(tmp_path):
    """--out pointing at a MUSIC-AVQA copy (the same layout, no demo_settings.json): refused, the annotations
    untouched (they were replaced by demo questions)."""
    out = tmp_path / "MUSIC-AVQA"
    (out / "json_update").mkdir(parents=True)
    real = out / "json_update" / "avqa-train.json"
    real.write_text('[{"real": "annotation"}]', encoding="utf-8")
    with pytest.raises(ValueError, match="holds annotations .*avqa-train.json.* that this script did not write"):
        demo.generate(out, **SMALL)
    assert real.read_text(encoding="utf-8") == '[{"real": "annotation"}]'


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_videos=4, val_videos=2, test_videos=2), "val \\+ test < num_videos"),
        (dict(questions_per_video=0), "questions_per_video"),
        (dict(settings=demo.MediaSettings(instruments=2)), "at least 3"),
        (dict(settings=demo.MediaSettings(instruments=9)), "instruments must be"),
        (dict(settings=demo.MediaSettings(size=40)), "multiple of 16"),
        (dict(settings=demo.MediaSettings(sample_rate=4000)), "bad media settings"),
    ],
)
def test_bad_options(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        demo.generate(tmp_path, **{**SMALL, **kwargs})


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    summary = demo.main(["--out", str(out), "--num-videos", "8", "--val-videos", "2", "--test-videos", "2"])
    assert summary["written"]["videos"] == 8
    printed = capsys.readouterr().out
    assert "8 videos written" in printed and "Audio-Visual Counting" in printed and "const" in printed
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["splits"]["val"]["videos"] == [
        "00000005",
        "00000006",
    ]
    with pytest.raises(SystemExit, match="other media settings"):
        demo.main(["--out", str(out), "--num-videos", "8", "--val-videos", "2", "--test-videos", "2", "--seed", "5"])


def test_larger_palette(tmp_path):
    summary = demo.generate(tmp_path, settings=demo.MediaSettings(instruments=8), **{**SMALL, "num_videos": 12})
    assert len(summary["instruments"]) == 8
    for video in list(summary["scenes"])[:6]:
        p = perceive(tmp_path / "MUSIC-AVQA-Videos" / f"{video}.mp4")
        scene = summary["scenes"][video]
        assert p.visible == scene["visible"]
        assert sorted(p.heard) == sorted(s["instrument"] for s in scene["sources"])


# -- the config and the loader ----------------------------------------------------------------------------------
def test_config_builds_the_demo(data, monkeypatch):
    root, summary = data
    monkeypatch.setenv("MOKA_DEMO_DATA", str(root))
    with initialize_config_dir(version_base=None, config_dir=str(CONFIGS)):
        cfg = compose(overrides=["+data=demo"])
        explicit = compose(overrides=["+data=demo", "data.builder.split=test", f"data.builder.root={root}"])
    assert cfg.data.builder.root == str(root)  # the default root follows $MOKA_DEMO_DATA
    assert (cfg.data.media.frames, cfg.data.media.audio_windows) == (10, "music_avqa")
    records = instantiate(cfg.data.builder)
    assert len(records) == summary["splits"]["train"]["questions"]
    assert records[0].messages[-1]["content"] == records[0].metadata["answer"]  # target_format: word
    assert len(instantiate(explicit.data.builder)) == summary["splits"]["test"]["questions"]

    loader = MediaLoader(**cfg.data.media)
    visual, audio = (loader.load(ref) for ref in records[0].media)
    assert tuple(visual.shape) == (10, 3, 64, 64) and tuple(audio.shape) == (10, 2 * RATE)
    monkeypatch.delenv("MOKA_DEMO_DATA")
    with initialize_config_dir(version_base=None, config_dir=str(CONFIGS)):
        assert compose(overrides=["+data=demo"]).data.builder.root == "demo_data"


def test_generation_is_quick(data):
    # 48 videos are written in well under the few seconds the demo may spend (about 1 s on one CPU core).
    assert data[1]["written"]["video_seconds"] < 10
