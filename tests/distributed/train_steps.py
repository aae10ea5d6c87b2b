"""A few MokA training steps on a tiny random Llama, in one of three modes, for tests/test_distributed.py.

    export PYTHONPATH=.   # from the repository root: the worker imports tests.helpers
    python tests/distributed/train_steps.py single OUT_DIR                                   # the reference
    torchrun --standalone --nproc_per_node 2 tests/distributed/train_steps.py ddp OUT_DIR    # torch DDP, gloo
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/distributed/train_steps.py zero3 OUT_DIR

Every mode trains on the same fixed global batches (4 samples per step); each rank takes its contiguous
shard. The loss is the token cross-entropy summed over the rank's label tokens, divided by the GLOBAL
label count and multiplied by the world size (DDP and DeepSpeed average gradients over ranks), so every
mode follows the same trajectory. Rank 0 writes ``OUT_DIR/losses.json`` (the global loss of every step)
and every mode saves the final adapter to ``OUT_DIR/adapter`` (``single`` also saves the initial one to
``OUT_DIR/adapter_init``).

The batches are built so that with 2 ranks rank 1 never sees an audio token and, on odd steps, no media
at all (and rank 0 sees no visual token there). An adapter parameter that left the graph would make DDP
raise (no ``find_unused_parameters``); ``single`` and ``ddp`` also check after every backward that each
adapter parameter has a gradient. (ZeRO-3 does not hang on such a parameter here: DeepSpeed zero-fills the
missing gradients of a leaf module's parameters.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from moka_train.adapters import (
    AdapterConfig,
    adapter_named_parameters,
    count_parameters,
    inject_adapters,
    save_adapter,
    set_routing,
)
from moka_train.modality import Modality
from moka_train.training.optimizer import build_adamw
from tests.helpers import VOCAB, randomize_adapters, tiny_llama

MODES = ("single", "ddp", "zero3")
GLOBAL_BATCH = 4
LENGTH = 16
MODEL_SEED = 0
B_SEED = 1
DATA_SEED = 1234

# One layout per sample: (kind, count) segments; kinds: text, question (text in the question span),
# visual, audio (media tokens: routing only, the ids are random as for any token), answer (text with
# labels). Samples shorter than LENGTH are right-padded (modality -1, attention 0). A media block right
# before an answer predicts its first token, so that even the last layer's media A's get gradients.
LAYOUTS = [
    [  # even steps: rank 0 = samples 0, 1 (all modalities); rank 1 = samples 2, 3 (no audio; 3 has no media)
        [("text", 2), ("visual", 4), ("audio", 3), ("question", 3), ("answer", 4)],
        [("text", 2), ("visual", 5), ("question", 4), ("answer", 3)],
        [("text", 2), ("question", 4), ("visual", 3), ("answer", 3)],
        [("text", 3), ("question", 5), ("answer", 4)],
    ],
    [  # odd steps: rank 0 has audio only (sample 1 without a question span); rank 1 is text only
        [("text", 1), ("audio", 5), ("text", 1), ("question", 3), ("answer", 3)],
        [("text", 2), ("audio", 2), ("answer", 3)],
        [("text", 2), ("question", 4), ("answer", 4)],
        [("text", 4), ("question", 2), ("answer", 5)],
    ],
]


def build_model(method: str = "moka") -> torch.nn.Module:
    """A tiny random Llama with ``method`` (MokA by default) on every projection, B re-initialised to small
    random values (B = 0 would leave every A without gradient on the first step)."""
    model = tiny_llama(seed=MODEL_SEED)
    inject_adapters(model, AdapterConfig(method=method, rank=4, alpha=16, modalities=["text", "visual", "audio"]))
    randomize_adapters(model, seed=B_SEED, std=0.05)
    return model.train()


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """The step's global batch (the same on every rank): input_ids, attention_mask, modality_ids,
    question_mask, labels (-100 outside the answers), each [GLOBAL_BATCH, LENGTH]."""
    layouts = LAYOUTS[step % len(LAYOUTS)]
    # Steps s and s + 2 see the same batch, so the test can check that training lowers the loss.
    generator = torch.Generator().manual_seed(DATA_SEED + step % len(LAYOUTS))
    input_ids = torch.randint(3, VOCAB, (GLOBAL_BATCH, LENGTH), generator=generator)
    modality_ids = torch.full((GLOBAL_BATCH, LENGTH), int(Modality.PAD), dtype=torch.long)
    question_mask = torch.zeros(GLOBAL_BATCH, LENGTH, dtype=torch.bool)
    labels = torch.full((GLOBAL_BATCH, LENGTH), -100, dtype=torch.long)
    for row, layout in enumerate(layouts):
        position = 0
        for kind, count in layout:
            span = slice(position, position + count)
            modality = Modality.parse(kind) if kind in ("visual", "audio") else Modality.TEXT
            modality_ids[row, span] = int(modality)
            question_mask[row, span] = kind == "question"
            if kind == "answer":
                labels[row, span] = input_ids[row, span]
            position += count
        assert position <= LENGTH, f"layout {row} of step {step} is longer than {LENGTH}"
    attention_mask = (modality_ids != int(Modality.PAD)).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "modality_ids": modality_ids,
        "question_mask": question_mask,
        "labels": labels,
    }


def global_label_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    per_rank = GLOBAL_BATCH // world
    return {key: value[rank * per_rank : (rank + 1) * per_rank] for key, value in batch.items()}


def step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], label_count: int, world: int) -> torch.Tensor:
    """Summed token CE of this rank's labels / the global label count * world size."""
    set_routing(model, batch["modality_ids"], batch["question_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss / label_count * world


def check_every_adapter_gradient(model: torch.nn.Module, step: int) -> None:
    missing = [name for name, p in adapter_named_parameters(model) if p.grad is None]
    if missing:
        raise RuntimeError(f"step {step}: {len(missing)} adapter parameters got no gradient, e.g. {missing[:3]}")


def optimizer_for(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # The recipe's optimizer (fused AdamW where torch has the kernel), so the parity runs test what trains.
    return build_adamw((p for p in model.parameters() if p.requires_grad), lr=lr, weight_decay=0.01)


def train(mode: str, out_dir: Path, steps: int, lr: float, method: str = "moka") -> list[float]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out_dir = Path(out_dir)
    distributed = mode != "single"
    if distributed:
        import torch.distributed as dist

        if mode == "zero3":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed

            # Skip the JIT build of DeepSpeed's shared-memory comm op (g++, ~24 s); gloo does the work.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
            deepspeed.init_distributed(dist_backend="gloo")
        else:
            dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if GLOBAL_BATCH % world:
        raise ValueError(f"the global batch of {GLOBAL_BATCH} does not split over {world} ranks")

    model = build_model(method)
    if mode == "single":
        save_adapter(model, out_dir / "adapter_init")
    optimizer = optimizer_for(model, lr)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        engine = DistributedDataParallel(model)  # no find_unused_parameters: every adapter parameter must be used
    elif mode == "zero3":
        # The embeddings are frozen, so layer 0's q/k/v inputs do not require grad: the adapted layers
        # handle that under ZeRO-3 themselves (see moka_train.adapters.layer), no workaround here.
        ds_config = {
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
            "gradient_accumulation_steps": 1,
            "train_batch_size": GLOBAL_BATCH,
            "zero_optimization": {"stage": 3},
            "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told otherwise; the reference does not
            "fp16": {"enabled": False},
            "bf16": {"enabled": False},
            "steps_per_print": 10**9,
        }
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    else:
        engine = model

    losses: list[float] = []
    for step in range(steps):
        batch = global_batch(step)
        label_count = global_label_count(batch)
        loss = step_loss(engine, shard(batch, rank, world), label_count, world)
        if mode == "zero3":
            engine.backward(loss)
            engine.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            check_every_adapter_gradient(model, step)
            optimizer.step()
        reported = loss.detach().clone() / world
        if distributed:
            dist.all_reduce(reported)
        losses.append(float(reported))

    # Under ZeRO-3 every rank must take part in the gather; only rank 0 writes.
    save_adapter(engine.module if distributed else model, out_dir / "adapter")
    if rank == 0:
        # Counted on the live (under ZeRO-3: partitioned) model, so ds_numel must stand in for numel.
        counts = count_parameters(engine.module if distributed else model)
        record = {
            "mode": mode,
            "method": method,
            "world_size": world,
            "steps": steps,
            "lr": lr,
            "losses": losses,
            "parameter_counts": {"adapter": counts.adapter, "trainable": counts.trainable, "total": counts.total},
        }
        (out_dir / "losses.json").write_text(json.dumps(record, indent=2) + "\n")
    if distributed:
        # A barrier before tearing down gloo: destroying right after a collective sometimes aborts a rank.
        dist.barrier()
        dist.destroy_process_group()
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--method", default="moka", help="the adapter method (moka_train.adapters)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train(args.mode, args.out_dir, args.steps, args.lr, args.method)


if __name__ == "__main__":
    main()
