"""Evaluation: greedy predictions over demo-data questions with a tiny random MokA model (raw media), checked
against a hand-rolled greedy decode, across batch sizes (left padding must not change greedy outputs) and
across ranks; exact-match accuracy per question type on hand-written predictions."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moka_train.data.collate import MultimodalCollator
from moka_train.data.dataset import MultimodalDataset
from moka_train.data.datasets.music_avqa import build_music_avqa, target_formatter
from moka_train.data.media import build_media_loader
from moka_train.evaluation import generate as generation
from moka_train.evaluation.accuracy import MUSIC_AVQA_TYPE, accuracy_by, format_accuracy_table, normalize_answer
from moka_train.evaluation.generate import (
    check_generation_settings,
    gather_predictions,
    generate_predictions,
    write_predictions,
)
from moka_train.models.build import build_multimodal_lm
from tests.helpers import randomize_adapters
from tests.test_collate import preset
from tests.test_demo_data import demo

NEW_TOKENS = 6
QUESTIONS = 5  # batch size 3 gives a full batch and a partial one


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny MokA model (random adapter B, so routing matters) and 5 questions on 3 demo videos, the targets
    in the tagged form half the time (the answer field must be the record's target text)."""
    root = tmp_path_factory.mktemp("demo")
    demo.generate(root, num_videos=3, val_videos=0, test_videos=0, questions_per_video=2, progress=False)
    records = build_music_avqa(root, split="train")[:QUESTIONS]
    for record in records[::2]:
        record.messages[-1]["content"] = target_formatter("tagged")(record.metadata["answer"])
    model_cfg = preset("model/tiny_llama")
    tokenizer = instantiate(model_cfg.tokenizer)
    encoders = {
        "visual": instantiate(preset("encoder/visual/clip_tiny_random")),
        "audio": instantiate(preset("encoder/audio/beats_tiny_random")),
    }
    model = build_multimodal_lm(
        instantiate(model_cfg.backbone),
        tokenizer,
        encoders=encoders,
        projector=preset("projector/qformer_tiny"),
        adapter=instantiate(preset("adapter/moka")),
        chat_template=model_cfg.chat_template,
    )
    randomize_adapters(model.llm)
    media = OmegaConf.to_container(preset("data/demo").media)
    dataset = MultimodalDataset(records, loader=build_media_loader(media, encoders["visual"]), inference=True)
    tokens = {name: projector.config.num_queries for name, projector in model.projectors.items()}
    collator = MultimodalCollator(tokenizer, tokens, padding_side="left")
    return model.eval(), dataset, collator


def predict(setup, **kwargs) -> list[dict]:
    model, dataset, collator = setup
    return generate_predictions(model, dataset, collator, max_new_tokens=NEW_TOKENS, progress=False, **kwargs)


def stepwise_greedy(model, collator, sample, stop: tuple[int, ...] = ()) -> str:
    """Greedy decoding by hand: the sample alone (no padding), one full forward per new token, the argmax at
    the last position appended as its embedding; stops at EOS or an id of ``stop``."""
    tokenizer = collator.tokenizer
    batch = collator([sample])
    tokens: list[int] = []
    with torch.no_grad():
        embeds, _ = model.prepare(batch)
        for _ in range(NEW_TOKENS):
            token = int(model.llm(inputs_embeds=embeds).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id or token in stop:
                break
            tokens.append(token)
            embeds = torch.cat([embeds, model.embed(torch.tensor([[token]]))], dim=1)
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_one_prediction_per_question_in_order_and_independent_of_batching(setup, tmp_path):
    model, dataset, collator = setup
    model.train()
    single = predict(setup, batch_size=1)
    assert model.training  # the caller's mode comes back
    model.eval()
    batched = predict(setup, batch_size=3)
    lengths = collator([dataset[i] for i in range(QUESTIONS)])["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 1  # the batched prompts really are left-padded

    assert [p["index"] for p in single] == list(range(QUESTIONS))
    assert [p["id"] for p in single] == [r.id for r in dataset.records]
    assert len({p["id"] for p in single}) == QUESTIONS
    assert [p["prediction"] for p in batched] == [p["prediction"] for p in single]
    assert batched == single
    for prediction, record in zip(single, dataset.records, strict=True):
        assert prediction["answer"] == record.messages[-1]["content"]  # the target, tagged or not
        assert prediction["question_type"] == record.metadata["question_type"]
        assert prediction["question_modality"] == record.metadata["question_modality"]
    assert single[0]["answer"].startswith("<answer>") and not single[1]["answer"].startswith("<")

    shortest = int(lengths.argmin())  # padded in its batch of 3
    assert stepwise_greedy(model, collator, dataset[shortest]) == single[shortest]["prediction"]
    assert any(p["prediction"] for p in single)  # the comparisons above are not between empty strings

    path = write_predictions(tmp_path / "out" / "predictions.jsonl", batched)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == batched
    assert gather_predictions(batched) == batched  # no process group: as they are


def test_ranks_cover_every_question_once(setup, monkeypatch):
    everything = predict(setup, batch_size=3)
    shards = [predict(setup, batch_size=2, rank=rank, world_size=2) for rank in range(2)]
    assert [p["index"] for p in shards[0]] == [0, 2, 4] and [p["index"] for p in shards[1]] == [1, 3]
    merged = sorted(shards[0] + shards[1], key=lambda p: p["index"])
    assert merged == everything

    # Under ZeRO-3 the rank with the smaller shard pads with filler batches to make as many generate calls.
    model = setup[0]
    calls = []
    real_generate = model.generate

    def counting(batch, **kwargs):
        calls.append(len(batch["ids"]))
        return real_generate(batch, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    monkeypatch.setattr(generation, "zero3_partitioned", lambda _: True)
    assert predict(setup, batch_size=2, rank=1, world_size=2) == shards[1]
    assert calls == [2, 1]  # rank 0 makes two calls ([0, 2], [4]); rank 1 its batch [1, 3] and one filler


def test_a_sample_dropped_for_length_is_kept_as_wrong(setup):
    model, dataset, collator = setup
    everything = predict(setup, batch_size=3)
    lengths = collator([dataset[i] for i in range(QUESTIONS)])["attention_mask"].sum(-1)
    limit = int(lengths.min())
    strict = MultimodalCollator(
        collator.tokenizer, collator.tokens_per_segment, max_length=limit, on_overflow="drop", padding_side="left"
    )
    with pytest.warns(UserWarning, match="over max_length"):
        got = generate_predictions(model, dataset, strict, batch_size=3, max_new_tokens=NEW_TOKENS, progress=False)
    fits = (lengths <= limit).tolist()
    assert [p["index"] for p in got] == list(range(QUESTIONS)) and 0 < sum(fits) < QUESTIONS
    for fit, mine, full in zip(fits, got, everything, strict=True):
        assert mine == (full if fit else {**full, "prediction": "", "raw_output": "", "dropped": True})


def test_gather_sorts_back_into_dataset_order(tmp_path):
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        shuffled = [{"index": i, "id": f"q{i}"} for i in (2, 0, 1)]
        assert [p["index"] for p in gather_predictions(shuffled)] == [0, 1, 2]
        with pytest.raises(ValueError, match="repeat dataset indices"):
            gather_predictions([*shuffled, shuffled[0]])
    finally:
        torch.distributed.destroy_process_group()


def test_bad_settings_are_refused(setup):
    model, dataset, collator = setup
    right = MultimodalCollator(collator.tokenizer, collator.tokens_per_segment, padding_side="right")
    with pytest.raises(ValueError, match="left padding"):
        generate_predictions(model, dataset, right)
    training = MultimodalDataset(dataset.records, loader=dataset.loader)
    with pytest.raises(ValueError, match="inference=True"):
        generate_predictions(model, training, collator)
    with pytest.raises(ValueError, match="rank < world_size"):
        generate_predictions(model, dataset, collator, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_return_sequences=2: one answer per question"):
        generate_predictions(model, dataset, collator, num_beams=2, num_return_sequences=2)
    with pytest.raises(ValueError, match=r"generation_kwargs\.top_p=0\.9 only shape\(s\) sampling"):
        generate_predictions(model, dataset, collator, top_p=0.9)
    check_generation_settings({"do_sample": True, "temperature": 0.7, "top_p": 0.9})  # sampling: honoured
    check_generation_settings({"temperature": None, "max_new_tokens": 4})  # unset: nothing to ignore


# -- accuracy -----------------------------------------------------------------------------------------------------
def prediction(modality: str, qtype: str, predicted: str, answer: str) -> dict:
    return {"question_modality": modality, "question_type": qtype, "prediction": predicted, "answer": answer}


PREDICTIONS = [
    prediction("Audio", "Counting", "Two.", "two"),  # case and trailing punctuation
    prediction("Audio", "Counting", "<answer>three</answer>", "<answer>two</answer>"),  # wrong, both tagged
    prediction("Audio", "Counting", "  <answer> More than  ten </answer>", "more than ten"),  # tag + spaces
    prediction("Audio-Visual", "Counting", "yes", "<answer>Yes</answer>"),
    prediction("Audio-Visual", "Counting", "yes, it is", "yes"),  # not an exact match
    prediction("Visual", "Location", "left？", "left"),  # full-width question mark
    prediction("Visual", "Location", "acoustic guitar", "acoustic_guitar"),  # no synonyms
]


def test_normalisation():
    assert normalize_answer("  <ANSWER>Acoustic_Guitar.</ANSWER> trailing") == "acoustic_guitar"
    assert normalize_answer("More   than\tten!?") == "more than ten"
    assert normalize_answer(None) == ""


def test_accuracy_by_question_type():
    results = accuracy_by(PREDICTIONS, MUSIC_AVQA_TYPE)
    assert list(results) == ["Audio-Visual/Counting", "Audio/Counting", "Visual/Location", "overall"]
    assert results["Audio/Counting"] == {"correct": 2, "total": 3, "accuracy": 2 / 3}
    assert results["Audio-Visual/Counting"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert results["Visual/Location"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert results["overall"] == {"correct": 4, "total": 7, "accuracy": 4 / 7}
    by_modality = accuracy_by(PREDICTIONS, "question_modality")
    assert by_modality["Audio"]["correct"] == 2 and by_modality["overall"] == results["overall"]
    assert list(accuracy_by(PREDICTIONS, None)) == ["overall"]
    assert "Audio Counting" in accuracy_by(PREDICTIONS, MUSIC_AVQA_TYPE, sep=" ")  # make_demo_data's names
    with pytest.raises(KeyError, match="no \\['category'\\] field"):
        accuracy_by(PREDICTIONS, "category")


def test_accuracy_table_shows_the_numbers():
    results = accuracy_by(PREDICTIONS, MUSIC_AVQA_TYPE)
    table = format_accuracy_table(results, chance={"Audio/Counting": 0.25, "overall": 0.3})
    lines = table.splitlines()
    audio = next(line for line in lines if line.startswith("Audio/Counting"))
    assert audio.split() == ["Audio/Counting", "66.67%", "2", "3", "25.00%"]
    assert next(line for line in lines if line.startswith("Visual/Location")).split()[-1] == "-"
    assert lines[-1].split() == ["overall", "57.14%", "4", "7", "30.00%"]
    assert "chance" not in format_accuracy_table(results)


def test_generation_stops_at_the_checkpoints_end_of_turn_id_too(setup):
    """An instruct checkpoint lists its end-of-turn id beside the end of text (LLaMA-3: <|eot_id|>,
    <|end_of_text|>) while its tokenizer may name only one as EOS. Here the third token the model would write
    for the first question is made such an id: the answer must end before it, as the hand decoding says."""
    model, dataset, collator = setup
    tokenizer = collator.tokenizer
    batch = collator([dataset[0]])
    with torch.no_grad():
        embeds, _ = model.prepare(batch)
        for _ in range(3):
            token = int(model.llm(inputs_embeds=embeds).logits[0, -1].argmax())
            embeds = torch.cat([embeds, model.embed(torch.tensor([[token]]))], dim=1)
    assert token != tokenizer.eos_token_id
    config = model.llm.generation_config
    saved = config.eos_token_id
    config.eos_token_id = [tokenizer.eos_token_id, token]
    try:
        got = predict(setup)[0]["prediction"]
    finally:
        config.eos_token_id = saved
    assert got == stepwise_greedy(model, collator, dataset[0], stop=(token,))
    assert got != predict(setup)[0]["prediction"]  # without the end-of-turn id it runs on


def test_raw_output_keeps_the_stop_token_as_mokas_scripts_decode(setup):
    """``raw_output``: the answer's tokens and its stop token, decoded with special tokens kept and not stripped
    (MokA's scripts' ``batch_decode(..., skip_special_tokens=False)``, whose 'a ' rule reads "A </s>"). The
    first question is made to stop at the first token it writes after its first that it has not written before
    (given as the checkpoint's EOS); ``prediction`` is the tokens before it, special tokens skipped."""
    model, dataset, collator = setup
    tokenizer = collator.tokenizer
    batch = collator([dataset[0]])
    tokens: list[int] = []
    with torch.no_grad():
        embeds, _ = model.prepare(batch)
        while len(tokens) < 2 or tokens[-1] in tokens[:-1]:
            assert len(tokens) < NEW_TOKENS, tokens
            tokens.append(int(model.llm(inputs_embeds=embeds).logits[0, -1].argmax()))
            embeds = torch.cat([embeds, model.embed(torch.tensor([[tokens[-1]]]))], dim=1)
    got = predict(setup, batch_size=3, eos_token_id=[tokenizer.eos_token_id, tokens[-1]])
    assert got[0]["raw_output"] == tokenizer.decode(tokens, skip_special_tokens=False)
    assert got[0]["prediction"] == tokenizer.decode(tokens[:-1], skip_special_tokens=True).strip()
    assert got[0]["prediction"] and got[0]["raw_output"] != got[0]["prediction"]


def test_a_single_stop_id_may_be_given(setup):
    """``eos_token_id`` in the generation settings overrides the stop ids, as one id or a list."""
    _, _, collator = setup
    eos = collator.tokenizer.eos_token_id
    assert predict(setup, eos_token_id=eos) == predict(setup, eos_token_id=[eos]) == predict(setup)
