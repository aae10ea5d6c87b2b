"""The training config's checks, run before anything is built: every bad value is an error naming its key.

``check_config(cfg)`` is called first by ``recipe.train``, before the process group starts; what needs the world
size (``check_batch_split``) comes right after. Hydra refuses an unknown key given on the command line, but not
one that a config file (an experiment) adds: ``check_known_keys`` refuses those in the sections the recipe reads
key by key. Components built from the config (the adapter, the logger, the chat template, the DeepSpeed JSON,
the ``stage.init_from`` checkpoints) are checked here too, cheaply, rather than after the encoders and the
backbone have loaded.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moka_train.data.collate import ON_OVERFLOW
from moka_train.models.chat_templates import CHAT_TEMPLATES, USE_TOKENIZER_TEMPLATE
from moka_train.models.trainables import PARTS, read_manifest
from moka_train.training.deepspeed_config import load_deepspeed_config
from moka_train.training.run_logger import check_logger_config
from moka_train.training.schedule import SCHEDULES
from moka_train.training.stop_signals import parse_stop_signals

STAGES = ("pretrain", "instruct")
FAULT_SIGNAL_TARGETS = ("self", "group", "launcher")

# The keys of the sections the recipe reads one by one (configs/train.yaml, configs/{stage,model,data,deepspeed}/;
# a test keeps them equal). What is instantiated (adapter, encoder, projector, model.backbone, model.tokenizer,
# data.builder) is checked by its class, which refuses what it does not take. Top level: train.yaml's keys, the
# config groups, and ``stage1_dir``, which the paper presets interpolate into stage.init_from.
KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    "": (
        "seed", "run_dir", "resume", "checkpoint", "features", "loader", "validation", "on_nonfinite",
        "stop_signals", "blind", "probe_media", "fault", "stage", "model", "adapter", "encoder", "projector",
        "data", "deepspeed", "logger", "stage1_dir",
    ),
    "stage": (
        "name", "epochs", "max_steps", "lr", "weight_decay", "schedule", "warmup_ratio", "precision",
        "global_batch_size", "micro_batch_size", "drop_last", "gradient_clipping", "gradient_checkpointing",
        "init_from", "train_added_tokens",
    ),
    "checkpoint": ("every_steps", "keep_last"),
    "features": ("cache_dir", "fill"),
    "loader": ("num_workers", "max_length", "on_overflow"),
    "validation": ("split", "every_steps", "max_samples", "micro_batch_size", "keep_best", "patience"),
    "fault": (
        "exit_after_step", "exit_during_save_at_step", "signal_after_step", "signal_during_validation_at_step",
        "signal_during_save_at_step", "signal_to", "nonfinite_loss_at_step", "nonfinite_gradients",
        "nonfinite_gradient_at_step",
    ),
    "deepspeed": ("json",),
    "model": ("name", "backbone", "tokenizer", "chat_template", "architecture"),
    "data": ("builder", "media"),
}  # fmt: skip


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse a key the recipe never reads (a typo in an experiment file, ``stage: {lrr: 1}``), naming it: it
    would otherwise be composed in and ignored, and the run would train with the default."""
    for section, known in KNOWN_KEYS.items():
        node = cfg if not section else cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        unknown = sorted(set(node) - set(known))
        if unknown:
            names = ", ".join(f"{section}.{key}" if section else key for key in unknown)
            raise ValueError(
                f"unknown setting(s) {names} (from the command line or an experiment file; a typo?); "
                f"{section or 'the top level'} takes {', '.join(known)}"
            )


def check_config(cfg: DictConfig) -> None:
    """Every setting's value and the components built from them, each error naming its key."""
    check_known_keys(cfg)
    stage = cfg.stage
    if stage.name not in STAGES:
        raise ValueError(f"stage.name must be one of {STAGES}, got {stage.name!r}")
    if stage.name == "pretrain" and cfg.get("adapter") is not None:
        raise ValueError(
            "stage=pretrain trains the projectors only: drop adapter=... (adapters train in stage=instruct)"
        )
    if stage.name == "instruct" and cfg.get("adapter") is None:
        raise ValueError("stage=instruct trains an adapter: choose one, e.g. adapter=moka or adapter=lora")
    positive = {
        "stage.epochs": stage.epochs,
        "stage.global_batch_size": stage.global_batch_size,
        "stage.micro_batch_size": stage.micro_batch_size,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
    }
    for key, value in positive.items():
        if not _integer(value) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if not _integer(cfg.seed):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
    switches = {
        "stage.drop_last": stage.drop_last,
        "stage.gradient_checkpointing": stage.gradient_checkpointing,
        "stage.train_added_tokens": stage.train_added_tokens,
        "features.fill": cfg.features.fill,
        "blind": cfg.blind,
        "probe_media": cfg.probe_media,
    }
    for key, value in switches.items():
        if not isinstance(value, bool):  # a typo such as blind=flase is a non-empty string, which is truthy
            raise ValueError(f"{key} must be true or false, got {value!r}")
    if stage.max_steps is not None and (not _integer(stage.max_steps) or stage.max_steps < 1):
        raise ValueError(f"stage.max_steps must be a positive integer or null, got {stage.max_steps!r}")
    if not (_number(stage.lr) and stage.lr > 0):
        raise ValueError(f"stage.lr must be a positive number, got {stage.lr!r}")
    if stage.schedule not in SCHEDULES:
        raise ValueError(f"stage.schedule must be one of {SCHEDULES}, got {stage.schedule!r}")
    if not (_number(stage.warmup_ratio) and 0 <= stage.warmup_ratio < 1):
        raise ValueError(f"stage.warmup_ratio must be in [0, 1), got {stage.warmup_ratio!r}")
    if stage.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"stage.precision must be fp32, bf16 or fp16, got {stage.precision!r}")
    for key in ("weight_decay", "gradient_clipping"):
        if not (_number(stage[key]) and stage[key] >= 0):
            raise ValueError(f"stage.{key} must be a number >= 0, got {stage[key]!r}")
    loader = cfg.loader
    if not _integer(loader.num_workers) or loader.num_workers < 0:
        raise ValueError(f"loader.num_workers must be an integer >= 0, got {loader.num_workers!r}")
    if loader.max_length is not None and (not _integer(loader.max_length) or loader.max_length < 1):
        raise ValueError(f"loader.max_length must be a positive integer or null, got {loader.max_length!r}")
    if loader.on_overflow not in ON_OVERFLOW:
        raise ValueError(f"loader.on_overflow must be one of {ON_OVERFLOW}, got {loader.on_overflow!r}")
    if not _integer(cfg.checkpoint.every_steps) or cfg.checkpoint.every_steps < 0:
        raise ValueError(f"checkpoint.every_steps must be an integer >= 0, got {cfg.checkpoint.every_steps!r}")
    if cfg.on_nonfinite not in ("error", "skip"):
        raise ValueError(f"on_nonfinite must be error or skip, got {cfg.on_nonfinite!r}")
    if not isinstance(cfg.resume, str) or not cfg.resume:
        raise ValueError(f"resume must be auto, none or a checkpoint path, got {cfg.resume!r}")
    if cfg.resume == "auto" and cfg.run_dir is None:
        raise ValueError("resume=auto resumes the run in run_dir: give run_dir=<the run's directory>")
    check_validation_config(cfg)
    parse_stop_signals(cfg.stop_signals)
    if cfg.fault.signal_to not in FAULT_SIGNAL_TARGETS:
        raise ValueError(f"fault.signal_to must be one of {FAULT_SIGNAL_TARGETS}, got {cfg.fault.signal_to!r}")
    signal_faults = ("signal_after_step", "signal_during_validation_at_step", "signal_during_save_at_step")
    launcher = any(cfg.fault[key] is not None for key in signal_faults) and cfg.fault.signal_to == "launcher"
    if launcher and "TORCHELASTIC_RUN_ID" not in os.environ:
        raise ValueError("fault.signal_to=launcher signals torchrun: launch the run with torchrun")
    check_components(cfg)


def check_components(cfg: DictConfig) -> None:
    """What the recipe builds from the config, checked without building anything heavy: these used to fail
    only after the encoders, the feature cache and the backbone had loaded (minutes on a real model)."""
    adapter = cfg.get("adapter")
    if adapter is not None:
        try:
            instantiate(adapter)  # AdapterConfig validates itself; a dataclass, nothing is built
        except InstantiationException as error:
            raise ValueError(f"adapter: {error.__cause__ or error}") from None
    check_logger_config(cfg.logger)
    template = cfg.model.get("chat_template", USE_TOKENIZER_TEMPLATE)
    if template != USE_TOKENIZER_TEMPLATE and template not in CHAT_TEMPLATES:
        raise ValueError(
            f"model.chat_template must be {USE_TOKENIZER_TEMPLATE!r} or one of {sorted(CHAT_TEMPLATES)}, "
            f"got {template!r}"
        )
    if cfg.deepspeed.json is None:
        if cfg.stage.precision == "fp16":
            raise ValueError("stage.precision=fp16 needs DeepSpeed (its loss scaler): use bf16, or deepspeed=zero2")
    else:
        try:
            load_deepspeed_config(cfg.deepspeed.json)
        except (OSError, ValueError) as error:
            raise ValueError(f"deepspeed.json: {error}") from None
    for i, entry in enumerate(init_entries(cfg.stage.init_from)):
        try:
            read_manifest(entry["path"])
        except (OSError, ValueError) as error:
            # The paper presets build the paths from stage1_dir (configs/experiment/README.md).
            stage1_dir = cfg.get("stage1_dir")
            hint = f" (from stage1_dir={stage1_dir}: give stage1_dir=<your runs/stage1/<backbone> prefix>)"
            from_it = stage1_dir and str(entry["path"]).startswith(str(stage1_dir))
            raise ValueError(f"stage.init_from[{i}].path: {error}{hint if from_it else ''}") from None


def _integer(value: Any) -> bool:
    """An int from the config; YAML's true / false are bools, which Python counts as ints."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    """An int or float from the config, not a bool; NaN is none."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def check_validation_config(cfg: DictConfig) -> None:
    validation = cfg.validation
    split = validation.split
    if split is not None:
        if not isinstance(split, str) or not split:
            raise ValueError(f"validation.split must be a split name of data.builder or null, got {split!r}")
        if "split" not in cfg.data.builder:
            raise ValueError(f"validation.split: data.builder ({cfg.data.builder._target_}) takes no split argument")
        if split == cfg.data.builder.split:
            raise ValueError(f"validation.split={split} is the split the run trains on (data.builder.split)")
    every = validation.every_steps
    if not _integer(every) or every < 0:
        raise ValueError(f"validation.every_steps must be an integer >= 0, got {every!r}")
    for key in ("max_samples", "micro_batch_size"):
        value = validation[key]
        if value is not None and (not _integer(value) or value < 1):
            raise ValueError(f"validation.{key} must be a positive integer or null, got {value!r}")
    if not isinstance(validation.keep_best, bool):
        raise ValueError(f"validation.keep_best must be true or false, got {validation.keep_best!r}")
    patience = validation.patience
    if patience is not None:
        if not _integer(patience) or patience < 1:
            raise ValueError(f"validation.patience must be a positive integer or null, got {patience!r}")
        if split is None or every == 0 or not validation.keep_best:
            raise ValueError(
                "validation.patience stops after validations without a lower loss: it needs validation.split, "
                f"validation.every_steps > 0 and validation.keep_best=true (got split={split}, every_steps={every}, "
                f"keep_best={validation.keep_best})"
            )


def init_entries(init_from: Any) -> list[dict[str, Any]]:
    """``stage.init_from`` as a list of ``{path, modalities, parts}``: a path string loads every projector
    and the added tokens (and an adapter if the checkpoint has one). ``init_from`` as in the config (a Hydra
    node, resolved here) or as plain values."""
    if OmegaConf.is_config(init_from):
        init_from = OmegaConf.to_container(init_from, resolve=True)
    if init_from is None:
        return []
    entries = [init_from] if isinstance(init_from, str) else list(init_from)
    out = []
    for i, entry in enumerate(entries):
        entry = {"path": entry} if isinstance(entry, str) else dict(entry)
        unknown = sorted(set(entry) - {"path", "modalities", "parts"})
        if unknown or "path" not in entry:
            raise ValueError(f"stage.init_from[{i}] takes path, modalities, parts; got {sorted(entry)}")
        parts = entry.get("parts")
        if parts is not None and not set(parts) <= set(PARTS):
            raise ValueError(f"stage.init_from[{i}].parts must be among {PARTS}, got {list(parts)}")
        out.append(entry)
    return out
