"""Extract the frames and audio of a dataset once (see configs/extract_media.yaml for the command).

Resumable: items already extracted with the same settings from the same source files are skipped, so
rerunning after a kill finishes the job. Failures (corrupt or truncated files) are listed at the end with
their error; with ``on_error=error`` the first one stops the run. The summary ends with the override that
points training at the extracted files.
"""

from __future__ import annotations

import hydra
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from moka_train.data.extraction import extract_media


@hydra.main(version_base="1.3", config_path="../configs", config_name="extract_media")
def main(cfg: DictConfig) -> None:
    records = instantiate(cfg.data.builder)
    media_cfg = OmegaConf.to_container(cfg.data.media, resolve=True)
    out_dir = to_absolute_path(cfg.out_dir)
    report = extract_media(
        records,
        out_dir,
        media_cfg,
        workers=int(cfg.workers),
        on_error=cfg.on_error,
        kinds=list(cfg.kinds),
        compress=bool(cfg.compress),
    )
    print(report.summary())
    print(f"read them with: +data.media.extracted_dir={out_dir}")


if __name__ == "__main__":
    main()
