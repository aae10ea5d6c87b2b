"""Run checkpoints: written atomically, the last K kept, resumed only when asked and only into the same run.

    <run_dir>/checkpoints/
        step-00000100/
            trainables/        ``save_trainables``: what evaluation loads, without DeepSpeed
            state/             the engine's resume state (optimizer, scheduler; DeepSpeed shards per rank)
            rng/rank-00000.pt  torch, CUDA, numpy and Python RNG states of each rank
            meta.json          step, data position, the run's config and its fingerprint; written last
        .staging-step-00000100/   a save in progress: never read, removed by the next save

Every rank writes its part into the staging directory; then rank 0 writes ``meta.json`` and renames the
directory into place. A kill at any moment leaves either the new checkpoint complete or the previous ones
untouched, and ``latest`` only ever returns directories with a ``meta.json``.

``resolve_resume("auto" | <path> | "none", ...)`` is explicit: ``auto`` resumes the latest checkpoint of
this run directory, and any resume is refused when the checkpoint was written under another configuration
(the keys that differ are named), so a run never silently continues a different one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moka_train.checkpoint_io import fsync_path, fsync_tree, write_atomic, write_text_atomic

FORMAT_VERSION = 1
META_NAME = "meta.json"
PREFIX = "step-"
STAGING_PREFIX = ".staging-"


def step_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def config_fingerprint(config: Mapping[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def no_barrier() -> None:
    return None


def write_staging(
    directory: Path, name: str, write: Callable[[Path], None], rank: int, barrier: Callable[[], None]
) -> Path:
    """``write(staging)`` on every rank into a new ``directory/.staging-<name>``, complete on return; rank 0 first
    removes the staging folders of saves killed half-way (never complete, never read). The caller renames it."""
    staging = directory / f"{STAGING_PREFIX}{name}"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        for torn in directory.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(torn)
        staging.mkdir()
    barrier()
    write(staging)
    barrier()  # every rank's files complete (their temporary names renamed away)
    # Each rank flushes what it wrote (every file, as it cannot tell which: flushing clean data costs nothing), so
    # that a machine crash after the rename cannot leave a checkpoint whose meta.json promises files that are empty.
    fsync_tree(staging)
    barrier()
    return staging


def install(staging: Path, final: Path) -> None:
    """Rename the complete folder ``staging`` to ``final``. A folder already there is renamed away whole, then
    removed: a kill during the removal leaves a staging folder (removed by the next save), never a ``final``
    with part of the old files beside part of the new."""
    replaced = None
    if final.exists():
        replaced = final.parent / f"{STAGING_PREFIX}replaced-{final.name}"
        os.replace(final, replaced)
    os.replace(staging, final)
    fsync_path(final.parent)  # the rename is on disk before anything older is removed
    if replaced is not None:
        shutil.rmtree(replaced)


class CheckpointManager:
    """Checkpoints of one run under ``run_dir/checkpoints``; ``keep_last`` complete ones are kept.

    In a distributed run every rank calls ``save`` (the ``write`` callback writes that rank's part) and
    ``barrier`` synchronises them (``torch.distributed.barrier``)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        keep_last: int = 2,
        rank: int = 0,
        barrier: Callable[[], None] = no_barrier,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.directory = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.glob(f"{PREFIX}*") if p.is_dir() and (p / META_NAME).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))

    def latest(self) -> Path | None:
        done = self.checkpoints()
        return done[-1] if done else None

    def save(self, step: int, meta: Mapping[str, Any], write: Callable[[Path], None]) -> Path:
        """Write checkpoint ``step``: ``write(staging_dir)`` on every rank, then ``meta`` and the rename on
        rank 0, then the oldest checkpoints beyond ``keep_last`` are removed."""
        final = self.directory / step_name(step)
        staging = write_staging(self.directory, step_name(step), write, self.rank, self.barrier)
        if self.rank == 0:
            record = {"format_version": FORMAT_VERSION, "step": step, **meta}
            text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
            write_text_atomic(staging / META_NAME, text)
            install(staging, final)  # final exists when a resumed run re-reaches a saved step
            for old in self.checkpoints()[: -self.keep_last]:
                shutil.rmtree(old)
        self.barrier()
        return final


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {META_NAME})")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    return meta


def _same(saved: Any, current: Any) -> bool:
    """Equal values: 0 and 0.0 are (a command line's ``=0`` for a preset's ``0.0``), True and 1 are not."""
    return saved == current and isinstance(saved, bool) == isinstance(current, bool)


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in _differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    return [] if _same(saved, current) else [f"{prefix[:-1]}: {saved!r} -> {current!r}"]


def describe_differences(saved: Mapping[str, Any], current: Mapping[str, Any], shown: int = 8) -> str:
    """``key: saved -> current`` for the first ``shown`` settings that differ (nested keys dotted)."""
    changed = _differences(saved, current)
    return "; ".join(changed[:shown]) + (f" (+{len(changed) - shown} more)" if len(changed) > shown else "")


def resolve_resume(resume: str, manager: CheckpointManager, config: Mapping[str, Any]) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start.

    ``none``: fresh. ``auto``: the latest complete checkpoint of this run directory (fresh when it has
    none). A path: that checkpoint, which must be complete. Either way its saved config must equal
    ``config`` (the run's resolved config, minus settings allowed to change on resume, such as ``resume``)."""
    if resume == "none":
        return None
    checkpoint = manager.latest() if resume == "auto" else Path(resume)
    if checkpoint is None:
        return None
    meta = read_meta(checkpoint)
    current = json.loads(json.dumps(config, default=str))
    # The fingerprint is the quick check; the values decide (a number retyped, 0 for 0.0, changes the fingerprint).
    if meta.get("config_fingerprint") != config_fingerprint(current) and _differences(meta.get("config"), current):
        shown = describe_differences(meta.get("config") or {}, current)
        raise ValueError(
            f"resume={resume}: {checkpoint} was written by a run with another configuration ({shown}); set those "
            "back to resume it, or start a new run in another run_dir"
        )
    return checkpoint


def data_identity(sample_ids: Iterable[str]) -> dict[str, Any]:
    """What a checkpoint records of its training data: the sample count and a digest of the ids in order. The
    config's fingerprint cannot see the data: an annotation file edited, or media left out by
    ``on_missing=skip``, between a save and its resume gives another data order and schedule under the same
    config."""
    ids = list(sample_ids)
    digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:16]
    return {"samples": len(ids), "ids_sha256": digest}


def check_resumed_data(checkpoint: Path, meta: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` (its ``meta``) on training data other than that it was saved over:
    samples would be repeated or skipped and the schedule's length would change mid-run. A checkpoint from before
    the data was recorded is not checked."""
    saved = meta.get("data")
    if saved is None or dict(saved) == dict(identity):
        return
    raise ValueError(
        f"resume: {checkpoint} was saved over other training data ({saved.get('samples')} samples, ids digest "
        f"{saved.get('ids_sha256')}; now {identity['samples']} samples, {identity['ids_sha256']}): the data order "
        "and the schedule would not continue that run. Restore the data it trained on (an edited annotation file? "
        "media left out by on_missing=skip?), or start a new run directory"
    )


def checkpoint_meta(config: Mapping[str, Any], **position: Any) -> dict[str, Any]:
    """What ``save`` records besides the weights: the data position (epoch, batches consumed, sampler seed,
    ...) and the run's config with its fingerprint, which ``resolve_resume`` compares."""
    current = json.loads(json.dumps(config, default=str))
    return {"config": current, "config_fingerprint": config_fingerprint(current), **position}


# -- random states ---------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    version, words, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(directory: str | os.PathLike, rank: int) -> None:
    path = Path(directory) / "rng" / f"rank-{rank:05d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(rng_state(), tmp))


def load_rng(directory: str | os.PathLike, rank: int) -> None:
    path = Path(directory) / "rng" / f"rank-{rank:05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written with another number of ranks?")
    set_rng_state(torch.load(path, weights_only=True))
