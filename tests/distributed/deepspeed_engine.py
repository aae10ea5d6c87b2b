"""A DeepSpeed engine in one process (CPU, gloo) around a small linear model, for tests/test_training_config.py;
each check prints its findings as one JSON line.

- ``schedule <preset>``: DeepSpeed's engine given our scheduler and the resolved preset: the learning rate after
  each step and the engine's clipping;
- ``nonfinite <case>``: our DeepSpeedEngine (ZeRO-2, bf16) given a NaN gradient behind a finite loss, with the
  config as ``resolve_deepspeed_config`` writes it (``resolved``) or with ``bf16.check_grad_overflow`` false
  (``unchecked``, DeepSpeed's default before its PR #8035);
- ``accumulation <case>``: the gradient our DeepSpeedEngine (ZeRO-2, bf16) sums over 8 micro-steps, with the
  config as resolved (``fp32``) or with ``data_types.grad_accum_dtype`` bf16 (``bf16``, DeepSpeed's default).

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 1 tests/distributed/deepspeed_engine.py \
        schedule:zero2 nonfinite:resolved ...   (one JSON object, keyed by request)
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import torch

from moka_train.training.deepspeed_config import load_deepspeed_config, resolve_deepspeed_config
from moka_train.training.schedule import build_lr_scheduler


def schedule(preset: str) -> dict[str, Any]:
    import deepspeed

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
    return {"lrs": lrs, "ours": engine_scheduler is scheduler, "clipping": engine.gradient_clipping()}


def nonfinite(case: str) -> dict[str, Any]:
    from moka_train.training.engine import DeepSpeedEngine

    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = build_lr_scheduler(optimizer, "constant", total_steps=10, warmup_ratio=0.0)
    settings = dict(micro_batch_size=2, gradient_accumulation_steps=1, world_size=1, gradient_clipping=0.0)
    config = resolve_deepspeed_config(load_deepspeed_config("zero2"), precision="bf16", **settings)
    if case == "unchecked":
        config["bf16"]["check_grad_overflow"] = False
    engine = DeepSpeedEngine(model, optimizer, scheduler, config, world_size=1)
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    engine.module.bias.register_hook(lambda grad: grad * float("nan"))
    loss = engine.engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().pow(2).mean()
    engine.backward(loss)
    report = {"check_grad_overflow": config["bf16"].get("check_grad_overflow"), "loss": loss.item()}
    try:
        result = engine.step()
        report.update(applied=result.applied, nonfinite=result.nonfinite_gradients)
    except RuntimeError as error:
        report["error"] = str(error)
    after = [p.detach().float() for p in engine.module.parameters()]
    report["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    return report


def accumulation(case: str) -> dict[str, Any]:
    """Eight micro-steps of ZeRO-2 in bf16 whose gradients are 256, then 1 seven times: summed in fp32 they make
    263; in bf16 (8 bits of mantissa: 256 + 1 rounds back to 256) they stay 256."""
    from moka_train.training.engine import DeepSpeedEngine

    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = build_lr_scheduler(optimizer, "constant", total_steps=10, warmup_ratio=0.0)
    settings = dict(micro_batch_size=1, gradient_accumulation_steps=8, world_size=1, gradient_clipping=0.0)
    config = resolve_deepspeed_config(load_deepspeed_config("zero2"), precision="bf16", **settings)
    if case == "bf16":
        config["data_types"]["grad_accum_dtype"] = "bf16"
    engine = DeepSpeedEngine(model, optimizer, scheduler, config, world_size=1)
    for c in (256.0, *[1.0] * 7):
        x = torch.full((1, 1), c, dtype=torch.bfloat16)
        engine.backward(engine.engine(x).float().sum())  # d loss / d w = c
    engine.step()
    norm = float(engine.engine.get_global_grad_norm())
    return {"grad_accum_dtype": config["data_types"]["grad_accum_dtype"], "norm": norm}


CHECKS = {"schedule": schedule, "nonfinite": nonfinite, "accumulation": accumulation}


def main(requests: list[str]) -> None:
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT build (stack_cpu.md)
    deepspeed.init_distributed(dist_backend="gloo")
    reports = {}
    for request in requests:  # one launch for all (each launch costs seconds of imports)
        check, argument = request.split(":")
        torch.manual_seed(0)
        reports[request] = CHECKS[check](argument)
    print(json.dumps(reports))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
