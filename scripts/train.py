"""Train one stage (configs/train.yaml documents every setting):

torchrun --nproc_per_node 8 scripts/train.py experiment=stage1/llama2_visual data.builder.root=... ...
torchrun --nproc_per_node 8 scripts/train.py experiment=table1/llama2_ave adapter=moka stage1_dir=... ...
python scripts/train.py experiment=demo stage=pretrain    # one process, no torchrun needed
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from moka_train.training.recipe import RunStoppedError, train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except RunStoppedError as stopped:  # a stop signal: checkpoint saved, already logged
        sys.exit(stopped.exit_code)


if __name__ == "__main__":
    main()
