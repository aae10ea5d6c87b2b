"""The optimizer over the trainable parameters: torch's AdamW, fused where PyTorch has the kernel for them.

Left to its default, torch's AdamW loops over the parameter tensors in Python on the CPU (a dozen operations per
tensor) and runs a few multi-tensor kernels per step on a GPU. ``fused=True`` updates every tensor of a device
and dtype in one kernel; transformers' Trainer defaults to it on torch >= 2.8 (``adamw_torch_fused``). The
adapters make the loop's cost matter: MokA has one A per modality in every adapted layer, so 179 trainable
tensors on the demo model against LoRA's 151, and their update took 2.8 ms in the loop, 1.0 ms fused, of a
CPU step of about 40 ms (README, "Training step"). The update is AdamW's to rounding
(``tests/test_optimizer.py``), and a parameter without a gradient is left untouched, as by the loop
(``DeepSpeedEngine``'s skipped steps rely on it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

# The device types with a fused AdamW kernel in every torch this project supports (>= 2.4).
FUSED_DEVICE_TYPES = ("cpu", "cuda")


def decay_groups(parameters: Iterable[Tensor], weight_decay: float) -> list[dict]:
    """Parameter groups for AdamW: weight decay on the matrices (and higher), none on the vectors (biases, norm
    gains, DoRA's magnitudes), as nanoGPT does; transformers' Trainer exempts biases and norms by name but decays
    DoRA's magnitude vector. Decaying a LayerNorm gain or a magnitude pulls it towards zero, not towards the
    frozen model. Without decay, one group."""
    parameters = list(parameters)
    if weight_decay == 0:
        return [{"params": parameters, "weight_decay": 0.0}]
    groups = [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_adamw(parameters: Iterable[Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW over ``parameters`` (torch's betas and eps; ``weight_decay`` on the matrices only, see
    ``decay_groups``), fused when every tensor is a floating-point tensor on a device type with the kernel, else
    torch's default implementation."""
    parameters = list(parameters)
    if not parameters:
        raise ValueError("no trainable parameters to optimize")
    fused = all(p.is_floating_point() and p.device.type in FUSED_DEVICE_TYPES for p in parameters)
    return torch.optim.AdamW(decay_groups(parameters, weight_decay), lr=lr, fused=fused or None)
