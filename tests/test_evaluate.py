"""scripts/evaluate.py end to end on the CPU: a tiny MokA run trained for one step on the synthetic demo set,
evaluated in-process and under torchrun with 2 ranks (gloo); SEED-Bench's likelihood ranking checked against
per-choice losses computed one by one; bad settings refused."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from moka_train.data.collate import MultimodalCollator
from moka_train.data.dataset import MultimodalDataset
from moka_train.data.datasets.seed_bench import build_seed_bench
from moka_train.data.media import build_media_loader
from moka_train.data.sample import Sample
from moka_train.evaluation.likelihood import (
    choice_sample,
    drop_template_tails,
    likelihood_predictions,
    template_tail_tokens,
)
from moka_train.evaluation.metrics import get_scorer, read_predictions
from moka_train.evaluation.scoring import UsageError
from moka_train.models.build import build_multimodal_lm
from tests.helpers import loaded_script, randomize_adapters
from tests.launch import ROOT, describe, run, torchrun
from tests.test_collate import decode, make_tokenizer, preset
from tests.trained_runs import compose_config

EVALUATE = ROOT / "scripts" / "evaluate.py"
FAST = ["generation.max_new_tokens=4", "batch_size=3", "progress=false"]


@pytest.fixture(scope="module")
def trained(demo_runs) -> tuple[Path, Path]:
    """The demo set (test split: 2 videos) and a MokA run trained on it (tests/trained_runs.py)."""
    return demo_runs["data"], demo_runs["moka"]


def evaluate_in_process(*overrides: str):
    with loaded_script(EVALUATE) as script:
        return script.evaluate(compose_config("evaluate", list(overrides)))


def records_of(path: Path) -> list[dict]:
    return read_predictions(path)


def test_one_process_writes_every_question_once_and_scores_it(trained, tmp_path):
    root, run_dir = trained
    scores = evaluate_in_process(f"run_dir={run_dir}", *FAST, "mode=both")
    out = run_dir / "eval" / "music_avqa" / "test"  # the run's own data, test split; under the run's config.yaml
    records = records_of(out / "predictions.jsonl")
    questions = json.loads((root / "json_update" / "avqa-test.json").read_text())
    assert len(questions) == 6 and len(records) == len(questions)
    assert [r["id"] for r in records] == [f"music_avqa/test/{q['question_id']}" for q in questions]
    for record, question in zip(records, questions, strict=True):
        assert {"id", "prediction", "answer", "question_type", "question_id"} <= set(record)
        assert record["answer"] == question["anser"]  # the bare target (target_format word)
    expected = {mode: get_scorer("music_avqa")(records, mode=mode).to_dict() for mode in ("official", "moka_compat")}
    assert json.loads((out / "score.json").read_text()) == expected
    assert {mode: score.to_dict() for mode, score in scores.items()} == expected


def test_two_ranks_write_the_same_predictions_once(trained, tmp_path):
    _, run_dir = trained
    single, double = tmp_path / "one", tmp_path / "two"
    evaluate_in_process(f"run_dir={run_dir}", *FAST, f"out_dir={single}")
    command = torchrun(EVALUATE, f"run_dir={run_dir}", *FAST, f"out_dir={double}", nproc=2)
    returncode, output = run(command)
    assert returncode == 0, describe(command, returncode, output)
    assert output.count("wrote 6 predictions") == 1  # rank 0 alone writes and scores
    one, two = records_of(single / "predictions.jsonl"), records_of(double / "predictions.jsonl")
    assert len({r["id"] for r in two}) == len(two) == len(one)
    assert two == one  # greedy: the same answers whatever the sharding
    assert (double / "score.json").read_text() == (single / "score.json").read_text()
    # Other settings into the same folder: refused on both ranks before any question is answered, none hanging.
    written = (double / "predictions.jsonl").read_bytes()
    command = torchrun(EVALUATE, f"run_dir={run_dir}", *FAST, "generation.max_new_tokens=5", f"out_dir={double}",
                       nproc=2)  # fmt: skip
    returncode, output = run(command)
    assert returncode != 0 and "wrote" not in output, describe(command, returncode, output)
    assert output.count("other settings (generation.max_new_tokens: 4 -> 5); pass out_dir=") == 2, output
    assert (double / "predictions.jsonl").read_bytes() == written


def test_an_evaluation_never_replaces_one_with_other_settings(trained, tmp_path):
    """evaluation.json records what decided the predictions; the same settings may write the folder again, other
    ones (or predictions with no record) are refused, naming what differs, and the predictions stay."""
    _, run_dir = trained
    out = tmp_path / "out"
    evaluate_in_process(f"run_dir={run_dir}", *FAST, f"out_dir={out}")
    run_config = OmegaConf.load(run_dir / "config.yaml")
    run_config.data.builder.split = "test"
    assert json.loads((out / "evaluation.json").read_text()) == {
        "run_dir": str(run_dir.resolve()),
        "benchmark": "music_avqa",
        "split": "test",
        "data": OmegaConf.to_container(run_config.data, resolve=True),
        "seed_mode": "generate",
        "adapter_modalities": None,
        "generation": {"max_new_tokens": 4},
    }
    written = (out / "predictions.jsonl").read_bytes()
    evaluate_in_process(f"run_dir={run_dir}", *FAST, f"out_dir={out}", "batch_size=2")  # answers alike: allowed
    assert (out / "predictions.jsonl").read_bytes() == written
    with loaded_script(EVALUATE) as script:
        for override, named in [
            ("generation.max_new_tokens=5", "generation.max_new_tokens: 4 -> 5"),
            ("adapter_modalities=[text]", "adapter_modalities: None -> ['text']"),
        ]:
            with pytest.raises(script.UsageError, match=rf"other settings \({re.escape(named)}\); pass out_dir="):
                script.evaluate(compose_config("evaluate", [f"run_dir={run_dir}", *FAST, f"out_dir={out}", override]))
        assert (out / "predictions.jsonl").read_bytes() == written
        (out / "evaluation.json").unlink()  # as scripts/score.py, or a version before the record, leaves it
        with pytest.raises(script.UsageError, match="holds predictions whose settings were not recorded"):
            script.evaluate(compose_config("evaluate", [f"run_dir={run_dir}", *FAST, f"out_dir={out}"]))


def test_a_training_length_limit_does_not_limit_the_questions(trained, tmp_path):
    """A run trained with loader.max_length below every question's length answers them all, as the same run
    without the limit does; the limit used to fail the evaluation (or count them wrong, with drop)."""
    _, run_dir = trained
    limited = tmp_path / "limited"
    shutil.copytree(run_dir, limited, ignore=shutil.ignore_patterns("eval"))
    config = OmegaConf.load(limited / "config.yaml")
    config.loader.max_length, config.loader.on_overflow = 8, "drop"
    OmegaConf.save(config, limited / "config.yaml")
    evaluate_in_process(f"run_dir={limited}", *FAST, f"out_dir={tmp_path / 'a'}")
    evaluate_in_process(f"run_dir={run_dir}", *FAST, f"out_dir={tmp_path / 'b'}")
    answers = [records_of(tmp_path / out / "predictions.jsonl") for out in ("a", "b")]
    assert len(answers[0]) == 6 and not any(r.get("dropped") for r in answers[0])
    assert [r["prediction"] for r in answers[0]] == [r["prediction"] for r in answers[1]]


# -- SEED-Bench's likelihood mode ---------------------------------------------------------------------------
def write_seed_bench(root: Path) -> Path:
    """Three image questions (one colour per image), SEED-Bench's file layout."""
    (root / "SEED-Bench-image").mkdir(parents=True)
    questions = []
    for number, (colour, answer) in enumerate([("red", "A"), ("blue", "C"), ("green", "B")]):
        Image.new("RGB", (32, 32), colour).save(root / "SEED-Bench-image" / f"img{number}.jpg")
        questions.append(
            {
                "answer": answer, "choice_a": "red", "choice_b": "green", "choice_c": "a blue square",
                "choice_d": "none of them", "data_id": f"img{number}", "data_type": "image",
                "question": "What colour is the image?", "question_id": str(100 + number), "question_type_id": 1,
            }
        )  # fmt: skip
    (root / "SEED-Bench.json").write_text(json.dumps({"questions": questions}))
    return root


def test_likelihood_ranks_choices_by_their_mean_answer_loss(tmp_path):
    prompt = "official"
    root = write_seed_bench(tmp_path / "seed")
    seed_cfg = preset("data/seed_bench")
    records = build_seed_bench(root, prompt=instantiate(seed_cfg.builder.prompt))
    model_cfg = preset("model/tiny_llama")
    tokenizer = instantiate(model_cfg.tokenizer)
    encoder = instantiate(preset("encoder/visual/clip_tiny_random"))
    model = build_multimodal_lm(
        instantiate(model_cfg.backbone), tokenizer, encoders={"visual": encoder},
        projector=preset("projector/qformer_tiny"), adapter=instantiate(preset("adapter/moka")),
        chat_template=model_cfg.chat_template,
    ).eval()  # fmt: skip
    randomize_adapters(model.llm)
    media = OmegaConf.to_container(seed_cfg.media)
    dataset = MultimodalDataset(records, loader=build_media_loader(media, encoder), inference=True)
    collator = MultimodalCollator(
        tokenizer, {"visual": model.projectors["visual"].config.num_queries}, padding_side="left"
    )

    predictions = likelihood_predictions(model, dataset, collator, batch_size=2, prompt=prompt, progress=False)
    assert [p["id"] for p in predictions] == ["seed_bench/100", "seed_bench/101", "seed_bench/102"]
    for index, prediction in enumerate(predictions):
        sample = dataset[index]
        by_hand = {}
        for letter, text in sample.metadata["choices"].items():
            # Each choice alone, unpadded: the mean cross-entropy over the choice's own tokens. The template's
            # "{answer}</s>" supervises one more, the end of turn, which SEED-Bench's loss does not count.
            batch = collator([choice_sample(sample, text, prompt)])
            with torch.no_grad():
                logits = model(batch).logits[0, :-1].float()
            targets = batch["labels"][0, 1:]
            supervised = (targets != -100).nonzero().flatten()
            assert targets[supervised[-1]] == tokenizer.eos_token_id
            choice = supervised[:-1]
            assert tokenizer.decode(targets[choice]).strip() == text
            by_hand[letter] = torch.nn.functional.cross_entropy(logits[choice], targets[choice]).item()
        assert prediction["losses"] == pytest.approx(by_hand, abs=1e-4)
        assert prediction["prediction"] == min(by_hand, key=by_hand.get)
        assert prediction["answer"] == f"({records[index].metadata['answer']})"
    assert len(set(p["losses"]["A"] for p in predictions)) > 1  # the image changes the losses

    question_block = "Question: What colour is the image?\nAnswer:"
    for style in ("official", "benchmark"):  # the question block replaced, or the record's as it is
        rendered = choice_sample(dataset[0], "red", style).messages
        assert rendered[-1] == {"role": "assistant", "content": "red"}
        assert rendered[-2]["content"].endswith(question_block) == (style == "official")
        assert ("Options:" in rendered[-2]["content"]) == (style == "benchmark")


@pytest.mark.parametrize("template", ["llama2_official", "chatml", "tokenizer"])
def test_likelihood_scores_the_choice_tokens_and_nothing_the_template_adds(template):
    """Whatever a chat template writes after the answer ("</s>", ChatML's "<|im_end|>" and newline), the tokens
    left to score decode to the choice itself."""
    tokenizer = make_tokenizer(template)
    collator = MultimodalCollator(tokenizer, {}, padding_side="left")
    choices = ["red", "a dark blue", "Two."]
    samples = [
        Sample(f"q{i}", [{"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": c}])
        for i, c in enumerate(choices)
    ]
    batch = collator(samples)
    drop_template_tails(batch["labels"], [template_tail_tokens(collator, sample) for sample in samples])
    for labels, choice in zip(batch["labels"], choices, strict=True):
        assert decode(tokenizer, labels[labels != -100]).strip() == choice


def test_likelihood_mode_end_to_end(trained, tmp_path):
    _, run_dir = trained
    root = write_seed_bench(tmp_path / "seed")
    out = tmp_path / "seed_out"
    evaluate_in_process(
        f"run_dir={run_dir}", "data=seed_bench", f"data.builder.root={root}", "seed_mode=likelihood", "mode=both",
        "features={cache_dir:null}", f"out_dir={out}", "progress=false",
    )  # fmt: skip
    records = records_of(out / "predictions.jsonl")
    assert [r["id"] for r in records] == ["seed_bench/100", "seed_bench/101", "seed_bench/102"]
    assert all(r["prediction"] in "ABCD" and set(r["losses"]) == set("ABCD") for r in records)
    scores = json.loads((out / "score.json").read_text())
    assert scores == {"official": get_scorer("seed_bench")(records).to_dict()}  # no moka_compat rule for it
    assert json.loads((out / "evaluation.json").read_text())["likelihood_prompt"] == "official"
    with pytest.raises(UsageError, match="likelihood_prompt: 'official' -> 'benchmark'"):  # same folder, other prompt
        evaluate_in_process(
            f"run_dir={run_dir}", "data=seed_bench", f"data.builder.root={root}", "seed_mode=likelihood",
            "likelihood.prompt=benchmark", "features={cache_dir:null}", f"out_dir={out}", "progress=false",
        )  # fmt: skip


# -- bad input ------------------------------------------------------------------------------------------
def test_bad_settings_are_refused(trained, tmp_path):
    _, run_dir = trained
    with loaded_script(EVALUATE) as script:
        empty = tmp_path / "empty"
        empty.mkdir()
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "config.yaml").write_text("seed: 1\n")
        cases = {
            f"run_dir={tmp_path / 'nowhere'}": "no such folder",
            f"run_dir={empty}": "no config.yaml file",
            f"run_dir={tmp_path / 'half'}": "no trainables folder",
            "mode=best": "mode must be one of",
            "seed_mode=vote": "seed_mode must be one of",
            "benchmark=imagenet": "unknown benchmark",
            # transformers ignores it under greedy decoding, and the record would list it as a setting
            "+generation.temperature=0.7": r"generation\.temperature=0\.7 only shape\(s\) sampling",
            "+generation.num_return_sequences=3": r"generation\.num_return_sequences=3: one answer per question",
            # configs/ is shared with training: +adapter=lora composes, and was silently not read.
            "+adapter=lora": r"^adapter: the run's model comes from its <run_dir>/config.yaml",
        }
        for override, message in cases.items():
            overrides = [f"run_dir={run_dir}", override] if not override.startswith("run_dir") else [override]
            with pytest.raises(script.UsageError, match=message):
                script.evaluate(compose_config("evaluate", overrides))
        with pytest.raises(script.UsageError, match="SEED-Bench's rule"):  # likelihood on MUSIC-AVQA
            script.evaluate(compose_config("evaluate", [f"run_dir={run_dir}", "seed_mode=likelihood", *FAST]))
        # A split that does not exist: the builder's own message, on one line (Hydra's spans four).
        one_line = r"^Error in call to target .*MUSIC-AVQA split must be train, val or test.* full_key: data\.builder$"
        with pytest.raises(script.UsageError, match=one_line):
            script.evaluate(compose_config("evaluate", [f"run_dir={run_dir}", "split=bogus", *FAST]))

    command = [sys.executable, str(EVALUATE), f"run_dir={empty}"]
    returncode, output = run(command)
    assert returncode == 2 and "evaluate.py: error:" in output and "Traceback" not in output, output
    returncode, output = run([sys.executable, str(EVALUATE)])  # no run_dir: a 15-line traceback before
    assert returncode == 2 and "evaluate.py: error: set run_dir=... (it has no value)" in output, output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("overrides", "split"),
    [
        ([], "test"),  # the run's own data: its held-out split, not the one it trained on
        (["data=pope"], "all"),  # a benchmark preset keeps the split its benchmark is scored on
        (["data=mmbench"], "DEV_EN_legacy"),
        (["data=mmau"], "test-mini"),
        (["data=mmau", "split=test"], "test"),  # an explicit split wins
    ],
)
def test_the_evaluated_split(tmp_path, overrides, split):
    from moka_train.evaluation.runner import run_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trained = {"data": {"builder": {"split": "train"}}, "stage": {}, "features": {}, "probe_media": False}
    trained["loader"] = {"max_length": 64}
    OmegaConf.save(OmegaConf.create(trained), run_dir / "config.yaml")
    cfg = compose_config("evaluate", [f"run_dir={run_dir}", *overrides])
    evaluated = run_config(cfg, run_dir)
    assert evaluated.data.builder.split == split and evaluated.loader.max_length is None


def test_a_benchmark_the_data_contradicts_is_refused_before_answering():
    """benchmark=mme on MUSIC-AVQA questions: refused from the ids, before the answers are generated (the scorer
    refused the predictions only after every question was answered). Ids of no known benchmark leave it to the
    name given."""
    from moka_train.evaluation.runner import UsageError, check_benchmark

    ids = [{"id": "music_avqa/test/1"}, {"id": "music_avqa/test/2"}]
    assert check_benchmark(None, ids) == check_benchmark("music_avqa", ids) == "music_avqa"
    with pytest.raises(
        UsageError, match=r"benchmark=mme, but the data's ids are music_avqa's \(e.g. 'music_avqa/test/1'\)"
    ):
        check_benchmark("mme", ids)
    assert check_benchmark("pope", [{"id": "mine/1"}]) == "pope"
