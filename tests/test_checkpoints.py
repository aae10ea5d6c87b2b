"""Run checkpoints: atomic saves (a failure mid-save keeps the previous checkpoint), the last K kept,
explicit resume refused across configurations, and RNG states that replay the same random draws."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from moka_train.training.checkpoints import (
    CheckpointManager,
    checkpoint_meta,
    load_rng,
    read_meta,
    resolve_resume,
    save_rng,
)

CONFIG = {"stage": "instruct", "adapter": {"method": "moka", "rank": 4}, "lr": 1e-4}


def write_weights(value: float):
    def write(directory: Path) -> None:
        (directory / "state").mkdir()
        torch.save({"w": torch.full((2,), value)}, directory / "state" / "weights.pt")

    return write


def test_save_keep_last_and_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None
    for step in (10, 20, 30):
        manager.save(step, checkpoint_meta(CONFIG, epoch=0, batches=step), write_weights(step))
    assert [p.name for p in manager.checkpoints()] == ["step-00000020", "step-00000030"]
    latest = manager.latest()
    assert read_meta(latest)["batches"] == 30 and read_meta(latest)["step"] == 30
    assert torch.equal(torch.load(latest / "state" / "weights.pt")["w"], torch.full((2,), 30.0))


def test_a_failure_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(10, checkpoint_meta(CONFIG), write_weights(10))

    def dies_half_way(directory: Path) -> None:
        write_weights(20)(directory)
        raise KeyboardInterrupt  # a kill between the weights and the meta

    with pytest.raises(KeyboardInterrupt):
        manager.save(20, checkpoint_meta(CONFIG), dies_half_way)
    assert manager.latest().name == "step-00000010"  # the half-written step 20 is never returned
    assert (tmp_path / "checkpoints" / ".staging-step-00000020").is_dir()
    assert resolve_resume("auto", manager, CONFIG) == manager.latest()
    manager.save(20, checkpoint_meta(CONFIG), write_weights(20))
    assert not list((tmp_path / "checkpoints").glob(".staging-*"))  # the next save cleans up
    assert [p.name for p in manager.checkpoints()] == ["step-00000010", "step-00000020"]


def test_saving_a_step_again_replaces_it_whole(tmp_path, monkeypatch):
    """A resumed run re-reaching a saved step: the old folder is renamed away before it is removed, so a kill
    during the removal never leaves a step folder with its meta.json but part of its files."""
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(10, checkpoint_meta(CONFIG), write_weights(1))
    removed = []

    def killed_while_removing(path, *args, **kwargs):
        removed.append(Path(path).name)
        raise KeyboardInterrupt

    monkeypatch.setattr("moka_train.training.checkpoints.shutil.rmtree", killed_while_removing)
    with pytest.raises(KeyboardInterrupt):
        manager.save(10, checkpoint_meta(CONFIG), write_weights(2))
    assert removed == [".staging-replaced-step-00000010"]  # not the step folder itself
    latest = manager.latest()
    assert latest.name == "step-00000010"  # the new save, complete
    assert torch.equal(torch.load(latest / "state" / "weights.pt")["w"], torch.full((2,), 2.0))


def test_resume_is_explicit_and_refuses_another_configuration(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    assert resolve_resume("auto", manager, CONFIG) is None  # nothing yet: a fresh start
    manager.save(5, checkpoint_meta(CONFIG), write_weights(5))
    assert resolve_resume("none", manager, CONFIG) is None
    assert resolve_resume("auto", manager, CONFIG) == manager.latest()
    assert resolve_resume(str(manager.latest()), manager, CONFIG) == manager.latest()
    other = {**CONFIG, "adapter": {"method": "lora", "rank": 4}}
    with pytest.raises(ValueError, match=r"another configuration \(adapter.method: 'moka' -> 'lora'\)"):
        resolve_resume("auto", manager, other)
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / "step-00000099"), manager, CONFIG)
    # A number written as 0 where the saved config had 0.0 is the same setting (it used to be refused with an
    # empty list of differences); True for 1 is not.
    manager.save(6, checkpoint_meta({**CONFIG, "warmup": 0.0, "flag": 1}), write_weights(6))
    assert resolve_resume("auto", manager, {**CONFIG, "warmup": 0, "flag": 1}) == manager.latest()
    with pytest.raises(ValueError, match=r"another configuration \(flag: 1 -> True\); set those back"):
        resolve_resume("auto", manager, {**CONFIG, "warmup": 0, "flag": True})
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointManager(tmp_path, keep_last=0)


def draws() -> list:
    return [random.random(), float(np.random.rand()), float(torch.rand(1))]


def test_rng_states_replay_the_same_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    save_rng(tmp_path, rank=0)
    expected = [draws() for _ in range(3)]
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    load_rng(tmp_path, rank=0)
    assert [draws() for _ in range(3)] == expected
    with pytest.raises(FileNotFoundError, match="rank-00001.pt is missing"):
        load_rng(tmp_path, rank=1)


@pytest.fixture
def ascii_locale():
    """The locale of a bare container or a cluster job without LANG (C, ASCII text by default), in this process;
    the previous one comes back."""
    import locale

    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
            pytest.skip("Python runs in UTF-8 mode here: the locale does not choose the text encoding")
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)


def test_text_files_are_utf8_whatever_the_locale(tmp_path, ascii_locale):
    """A run's config.yaml holds its paths and prompts: a non-ASCII one (a user's home folder, a prompt in
    another language) failed to save under an ASCII locale, or would read back differently under another."""
    from moka_train.checkpoint_io import write_text_atomic
    from moka_train.training.checkpoints import FORMAT_VERSION, META_NAME, read_meta

    text = "root: /data/Müller/MUSIC-AVQA  # 音乐\n"
    with pytest.raises(UnicodeEncodeError):
        (tmp_path / "plain.yaml").write_text(text)  # what the writers did before
    write_text_atomic(tmp_path / "config.yaml", text)
    assert (tmp_path / "config.yaml").read_bytes() == text.encode("utf-8")
    meta = {"format_version": FORMAT_VERSION, "note": "é"}
    (tmp_path / META_NAME).write_bytes(json.dumps(meta, ensure_ascii=False).encode("utf-8"))
    assert read_meta(tmp_path)["note"] == "é"  # read back as UTF-8 too


def test_write_atomic_flushes_the_data_before_the_rename(tmp_path, monkeypatch):
    """The rename may reach the disk before the data does: the file is fsynced first, then renamed."""
    import moka_train.checkpoint_io as checkpoint_io

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".meta.json.")))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(checkpoint_io.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint_io.os, "replace", replace)
    checkpoint_io.write_atomic(tmp_path / "meta.json", lambda tmp: Path(tmp).write_text("{}"))
    assert events == [("fsync", True), ("replace", "meta.json")]
    assert (tmp_path / "meta.json").read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    """A temporary file is owner-only (0600), and the atomic writers renamed it into place as it was: a team's
    jobs under other users could not read a run's trainables or config.yaml. Now: 0666 less the umask."""
    from moka_train.checkpoint_io import write_text_atomic

    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "config.yaml", "seed: 1\n")
        (tmp_path / "plain.yaml").write_text("seed: 1\n")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.yaml").stat().st_mode & 0o777 == expected
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == expected


def test_a_checkpoint_is_on_disk_before_it_is_renamed_and_older_ones_removed(tmp_path, monkeypatch):
    """Files written without the atomic writer (an optimizer state, DeepSpeed's shards) are flushed before the
    staging folder is renamed into place, and the rename before the oldest checkpoint is removed: a machine crash
    cannot leave a checkpoint with its meta.json but empty files, nor none at all."""
    import shutil

    import moka_train.checkpoint_io as checkpoint_io
    import moka_train.training.checkpoints as checkpoints

    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(10, checkpoint_meta(CONFIG), write_weights(10))
    events = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), tmp_path)))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.path.relpath(target, tmp_path)))
        real_replace(source, target)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", os.path.relpath(path, tmp_path)))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io.os, "fsync", fsync)
    monkeypatch.setattr(checkpoints.os, "replace", replace)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", rmtree)
    manager.save(20, checkpoint_meta(CONFIG), write_weights(20))
    staging = "checkpoints/.staging-step-00000020"
    renamed = events.index(("replace", "checkpoints/step-00000020"))
    assert ("fsync", f"{staging}/state/weights.pt") in events[:renamed]
    assert events[renamed + 1 :] == [("fsync", "checkpoints"), ("rmtree", "checkpoints/step-00000010")]


def test_resume_refuses_other_training_data(tmp_path):
    """data_identity: the sample count and a digest of the ids in order; any difference is refused, naming both."""
    from moka_train.training.checkpoints import check_resumed_data, data_identity

    saved = data_identity(["a", "b", "c"])
    assert saved["samples"] == 3
    meta = {"data": saved}
    check_resumed_data(tmp_path, meta, data_identity(["a", "b", "c"]))
    check_resumed_data(tmp_path, {}, data_identity(["x"]))  # a checkpoint that recorded no data: not checked
    for other in (["a", "c", "b"], ["a", "b"], ["a", "b", "d"]):
        with pytest.raises(ValueError, match=r"was saved over other training data \(3 samples"):
            check_resumed_data(tmp_path, meta, data_identity(other))


def test_install_replaces_a_folder_whole(tmp_path):
    """<run_dir>/trainables of an early-stopped run, resumed with more patience, is written anew: the new folder
    replaces the old one whole (an adapter written before a kill used to sit beside the old projectors)."""
    from moka_train.training.checkpoints import install

    final, staging = tmp_path / "trainables", tmp_path / ".staging-trainables"
    final.mkdir()
    (final / "old_only.json").write_text("{}")
    (final / "weights").write_text("old")
    staging.mkdir()
    (staging / "weights").write_text("new")
    install(staging, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainables"]
    assert sorted(p.name for p in final.iterdir()) == ["weights"] and (final / "weights").read_text() == "new"
