"""Uni+MM LoRA and Uni+MM LoRA with a gate: the paper's baselines with N+1 A's and 2 B's.

Two low-rank paths add to the frozen ``h = W0 x`` (W0: d x k), rank r, s = alpha / r:

- the uni-modal path sends each token i through its own modality's A_m(i) and one B shared by that path,
  B_uni (as MokA without interaction, but with its own B);
- the multimodal path sends every token through one A_mm and one B_mm (a plain LoRA).

``uni_mm_lora``::

    delta_i = s (B_uni A_m(i) x_i + B_mm A_mm x_i)

``uni_mm_lora_gate``: the two paths mixed by a learned per-token gate, a linear map of x to one scalar::

    g_i     = sigmoid(w_g . x_i + b_g)                          w_g: 1 x k, b_g: 1
    delta_i = s (g_i B_uni A_m(i) x_i + (1 - g_i) B_mm A_mm x_i)

Pads get no delta (both paths). Text tokens, including every position of a text-only call (``all_text``:
decode steps, ``set_routing(model, None)``), take A_text on the uni-modal path.

Parameters (the checkpoint format, relative to the adapted linear)::

    lora_A.<modality>.weight   r x k   one per configured modality (the uni-modal path, as in MokA)
    lora_A.multimodal.weight   r x k   A_mm ("multimodal" is not a modality name, so it cannot collide)
    lora_B.unimodal.weight     d x r   B_uni
    lora_B.multimodal.weight   d x r   B_mm
    lora_gate.weight           1 x k   w_g   (uni_mm_lora_gate only)
    lora_gate.bias             1       b_g   (uni_mm_lora_gate only)

That is N + 1 A's and 2 B's, the paper's count: (N + 1) r k + 2 d r parameters per layer, plus k + 1 for the
gate. The gate is not counted as an A or a B.

Init: every A kaiming-uniform, both B's zero (the adapted model starts equal to the base). The paper does not
say how its gate starts; here w_g = 0 and b_g = 0, so g = 0.5 for every token at the start: the two paths
start with equal weight. The gate's gradient is s (B_uni a_uni - B_mm a_mm) . dL/dh g (1 - g): zero while both
B's are zero (the very first step), non-zero once they have moved. Dropout (if any) is on the input of the A's and of
the gate alike: the gate is one more row of the fused down-projection.

Computation: one matmul for every A (and the gate's row), ``select_own_modality`` for the uni-modal path,
one matmul for both B's (the two paths' low-rank activations side by side, each scaled by its per-token gate
weight, which commutes with B). No loop over samples or tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from moka_train.adapters.config import AdapterConfig
from moka_train.adapters.layer import AdaptedLinear
from moka_train.adapters.lowrank import fused_down, fused_up, select_own_modality
from moka_train.adapters.registry import register_method
from moka_train.adapters.routing import RoutingState, TokenRouting

# The key of the multimodal path's A and B. Modality names are text / visual / audio / speech
# (``moka_train.Modality``), so it never collides with a uni-modal A.
MULTIMODAL = "multimodal"
UNIMODAL = "unimodal"


@register_method("uni_mm_lora")
class UniMultimodalLoraLinear(AdaptedLinear):
    """Uni+MM LoRA: ``h_i = W0 x_i + s (B_uni A_m(i) x_i + B_mm A_mm x_i)``; pads get no delta."""

    gated: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, routing: RoutingState) -> None:
        super().__init__(base_layer, config, routing)
        self.rank = config.rank
        self.num_modalities = len(config.modalities)
        downs = {m: self._new_down(self.rank) for m in config.modalities}
        downs[MULTIMODAL] = self._new_down(self.rank)
        self.lora_A = nn.ModuleDict(downs)
        self.lora_B = nn.ModuleDict({UNIMODAL: self._new_up(self.rank), MULTIMODAL: self._new_up(self.rank)})
        if self.gated:
            self.lora_gate = nn.Linear(self.in_features, 1, bias=True, **self._factory())
            nn.init.zeros_(self.lora_gate.weight)
            nn.init.zeros_(self.lora_gate.bias)
        self.scaling = config.alpha / self.rank
        # s at every configured modality: per_modality() turns it into the non-pad mask, times s.
        self._scaled_non_pad = (self.scaling,) * self.num_modalities

    def delta(self, x: Tensor, tokens: TokenRouting) -> Tensor:
        weights = [layer.weight for layer in self.lora_A.values()]
        if self.gated:
            weights.append(self.lora_gate.weight)
        a_all = fused_down(x, weights)  # [B, L, N r | r | (1)]
        uni_width = self.num_modalities * self.rank
        a_mm = a_all[..., uni_width : uni_width + self.rank]
        # s goes on the rank-r activations (free inside the routing masks), not on the full-width output.
        if tokens.all_text:
            a_uni = a_all[..., : self.rank] * self.scaling  # text is the first configured modality
            a_mm = a_mm * self.scaling
        else:
            own = tokens.own_columns(self.rank, a_all.dtype, self.scaling)
            a_uni = select_own_modality(a_all[..., :uni_width], own, self.rank)  # pads: 0
            a_mm = a_mm * tokens.per_modality(self._scaled_non_pad, a_all.dtype).unsqueeze(-1)
        if self.gated:
            gate = torch.sigmoid(a_all[..., -1:] + self.lora_gate.bias)
            a_uni, a_mm = gate * a_uni, (1.0 - gate) * a_mm
        up = [self.lora_B[UNIMODAL].weight, self.lora_B[MULTIMODAL].weight]
        return fused_up(torch.cat([a_uni, a_mm], dim=-1), up)


@register_method("uni_mm_lora_gate")
class GatedUniMultimodalLoraLinear(UniMultimodalLoraLinear):
    """Uni+MM LoRA with a gate: ``g_i = sigmoid(w_g . x_i + b_g)``,
    ``h_i = W0 x_i + s (g_i B_uni A_m(i) x_i + (1 - g_i) B_mm A_mm x_i)``; pads get no delta."""

    gated = True
