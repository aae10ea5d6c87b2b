"""Mixtures of low-rank experts with a token-level router: LoRAMoE and HydraLoRA.

With N = ``config.experts`` (``num_experts``, else one per configured modality), rank r, s = alpha / r and a
router W_r (N x k, no bias) that reads each token's input x (before LoRA dropout, as in both official codes):

    pi(x) = softmax(W_r x)                                  over the N experts, per token
    loramoe:    h = W0 x + s * sum_e pi_e(x) B_e A_e x       N A's (r x k), N B's (d x r)
    hydralora:  h = W0 x + s * sum_e pi_e(x) B_e A x         one shared A (r x k), N B heads (d x r)

Every token goes through every expert (dense mixtures): all A's in one matmul (``fused_down``), each expert's
column block scaled by its router weight, all B's in one matmul (``fused_up``); no loop over experts. The router
does not depend on modalities: a token's modality takes no part in its delta. Init: A kaiming-uniform, B zero
(the adapted model starts equal to the base), and the router kaiming-uniform, as both official codes do. A zero
router would never train HydraLoRA as a mixture: with uniform routing and every head at zero behind one shared A,
all heads get the same gradient and the router none (its logits' gradient is pi_e (g_e - sum pi g) = 0), so the
heads stay equal and the layer stays a rank-r LoRA. LoRAMoE's distinct A's would break that tie; HydraLoRA's
shared A cannot. Parameter names
(the checkpoint format): ``lora_A.<e>.weight`` / ``lora_A.shared.weight``, ``lora_B.<e>.weight`` with e = 0 .. N-1,
and ``lora_router.weight``.

LoRAMoE's load-balancing loss (training only)
----------------------------------------------
LoRAMoE's "localized balancing constraint" (Dou et al., 2023, section 3.3) takes the importance matrix
Q[e, b] = sum over the tokens of sample b of pi_e, weights it by I[e, b] = 1 + delta when expert e's group
matches sample b's type (world knowledge vs. downstream task) and 1 - delta otherwise, and penalises the squared
coefficient of variation of all entries of I * Q. Our batches carry no such sample type (delta = 0), and this
layer takes the importance over the whole batch rather than per sample: Shazeer et al.'s (2017) importance loss,
the one LoRAMoE's builds on. That is not what the constraint becomes with delta = 0: the per-sample form also
penalises each sample routing to its own expert (two samples each all on a different expert: batch-level 0,
per-sample 4/3), and without the official code's padded positions, sample lengths would enter it. What this
layer adds, per adapted layer and batch:

    importance_e = sum over the batch's non-pad tokens i of pi_e(x_i)
    cv2          = Var(importance) / (Mean(importance)^2 + 1e-10)     Var over the N experts, population (1/N)
    term         = aux_loss_weight * cv2 / (number of LoRAMoE layers in the model)

so ``take_aux_loss`` returns aux_loss_weight times the *mean* over the adapted layers of cv2: the weight does not
grow with depth or with the number of target modules. cv2 is scale-free, so summing or averaging over tokens gives
the same value. The importance is one vector per forward call (per micro-batch and rank, not all-reduced); pads
(modality id -1) do not count, tokens past the bound routing and ``set_routing(model, None)`` count as text.
Differences from the official LoRAMoE code, all deliberate: batch-level instead of per-sample importance, pads
left out (it sums over every position), population instead of unbiased variance (Shazeer's ``cv_squared``), and
the mean over layers instead of a sum. The term is computed when the layer is in training mode, gradients are
enabled and the weight is > 0, and added with ``routing.add_aux_loss`` unless a backward pass is running: gradient
checkpointing's recomputation repeats the computation (non-reentrant checkpointing checks that it saves the same
tensors) but its copy comes after the loss was taken, and kept it would hold every recomputed layer input alive
until the next batch. The loss therefore needs non-reentrant checkpointing (what ``training/recipe.py`` enables):
a reentrant checkpoint runs the forward without gradients, which adds nothing (a warning says so once).

Since the balancing loss must leave pads out, a LoRAMoE layer in training mode (with a weight > 0) reads the
routing and raises ``RoutingError`` without one; ``set_routing(model, None)`` means every token is text (all
count). Evaluation, generation and HydraLoRA need no routing, like LoRA.

HydraLoRA (Tian et al., 2024) trains with the task loss alone: its paper describes no balancing term, and its
released LLM code carries LoRAMoE's constraint code without enabling it (its MLLM variant adds a Switch-style
term for a top-1 router, not this dense one). So hydralora adds no auxiliary loss and ignores ``aux_loss_weight``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from moka_train.adapters.config import AdapterConfig
from moka_train.adapters.layer import AdaptedLinear
from moka_train.adapters.lowrank import fused_down, fused_up
from moka_train.adapters.registry import register_method
from moka_train.adapters.routing import RoutingError, RoutingState, TokenRouting

# Added to the squared mean of the importance, so that a batch without a non-pad token gives 0, not NaN.
CV_EPSILON = 1e-10
_warned_no_grad_training = False


def cv_squared(values: Tensor) -> Tensor:
    """The squared coefficient of variation ``Var(values) / (Mean(values)^2 + 1e-10)`` of a vector, with the
    population variance (Shazeer et al., 2017); 0 for a single value."""
    mean = values.mean()
    return (values - mean).square().mean() / (mean.square() + CV_EPSILON)


class RoutedMixtureLinear(AdaptedLinear):
    """The shared part of LoRAMoE and HydraLoRA: the router, the per-expert B's and the forward.

    The router reads the layer input before dropout, so ``forward`` is overridden (the rest is
    ``AdaptedLinear.forward``: the delta in the adapter's dtype, the partial-modality mask, the add in the
    backbone's dtype). ``delta`` routes on the input it is given.
    """

    # The delta does not depend on modalities (see ``_tokens`` for when the routing is read).
    uses_routing = False
    # The experts default to one per configured modality, and the routing must cover the modalities.
    uses_modalities = True
    # Whether the layer adds LoRAMoE's load-balancing term in training.
    balances_load = False

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, routing: RoutingState) -> None:
        super().__init__(base_layer, config, routing)
        self.rank = config.rank
        self.num_experts = config.experts
        self.scaling = config.alpha / self.rank
        self.lora_A = nn.ModuleDict(self.new_downs())
        self.lora_B = nn.ModuleDict({str(e): self._new_up(self.rank) for e in range(self.num_experts)})
        self.lora_router = nn.Linear(self.in_features, self.num_experts, bias=False, **self._factory())
        # As the official codes: a zero router would leave HydraLoRA's heads tied (module docstring).
        nn.init.kaiming_uniform_(self.lora_router.weight, a=5**0.5)
        self.aux_loss_weight = config.aux_loss_weight
        if self.balances_load:
            routing.register_aux_layer()

    def new_downs(self) -> dict[str, nn.Linear]:
        raise NotImplementedError

    def mix(self, x: Tensor, probs: Tensor) -> Tensor:
        """``sum_e pi_e B_e (low-rank input of expert e)``, unscaled, for the dropped-out input ``x``."""
        raise NotImplementedError

    def router_probs(self, x: Tensor) -> Tensor:
        """pi(x) = softmax(W_r x) over the experts, computed in fp32 (whatever the adapter dtype): [..., N]."""
        return self.lora_router(x).float().softmax(dim=-1)

    def delta(self, x: Tensor, tokens: TokenRouting | None) -> Tensor:
        return self.mix(x, self.router_probs(x)) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        collect = self._collects_aux_loss()
        tokens = self._tokens(x, collect)
        clean = self.adapter_input(x)
        probs = self.router_probs(clean)
        delta = self.mix(self.lora_dropout(clean), probs) * self.scaling
        if collect:
            term = self.balance_loss(probs, tokens) * (self.aux_loss_weight / self.aux_layers)
            # Computed during gradient checkpointing's recomputation too (it must repeat the same ops); the routing
            # drops that copy, which comes after the loss was taken.
            self.routing.add_aux_loss(term)
        return (result + self.keep_active(delta, tokens)).to(result.dtype)

    @property
    def aux_layers(self) -> int:
        """The number of layers of this model that add a balancing term (the mean over them is the loss)."""
        return self.routing.aux_layers

    def _collects_aux_loss(self) -> bool:
        if not (self.balances_load and self.aux_loss_weight > 0 and self.training):
            return False
        if not torch.is_grad_enabled():
            _warn_no_grad_training()
            return False
        return True

    def _tokens(self, x: Tensor, collect: bool) -> TokenRouting | None:
        if collect and not self.routing.is_bound:
            raise RoutingError(
                f"{self.method} adds its load-balancing loss in training, which leaves pads out: call "
                "moka_train.adapters.set_routing(model, modality_ids, question_mask) before the forward, or "
                "set_routing(model, None) when every token is text (or set aux_loss_weight: 0)"
            )
        return self.routing.tokens_for(x, required=collect)

    def balance_loss(self, probs: Tensor, tokens: TokenRouting) -> Tensor:
        """cv_squared of the experts' importance (the sum of pi_e over the non-pad tokens), in fp32."""
        flat = probs.reshape(-1, self.num_experts)
        if not tokens.all_text:
            flat = flat * (tokens.modality_index >= 0).reshape(-1, 1).to(flat.dtype)
        return cv_squared(flat.sum(dim=0))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, experts={self.num_experts}"


def _warn_no_grad_training() -> None:
    global _warned_no_grad_training
    if not _warned_no_grad_training:
        _warned_no_grad_training = True
        warnings.warn(
            "a LoRAMoE layer ran in training mode without gradients and added no load-balancing loss; if this is "
            "reentrant gradient checkpointing's forward, the loss is lost: use use_reentrant=False",
            stacklevel=3,
        )


@register_method("loramoe")
class LoraMoeLinear(RoutedMixtureLinear):
    """LoRAMoE (Dou et al., 2023, "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via
    MoE-Style Plugin"): N LoRA experts mixed per token by a softmax router,

        h = W0 x + (alpha / r) sum_e pi_e(x) B_e A_e x,     pi(x) = softmax(W_r x),

    with a load-balancing loss in training: aux_loss_weight times the mean over the LoRAMoE layers of
    Var(importance) / Mean(importance)^2, importance_e = sum of pi_e over the batch's non-pad tokens (see the
    module docstring for how it relates to LoRAMoE's localized balancing constraint). N A's and N B's (#A/#B N/N).
    """

    balances_load = True

    def new_downs(self) -> dict[str, nn.Linear]:
        return {str(e): self._new_down(self.rank) for e in range(self.num_experts)}

    def mix(self, x: Tensor, probs: Tensor) -> Tensor:
        a = fused_down(x, [layer.weight for layer in self.lora_A.values()])  # [..., N * r]
        a = (a.unflatten(-1, (self.num_experts, self.rank)) * probs.to(a.dtype).unsqueeze(-1)).flatten(-2)
        return fused_up(a, [layer.weight for layer in self.lora_B.values()])


@register_method("hydralora")
class HydraLoraLinear(RoutedMixtureLinear):
    """HydraLoRA (Tian et al., 2024, "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning"): one
    shared A and N B heads mixed per token by a softmax router,

        h = W0 x + (alpha / r) sum_e pi_e(x) B_e A x,       pi(x) = softmax(W_r x).

    No auxiliary loss (see the module docstring). One A and N B's (#A/#B 1/N).
    """

    def new_downs(self) -> dict[str, nn.Linear]:
        return {"shared": self._new_down(self.rank)}

    def mix(self, x: Tensor, probs: Tensor) -> Tensor:
        a = self.lora_A["shared"](x)  # [..., r]
        a = (probs.to(a.dtype).unsqueeze(-1) * a.unsqueeze(-2)).flatten(-2)  # [..., N * r], block e = pi_e A x
        return fused_up(a, [layer.weight for layer in self.lora_B.values()])
