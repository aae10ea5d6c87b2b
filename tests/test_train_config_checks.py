"""Bad training settings fail at start, naming the key: Hydra refuses unknown keys, check_config bad values."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from moka_train.training.batch_plan import BatchPlan
from moka_train.training.recipe import check_config, fingerprinted_config, init_entries
from tests.launch import ROOT


def composed(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=["adapter=moka", *overrides])


def test_defaults_pass():
    check_config(composed())


@pytest.mark.parametrize("override", ["stage.lrr=1", "logger.projcet=x", "checkpoint.keep_lst=3"])
def test_a_typo_in_a_key_is_refused_by_name(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{key}'"):
        composed(override)


def test_an_unknown_preset_is_refused_by_name():
    with pytest.raises(ConfigCompositionException, match="zero4"):
        composed("deepspeed=zero4")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage.schedule=cosin"], "stage.schedule must be one of"),
        (["stage.lr=0"], "stage.lr must be a positive number"),
        (["stage.micro_batch_size=0"], "stage.micro_batch_size must be a positive integer"),
        (["stage.warmup_ratio=1.5"], r"stage.warmup_ratio must be in \[0, 1\)"),
        (["stage.precision=fp8"], "stage.precision must be"),
        (["stage=pretrain"], "stage=pretrain trains the projectors only"),
        (["on_nonfinite=ignore"], "on_nonfinite must be error or skip"),
        (["resume=auto"], "resume=auto resumes the run in run_dir"),
        (["checkpoint.every_steps=-1"], "checkpoint.every_steps must be >= 0"),
    ],
)
def test_bad_values_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(composed(*overrides))


def test_instruct_needs_an_adapter():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["stage=instruct"])
    with pytest.raises(ValueError, match="stage=instruct trains an adapter"):
        check_config(cfg)


def test_init_from_entries():
    assert init_entries(None) == []
    assert init_entries("a/trainables") == [{"path": "a/trainables"}]
    entries = [{"path": "v", "modalities": ["visual"], "parts": ["projectors", "added_tokens"]}]
    assert init_entries(entries) == entries
    with pytest.raises(ValueError, match=r"stage.init_from\[0\] takes path, modalities, parts"):
        init_entries([{"path": "v", "modality": ["visual"]}])
    with pytest.raises(ValueError, match=r"stage.init_from\[0\].parts must be among"):
        init_entries([{"path": "v", "parts": ["optimizer"]}])


def test_resume_fingerprint_ignores_what_a_resumed_run_may_change():
    base = {"stage": {"lr": 1e-4}, "resume": "none", "logger": {"backend": "none"}, "loader": {"num_workers": 2}}
    changed = {"stage": {"lr": 1e-4}, "resume": "auto", "logger": {"backend": "wandb"}, "loader": {"num_workers": 0}}
    assert fingerprinted_config(base) == fingerprinted_config(changed) == {"stage": {"lr": 1e-4}, "loader": {}}


def test_batch_plan_splits_each_global_batch_the_same_way_for_any_layout():
    """The samples of an optimizer step do not depend on the number of ranks or accumulation steps."""
    one = BatchPlan(40, global_batch_size=8, micro_batch_size=8, world_size=1, seed=3)
    four = BatchPlan(40, global_batch_size=8, micro_batch_size=1, world_size=4, seed=3)
    assert one.steps_per_epoch == four.steps_per_epoch == 5 and four.accumulation_steps == 2
    for epoch in (0, 1):
        for step in range(5):
            (whole,) = one.micro_batches(epoch, step, 0)
            parts = [i for rank in range(4) for micro in four.micro_batches(epoch, step, rank) for i in micro]
            assert sorted(parts) == sorted(whole) and len(set(parts)) == 8
    assert one.order(0).tolist() != one.order(1).tolist()  # a new shuffle each epoch
    with pytest.raises(ValueError, match="not a multiple"):
        BatchPlan(40, global_batch_size=8, micro_batch_size=3, world_size=1, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchPlan(4, global_batch_size=8, micro_batch_size=2, world_size=1, seed=0)
