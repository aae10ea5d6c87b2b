"""Records -> Samples: a map-style dataset that reads each record's media when asked for it, either raw
(decoded and preprocessed by a ``MediaLoader``) or as cached encoder features (``FeatureCache`` per
modality). Both give the collator the same ``Sample`` structure, so the same batches reach the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset

from moka_train.data.features import FeatureCache
from moka_train.data.records import MediaRef, Record
from moka_train.data.sample import Sample
from moka_train.modality import Modality


class MediaSource(Protocol):
    def load(self, ref: MediaRef) -> Tensor: ...


class MultimodalDataset(Dataset):
    """``records`` with their media from ``loader`` (raw media) or ``caches`` (modality -> FeatureCache).

    ``inference=True`` drops a final assistant turn (the target stays in the record's metadata), so the
    collator renders the prompt with the generation prompt. ``zero_media=True`` replaces every media item by
    zeros of its shape: the blind control, which shows what a model learns without looking or listening.
    """

    def __init__(
        self,
        records: Sequence[Record],
        loader: MediaSource | None = None,
        caches: Mapping[str, FeatureCache] | None = None,
        inference: bool = False,
        zero_media: bool = False,
    ) -> None:
        if (loader is None) == (caches is None):
            raise ValueError("give either a media loader (raw media) or feature caches, not both or neither")
        self.records = list(records)
        self.loader = loader
        self.caches = None if caches is None else {Modality.parse(m).key: c for m, c in caches.items()}
        self.inference = inference
        self.zero_media = zero_media
        if self.caches is not None:
            needed = {ref.modality for record in self.records for ref in record.media}
            missing = sorted(needed - set(self.caches))
            if missing:
                raise ValueError(f"the records have {missing} media but there is no feature cache for them")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        messages = record.messages
        if self.inference and messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        media: dict[str, list[Tensor]] = {}
        masks: dict[str, list[Tensor | None]] = {}
        for ref in record.media:
            try:
                if self.caches is None:
                    item, mask = self.loader.load(ref), None
                else:
                    item, mask = self.caches[ref.modality].get(ref)
            except (OSError, ValueError, KeyError) as error:
                raise type(error)(f"record {record.id!r}: {error}") from error
            media.setdefault(ref.modality, []).append(torch.zeros_like(item) if self.zero_media else item)
            masks.setdefault(ref.modality, []).append(mask)
        feature_masks = {
            name: [
                torch.ones(item.shape[:2], dtype=torch.bool) if m is None else m
                for item, m in zip(media[name], ms, strict=True)
            ]
            for name, ms in masks.items()
            if any(m is not None for m in ms)
        }
        return Sample(
            id=record.id,
            messages=messages,
            question_span=record.question_span,
            media=media,
            feature_masks=feature_masks,
            metadata=record.metadata,
        )
