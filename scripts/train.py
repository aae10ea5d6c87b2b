"""Train one stage (configs/train.yaml documents every setting):

torchrun --nproc_per_node 8 scripts/train.py stage=pretrain model=llama2_7b_chat data=llava_pretrain ...
torchrun --nproc_per_node 8 scripts/train.py stage=instruct adapter=moka stage.init_from=<stage-1 run>/trainables
python scripts/train.py experiment=demo_pretrain    # one process, no torchrun needed
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
