"""The multimodal LLM: projector tokens spliced into the prompt of a frozen backbone that carries adapters.

A batch (the collator's output, DESIGN.md's data contract) holds ``input_ids`` in which every media block
is already expanded to its projector's token count with the modality's placeholder id (``<video>`` x 320),
``attention_mask``, ``labels`` (-100 outside the response), ``modality_ids``, ``question_mask`` and, per
modality, its segments in order of appearance (batch-major): raw media (``media`` / ``media_lengths``, run
through the frozen encoder here) or cached encoder features (``features`` / ``feature_masks``). The model

1. embeds the text (frozen backbone matrix + trainable rows for the added special tokens),
2. projects each modality's segments in one call and scatters the tokens onto its placeholder positions
   (``masked_scatter``: no loop over samples),
3. checks ``modality_ids`` / ``question_mask`` against the input and binds them with ``set_routing``,
4. runs the backbone. The loss is summed over label tokens and divided by ``label_normalizer`` (the
   global label count when the trainer passes it), so 1 and N processes agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import ModelOutput

from moka_train.adapters import adapter_named_parameters, carries_adapters, set_routing, take_aux_loss
from moka_train.adapters.model import numel
from moka_train.modality import Modality
from moka_train.models.added_tokens import AddedTokenEmbedding
from moka_train.models.encoders import SegmentEncoder
from moka_train.models.projector import QFormerProjector

STAGES = ("pretrain", "instruct")
IGNORE_INDEX = -100


def zero3_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``module``'s parameters (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def count_label_tokens(labels: Tensor) -> int:
    """The tokens the loss is taken on: labels shifted by one (position t predicts t + 1), ignored ones left out."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def encode_modality(encoder: nn.Module, batch: Mapping[str, Any], modality: str) -> tuple[Tensor, Tensor | None]:
    """The frozen encoder's features (and mask) of the batch's raw ``modality`` media, without gradients."""
    with torch.no_grad():
        return encoder.encode_segments(batch["media"][modality], batch.get("media_lengths", {}).get(modality))


def encode_media(encoders: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with its raw media replaced by the encoders' features: what a feature cache would give.
    Training runs the encoders here, outside the model DeepSpeed wraps, so ZeRO-3 never partitions them (a
    rank without audio in its micro-batch would otherwise skip the audio encoder's parameter gathers that
    the other ranks wait on), and no memory goes to their gradients or optimizer state."""
    media = batch.get("media", {})
    if not media:
        return dict(batch)
    out = {k: v for k, v in batch.items() if k not in ("media", "media_lengths")}
    features, masks = dict(batch.get("features", {})), dict(batch.get("feature_masks", {}))
    for modality in media:
        features[modality], mask = encode_modality(encoders[modality], batch, modality)
        if mask is not None:
            masks[modality] = mask
    out["features"], out["feature_masks"] = features, masks
    return out


@dataclass
class MultimodalOutput(ModelOutput):
    """A ``ModelOutput``, which DeepSpeed reads as a dict: its engine hooks the tensors of a tensor, tuple, list
    or dict output to learn, at each micro-step's backward, whether the micro-step ends the optimizer step. With
    a plain dataclass it never learnt it, and ZeRO with the optimizer offloaded lost micro-steps' gradients
    whenever the trainables filled more than one gradient bucket."""

    # (ModelOutput wants None defaults; forward always sets logits and label_count.)
    loss: Tensor | None = None
    logits: Tensor | None = None
    label_count: int | None = None


class MultimodalLM(nn.Module):
    """``llm`` (a causal LM, adapters already injected for stage 2), one projector per media modality,
    and the ids of the added special tokens (``placeholder_ids[modality]`` marks where its tokens go)."""

    def __init__(
        self,
        llm: nn.Module,
        projectors: Mapping[str, QFormerProjector],
        placeholder_ids: Mapping[str, int | Sequence[int]],
        added_token_ids: Sequence[int],
        encoders: Mapping[str, SegmentEncoder] | None = None,
    ) -> None:
        super().__init__()
        names = {Modality.parse(m).key for m in projectors}
        if names != {Modality.parse(m).key for m in placeholder_ids}:
            raise ValueError(
                f"projectors {sorted(projectors)} and placeholder_ids {sorted(placeholder_ids)} must name the "
                "same modalities"
            )
        if "text" in names:
            raise ValueError("text has no projector; projectors are for media modalities")
        # modality -> its placeholder ids (images and video frames both fill the visual projector's slots)
        self.placeholder_ids = {
            Modality.parse(m).key: [int(i)] if isinstance(i, int) else [int(v) for v in i]
            for m, i in placeholder_ids.items()
        }
        every_placeholder = [i for ids in self.placeholder_ids.values() for i in ids]
        if len(set(every_placeholder)) != len(every_placeholder):
            raise ValueError(f"a placeholder id serves two modalities: {self.placeholder_ids}")
        missing = sorted(set(every_placeholder) - {int(i) for i in added_token_ids})
        if missing:
            raise ValueError(f"placeholder ids {missing} are not among the added token ids {list(added_token_ids)}")
        encoders = {Modality.parse(m).key: e for m, e in (encoders or {}).items()}
        if not set(encoders) <= names:
            raise ValueError(f"encoders {sorted(encoders)} have no projector (projectors: {sorted(names)})")
        self.llm = llm
        self.projectors = nn.ModuleDict({Modality.parse(m).key: p for m, p in projectors.items()})
        self.encoders = nn.ModuleDict(encoders)
        self.embed = AddedTokenEmbedding(llm.get_input_embeddings(), added_token_ids)
        for name, projector in self.projectors.items():
            width = projector.config.llm_hidden_size
            if width != self.embed.embedding_dim:
                raise ValueError(
                    f"the {name} projector outputs width {width}, the LLM's hidden size is {self.embed.embedding_dim}"
                )
            if name in self.encoders and self.encoders[name].hidden_size != projector.config.encoder_width:
                raise ValueError(
                    f"the {name} encoder outputs width {self.encoders[name].hidden_size}, its projector expects "
                    f"encoder_width {projector.config.encoder_width}"
                )
        for kind, modules in (("projector", self.projectors), ("encoder", self.encoders)):
            for name, module in modules.items():
                if carries_adapters(module):
                    raise ValueError(
                        f"the {name} {kind} carries adapters: inject them into the LLM only, before building the model"
                    )
        self.encoders.requires_grad_(False)
        adapter_ids = {id(p) for _, p in adapter_named_parameters(llm)}
        for parameter in llm.parameters():
            if id(parameter) not in adapter_ids:
                parameter.requires_grad_(False)

    # -- building the input -------------------------------------------------------------------------
    def placeholder_positions(self, input_ids: Tensor, modality: str) -> Tensor:
        ids = torch.tensor(self.placeholder_ids[modality], device=input_ids.device)
        return torch.isin(input_ids, ids)

    def encoder_features(self, batch: Mapping[str, Tensor | Mapping], modality: str) -> tuple[Tensor, Tensor | None]:
        """The segments' encoder features and mask (True = real): cached in the batch, or encoded here from
        the raw media (frozen encoder, no gradients)."""
        if modality in batch.get("features", {}):
            return batch["features"][modality], batch.get("feature_masks", {}).get(modality)
        if modality not in self.encoders:
            raise ValueError(
                f"the batch has raw {modality} media but the model has no {modality} encoder (it was built for "
                "cached features)"
            )
        return encode_modality(self.encoders[modality], batch, modality)

    def embed_inputs(self, batch: Mapping[str, Tensor | Mapping]) -> Tensor:
        """Token embeddings with every placeholder position replaced by its projector token."""
        input_ids = batch["input_ids"]
        embeds = self.embed(input_ids)
        features, media = batch.get("features", {}), batch.get("media", {})
        unknown = sorted((set(features) | set(media)) - set(self.projectors))
        if unknown:
            raise ValueError(
                f"batch has features or media for {unknown}, but the model has projectors for {sorted(self.projectors)}"
            )
        both = sorted(set(features) & set(media))
        if both:
            raise ValueError(f"batch has both cached features and raw media for {both}; give one")
        for name, projector in self.projectors.items():
            positions = self.placeholder_positions(input_ids, name)
            slots = int(positions.sum())
            if name not in features and name not in media:
                if slots:
                    raise ValueError(
                        f"input_ids hold {slots} <{name}> placeholders but the batch has no {name} features or media"
                    )
                # Every projector runs on every forward, whatever modalities this batch holds: ZeRO-3 ranks
                # then gather the same parameters in the same order (a rank that skipped one would leave the
                # others waiting in its all-gather), and DDP sees every parameter used. It adds exactly zero.
                idle = projector(embeds.new_zeros(1, 1, projector.config.encoder_width))
                embeds = embeds + idle.sum().to(embeds.dtype) * 0
                continue
            tokens = projector(*self.encoder_features(batch, name))  # [segments, queries, hidden]
            segments, per_segment = tokens.shape[:2]
            if segments * per_segment != slots:
                raise ValueError(
                    f"{name}: {segments} segments x {per_segment} tokens = {segments * per_segment} projector "
                    f"tokens, but input_ids hold {slots} <{name}> placeholders"
                )
            # masked_scatter fills the placeholder positions in row-major order: batch, then position, which
            # is the order of the segments (batch-major, in order of appearance).
            embeds = embeds.masked_scatter(
                positions.unsqueeze(-1), tokens.to(embeds.dtype).reshape(-1, embeds.shape[-1])
            )
        return embeds

    def check_routing(self, batch: Mapping[str, Tensor]) -> None:
        """``modality_ids`` must mark the placeholder positions with their modality, pads with -1 and every
        other token as text. (That the question span lies on text is checked by ``set_routing``.)"""
        input_ids, modality_ids = batch["input_ids"], batch["modality_ids"]
        if modality_ids.shape != input_ids.shape or batch["question_mask"].shape != input_ids.shape:
            raise ValueError(
                f"modality_ids {tuple(modality_ids.shape)} / question_mask {tuple(batch['question_mask'].shape)} must "
                f"have the shape of input_ids {tuple(input_ids.shape)}"
            )
        expected = torch.full_like(modality_ids, int(Modality.TEXT))
        for name in self.placeholder_ids:
            expected[self.placeholder_positions(input_ids, name)] = int(Modality.parse(name))
        expected[batch["attention_mask"] == 0] = int(Modality.PAD)
        wrong = modality_ids != expected
        if bool(wrong.any()):
            sample, position = (int(v) for v in wrong.nonzero()[0])
            raise ValueError(
                f"modality_ids disagree with input_ids at sample {sample}, position {position}: "
                f"{int(modality_ids[sample, position])} given, {int(expected[sample, position])} expected "
                "(placeholders carry their modality, pads -1, everything else text)"
            )

    # -- running ------------------------------------------------------------------------------------
    def prepare(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Embeddings and position ids of the batch, with its routing bound."""
        self.check_routing(batch)
        if carries_adapters(self.llm):  # stage 1 may run before any adapter exists
            set_routing(self.llm, batch["modality_ids"], batch["question_mask"])
        attention_mask = batch["attention_mask"]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding keeps positions from 0
        return self.embed_inputs(batch), position_ids

    def forward(self, batch: Mapping[str, Tensor], label_normalizer: int | None = None) -> MultimodalOutput:
        embeds, position_ids = self.prepare(batch)
        logits = self.llm(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=position_ids
        ).logits
        labels = batch.get("labels")
        if labels is None:
            return MultimodalOutput(None, logits, 0)
        targets = labels[:, 1:]
        label_count = count_label_tokens(labels)
        summed = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        normalizer = label_normalizer if label_normalizer is not None else max(label_count, 1)
        loss = summed / normalizer
        aux = take_aux_loss(self.llm) if carries_adapters(self.llm) else None
        if aux is not None:
            # Weighted by this batch's share of the label tokens, as the task loss is: summed over the micro-batches
            # and ranks of a step it is then the token-weighted mean of the per-batch terms.
            loss = loss + aux.to(loss.device) * (label_count / normalizer)
        return MultimodalOutput(loss, logits, label_count)

    @torch.no_grad()
    def generate(self, batch: Mapping[str, Tensor], **generation_kwargs) -> Tensor:
        """New token ids for each (left-padded) prompt: the MokA interaction runs at prefill, decoding is
        cached. Settings are explicit: greedy unless ``do_sample=True`` is passed."""
        embeds, _ = self.prepare(batch)
        generation_kwargs.setdefault("do_sample", False)
        # Under ZeRO-3 every forward gathers parameters from all ranks, so a rank whose prompts finished
        # early must keep stepping until all have finished, or the others hang in the gather.
        generation_kwargs.setdefault("synced_gpus", zero3_partitioned(self) and _world_size() > 1)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **generation_kwargs)

    # -- what trains --------------------------------------------------------------------------------
    def set_stage(self, stage: str, train_added_tokens: bool = True) -> None:
        """``pretrain``: projectors and added-token rows train; ``instruct``: also the adapter. The backbone
        (and any encoder) stays frozen. ``train_added_tokens=False`` freezes the added-token rows too (the
        official stage 2 trains projectors and LoRA only)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.requires_grad_(False)
        self.projectors.requires_grad_(True)
        self.embed.weight.requires_grad_(train_added_tokens)
        adapters = [p for _, p in adapter_named_parameters(self.llm)]
        if stage == "instruct" and not adapters:
            raise ValueError("stage 'instruct' trains the adapter, but the LLM carries none: inject_adapters first")
        for parameter in adapters:
            parameter.requires_grad_(stage == "instruct")

    def parameter_report(self) -> dict[str, tuple[int, int]]:
        """``{component: (trainable, total)}`` for projectors and encoders (per modality), added tokens,
        adapter and LLM."""
        adapter = [p for _, p in adapter_named_parameters(self.llm)]
        adapter_ids = {id(p) for p in adapter}
        groups: dict[str, list[nn.Parameter]] = {
            f"projector.{n}": list(p.parameters()) for n, p in self.projectors.items()
        }
        groups.update({f"encoder.{n}": list(e.parameters()) for n, e in self.encoders.items()})
        groups["added_tokens"] = [self.embed.weight]
        groups["adapter"] = adapter
        groups["llm"] = [p for p in self.llm.parameters() if id(p) not in adapter_ids]
        # numel() of a ZeRO-3 partitioned parameter is 0; the adapters' helper reads ds_numel then.
        return {
            name: (sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params))
            for name, params in groups.items()
        }
