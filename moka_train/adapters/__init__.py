"""MokA and the adapters it is measured against, on any backbone built from ``nn.Linear``.

from moka_train.adapters import AdapterConfig, inject_adapters, set_routing
model = inject_adapters(llm, AdapterConfig(method="moka", rank=4, alpha=16))
set_routing(model, modality_ids, question_mask)   # [B, L] long, [B, L] bool
out = model(inputs_embeds=..., attention_mask=...)
"""

from moka_train.adapters.checkpoint import load_adapter, save_adapter
from moka_train.adapters.config import DEFAULT_TARGET_MODULES, FORMAT_VERSION, AdapterConfig
from moka_train.adapters.layer import AdaptedLinear
from moka_train.adapters.model import (
    ParameterCount,
    active_modalities,
    adapted_layers,
    adapter_named_parameters,
    carries_adapters,
    count_parameters,
    get_adapter_config,
    inject_adapters,
    routing,
    set_active_modalities,
    set_routing,
    take_aux_loss,
)
from moka_train.adapters.registry import available_methods, get_method, register_method
from moka_train.adapters.routing import RoutingError

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "FORMAT_VERSION",
    "AdaptedLinear",
    "AdapterConfig",
    "ParameterCount",
    "RoutingError",
    "active_modalities",
    "adapted_layers",
    "adapter_named_parameters",
    "available_methods",
    "carries_adapters",
    "count_parameters",
    "get_adapter_config",
    "get_method",
    "inject_adapters",
    "load_adapter",
    "register_method",
    "routing",
    "save_adapter",
    "set_active_modalities",
    "set_routing",
    "take_aux_loss",
]
