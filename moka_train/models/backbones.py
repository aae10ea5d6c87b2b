"""Backbone LLMs: a local LLaMA-2 / LLaMA-3 / Qwen2 / Qwen2.5 checkpoint directory (or Qwen2.5-VL's language
model), or a tiny random one for tests and the demo. Always frozen: only adapters and the multimodal parts
train. Presets live in ``configs/model/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from moka_train.models.qwen2_5_vl_text import load_qwen2_5_vl_language_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _load_causal_lm(directory: Path, dtype: torch.dtype) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)


# model_type in config.json -> loader. The paper's backbones are LLaMA-2/3 ("llama"), Qwen2/2.5 ("qwen2") and
# Qwen2.5-VL used as a text LLM; other decoder-only types would need their adapter targets checked first.
LOADERS: dict[str, Callable[[Path, torch.dtype], PreTrainedModel]] = {
    "llama": _load_causal_lm,
    "qwen2": _load_causal_lm,
    "qwen2_5_vl": load_qwen2_5_vl_language_model,
}
RANDOM_MODEL_TYPES = ("llama", "qwen2")


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.requires_grad_(False)
    return model.eval()


def keep_only_token_ids(model: PreTrainedModel) -> PreTrainedModel:
    """Drop the checkpoint's decoding defaults (Qwen's instruct checkpoints ship temperature, top_p and a
    repetition_penalty that ``generate`` would apply even when greedy), keeping its special token ids (the
    instruct models' end-of-turn ids among them). Decoding settings come from our config only."""
    source = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id
    )
    return model


def load_backbone(path: str | os.PathLike, dtype: str | torch.dtype = "bf16") -> PreTrainedModel:
    """A frozen causal LM from a local Hugging Face checkpoint directory (``local_files_only``)."""
    dtype = parse_dtype(dtype)
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"backbone checkpoint {directory}: no config.json there (model.backbone.path must be a local Hugging "
            "Face checkpoint directory; nothing is downloaded)"
        )
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type not in LOADERS:
        raise ValueError(f"backbone {directory} has model_type {model_type!r}; supported: {sorted(LOADERS)}")
    return keep_only_token_ids(freeze(LOADERS[model_type](directory, dtype)))


def build_random_backbone(
    model_type: str, seed: int = 0, dtype: str | torch.dtype = "fp32", **config
) -> PreTrainedModel:
    """A frozen random-weight causal LM of ``model_type`` (``llama``, ``qwen2``) with the given config
    fields: the tiny backbones of the tests and the CPU demo."""
    if model_type not in RANDOM_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {RANDOM_MODEL_TYPES}, got {model_type!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    return freeze(model.to(parse_dtype(dtype)))
