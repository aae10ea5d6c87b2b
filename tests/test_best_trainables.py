"""validation.keep_best: the lowest validation loss's trainables kept under a stable path, swapped atomically.
The runs that use it (and their resume) are in tests/test_train_app.py."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest

from moka_train.training.best import BestTrainables
from moka_train.training.checkpoints import CheckpointManager, checkpoint_meta, read_meta

SETTINGS = {"split": "val", "max_samples": None}


def writer(tag: str):
    """A stand-in for save_trainables: one file whose text says which offer wrote it."""

    def write(directory: Path) -> None:
        (directory / "trainables").mkdir()
        (directory / "trainables" / "weights.txt").write_text(tag)

    return write


def kept(best: BestTrainables) -> tuple[str, str, dict]:
    """Where ``best`` points (relative), what its trainables hold, and its record."""
    target = os.readlink(best.link)
    weights = (best.link / "trainables" / "weights.txt").read_text()
    return target, weights, json.loads((best.link / "best.json").read_text())


def test_only_a_strictly_lower_loss_replaces_the_best(tmp_path: Path):
    (tmp_path / "config.yaml").write_text("seed: 42\n")
    best = BestTrainables(tmp_path, SETTINGS)
    offers = [(2, 3.0), (4, 2.0), (6, 2.5), (8, 2.0), (10, 1.0), (12, math.nan)]
    taken = [best.offer(step, loss, writer(f"step {step}")) for step, loss in offers]
    assert taken == [True, True, False, False, True, False]
    target, weights, record = kept(best)
    assert target == "best_steps/step-00000010"  # relative: the run directory can be moved
    assert weights == "step 10"
    assert record == {"step": 10, "val_loss": 1.0, "validation": SETTINGS, "name": "step-00000010"}
    assert best.record == record
    assert (best.link / "config.yaml").read_text() == "seed: 42\n"  # a run directory for evaluate.py and the rest
    assert [p.name for p in best.directory.iterdir()] == ["step-00000010"]  # the earlier bests are gone


def test_an_evaluation_of_a_best_step_outlives_the_step(tmp_path: Path):
    """evaluate.py run_dir=<run_dir>/best writes eval/ into the best step's folder; a lower loss later made the
    folder go whole, the user's scores with it. Now the trainables go and the evaluation stays."""
    best = BestTrainables(tmp_path, SETTINGS)
    best.offer(50, 2.0, writer("step 50"))
    scores = best.link / "eval" / "music_avqa" / "test" / "score.json"
    scores.parent.mkdir(parents=True)
    scores.write_text("{}")
    best.offer(100, 1.0, writer("step 100"))
    old = best.directory / "step-00000050"
    assert sorted(p.name for p in old.iterdir()) == ["eval"]
    assert (old / "eval" / "music_avqa" / "test" / "score.json").read_text() == "{}"
    assert kept(best)[1] == "step 100"


def test_a_save_that_dies_half_way_leaves_the_previous_best(tmp_path: Path):
    best = BestTrainables(tmp_path, SETTINGS)
    best.offer(2, 3.0, writer("step 2"))

    def dies(directory: Path) -> None:
        (directory / "trainables").mkdir()
        raise KeyboardInterrupt  # as a kill would stop it

    with pytest.raises(KeyboardInterrupt):
        best.offer(4, 2.0, dies)
    assert kept(best)[:2] == ("best_steps/step-00000002", "step 2")
    assert sorted(p.name for p in best.directory.iterdir()) == [".staging-step-00000004", "step-00000002"]
    # A new process (a resumed run) with the record of the last checkpoint: the torn save is cleared by the next one.
    resumed = BestTrainables(tmp_path, SETTINGS, previous=best.state())
    assert not resumed.offer(4, 3.5, writer("step 4"))
    assert resumed.offer(4, 2.0, writer("step 4"))
    assert kept(resumed)[:2] == ("best_steps/step-00000004", "step 4")
    assert [p.name for p in resumed.directory.iterdir()] == ["step-00000004"]


def test_a_resumed_run_re_reaching_a_step_replaces_what_the_killed_run_kept_there(tmp_path: Path):
    """The killed run kept step 6 after its last checkpoint (step 4, best then: step 2); the resumed run compares
    with step 2's loss and writes step 6 again."""
    killed = BestTrainables(tmp_path, SETTINGS)
    killed.offer(2, 3.0, writer("killed 2"))
    at_checkpoint = killed.state()
    killed.offer(6, 1.0, writer("killed 6"))
    resumed = BestTrainables(tmp_path, SETTINGS, previous=at_checkpoint)
    assert resumed.offer(6, 1.0, writer("resumed 6"))
    # Under another name: best pointed at the killed run's step 6 until the new one was complete.
    assert kept(resumed)[:2] == ("best_steps/step-00000006.1", "resumed 6")
    assert [p.name for p in resumed.directory.iterdir()] == ["step-00000006.1"]


def test_other_validation_settings_on_resume_start_the_best_afresh(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    record = {"step": 2, "val_loss": 0.5, "validation": {"split": "val", "max_samples": 5}}
    previous = {"record": record, "stale": 3}
    same = BestTrainables(tmp_path, {"split": "val", "max_samples": 5}, previous=previous)
    assert same.state() == previous and not same.improves(0.7) and same.improves(0.4)
    with caplog.at_level(logging.WARNING, logger="moka_train.training.best"):
        other = BestTrainables(tmp_path, SETTINGS, previous=previous)
    assert "validation settings changed on resume" in caplog.text
    assert other.state() == {"record": None, "stale": 0} and other.offer(4, 0.7, writer("step 4"))


def test_stale_counts_the_validations_since_the_best(tmp_path: Path):
    best = BestTrainables(tmp_path, SETTINGS)
    counts = []
    for step, loss in enumerate([3.0, 3.0, 4.0, 2.0, math.nan, 2.5], start=1):
        best.offer(step, loss, writer(f"step {step}"))
        counts.append(best.stale)
    assert counts == [0, 1, 2, 0, 1, 2]
    resumed = BestTrainables(tmp_path, SETTINGS, previous=best.state())
    resumed.offer(7, 2.0, writer("step 7"))  # equal is not lower
    assert resumed.stale == 3 and resumed.record["step"] == 4


def test_clear_removes_an_earlier_runs_best(tmp_path: Path):
    earlier = BestTrainables(tmp_path, SETTINGS)
    earlier.offer(2, 1.0, writer("step 2"))
    fresh = BestTrainables(tmp_path, SETTINGS)
    fresh.clear()
    assert not os.path.lexists(tmp_path / "best") and not (tmp_path / "best_steps").exists()
    assert fresh.offer(2, 5.0, writer("fresh"))  # no record to beat
    fresh.clear()  # nothing left to clear: no error


def _checkpoint(manager: CheckpointManager, step: int, best: BestTrainables) -> None:
    """A checkpoint whose meta records ``best``'s state, as the recipe saves one."""
    manager.save(step, checkpoint_meta({"seed": 42}, best=best.state()), lambda directory: None)
    best.prune()


def test_a_run_killed_after_a_new_best_resumes_pointing_at_its_checkpoints_best(tmp_path: Path):
    """Best at step 1, checkpoint at 3, a new best at 4, killed before the next checkpoint. The resumed run (from
    step 3) must see step 1's trainables under best, whatever it trains next: the uninterrupted run's best until
    it reaches step 4 again."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    killed = BestTrainables(tmp_path, SETTINGS, checkpoints=manager.checkpoints)
    killed.offer(1, 3.0, writer("step 1"))
    _checkpoint(manager, 3, killed)
    killed.offer(4, 2.0, writer("step 4"))
    assert kept(killed)[:2] == ("best_steps/step-00000004", "step 4")
    assert sorted(p.name for p in killed.directory.iterdir()) == ["step-00000001", "step-00000004"]  # 3 needs 1

    meta = read_meta(manager.latest())
    resumed = BestTrainables(tmp_path, SETTINGS, meta["best"], checkpoints=manager.checkpoints)
    resumed.resume(tmp_path)
    assert resumed.available and kept(resumed)[:2] == ("best_steps/step-00000001", "step 1")
    assert [p.name for p in resumed.directory.iterdir()] == ["step-00000001"]  # the killed run's future is gone
    assert resumed.offer(4, 2.0, writer("resumed 4"))
    _checkpoint(manager, 5, resumed)
    _checkpoint(manager, 6, resumed)  # no kept checkpoint records step 1 any more
    assert [p.name for p in resumed.directory.iterdir()] == ["step-00000004"]


def test_a_run_resumed_into_another_directory_brings_its_best(tmp_path: Path):
    first = tmp_path / "first"
    manager = CheckpointManager(first, keep_last=2)
    best = BestTrainables(first, SETTINGS, checkpoints=manager.checkpoints)
    best.offer(2, 1.0, writer("step 2"))
    _checkpoint(manager, 3, best)
    second = tmp_path / "second"
    resumed = BestTrainables(second, SETTINGS, read_meta(manager.latest())["best"])
    resumed.resume(first)
    assert resumed.available and kept(resumed)[:2] == ("best_steps/step-00000002", "step 2")


def test_a_best_whose_files_are_gone_is_not_claimed(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    previous = {"record": {"step": 2, "val_loss": 1.0, "validation": SETTINGS}, "stale": 0}  # no name: step-N
    resumed = BestTrainables(tmp_path, SETTINGS, previous)
    with caplog.at_level(logging.WARNING, logger="moka_train.training.best"):
        resumed.resume(tmp_path / "elsewhere")
    assert "are not in" in caplog.text and not resumed.available and not resumed.link.exists()
    assert not resumed.improves(1.5)  # still compared with the recorded loss, as the uninterrupted run would
