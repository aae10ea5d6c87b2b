"""Qwen2.5-VL's language model as a plain ``Qwen2ForCausalLM``: the paper's "Qwen2.5-VL-7B-Instruct" column
uses it as a text LLM, with our own encoders and projectors in front instead of its vision tower.

Why a Qwen2 model with the same weights computes the same function on text:

* The decoder layers are Qwen2's: q/k/v projections with bias, o_proj without, SwiGLU MLP without bias,
  RMSNorm before attention and MLP, a final RMSNorm, and an untied (7B, 32B, 72B) or tied (3B) lm_head.
  The parameter names under the language model are Qwen2's names.
* Qwen2.5-VL's M-RoPE splits the rotary frequencies into temporal / height / width sections
  (``mrope_section``, summing to head_dim / 2) and rotates each section by its own position component. For
  text tokens the three components are the same number (the 1-D position), so every frequency is rotated by
  that position: exactly Qwen2's 1-D RoPE with the same ``rope_theta``. The M-RoPE entry of the rope
  config is dropped and the rest (theta, and any yarn-style scaling) kept.
* Qwen2.5-VL computes its attention head size as hidden_size / num_attention_heads, which is Qwen2's default
  too, so no ``head_dim`` is carried over.

This equals Qwen2.5-VL only where Qwen2.5-VL would use 1-D positions, i.e. on text. Tokens our projectors splice
in get 1-D positions like any other backbone's, not Qwen2.5-VL's 3-D ones for its own vision tokens: that is the
setting the paper measures (the LLM alone, as a text backbone).

Checkpoint layouts read (config and weights independently):

* config.json: the released hub files keep the text fields at the top level (``hidden_size``, ``rope_theta``,
  ``rope_scaling: {"type": "mrope", "mrope_section": [...]}``, ...) next to ``vision_config``; configs saved
  by newer transformers nest them under ``text_config`` (transformers 5: ``text_config.rope_parameters``).
  transformers' own ``Qwen2_5_VLConfig`` parses both, so the Qwen2 config is read off exactly the text
  config a ``Qwen2_5_VLForConditionalGeneration`` would be built from (with its defaults for absent fields).
* weights: ``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``, ``visual.*`` (released
  files, and what transformers 5 writes by default, as it saves in the original layout), or
  ``model.language_model.*``, ``model.visual.*``, ``lm_head`` (later transformers 4.x saves, and transformers 5
  with ``save_original_format=False``); one ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig

MODEL_TYPE = "qwen2_5_vl"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

VISION_PREFIXES = ("visual.", "model.visual.")
NESTED_LANGUAGE_PREFIX = "model.language_model."

# Qwen2Config fields that mean the same in Qwen2.5-VL's text config; rope and tying are handled apart.
TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
# Rope entries that only describe M-RoPE ("type" is the pre-v5 spelling of rope_type, there "mrope").
MROPE_ONLY_KEYS = ("mrope_section", "type")
# Tied parameter -> the one it shares storage with under tie_word_embeddings.
TIED_WEIGHTS = {"lm_head.weight": "model.embed_tokens.weight"}
# How many key names an error message lists.
SHOWN_KEYS = 5


def load_qwen2_5_vl_language_model(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Qwen2ForCausalLM:
    """The language model of the local Qwen2.5-VL checkpoint directory ``path`` as a ``Qwen2ForCausalLM`` in
    ``dtype``, in eval mode, with every parameter frozen. Only the language-model tensors are read.

    Raises ``FileNotFoundError`` when ``path``, its config.json or its weights are missing, and ``ValueError``
    when the config is not a Qwen2.5-VL one or the language-model tensors do not match the Qwen2 model exactly
    (a missing, unexpected, duplicated or wrongly shaped tensor).
    """
    directory = Path(path)
    config = qwen2_config_from_qwen2_5_vl(directory, dtype)
    weight_keys, weights_file = _checkpoint_keys(directory)

    # Parameters on the meta device: the checkpoint fills them, so random initialisation would be wasted time
    # and memory. Buffers (the rotary inverse frequencies, not in any checkpoint) stay real.
    with init_empty_weights():
        model = Qwen2ForCausalLM(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = dict(TIED_WEIGHTS) if config.tie_word_embeddings else {}
    sources = _match_keys(weight_keys, expected, tied, weights_file)

    state = {}
    for file, pairs in _group_by_file(sources, weight_keys).items():
        with safe_open(file, framework="pt", device="cpu") as handle:
            for target, source in pairs:
                state[target] = handle.get_tensor(source).to(dtype)
    for target, source in tied.items():
        # A tied checkpoint may still store the tied copy (.bin-era conversions do); it must then be the same
        # tensor, or the checkpoint does not mean what its config says.
        if target in state and not torch.equal(state.pop(target), state[source]):
            raise ValueError(
                f"{weights_file}: tie_word_embeddings is true but {sources[target]} differs from {sources[source]}"
            )

    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    if (directory / GENERATION_CONFIG_NAME).is_file():
        # As from_pretrained would: the checkpoint's stop tokens (Qwen2.5-VL-Instruct stops on two) come from here.
        model.generation_config = GenerationConfig.from_pretrained(directory, local_files_only=True)
    model.config.name_or_path = str(directory)
    model.requires_grad_(False)
    return model.eval()


def qwen2_config_from_qwen2_5_vl(directory: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Qwen2Config:
    """The ``Qwen2Config`` of the language model of the Qwen2.5-VL checkpoint in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Qwen2.5-VL checkpoint {directory}: no such directory")
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"Qwen2.5-VL checkpoint {directory}: no {CONFIG_NAME} there")
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{config_file}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")

    vl_config = Qwen2_5_VLConfig.from_dict(raw)
    text = vl_config.text_config
    rope = {key: value for key, value in dict(text.rope_parameters).items() if key not in MROPE_ONLY_KEYS}
    if rope.get("rope_type") == "mrope":
        rope["rope_type"] = "default"
    return Qwen2Config(
        **{field: getattr(text, field) for field in TEXT_FIELDS},
        rope_parameters=rope,
        # transformers 5 keeps the flag on the outer config, older saves inside text_config: either one ties.
        tie_word_embeddings=bool(vl_config.tie_word_embeddings or getattr(text, "tie_word_embeddings", False)),
        dtype=dtype,
    )


def _checkpoint_keys(directory: Path) -> tuple[dict[str, Path], Path]:
    """Every tensor name in the checkpoint -> the file holding it, and the file to name in errors. Only the key
    names are read here, and a shard holding nothing but vision-tower tensors need not be present."""
    single = directory / WEIGHTS_NAME
    index = directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        with safe_open(single, framework="pt", device="cpu") as handle:
            return dict.fromkeys(handle.keys(), single), single
    if not index.is_file():
        raise FileNotFoundError(f"Qwen2.5-VL checkpoint {directory}: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no weight_map")
    keys = {key: directory / shard for key, shard in weight_map.items()}
    for shard in sorted({file for key, file in keys.items() if not key.startswith(VISION_PREFIXES)}):
        if not shard.is_file():
            raise FileNotFoundError(f"{index} lists shard {shard.name}, which is not in {directory}")
    return keys, index


def _target_name(key: str) -> str | None:
    """The Qwen2ForCausalLM name of checkpoint tensor ``key``; None for the vision tower's."""
    if key.startswith(VISION_PREFIXES):
        return None
    if key.startswith(NESTED_LANGUAGE_PREFIX):
        return "model." + key.removeprefix(NESTED_LANGUAGE_PREFIX)
    # The released layout already uses Qwen2's names; anything else shows up as unexpected.
    return key


def _match_keys(
    weight_keys: dict[str, Path], expected: dict[str, tuple[int, ...]], tied: dict[str, str], weights_file: Path
) -> dict[str, str]:
    """Qwen2 parameter -> checkpoint key, after checking that the language-model tensors are exactly the Qwen2
    model's parameters with their shapes (read from the headers, before any tensor data is)."""
    sources: dict[str, str] = {}
    unexpected: list[str] = []
    duplicated: list[str] = []
    for key in weight_keys:
        target = _target_name(key)
        if target is None:
            continue
        if target not in expected:
            unexpected.append(key)
        elif target in sources:
            duplicated.append(f"{sources[target]} / {key}")
        else:
            sources[target] = key
    missing = [name for name in expected if name not in sources and name not in tied]
    if missing or unexpected or duplicated:
        problems = [
            f"{label} {_few(names)}"
            for label, names in (
                ("missing", missing),
                ("unexpected language-model keys", unexpected),
                ("held twice (both key layouts)", duplicated),
            )
            if names
        ]
        raise ValueError(f"{weights_file}: weights do not match Qwen2ForCausalLM: {'; '.join(problems)}")

    wrong_shapes = []
    for file, pairs in _group_by_file(sources, weight_keys).items():
        with safe_open(file, framework="pt", device="cpu") as handle:
            names = set(handle.keys())
            for target, source in pairs:
                if source not in names:
                    raise ValueError(f"{weights_file} places {source} in {file.name}, which does not hold it")
                shape = tuple(handle.get_slice(source).get_shape())
                if shape != expected[target]:
                    wrong_shapes.append(f"{source} {list(shape)} (expected {list(expected[target])})")
    if wrong_shapes:
        raise ValueError(f"{weights_file}: tensors of the wrong shape for the config: {_few(wrong_shapes)}")
    return sources


def _group_by_file(sources: dict[str, str], weight_keys: dict[str, Path]) -> dict[Path, list[tuple[str, str]]]:
    """(Qwen2 name, checkpoint key) pairs per file, so that each shard is opened once."""
    groups: dict[Path, list[tuple[str, str]]] = {}
    for target, source in sources.items():
        groups.setdefault(weight_keys[source], []).append((target, source))
    return groups


def _few(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:SHOWN_KEYS])
    return f"{shown} (+{len(names) - SHOWN_KEYS} more)" if len(names) > SHOWN_KEYS else shown
