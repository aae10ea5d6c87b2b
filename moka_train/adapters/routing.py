"""Routing: which modality each token has and which tokens form the question span.

One ``RoutingState`` is shared by every adapted layer of a model. ``set_routing`` binds tensors covering
the prefill positions [0, L); a forward pre-hook on the model records where the current call starts in
the KV cache, so each layer can build the view for its positions: positions past the bound routing
(cached decoding) are text and not question. Views are cached per call shape, so the 224 layers of a
7B model share one set of index tensors, and gradient checkpointing's recomputation finds the same one.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

import torch
from torch import Tensor

from moka_train.adapters.lowrank import AttentionKeys
from moka_train.modality import Modality

_NOT_CONFIGURED = -2


class RoutingError(RuntimeError):
    """A modality-aware adapter ran without routing, or with routing that does not fit the input."""


class TokenRouting:
    """Routing of the tokens of one forward call, aligned with ``x[:, :, 0]`` ([B, L]).

    ``modality_index`` indexes the adapter's configured modalities (text is 0), -1 for pads; ``None``
    means every token is text (decode steps, ``set_routing(model, None)``).
    """

    def __init__(
        self,
        batch: int,
        length: int,
        device: torch.device,
        num_modalities: int,
        modality_index: Tensor | None = None,
        question_mask: Tensor | None = None,
        active: tuple[bool, ...] | None = None,
    ) -> None:
        self.batch, self.length, self.device = batch, length, device
        self.num_modalities = num_modalities
        self.modality_index = modality_index
        self._question_mask = question_mask
        self.active = active
        self._cache: dict[tuple, Tensor] = {}

    @property
    def all_text(self) -> bool:
        return self.modality_index is None

    @cached_property
    def question_mask(self) -> Tensor:
        if self._question_mask is None:
            return torch.zeros(self.batch, self.length, dtype=torch.bool, device=self.device)
        return self._question_mask

    @cached_property
    def has_media(self) -> bool:
        return self.modality_index is not None and bool((self.modality_index > 0).any())

    @cached_property
    def has_question(self) -> bool:
        return self._question_mask is not None and bool(self._question_mask.any())

    @cached_property
    def question(self) -> AttentionKeys:
        """The question span, packed per sample."""
        return AttentionKeys.from_mask(self.question_mask)

    @cached_property
    def media(self) -> AttentionKeys:
        """The media tokens (every non-text, non-pad token), packed per sample."""
        return AttentionKeys.from_mask(self.modality_index > 0)

    def inverse_sqrt_count(self, slots: AttentionKeys, dtype: torch.dtype, factor: float = 1.0) -> Tensor:
        """``factor``/sqrt(number of keys) per sample, [B, 1, 1] (``factor`` for a sample without keys)."""
        key = ("rsqrt", id(slots), dtype, factor)
        if key not in self._cache:
            self._cache[key] = slots.count.clamp(min=1).to(dtype).rsqrt().view(-1, 1, 1) * factor
        return self._cache[key]

    def question_mean_weights(self, dtype: torch.dtype) -> Tensor:
        """[B, L, 1]: 1/count on the question span, 0 elsewhere (a mean over the span as a weighted sum)."""
        key = ("mean", dtype)
        if key not in self._cache:
            count = self.question.count.clamp(min=1).to(dtype).view(-1, 1, 1)
            self._cache[key] = self.question_mask.unsqueeze(-1).to(dtype) / count
        return self._cache[key]

    def onehot(self, dtype: torch.dtype) -> Tensor:
        """[B, L, M] one-hot of each token's modality; all zero for pads."""
        key = ("onehot", dtype)
        if key not in self._cache:
            index = self.modality_index
            hot = torch.nn.functional.one_hot(index.clamp(min=0), self.num_modalities)
            self._cache[key] = (hot * (index >= 0).unsqueeze(-1)).to(dtype)
        return self._cache[key]

    def own_columns(self, rank: int, dtype: torch.dtype, value: float = 1.0) -> Tensor:
        """[B, L, M * rank]: ``value`` on the ``rank`` columns of each token's modality, 0 elsewhere and at pads
        (what ``lowrank.select_own_modality`` multiplies every A's output by; a ``value`` other than 1 scales the
        selection at no extra cost)."""
        key = ("columns", rank, dtype, value)
        if key not in self._cache:
            columns = self.onehot(dtype).repeat_interleave(rank, dim=-1)
            self._cache[key] = columns if value == 1.0 else columns * value
        return self._cache[key]

    def per_modality(self, values: tuple[float, ...], dtype: torch.dtype) -> Tensor:
        """[B, L] with ``values[m]`` at the tokens of modality m and 0 at pads."""
        key = ("values", values, dtype)
        if key not in self._cache:
            table = torch.tensor((*values, 0.0), dtype=dtype, device=self.device)
            # Pads (-1) index the trailing 0.0.
            self._cache[key] = table[self.modality_index]
        return self._cache[key]

    def query_lambdas(self, values: tuple[float, ...], dtype: torch.dtype) -> Tensor:
        """[B, L, 1]: ``values[m]`` at the tokens of modality m in the samples that have question tokens; 0 at pads
        and at every token of a sample without any (whose queries then have nothing to attend to)."""
        key = ("query_lambdas", values, dtype)
        if key not in self._cache:
            has_keys = (self.question.count > 0).to(dtype).unsqueeze(1)
            self._cache[key] = (self.per_modality(values, dtype) * has_keys).unsqueeze(-1)
        return self._cache[key]

    def delta_mask(self, dtype: torch.dtype) -> Tensor | None:
        """[B, L, 1] mask of the tokens whose adapter path is active (partial-modality inference), or None."""
        if self.active is None:
            return None
        key = ("active", dtype)
        if key not in self._cache:
            if self.modality_index is None:
                mask = torch.full((self.batch, self.length), float(self.active[0]), dtype=dtype, device=self.device)
            else:
                mask = self.per_modality(tuple(float(a) for a in self.active), dtype)
            self._cache[key] = mask.unsqueeze(-1)
        return self._cache[key]


class RoutingState:
    """The routing bound to one model; shared by its adapted layers."""

    def __init__(self, modalities: Iterable[str]) -> None:
        self.modalities = [Modality.parse(m) for m in modalities]
        # id -> configured index, looked up at id + 1 so that PAD (-1) lands on slot 0.
        lookup = torch.full((max(Modality) + 2,), _NOT_CONFIGURED, dtype=torch.long)
        lookup[0] = -1
        for index, modality in enumerate(self.modalities):
            lookup[int(modality) + 1] = index
        self._lookup = lookup
        self._bound = False
        self._modality_index: Tensor | None = None
        self._question_mask: Tensor | None = None
        self._active: tuple[bool, ...] | None = None
        self._offset = 0
        self._views: dict[tuple, TokenRouting] = {}
        self._aux_losses: list[Tensor] = []
        self._aux_layers = 0

    # -- binding ---------------------------------------------------------------------------------
    def bind(self, modality_ids: Tensor | None, question_mask: Tensor | None = None) -> None:
        if modality_ids is None:
            if question_mask is not None:
                raise ValueError("set_routing(model, None) means all text: pass no question_mask with it")
            self._modality_index, self._question_mask = None, None
        else:
            self._modality_index, self._question_mask = self._validate(modality_ids, question_mask)
        self._bound = True
        self._views.clear()
        # A new batch: terms left by the last one (gradient checkpointing's recomputation adds them again after
        # the loss was taken) must not reach this one's loss.
        self._aux_losses.clear()

    def unbind(self) -> None:
        self._bound = False
        self._modality_index = self._question_mask = None
        self._views.clear()
        self._aux_losses.clear()

    @property
    def is_bound(self) -> bool:
        return self._bound

    def _validate(self, modality_ids: Tensor, question_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if not isinstance(modality_ids, Tensor) or modality_ids.dim() != 2:
            raise ValueError(f"modality_ids must be a [batch, length] tensor, got {_describe(modality_ids)}")
        if modality_ids.dtype.is_floating_point or modality_ids.dtype == torch.bool:
            raise ValueError(f"modality_ids must be an integer tensor, got dtype {modality_ids.dtype}")
        if question_mask is None:
            question_mask = torch.zeros_like(modality_ids, dtype=torch.bool)
        if not isinstance(question_mask, Tensor) or question_mask.dtype != torch.bool:
            raise ValueError(f"question_mask must be a bool tensor, got {_describe(question_mask)}")
        if question_mask.shape != modality_ids.shape:
            raise ValueError(
                f"question_mask shape {tuple(question_mask.shape)} does not match modality_ids shape "
                f"{tuple(modality_ids.shape)}"
            )
        ids = modality_ids.long()
        out_of_range = (ids < -1) | (ids > max(Modality))
        if bool(out_of_range.any()):
            bad = sorted(set(ids[out_of_range].tolist()))
            raise ValueError(
                f"modality_ids holds unknown modality ids {bad}; known ids: -1 (pad), "
                + ", ".join(f"{int(m)} ({m.key})" for m in Modality if m is not Modality.PAD)
            )
        index = self._lookup.to(ids.device)[ids + 1]
        unconfigured = index == _NOT_CONFIGURED
        if bool(unconfigured.any()):
            bad = sorted({Modality(i).key for i in ids[unconfigured].tolist()})
            raise ValueError(
                f"modality_ids holds tokens of modalities {bad} that this adapter has no A for; "
                f"its modalities are {[m.key for m in self.modalities]} (AdapterConfig.modalities)"
            )
        misplaced = question_mask & (ids != int(Modality.TEXT))
        if bool(misplaced.any()):
            sample, position = (int(v) for v in misplaced.nonzero()[0])
            raise ValueError(
                f"question_mask marks a non-text token (sample {sample}, position {position}, modality id "
                f"{int(ids[sample, position])}); the question span holds text tokens only"
            )
        return index, question_mask

    # -- partial-modality inference --------------------------------------------------------------
    def set_active(self, modalities: Iterable[str | int | Modality] | None) -> None:
        if modalities is None:
            self._active = None
        else:
            chosen = {Modality.parse(m) for m in modalities}
            unknown = chosen - set(self.modalities)
            if unknown:
                raise ValueError(
                    f"active modalities {sorted(m.key for m in unknown)} are not among the adapter's "
                    f"modalities {[m.key for m in self.modalities]}"
                )
            self._active = tuple(m in chosen for m in self.modalities)
        self._views.clear()

    @property
    def active(self) -> tuple[Modality, ...] | None:
        if self._active is None:
            return None
        return tuple(m for m, on in zip(self.modalities, self._active, strict=True) if on)

    # -- auxiliary losses ------------------------------------------------------------------------
    def register_aux_layer(self) -> None:
        """A layer that adds a term on every training forward counts itself, so that each can add its term
        divided by ``aux_layers``: the loss is then the mean over layers and its weight does not grow with depth."""
        self._aux_layers += 1

    @property
    def aux_layers(self) -> int:
        return max(self._aux_layers, 1)

    def add_aux_loss(self, term: Tensor) -> None:
        """A layer's extra training-loss term for the current batch (a scalar, already weighted), e.g. LoRAMoE's
        load balancing. Layers add terms only in training mode with gradients enabled. A term computed during a
        backward pass (gradient checkpointing's recomputation, after the loss was taken) is dropped."""
        if _in_backward():
            return
        self._aux_losses.append(term)

    def take_aux_loss(self) -> Tensor | None:
        """The sum of the terms added since the last call or binding (fp32), or None when there are none."""
        terms, self._aux_losses = self._aux_losses, []
        if not terms:
            return None
        total = terms[0].float()
        for term in terms[1:]:
            total = total + term.float().to(total.device)
        return total

    # -- per-call views --------------------------------------------------------------------------
    def set_offset(self, offset: int) -> None:
        """Where the current forward starts in the KV cache (set by the model's forward pre-hook)."""
        if offset != self._offset:
            self._offset = offset
            self._views.clear()

    def tokens_for(self, x: Tensor, required: bool) -> TokenRouting | None:
        """The routing of the tokens in ``x`` [B, L, features].

        Layers that do not depend on modalities pass ``required=False`` and get None unless
        partial-modality inference needs the routing.
        """
        if not required and self._active is None:
            return None
        if not self._bound:
            why = "this modality-aware adapter" if required else "partial-modality inference"
            raise RoutingError(
                f"{why} ran with no routing bound: call moka_train.adapters.set_routing(model, modality_ids, "
                "question_mask) before the forward, or set_routing(model, None) for text-only input"
            )
        if x.dim() != 3:
            raise ValueError(
                f"adapted layers with routing expect [batch, length, features] input, got {tuple(x.shape)}"
            )
        key = (x.shape[0], x.shape[1], x.device)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._make_view(x.shape[0], x.shape[1], x.device)
        return view

    def _make_view(self, batch: int, length: int, device: torch.device) -> TokenRouting:
        common = {"num_modalities": len(self.modalities), "active": self._active}
        index = self._modality_index
        if index is None or self._offset >= index.shape[1]:
            return TokenRouting(batch, length, device, **common)
        bound_batch, bound_length = index.shape
        if self._offset > 0:
            raise RoutingError(
                f"chunked prefill is not supported: this call starts at cache position {self._offset}, inside "
                f"the {bound_length} positions the routing covers; prefill the whole routed prompt at once"
            )
        if length < bound_length:
            raise RoutingError(
                f"routing covers {bound_length} positions but the input has {length}: modality_ids and "
                "question_mask must have the shape of the prompt (chunked prefill, e.g. generate's "
                "prefill_chunk_size, is not supported: prefill the whole routed prompt at once)"
            )
        if batch % bound_batch:
            raise RoutingError(
                f"routing has batch {bound_batch} but the input has batch {batch} (not a multiple of it)"
            )
        question = self._question_mask
        if batch != bound_batch:
            # Beam search / num_return_sequences expand each sample in place (repeat_interleave).
            index = index.repeat_interleave(batch // bound_batch, dim=0)
            question = question.repeat_interleave(batch // bound_batch, dim=0)
        if length > bound_length:
            # Positions past the routing (use_cache=False generation) are text and not question.
            index = torch.nn.functional.pad(index, (0, length - bound_length), value=0)
            question = torch.nn.functional.pad(question, (0, length - bound_length), value=False)
        return TokenRouting(
            batch, length, device, modality_index=index.to(device), question_mask=question.to(device), **common
        )


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward pass (torch has no public query for it)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
