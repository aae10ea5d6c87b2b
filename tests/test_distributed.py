"""MokA under torch DDP and DeepSpeed ZeRO-3 (2 CPU processes, gloo) against a single-process reference.

``tests/distributed/train_steps.py`` trains a tiny random Llama with MokA for 4 AdamW steps on fixed
global batches of 4 samples. One rank's shard never holds audio and some steps hold no media at all, so
an adapter parameter that left the graph would make DDP raise or ZeRO-3 hang. The loss is normalised by
the global label count, so the per-step losses and the final adapter weights of every mode must agree
with the single-process run up to fp32 summation order.

``tests/distributed/generate_steps.py`` generates greedily with a tiny MokA ``MultimodalLM`` under ZeRO-3
inference, each rank with its own prompts, rank 0's ending after 1-2 tokens and rank 1's after 6. Every
forward gathers the partitioned parameters from both ranks, so rank 0 must keep stepping until rank 1 is
done: ``MultimodalLM.generate`` turns ``synced_gpus`` on by default for a partitioned model. With it the ids
equal a single-process run; with ``synced_gpus=False`` rank 1 hangs in the gather.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import TIMEOUT_S, describe, run, torchrun

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "train_steps.py"
GENERATE_WORKER = ROOT / "tests" / "distributed" / "generate_steps.py"
WORLD_SIZE = 2
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5
# Layers x target modules x (A text, A visual, A audio, shared B) of the worker's tiny Llama.
ADAPTER_TENSORS = 2 * 7 * 4


def _train(mode: str, out_dir: Path, *extra: str, timeout: float = TIMEOUT_S) -> tuple[dict, str]:
    """Run the worker in ``mode`` and return its losses record and output; fail with the output shown."""
    if mode == "single":
        command = [sys.executable, str(WORKER), mode, str(out_dir), *extra]
    else:
        command = torchrun(WORKER, mode, str(out_dir), *extra, nproc=WORLD_SIZE)
    returncode, output = run(command, timeout)
    record_path = out_dir / "losses.json"
    if returncode != 0 or not record_path.is_file():
        raise AssertionError(describe(command, returncode, output))
    return json.loads(record_path.read_text()), output


def _generate(mode: str, out_dir: Path) -> tuple[int, str, dict[int, dict]]:
    """Run the generate worker in ``mode``; return its exit code, output and the records the ranks wrote.
    (A stuck rank ends itself: its watchdog writes its stack to ``rank{r}_stuck.txt`` and exits 1.)"""
    if mode == "single":
        command = [sys.executable, str(GENERATE_WORKER), mode, str(out_dir)]
    else:
        command = torchrun(GENERATE_WORKER, mode, str(out_dir), nproc=WORLD_SIZE)
    returncode, output = run(command)
    records = {
        rank: json.loads(path.read_text())
        for rank in range(WORLD_SIZE)
        if (path := out_dir / f"rank{rank}.json").is_file()
    }
    stuck = "".join(
        f"\n--- {path.name} ---\n{path.read_text()}"
        for path in sorted(out_dir.glob("rank*_stuck.txt"))
        if path.stat().st_size
    )
    return returncode, describe(command, returncode, output + stuck), records


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
    assert record["method"] == expected["method"]


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


@pytest.mark.parametrize("method", ["dora", "loramoe"])
def test_other_methods_under_zero3_match_single_process(method: str, tmp_path: Path) -> None:
    """DoRA (its magnitude and norm read the partitioned base weight inside the layer's forward; saved in peft's
    layout, gathered) and LoRAMoE (a router and experts per layer, its balancing term added in training) train
    under ZeRO-3 as in one process, on the same batches that leave a rank without audio."""
    reference = _train("single", tmp_path / "single", "--method", method)
    record, _ = _train("zero3", tmp_path / "zero3", "--method", method)
    assert record["method"] == method
    _assert_matches_reference(record, tmp_path / "zero3", (reference[0], tmp_path / "single"))


def test_zero3_matches_single_process(reference: tuple[dict, Path], tmp_path: Path) -> None:
    """DeepSpeed ZeRO-3 (fp32, client torch AdamW): adapted layers are ZeRO-3 leaf modules, the fused
    matmul reads every A at once, and ``save_adapter`` gathers the partitioned weights. The embeddings are
    frozen, so layer 0's adapted q/k/v see inputs without grad (DeepSpeed's leaf-module gradient hook
    crashed on those before the adapters made such inputs require grad)."""
    record, _ = _train("zero3", tmp_path)
    _assert_matches_reference(record, tmp_path, reference)


@pytest.fixture(scope="module")
def generate_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """Both ranks' prompts generated in one process, without DeepSpeed."""
    returncode, description, records = _generate("single", tmp_path_factory.mktemp("generate_single"))
    assert returncode == 0 and len(records) == WORLD_SIZE, description
    return records


def test_generate_reference_stops_rank0_early(generate_reference: dict[int, dict]) -> None:
    """The setup the ZeRO-3 runs depend on: rank 0's prompts finish after 1 and 2 tokens (the finished row
    padded), rank 1's run the full length."""
    first, second = generate_reference[0], generate_reference[1]
    (eos_a, eos_b), pad, new_tokens = first["eos"], first["pad"], first["max_new_tokens"]
    assert first["ids"][0] == [eos_a, pad] and first["ids"][1][1] == eos_b, first
    assert first["ids"][1][0] not in (eos_a, eos_b)
    assert first["forwards"] == 2
    assert [len(row) for row in second["ids"]] == [new_tokens] * 2 and second["forwards"] == new_tokens, second


def test_zero3_generate_matches_single_process(generate_reference: dict[int, dict], tmp_path: Path) -> None:
    """ZeRO-3 (every parameter partitioned, no optimizer) with ``MultimodalLM.generate``'s default: each
    rank's ids equal the single-process ones, and rank 0 kept running forwards after its EOS until rank 1
    was done. transformers alone would not have synced: it only checks for ``HfDeepSpeedConfig``."""
    returncode, description, records = _generate("zero3", tmp_path)
    assert returncode == 0 and len(records) == WORLD_SIZE, description
    new_tokens = generate_reference[1]["max_new_tokens"]
    for rank, record in records.items():
        assert record["partitioned"] and not record["transformers_zero3_default"], record
        assert record["ids"] == generate_reference[rank]["ids"], (
            f"rank {rank}: ZeRO-3 generated {record['ids']}, single-process {generate_reference[rank]['ids']}"
        )
        assert record["forwards"] == new_tokens, f"rank {rank} ran {record['forwards']} forwards"


def test_zero3_generate_without_sync_hangs(generate_reference: dict[int, dict], tmp_path: Path) -> None:
    """The same with ``synced_gpus=False``: rank 0 finishes (with the right ids) and stops running forwards,
    and rank 1 waits in ZeRO-3's parameter gather until its watchdog ends it."""
    returncode, description, records = _generate("nosync", tmp_path)
    assert returncode != 0 and sorted(records) == [0], description
    assert records[0]["ids"] == generate_reference[0]["ids"] and records[0]["forwards"] == 2, records[0]
    stack = (tmp_path / "rank1_stuck.txt").read_text()
    assert "fetch_sub_module" in stack and "in generate" in stack, description
