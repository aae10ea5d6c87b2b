"""Assembling the multimodal model from its parts: a backbone, its tokenizer, frozen encoders, one projector
per modality and (for stage 2) an adapter. The parts come from config (``configs/model``, ``configs/encoder``,
``configs/adapter``) through ``hydra.utils.instantiate``; this function only wires them together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moka_train.adapters import AdapterConfig, inject_adapters
from moka_train.adapters.registry import get_method
from moka_train.modality import Modality
from moka_train.models.chat_templates import set_chat_template
from moka_train.models.encoders import SegmentEncoder
from moka_train.models.mllm import MultimodalLM
from moka_train.models.projector import ProjectorConfig, QFormerProjector
from moka_train.models.tokenizer import add_multimodal_tokens


def build_multimodal_lm(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoders: Mapping[str, SegmentEncoder] | None = None,
    projector: Mapping[str, Any] | None = None,
    adapter: AdapterConfig | None = None,
    chat_template: str = "tokenizer",
    encoder_widths: Mapping[str, int] | None = None,
    stage: str | None = None,
    seed: int = 0,
) -> MultimodalLM:
    """The MLLM, with ``tokenizer`` given its chat template and the multimodal tokens.

    ``encoders``: modality -> frozen encoder, for raw media. ``encoder_widths``: modality -> feature width,
    for modalities whose batches carry cached features and whose encoder is not loaded. ``projector``: the
    ``ProjectorConfig`` fields shared by every modality (the widths come from the encoder and backbone).
    ``adapter``: injected into the backbone only (never into encoders or projectors). ``stage``: freeze for
    ``pretrain`` or ``instruct`` right away. ``seed`` fixes the projectors' initialisation, so every rank of
    a distributed run starts from the same weights.
    """
    encoders = {Modality.parse(m).key: e for m, e in (encoders or {}).items()}
    widths = {name: int(encoder.hidden_size) for name, encoder in encoders.items()}
    for m, width in (encoder_widths or {}).items():
        name = Modality.parse(m).key
        if name in widths and widths[name] != int(width):
            raise ValueError(f"encoder_widths[{name}]={width}, but the {name} encoder outputs {widths[name]}")
        widths[name] = int(width)
    if not widths:
        raise ValueError("no media modality: give encoders (raw media) or encoder_widths (cached features)")

    set_chat_template(tokenizer, chat_template)
    tokens = add_multimodal_tokens(tokenizer)
    if adapter is not None:
        if get_method(adapter.method).uses_modalities:
            unrouted = sorted(set(widths) - set(adapter.modalities))
            if unrouted:
                raise ValueError(
                    f"the adapter's modalities {list(adapter.modalities)} leave out {unrouted}, which the model "
                    "encodes: add them to adapter.modalities"
                )
        inject_adapters(backbone, adapter)

    hidden_size = backbone.get_input_embeddings().embedding_dim
    with torch.random.fork_rng(devices=[]):  # seeded projectors without resetting the caller's RNG
        torch.manual_seed(seed)
        projectors = {
            name: QFormerProjector(
                ProjectorConfig(encoder_width=width, llm_hidden_size=hidden_size, **dict(projector or {}))
            )
            for name, width in sorted(widths.items())
        }
    placeholders = {name: ids for name, ids in tokens.placeholder_ids().items() if name in projectors}
    model = MultimodalLM(backbone, projectors, placeholders, tokens.added_token_ids, encoders)
    if stage is not None:
        model.set_stage(stage)
    return model
