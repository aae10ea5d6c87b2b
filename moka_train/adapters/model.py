"""Putting adapters into a backbone and driving them: injection, routing, partial-modality inference,
parameter bookkeeping."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from moka_train.adapters.config import AdapterConfig
from moka_train.adapters.layer import AdaptedLinear
from moka_train.adapters.registry import get_method
from moka_train.adapters.routing import RoutingState
from moka_train.modality import Modality

_HANDLE = "_moka_adapter"


@dataclass
class AdapterHandle:
    """What ``inject_adapters`` attaches to the model: its config, routing state and cache-offset hook."""

    config: AdapterConfig
    routing: RoutingState
    hook: Any


def inject_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap every ``nn.Linear`` of ``model`` whose last name component is in ``config.target_modules`` with
    the method's adapted layer, freeze everything else, and return ``model`` (modified in place).

    Pass the backbone (the LLM), not a whole multimodal model: encoders and projectors never carry adapters.
    """
    if _find_handle(model) is not None:
        raise ValueError("this model already carries adapters; load or inject into a fresh backbone")
    layer_cls = get_method(config.method)
    routing = RoutingState(config.modalities)
    targets = set(config.target_modules)
    # Match everything first, so a config error leaves the model untouched.
    matches = [(name, module) for name, module in model.named_modules() if name.rpartition(".")[2] in targets]
    for name, module in matches:
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}, not an nn.Linear; "
                "remove it from AdapterConfig.target_modules"
            )
    missing = sorted(targets - {name.rpartition(".")[2] for name, _ in matches})
    if missing:
        linear_names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"AdapterConfig.target_modules {missing} match no nn.Linear in {type(model).__name__}; "
            f"its linear layers are named {linear_names}"
        )
    for name, module in matches:
        parent_name, _, leaf = name.rpartition(".")
        layer = layer_cls(module, config, routing)
        layer.train(module.training)  # new dropout modules would otherwise be in training mode in an eval model
        setattr(model.get_submodule(parent_name), leaf, layer)
    adapter_ids = {id(p) for _, p in adapter_named_parameters(model)}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in adapter_ids)
    hook = model.register_forward_pre_hook(_record_cache_offset(routing), with_kwargs=True)
    setattr(model, _HANDLE, AdapterHandle(config, routing, hook))
    return model


def _record_cache_offset(routing: RoutingState):
    """Forward pre-hook: tell the routing where this call starts in the KV cache, so cached decode steps
    are recognised by position rather than by their length."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        routing.set_offset(cache_offset(kwargs))

    return hook


def cache_offset(kwargs: dict) -> int:
    """Absolute position of the first input token: from ``cache_position`` (transformers < 5.24, which passes
    it), else the length of the KV cache, ``cache`` (5.24+) or ``past_key_values`` (earlier; pass either by
    keyword), else 0."""
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        return int(cache_position.reshape(-1)[0])
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple cache: (layers)(key, value) [B, heads, L, d]


def _find_handle(model: nn.Module) -> AdapterHandle | None:
    # Accept the model itself or a wrapper around it (DDP, a DeepSpeed engine: ``.module``).
    while model is not None:
        handle = getattr(model, _HANDLE, None)
        if handle is not None:
            return handle
        model = getattr(model, "module", None)
    return None


def carries_adapters(model: nn.Module) -> bool:
    """Whether ``inject_adapters`` (or ``load_adapter``) has put adapters into ``model``."""
    return _find_handle(model) is not None


def adapter_handle(model: nn.Module) -> AdapterHandle:
    handle = _find_handle(model)
    if handle is None:
        raise ValueError(f"{type(model).__name__} carries no adapters: call inject_adapters(model, config) first")
    return handle


def get_adapter_config(model: nn.Module) -> AdapterConfig:
    return adapter_handle(model).config


def set_routing(model: nn.Module, modality_ids: Tensor | None, question_mask: Tensor | None = None) -> None:
    """Bind the routing of the next forward passes (until the next call).

    ``modality_ids`` [B, L] integer (``Modality`` ids, -1 for pads), ``question_mask`` [B, L] bool (the
    task text of the user turn). They cover the prompt positions [0, L); later positions (cached decoding)
    are text. ``set_routing(model, None)`` means every token is text.
    """
    adapter_handle(model).routing.bind(modality_ids, question_mask)


@contextlib.contextmanager
def routing(model: nn.Module, modality_ids: Tensor | None, question_mask: Tensor | None = None) -> Iterator[None]:
    """``with routing(model, ids, question):`` binds for the block and unbinds after it. With gradient
    checkpointing the backward pass recomputes layers, so keep ``backward()`` inside the block."""
    state = adapter_handle(model).routing
    state.bind(modality_ids, question_mask)
    try:
        yield
    finally:
        state.unbind()


def set_active_modalities(model: nn.Module, modalities: Iterable[str | int | Modality] | None) -> None:
    """Partial-modality inference: keep the adapter path only for tokens of ``modalities``; every other
    token sees W0 alone. ``None`` restores the full adapter. A runtime switch, never saved."""
    adapter_handle(model).routing.set_active(modalities)


@contextlib.contextmanager
def active_modalities(model: nn.Module, modalities: Iterable[str | int | Modality]) -> Iterator[None]:
    state = adapter_handle(model).routing
    previous = state.active
    state.set_active(modalities)
    try:
        yield
    finally:
        state.set_active(previous)


def take_aux_loss(model: nn.Module) -> Tensor | None:
    """The adapter's auxiliary training loss of the last forward (the sum of the terms its layers added, e.g.
    LoRAMoE's load balancing), or None for methods that add none. The caller adds it to the task loss; the terms
    are dropped when the next batch's routing is bound."""
    return adapter_handle(model).routing.take_aux_loss()


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def adapter_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Adapter parameters with their checkpoint names, relative to ``model``
    (``model.layers.0.self_attn.q_proj.lora_A.visual.weight``)."""
    for layer_name, layer in adapted_layers(model):
        for name, parameter in layer.adapter_parameters():
            yield f"{layer_name}.{name}", parameter


def numel(parameter: nn.Parameter) -> int:
    """Element count, also for a ZeRO-3 partitioned parameter (whose local tensor is empty)."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


@dataclass(frozen=True)
class ParameterCount:
    adapter: int
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"adapter {self.adapter:,} | trainable {self.trainable:,} | total {self.total:,} ({share:.3f}% trainable)"
        )


def count_parameters(model: nn.Module) -> ParameterCount:
    """Adapter, trainable and total parameter counts (each shared tensor counted once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return ParameterCount(
        adapter=sum(numel(p) for _, p in adapter_named_parameters(model)),
        trainable=sum(numel(p) for p in unique if p.requires_grad),
        total=sum(numel(p) for p in unique),
    )
