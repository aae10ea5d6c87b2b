"""Every adapter method through the real training recipe (scripts/train.py's ``train``): two stage-2 steps on the
demo set, finite losses, and trainables that load back into a fresh model of the run's config."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from moka_train.adapters import adapter_named_parameters, available_methods
from moka_train.models.trainables import load_trainables
from moka_train.training.recipe import build_data_and_model, train
from tests.trained_runs import CPU, compose_config


@pytest.mark.parametrize("method", available_methods())
def test_two_training_steps_and_a_reload(method, demo_runs, tmp_path):
    data, run_dir = demo_runs["data"], tmp_path / method
    overrides = [
        "experiment=demo", "stage=instruct", f"adapter={method}", f"run_dir={run_dir}", f"data.builder.root={data}",
        f"features.cache_dir={data / 'feature_cache'}", "stage.max_steps=2", "stage.global_batch_size=4",
        "stage.micro_batch_size=4", "stage.warmup_ratio=0", "logger.bar=false",
    ]  # fmt: skip
    train(compose_config("train", overrides))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if "step" in record and "loss" in record]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    run_cfg.stage.init_from = None
    _, model, _, _ = build_data_and_model(run_cfg, CPU, inference=True)
    loaded = load_trainables(model, run_dir / "trainables")
    assert loaded["adapter"] and {name for name, _ in adapter_named_parameters(model.llm)}
    # The second step moved the adapter: its B's are no longer all zero.
    moved = [p for name, p in adapter_named_parameters(model.llm) if ".lora_B." in name and bool(p.abs().sum() > 0)]
    assert moved, f"{method}: every B is still zero after two steps"


def test_the_adapters_question_keys_decide_the_collators_mask(demo_runs):
    """``adapter.question_keys`` is kept with the adapter so that training and evaluation take the same keys: the
    recipe's collator marks, for ``after_media``, every prompt token after the last media token."""
    data = demo_runs["data"]
    overrides = [
        "experiment=demo", "stage=instruct", "adapter=moka", "adapter.question_keys=after_media",
        f"data.builder.root={data}", f"features.cache_dir={data / 'feature_cache'}",
    ]  # fmt: skip
    for inference in (False, True):
        dataset, _, collator, _ = build_data_and_model(compose_config("train", overrides), CPU, inference=inference)
        assert collator.question_keys == "after_media"
        batch = collator([dataset[0]])
        keys = batch["question_mask"][0].nonzero().flatten().tolist()
        last_media = int((batch["modality_ids"][0] > 0).nonzero().max())
        assert keys[0] == last_media + 1 and keys == list(range(keys[0], keys[-1] + 1))
        answer = (batch["labels"][0] != -100).nonzero().flatten() if not inference else None
        assert keys[-1] + 1 == (int(answer.min()) if answer is not None else batch["input_ids"].shape[1])
    default = build_data_and_model(compose_config("train", overrides[:3] + overrides[4:]), CPU)[2]
    assert default.question_keys == "span"
