"""Greedy generation with a tiny MokA MultimodalLM under DeepSpeed ZeRO-3, for tests/test_distributed.py.

    export PYTHONPATH=.   # from the repository root: the worker imports tests.helpers
    python tests/distributed/generate_steps.py single OUT_DIR                                             # reference
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/distributed/generate_steps.py zero3 OUT_DIR
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/distributed/generate_steps.py nosync OUT_DIR

Under ZeRO-3 every forward all-gathers each layer's parameters from all ranks, so all ranks must run the
same number of forwards. Greedy generation stops a rank as soon as its own prompts hit EOS; a rank that
stops early leaves the others waiting in the gather forever. ``MultimodalLM.generate`` therefore passes
``synced_gpus=True`` by default when the model is ZeRO-3 partitioned over several ranks (transformers'
own default only looks at ``HfDeepSpeedConfig``, which a plain ``deepspeed.initialize`` never sets).

Every rank builds the same model (same seeds) and gets its own prompt batch (``rank_batch``). Rank 0 is
made to finish early: its EOS ids are its own greedy tokens (row 0 stops after 1 token, row 1 after 2),
while rank 1 has an EOS the LM head cannot emit and generates all ``NEW_TOKENS``. Modes:

- ``single``: no DeepSpeed; one process generates both ranks' batches (the reference).
- ``zero3``: 2 ranks, ZeRO-3 inference engine, ``MultimodalLM.generate``'s default ``synced_gpus``.
- ``nosync``: the same with ``synced_gpus=False`` passed explicitly; rank 1 is expected to hang.

Each rank writes ``OUT_DIR/rank{r}.json`` (its generated ids and how often the backbone ran). A watchdog
(``faulthandler``) ends a rank whose generate has not returned after ``GENERATE_DEADLINE_S`` seconds: it
writes every thread's stack to ``OUT_DIR/rank{r}_stuck.txt`` and exits 1, so a hang is seen in seconds and
shows where it waited.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import time
from pathlib import Path

import torch

from moka_train.adapters import AdapterConfig, inject_adapters
from moka_train.modality import Modality
from moka_train.models.mllm import MultimodalLM, zero3_partitioned
from moka_train.models.projector import ProjectorConfig, QFormerProjector
from tests.helpers import VOCAB, randomize_adapters, tiny_llama

MODES = ("single", "zero3", "nosync")
WORLD_SIZE = 2
NEW_TOKENS = 6
PAD = 0
# The LM head has VOCAB logits (the added tokens are never predicted), so this id is never generated: as
# EOS it disables early stopping without a logits processor that would change the greedy tokens.
NEVER_GENERATED = VOCAB + 7
# Generation on this model takes well under a second even under ZeRO-3 on CPU; past this, a rank is stuck.
GENERATE_DEADLINE_S = 10.0
MODEL_SEED = 0
DATA_SEED = 4321

VIDEO, AUDIO, VIDEO_START = VOCAB, VOCAB + 1, VOCAB + 2
PLACEHOLDER = {"visual": VIDEO, "audio": AUDIO}
WIDTHS = {"visual": 16, "audio": 12}
QUERIES = 2

# Per rank, one layout per prompt: (kind, n) with kind text / question (n token ids) or visual / audio
# (n segments of QUERIES projector tokens each). The ranks' batches differ in content and length.
LAYOUTS = [
    [
        [("text", 2), ("visual", 2), ("question", 3)],
        [("text", 1), ("audio", 1), ("question", 4)],
    ],
    [
        [("text", 1), ("visual", 1), ("audio", 2), ("question", 2)],
        [("text", 3), ("question", 5)],
    ],
]


def build_model() -> MultimodalLM:
    """Tiny Llama with MokA on every projection (B random, so the adapters change the tokens) and a
    projector per media modality; identical on every rank."""
    llm = tiny_llama(seed=MODEL_SEED)
    inject_adapters(llm, AdapterConfig(method="moka", modalities=["text", "visual", "audio"]))
    randomize_adapters(llm, seed=MODEL_SEED + 1)
    torch.manual_seed(MODEL_SEED + 2)
    projectors = {
        name: QFormerProjector(
            ProjectorConfig(
                encoder_width=width,
                llm_hidden_size=64,
                num_queries=QUERIES,
                qformer_layers=1,
                qformer_hidden_size=32,
                qformer_heads=4,
                qformer_intermediate_size=64,
            )
        )
        for name, width in WIDTHS.items()
    }
    return MultimodalLM(llm, projectors, PLACEHOLDER, [VIDEO, AUDIO, VIDEO_START]).eval()


def rank_batch(rank: int) -> dict:
    """Rank ``rank``'s left-padded prompts in the collator's format (no answers, no labels)."""
    generator = torch.Generator().manual_seed(DATA_SEED + rank)
    rows, features = [], {name: [] for name in WIDTHS}
    for layout in LAYOUTS[rank]:
        ids, modalities, question = [], [], []
        for kind, n in layout:
            if kind in WIDTHS:
                features[kind].append(torch.randn(n, 5, WIDTHS[kind], generator=generator))
                ids += [PLACEHOLDER[kind]] * (n * QUERIES)
                modalities += [int(Modality.parse(kind))] * (n * QUERIES)
                question += [False] * (n * QUERIES)
            else:
                ids += torch.randint(3, VOCAB, (n,), generator=generator).tolist()
                modalities += [int(Modality.TEXT)] * n
                question += [kind == "question"] * n
        rows.append((ids, modalities, question))
    length = max(len(ids) for ids, _, _ in rows)

    def left_pad(values: list, fill) -> list:
        return [fill] * (length - len(values)) + values

    return {
        "input_ids": torch.tensor([left_pad(ids, PAD) for ids, _, _ in rows]),
        "modality_ids": torch.tensor([left_pad(m, int(Modality.PAD)) for _, m, _ in rows]),
        "question_mask": torch.tensor([left_pad(q, False) for _, _, q in rows]),
        "attention_mask": torch.tensor([left_pad([1] * len(ids), 0) for ids, _, _ in rows]),
        "features": {name: torch.cat(f) for name, f in features.items() if f},
    }


def early_eos(model: MultimodalLM) -> list[int]:
    """EOS ids that stop rank 0 early: row 0's first greedy token and row 1's second. Must run on the
    unpartitioned model (before ``deepspeed.initialize``), where generate is a single-process call."""
    tokens = model.generate(rank_batch(0), max_new_tokens=2, eos_token_id=NEVER_GENERATED, pad_token_id=PAD)
    first, (second_first, second) = int(tokens[0, 0]), tokens[1].tolist()
    # Row 1 must not stop on its first token, or rank 0's output would not show the padding.
    if second_first in (first, second):
        raise RuntimeError(f"rank 0's greedy tokens {tokens.tolist()} do not give distinct stops; change DATA_SEED")
    return [first, second]


def generation_kwargs(rank: int, eos: list[int]) -> dict:
    return {
        "max_new_tokens": NEW_TOKENS,
        "eos_token_id": eos if rank == 0 else NEVER_GENERATED,
        "pad_token_id": PAD,
    }


def count_forwards(model: MultimodalLM) -> list[int]:
    """A one-element counter of backbone forwards (one per generation step, prefill included)."""
    calls = [0]

    def hook(*_) -> None:
        calls[0] += 1

    model.llm.register_forward_hook(hook)
    return calls


def generate_with_deadline(model: MultimodalLM, batch: dict, out_dir: Path, rank: int, **kwargs) -> torch.Tensor:
    """``model.generate``; past GENERATE_DEADLINE_S, dump every thread's stack to a file and exit 1."""
    with (out_dir / f"rank{rank}_stuck.txt").open("w") as stuck:
        faulthandler.dump_traceback_later(GENERATE_DEADLINE_S, exit=True, file=stuck)
        try:
            return model.generate(batch, **kwargs)
        finally:
            faulthandler.cancel_dump_traceback_later()


def write(out_dir: Path, rank: int, record: dict) -> None:
    # Written then renamed, so a reader polling for the file never sees half of it.
    partial = out_dir / f"rank{rank}.json.partial"
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.rename(out_dir / f"rank{rank}.json")


def run_single(out_dir: Path) -> None:
    model = build_model()
    eos = early_eos(model)
    calls = count_forwards(model)
    for rank in range(WORLD_SIZE):
        calls[0] = 0
        tokens = generate_with_deadline(model, rank_batch(rank), out_dir, rank, **generation_kwargs(rank, eos))
        record = {
            "mode": "single",
            "eos": eos,
            "pad": PAD,
            "max_new_tokens": NEW_TOKENS,
            "ids": tokens.tolist(),
            "forwards": calls[0],
        }
        write(out_dir, rank, record)


def run_distributed(mode: str, out_dir: Path) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    # Skip the JIT build of DeepSpeed's shared-memory comm op (g++, ~24 s); gloo does the work.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != WORLD_SIZE:
        raise ValueError(f"run with --nproc_per_node {WORLD_SIZE}, got a world of {world}")

    model = build_model()
    eos = early_eos(model)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,  # required by the config parser; nothing trains
        "zero_optimization": {
            "stage": 3,
            # Partition every parameter: by default ZeRO-3 keeps parameters under 1e5 elements (all of this
            # tiny model's) whole on every rank, and then a forward would gather nothing and could not hang.
            "stage3_param_persistence_threshold": 0,
        },
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
    }
    # No optimizer: DeepSpeed builds its inference-only ZeRO-3 engine (parameter partitioning, no optimizer).
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    module = engine.module
    calls = count_forwards(module)
    kwargs = generation_kwargs(rank, eos)
    if mode == "nosync":
        kwargs["synced_gpus"] = False
    tokens = generate_with_deadline(module, rank_batch(rank), out_dir, rank, **kwargs)
    write(
        out_dir,
        rank,
        {
            "mode": mode,
            "eos": eos,
            "pad": PAD,
            "max_new_tokens": NEW_TOKENS,
            "ids": tokens.tolist(),
            "forwards": calls[0],
            "partitioned": zero3_partitioned(module),
            # What transformers would pick on its own: it looks for HfDeepSpeedConfig, not at the model.
            "transformers_zero3_default": is_deepspeed_zero3_enabled(),
        },
    )
    if mode == "nosync" and rank == 0:
        # Any collective here (even the barrier below) would be matched against rank 1's pending gather.
        # Wait without one: if rank 1 is stuck its watchdog ends it and torchrun then ends this rank; if
        # rank 1 finishes after all, both go on to the barrier and the test sees no hang.
        deadline = time.monotonic() + 3 * GENERATE_DEADLINE_S
        while not (out_dir / "rank1.json").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("rank 1 neither finished nor was ended by its watchdog")
            time.sleep(0.1)
    # A barrier before tearing down gloo: destroying right after a collective sometimes aborts a rank.
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.mode == "single":
        run_single(args.out_dir)
    else:
        run_distributed(args.mode, args.out_dir)


if __name__ == "__main__":
    main()
