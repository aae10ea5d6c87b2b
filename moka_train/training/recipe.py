"""The training recipe: one function, read top to bottom, for both stages.

    train(cfg)   # cfg: the composed configs/train.yaml (scripts/train.py is the Hydra entry point)

1. join the process group (or run alone) and pick the run directory;
2. build the records, the frozen encoders, the feature caches when configured, and the model;
3. plan the data order (``BatchPlan``), the optimizer over the trainable parameters and our schedule;
4. resume when asked; then step: every micro-batch's loss is divided by the step's global label count;
5. checkpoint (atomic, last K) and, at the end, the trainables for evaluation in ``<run_dir>/trainables``; a stop
   signal (preemption, Ctrl-C, SLURM's time-limit warning) ends the run after the current step with a checkpoint;
   with a validation split, the trainables of its lowest loss so far are kept in ``<run_dir>/best``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from moka_train.checkpoint_io import write_text_atomic
from moka_train.data.caching import fill_feature_caches, open_caches
from moka_train.data.collate import MultimodalCollator, batch_to_device
from moka_train.data.dataset import MultimodalDataset
from moka_train.data.media import build_media_loader
from moka_train.data.records import Record, check_media
from moka_train.models.build import build_multimodal_lm
from moka_train.models.mllm import MultimodalLM, count_label_tokens, encode_media
from moka_train.models.trainables import available_parts, load_trainables, save_trainables
from moka_train.training.batch_plan import BatchPlan, PlanSampler, check_batch_split
from moka_train.training.best import BestTrainables
from moka_train.training.checkpoints import (
    CheckpointManager,
    check_resumed_data,
    checkpoint_meta,
    data_identity,
    install,
    load_rng,
    read_meta,
    resolve_resume,
    save_rng,
    write_staging,
)
from moka_train.training.config_checks import check_config, init_entries
from moka_train.training.deepspeed_config import load_deepspeed_config, resolve_deepspeed_config
from moka_train.training.distributed import (
    DistributedContext,
    all_reduce_sum,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from moka_train.training.engine import DeepSpeedEngine, Engine, TorchEngine
from moka_train.training.guards import check_loss, report_nonfinite_gradients
from moka_train.training.optimizer import build_adamw, decay_groups
from moka_train.training.run_logger import RunLogger
from moka_train.training.schedule import build_lr_scheduler
from moka_train.training.stop_signals import StopSignals, ignore_stop_signals, iterate_loader
from moka_train.training.validation import spread_evenly, validation_batches, validation_loss

logger = logging.getLogger("moka_train.train")

# Settings a resumed run may change: where and how it logs, how it loads data, when it saves or stops, what it
# validates on (validation changes no weight), fault injection. model.architecture only feeds
# scripts/adapter_costs.py (the weights come from model.backbone). run_dir: a run started with run_dir=null
# (a directory picked for it) resumes with run_dir=<that directory>. on_nonfinite: what a NaN step does (the
# error's own advice is to resume with skip). stage.gradient_checkpointing: the recomputation replays the same
# forward, dropout included (an OOM after a requeue is fixed by turning it on).
RESUMABLE_CHANGES = (
    "resume", "run_dir", "logger", "loader.num_workers", "checkpoint", "stop_signals", "fault", "features.fill",
    "probe_media", "model.architecture", "validation", "on_nonfinite", "stage.gradient_checkpointing",
)  # fmt: skip
FAULT_EXIT_CODE = 17


class RunStoppedError(Exception):
    """The run stopped early on a stop signal, after saving ``checkpoint``; ``resume=auto`` continues it.
    ``exit_code`` is the shell's for death by that signal (128 + its number), which job scripts test for."""

    def __init__(self, received: signal.Signals | None, step: int, checkpoint: Path) -> None:
        where = received.name if received is not None else "a stop signal on another rank"
        super().__init__(
            f"stopped after step {step} ({where}); checkpoint {checkpoint}; continue with resume=auto "
            f"run_dir={checkpoint.parents[1]}"
        )
        self.step, self.checkpoint = step, checkpoint
        self.exit_code = 128 + int(received if received is not None else signal.SIGTERM)


# -- run directory and logging ------------------------------------------------------------------------
def pick_run_dir(cfg: DictConfig, ctx: DistributedContext) -> Path:
    chosen = cfg.run_dir
    if chosen is None and ctx.is_main:
        chosen = claim_new_directory(Path("outputs") / f"{cfg.stage.name}-{datetime.now():%Y-%m-%d_%H-%M-%S}")
    return Path(str(broadcast_object(chosen, ctx))).resolve()


def claim_new_directory(base: Path) -> str:
    """``base``, or ``base-1``, ``base-2``, ... : the first that did not exist, made here (``mkdir`` is atomic,
    so two runs started in the same second never share a directory)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, copies = base, itertools.count(1)
    while True:
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            candidate = base.with_name(f"{base.name}-{next(copies)}")


def setup_logging(run_dir: Path, ctx: DistributedContext) -> None:
    """Rank 0 logs to the console and ``<run_dir>/train.log``; other ranks log warnings only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if not ctx.is_main:
        logging.basicConfig(level=logging.WARNING, format=f"[rank {ctx.rank}] %(levelname)s %(name)s: %(message)s")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(run_dir / "train.log")):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.WARNING)  # third-party INFO chatter (open_clip's model building) stays out
    logging.getLogger("moka_train").setLevel(logging.INFO)


def fingerprinted_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config minus the settings a resumed run may change."""
    config = json.loads(json.dumps(config, default=str))
    for dotted in RESUMABLE_CHANGES:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return config


# -- data and model -----------------------------------------------------------------------------------
@dataclass
class Datasets:
    """The data of a run: the training set, the validation set (``validation.split``, when asked for), the
    frozen encoders of the raw media (empty when the features are cached) and their widths."""

    train: MultimodalDataset
    validation: MultimodalDataset | None
    encoders: dict[str, torch.nn.Module]
    encoder_widths: dict[str, int]


def build_records(cfg: DictConfig, split: str | None = None) -> list[Record]:
    """``data.builder``'s records, of another ``split`` when given (the validation set's)."""
    builder = cfg.data.builder
    if split is None:
        records: list[Record] = list(instantiate(builder))
    else:
        try:
            records = list(instantiate(builder, split=split))
        except InstantiationException as error:  # named after data.builder, whose own split is fine
            raise ValueError(f"validation.split={split}: {error.__cause__ or error}") from error
    if not records:
        where = "data.builder" if split is None else f"data.builder with validation.split={split}"
        raise ValueError(f"{where} ({builder._target_}) gave no records")
    if cfg.probe_media:
        # The builder's own choice for a missing file holds for an unreadable one: skip leaves it out (counted).
        on_missing = builder.get("on_missing", "error")
        records = check_media(records, on_missing, source="probe_media", probe=True)
        if not records:
            raise ValueError(f"probe_media: no record of data.builder ({builder._target_}) has readable media")
    return records


def check_encoder_weights(cfg: DictConfig, modalities: Iterable[str]) -> None:
    """Refuse random-weight encoders (the demo's ``build_*`` presets, train.yaml's defaults) beside a backbone
    loaded from a checkpoint: a hand-composed ``model=llama2_7b_chat`` run that forgot ``encoder/visual=...``
    would otherwise train a 7B LLM on noise features. The convention: ``load_*`` reads weights, ``build_*`` makes
    random ones."""
    backbone = str(cfg.model.backbone.get("_target_", ""))
    if not backbone.rsplit(".", 1)[-1].startswith("load_"):
        return
    for modality in modalities:
        target = str(cfg.encoder[modality].get("_target_", ""))
        if target.rsplit(".", 1)[-1].startswith("build_"):
            raise ValueError(
                f"encoder.{modality} ({target}) has random weights, but model.backbone loads a checkpoint: choose "
                f"the real encoder preset (encoder/visual=clip_vit_l14, encoder/audio=beats_iter3_plus_as2m, "
                f"encoder/speech=whisper_large_v3, each with its checkpoint path; the experiment presets set them)"
            )


def build_datasets(
    cfg: DictConfig, ctx: DistributedContext, inference: bool = False, validation: bool = False
) -> Datasets:
    """The records, the frozen encoders and the datasets; with a feature cache, the features of every record
    (the validation set's too) are encoded into it first. ``inference``: prompts without their answers.
    ``validation``: also the validation set, when ``validation.split`` names one."""
    records = build_records(cfg)
    held_out = None
    if validation and cfg.validation.split is not None:
        held_out = spread_evenly(build_records(cfg, cfg.validation.split), cfg.validation.max_samples)
    needed = sorted({ref.modality for record in records for ref in record.media})
    extra = sorted({ref.modality for record in held_out or [] for ref in record.media} - set(needed))
    if extra:
        raise ValueError(f"validation.split={cfg.validation.split} has {extra} media, which the training split lacks")
    encoder_cfgs = cfg.get("encoder") or {}
    missing = [m for m in needed if m not in encoder_cfgs]
    if missing:
        raise ValueError(f"the data has {missing} media but no encoder for them: add encoder/{missing[0]}=<preset>")
    check_encoder_weights(cfg, needed)
    encoders = {m: instantiate(encoder_cfgs[m]) for m in needed}  # frozen, eval mode
    encoder_widths = {m: int(e.hidden_size) for m, e in encoders.items()}
    media_cfg = OmegaConf.to_container(cfg.data.media, resolve=True)
    loader = build_media_loader(media_cfg, encoders.get("visual"))

    # The model never holds the encoders: raw media are encoded in the training loop (encode_media), outside
    # the module DeepSpeed wraps and partitions, or once into the feature cache.
    if cfg.features.cache_dir is None:
        source: dict[str, Any] = {"loader": loader}
        encoders = {m: e.to(ctx.device) for m, e in encoders.items()}
    else:
        plain_encoders = {m: OmegaConf.to_container(encoder_cfgs[m], resolve=True) for m in needed}
        if cfg.features.fill:
            caches = open_caches(cfg.features.cache_dir, plain_encoders, media_cfg)
            device = ctx.device if ctx.device.type == "cuda" else "cpu"
            fill_feature_caches(
                records + (held_out or []),
                {m: e.to(device) for m, e in encoders.items()},
                caches,
                loader,
                rank=ctx.rank,
                world_size=ctx.world_size,
                device=device,
            )
            ctx.barrier()
        source = {"caches": open_caches(cfg.features.cache_dir, plain_encoders, media_cfg)}  # every rank's shards
        encoders = {}  # done: the features are cached

    def dataset(of: list[Record]) -> MultimodalDataset:
        return MultimodalDataset(of, inference=inference, zero_media=cfg.blind, **source)

    return Datasets(dataset(records), None if held_out is None else dataset(held_out), encoders, encoder_widths)


def build_model_and_collator(
    cfg: DictConfig, encoder_widths: dict[str, int], inference: bool = False
) -> tuple[MultimodalLM, MultimodalCollator]:
    """The model (backbone, projectors, adapter; initialised from ``stage.init_from``) and its collator."""
    backbone = instantiate(cfg.model.backbone)
    tokenizer = instantiate(cfg.model.tokenizer)
    adapter = instantiate(cfg.adapter) if cfg.get("adapter") is not None else None
    model = build_multimodal_lm(
        backbone,
        tokenizer,
        encoders=None,
        projector=OmegaConf.to_container(cfg.projector, resolve=True),
        adapter=adapter,
        chat_template=cfg.model.chat_template,
        encoder_widths=encoder_widths,
        stage=cfg.stage.name,
        seed=cfg.seed,
    )
    for i, entry in enumerate(init_entries(cfg.stage.init_from)):
        parts = entry.get("parts")
        if adapter is None:  # a run that trains no adapter (stage 1) takes none from a stage-2 run's trainables
            if parts is not None and "adapter" in parts:
                raise ValueError(
                    f"stage.init_from[{i}].parts: this run trains no adapter (stage=pretrain); drop adapter"
                )
            parts = parts if parts is not None else [p for p in available_parts(entry["path"]) if p != "adapter"]
        loaded = load_trainables(model, entry["path"], parts=parts, modalities=entry.get("modalities"))
        logger.info("initialised from %s: %s", entry["path"], {k: len(v) for k, v in loaded.items()})
    # .get: a run saved before the setting existed (evaluated from its config.yaml) trained them.
    model.set_stage(cfg.stage.name, train_added_tokens=cfg.stage.get("train_added_tokens", True))
    if cfg.stage.gradient_checkpointing:
        # Non-reentrant: the inputs (projector tokens, added-token rows) already require grad through the graph.
        model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    context = getattr(model.llm.config, "max_position_embeddings", None)
    max_length = cfg.loader.max_length
    if max_length is None and context is not None and not inference:  # inference answers every question
        # RoPE runs past the context without a word: samples grown past it by their media would train there.
        max_length = int(context)
        logger.info("loader.max_length null: samples up to the backbone's context, %d tokens", max_length)
    elif context is not None and max_length is not None and max_length > context:
        logger.warning("loader.max_length=%d is past the backbone's context (%d positions)", max_length, context)
    collator = MultimodalCollator(
        tokenizer,
        {m: model.projectors[m].config.num_queries for m in model.projectors},
        max_length=max_length,
        on_overflow=cfg.loader.on_overflow,
        padding_side="left" if inference else "right",
        media_kind="raw" if cfg.features.cache_dir is None else "features",
        fill_empty=not inference,  # an empty micro-batch runs as a filler (the training loop)
        question_keys="span" if adapter is None else adapter.question_keys,
    )
    return model, collator


def frozen_precision_note(llm: torch.nn.Module, precision: str) -> str | None:
    """What ``stage.precision: fp32`` does not cover: the frozen backbone computes in its own (loaded) dtype, so
    with a bf16 checkpoint preset only the trainables, their optimizer and their inputs' rounding are fp32."""
    frozen = {p.dtype for p in llm.parameters() if not p.requires_grad}
    narrower = sorted(str(dtype).removeprefix("torch.") for dtype in frozen - {torch.float32, torch.float64})
    if precision != "fp32" or not narrower:
        return None
    return (
        f"stage.precision=fp32, but the frozen backbone is {'/'.join(narrower)} (model.backbone.dtype): it computes "
        "in that dtype, and the projector tokens and added-token rows are rounded to it on the way in; "
        "model.backbone.dtype=fp32 runs the whole model in fp32"
    )


def build_data_and_model(
    cfg: DictConfig, ctx: DistributedContext, inference: bool = False
) -> tuple[MultimodalDataset, MultimodalLM, MultimodalCollator, dict[str, torch.nn.Module]]:
    """The dataset, the model, the collator and the frozen encoders of the raw media (empty with a cache).
    ``inference``: prompts without their answers, left-padded, for generation."""
    data = build_datasets(cfg, ctx, inference)
    model, collator = build_model_and_collator(cfg, data.encoder_widths, inference)
    return data.train, model, collator, data.encoders


def build_engine(
    cfg: DictConfig, model: MultimodalLM, plan: BatchPlan, total_steps: int, ctx: DistributedContext
) -> Engine:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.deepspeed.json is None:
        optimizer = build_adamw(trainable, lr=cfg.stage.lr, weight_decay=cfg.stage.weight_decay)
        scheduler = build_lr_scheduler(optimizer, cfg.stage.schedule, total_steps, cfg.stage.warmup_ratio)
        return TorchEngine(
            model, optimizer, scheduler, ctx.device, ctx.world_size, cfg.stage.precision, cfg.stage.gradient_clipping
        )
    ds_config = resolve_deepspeed_config(
        load_deepspeed_config(cfg.deepspeed.json),
        micro_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.accumulation_steps,
        world_size=ctx.world_size,
        precision=cfg.stage.precision,
        gradient_clipping=cfg.stage.gradient_clipping,
        source=f"deepspeed.json={cfg.deepspeed.json}",
    )
    offloaded = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    if offloaded and ds_config.get("zero_force_ds_cpu_optimizer", True):
        # Optimizer states in CPU memory: DeepSpeed's vectorised CPU Adam (AdamW mode, torch's defaults), built
        # once on first use (about a minute of g++), rather than torch's AdamW looping over offloaded partitions.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        groups = decay_groups(trainable, cfg.stage.weight_decay)
        optimizer = DeepSpeedCPUAdam(groups, lr=cfg.stage.lr, adamw_mode=True)
    else:
        optimizer = build_adamw(trainable, lr=cfg.stage.lr, weight_decay=cfg.stage.weight_decay)
    scheduler = build_lr_scheduler(optimizer, cfg.stage.schedule, total_steps, cfg.stage.warmup_ratio)
    return DeepSpeedEngine(model, optimizer, scheduler, ds_config, ctx.world_size)


# -- the loop -----------------------------------------------------------------------------------------
DROPPED_SAMPLES_PREFIX = "dropped_samples.rank"


def poison_loss(loss: Tensor, nonfinite_gradients: bool) -> Tensor:
    """Fault injection: a NaN loss with NaN gradients, or an infinite loss whose gradients stay finite (what
    DeepSpeed's own overflow check, which looks at the gradients, cannot see)."""
    return loss * float("nan") if nonfinite_gradients else loss + float("inf")


def poison_gradient(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Fault injection: the gradient of the first trainable parameter becomes NaN in the coming backward, the loss
    staying finite (an overflow in one layer's backward). Only that parameter: under ZeRO the NaN lands in one
    rank's gradient partition, and every rank must still skip. Remove the returned handle after the backward."""
    parameter = next(p for p in model.parameters() if p.requires_grad)
    return parameter.register_hook(lambda grad: grad * float("nan"))


def record_dropped_samples(run_dir: Path, rank: int, step: int, sample_ids: list[str]) -> None:
    """Append ``step<TAB>id`` lines to this rank's ``dropped_samples.rank<r>.tsv``: every rank writes its own,
    so no collective is needed for the ids (the count is summed with the step's other totals). A resumed run
    appends again for the steps it repeats; the step column tells them apart."""
    with open(run_dir / f"{DROPPED_SAMPLES_PREFIX}{rank}.tsv", "a", encoding="utf-8") as file:
        file.writelines(f"{step}\t{sample_id}\n" for sample_id in sample_ids)


def due(step: int, every: int, total_steps: int) -> bool:
    """Whether a periodic action (a checkpoint, a validation) runs after ``step``: every ``every`` steps (never
    for 0) and after the last."""
    return step == total_steps or (every > 0 and step % every == 0)


def send_fault_signal(target: str) -> None:
    """Fault injection: SIGTERM to this process, to its process group (its DataLoader workers too, as Ctrl-C or a
    scheduler signals them), or to torchrun's agent, which passes it on to every worker."""
    if target == "group":
        # Sent by another process, as a terminal or a scheduler does: torch's workers take a SIGTERM from their
        # own parent as a request to exit quietly, and one from anyone else as fatal.
        kill = f"import os, signal; os.killpg({os.getpgid(0)}, signal.SIGTERM)"
        subprocess.run([sys.executable, "-c", kill], check=True, start_new_session=True)
    else:
        os.kill(os.getpid() if target == "self" else os.getppid(), signal.SIGTERM)


def save_result(model: MultimodalLM, run_dir: Path, ctx: DistributedContext) -> Path:
    """``<run_dir>/trainables``, written into a staging folder and renamed into place: replacing a run's earlier
    result (an early-stopped run resumed with more patience) never leaves a new adapter beside old projectors."""
    final = run_dir / "trainables"
    staging = write_staging(run_dir, final.name, lambda folder: save_trainables(model, folder), ctx.rank, ctx.barrier)
    if ctx.is_main:
        install(staging, final)
    ctx.barrier()
    return final


def stop_requested(stop: StopSignals, step: int, total_steps: int) -> bool:
    """Whether a stop signal has reached any rank (a collective: every rank calls it at the same point), and
    ``step`` is not the last (where the run just ends)."""
    received = all_reduce_sum(torch.tensor([float(stop.received is not None)], dtype=torch.float64))
    return received.item() > 0 and step < total_steps


def train(cfg: DictConfig) -> Path:
    """Run one stage; returns the run directory (``<run_dir>/trainables`` holds the result). Raises
    ``RunStoppedError`` when a stop signal ended it early, after saving a checkpoint."""
    check_config(cfg)
    ctx = init_distributed(use_deepspeed=cfg.deepspeed.json is not None)
    try:
        # Before the encoders, the feature cache and the backbone load (minutes on a real model), not after.
        check_batch_split(cfg.stage.global_batch_size, cfg.stage.micro_batch_size, ctx.world_size)
        return _train(cfg, ctx)
    finally:
        shutdown_distributed()


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, is_main: bool) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` (rank 0) for the block: a second run in the same directory (a job submitted twice,
    both with resume=auto) would remove the other's checkpoint in progress and interleave their files. A file
    system without locks only gets a warning."""
    if not is_main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RuntimeError(
                f"{run_dir} is in use by another run ({holder}); wait for it, or use another run_dir"
            ) from None
        except OSError as error:  # ENOLCK: no locks on this file system
            logger.warning("%s: cannot lock the run directory (%s); make sure no other run uses it", run_dir, error)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


def _train(cfg: DictConfig, ctx: DistributedContext) -> Path:
    run_dir = pick_run_dir(cfg, ctx)
    with run_dir_lock(run_dir, ctx.is_main):
        return _train_in(cfg, ctx, run_dir)


def _train_in(cfg: DictConfig, ctx: DistributedContext, run_dir: Path) -> Path:
    setup_logging(run_dir, ctx)
    config = OmegaConf.to_container(cfg, resolve=True)
    resume_config = fingerprinted_config(config)
    manager = CheckpointManager(run_dir, cfg.checkpoint.keep_last, ctx.rank, ctx.barrier)
    checkpoint = resolve_resume(cfg.resume, manager, resume_config)
    if cfg.resume == "none" and manager.latest() is not None:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints: resume=auto continues that run; choose another run_dir to "
            "start a new one"
        )
    if ctx.is_main:
        text = OmegaConf.to_yaml(cfg, resolve=True)
        write_text_atomic(run_dir / "config.yaml", text)
    logger.info("run directory %s (%d rank(s) on %s)", run_dir, ctx.world_size, ctx.device)

    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    data = build_datasets(cfg, ctx, validation=True)
    dataset, encoders = data.train, data.encoders
    model, collator = build_model_and_collator(cfg, data.encoder_widths)
    report = model.parameter_report()
    logger.info(
        "trainable parameters: %s",
        ", ".join(f"{name} {trainable:,} of {total:,}" for name, (trainable, total) in report.items() if total),
    )
    note = frozen_precision_note(model.llm, cfg.stage.precision)
    if note and ctx.is_main:  # the same on every rank, as are the run-wide warnings below: said once
        logger.warning(note)
    plan = BatchPlan(
        len(dataset),
        cfg.stage.global_batch_size,
        cfg.stage.micro_batch_size,
        ctx.world_size,
        cfg.seed,
        drop_last=cfg.stage.drop_last,
    )
    total_steps = plan.steps_per_epoch * cfg.stage.epochs if cfg.stage.max_steps is None else cfg.stage.max_steps
    # stage.max_steps wins over stage.epochs (the presets' null lets the epochs decide): say so, a changed
    # epochs would otherwise be ignored without a word.
    by = "" if cfg.stage.max_steps is None else f" (stage.max_steps; stage.epochs={cfg.stage.epochs} is not used)"
    logger.info("data: %s; %d optimizer steps%s", plan.describe(), total_steps, by)
    engine = build_engine(cfg, model, plan, total_steps, ctx)
    # From here on the random numbers are dropout's (the data order has its own seeded generators): each rank its
    # own stream, or every rank would drop the same positions of its Q-Former queries and adapter inputs. Rank 0
    # goes on with the stream that built the model, as one process does. A resumed run restores each rank's
    # saved state below. (seed, rank) mixed so that seed s + 1's rank r is not seed s's rank r + 1.
    if ctx.rank > 0:
        torch.manual_seed(cfg.seed * 1_000_003 + ctx.rank)

    trained_on = data_identity(record.id for record in dataset.records)
    start_step, resumed = 0, {}
    if checkpoint is not None:
        resumed = read_meta(checkpoint)
        check_resumed_data(checkpoint, resumed, trained_on)
        saved_ranks = resumed.get("world_size", ctx.world_size)
        if saved_ranks != ctx.world_size and ctx.is_main:
            logger.warning(
                "%s was saved by %d rank(s), resumed on %d: the data order is the same, but dropout's random "
                "streams are not, so the run does not continue bit for bit",
                checkpoint,
                saved_ranks,
                ctx.world_size,
            )
        engine.load_state(checkpoint / "state", checkpoint / "trainables")
        if ctx.rank < saved_ranks:  # a rank the checkpoint did not have keeps its seeded state
            load_rng(checkpoint, ctx.rank)
        start_step = int(resumed["step"])
        logger.info("resumed from %s at step %d", checkpoint, start_step)
    elif cfg.resume == "auto":
        logger.info("resume=auto: no checkpoint in %s yet, starting at step 0", manager.directory)
    best = None
    if data.validation is not None and cfg.validation.keep_best:
        settings = {"split": cfg.validation.split, "max_samples": cfg.validation.max_samples}
        best = BestTrainables(run_dir, settings, resumed.get("best"), ctx.rank, ctx.barrier, manager.checkpoints)
        if checkpoint is None:
            best.clear()
        else:
            best.resume(checkpoint.parents[1])
    patience = cfg.validation.patience
    last_step = total_steps
    if best is not None and patience is not None and best.stale >= patience:
        logger.info(
            "the run stopped early at step %d (%d validations without a lower loss, validation.patience=%d): nothing "
            "to train; resume with a larger validation.patience, or null, to go on",
            start_step,
            best.stale,
            patience,
        )
        last_step = start_step

    def save(step: int, pending_validation: Mapping[str, float] | None = None) -> Path:
        def write(directory: Path) -> None:
            save_trainables(engine.module, directory / "trainables")
            if ctx.is_main:  # with its trainables, the folder is a run directory to the evaluation tools
                shutil.copyfile(run_dir / "config.yaml", directory / "config.yaml")
            engine.save_state(directory / "state", ctx.rank)
            if cfg.fault.signal_during_save_at_step == step and ctx.rank == ctx.world_size - 1:
                send_fault_signal(cfg.fault.signal_to)
            if cfg.fault.exit_during_save_at_step == step:
                logger.warning("fault injection: exiting in the middle of saving step %d", step)
                os._exit(FAULT_EXIT_CODE)
            save_rng(directory, ctx.rank)

        epoch, in_epoch = divmod(step, plan.steps_per_epoch)
        meta = checkpoint_meta(
            resume_config,
            epoch=epoch,
            step_in_epoch=in_epoch,
            data_seed=plan.seed,
            data=trained_on,
            world_size=ctx.world_size,
            best=None if best is None else best.state(),
            # A stop signal on a step whose validation was due: the resumed run validates first (and logs the
            # step's record again, with val_loss), so it keeps the best the uninterrupted run keeps.
            pending_validation=None if pending_validation is None else dict(pending_validation),
        )
        path = manager.save(step, meta, write)
        if best is not None:
            best.prune()  # the bests only the removed checkpoints recorded
        logger.info("saved %s", path)
        return path

    def write_best(directory: Path) -> None:
        save_trainables(engine.module, directory / "trainables")

    sampler = PlanSampler(plan, ctx.rank, cfg.stage.epochs, start_step, cfg.stage.max_steps)
    stop = StopSignals(cfg.stop_signals)
    engine.module.train()
    if data.validation is not None:
        held_out = validation_batches(
            len(data.validation),
            cfg.validation.micro_batch_size or cfg.stage.micro_batch_size,
            ctx.rank,
            ctx.world_size,
        )
        every = cfg.validation.every_steps
        when = f"every {every} steps and after the last" if every else "after the last step"
        logger.info("validation: %d samples of split %s, %s", len(data.validation), cfg.validation.split, when)
    pending = resumed.get("pending_validation") if data.validation is not None else None
    run_log = RunLogger.from_config(
        OmegaConf.to_container(cfg.logger, resolve=True),
        run_dir,
        total_steps,
        config=config,
        initial_step=start_step - 1 if pending is not None else start_step,  # step start_step is logged again
        rank=ctx.rank,
    )

    def loader(of: MultimodalDataset, batch_sampler: Iterable[list[int]]) -> DataLoader:
        return DataLoader(
            of,
            batch_sampler=batch_sampler,
            collate_fn=collator,
            num_workers=cfg.loader.num_workers,
            pin_memory=ctx.device.type == "cuda",
            # Its own generator: a DataLoader iterator otherwise draws its worker seed from the global RNG,
            # which a resumed run has just restored for dropout (and which validation must not move).
            generator=torch.Generator().manual_seed(cfg.seed),
            # Workers ignore stop signals: a group-wide one (Ctrl-C, a scheduler's) would end them, and the main
            # process would fail mid-step. They leave when their iterate_loader generator ends or is dropped (the
            # finally below, in every outcome): at interpreter exit multiprocessing would end them with a SIGTERM,
            # which they ignore.
            worker_init_fn=functools.partial(ignore_stop_signals, stop.signals),
        )

    def validate(step: int, metrics: dict[str, float]) -> bool:
        """The validation after ``step``, its results added to ``metrics``; whether validation.patience ran out."""
        if cfg.fault.signal_during_validation_at_step == step and ctx.rank == ctx.world_size - 1:
            send_fault_signal(cfg.fault.signal_to)
        validation_started = time.monotonic()
        metrics["val_loss"], label_tokens = validation_loss(engine, loader(data.validation, held_out), encoders)
        metrics["val_time"] = time.monotonic() - validation_started
        kept = best is not None and best.offer(step, metrics["val_loss"], write_best)
        logger.info(
            "step %d: validation loss %.4f (%d answer tokens, %.1f s)%s",
            step,
            metrics["val_loss"],
            label_tokens,
            metrics["val_time"],
            f", the lowest so far: trainables kept in {best.link}" if kept else "",
        )
        return patience is not None and best.stale >= patience and step < total_steps

    def log_early_stop(step: int) -> None:
        logger.info(
            "early stop after step %d of %d: no lower validation loss in %d validations (validation.patience=%d)",
            step,
            total_steps,
            best.stale,
            patience,
        )

    batches = iterate_loader(loader(dataset, sampler))
    failed, dropped_in_run, stopped = True, 0, None
    try:
        with stop, logging_redirect_tqdm(loggers=[logging.getLogger()]):  # log lines above the bar
            if pending is not None and last_step > start_step:
                logger.info("step %d: its validation, skipped by the stop signal, runs now", start_step)
                metrics = dict(pending)
                early = validate(start_step, metrics)
                run_log.log(start_step, metrics)
                if early:
                    save(start_step)
                    log_early_stop(start_step)
                    last_step = start_step
                elif stop_requested(stop, start_step, total_steps):  # a signal during it: stop now, as below
                    stopped = RunStoppedError(stop.received, start_step, save(start_step))
                    last_step = start_step
            for step in range(start_step + 1, last_step + 1):
                started, lr = time.monotonic(), engine.lr()  # the rate this step uses
                micro_batches = [
                    encode_media(encoders, batch_to_device(next(batches), engine.device))
                    for _ in range(plan.accumulation_steps)
                ]
                # Fillers: micro-batches with no sample (an empty slot of an epoch's last step, or every sample over
                # loader.max_length with on_overflow=drop), which the collator gives as one pad token with no
                # label. They run so that every rank runs every micro-step, and learn nothing: with no label their
                # loss, auxiliary terms included (weighted by the label share), is exactly zero.
                fillers = [not batch["ids"] for batch in micro_batches]
                dropped = [sample_id for batch in micro_batches for sample_id in batch["dropped"]]
                labels = sum(count_label_tokens(b["labels"]) for b in micro_batches)
                global_labels = int(all_reduce_sum(torch.tensor([labels], dtype=torch.float64)).item())
                # A step with no answer token on any rank (every sample over loader.max_length) has nothing to learn:
                # AdamW would still move the weights on its momentum alone, so the step is skipped.
                skip = global_labels == 0
                if skip and ctx.is_main:
                    logger.warning("step %d has no answer token on any rank: the weights are left as they are", step)
                loss_sum, tokens = torch.zeros((), dtype=torch.float64), 0
                for i, batch in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    with engine.micro_step(last=last):
                        output = engine.forward(batch, label_normalizer=max(global_labels, 1))
                        if cfg.fault.nonfinite_loss_at_step == step and ctx.rank == 0 and last:
                            output.loss = poison_loss(output.loss, cfg.fault.nonfinite_gradients)
                        if not check_loss(output.loss, step, batch["ids"], cfg.on_nonfinite):
                            skip = True
                        poisoned = None
                        if cfg.fault.nonfinite_gradient_at_step == step and ctx.rank == 0 and last:
                            poisoned = poison_gradient(engine.module)
                        # Every micro-batch still goes through the engine: DeepSpeed keeps its ranks in lockstep.
                        engine.backward(output.loss, skip=skip)
                        if poisoned is not None:
                            poisoned.remove()
                    loss_sum += output.loss.detach().double().cpu()
                    tokens += 0 if fillers[i] else int(batch["attention_mask"].sum())
                result = engine.step(skip=skip)
                if result.nonfinite_gradients:  # the same on every rank: each engine decides over all of them
                    step_ids = [sample_id for batch in micro_batches for sample_id in batch["ids"]]
                    report_nonfinite_gradients(step, result.grad_norm, step_ids, cfg.on_nonfinite)
                if cfg.fault.signal_after_step == step and ctx.rank == ctx.world_size - 1:
                    send_fault_signal(cfg.fault.signal_to)
                if dropped:
                    record_dropped_samples(run_dir, ctx.rank, step, dropped)
                # The step's totals, and whether a stop signal reached any rank: all stop after the same step.
                totals = all_reduce_sum(
                    torch.tensor(
                        [float(loss_sum), float(tokens), float(len(dropped)), float(stop.received is not None)],
                        dtype=torch.float64,
                    )
                )
                metrics = {"lr": lr, "tokens": totals[1].item(), "step_time": time.monotonic() - started}
                if not skip:
                    metrics["loss"] = totals[0].item()
                if result.grad_norm is not None:
                    metrics["grad_norm"] = result.grad_norm
                if cfg.loader.on_overflow == "drop":
                    metrics["dropped_samples"] = totals[2].item()
                    dropped_in_run += int(totals[2].item())
                stopping = totals[3].item() > 0 and step < total_steps  # at the last step the run just ends
                early = False  # validation.patience ran out
                validation_due = data.validation is not None and due(step, cfg.validation.every_steps, total_steps)
                validated = validation_due and not stopping  # a stop signal leaves it to the resumed run
                if validated:
                    early = validate(step, metrics)
                    # A signal during the validation (minutes, on a large split): save and stop now, not a step later.
                    stopping = stop_requested(stop, step, total_steps)
                run_log.log(step, metrics)
                if cfg.fault.exit_after_step == step:
                    logger.warning("fault injection: exiting after step %d", step)
                    os._exit(FAULT_EXIT_CODE)
                if due(step, cfg.checkpoint.every_steps, total_steps) or stopping or early:
                    path = save(step, metrics if stopping and validation_due and not validated else None)
                    if not (stopping or early):  # a signal during the save: this checkpoint is the one to stop on
                        stopping = stop_requested(stop, step, total_steps)
                if stopping:
                    stopped = RunStoppedError(stop.received, step, path)
                    break
                if early:
                    log_early_stop(step)
                    break
        if stopped is None:
            save_result(engine.module, run_dir, ctx)
        failed = False
    finally:
        del batches  # its workers exit now
        run_log.close(failed=failed)
        if dropped_in_run and ctx.is_main:  # a global count
            logger.warning(
                "%d time(s) a sample was left out of its batch for exceeding max_length %s (loader.max_length, null: "
                "the backbone's context; loader.on_overflow=drop; a sample over it is left out again every epoch; per "
                "step in metrics.jsonl as dropped_samples, the ids in %s)",
                dropped_in_run,
                collator.max_length,
                run_dir / f"{DROPPED_SAMPLES_PREFIX}*.tsv",
            )
    if stopped is not None:
        if ctx.is_main:
            logger.warning("%s", stopped)
        # Leave together: torchrun ends the other workers as soon as one exits non-zero.
        ctx.barrier()
        raise stopped
    logger.info("trainables for evaluation: %s", run_dir / "trainables")
    if best is not None and best.record is not None:
        logger.info(
            "the lowest validation loss, %.4f, was at step %d: %s",
            best.record["val_loss"],
            best.record["step"],
            f"its trainables are in {best.link}" if best.available else "its trainables were lost (see above)",
        )
    return run_dir
