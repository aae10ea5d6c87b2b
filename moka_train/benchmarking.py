"""Pieces the benchmark scripts share (``scripts/bench_*.py``): the memory a step saves for backward on the
CPU, a device barrier for timing, and a description of the machine the figures come from."""

from __future__ import annotations

import contextlib
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class SavedTensorMeter:
    """Sums the storage bytes of the tensors autograd saves for backward, each storage once, leaving out
    ``exclude`` (the parameters and buffers, which exist whether or not anything is saved). Use ``pack`` as the
    pack hook of ``torch.autograd.graph.saved_tensors_hooks``."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.storages: dict[int, int] = {}

    def pack(self, tensor: Tensor) -> Tensor:
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer not in self.exclude:
                self.storages[pointer] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def source_commit() -> str:
    """The checkout's commit (with ``-dirty`` when it has uncommitted changes), or ``unknown`` outside git: a
    figure copied into the README names the code it measured."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, torch version, threads, Python, and the GPU when timing on one."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": source_commit(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
