"""Tiny real models and routing batches shared by the tests."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from moka_train.adapters import adapter_named_parameters
from moka_train.modality import Modality

VOCAB = 128
# transformers 5.24 renamed the KV-cache argument and output past_key_values to cache (the old name is deprecated).
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


# Small enough for milliseconds per step, with grouped-query attention as in the real backbones.
TINY_DIMS = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **TINY_DIMS)).eval()


def tiny_qwen2(seed: int = 0, layers: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, **TINY_DIMS)).eval()


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Give B (zero at init) random values so that the adapter path changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter_named_parameters(model):
            if ".lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


# A sample layout: (kind, count) segments, kind in text / question / visual / audio / speech.
Layout = list[tuple[str, int]]


def routing_batch(layouts: list[Layout], pad_side: str = "right") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``modality_ids``, ``question_mask`` and ``attention_mask`` for samples of ragged lengths."""
    length = max(sum(n for _, n in layout) for layout in layouts)
    ids = torch.full((len(layouts), length), int(Modality.PAD), dtype=torch.long)
    question = torch.zeros(len(layouts), length, dtype=torch.bool)
    for row, layout in enumerate(layouts):
        kinds: list[str] = [kind for kind, n in layout for _ in range(n)]
        start = length - len(kinds) if pad_side == "left" else 0
        for offset, kind in enumerate(kinds):
            modality = Modality.TEXT if kind == "question" else Modality.parse(kind)
            ids[row, start + offset] = int(modality)
            question[row, start + offset] = kind == "question"
    return ids, question, (ids != int(Modality.PAD)).long()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, as generation computes them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def cached_greedy_steps(
    model: nn.Module, prompt: torch.Tensor, mask: torch.Tensor, steps: int
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Prefill ``prompt`` (left-padded, ``mask``) with a KV cache, then ``steps`` greedy decode steps of one token.
    Returns the last-position logits of the prefill and of each step, the full sequences and their attention
    mask: what a full forward of the sequences must reproduce."""
    positions = position_ids(mask)
    with torch.no_grad():
        out = model(input_ids=prompt, attention_mask=mask, position_ids=positions, use_cache=True)
        step_logits, cache, tokens, attention = [out.logits[:, -1]], getattr(out, CACHE), [], mask
        for _ in range(steps):
            token = step_logits[-1].argmax(-1, keepdim=True)
            tokens.append(token)
            attention = torch.cat([attention, torch.ones_like(token)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=token, attention_mask=attention, position_ids=positions, use_cache=True, **{CACHE: cache}
            )
            cache = getattr(out, CACHE)
            step_logits.append(out.logits[:, -1])
    return step_logits, torch.cat([prompt, *tokens], dim=1), attention


@contextlib.contextmanager
def loaded_script(path: Path) -> Iterator[ModuleType]:
    """A script (``scripts/*.py``, not a package module) imported under its file name for the block; it is in
    ``sys.modules`` meanwhile, where dataclasses look their module up while the class body runs."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
