"""The feature cache: round trip, keys that follow the file and the configuration, several writers at once,
resuming after a kill, and truncated or corrupted shards named on read."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moka_train.data.caching import fill_feature_caches, open_caches
from moka_train.data.features import FeatureCache, media_key
from moka_train.data.records import MediaRef, Record

CONFIG = {"encoder": "clip", "layer": -2, "frames": 10}


def media_files(directory: Path, count: int) -> list[MediaRef]:
    directory.mkdir(parents=True, exist_ok=True)
    refs = []
    for index in range(count):
        path = directory / f"clip{index:03d}.mp4"
        path.write_bytes(f"media {index}".encode())
        refs.append(MediaRef("visual", str(path), "video"))
    return refs


def features_of(ref: MediaRef) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic features per file, so that any process can compute the expected values."""
    seed = int(Path(ref.path).stem.removeprefix("clip"))
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 5 + seed % 3, 4, generator=generator)
    mask = torch.ones(features.shape[:2], dtype=torch.bool)
    mask[:, -1] = seed % 2 == 0
    return features, mask


def fill(cache_root: str, refs: list[MediaRef], shard_bytes: int = 1 << 20, kill_after_flushes: int | None = None):
    cache = FeatureCache(cache_root, CONFIG)
    with cache.writer(shard_bytes=shard_bytes) as writer:
        for ref in cache.missing(refs):
            writer.add(ref, *features_of(ref))
            if kill_after_flushes is not None and writer._count == kill_after_flushes:
                os.kill(os.getpid(), 9)  # SIGKILL: no cleanup, no final flush


def test_round_trip_and_missing(tmp_path):
    refs = media_files(tmp_path / "media", 6)
    cache = FeatureCache(tmp_path / "cache", CONFIG)
    assert cache.missing(refs + refs[:2]) == refs  # distinct, first-seen order
    with cache.writer(shard_bytes=200) as writer:  # several shards
        for ref in refs[:4]:
            writer.add(ref, *features_of(ref))
    reopened = FeatureCache(tmp_path / "cache", CONFIG)
    assert len(reopened) == 4 and reopened.missing(refs) == refs[4:]
    assert len(list(reopened.directory.glob("shard-*.safetensors"))) > 1
    for ref in refs[:4]:
        features, mask = reopened.get(ref)
        expected_features, expected_mask = features_of(ref)
        assert torch.equal(features, expected_features) and torch.equal(mask, expected_mask)
    with pytest.raises(KeyError, match="clip004.mp4 .visual video. is not in the feature cache"):
        reopened.get(refs[4])
    clone = pickle.loads(pickle.dumps(reopened))  # DataLoader workers get a copy
    assert torch.equal(clone.get(refs[0])[0], features_of(refs[0])[0])


def test_features_without_mask(tmp_path):
    (ref,) = media_files(tmp_path / "media", 1)
    cache = FeatureCache(tmp_path / "cache", CONFIG)
    with cache.writer() as writer:
        writer.add(ref, torch.ones(2, 3, 4))
    features, mask = FeatureCache(tmp_path / "cache", CONFIG).get(ref)
    assert torch.equal(features, torch.ones(2, 3, 4)) and mask is None


def test_keys_follow_the_file_and_the_configuration(tmp_path):
    (ref,) = media_files(tmp_path / "media", 1)
    key = media_key(ref)
    assert media_key(MediaRef("audio", ref.path, "audio")) != key  # the same mp4's sound track
    cache = FeatureCache(tmp_path / "cache", CONFIG)
    with cache.writer() as writer:
        writer.add(ref, *features_of(ref))
    other = FeatureCache(tmp_path / "cache", {**CONFIG, "layer": -1})
    assert other.directory != cache.directory and ref not in other
    Path(ref.path).write_bytes(b"re-encoded, longer file")
    assert media_key(ref) != key and ref not in FeatureCache(tmp_path / "cache", CONFIG)
    embedded = MediaRef("visual", "bench.tsv#3", "image", data=b"jpeg bytes")
    assert media_key(embedded) == media_key(MediaRef("visual", "bench.tsv#3", "image", data=b"jpeg bytes"))
    assert media_key(embedded) != media_key(MediaRef("visual", "bench.tsv#3", "image", data=b"other bytes"))
    with pytest.raises(FileNotFoundError, match="absent.mp4 does not exist"):
        media_key(MediaRef("visual", str(tmp_path / "absent.mp4"), "video"))


def test_concurrent_writers(tmp_path):
    """Three processes fill one cache at once with overlapping work: every key is readable and right."""
    refs = media_files(tmp_path / "media", 12)
    parts = [refs[0:6], refs[4:10], refs[8:12] + refs[:2]]
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=fill, args=(str(tmp_path / "cache"), part, 300)) for part in parts]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    cache = FeatureCache(tmp_path / "cache", CONFIG)
    assert cache.missing(refs) == []
    for ref in refs:
        assert torch.equal(cache.get(ref)[0], features_of(ref)[0])


def test_resume_after_a_kill(tmp_path):
    """A writer killed after two shards keeps them; the rerun computes only the rest."""
    refs = media_files(tmp_path / "media", 10)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from tests.test_feature_cache import fill, media_files
        from pathlib import Path
        fill({str(tmp_path / "cache")!r}, media_files(Path({str(tmp_path / "media")!r}), 10), 200, 2)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    cache = FeatureCache(tmp_path / "cache", CONFIG)
    done = len(refs) - len(cache.missing(refs))
    assert 0 < done < len(refs)
    # A kill between a shard and its manifest, or during a write, leaves files that are never read.
    (cache.directory / "shard-dead-00000.safetensors").write_bytes(b"half a shard")
    (cache.directory / ".shard-dead-00001.safetensors.abc.tmp").write_bytes(b"partial")
    resumed = FeatureCache(tmp_path / "cache", CONFIG)
    todo = resumed.missing(refs)
    assert len(todo) == len(refs) - done
    with resumed.writer() as writer:
        for ref in todo:
            writer.add(ref, *features_of(ref))
    assert writer.written == len(refs) - done
    final = FeatureCache(tmp_path / "cache", CONFIG)
    for ref in refs:
        assert torch.equal(final.get(ref)[1], features_of(ref)[1])


def test_truncated_or_corrupted_shard_is_named(tmp_path):
    refs = media_files(tmp_path / "media", 2)
    cache = FeatureCache(tmp_path / "cache", CONFIG)
    with cache.writer() as writer:
        for ref in refs:
            writer.add(ref, *features_of(ref))
    (shard,) = cache.directory.glob("shard-*.safetensors")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"shard {shard} is {len(data) // 2} bytes, its manifest says {len(data)}"):
        FeatureCache(tmp_path / "cache", CONFIG).get(refs[0])
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # same size, different features
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="does not match the SHA-256 in its manifest"):
        FeatureCache(tmp_path / "cache", CONFIG, verify="sha256").get(refs[0])
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="listed in its manifest but missing"):
        FeatureCache(tmp_path / "cache", CONFIG).get(refs[1])
    (manifest,) = cache.directory.glob("shard-*.json")
    manifest.write_text("{not json")
    with pytest.raises(ValueError, match=f"manifest {manifest} is unreadable"):
        FeatureCache(tmp_path / "cache", CONFIG)


def test_writer_refuses_bad_shapes(tmp_path):
    (ref,) = media_files(tmp_path / "media", 1)
    with FeatureCache(tmp_path / "cache", CONFIG).writer() as writer:
        with pytest.raises(ValueError, match=r"features must be \[segments, tokens, dim\]"):
            writer.add(ref, torch.ones(3, 4))
        with pytest.raises(ValueError, match="mask must be bool"):
            writer.add(ref, torch.ones(1, 3, 4), torch.ones(1, 3))


class _FileFeatures:
    """A SegmentEncoder and MediaSource pair over ``media_files``: the loader returns the file's index and
    the encoder ``features_of`` that index, so the cached values can be checked."""

    hidden_size = 4

    def load(self, ref: MediaRef) -> torch.Tensor:
        return torch.tensor([[int(Path(ref.path).stem.removeprefix("clip"))]])

    def encode_segments(self, media: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [features_of(MediaRef("visual", f"clip{int(index):03d}.mp4", "video")) for index in media[:, 0]]
        return torch.cat([p[0][:1, :5] for p in parts]), torch.cat([p[1][:1, :5] for p in parts])


def test_ranks_that_open_the_cache_at_different_times_cover_every_item(tmp_path):
    """Rank 1 opens the cache after rank 0 has written its shard (ranks start seconds apart, and nothing
    waits between opening and filling): the split must not depend on what is cached, or items go unowned."""
    refs = media_files(tmp_path / "media", 5)
    records = [Record(f"r{i}", [{"role": "user", "content": "<video> q"}], None, [ref]) for i, ref in enumerate(refs)]
    records.append(Record("again", [{"role": "user", "content": "<video> q"}], None, [refs[2]]))  # one item twice
    source = _FileFeatures()
    settings = {"visual": {"encoder": "file-index"}}
    written = []
    for rank in (0, 1):
        caches = open_caches(tmp_path / "cache", settings, {})
        written.append(
            fill_feature_caches(records, {"visual": source}, caches, source, rank=rank, world_size=2).written
        )
    assert written == [3, 2]  # items 0, 2, 4 and 1, 3: each encoded once
    cache = open_caches(tmp_path / "cache", settings, {})["visual"]
    for index, ref in enumerate(refs):
        features, mask = cache.get(ref)
        want = features_of(ref)
        torch.testing.assert_close(features, want[0][:1, :5], msg=f"item {index}")
        assert torch.equal(mask, want[1][:1, :5])


def test_audio_windows_are_fingerprinted_by_the_windows_they_cut(monkeypatch):
    """A preset name and the same windows written out share a cache; a preset whose definition changes (a fix in a
    later version) gets a new one, where its name alone would have kept serving features cut the old way."""
    from moka_train.data import media
    from moka_train.data.caching import cache_config

    encoder = {"encoder": "beats"}
    named = cache_config("audio", encoder, {"frames": 10, "audio_windows": "music_avqa"})
    spelled = {"count": 10, "length": 2.0, "offset": -0.5}
    assert cache_config("audio", encoder, {"frames": 10, "audio_windows": spelled}) == named
    assert named["media"]["audio_windows"] == {**spelled, "anchors": None}
    monkeypatch.setitem(media.WINDOW_PRESETS, "music_avqa", media.AudioWindows(count=10, length=1.0, offset=-0.5))
    assert cache_config("audio", encoder, {"frames": 10, "audio_windows": "music_avqa"}) != named
    with pytest.raises(ValueError, match="unknown audio window preset 'nope'"):
        cache_config("audio", encoder, {"audio_windows": "nope"})


def test_a_modalitys_cache_depends_on_its_own_media_settings_only():
    """MUSIC-AVQA's two presets differ in their audio windows only: their video frames share one visual cache
    (every frame went through CLIP again before). The audio cache ignores frames and frame_size; a default
    written out is the default left out."""
    from moka_train.data.caching import cache_config

    clip, beats = {"encoder": "clip"}, {"encoder": "beats"}
    ours = {"frames": 10, "frame_size": [224, 224], "audio_windows": "music_avqa"}
    official = {"frames": 10, "frame_size": (224, 224), "audio_windows": "music_avqa_official", "sample_rate": 8000}
    assert cache_config("visual", clip, ours) == cache_config("visual", clip, official)
    assert cache_config("visual", clip, ours) != cache_config("visual", clip, {**ours, "frames": 8})
    assert cache_config("visual", clip, ours) != cache_config("visual", clip, {**ours, "frame_size": None})
    assert cache_config("audio", beats, ours) != cache_config("audio", beats, official)
    assert cache_config("audio", beats, ours) == cache_config("audio", beats, {"audio_windows": "music_avqa"})
    assert cache_config("audio", beats, ours) == cache_config("audio", beats, {**ours, "sample_rate": 16000})
    assert cache_config("speech", beats, {"frames": 3}) == cache_config("speech", beats, {"frames": 10})
