"""Launching training processes from tests: one process, or torchrun (CPU, gloo), killed as a group on timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",  # DeepSpeed on the CPU (gloo), also on machines with a GPU
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
    )
    return env


def run(command: list[str], timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """Run ``command``; returns the exit code and the combined output. On timeout, SIGTERM first (torchrun
    passes it on to its workers), then SIGKILL the process group and every descendant: torchrun's workers run in
    sessions of their own, and a hung worker outlives a SIGTERM (the first one only asks the run to stop after
    the step in progress). The output goes through a file, not a pipe: a stray worker keeping a pipe open would
    block the test forever."""
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment(), stdout=log, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            returncode = process.wait(timeout=timeout)
            note = ""
        except subprocess.TimeoutExpired:
            descendants = psutil.Process(process.pid).children(recursive=True)
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            for child in descendants:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            returncode, note = -signal.SIGKILL, f"\n[timed out after {timeout} s]"
        log.seek(0)
        return returncode, log.read() + note


def describe(command: list[str], returncode: int, output: str) -> str:
    return f"`{' '.join(command)}` exited with {returncode}; last output:\n{output[-8000:]}"


def torchrun(
    script: Path | str, *args: str, nproc: int = 2, launcher: tuple[str, ...] = ("--standalone",)
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher,
        "--nproc_per_node",
        str(nproc),
        str(script),
        *args,
    ]
