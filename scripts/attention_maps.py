"""MokA's cross-attention maps for a trained run (configs/attention_maps.yaml documents every setting):

    python scripts/attention_maps.py run_dir=runs/moka data=music_avqa data.builder.root=/data/AVQA samples=16
    python scripts/attention_maps.py run_dir=outputs/demo/stage2_moka layers=[1] projections=[q_proj,v_proj]

The run's model is built as scripts/evaluate.py builds it. For each chosen question one forward pass of its
prompt (no answer) records, in the chosen MokA layers, each media token's attention over the question tokens
(computed explicitly there: the fused kernel returns no weights), averaged per media modality over its tokens,
the layers and the projections (``moka_train.evaluation.attention_maps``). Written to ``out_dir``:
``attention_maps.json`` (per question: id, question tokens, the weights per modality, the layers and projections
averaged) and ``<n>_<id>.png``, a heat map per question.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from moka_train.evaluation.runner import UsageError, check_run_dir, load_run, run_app

MAPS_FILE = "attention_maps.json"


def list_setting(value: Any, key: str, kind: type) -> list | None:
    """A setting that is null or a non-empty list of ``kind`` (int: layer numbers; str: names)."""
    if value is None:
        return None
    values = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if not isinstance(values, list) or not values or not all(type(v) is kind for v in values):
        what = "integers" if kind is int else "names"
        raise UsageError(f"{key} must be a non-empty list of {what} or null, got {values!r}")
    return values


def chosen_indices(records: list[Any], samples: int, ids: list[str] | None) -> list[int]:
    """Dataset indices of the questions to map: those of ``ids`` (each must exist), else the first ``samples``."""
    if ids is None:
        return list(range(min(samples, len(records))))
    where = {record.id: number for number, record in enumerate(records)}
    missing = [i for i in ids if i not in where]
    if missing:
        raise UsageError(f"ids {missing} are not in this data (e.g. {[r.id for r in records[:3]]})")
    return [where[i] for i in ids]


def map_attention(cfg: DictConfig) -> list[dict[str, Any]]:
    """Record, write and plot the maps; returns the records written to attention_maps.json."""
    run_dir = check_run_dir(cfg.run_dir)
    layers = list_setting(cfg.layers, "layers", int)
    projections = list_setting(cfg.projections, "projections", str)
    ids = list_setting(cfg.ids, "ids", str)
    if isinstance(cfg.samples, bool) or not isinstance(cfg.samples, int) or cfg.samples < 1:
        raise UsageError(f"samples must be a positive integer, got {cfg.samples!r}")

    import torch
    from tqdm import tqdm

    from moka_train.adapters import carries_adapters
    from moka_train.data.collate import batch_to_device
    from moka_train.evaluation.attention_maps import CrossAttentionRecorder, plot_attention_map, select_layers
    from moka_train.training.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed(use_deepspeed=False)
    if ctx.world_size > 1:
        shutdown_distributed()
        raise UsageError("attention_maps.py runs in one process (a few questions): launch it with python, not torchrun")
    try:
        run = load_run(cfg, run_dir, ctx)
        if not carries_adapters(run.model.llm):
            raise UsageError(f"{run_dir} trained no adapter (a stage-1 run): it has no cross-attention to map")
        try:
            recorded = select_layers(run.model.llm, layers, projections)
        except ValueError as error:
            raise UsageError(str(error)) from None
        indices = chosen_indices(run.dataset.records, cfg.samples, ids)
        out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "attention_maps" / f"{run.benchmark}_{run.split}"
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = run.collator.tokenizer
        written: list[dict[str, Any]] = []
        run.model.eval()
        batches = [indices[start : start + cfg.batch_size] for start in range(0, len(indices), cfg.batch_size)]
        recorder = CrossAttentionRecorder(recorded)
        for chunk in tqdm(batches, desc="attention maps", unit="batch", disable=not cfg.progress):
            batch = batch_to_device(run.collator([run.dataset[i] for i in chunk]), ctx.device)
            recorder.reset()
            with torch.no_grad(), recorder:
                run.model(batch)
            for index, sample in zip(chunk, recorder.maps(tokenizer, batch["input_ids"]), strict=True):
                record = run.dataset.records[index]
                name = f"{len(written):03d}_{record.id.replace('/', '_')}"
                title = f"{record.id}: {' / '.join(sample.weights) or 'no media'} over the question tokens"
                plot_attention_map(sample, title, out_dir / f"{name}.png")
                written.append(
                    {
                        "id": record.id,
                        "image": f"{name}.png",
                        "question_tokens": sample.question_tokens,
                        "weights": sample.weights,
                    }
                )
        summary = {
            "run_dir": str(run_dir),
            "recorded_layers": sorted(recorded),
            "maps": written,
        }
        (out_dir / MAPS_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {len(written)} attention maps ({len(recorded)} MokA layers averaged) to {out_dir}")
        return written
    finally:
        shutdown_distributed()


@hydra.main(version_base="1.3", config_path="../configs", config_name="attention_maps")
def main(cfg: DictConfig) -> None:
    run_app("attention_maps.py", map_attention, cfg)


if __name__ == "__main__":
    main()
