"""What every checkpoint writer needs: atomic files, one writing rank, ZeRO-3 parameters gathered."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn


def gathered(parameters: Iterable[nn.Parameter], modifier_rank: int | None = None):
    """Gather ZeRO-3 partitioned parameters for the block (a no-op for ordinary ones)."""
    parameters = list(parameters)
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def full_precision(parameter: nn.Parameter) -> torch.Tensor:
    """The value the optimizer steps: DeepSpeed's fp32 master copy of a trainable parameter when its engine keeps
    one (bf16 / fp16 with ZeRO-1/2/3; under ZeRO-3 it is a collective, so every rank calls it), else the
    parameter. Saving the bf16 working copy instead would round the run's result."""
    if hasattr(parameter, "_hp_mapping") or hasattr(parameter, "_z3_optimizer"):
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(parameter)
        if master is not None:
            return master
    return parameter


def is_writer() -> bool:
    """Rank 0 of a process group, or a single process: the one that writes files."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def current_umask() -> int:
    """The process's file-creation mask (it can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries (a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` to disk, then the directories' entries."""
    for path in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)):  # files before their folders
        fsync_path(path)
    fsync_path(directory)


def write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp_path)`` beside ``path``, flushed to disk, then rename: a kill mid-save never leaves a truncated
    file, and neither does a machine crash right after (without the flush a file system may commit the rename
    before the data, leaving an empty file under the final name). The file gets the permissions a plain open
    gives (0666 less the umask), not the owner-only ones of its temporary name: a team's evaluation jobs under
    other users read the run's trainables and config."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_folder_atomic(folder: Path, write: Callable[[Path], object]) -> None:
    """``write(staging)`` into a new folder beside ``folder``, then rename it to ``folder`` (which must not exist,
    or be empty): a kill mid-write leaves no half-written ``folder``. Its files get a plain open's permissions
    (``save_pretrained`` writes safetensors owner-only)."""
    staging = folder.parent / f".{folder.name}.staging-{os.getpid()}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        write(staging)
        mode = 0o666 & ~current_umask()
        for path in staging.rglob("*"):
            if path.is_file():
                os.chmod(path, mode)
        fsync_tree(staging)
        if folder.is_dir():
            folder.rmdir()  # empty (the caller refuses a folder with files in it)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` as UTF-8, atomically (``write_atomic``). UTF-8 whatever the locale: a config holding
    a non-ASCII path, written in an ASCII or Latin-1 locale, would otherwise fail or read back wrong."""
    write_atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
