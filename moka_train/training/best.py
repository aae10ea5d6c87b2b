"""The best trainables by validation loss (``validation.keep_best``), kept beside the last ones:

    <run_dir>/best -> best_steps/step-00000040     a relative symlink, the stable path to use
    <run_dir>/best_steps/step-00000040/
        trainables/    as <run_dir>/trainables (those of the last step)
        config.yaml    the run's: the folder is a run directory to every tool (evaluate.py run_dir=<run_dir>/best)
        best.json      step, val_loss, the validation split and sample count; written last
    <run_dir>/best_steps/.staging-step-00000060/   a save in progress: never read, removed by the next save

A validation whose loss is lower than the best so far saves the trainables into a staging directory, renames
it into place, then points ``best`` at it in one rename of a new symlink, and only then removes the earlier
bests that no kept checkpoint records. A kill at any moment leaves ``best`` pointing at a complete directory (a
resumed run that reaches again the step ``best`` points at writes ``step-N.1`` rather than replace what the
link still names).

The best so far travels in each checkpoint's meta, so a resumed run compares with what the run had seen at
that step (exactly as the uninterrupted run would), and starts afresh when the validation settings changed on
resume (losses over other samples do not compare). Because every kept checkpoint's best stays on disk, a run
killed after a new best but before its next checkpoint resumes with ``best`` pointing back at the best its
checkpoint recorded (a run resumed into another run directory copies that best over).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moka_train.checkpoint_io import write_text_atomic
from moka_train.training.checkpoints import STAGING_PREFIX, install, no_barrier, read_meta, step_name, write_staging

logger = logging.getLogger(__name__)

LINK_NAME = "best"
STEPS_DIR = "best_steps"
RECORD_NAME = "best.json"
CONFIG_NAME = "config.yaml"  # the run's resolved config, which the recipe writes into run_dir at its start


class BestTrainables:
    """Tracks the lowest validation loss of a run, keeps the trainables it was measured on, and counts the
    validations since (``stale``: what ``validation.patience`` stops on).

    ``settings``: what the loss was measured over (split, sample count); a ``previous`` state (``state()`` as a
    resumed checkpoint's meta recorded it) measured over other settings is dropped. In a distributed run every rank
    calls ``offer`` with the same (all-reduced) loss: ``write`` may be a collective (ZeRO-3 gathers to save)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        settings: Mapping[str, Any],
        previous: Mapping[str, Any] | None = None,
        rank: int = 0,
        barrier: Callable[[], None] = no_barrier,
        checkpoints: Callable[[], list[Path]] = list,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoints = checkpoints  # the run's kept checkpoints: the bests their metas record stay on disk
        self.settings = dict(settings)
        self.rank = rank
        self.barrier = barrier
        self.record: dict[str, Any] | None = None
        self.stale = 0
        record = None if previous is None else previous["record"]
        if record is not None and dict(record["validation"]) != self.settings:
            logger.warning(
                "validation settings changed on resume (%s -> %s): the best validation loss so far (%s at step %d) "
                "does not compare, so the best trainables are chosen afresh",
                record["validation"],
                self.settings,
                record["val_loss"],
                record["step"],
            )
        elif previous is not None:
            self.record, self.stale = (None if record is None else dict(record)), int(previous["stale"])

    def state(self) -> dict[str, Any]:
        """What a checkpoint records, for ``previous`` on resume."""
        return {"record": self.record, "stale": self.stale}

    @property
    def link(self) -> Path:
        return self.run_dir / LINK_NAME

    @property
    def directory(self) -> Path:
        return self.run_dir / STEPS_DIR

    @property
    def kept(self) -> Path | None:
        """The directory of the best so far (None before the first validation)."""
        return None if self.record is None else self.directory / _name(self.record)

    @property
    def available(self) -> bool:
        """Whether ``link`` leads to the best so far (False when a resumed run could not find its files)."""
        kept = self.kept
        return kept is not None and self.link.is_symlink() and self.link.resolve() == kept.resolve()

    def resume(self, source_run_dir: str | os.PathLike) -> None:
        """On resume from a checkpoint of ``source_run_dir``: point ``link`` at the best that checkpoint recorded,
        copying it from ``source_run_dir`` when the run continues in another directory, and remove the bests a
        killed run kept after that checkpoint (the resumed run recomputes them)."""
        if self.rank == 0:
            kept = self.kept
            if kept is not None and not kept.is_dir():
                source = Path(source_run_dir) / STEPS_DIR / kept.name
                if source.is_dir():
                    logger.info("copying the best trainables so far from %s", source)
                    staging = kept.parent / f"{STAGING_PREFIX}{kept.name}"
                    shutil.rmtree(staging, ignore_errors=True)  # a copy killed half-way
                    shutil.copytree(source, staging)
                    install(staging, kept)  # a kill during the copy leaves no half a best to point at
            if kept is not None and kept.is_dir():
                if not self.available:
                    logger.warning("%s now points at %s, the best its checkpoint recorded", self.link, kept)
                    _point(self.link, kept)
            else:
                if kept is not None:
                    logger.warning(
                        "the trainables of the best validation so far (step %d) are not in %s: %s is kept anew from "
                        "the next validation with a lower loss",
                        self.record["step"],
                        self.directory,
                        self.link,
                    )
                if self.link.is_symlink() or self.link.exists():
                    self.link.unlink()
            self.prune()
        self.barrier()

    def prune(self) -> None:
        """Rank 0 removes the best directories that are neither the best so far nor recorded by a kept
        checkpoint (call it after each checkpoint save)."""
        if self.rank != 0 or not self.directory.is_dir():
            return
        keep = self.recorded_by_checkpoints() | ({self.kept.name} if self.kept else set())
        for other in self.directory.iterdir():
            if other.name in keep or other.name.startswith("."):
                continue
            # What a user wrote there (evaluate.py run_dir=<run_dir>/best puts its eval/ in the step's folder) is
            # kept: only the files offer() wrote are removed.
            extra = sorted(path.name for path in other.iterdir() if path.name not in OWN_FILES)
            if not extra:
                shutil.rmtree(other)
                continue
            for name in OWN_FILES:
                path = other / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
            logger.info("%s is no longer a best step: its trainables are removed, its %s kept", other, extra)

    def recorded_by_checkpoints(self) -> set[str]:
        """The names of the best directories the kept checkpoints record."""
        records = ((read_meta(checkpoint).get("best") or {}).get("record") for checkpoint in self.checkpoints())
        return {_name(record) for record in records if record is not None}

    def improves(self, val_loss: float) -> bool:
        """Strictly lower than the best so far (a NaN loss, from a split with no answer token, never is)."""
        if math.isnan(val_loss):
            return False
        return self.record is None or val_loss < self.record["val_loss"]

    def clear(self) -> None:
        """A fresh run in this directory: forget what an earlier run left as best (rank 0 removes it)."""
        self.record, self.stale = None, 0
        if self.rank == 0:
            if self.link.is_symlink() or self.link.exists():
                logger.info("removing %s of an earlier run in this directory", self.link)
                self.link.unlink()
            shutil.rmtree(self.directory, ignore_errors=True)
        self.barrier()

    def offer(self, step: int, val_loss: float, write: Callable[[Path], None]) -> bool:
        """Keep the trainables of ``step`` if ``val_loss`` improves on the best so far; returns whether it did.
        ``write(directory)`` runs on every rank and writes them into ``directory / "trainables"``."""
        if not self.improves(val_loss):
            self.stale += 1
            return False
        # The same step again (a resumed run re-reaching it) while ``best`` or a checkpoint may name it: another name.
        final = self.directory / step_name(step)
        copies = itertools.count(1)
        while final.exists():
            final = self.directory / f"{step_name(step)}.{next(copies)}"
        record = {"step": step, "val_loss": val_loss, "validation": self.settings, "name": final.name}
        staging = write_staging(self.directory, step_name(step), write, self.rank, self.barrier)
        self.record, self.stale = record, 0
        if self.rank == 0:
            if (self.run_dir / CONFIG_NAME).is_file():
                shutil.copyfile(self.run_dir / CONFIG_NAME, staging / CONFIG_NAME)
            text = json.dumps(record, indent=2, sort_keys=True) + "\n"
            write_text_atomic(staging / RECORD_NAME, text)
            os.replace(staging, final)
            _point(self.link, final)
            self.prune()
        self.barrier()
        return True


# What offer() writes into a best step's folder (prune removes these, and the folder if nothing else is there).
OWN_FILES = ("trainables", CONFIG_NAME, RECORD_NAME)


def _name(record: Mapping[str, Any]) -> str:
    """The directory name of a best record (records written before names were recorded: ``step-N``)."""
    return record.get("name") or step_name(int(record["step"]))


def _point(link: Path, target: Path) -> None:
    """Make ``link`` a relative symlink to ``target`` in one rename (never absent, never half-made)."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
