"""Merging a LoRA or DoRA adapter into the frozen weights: the result is the plain backbone, no adapter left.

    from moka_train.adapters.merge import merge_adapter
    plain = merge_adapter(load_adapter(backbone, "runs/lora/trainables/adapter"))
    plain.save_pretrained("merged")          # loads with AutoModelForCausalLM.from_pretrained

LoRA: ``W = W0 + s B A``; DoRA: ``W = m * (W0 + s B A) / ||W0 + s B A||_c`` (row norms). Both are computed in
float32 (float64 for a float64 layer) and cast back to the base weight's dtype. The modality-aware methods do
not merge: their delta depends on each token's modality (and MokA's cross-attention on the question), so no
single weight reproduces them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from moka_train.adapters.methods.moka import MokaFamilyLinear
from moka_train.adapters.model import _HANDLE, adapted_layers, adapter_handle
from moka_train.adapters.registry import available_methods, get_method

if TYPE_CHECKING:
    from omegaconf import DictConfig


def mergeable_methods() -> list[str]:
    """The methods whose layer class has ``merged_weight()``: those whose delta is one fixed linear map of x for
    every token (LoRA, DoRA)."""
    return [method for method in available_methods() if callable(getattr(get_method(method), "merged_weight", None))]


def check_mergeable(method: str) -> None:
    """A ValueError naming ``method`` unless it can merge into W0."""
    if method in mergeable_methods():
        return
    layer_cls = get_method(method)
    if issubclass(layer_cls, MokaFamilyLinear):
        why = "MokA's cross-attention and per-modality A's depend on the input"
    elif layer_cls.uses_routing:
        why = "its delta depends on each token's modality"
    else:
        why = "merging it is not implemented"
    raise ValueError(
        f"the {method!r} adapter cannot be merged into the backbone: {why}, so no single weight reproduces it; "
        f"only {', '.join(mergeable_methods())} merge"
    )


def merge_adapter(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every adapted layer of ``model`` (the backbone ``inject_adapters`` / ``load_adapter`` returned) by
    a plain ``nn.Linear`` holding the merged weight, remove the adapter's handle and hook, and return ``model``
    (changed in place): a plain transformers model that ``save_pretrained`` writes as such.

    The merge runs in float32 and is cast to the base weight's dtype, or to ``dtype`` if given (the whole model
    is then cast to it). Parameters keep ``requires_grad=False``, as the frozen backbone had them. Merge offline,
    on a model that DeepSpeed has not partitioned (e.g. one ``load_adapter`` built from a saved run).
    """
    handle = adapter_handle(model)
    method = handle.config.method
    check_mergeable(method)
    for name, layer in list(adapted_layers(model)):
        base = layer.base_layer
        target = dtype or base.weight.dtype  # the float32 merge cast once, to the dtype written
        with torch.no_grad():
            weight = layer.merged_weight()
            plain = nn.Linear(
                layer.in_features,
                layer.out_features,
                bias=base.bias is not None,
                device=base.weight.device,
                dtype=target,
            )
            plain.weight.copy_(weight.to(target))
            if base.bias is not None:
                plain.bias.copy_(base.bias)
        plain.requires_grad_(False)
        plain.train(base.training)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, plain)
    handle.hook.remove()
    owner = model
    while _HANDLE not in vars(owner):
        owner = owner.module  # DDP / DeepSpeed wrappers hold the model as .module
    delattr(owner, _HANDLE)
    if dtype is not None:
        model.to(dtype)
    return model


def load_run_backbone(run_dir: str | os.PathLike) -> tuple[nn.Module, DictConfig]:
    """The backbone of a finished run of scripts/train.py with its trained adapter: built from
    ``<run_dir>/config.yaml`` (``model.backbone`` and ``adapter``, through Hydra) and loaded from
    ``<run_dir>/trainables/adapter``. Returns it with the run's config."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from moka_train.adapters.checkpoint import load_adapter
    from moka_train.adapters.model import inject_adapters
    from moka_train.models.trainables import ADAPTER_DIR

    run_dir = Path(run_dir)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    if run_cfg.get("adapter") is None:
        raise ValueError(f"{run_dir} has no adapter (a stage-1 run)")
    backbone = instantiate(run_cfg.model.backbone)
    inject_adapters(backbone, instantiate(run_cfg.adapter))
    load_adapter(backbone, run_dir / "trainables" / ADAPTER_DIR)
    return backbone, run_cfg
