"""Bad training settings fail at start, naming the key: Hydra refuses unknown keys, check_config bad values."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict

from moka_train.training.batch_plan import BatchPlan, PlanSampler
from moka_train.training.config_checks import KNOWN_KEYS, check_config, init_entries
from moka_train.training.recipe import claim_new_directory, fingerprinted_config
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
        (["checkpoint.every_steps=-1"], "checkpoint.every_steps must be an integer >= 0"),
        (["checkpoint.every_steps=true"], "checkpoint.every_steps must be an integer >= 0"),
        (["stage.max_steps=true"], "stage.max_steps must be a positive integer or null"),
        (["stage.max_steps=0"], "stage.max_steps must be a positive integer or null"),
        (["stop_signals=[SIGTERM,SIGKILL]"], r"stop_signals\[1\]: 'SIGKILL' is not one of"),
        (["stop_signals=SIGTERM"], "stop_signals must be a list of signal names"),
        (["fault.signal_to=parent"], "fault.signal_to must be one of"),
        (["validation.split=train"], "validation.split=train is the split the run trains on"),
        (["validation.split=val", "~data.builder.split"], r"validation.split: data.builder \(.*\) takes no split"),
        (["validation.every_steps=-2"], "validation.every_steps must be an integer >= 0"),
        (["validation.max_samples=0"], "validation.max_samples must be a positive integer or null"),
        (["validation.micro_batch_size=1.5"], "validation.micro_batch_size must be a positive integer or null"),
        (["validation.keep_best=1"], "validation.keep_best must be true or false"),
        (["validation.patience=0"], "validation.patience must be a positive integer or null"),
        (["validation.patience=2"], "validation.patience .* needs validation.split, validation.every_steps > 0"),
        (["validation.split=val", "validation.patience=2"], r"got split=val, every_steps=0, keep_best=True"),
        (
            ["validation.split=val", "validation.every_steps=5", "validation.keep_best=false", "validation.patience=2"],
            "got split=val, every_steps=5, keep_best=False",
        ),
        (["fault.signal_after_step=1", "fault.signal_to=launcher"], "fault.signal_to=launcher signals torchrun"),
        (["blind=flase"], "blind must be true or false, got 'flase'"),  # a string is truthy: it trained blind
        (["probe_media=1"], "probe_media must be true or false"),
        (["features.fill=yes please"], "features.fill must be true or false"),
        (["stage.gradient_checkpointing=null"], "stage.gradient_checkpointing must be true or false"),
        (["seed=null"], "seed must be an integer, got None"),
        (["stage.lr=true"], "stage.lr must be a positive number, got True"),
        (["stage.warmup_ratio=abc"], r"stage.warmup_ratio must be in \[0, 1\), got 'abc'"),
        (["stage.weight_decay=null"], "stage.weight_decay must be a number >= 0, got None"),
        (["stage.gradient_clipping=-1"], "stage.gradient_clipping must be a number >= 0"),
        (["loader.num_workers=-1"], "loader.num_workers must be an integer >= 0"),
        (["loader.max_length=-5"], "loader.max_length must be a positive integer or null"),
        (["loader.on_overflow=dorp"], "loader.on_overflow must be one of"),
        # Components, checked before anything loads (they used to fail after the encoders and the backbone):
        (["adapter.rank=0"], "adapter: AdapterConfig.rank must be >= 1"),
        (["adapter.rank=4.7"], "adapter: AdapterConfig.rank must be a positive integer, got 4.7"),
        (["adapter.method=mokaa"], "adapter: .*mokaa"),
        (["+adapter.rnak=8"], "adapter: .*rnak"),
        (["logger.bar=flase"], "logger.bar must be true or false, got 'flase'"),
        (["logger=wandb", "logger.mode=ofline"], "logger.mode must be one of"),
        (["logger.smoothing_window=2.5"], "logger.smoothing_window must be a positive integer, got 2.5"),
        (["model.chat_template=llama2_offical"], "model.chat_template must be 'tokenizer' or one of"),
        (["deepspeed=none", "stage.precision=fp16"], "stage.precision=fp16 needs DeepSpeed"),
        (["deepspeed.json=zero5.json"], "deepspeed.json: DeepSpeed config .*zero5.json does not exist"),
        (["stage.init_from=/no/such/run/trainables"], r"stage.init_from\[0\].path: trainables checkpoint /no/such"),
        (["+model.chat_templat=chatml"], r"unknown setting\(s\) model.chat_templat"),
    ],
)
def test_bad_values_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(composed(*overrides))


def test_a_paper_preset_without_its_stage1_runs_names_stage1_dir():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=table1/llama2_ave", "adapter=moka"])
    with pytest.raises(ValueError, match=r"stage.init_from\[0\].path: .*runs/stage1/llama2_visual.* stage1_dir="):
        check_config(cfg)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=table1/llama2_ave", "adapter=moka", "stage.init_from=/my/run"])
    with pytest.raises(ValueError, match=r"/my/run does not exist$"):  # not from stage1_dir: no hint about it
        check_config(cfg)


def test_a_typo_in_an_experiment_file_is_refused_by_name(tmp_path: Path):
    """Hydra refuses an unknown key on the command line, but composes in one that a config file adds: an
    experiment's ``stage: {lrr: ...}`` would train at the default rate without a word."""
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    (configs / "experiment" / "typo.yaml").write_text(
        "# @package _global_\nstage:\n  lrr: 1.0\nchekpoint:\n  every_steps: 10\nvalidation:\n  spilt: val\n"
    )
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("train", overrides=["adapter=moka", "experiment=typo"])
    assert cfg.stage.lrr == 1.0  # composed in
    with pytest.raises(ValueError, match=r"unknown setting\(s\) chekpoint \(from the command line or an experiment"):
        check_config(cfg)
    with open_dict(cfg):
        del cfg["chekpoint"]
    with pytest.raises(ValueError, match=r"unknown setting\(s\) stage.lrr .*stage takes name, epochs"):
        check_config(cfg)
    with open_dict(cfg):
        del cfg.stage["lrr"]
    with pytest.raises(ValueError, match=r"unknown setting\(s\) validation.spilt"):
        check_config(cfg)


def test_the_known_keys_are_the_config_files_keys():
    """KNOWN_KEYS lists what configs/train.yaml, configs/stage/*.yaml and configs/deepspeed/*.yaml define (and the
    top level's config groups), so neither a new setting nor a removed one goes unnoticed."""
    train = OmegaConf.load(ROOT / "configs" / "train.yaml")
    groups = {entry if isinstance(entry, str) else next(iter(entry)) for entry in train.defaults}
    groups = {g.split("/")[0].removeprefix("override ") for g in groups} - {"_self_", "experiment", "hydra"}
    top = {key for key in train if key not in ("defaults", "hydra")}
    assert set(KNOWN_KEYS[""]) == top | groups | {"stage1_dir"}
    for section in ("checkpoint", "features", "loader", "validation", "fault"):
        assert set(KNOWN_KEYS[section]) == set(train[section]), section
    for folder in ("stage", "deepspeed"):
        for path in (ROOT / "configs" / folder).glob("*.yaml"):
            assert set(KNOWN_KEYS[folder]) == set(OmegaConf.load(path)), path
    for folder in ("model", "data"):  # presets may leave a key out (architecture: the tiny ones)
        keys = [set(OmegaConf.load(path)) for path in (ROOT / "configs" / folder).glob("*.yaml")]
        assert set(KNOWN_KEYS[folder]) == set().union(*keys), folder


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
    base["run_dir"], changed["run_dir"] = None, "outputs/instruct-2026-11-24_19-06-17"  # picked for a null run_dir
    assert fingerprinted_config(base) == fingerprinted_config(changed) == {"stage": {"lr": 1e-4}, "loader": {}}
    # The NaN error's advice (resume with on_nonfinite=skip) and turning on gradient checkpointing after an OOM.
    base.update(on_nonfinite="error", stage={"lr": 1e-4, "gradient_checkpointing": False})
    changed.update(on_nonfinite="skip", stage={"lr": 1e-4, "gradient_checkpointing": True})
    assert fingerprinted_config(base) == fingerprinted_config(changed)


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
        BatchPlan(4, global_batch_size=8, micro_batch_size=2, world_size=1, seed=0, drop_last=True)
    with pytest.raises(ValueError, match="no samples"):
        BatchPlan(0, global_batch_size=8, micro_batch_size=2, world_size=1, seed=0)


# (micro-batch size, ranks) layouts of a global batch of 8: accumulation 1, 2, 4 and 8 slots of 1 to 8 samples.
LAYOUTS = [(8, 1), (2, 2), (1, 4), (4, 1), (1, 8), (2, 1)]


@pytest.mark.parametrize("num_samples", [8, 11, 37, 5])
def test_an_epoch_trains_every_sample_once_in_any_layout(num_samples: int):
    """The last step of an epoch holds the samples after its full global batches; every rank still runs its
    accumulation steps, slots without a sample being empty micro-batches (fillers: the collator's stand-in, loss
    zeroed). Expected, independently of the plan's arithmetic: each epoch's micro-batches hold the epoch's
    permutation exactly once, in order, and each step holds the same samples in every layout."""
    steps = -(-num_samples // 8)
    per_layout = []
    for micro, world in LAYOUTS:
        plan = BatchPlan(num_samples, global_batch_size=8, micro_batch_size=micro, world_size=world, seed=5)
        assert plan.steps_per_epoch == steps and plan.remainder == num_samples % 8
        epochs = []
        for epoch in (0, 1):
            taken = []
            for step in range(steps):
                per_rank = [plan.micro_batches(epoch, step, rank) for rank in range(world)]
                assert all(len(m) == plan.accumulation_steps for m in per_rank)
                assert per_rank[0][0]  # the first slot always holds a sample
                # Slot order: micro-step a of rank r is slot a * world + r, as in a full step.
                in_slot_order = [per_rank[r][a] for a in range(plan.accumulation_steps) for r in range(world)]
                assert all(len(m) <= micro for m in in_slot_order)
                real = [m for m in in_slot_order if m]
                sizes = [len(m) for m in real]
                assert max(sizes) - min(sizes) <= 1  # the remainder is dealt evenly
                # Empty slots only where fewer samples than slots are left, and only after the filled ones.
                assert len(real) == min(len(in_slot_order), len(plan.order(epoch)[step * 8 : step * 8 + 8]))
                assert in_slot_order[: len(real)] == real
                taken.append([i for m in real for i in m])
            assert [i for step in taken for i in step] == plan.order(epoch).tolist()
            epochs.append(taken)
        per_layout.append(epochs)
    assert all(epochs == per_layout[0] for epochs in per_layout)


def test_the_last_step_deals_the_remainder_over_ranks_then_micro_steps():
    """11 samples, global batch 8 on 4 ranks x 1 sample x 2 accumulation steps: the last step's 3 samples take
    slots 0-2 (micro-step 0 of ranks 0-2); the other five slots are empty (fillers). By hand from the
    permutation."""
    plan = BatchPlan(11, global_batch_size=8, micro_batch_size=1, world_size=4, seed=0)
    order = plan.order(0).tolist()
    assert [plan.micro_batches(0, 1, rank) for rank in range(4)] == [
        [[order[8]], []],
        [[order[9]], []],
        [[order[10]], []],
        [[], []],
    ]
    assert all(m for rank in range(4) for m in plan.micro_batches(0, 0, rank))  # a full step has none empty
    assert "2 steps per epoch" in plan.describe() and "the last holds the other 3 samples" in plan.describe()


def test_drop_last_leaves_the_remainder_for_the_next_epoch():
    plan = BatchPlan(11, global_batch_size=8, micro_batch_size=2, world_size=2, seed=0, drop_last=True)
    assert plan.steps_per_epoch == 1 and plan.remainder == 0
    assert all(len(m) == 2 for rank in range(2) for m in plan.micro_batches(0, 0, rank))
    taken = [i for rank in range(2) for m in plan.micro_batches(0, 0, rank) for i in m]
    assert sorted(taken) == sorted(plan.order(0)[:8].tolist())
    assert "3 samples per epoch wait for the next epoch's shuffle" in plan.describe()


def test_a_sampler_started_at_a_step_continues_the_same_order():
    """Resume: the micro-batches from step k on are the uninterrupted run's, across the partial last step."""
    plan = BatchPlan(13, global_batch_size=4, micro_batch_size=1, world_size=2, seed=1)
    whole = list(PlanSampler(plan, rank=1, epochs=3))
    assert len(whole) == 3 * plan.steps_per_epoch * plan.accumulation_steps == len(PlanSampler(plan, 1, 3))
    for start in (1, 3, 4, 7):
        assert list(PlanSampler(plan, rank=1, epochs=3, start_step=start)) == whole[start * 2 :]


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    base = tmp_path / "outputs" / "instruct-2026-11-24_19-06-17"
    claimed = [claim_new_directory(base) for _ in range(3)]
    assert claimed == [str(base), f"{base}-1", f"{base}-2"]
    assert all(Path(path).is_dir() for path in claimed)


@pytest.mark.parametrize(("max_length", "expected"), [(None, 2048), (300, 300)])
def test_loader_max_length_null_is_the_backbones_context(max_length, expected):
    """transformers' RoPE runs past max_position_embeddings without a word, so a sample grown past the context by
    its media would train there: loader.max_length null now means the backbone's context (tiny_llama: 2048)."""
    from moka_train.training.recipe import build_model_and_collator

    cfg = composed("model=tiny_llama", "projector.num_queries=2", f"loader.max_length={max_length or 'null'}")
    _, collator = build_model_and_collator(cfg, {"visual": 16, "audio": 16})
    assert collator.max_length == expected
    _, collator = build_model_and_collator(cfg, {"visual": 16, "audio": 16}, inference=True)
    assert collator.max_length == max_length  # evaluation answers every question (runner sets null)


def test_a_run_config_saved_before_train_added_tokens_still_builds():
    """The evaluation apps rebuild a run from its config.yaml: one written before stage.train_added_tokens
    existed has no such key, and those runs trained the added rows."""
    from omegaconf import OmegaConf

    from moka_train.training.recipe import build_model_and_collator

    cfg = composed("model=tiny_llama", "projector.num_queries=2")
    older = OmegaConf.create(OmegaConf.to_container(cfg))  # as OmegaConf.load reads a saved config.yaml
    del older.stage["train_added_tokens"]
    model, _ = build_model_and_collator(older, {"visual": 16, "audio": 16}, inference=True)
    assert model.embed.weight.requires_grad


def test_a_batch_the_ranks_cannot_split_is_refused_before_anything_loads(tmp_path):
    """stage.global_batch_size=8 with micro batches of 3 on one rank: refused naming the keys, before the data
    (here a missing folder, which would fail first otherwise) or the model is touched."""
    from moka_train.training.recipe import train

    cfg = composed(
        "model=tiny_llama",
        f"run_dir={tmp_path / 'run'}",
        f"data.builder.root={tmp_path / 'no_data_here'}",
        "stage.global_batch_size=8",
        "stage.micro_batch_size=3",
        "deepspeed=none",
    )
    with pytest.raises(ValueError, match=r"stage.global_batch_size=8 is not a multiple of stage.micro_batch_size=3"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_random_encoders_beside_a_real_backbone_are_refused():
    """train.yaml's defaults are the demo's random tiny encoders: a hand-composed run naming a real backbone
    but no encoder would train it on noise features. Refused, naming the encoder; the demo and the experiment
    presets (real encoders) pass."""
    from moka_train.training.recipe import check_encoder_weights

    with pytest.raises(ValueError, match=r"encoder.visual \(moka_train.models.encoders.clip.build_clip_encoder\) has "
                       r"random weights, but model.backbone loads a checkpoint"):  # fmt: skip
        check_encoder_weights(composed("model=llama2_7b_chat"), ["visual", "audio"])
    check_encoder_weights(composed("model=llama2_7b_chat"), [])  # no media: no encoder is built
    check_encoder_weights(composed(), ["visual", "audio"])  # the demo: random backbone, random encoders
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cell = compose("train", overrides=["experiment=table1/llama2_ave"])
    check_encoder_weights(cell, ["visual", "audio"])


def test_a_stage1_run_refuses_to_take_an_adapter_from_its_init(tmp_path):
    """stage=pretrain trains no adapter: stage.init_from naming parts [adapter] is refused, naming the entry
    (without parts, the adapter of a stage-2 run's trainables is left out: tests/test_train_app.py)."""
    from moka_train.models.trainables import save_trainables
    from moka_train.training.recipe import build_model_and_collator

    widths = {"visual": 16, "audio": 16}
    stage2, _ = build_model_and_collator(composed("model=tiny_llama", "projector.num_queries=2"), widths)
    save_trainables(stage2, tmp_path / "trainables")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        asked = f"stage.init_from=[{{path:{tmp_path / 'trainables'},parts:[projectors,adapter]}}]"
        cfg = compose("train", overrides=["stage=pretrain", "model=tiny_llama", "projector.num_queries=2", asked])
    with pytest.raises(ValueError, match=r"stage.init_from\[0\].parts: this run trains no adapter"):
        build_model_and_collator(cfg, widths)


def test_a_validation_split_the_builder_does_not_have_is_named_as_validation_split(tmp_path: Path):
    from moka_train.training.recipe import build_records
    from tests.test_demo_data import demo

    demo.generate(tmp_path, num_videos=3, val_videos=1, test_videos=1, progress=False)
    cfg = composed(f"data.builder.root={tmp_path}", "validation.split=vall")
    with pytest.raises(ValueError, match="^validation.split=vall: MUSIC-AVQA split must be train, val or test"):
        build_records(cfg, cfg.validation.split)
