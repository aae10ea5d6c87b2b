"""Cache the frozen encoders' features of a dataset (see configs/cache_features.yaml for the command).

Resumable: items already in the cache are skipped, so rerunning after a kill finishes the job. Under
torchrun each process takes every world-th distinct item (cached or not, so processes that start apart
split the same way) and writes its own shards; no collective is needed.
"""

from __future__ import annotations

import os

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moka_train.data.caching import fill_feature_caches, open_caches
from moka_train.data.media import build_media_loader


@hydra.main(version_base="1.3", config_path="../configs", config_name="cache_features")
def main(cfg: DictConfig) -> None:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world_size > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    records = instantiate(cfg.data.builder)
    encoder_cfgs = OmegaConf.to_container(cfg.encoder, resolve=True)
    needed = sorted({ref.modality for record in records for ref in record.media})
    missing = [name for name in needed if name not in encoder_cfgs]
    if missing:
        raise SystemExit(f"the dataset has {missing} media: add an encoder for them, e.g. +encoder/{missing[0]}=...")
    encoders = {name: instantiate(cfg.encoder[name]).to(device) for name in needed}
    media_cfg = OmegaConf.to_container(cfg.data.media, resolve=True)
    loader = build_media_loader(media_cfg, encoders.get("visual"))
    caches = open_caches(cfg.cache_dir, {name: encoder_cfgs[name] for name in needed}, media_cfg)
    report = fill_feature_caches(
        records, encoders, caches, loader, cfg.batch_items, cfg.on_error, rank, world_size, device
    )
    print(
        f"rank {rank}: {report.written} items encoded, {report.already_cached} already cached, "
        f"{len(report.failed)} unreadable; caches: " + ", ".join(str(c.directory) for c in caches.values())
    )


if __name__ == "__main__":
    main()
