"""The adapted linear layer every method builds on: a frozen ``base_layer`` plus a low-rank delta."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from moka_train.adapters.config import AdapterConfig
from moka_train.adapters.routing import RoutingState, TokenRouting


class AdaptedLinear(nn.Module):
    """``h = base_layer(x) + delta(dropout(x))``, with ``base_layer`` the frozen ``nn.Linear`` it wraps.

    A method subclasses this (one small module in ``adapters/methods/``), creates its parameters in
    ``__init__`` under the names of the checkpoint format (``lora_A.<modality>.weight``, ``lora_B...``) and
    implements ``delta``. The delta runs in the adapter's dtype (fp32 adapters on a bf16 backbone stay
    fp32, as in peft) and is added in the backbone's dtype.
    """

    method: ClassVar[str] = ""
    # The delta depends on each token's modality, so a forward without routing is an error.
    uses_routing: ClassVar[bool] = True
    # The method has one A per configured modality (else a single "default" A).
    uses_modalities: ClassVar[bool] = True
    # The method has one B per modality, so modalities may have different ranks.
    per_modality_rank: ClassVar[bool] = False
    # Saved in peft's own layout (``PeftModel.from_pretrained`` loads it).
    peft_layout: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, routing: RoutingState) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.config = config
        self.routing = routing
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # DeepSpeed ZeRO-3 gathers a module's own parameters before its forward. The fused matmuls read the
        # weights of the lora_A / lora_B children directly, so this whole module is one ZeRO-3 "leaf".
        self._z3_leaf = True
        self.register_forward_pre_hook(_track_input_grad_under_zero3)

    def _factory(self) -> dict:
        """Device and dtype for new adapter weights: the base layer's device, fp32 (or the base's dtype if
        that is wider)."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        return {"device": weight.device, "dtype": dtype}

    def _new_down(self, rank: int) -> nn.Linear:
        """An A matrix (rank x in_features), kaiming-uniform as in LoRA."""
        layer = nn.Linear(self.in_features, rank, bias=False, **self._factory())
        nn.init.kaiming_uniform_(layer.weight, a=5**0.5)
        return layer

    def _new_up(self, rank: int) -> nn.Linear:
        """A B matrix (out_features x rank), zero so that the adapted model starts equal to the base."""
        layer = nn.Linear(rank, self.out_features, bias=False, **self._factory())
        nn.init.zeros_(layer.weight)
        return layer

    @property
    def adapter_dtype(self) -> torch.dtype:
        # Called on every forward: look at the children directly rather than walking named_parameters().
        for name, module in self._modules.items():
            if name != "base_layer":
                for parameter in module.parameters():
                    return parameter.dtype
        raise RuntimeError(f"{type(self).__name__} has no adapter parameters")

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters this layer adds, with names relative to the layer."""
        return [(name, p) for name, p in self.named_parameters() if not name.startswith("base_layer.")]

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        tokens = self.routing.tokens_for(x, required=self.uses_routing)
        delta = self.delta(self.lora_dropout(self.adapter_input(x)), tokens)
        # Added in the wider dtype and rounded once, as peft does: an fp32 delta on a bf16 backbone rounded to
        # bf16 before the add would differ from peft's LoRA in about one output element in four.
        return (result + self.keep_active(delta, tokens)).to(result.dtype)

    def adapter_input(self, x: Tensor) -> Tensor:
        """``x`` in the adapter's dtype; left as it is under autocast, where every matmul of the delta runs in
        the autocast dtype whatever its input's dtype, so the cast up to fp32 would only add a full-size copy
        (and its backward) to every layer and change no result."""
        if torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(self.adapter_dtype)

    @staticmethod
    def keep_active(delta: Tensor, tokens: TokenRouting | None) -> Tensor:
        """``delta`` with the tokens outside the active modalities zeroed (partial-modality inference)."""
        mask = None if tokens is None else tokens.delta_mask(delta.dtype)
        return delta if mask is None else delta * mask

    def delta(self, x: Tensor, tokens: TokenRouting | None) -> Tensor:
        """The adapter's contribution for input ``x`` (dropout already applied)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"method={self.method}, in_features={self.in_features}, out_features={self.out_features}"


def _track_input_grad_under_zero3(module: AdaptedLinear, args: tuple) -> tuple | None:
    """Forward pre-hook: under ZeRO-3, make the layer's input require grad.

    DeepSpeed reduces a leaf module's gradients from a full backward hook on the module. When the input
    does not require grad (layer 0's q/k/v behind a frozen embedding), PyTorch fires that hook as soon as
    the output gradient exists, before the parameter gradients do, and the first backward crashes on an
    already re-partitioned weight. A detached input that requires grad delays the hook until the layer's
    backward is complete; it costs one extra input-gradient matmul in the layers that had none.
    """
    x = args[0]
    if torch.is_grad_enabled() and not x.requires_grad and hasattr(module.base_layer.weight, "ds_id"):
        return (x.detach().requires_grad_(), *args[1:])
    return None
