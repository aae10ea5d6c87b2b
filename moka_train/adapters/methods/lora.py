"""LoRA and its per-modality baselines (Multiple LoRA, Uni-modal LoRA)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moka_train.adapters.config import AdapterConfig
from moka_train.adapters.layer import AdaptedLinear
from moka_train.adapters.lowrank import fused_down, fused_up
from moka_train.adapters.registry import register_method
from moka_train.adapters.routing import RoutingState, TokenRouting


@register_method("lora")
class LoraLinear(AdaptedLinear):
    """LoRA (Hu et al., 2021): ``h = W0 x + (alpha / r) B A x`` for every token.

    One A and one B under peft's names (``lora_A.default.weight``), numerically equal to peft's LoRA with
    the same weights, and saved in peft's layout.
    """

    uses_routing = False
    uses_modalities = False
    peft_layout = True

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, routing: RoutingState) -> None:
        super().__init__(base_layer, config, routing)
        rank = config.rank
        self.lora_A = nn.ModuleDict({"default": self._new_down(rank)})
        self.lora_B = nn.ModuleDict({"default": self._new_up(rank)})
        self.scaling = config.alpha / rank

    def delta(self, x: Tensor, tokens: TokenRouting | None) -> Tensor:
        # s on the rank-r activations rather than on B's full-width output (peft's order): the same values
        # (bit for bit when s is a power of two, as 16 / 4) for a product r / out_features the size.
        return self.lora_B["default"](self.lora_A["default"](x) * self.scaling)

    def merged_weight(self) -> Tensor:
        """``W0 + s B A`` [out, in] in float32 (float64 for a float64 layer): what ``adapters.merge`` writes."""
        dtype = torch.float64 if self.base_layer.weight.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            delta = self.lora_B["default"].weight.to(dtype) @ self.lora_A["default"].weight.to(dtype)
            return self.base_layer.weight.to(dtype) + self.scaling * delta


class PerModalityLora(AdaptedLinear):
    """One LoRA (A_m, B_m, scaling alpha / r_m) per modality, all A's in one matmul and all B's in another.

    The low-rank activations of all modalities sit side by side (``[..., sum_m r_m]``); a method chooses
    which columns each token keeps, and ``fused_up`` then sums ``B_m a_m`` over modalities.
    """

    per_modality_rank = True

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, routing: RoutingState) -> None:
        super().__init__(base_layer, config, routing)
        modalities = config.modalities
        self.lora_A = nn.ModuleDict({m: self._new_down(config.rank_for(m)) for m in modalities})
        self.lora_B = nn.ModuleDict({m: self._new_up(config.rank_for(m)) for m in modalities})
        ranks = [config.rank_for(m) for m in modalities]
        scales = [config.scaling_for(m) for m in modalities]
        device = base_layer.weight.device
        # Built from Python values, then placed: a meta tensor (parameter counting without weights) has no
        # values to repeat by.
        column_scale = [scale for scale, rank in zip(scales, ranks, strict=True) for _ in range(rank)]
        column_modality = [index for index, rank in enumerate(ranks) for _ in range(rank)]
        self.register_buffer("column_scale", torch.tensor(column_scale, device=device), persistent=False)
        self.register_buffer("column_modality", torch.tensor(column_modality, device=device), persistent=False)

    def scaled_down(self, x: Tensor) -> Tensor:
        a = fused_down(x, [layer.weight for layer in self.lora_A.values()])
        return a * self.column_scale.to(a.dtype)

    def up(self, a: Tensor) -> Tensor:
        return fused_up(a, [layer.weight for layer in self.lora_B.values()])


@register_method("multi_lora")
class MultiLoraLinear(PerModalityLora):
    """Multiple LoRA: one LoRA per modality, every token through all of them, summed:
    ``h = W0 x + sum_m (alpha / r_m) B_m A_m x``."""

    uses_routing = False

    def delta(self, x: Tensor, tokens: TokenRouting | None) -> Tensor:
        return self.up(self.scaled_down(x))


@register_method("uni_lora")
class UniModalLoraLinear(PerModalityLora):
    """Uni-modal LoRA: each token through its own modality's LoRA only:
    ``h_i = W0 x_i + (alpha / r_m(i)) B_m(i) A_m(i) x_i``; pads get no delta."""

    def delta(self, x: Tensor, tokens: TokenRouting | None) -> Tensor:
        a = self.scaled_down(x)
        if tokens.all_text:
            keep = (self.column_modality == 0).to(a.dtype)
        else:
            keep = tokens.onehot(a.dtype)[..., self.column_modality]
        return self.up(a * keep)
