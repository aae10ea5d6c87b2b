"""Media extraction on a MUSIC-AVQA-layout folder of real mp4s (written with PyAV, each with an AAC track) plus a
truncated one: every good file's frames and sound track are stored once, the corrupt one is reported and the
rest done, a rerun does nothing, leftovers of a killed run are ignored, and a ``MediaLoader`` reading the
extracted files gives exactly the tensors of decoding. Other settings (a frame count, a changed source) are
never served a mismatched file. The Hydra command runs end to end."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from moka_train.data import extraction
from moka_train.data.datasets.music_avqa import build_music_avqa
from moka_train.data.extraction import extract_media, extracted_path, item_settings
from moka_train.data.media import MediaLoader
from moka_train.data.records import MediaRef, Record
from tests.test_media import write_video

ROOT = Path(__file__).parents[1]
MEDIA = {"frames": 10, "audio_windows": "music_avqa"}
GOOD = ["00000001", "00000002", "00000003"]
CORRUPT = "00000009"


@pytest.fixture(scope="module")
def avqa_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MUSIC-AVQA folder (benchmarks.md §1): json_update/avqa-test.json and MUSIC-AVQA-Videos/<id>.mp4; three
    good videos of different lengths and tones, and one cut in half (its moov index lost), all with questions."""
    root = tmp_path_factory.mktemp("MUSIC-AVQA")
    videos = root / "MUSIC-AVQA-Videos"
    videos.mkdir()
    (root / "json_update").mkdir()
    for index, video_id in enumerate(GOOD):
        write_video(videos / f"{video_id}.mp4", num_frames=13 + 11 * index, tone=330.0 * (index + 1))
    data = (videos / f"{GOOD[0]}.mp4").read_bytes()
    (videos / f"{CORRUPT}.mp4").write_bytes(data[: len(data) // 2])
    rows = [
        {
            "video_id": video_id,
            "question_id": number,
            "type": '["Audio-Visual", "Existential"]',
            "question_content": "Is the <Object> playing?",
            "templ_values": '["cello"]',
            "question_deleted": 0,
            "anser": "yes",
        }
        for number, video_id in enumerate([*GOOD, GOOD[0], CORRUPT], start=1)  # one video asked about twice
    ]
    (root / "json_update" / "avqa-test.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="module")
def records(avqa_root: Path) -> list[Record]:
    return build_music_avqa(avqa_root, split="test")


def video(avqa_root: Path, video_id: str) -> str:
    return str(avqa_root / "MUSIC-AVQA-Videos" / f"{video_id}.mp4")


def refs_of(records: list[Record], video_ids: list[str]) -> list[MediaRef]:
    """The distinct media items (frames and sound track of each video) of the given videos."""
    items = {(ref.kind, ref.path): ref for record in records for ref in record.media}
    return [ref for (_, path), ref in sorted(items.items()) if Path(path).stem in video_ids]


def assert_same_as_decoding(refs: list[MediaRef], out_dir: Path, **media: object) -> None:
    decoded, extracted = MediaLoader(**media), MediaLoader(**media, extracted_dir=out_dir)
    for ref in refs:
        expected, got = decoded.load(ref), extracted.load(ref)
        assert got.dtype == expected.dtype and torch.equal(got, expected), (ref.kind, ref.path)


def test_extraction_stores_every_good_file_and_reports_the_corrupt_one(avqa_root, records, tmp_path):
    out = tmp_path / "extracted"
    with pytest.warns(UserWarning, match=f"2 media items could not be extracted: .*{CORRUPT}.mp4"):
        report = extract_media(records, out, MEDIA, workers=2)
    # 3 good videos x (frames, sound track); the video asked about twice is extracted once per kind.
    assert (report.extracted, report.already_done, report.not_extracted) == (6, 0, 0)
    corrupt = video(avqa_root, CORRUPT)
    assert [(path, kind) for path, kind, _ in report.failed] == [(corrupt, "audio"), (corrupt, "video")]
    assert all("could not be opened" in error for _, _, error in report.failed)
    assert f"{corrupt} [video]: ValueError" in report.summary()
    assert sorted(Path(d).name for d in report.directories) == ["audio-16000hz", "video-10f"]

    loader = MediaLoader(**MEDIA)
    for video_id in GOOD:
        for kind in ("video", "audio"):
            target = extracted_path(out, video(avqa_root, video_id), item_settings(kind, loader))
            assert target.is_file() and target.name.startswith(f"{video_id}-")
    with np.load(extracted_path(out, video(avqa_root, GOOD[1]), item_settings("video", loader))) as stored:
        assert stored["frames"].shape == (10, 48, 64, 3) and stored["frames"].dtype == np.uint8
        meta = json.loads(str(stored["meta"]))
    assert meta["settings"] == {"kind": "video", "frames": 10, "frame_size": None}
    assert meta["source"]["size"] == os.path.getsize(video(avqa_root, GOOD[1]))
    with np.load(extracted_path(out, video(avqa_root, GOOD[1]), item_settings("audio", loader))) as stored:
        assert stored["audio"].dtype == np.float32 and stored["audio"].ndim == 1  # the whole clip, not windows
        assert abs(len(stored["audio"]) - 24 / 25 * 16000) < 0.05 * 16000  # 24 frames at 25 fps, at 16 kHz
    assert not list(out.rglob("*.tmp"))

    # Resumable: a rerun extracts nothing (the corrupt file is tried again and fails again).
    with pytest.warns(UserWarning, match="could not be extracted"):
        again = extract_media(records, out, MEDIA, workers=2, progress=False)
    assert (again.extracted, again.already_done, len(again.failed)) == (0, 6, 2)

    # Reading the extracted files gives exactly the tensors of decoding: frames and float32 audio windows.
    good = refs_of(records, GOOD)
    assert len(good) == 6
    assert_same_as_decoding(good, out, **MEDIA)
    # The same extraction serves other audio windows (the whole clip is stored) and transforms of the frames.
    assert_same_as_decoding(good, out, frames=10, audio_windows="music_avqa_official")
    assert_same_as_decoding(good, out, frames=10, audio_windows="whole", frames_transform=halve)

    # What was not extracted is an error naming the file looked for, not a silent decode.
    (corrupt_video,) = [ref for ref in refs_of(records, [CORRUPT]) if ref.kind == "video"]
    missing = extracted_path(out, corrupt, item_settings("video", loader))
    with pytest.raises(FileNotFoundError, match=f"no extracted video at {missing}"):
        MediaLoader(**MEDIA, extracted_dir=out).load(corrupt_video)


def halve(frames: np.ndarray) -> torch.Tensor:
    """A frames transform (module level: picklable), uint8 [N, H, W, 3] -> float [N, 3, H/2, W/2]."""
    return torch.from_numpy(frames[:, ::2, ::2]).permute(0, 3, 1, 2).float() / 255


def test_a_killed_run_is_finished_by_the_next(avqa_root, records, tmp_path):
    """A kill leaves at most a .tmp file beside a missing output: nothing reads it, the next run redoes the item."""
    out = tmp_path / "extracted"
    good_records = [r for r in records if CORRUPT not in r.media[0].path]
    assert extract_media(good_records, out, MEDIA, workers=2, progress=False).extracted == 6
    (ref,) = [ref for ref in refs_of(records, [GOOD[2]]) if ref.kind == "video"]
    target = extracted_path(out, ref.path, item_settings("video", MediaLoader(**MEDIA)))
    partial = target.parent / f".{target.name}.4242.deadbeef.tmp"
    partial.write_bytes(target.read_bytes()[:500])  # what a kill mid-write leaves
    target.unlink()
    with pytest.raises(FileNotFoundError, match="no extracted video"):
        MediaLoader(**MEDIA, extracted_dir=out).load(ref)
    report = extract_media(good_records, out, MEDIA, workers=2, progress=False)
    assert (report.extracted, report.already_done, report.failed) == (1, 5, [])
    assert_same_as_decoding([ref], out, **MEDIA)
    # An output cut short (a disk full, a copy interrupted) is unreadable: redone, not served.
    target.write_bytes(target.read_bytes()[:300])
    with pytest.raises(ValueError, match="unreadable"):
        MediaLoader(**MEDIA, extracted_dir=out).load(ref)
    assert extract_media(good_records, out, MEDIA, workers=0, progress=False).extracted == 1
    assert_same_as_decoding([ref], out, **MEDIA)


def test_other_settings_or_a_changed_source_are_never_served(avqa_root, records, tmp_path):
    out = tmp_path / "extracted"
    good_records = [r for r in records if CORRUPT not in r.media[0].path]
    extract_media(good_records, out, MEDIA, workers=2, progress=False)
    (ref,) = [ref for ref in refs_of(records, [GOOD[1]]) if ref.kind == "video"]

    # Another frame count: the loader finds nothing and says which settings exist.
    with pytest.raises(FileNotFoundError, match=r"frames': 8.*extracted under .*\['video-10f'\]"):
        MediaLoader(frames=8, extracted_dir=out).load(ref)
    # Extracting with it adds a directory beside the first (the audio, same sample rate, is already done).
    eight = extract_media(good_records, out, {**MEDIA, "frames": 8}, workers=2, progress=False)
    assert (eight.extracted, eight.already_done) == (3, 3)
    assert_same_as_decoding(refs_of(records, GOOD), out, **{**MEDIA, "frames": 8})
    assert_same_as_decoding(refs_of(records, GOOD), out, **MEDIA)  # the 10-frame files are still there
    # Frame size and sample rate are settings too.
    scaled = {"frames": 4, "frame_size": (24, 32), "sample_rate": 8000, "audio_windows": "ave"}
    assert extract_media(good_records, out, scaled, workers=2, progress=False).extracted == 6
    assert_same_as_decoding(refs_of(records, GOOD), out, **scaled)
    assert {p.name for p in out.iterdir()} == {
        "video-10f",
        "video-8f",
        "video-4f-24x32",
        "audio-16000hz",
        "audio-8000hz",
    }
    assert json.loads((out / "video-4f-24x32" / "settings.json").read_text())["settings"] == {
        "kind": "video",
        "frames": 4,
        "frame_size": [24, 32],
    }

    # A file put where other settings belong (copied by hand) is refused by its recorded settings.
    ten = extracted_path(out, ref.path, item_settings("video", MediaLoader(frames=10)))
    eight_path = extracted_path(out, ref.path, item_settings("video", MediaLoader(frames=8)))
    eight_path.write_bytes(ten.read_bytes())
    with pytest.raises(ValueError, match="not the requested"):
        MediaLoader(frames=8, extracted_dir=out).load(ref)

    # A source replaced after extraction (new mtime): refused on read, extracted again by the next run.
    stat = os.stat(ref.path)
    os.utime(ref.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="changed since it was extracted"):
        MediaLoader(**MEDIA, extracted_dir=out).load(ref)
    again = extract_media(good_records, out, MEDIA, workers=2, progress=False)
    assert (again.extracted, again.already_done) == (2, 4)  # that video's frames and sound track
    assert_same_as_decoding(refs_of(records, [GOOD[1]]), out, **MEDIA)


def test_on_error_error_stops_at_the_corrupt_file(records, tmp_path):
    with pytest.raises(ValueError, match=f"could not extract the (video|audio) of .*{CORRUPT}.mp4"):
        extract_media(records, tmp_path / "extracted", MEDIA, workers=2, on_error="error", progress=False)


def crash_on_one_file(task: extraction._Task) -> np.ndarray:
    """A decoder that kills its process on the second video, as a segfault in FFmpeg or the OOM killer would."""
    if task.kind == "video" and GOOD[1] in task.source:
        os._exit(1)
    return ORIGINAL_DECODE(task)


ORIGINAL_DECODE = extraction._decode


def test_a_worker_that_dies_fails_only_its_file(records, tmp_path, monkeypatch):
    """A dead worker breaks the whole pool; the tasks in flight with it are run again, each alone, so only the
    file that kills its process is reported. (The workers are forked, so they see the patched decoder.)"""
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("only forked workers see the patched decoder")
    monkeypatch.setattr(extraction, "_decode", crash_on_one_file)
    good_records = [r for r in records if CORRUPT not in r.media[0].path]
    with pytest.warns(UserWarning, match="could not be extracted"):
        report = extract_media(good_records, tmp_path / "extracted", MEDIA, workers=2, progress=False)
    assert report.extracted == 5
    assert [(Path(path).stem, kind) for path, kind, _ in report.failed] == [(GOOD[1], "video")]
    assert "worker process died" in report.failed[0][2]


def test_images_and_embedded_bytes_are_read_from_their_source(avqa_root, tmp_path):
    """Only video and audio files are extracted; an image, or media given as bytes, load as before."""
    image = tmp_path / "picture.png"
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(image)
    clip = video(avqa_root, GOOD[0])
    refs = [
        MediaRef("visual", str(image), "image"),
        MediaRef("visual", clip, "video", data=Path(clip).read_bytes()),
    ]
    record = Record("r", [{"role": "user", "content": "<image><video>"}], None, refs)
    report = extract_media([record], tmp_path / "extracted", MEDIA, workers=2, progress=False)
    assert (report.extracted, report.not_extracted) == (0, 2)
    assert_same_as_decoding(refs, tmp_path / "extracted", **MEDIA)


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_error"):
        extract_media([], "unused", MEDIA, on_error="ignore")
    with pytest.raises(ValueError, match="image"):
        extract_media([], "unused", MEDIA, kinds=["image"])
    with pytest.raises(ValueError, match="frames"):
        extract_media([], "unused", {"frames": 0})


def run_command(root: Path, out_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(ROOT / "data_prep" / "extract_media.py"),
        "data=music_avqa",
        f"data.builder.root={root}",
        f"out_dir={out_dir}",
        "workers=2",
        f"hydra.run.dir={out_dir.parent / 'hydra'}",
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_the_hydra_command(avqa_root, records, tmp_path):
    out = tmp_path / "extracted"
    done = run_command(avqa_root, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "6 extracted, 0 already extracted, 2 failed" in done.stdout
    assert f"{video(avqa_root, CORRUPT)} [video]: ValueError" in done.stdout
    assert f"+data.media.extracted_dir={out}" in done.stdout
    assert "extracting media" in done.stderr  # the progress bar
    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "data" / "music_avqa.yaml").media)
    assert preset["frame_size"] == [224, 224]  # the frames are extracted squashed, as the preset reads them
    assert_same_as_decoding(refs_of(records, GOOD), out, **preset)
    # on_error=error: the command fails, naming the corrupt file.
    failed = run_command(avqa_root, tmp_path / "other", "on_error=error")
    assert failed.returncode != 0 and f"{CORRUPT}.mp4" in failed.stderr
