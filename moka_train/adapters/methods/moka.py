"""MokA (Multimodal Low-Rank Adaptation) and the interaction variants of the paper's Table 4.

All four share the parameters ``lora_A.<modality>.weight`` (one A per modality, rank r) and one shared
``lora_B.weight``, and differ only in how the low-rank activations interact. With s = alpha / r:

    a_i  = A_m(i) x_i                          every token through its own modality's A
    a_i' = a_i + interaction_i                 (variant-specific, below)
    h_i  = W0 x_i + s B a_i'                   (scaling_position = after_b)

With ``scaling_position = before_attention`` (the official audio-visual code) s multiplies every a_i
before the interaction and nothing after B, so attention logits carry s^2. Pads get no delta.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moka_train.adapters.config import AdapterConfig
from moka_train.adapters.fused_moka import compute_dtype, fused_moka_delta
from moka_train.adapters.layer import AdaptedLinear
from moka_train.adapters.lowrank import (
    AttentionKeys,
    cross_attend,
    cross_attend_with_weights,
    fused_down,
    gather_tokens,
    select_own_modality,
)
from moka_train.adapters.registry import register_method
from moka_train.adapters.routing import RoutingState, TokenRouting


class MokaFamilyLinear(AdaptedLinear):
    """The parameters and the composite delta of MokA and its variants: one A per modality (rank r), one shared
    B, and the variant's ``interact`` between them, ``s B interact(a)`` with ``a_i = A_m(i) x_i``."""

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, routing: RoutingState) -> None:
        super().__init__(base_layer, config, routing)
        self.rank = config.rank
        self.lora_A = nn.ModuleDict({m: self._new_down(self.rank) for m in config.modalities})
        self.lora_B = self._new_up(self.rank)
        self.scaling = config.alpha / self.rank
        self.scale_before_interaction = config.scaling_position == "before_attention"
        # Interaction weight per configured modality; text (index 0) never queries.
        self.media_lambdas = (0.0, *(config.lambda_for(m) for m in config.modalities[1:]))

    def down_weights(self) -> list[Tensor]:
        return [layer.weight for layer in self.lora_A.values()]

    def delta(self, x: Tensor, tokens: TokenRouting) -> Tensor:
        # s goes on the low-rank activations in both scaling positions, inside the per-token selection (its
        # mask holds s instead of 1), so no full-width product follows B: s B a' = B (s a') for after_b, whose
        # interactions are linear in a except the attention logits, which key_scale divides by s^2.
        a_all = fused_down(x, self.down_weights())
        if tokens.all_text:
            return self.lora_B(a_all[..., : self.rank] * self.scaling)
        columns = tokens.own_columns(self.rank, a_all.dtype, self.scaling)
        return self.lora_B(self.interact(select_own_modality(a_all, columns, self.rank), tokens))

    def key_scale(self, tokens: TokenRouting, slots: AttentionKeys, dtype: torch.dtype) -> Tensor | float:
        """1/sqrt(S) per sample: S = the sample's number of key tokens, or r. Queries and keys arrive scaled by
        s; with ``scaling_position = after_b`` the logits are those of the unscaled activations, so the scale
        also divides by s^2 (exact for a power-of-two s such as 16 / 4)."""
        factor = 1.0 if self.scale_before_interaction else self.scaling**-2
        if self.config.attn_scale == "rank":
            return self.rank**-0.5 * factor
        return tokens.inverse_sqrt_count(slots, dtype, factor)

    def interact(self, a: Tensor, tokens: TokenRouting) -> Tensor:
        """The low-rank activations ``a`` [B, L, r] (already scaled by s) after the variant's interaction."""
        raise NotImplementedError


@register_method("moka")
class MokaLinear(MokaFamilyLinear):
    """MokA: modality-specific A, task-centric cross-attention in the low-rank space, shared B.

    For the non-text tokens i of a sample, with K = [a_j for j in the sample's question span] (keys and
    values, i.e. A_text x_j):

        att_i = softmax(a_i K^T / sqrt(S)) K,     a_i' = a_i + lambda_m(i) att_i

    S is the sample's number of question tokens (``attn_scale = question_tokens``) or r (``rank``). Text
    tokens keep a_i' = a_i; a sample with no question token gets no cross-attention.

    Training and inference take ``fused_moka_delta``, one autograd node; the composite path (``interact``
    between the shared building blocks) serves the attention maps and is the reference the fused one is
    tested against.
    """

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, routing: RoutingState) -> None:
        super().__init__(base_layer, config, routing)
        # Called as recorder(layer, weights [B, L, N], tokens) when set (attention maps); not part of the state.
        self.attention_recorder: Callable[[MokaLinear, Tensor, TokenRouting], None] | None = None

    def delta(self, x: Tensor, tokens: TokenRouting) -> Tensor:
        if self.attention_recorder is not None or not (tokens.has_media and tokens.has_question):
            return super().delta(x, tokens)
        dtype = compute_dtype(x)
        question = tokens.question
        return fused_moka_delta(
            x,
            self.down_weights(),
            self.lora_B.weight,
            tokens.own_columns(self.rank, dtype, self.scaling),
            question,
            self.key_scale(tokens, question, dtype),
            tokens.query_lambdas(self.media_lambdas, dtype),
        )

    def interact(self, a: Tensor, tokens: TokenRouting) -> Tensor:
        if not (tokens.has_media and tokens.has_question):
            return a
        slots = tokens.question
        keys, scale = gather_tokens(a, slots.index), self.key_scale(tokens, slots, a.dtype)
        # Reached with media and question tokens only when recording (delta takes the fused path otherwise) or as
        # the tests' reference, so the form that returns the weights serves both.
        attended, weights = cross_attend_with_weights(a, keys, slots, scale)
        if self.attention_recorder is not None:
            self.attention_recorder(self, weights.detach(), tokens)
        return torch.addcmul(a, tokens.per_modality(self.media_lambdas, a.dtype).unsqueeze(-1), attended)


@register_method("moka_no_ca")
class MokaNoCrossAttentionLinear(MokaFamilyLinear):
    """MokA without cross-attention (lambda = 0): modality-specific A's and a shared B,
    ``h_i = W0 x_i + s B A_m(i) x_i``."""

    def interact(self, a: Tensor, tokens: TokenRouting) -> Tensor:
        return a


@register_method("text_query")
class TextQueryLinear(MokaFamilyLinear):
    """The paper's "cross-attention*" (Table 4): the question tokens query the media tokens.

    For j in the question span, with V = [a_i for the sample's media tokens i] (each through its own
    modality's A) and S their count (or r with ``attn_scale = rank``):

        a_j' = a_j + lambda_text softmax(a_j V^T / sqrt(S)) V

    Media tokens are unchanged.
    """

    def interact(self, a: Tensor, tokens: TokenRouting) -> Tensor:
        if not (tokens.has_media and tokens.has_question):
            return a
        question, media = tokens.question, tokens.media
        attended = cross_attend(
            gather_tokens(a, question.index),
            gather_tokens(a, media.index),
            media,
            self.key_scale(tokens, media, a.dtype),
        )
        update = attended * (self.config.lambda_for("text") * question.valid.to(a.dtype)).unsqueeze(-1)
        # Invalid slots point at distinct non-question positions and carry zeros.
        return a.scatter_add(1, question.index.unsqueeze(-1).expand_as(update), update)


@register_method("naive")
class NaiveInteractionLinear(MokaFamilyLinear):
    """Naive interaction (Table 4): uniform weights instead of attention. Each media token adds the mean of
    its sample's question keys, ``a_i' = a_i + lambda_m(i) mean_j a_j`` (j in the question span)."""

    def interact(self, a: Tensor, tokens: TokenRouting) -> Tensor:
        if not (tokens.has_media and tokens.has_question):
            return a
        mean = (a * tokens.question_mean_weights(a.dtype)).sum(dim=1, keepdim=True)
        return a + tokens.per_modality(self.media_lambdas, a.dtype).unsqueeze(-1) * mean
