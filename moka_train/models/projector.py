"""Projectors: encoder features of one frame / audio segment -> a fixed number of LLM-width tokens.

    LayerNorm(encoder features) -> Q-Former (learned queries cross-attending to the features)
                                -> Linear -> GELU -> Linear (to the LLM's hidden size)

as in the official MokA / Crab setup (32 queries, 2 layers with cross-attention in every layer, BERT-base
width, a 2-layer GELU MLP), so 10 frames + 10 audio segments give 320 + 320 tokens. The Q-Former is
transformers' BLIP-2 Q-Former, not a hand-written BERT. One projector per modality; all trainable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel


@dataclass
class ProjectorConfig:
    """Sizes of one projector. The defaults are the official ones, but for the two widths that depend on the
    models around it: ``encoder_width`` (1024 for CLIP ViT-L/14, 768 for BEATs, 1280 for Whisper large-v3)
    and ``llm_hidden_size`` (4096 for the 7B backbones)."""

    encoder_width: int
    llm_hidden_size: int
    num_queries: int = 32
    qformer_layers: int = 2
    qformer_hidden_size: int = 768
    qformer_heads: int = 12
    qformer_intermediate_size: int = 3072
    dropout: float = 0.1  # BERT-base's, which the official Q-Former (built from that config) trains with

    def __post_init__(self) -> None:
        for name in ("encoder_width", "llm_hidden_size", "num_queries", "qformer_layers", "qformer_hidden_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ProjectorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.qformer_hidden_size % self.qformer_heads:
            raise ValueError(
                f"ProjectorConfig.qformer_hidden_size {self.qformer_hidden_size} is not divisible by "
                f"qformer_heads {self.qformer_heads}"
            )


class QFormerProjector(nn.Module):
    """Encoder features ``[S, N, encoder_width]`` of S segments (frames, audio windows, images) ->
    ``[S, num_queries, llm_hidden_size]``. ``forward_segments`` handles ``[B, segments, N, D]``."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.feature_norm = nn.LayerNorm(config.encoder_width)
        qformer_config = Blip2QFormerConfig(
            hidden_size=config.qformer_hidden_size,
            num_hidden_layers=config.qformer_layers,
            num_attention_heads=config.qformer_heads,
            intermediate_size=config.qformer_intermediate_size,
            encoder_hidden_size=config.encoder_width,
            cross_attention_frequency=1,  # cross-attention in every layer, as the official Q-Former
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
        )
        self.qformer = Blip2QFormerModel(qformer_config)
        self.queries = nn.Parameter(torch.empty(1, config.num_queries, config.qformer_hidden_size))
        nn.init.normal_(self.queries, std=qformer_config.initializer_range)  # BLIP-2's query init
        self.mlp = nn.Sequential(
            nn.Linear(config.qformer_hidden_size, config.llm_hidden_size),
            nn.GELU(),
            nn.Linear(config.llm_hidden_size, config.llm_hidden_size),
        )

    @property
    def tokens_per_segment(self) -> int:
        return self.config.num_queries

    def forward(self, features: Tensor, feature_mask: Tensor | None = None) -> Tensor:
        """``features`` [S, N, D]; ``feature_mask`` [S, N] bool (True = a real feature) or None."""
        if features.dim() != 3 or features.shape[-1] != self.config.encoder_width:
            raise ValueError(
                f"projector expects features [segments, tokens, {self.config.encoder_width}], "
                f"got {tuple(features.shape)}"
            )
        if feature_mask is not None and feature_mask.shape != features.shape[:2]:
            raise ValueError(
                f"feature_mask shape {tuple(feature_mask.shape)} does not match features {tuple(features.shape[:2])}"
            )
        dtype = self.queries.dtype
        queries = self.queries.expand(features.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=self.feature_norm(features.to(dtype)),
            encoder_attention_mask=None if feature_mask is None else feature_mask.long(),
        ).last_hidden_state
        return self.mlp(out)

    def forward_segments(self, features: Tensor, feature_mask: Tensor | None = None) -> Tensor:
        """``[B, segments, N, D]`` -> ``[B, segments * num_queries, llm_hidden_size]``, segments in order
        (all segments of the batch in one Q-Former call)."""
        if features.dim() != 4:
            raise ValueError(f"expected features [batch, segments, tokens, dim], got {tuple(features.shape)}")
        batch, segments = features.shape[:2]
        flat_mask = None if feature_mask is None else feature_mask.flatten(0, 1)
        tokens = self(features.flatten(0, 1), flat_mask)
        return tokens.view(batch, segments * self.config.num_queries, -1)
