"""Tiny trained runs on the synthetic demo set, shared by the analysis tests (partial-modality inference,
attention maps): one training step at a large learning rate without warm-up, so that every adapter B is far
from its zero init and the adapter paths change the answers."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from moka_train.training.recipe import train
from tests.launch import ROOT
from tests.test_demo_data import demo

CONFIGS = str(ROOT / "configs")


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(name, overrides=overrides)


def write_demo_data(root: Path) -> Path:
    """6 training videos and 2 test videos, 3 questions each."""
    demo.generate(root, num_videos=6, val_videos=0, test_videos=2, questions_per_video=3, progress=False)
    return root


def train_run(data_root: Path, run_dir: Path, adapter: str) -> Path:
    """A stage-2 run of ``adapter`` trained for one step (lr 0.05, no warm-up) on the demo set."""
    overrides = [
        "experiment=demo", "stage=instruct", f"adapter={adapter}", f"run_dir={run_dir}",
        f"data.builder.root={data_root}", f"features.cache_dir={data_root / 'feature_cache'}", "stage.max_steps=1",
        "stage.global_batch_size=4", "stage.micro_batch_size=4", "stage.lr=0.05", "stage.warmup_ratio=0",
        "logger.bar=false",
    ]  # fmt: skip
    train(compose_config("train", overrides))
    return run_dir
