"""A DeepSpeed engine (one process, CPU, gloo) given our scheduler and a resolved preset, for
tests/test_training_config.py: prints the learning rate of each step and the engine's clipping as JSON.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 1 tests/distributed/deepspeed_schedule.py zero2
"""

from __future__ import annotations

import importlib
import json
import sys

import torch


def main(preset: str) -> None:
    import deepspeed

    from moka_train.training.deepspeed_config import load_deepspeed_config, resolve_deepspeed_config
    from moka_train.training.schedule import build_lr_scheduler

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT build (stack_cpu.md)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = build_lr_scheduler(optimizer, "cosine", total_steps=10, warmup_ratio=0.2)
    config = resolve_deepspeed_config(
        load_deepspeed_config(preset),
        micro_batch_size=2,
        gradient_accumulation_steps=1,
        world_size=1,
        precision="fp32",
        gradient_clipping=0.5,
    )
    engine, _, _, engine_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    lrs = []
    for _ in range(6):
        loss = engine(torch.randn(2, 8)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        lrs.append(engine.get_lr()[0])
    print(json.dumps({"lrs": lrs, "ours": engine_scheduler is scheduler, "clipping": engine.gradient_clipping()}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
