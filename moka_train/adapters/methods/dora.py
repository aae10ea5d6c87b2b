"""DoRA: weight-decomposed low-rank adaptation, numerically equal to peft's DoRA and saved in its layout."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moka_train.adapters.config import AdapterConfig
from moka_train.adapters.methods.lora import LoraLinear
from moka_train.adapters.registry import register_method
from moka_train.adapters.routing import RoutingState, TokenRouting
from moka_train.checkpoint_io import gathered


class Magnitude(nn.Module):
    """DoRA's magnitude vector m [out_features], held as ``.weight`` so that its name is peft's
    (``lora_magnitude_vector.default.weight``)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"features={self.weight.shape[0]}"


@register_method("dora")
class DoraLinear(LoraLinear):
    """DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML, arXiv:2402.09353):

        W' = m * (W0 + s B A) / ||W0 + s B A||_c        h = W' x (+ bias)

    with ``||.||_c`` the L2 norm of each output channel (the row norms of the [out, in] matrix, as peft computes
    them), ``s = alpha / r``, A kaiming-uniform, B zero and the magnitude m [out] initialised to ``||W0||_c``, so
    the adapted model starts equal to the base. As the paper suggests (section 4.3) and peft does, the norm is a
    constant for the backward pass (detached, and computed from a detached B A): gradients reach m, A and B only
    through ``m / ||.||_c`` and ``B A x``.

    The layer adds ``W' x - W0 x`` to the frozen output, written as peft's ``DoraLinearLayer`` writes it:

        delta = (m / ||W0 + s B A||_c - 1) * W0 x~ + (m / ||W0 + s B A||_c) * s B A x~

    with ``x~ = dropout(x)``. Without active dropout (eval mode, or dropout 0), ``W0 x`` is the frozen layer's
    own output minus its bias (no second matmul); with it, ``W0 x~`` is computed from the dropped-out input, so
    dropout acts on the whole ``W' x~`` term, as in peft. The delta runs in the adapter's dtype (fp32) and is added
    to the frozen output in the wider of the two dtypes, rounded once to the backbone's (as peft does: a bf16
    backbone gives peft's logits exactly). The generic partial-modality mask multiplies the delta (masked tokens
    see ``W0 x + bias``).

    Parameters under peft's names (``lora_A.default.weight``, ``lora_B.default.weight``,
    ``lora_magnitude_vector.default.weight``); saved in peft's layout (``use_dora: true``).
    """

    # LoRA's A and B (and its peft layout), plus the magnitude.
    # The peft LoraConfig options that select this method in peft's layout (read by adapters/checkpoint.py).
    peft_options: ClassVar[dict[str, object]] = {"use_dora": True}

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, routing: RoutingState) -> None:
        super().__init__(base_layer, config, routing)
        with gathered([base_layer.weight]), torch.no_grad():
            magnitude = self.weight_norm(base_layer.weight.to(**self._factory()))
        self.lora_magnitude_vector = nn.ModuleDict({"default": Magnitude(magnitude)})

    @property
    def magnitude(self) -> nn.Parameter:
        return self.lora_magnitude_vector["default"].weight

    def lora_weight(self) -> Tensor:
        """``B A`` [out, in], unscaled, in the adapter's dtype."""
        return self.lora_B["default"].weight @ self.lora_A["default"].weight

    def weight_norm(self, weight: Tensor) -> Tensor:
        """``||W0 + s B A||_c`` [out] for ``weight`` = W0 in the adapter's dtype, without gradient."""
        with torch.no_grad():
            combined = weight + self.scaling * self.lora_weight().to(weight.dtype)
            return torch.linalg.norm(combined, dim=1).to(weight.dtype)

    def merged_weight(self) -> Tensor:
        """``W'`` [out, in] in float32 (float64 for a float64 layer): what ``adapters.merge`` writes into W0."""
        dtype = torch.float64 if self.base_layer.weight.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            weight = self.base_layer.weight.to(dtype)
            combined = weight + self.scaling * self.lora_weight().to(dtype)
            norm = torch.linalg.norm(combined, dim=1)
            return (self.magnitude.to(dtype) / norm).unsqueeze(1) * combined

    def forward(self, x: Tensor) -> Tensor:
        # AdaptedLinear.forward with one change, peft's: without active dropout, W0 x is the frozen output minus its
        # bias instead of a second matmul (``delta`` computes it from x when called on its own).
        result = self.base_layer(x)
        tokens = self.routing.tokens_for(x, required=False)
        # Always the adapter's dtype (not ``adapter_input``): the column norm of W0 + s B A is taken in x's dtype.
        x = x.to(self.adapter_dtype)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            delta = self._dora_delta(self.lora_dropout(x), base=None)
        else:
            bias = self.base_layer.bias
            delta = self._dora_delta(x, base=result if bias is None else result - bias)
        return (result + self.keep_active(delta, tokens)).to(result.dtype)

    def delta(self, x: Tensor, tokens: TokenRouting | None) -> Tensor:
        return self._dora_delta(x, base=None)

    def _dora_delta(self, x: Tensor, base: Tensor | None) -> Tensor:
        """``(m / ||W0 + s B A||_c - 1) * W0 x + (m / ||.||_c) * s B A x``; ``base``: W0 x (no bias) if known."""
        weight = self.base_layer.weight.to(x.dtype)
        scale = (self.magnitude / self.weight_norm(weight)).view(1, -1)
        if base is None:
            base = F.linear(x, weight)
        lora = self.lora_B["default"](self.lora_A["default"](x))
        return (scale - 1) * base + scale * lora * self.scaling
