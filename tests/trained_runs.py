"""Tiny trained runs on the synthetic demo set, shared by the evaluation, inference and analysis tests: one
training step, then every adapter B made random and saved. The step runs the whole training app and writes a real
run directory, but its learning rate is 0 (the demo's warmup covers the first step, as transformers' schedules
do), so the weights are the initial ones; the B's are made random because at their zero init the answers would
not depend on the adapter path or on MokA's question keys (and one step at a large learning rate instead makes
the tiny model give one answer to every question)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moka_train.models.trainables import load_trainables, save_trainables
from moka_train.training.distributed import DistributedContext
from moka_train.training.recipe import build_data_and_model, train
from tests.helpers import randomize_adapters
from tests.launch import ROOT
from tests.test_demo_data import demo

CONFIGS = str(ROOT / "configs")
CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(name, overrides=overrides)


def write_demo_data(root: Path) -> Path:
    """6 training videos and 2 test videos, 3 questions each."""
    demo.generate(root, num_videos=6, val_videos=0, test_videos=2, questions_per_video=3, progress=False)
    return root


def train_run(data_root: Path, run_dir: Path, adapter: str) -> Path:
    """A stage-2 run of ``adapter`` trained for one step on the demo set, its saved B's then made random."""
    overrides = [
        "experiment=demo", "stage=instruct", f"adapter={adapter}", f"run_dir={run_dir}",
        f"data.builder.root={data_root}", f"features.cache_dir={data_root / 'feature_cache'}", "stage.max_steps=1",
        "stage.global_batch_size=4", "stage.micro_batch_size=4", "logger.bar=false",
    ]  # fmt: skip
    train(compose_config("train", overrides))
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    run_cfg.stage.init_from = None
    _, model, _, _ = build_data_and_model(run_cfg, CPU, inference=True)
    load_trainables(model, run_dir / "trainables")
    randomize_adapters(model.llm)
    save_trainables(model, run_dir / "trainables")
    return run_dir
