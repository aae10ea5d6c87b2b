"""MokA under torch DDP and DeepSpeed ZeRO-3 (2 CPU processes, gloo) against a single-process reference.

``tests/distributed/train_steps.py`` trains a tiny random Llama with MokA for 4 AdamW steps on fixed
global batches of 4 samples. One rank's shard never holds audio and some steps hold no media at all, so
an adapter parameter that left the graph would make DDP raise or ZeRO-3 hang. The loss is normalised by
the global label count, so the per-step losses and the final adapter weights of every mode must agree
with the single-process run up to fp32 summation order.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "train_steps.py"
WORLD_SIZE = 2
TIMEOUT_S = 180
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5
# Layers x target modules x (A text, A visual, A audio, shared B) of the worker's tiny Llama.
ADAPTER_TENSORS = 2 * 7 * 4


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",  # DeepSpeed on the CPU (gloo), also on machines with a GPU
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
    )
    return env


def _run(command: list[str], timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """Run ``command`` in its own process group; on timeout kill the whole group (torchrun and its
    workers). Returns the exit code and the combined output."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return -signal.SIGKILL, f"{output}\n[timed out after {timeout} s]"
    return process.returncode, output


def _describe(command: list[str], returncode: int, output: str) -> str:
    return f"`{' '.join(command)}` exited with {returncode}; last output:\n{output[-8000:]}"


def _train(mode: str, out_dir: Path, *extra: str, timeout: float = TIMEOUT_S) -> tuple[dict, str]:
    """Run the worker in ``mode`` and return its losses record and output; fail with the output shown."""
    if mode == "single":
        command = [sys.executable, str(WORKER), mode, str(out_dir), *extra]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(WORLD_SIZE),
            str(WORKER),
            mode,
            str(out_dir),
            *extra,
        ]
    returncode, output = _run(command, timeout)
    record_path = out_dir / "losses.json"
    if returncode != 0 or not record_path.is_file():
        raise AssertionError(_describe(command, returncode, output))
    return json.loads(record_path.read_text()), output


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out_dir = tmp_path_factory.mktemp("single")
    record, _ = _train("single", out_dir)
    return record, out_dir


def _assert_matches_reference(record: dict, out_dir: Path, reference: tuple[dict, Path]) -> None:
    expected, reference_dir = reference
    assert record["world_size"] == WORLD_SIZE
    assert record["steps"] == expected["steps"]
    assert record["parameter_counts"] == expected["parameter_counts"]
    assert record["parameter_counts"]["adapter"] == record["parameter_counts"]["trainable"] > 0
    assert record["losses"] == pytest.approx(expected["losses"], rel=LOSS_RTOL), (
        f"{record['mode']} losses {record['losses']} != single-process {expected['losses']}"
    )
    got, want = _weights(out_dir / "adapter"), _weights(reference_dir / "adapter")
    assert sorted(got) == sorted(want)
    worst = max(want, key=lambda name: float((got[name] - want[name]).abs().max()))
    for name in want:
        torch.testing.assert_close(
            got[name],
            want[name],
            rtol=0,
            atol=WEIGHT_ATOL,
            msg=lambda m, name=name: (
                f"{record['mode']} {name} differs from the single-process run (worst tensor: {worst}): {m}"
            ),
        )
    config = json.loads((out_dir / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "moka"


def test_single_process_reference_learns(reference: tuple[dict, Path]) -> None:
    """The reference itself must train: otherwise matching it would prove nothing."""
    record, out_dir = reference
    losses = record["losses"]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    # Steps s and s + 2 see the same batch: training on it must lower its loss.
    assert losses[2] < losses[0] - 0.01 and losses[3] < losses[1] - 0.01, losses
    before, after = _weights(out_dir / "adapter_init"), _weights(out_dir / "adapter")
    assert len(after) == ADAPTER_TENSORS and sorted(before) == sorted(after)
    # Every tensor (each modality's A in every layer, and B) moved by far more than the comparison
    # tolerance, so a gradient lost on one rank would show in the distributed runs' weights.
    still = {name: float((after[name] - before[name]).abs().max()) for name in after}
    assert min(still.values()) > 100 * WEIGHT_ATOL, sorted(still.items(), key=lambda item: item[1])[:5]


def test_ddp_matches_single_process(reference: tuple[dict, Path], tmp_path: Path) -> None:
    """torch DDP (gloo, no find_unused_parameters) over 2 ranks, one of which never sees audio."""
    record, _ = _train("ddp", tmp_path)
    _assert_matches_reference(record, tmp_path, reference)


def test_zero3_matches_single_process(reference: tuple[dict, Path], tmp_path: Path) -> None:
    """DeepSpeed ZeRO-3 (fp32, client torch AdamW): adapted layers are ZeRO-3 leaf modules, the fused
    matmul reads every A at once, and ``save_adapter`` gathers the partitioned weights. The embeddings are
    frozen, so layer 0's adapted q/k/v see inputs without grad (DeepSpeed's leaf-module gradient hook
    crashed on those before the adapters made such inputs require grad)."""
    pytest.importorskip("deepspeed")
    record, _ = _train("zero3", tmp_path)
    _assert_matches_reference(record, tmp_path, reference)
