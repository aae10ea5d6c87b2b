"""A cache of frozen-encoder features, so that training and evaluation encode every media file once.

Layout: ``<root>/<fingerprint>/`` holds the features of one encoder + preprocessing configuration (the
fingerprint hashes that configuration, so changing a layer, a frame count or a checkpoint never reads stale
features), with ``config.json`` (the configuration itself) and shards written by any number of processes:

    shard-<writer>-<n>.safetensors   tensors ``<key>/features`` [S, N, D] and ``<key>/mask`` [S, N] (if any)
    shard-<writer>-<n>.json          the shard's manifest: its keys, byte size and SHA-256; written last

A shard counts only once its manifest exists, and both are written under a temporary name and renamed, so a
process killed mid-write leaves nothing that is read (at most a ``.tmp`` file or a shard without manifest,
both ignored; their features are computed again).
Writers never touch each other's files: ``<writer>`` is unique per process, so several processes (ranks,
workers, machines on a shared disk) fill one cache safely, and a restarted run skips the keys already
there. On read a shard's size (and, with ``verify="sha256"``, its hash) is checked against its manifest: a
truncated or replaced shard is an error naming it, never garbage features.

A key identifies the media file and the item's role: the file's absolute path, size and modification time,
the media kind and modality. Editing or replacing a file changes its key.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from moka_train.checkpoint_io import write_atomic, write_text_atomic
from moka_train.data.records import MediaRef

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
VERIFY = ("size", "sha256")


def fingerprint(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def media_key(ref: MediaRef) -> str:
    """The cache key of a media item: its file (path, size, mtime) or embedded bytes, kind and modality."""
    if ref.data is not None:
        source = {"path": ref.path, "sha256": hashlib.sha256(ref.data).hexdigest()}
    else:
        path = Path(ref.path).resolve()
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"media file {path} does not exist") from None
        source = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return fingerprint({**source, "kind": ref.kind, "modality": ref.modality})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Entry:
    shard: Path
    size: int
    sha256: str


class FeatureCache:
    """Features of one encoder configuration under ``root``. ``config`` describes everything that changes
    the features (encoder, checkpoint, layer, frames, audio windows, image size...)."""

    def __init__(self, root: str | os.PathLike, config: Mapping[str, Any], verify: str = "size") -> None:
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        self.config = dict(config)
        self.directory = Path(root) / fingerprint(self.config)
        self.verify = verify
        self._index: dict[str, _Entry] = {}
        self._checked: set[Path] = set()
        self._open: dict[Path, Any] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the shard manifests (other processes may have added shards)."""
        self._index = {}
        if not self.directory.is_dir():
            return
        config_file = self.directory / CONFIG_NAME
        if config_file.is_file():
            saved = json.loads(config_file.read_text(encoding="utf-8"))
            if saved.get("config") != json.loads(json.dumps(self.config, default=str)):
                raise ValueError(f"{config_file} describes another configuration than this cache's: {saved}")
        for manifest_path in sorted(self.directory.glob("shard-*.json")):
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
                entry = _Entry(self.directory / manifest["shard"], int(manifest["size"]), manifest["sha256"])
                keys = manifest["keys"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"feature cache manifest {manifest_path} is unreadable: {error}") from None
            if manifest.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{manifest_path} has format_version {manifest.get('format_version')!r}")
            for key in keys:
                self._index[key] = entry

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, ref_or_key: MediaRef | str) -> bool:
        key = ref_or_key if isinstance(ref_or_key, str) else media_key(ref_or_key)
        return key in self._index

    def missing(self, refs: Iterable[MediaRef]) -> list[MediaRef]:
        """The distinct media items (by key) that are not cached yet, in first-seen order."""
        seen, todo = set(), []
        for ref in refs:
            key = media_key(ref)
            if key not in seen and key not in self._index:
                seen.add(key)
                todo.append(ref)
        return todo

    def _check_shard(self, entry: _Entry) -> None:
        if entry.shard in self._checked:
            return
        if not entry.shard.is_file():
            raise FileNotFoundError(f"feature cache shard {entry.shard} is listed in its manifest but missing")
        size = entry.shard.stat().st_size
        if size != entry.size:
            raise ValueError(
                f"feature cache shard {entry.shard} is {size} bytes, its manifest says {entry.size}: truncated or "
                "overwritten; delete it and its .json to recompute its features"
            )
        if self.verify == "sha256" and _sha256(entry.shard) != entry.sha256:
            raise ValueError(f"feature cache shard {entry.shard} does not match the SHA-256 in its manifest")
        self._checked.add(entry.shard)

    def get(self, ref: MediaRef) -> tuple[Tensor, Tensor | None]:
        """``(features [S, N, D], mask [S, N] bool or None)`` of a cached media item."""
        key = media_key(ref)
        entry = self._index.get(key)
        if entry is None:
            raise KeyError(
                f"{ref.path} ({ref.modality} {ref.kind}) is not in the feature cache {self.directory}; run "
                "data_prep/cache_features.py for this dataset and encoder first"
            )
        self._check_shard(entry)
        try:
            if entry.shard not in self._open:
                handle = safe_open(entry.shard, framework="pt", device="cpu")
                self._open[entry.shard] = (handle, set(handle.keys()))
            handle, names = self._open[entry.shard]
            features = handle.get_tensor(f"{key}/features")
            mask = handle.get_tensor(f"{key}/mask") if f"{key}/mask" in names else None
        except (SafetensorError, OSError) as error:
            raise ValueError(f"feature cache shard {entry.shard} is unreadable: {error}") from None
        return features, mask

    def __getstate__(self) -> dict[str, Any]:
        # Open safetensors handles do not pickle (DataLoader workers); each worker reopens its own.
        return {**self.__dict__, "_open": {}}

    def writer(self, shard_bytes: int = 256 << 20) -> CacheWriter:
        return CacheWriter(self, shard_bytes)


class CacheWriter:
    """Adds features to a cache in shards of about ``shard_bytes``; use it as a context manager (the last
    partial shard is written on exit, also when the loop stops with an exception, so finished work is kept)."""

    def __init__(self, cache: FeatureCache, shard_bytes: int) -> None:
        self.cache = cache
        self.shard_bytes = shard_bytes
        # Unique per process and run: host, pid and a random part (pids repeat across machines and restarts).
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pending: dict[str, Tensor] = {}
        self._keys: list[str] = []
        self._key_set: set[str] = set()
        self._bytes = 0
        self._count = 0
        self.written = 0

    def __enter__(self) -> CacheWriter:
        directory = self.cache.directory
        directory.mkdir(parents=True, exist_ok=True)
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            text = json.dumps({"format_version": FORMAT_VERSION, "config": self.cache.config}, indent=2, default=str)
            write_text_atomic(config_file, text + "\n")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush()

    def add(self, ref: MediaRef, features: Tensor, mask: Tensor | None = None) -> None:
        if features.dim() != 3:
            raise ValueError(f"{ref.path}: features must be [segments, tokens, dim], got {tuple(features.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != features.shape[:2]):
            raise ValueError(
                f"{ref.path}: mask must be bool {tuple(features.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        key = media_key(ref)
        if key in self._key_set or key in self.cache._index:
            return
        self._pending[f"{key}/features"] = features.detach().to("cpu").contiguous()
        if mask is not None:
            self._pending[f"{key}/mask"] = mask.detach().to("cpu").contiguous()
        self._keys.append(key)
        self._key_set.add(key)
        self._bytes += features.numel() * features.element_size()
        if self._bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the pending features as one shard, then its manifest (the moment they count)."""
        if not self._keys:
            return
        directory = self.cache.directory
        stem = f"shard-{self.name}-{self._count:05d}"
        shard = directory / f"{stem}.safetensors"
        write_atomic(shard, lambda tmp: save_file(self._pending, tmp, metadata={"format": "pt"}))
        manifest = {
            "format_version": FORMAT_VERSION,
            "shard": shard.name,
            "size": shard.stat().st_size,
            "sha256": _sha256(shard),
            "keys": self._keys,
        }
        write_text_atomic(directory / f"{stem}.json", json.dumps(manifest) + "\n")
        entry = _Entry(shard, manifest["size"], manifest["sha256"])
        for key in self._keys:
            self.cache._index[key] = entry
        self.written += len(self._keys)
        self._count += 1
        self._pending, self._keys, self._key_set, self._bytes = {}, [], set(), 0
