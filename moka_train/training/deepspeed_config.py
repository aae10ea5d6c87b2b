"""DeepSpeed configurations: JSON files in ``configs/deepspeed/`` (chosen with the Hydra group of the same
name: ``deepspeed=zero3`` reads zero3.yaml, which names zero3.json) completed from our config, never the other
way round.

The files hold what is DeepSpeed's business (ZeRO stage, offload, bucket sizes). What our config owns is
filled in here: the batch sizes, the precision and the gradient clipping. A file may leave those ``"auto"``
or absent; a concrete value that disagrees with ours is an error naming the key, not a silent winner.
Optimizer and scheduler blocks are refused: our optimizer and learning-rate schedule are handed to the
engine, so a ``WarmupDecayLR`` in a JSON cannot replace the configured schedule (the official code's bug),
and DeepSpeed's fused optimizers (JIT-compiled) are not needed. So are the settings that would let non-finite
gradients reach the weights unseen: DeepSpeed's ZeRO optimizers skip a step whose gradient norm is NaN or inf
(every rank alike) unless told not to, and ``on_nonfinite`` rests on that check.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
PRECISIONS = ("fp32", "bf16", "fp16")
AUTO = "auto"
_REFUSED = {
    "scheduler": "the learning-rate schedule comes from the training config (schedule, warmup_ratio)",
    "optimizer": "the optimizer comes from the training config (lr, weight_decay, betas)",
}
# What turns off DeepSpeed's check for non-finite gradients, and what to do instead.
_UNCHECKED = {
    "zero_optimization.stage": "ZeRO stage 0 has no ZeRO optimizer to check them: use deepspeed=none for plain DDP",
    "zero_optimization.compute_grad_norm": "ZeRO-1/2 find a NaN in fp32 through the gradient norm: remove the key",
    "bf16.check_grad_overflow": "remove the key",
}


def knows_bf16_overflow_check() -> bool:
    """Whether the installed DeepSpeed has ``bf16.check_grad_overflow`` (its config refuses unknown keys). Its
    default was False until DeepSpeed PR #8035 (2026): ZeRO-1/2 in bf16 applied NaN gradients."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return False
    return "check_grad_overflow" in DeepSpeedBF16Config.model_fields


def load_deepspeed_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A preset name from ``configs/deepspeed`` (``zero2``, ``zero2_offload``, ``zero3``) or a JSON path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{path}.json"
    elif not path.is_absolute() and not path.is_file():
        path = CONFIG_DIR / path  # `json: zero2.json` in the Hydra group configs/deepspeed/*.yaml
    if not path.is_file():
        if not CONFIG_DIR.is_dir():  # a non-editable install: the presets live in the source checkout
            raise FileNotFoundError(
                f"DeepSpeed config {path} does not exist: the presets are read from a source checkout of moka-train "
                "(pip install -e .), or give deepspeed.json=<path to a JSON file>"
            )
        presets = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist (presets: {presets})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def _fill(config: dict[str, Any], key: str, value: Any, source: str) -> None:
    current = config.get(key, AUTO)
    if current != AUTO and current != value:
        raise ValueError(f'{source}: {key} is {current!r}, but the training config gives {value!r}; set it to "auto"')
    config[key] = value


def resolve_deepspeed_config(
    config: dict[str, Any],
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    precision: str,
    gradient_clipping: float,
    source: str = "DeepSpeed config",
) -> dict[str, Any]:
    """A copy of ``config`` with our batch sizes, precision and clipping filled in (see the module doc)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for key, reason in _REFUSED.items():
        if key in config:
            raise ValueError(f"{source} has a {key!r} block; remove it: {reason}")
    zero = config.get("zero_optimization") or {}
    settings = {
        "zero_optimization.stage": zero.get("stage", 0),  # DeepSpeed's default
        "zero_optimization.compute_grad_norm": zero.get("compute_grad_norm", True),
        "bf16.check_grad_overflow": (config.get("bf16") or {}).get("check_grad_overflow", True),
    }
    for key, value in settings.items():
        if value is False or (type(value) is int and value == 0):
            raise ValueError(
                f"{source}: {key} is {json.dumps(value)}, which lets NaN or inf gradients reach the weights unseen "
                f"(on_nonfinite relies on DeepSpeed's check); {_UNCHECKED[key]}"
            )
    resolved = copy.deepcopy(config)
    _fill(resolved, "train_micro_batch_size_per_gpu", int(micro_batch_size), source)
    _fill(resolved, "gradient_accumulation_steps", int(gradient_accumulation_steps), source)
    _fill(resolved, "train_batch_size", int(micro_batch_size) * int(gradient_accumulation_steps) * world_size, source)
    # DeepSpeed clips at 1.0 when the key is absent: always say what we want.
    _fill(resolved, "gradient_clipping", float(gradient_clipping), source)
    for name in ("bf16", "fp16"):
        block = dict(resolved.get(name) or {})
        _fill(block, "enabled", precision == name, f"{source} [{name}]")
        resolved[name] = block
    if precision == "bf16" and knows_bf16_overflow_check():  # said, whatever this version's default
        resolved["bf16"]["check_grad_overflow"] = True
    if precision == "bf16" and zero.get("stage", 0) >= 2:
        # Micro-steps' gradients summed in fp32, as the plain engine's autocast over fp32 weights does: DeepSpeed
        # would sum them in the bf16 of its weights (8 bits of mantissa, over 8 micro-steps on one GPU). A file's
        # own data_types.grad_accum_dtype is kept. ZeRO-2/3 honour it inside their optimizer; ZeRO-1 would switch
        # to DeepSpeed's BF16_Optimizer instead (another checkpoint layout and overflow handling, untested here),
        # so a stage-1 file is left as it is.
        resolved["data_types"] = {"grad_accum_dtype": "fp32", **(resolved.get("data_types") or {})}
    return resolved
