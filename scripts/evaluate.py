"""Evaluate a trained run on a benchmark (configs/evaluate.yaml documents every setting):

    python scripts/evaluate.py run_dir=runs/s2 data=mme data.builder.root=/data/MME
    torchrun --nproc_per_node 8 scripts/evaluate.py run_dir=runs/s2 data=seed_bench data.builder.root=... \
        seed_mode=likelihood
    python scripts/evaluate.py run_dir=outputs/demo/stage2_moka   # the run's own data, test split

1. join the process group (torchrun; gloo on a CPU) or run alone;
2. build the run's model from ``<run_dir>/config.yaml`` with the data section named here (or the run's), load
   ``<run_dir>/trainables``;
3. answer every question once over the ranks (rank r takes r, r + w, ...; no sampler padding): greedy generation
   (``moka_train.evaluation.generate``), or for SEED-Bench with ``seed_mode=likelihood`` the choice with the lowest
   LM loss (``moka_train.evaluation.likelihood``);
4. rank 0 gathers the answers, writes ``<out_dir>/predictions.jsonl`` (one record per question: ``id``,
   ``prediction``, ``answer`` and the benchmark record's fields) and ``<out_dir>/score.json`` (scored as
   ``scripts/score.py`` does: ``{mode: BenchmarkScore.to_dict()}``), and prints the report. The default out_dir,
   ``<run_dir>/eval/<benchmark>/<split>``, sits under the run's config.yaml, where scripts/make_tables.py looks.

``adapter_modalities=[text]`` keeps the adapter path only for the text tokens (partial-modality inference;
scripts/partial_modality.py runs a table of them). The steps live in ``moka_train.evaluation.runner``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from moka_train.evaluation.runner import UsageError, evaluate, run_app

__all__ = ["UsageError", "evaluate", "main"]


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_app("evaluate.py", evaluate, cfg)


if __name__ == "__main__":
    main()
