"""Saving and loading adapters.

Every method saves ``adapter_model.safetensors`` (names relative to the backbone, the contract) and
``adapter_config.json`` (the AdapterConfig with ``format_version``). Methods with ``peft_layout`` (LoRA, DoRA)
save in peft's own layout instead, so ``PeftModel.from_pretrained`` loads them, and peft's LoRA / DoRA
directories load here. A method's ``peft_options`` class attribute names the peft ``LoraConfig`` options that
select it (DoRA: ``use_dora: true``; LoRA: none).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moka_train.adapters.config import AdapterConfig
from moka_train.adapters.model import _find_handle, adapter_handle, adapter_named_parameters, inject_adapters
from moka_train.adapters.registry import available_methods, get_method
from moka_train.checkpoint_io import full_precision, gathered, is_writer, write_atomic, write_text_atomic

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
# Our parameter name -> peft's saved key, per adapter tensor (peft drops the adapter name, and DoRA's ".weight").
_PEFT_KEYS = {
    ".lora_A.default.weight": ".lora_A.weight",
    ".lora_B.default.weight": ".lora_B.weight",
    ".lora_magnitude_vector.default.weight": ".lora_magnitude_vector",
}
# peft LoRA options whose behaviour our lora does not reproduce: loading them would give other numbers (except
# where a method's ``peft_options`` set one: use_dora selects dora).
_PEFT_UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "exclude_modules": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
}
# peft LoRA options that leave the forward of the saved weights as our lora computes it (bookkeeping, and
# initialisation schemes whose result is in the weights). Any other option, including one a later peft adds,
# must be unset (None, False or empty), or the directory is refused rather than loaded with other numbers.
_PEFT_NEUTRAL = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "init_lora_weights",
    "layers_pattern",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "runtime_config",
    "ensure_weight_tying",
}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights on the CPU, DeepSpeed's fp32 masters where it keeps them, gathered first under ZeRO-3
    (call it on every rank there)."""
    named = list(adapter_named_parameters(model))
    with gathered(p for _, p in named):
        return {name: full_precision(p).detach().to("cpu", copy=True).contiguous() for name, p in named}


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Save the adapter weights and config to ``directory``. Under ZeRO-3 call it on every rank; rank 0 writes."""
    handle = adapter_handle(model)
    config = handle.config
    weights = adapter_state_dict(model)
    directory = Path(directory)
    if not is_writer():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if get_method(config.method).peft_layout:
        weights = {_PEFT_PREFIX + _to_peft_key(name): tensor for name, tensor in weights.items()}
        config_dict = _peft_config_dict(config, base_model_name_or_path)
    else:
        config_dict = {"library": "moka_train", **config.to_dict(), "base_model_name_or_path": base_model_name_or_path}
    write_atomic(directory / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
    write_text_atomic(directory / CONFIG_NAME, text)
    return directory


def read_adapter_config(directory: str | os.PathLike) -> AdapterConfig:
    """The AdapterConfig saved in ``directory`` (ours or peft's LoRA config)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    try:
        if "peft_type" in raw:
            return _config_from_peft(raw)
        raw.pop("library", None)
        raw.pop("base_model_name_or_path", None)
        return AdapterConfig.from_dict(raw)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a saved adapter into ``model``: a plain backbone gets the adapter injected first; a model that
    already carries one must carry the same config. Keys and shapes must match exactly."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    handle = _find_handle(model)
    if handle is None:
        inject_adapters(model, config)
    elif not _same_adapter(handle.config, config):
        raise ValueError(
            f"the model carries a different adapter than {directory / CONFIG_NAME}: {handle.config} vs {config}"
        )
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no adapter weights at {path}")
    try:
        weights = load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    if get_method(config.method).peft_layout:
        weights = {_from_peft_key(name, path): tensor for name, tensor in weights.items()}
        options = peft_options(config.method)
        try:
            load_adapter_weights(model, weights, source=str(path))
        except ValueError as error:
            if not options:
                raise
            described = ", ".join(f"{key}={value!r}" for key, value in options.items())
            raise ValueError(f"{error} ({directory / CONFIG_NAME} sets {described})") from None
        return model
    load_adapter_weights(model, weights, source=str(path))
    return model


def load_adapter_weights(model: nn.Module, weights: dict[str, Tensor], source: str = "state dict") -> None:
    """Copy ``weights`` into the adapter parameters, refusing missing, unexpected or mis-shaped entries."""
    expected = dict(adapter_named_parameters(model))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model's adapter: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    with gathered(expected.values(), modifier_rank=0), torch.no_grad():
        for name, parameter in expected.items():
            tensor = weights[name]
            if tuple(tensor.shape) != tuple(parameter.shape):
                raise ValueError(
                    f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(parameter.shape)}"
                )
            parameter.copy_(tensor.to(dtype=parameter.dtype, device=parameter.device))


# -- peft's LoRA layout ------------------------------------------------------------------------------


def peft_options(method: str) -> dict:
    """The peft ``LoraConfig`` options that select ``method`` in peft's layout ({} for plain LoRA)."""
    return dict(getattr(get_method(method), "peft_options", {}))


def _to_peft_key(name: str) -> str:
    # peft's saved keys drop the adapter name: ...q_proj.lora_A.default.weight -> ...q_proj.lora_A.weight, and
    # DoRA's magnitude is saved as ...q_proj.lora_magnitude_vector.
    for ours, peft in _PEFT_KEYS.items():
        if name.endswith(ours):
            return name[: -len(ours)] + peft
    return name


def _from_peft_key(name: str, source: Path) -> str:
    for ours, peft in _PEFT_KEYS.items():
        if name.startswith(_PEFT_PREFIX) and name.endswith(peft):
            return name[len(_PEFT_PREFIX) : -len(peft)] + ours
    raise ValueError(f"{source}: {name!r} is not a peft LoRA key (base_model.model.<module>.lora_A.weight)")


# The AdapterConfig fields peft's layout stores; the others (modalities, cross_attn_lambda, ...) mean nothing to
# the methods saved in it, and a run's config may set them (an experiment's modalities and lambda) to other values
# than the defaults a peft config reads back as.
_PEFT_LAYOUT_FIELDS = ("method", "rank", "alpha", "dropout", "target_modules")


def _same_adapter(a: AdapterConfig, b: AdapterConfig) -> bool:
    """Equal configs, ``target_modules`` compared as a set: peft's layout (LoRA's, DoRA's) stores them sorted, and
    only the fields it stores."""
    first, second = a.to_dict(), b.to_dict()
    first["target_modules"], second["target_modules"] = sorted(a.target_modules), sorted(b.target_modules)
    if a.method == b.method and get_method(a.method).peft_layout:
        first = {key: first[key] for key in _PEFT_LAYOUT_FIELDS}
        second = {key: second[key] for key in _PEFT_LAYOUT_FIELDS}
    return first == second


def _peft_config_dict(config: AdapterConfig, base_model_name_or_path: str | None) -> dict:
    from peft import LoraConfig

    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=sorted(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        **peft_options(config.method),
    )
    with tempfile.TemporaryDirectory() as tmp:
        # peft's own writer, so the file is exactly what PeftModel.from_pretrained expects.
        peft_config.save_pretrained(tmp)
        return json.loads((Path(tmp) / CONFIG_NAME).read_text(encoding="utf-8"))


def _method_from_peft(raw: dict) -> str:
    """The peft-layout method whose ``peft_options`` the saved config sets, the most specific one (dora over lora)."""
    methods = [m for m in available_methods() if get_method(m).peft_layout]
    matching = [m for m in methods if all(raw.get(k) == v for k, v in peft_options(m).items())]
    if not matching:
        raise ValueError(f"no moka_train method reads this peft LoRA config (peft-layout methods: {methods})")
    return max(matching, key=lambda m: len(peft_options(m)))


def _config_from_peft(raw: dict) -> AdapterConfig:
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"peft_type {raw.get('peft_type')!r} is not supported; only peft LoRA directories load")
    method = _method_from_peft(raw)
    selected = peft_options(method)
    for option, value in raw.items():
        if option in selected or option in _PEFT_NEUTRAL:
            continue
        unset = value is None or (value == _PEFT_UNSUPPORTED[option] if option in _PEFT_UNSUPPORTED else not value)
        if not unset:
            raise ValueError(f"peft option {option}={value!r} is not supported by moka_train's {method}")
    targets = raw.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(f"peft target_modules must be a list of module names, got {targets!r}")
    return AdapterConfig(
        method=method,
        rank=raw["r"],
        alpha=raw["lora_alpha"],
        dropout=raw.get("lora_dropout", 0.0),
        target_modules=sorted(targets),
    )
