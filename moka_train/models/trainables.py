"""Saving and loading what a run trains: the projectors, the added tokens' embedding rows with their ids,
and the adapter. Nothing of the frozen backbone or encoders is written, so a 7B stage-2 checkpoint is tens
of megabytes, loadable for evaluation without DeepSpeed.

A checkpoint directory holds

    trainables.safetensors   projectors.<modality>.<projector state-dict key>, added_tokens.weight [K, hidden]
    trainables.json          format_version, the added tokens' ids, each projector's config
    adapter/                 the adapter in ``moka_train.adapters.checkpoint``'s layout (stage 2 only)

The tensor names are a stable format (pinned by tests). ``trainables.json`` is written last: a directory
without it is an unfinished save.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from moka_train.adapters import carries_adapters, load_adapter, save_adapter
from moka_train.checkpoint_io import full_precision, gathered, is_writer, write_atomic, write_text_atomic
from moka_train.models.mllm import MultimodalLM
from moka_train.models.tokenizer import added_token_modalities

FORMAT_VERSION = 1
WEIGHTS_NAME = "trainables.safetensors"
MANIFEST_NAME = "trainables.json"
ADAPTER_DIR = "adapter"
PARTS = ("projectors", "added_tokens", "adapter")
ADDED_TOKENS_KEY = "added_tokens.weight"
# Fields that do not change the weights' meaning: a checkpoint loads whatever they are.
_IGNORED_PROJECTOR_FIELDS = {"dropout"}


def trainables_state_dict(model: MultimodalLM) -> dict[str, Tensor]:
    """Projector and added-token weights on the CPU, DeepSpeed's fp32 masters where it keeps them (gathered first
    under ZeRO-3: call it on every rank)."""
    state = {}
    for name, projector in model.projectors.items():
        parameters = dict(projector.named_parameters())
        with gathered(parameters.values()):
            for key, tensor in projector.state_dict().items():
                value = full_precision(parameters[key]) if key in parameters else tensor
                state[f"projectors.{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    with gathered([model.embed.weight]):
        state[ADDED_TOKENS_KEY] = full_precision(model.embed.weight).detach().to("cpu", copy=True).contiguous()
    return state


def save_trainables(model: MultimodalLM, directory: str | os.PathLike) -> Path:
    """Write the trainables to ``directory``. Under ZeRO-3 call it on every rank; rank 0 writes."""
    directory = Path(directory)
    state = trainables_state_dict(model)
    if carries_adapters(model.llm):
        save_adapter(model.llm, directory / ADAPTER_DIR)
    if not is_writer():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "added_token_ids": model.embed.token_ids.tolist(),
        "projectors": {name: dataclasses.asdict(p.config) for name, p in model.projectors.items()},
        "adapter": carries_adapters(model.llm),
    }
    write_atomic(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_text_atomic(directory / MANIFEST_NAME, text)
    return directory


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a trainables checkpoint, checked for its format version."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"trainables checkpoint {directory} does not exist")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {MANIFEST_NAME}: not a trainables checkpoint, or an unfinished save"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {manifest.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    return manifest


def load_trainables(
    model: MultimodalLM,
    directory: str | os.PathLike,
    parts: Iterable[str] | None = None,
    modalities: Iterable[str] | None = None,
) -> dict[str, list[str]]:
    """Load a trainables checkpoint into ``model`` and return what was loaded, per part.

    ``parts``: a subset of ``("projectors", "added_tokens", "adapter")``; None loads every part the checkpoint
    has (a stage-1 checkpoint has no adapter, so the model's stays as initialised; an imported official
    checkpoint may have no added-token rows or no projectors). ``modalities``: which projectors, and which
    added-token rows (a medium's placeholder and markers), to load (None: all in the checkpoint), e.g. the
    visual ones from an image-caption stage 1 and the audio ones from an AudioCaps stage 1. Names, shapes,
    projector configs and token ids must match.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    available = _available_parts(manifest)
    wanted = set(available if parts is None else parts)
    unknown = sorted(wanted - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {PARTS}")
    absent = sorted(wanted - available)
    if absent:
        raise ValueError(f"{directory} holds no {absent} (it has {sorted(available)})")
    path = directory / WEIGHTS_NAME
    try:
        weights = load_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} has a manifest but no {WEIGHTS_NAME}") from None
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None

    loaded: dict[str, list[str]] = {}
    if "projectors" in wanted:
        loaded["projectors"] = _load_projectors(model, manifest, weights, path, modalities)
    if "added_tokens" in wanted:
        model.embed.check_token_ids(manifest["added_token_ids"], str(directory / MANIFEST_NAME))
        ids = manifest["added_token_ids"]
        # With ``modalities``, those modalities' rows only (<audio>, <audio_start>, <audio_end> for audio): each
        # stage-1 run trained its own medium's rows, and the others' are still their initial values.
        keys = added_token_modalities()
        rows = list(range(len(ids))) if modalities is None else [i for i, m in enumerate(keys) if m in modalities]
        with gathered([model.embed.weight], modifier_rank=0):
            _copy_into(model.embed.weight, weights.get(ADDED_TOKENS_KEY), ADDED_TOKENS_KEY, path, rows)
        loaded["added_tokens"] = [str(ids[i]) for i in rows]
    if "adapter" in wanted:
        load_adapter(model.llm, directory / ADAPTER_DIR)
        loaded["adapter"] = [ADAPTER_DIR]
    return loaded


def available_parts(directory: str | os.PathLike) -> list[str]:
    """The parts (of ``PARTS``) a trainables checkpoint holds, in ``PARTS`` order."""
    return [part for part in PARTS if part in _available_parts(read_manifest(Path(directory)))]


def _available_parts(manifest: dict) -> set[str]:
    # A part a checkpoint has nothing of (an imported official adapter has no added-token rows, an adapter-only
    # import no projectors) is absent, not empty: None skips it, naming it in ``parts`` is an error.
    return {
        part
        for part, present in (
            ("projectors", bool(manifest["projectors"])),
            ("added_tokens", bool(manifest["added_token_ids"])),
            ("adapter", bool(manifest["adapter"])),
        )
        if present
    }


def _load_projectors(
    model: MultimodalLM, manifest: dict, weights: dict[str, Tensor], path: Path, modalities: Iterable[str] | None
) -> list[str]:
    saved = manifest["projectors"]
    names = sorted(saved) if modalities is None else sorted(modalities)
    for name in names:
        if name not in saved:
            raise ValueError(f"{path} has no {name} projector (it has {sorted(saved)})")
        if name not in model.projectors:
            raise ValueError(f"{path} has a {name} projector, the model has none (it has {sorted(model.projectors)})")
        projector = model.projectors[name]
        mine = dataclasses.asdict(projector.config)
        differing = sorted(
            k
            for k in set(mine) | set(saved[name])
            if k not in _IGNORED_PROJECTOR_FIELDS and mine.get(k) != saved[name].get(k)
        )
        if differing:
            details = ", ".join(f"{k}: saved {saved[name].get(k)!r}, model {mine.get(k)!r}" for k in differing)
            raise ValueError(f"{path}: the {name} projector was saved with another config ({details})")
        prefix = f"projectors.{name}."
        state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        expected = projector.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{path}: the {name} projector's keys do not match: {len(missing)} missing {missing[:3]}, "
                f"{len(unexpected)} unexpected {unexpected[:3]}"
            )
        with gathered(projector.parameters(), modifier_rank=0):
            for key, tensor in projector.state_dict(keep_vars=True).items():
                _copy_into(tensor, state[key], prefix + key, path)
    return names


def _copy_into(target: Tensor, tensor: Tensor | None, key: str, path: Path, rows: list[int] | None = None) -> None:
    """Copy a saved tensor (its ``rows`` only, if given) into a parameter or buffer (gathered by the caller
    under ZeRO-3)."""
    if tensor is None:
        raise ValueError(f"{path} has no {key}")
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
    with torch.no_grad():
        if rows is None:
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
        else:
            target[rows] = tensor[rows].to(dtype=target.dtype, device=target.device)
