"""Filling feature caches: every distinct media item of a dataset through its frozen encoder, once.

``cache_config`` names what the features depend on (the encoder's config, the stat of any checkpoint file
it names, how media are read), so a cache is found again by the same settings and never reused across
different ones. ``fill_feature_caches`` runs the encoders over the items still missing, in batches, sharded
over the processes of a distributed run (rank r takes every world-th item), with a progress bar on rank 0
and a summary of the items that could not be read.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moka_train.data.dataset import MediaSource
from moka_train.data.features import FeatureCache, media_key
from moka_train.data.media import MediaLoader, resolve_audio_windows
from moka_train.data.records import MediaRef, Record
from moka_train.modality import Modality
from moka_train.models.encoders import SegmentEncoder

ON_ERROR = ("error", "skip")


def _with_file_stats(value: Any) -> Any:
    """Config values that name an existing file carry its size and mtime: a checkpoint replaced in place
    changes the fingerprint."""
    if isinstance(value, Mapping):
        return {str(k): _with_file_stats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_with_file_stats(v) for v in value]
    if isinstance(value, str) and os.path.isfile(value):
        stat = os.stat(value)
        return {"file": str(Path(value).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return value


# Media settings that change where media are read from, not what is read: left out of the fingerprint.
_MEDIA_SOURCE_ONLY = ("extracted_dir",)
# Settings that shape one kind of media only: the other modalities' caches leave them out, so that changing the
# audio windows (music_avqa vs music_avqa_moka) does not re-encode every video frame through CLIP.
_VISUAL_ONLY = ("frames", "frame_size")
_SOUND_ONLY = ("audio_windows", "sample_rate")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MediaLoader) if f.name in _VISUAL_ONLY + _SOUND_ONLY}


def cache_config(modality: str, encoder: Mapping[str, Any], media: Mapping[str, Any]) -> dict[str, Any]:
    """What a modality's cached features depend on: its encoder's config and how its media are read (the
    settings of its kind of media only, a default written out or left out alike)."""
    other_kind = _SOUND_ONLY if Modality.parse(modality) is Modality.VISUAL else _VISUAL_ONLY
    media = {key: value for key, value in media.items() if key not in _MEDIA_SOURCE_ONLY + other_kind}
    for key, default in _DEFAULTS.items():
        if key not in other_kind:
            media.setdefault(key, default)
    if "audio_windows" in media:  # the windows a preset name stands for: a preset redefined changes the key
        media["audio_windows"] = dataclasses.asdict(resolve_audio_windows(media["audio_windows"]))
    return {"modality": modality, "encoder": _with_file_stats(dict(encoder)), "media": _with_file_stats(media)}


def open_caches(
    root: str | os.PathLike, encoders: Mapping[str, Mapping[str, Any]], media: Mapping[str, Any]
) -> dict[str, FeatureCache]:
    """One cache per modality under ``root``, for encoder configs ``{modality: config}``."""
    return {name: FeatureCache(root, cache_config(name, config, media)) for name, config in encoders.items()}


@dataclass
class CacheReport:
    written: int = 0
    already_cached: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error)


def _encode(encoder: SegmentEncoder, items: list[torch.Tensor], device: torch.device) -> list[tuple]:
    """Encode several items in one call when their segments have one shape, else one by one."""
    if len({tuple(item.shape[1:]) for item in items}) == 1:
        features, mask = encoder.encode_segments(torch.cat(items).to(device))
        sizes = [item.shape[0] for item in items]
        parts = features.split(sizes)
        masks = mask.split(sizes) if mask is not None else [None] * len(items)
        return list(zip(parts, masks, strict=True))
    return [encoder.encode_segments(item.to(device)) for item in items]


@torch.no_grad()
def fill_feature_caches(
    records: Sequence[Record],
    encoders: Mapping[str, SegmentEncoder],
    caches: Mapping[str, FeatureCache],
    loader: MediaSource,
    batch_items: int = 8,
    on_error: str = "error",
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> CacheReport:
    """Encode and cache every distinct media item of ``records`` that is not cached yet; this process takes
    the distinct items (cached or not, in first-seen order) with index ``rank`` modulo ``world_size``, and
    counts its share's cached ones in ``already_cached``. ``on_error="skip"`` counts unreadable media and
    goes on (they are listed in the report and one warning); ``"error"`` stops at the first, naming it."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    device = torch.device(device)
    report = CacheReport()
    for name in sorted({ref.modality for record in records for ref in record.media}):
        if name not in encoders or name not in caches:
            raise ValueError(f"the records have {name} media, but no {name} encoder / cache is configured")
        distinct: dict[str, MediaRef] = {}
        for record in records:
            for ref in record.media:
                if ref.modality == name:
                    distinct.setdefault(media_key(ref), ref)
        # Shard all the items, cached or not, then drop the cached ones: ranks that open the cache at different
        # times (one already wrote a shard) still split the items the same way, and every item has an owner.
        share = list(distinct.items())[rank::world_size]
        mine = [ref for key, ref in share if key not in caches[name]]  # keys computed once (each stats its file)
        report.already_cached += len(share) - len(mine)
        encoder = encoders[name]
        with caches[name].writer() as writer:
            # No bar when everything is cached already (every evaluation of a cached run): "0item" reads as a fault.
            bar = tqdm(total=len(mine), desc=f"caching {name} features", disable=rank != 0 or not mine, unit="item")
            for start in range(0, len(mine), batch_items):
                batch: list[tuple[MediaRef, torch.Tensor]] = []
                for ref in mine[start : start + batch_items]:
                    try:
                        batch.append((ref, loader.load(ref)))
                    except (OSError, ValueError) as error:
                        if on_error == "error":
                            raise
                        report.failed.append((ref.path, str(error)))
                if batch:
                    for (ref, _), (features, mask) in zip(
                        batch, _encode(encoder, [item for _, item in batch], device), strict=True
                    ):
                        writer.add(ref, features, mask)
                bar.update(len(mine[start : start + batch_items]))
            bar.close()
        report.written += writer.written
    if report.failed:
        shown = "; ".join(f"{path}: {error}" for path, error in report.failed[:5])
        warnings.warn(f"{len(report.failed)} media items could not be read and were not cached: {shown}", stacklevel=2)
    return report
