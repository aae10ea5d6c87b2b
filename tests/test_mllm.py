"""The multimodal LM on tiny random models: splicing, routing checks, loss, padding, generation, stages."""

from __future__ import annotations

import pytest
import torch

from moka_train.adapters import AdaptedLinear, AdapterConfig, inject_adapters
from moka_train.modality import Modality
from moka_train.models.mllm import IGNORE_INDEX, MultimodalLM
from moka_train.models.projector import ProjectorConfig, QFormerProjector
from tests.helpers import VOCAB, randomize_adapters, tiny_llama

VIDEO, AUDIO, VIDEO_START = VOCAB, VOCAB + 1, VOCAB + 2  # added tokens, past the backbone's vocabulary
QUERIES = 2
WIDTHS = {"visual": 16, "audio": 12}
PLACEHOLDER = {"visual": VIDEO, "audio": AUDIO}


def build(adapter: str | None = "moka", seed: int = 0) -> MultimodalLM:
    llm = tiny_llama(seed=seed)
    if adapter:
        inject_adapters(llm, AdapterConfig(method=adapter))
        randomize_adapters(llm)
    torch.manual_seed(seed + 1)
    projectors = {
        m: QFormerProjector(
            ProjectorConfig(
                encoder_width=w,
                llm_hidden_size=64,
                num_queries=QUERIES,
                qformer_layers=1,
                qformer_hidden_size=32,
                qformer_heads=4,
                qformer_intermediate_size=64,
            )
        )
        for m, w in WIDTHS.items()
    }
    model = MultimodalLM(llm, projectors, PLACEHOLDER, [VIDEO, AUDIO, VIDEO_START])
    return model.eval()


# A sample: (kind, payload); kind text/question/answer take token ids, visual/audio a segment count.
SAMPLES = [
    [
        ("text", [5, 6]),
        ("text", [VIDEO_START]),
        ("visual", 3),
        ("audio", 2),
        ("question", [7, 8, 9]),
        ("answer", [10, 11, 12]),
    ],
    [("text", [5]), ("visual", 1), ("question", [13, 14]), ("answer", [15, 16])],
]


def make_batch(samples=SAMPLES, pad_side: str = "left", seed: int = 0, with_answers: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rows, features = [], {m: [] for m in WIDTHS}
    for sample in samples:
        ids, mods, question, labels = [], [], [], []
        for kind, payload in sample:
            if kind in WIDTHS:
                features[kind].append(torch.randn(payload, 5, WIDTHS[kind], generator=generator))
                n = payload * QUERIES
                ids += [PLACEHOLDER[kind]] * n
                mods += [int(Modality.parse(kind))] * n
                question += [False] * n
                labels += [IGNORE_INDEX] * n
            elif kind != "answer" or with_answers:
                ids += payload
                mods += [int(Modality.TEXT)] * len(payload)
                question += [kind == "question"] * len(payload)
                labels += payload if kind == "answer" else [IGNORE_INDEX] * len(payload)
        rows.append((ids, mods, question, labels))
    length = max(len(r[0]) for r in rows)

    def pad(values, fill):
        gap = [fill] * (length - len(values))
        return gap + values if pad_side == "left" else values + gap

    return {
        "input_ids": torch.tensor([pad(r[0], 0) for r in rows]),
        "modality_ids": torch.tensor([pad(r[1], int(Modality.PAD)) for r in rows]),
        "question_mask": torch.tensor([pad(r[2], False) for r in rows]),
        "labels": torch.tensor([pad(r[3], IGNORE_INDEX) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r[0]), 0) for r in rows]),
        "features": {m: torch.cat(f) for m, f in features.items() if f},
    }


def test_splicing_puts_each_segment_where_its_placeholders_were():
    model = build()
    batch = make_batch(pad_side="right")
    with torch.no_grad():
        embeds = model.embed_inputs(batch)
        visual = model.projectors["visual"](batch["features"]["visual"])  # segments: 3 of sample 0, then 1 of sample 1
        audio = model.projectors["audio"](batch["features"]["audio"])
    # Sample 0: 2 text, the start marker, 3 visual segments (6 tokens), 2 audio segments (4 tokens).
    torch.testing.assert_close(embeds[0, 3:9], visual[:3].reshape(6, -1))
    torch.testing.assert_close(embeds[0, 9:13], audio.reshape(4, -1))
    torch.testing.assert_close(embeds[1, 1:3], visual[3])
    torch.testing.assert_close(embeds[0, 2], model.embed.weight[2].detach())  # <video_start>: its own trained row
    torch.testing.assert_close(embeds[0, :2], model.llm.get_input_embeddings().weight[[5, 6]].detach())


def test_forward_backward_through_the_whole_stack():
    model = build()
    model.set_stage("instruct")
    model.train()
    out = model(make_batch())
    assert torch.isfinite(out.loss) and out.label_count == 3 + 2  # every answer token is predicted
    out.loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(name.startswith("projectors.visual.") for name in trained)
    assert any(name.startswith("projectors.audio.") for name in trained)
    assert "embed.weight" in trained
    assert any(".lora_A.visual." in name for name in trained) and any(".lora_A.audio." in name for name in trained)
    frozen = [p for name, p in model.llm.named_parameters() if ".lora_" not in name]
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize("adapter", ["moka", "loramoe"])
def test_a_batch_with_nothing_to_learn_reaches_every_trainable_with_a_zero_gradient(adapter: str):
    """The collator's stand-in for a training micro-batch with no sample (an empty slot of an epoch's last step,
    or every sample over max_length): one pad token, no label, no media. It must still reach every trainable
    parameter (ZeRO-3 ranks gather the same parameters, DDP reduces them all) and move none: its loss is exactly
    0 and so is every gradient, with LoRAMoE's load-balancing term as well (the model weights it by the batch's
    label share, none here)."""
    model = build(adapter)
    model.set_stage("instruct")
    model.train()
    stand_in = {
        "input_ids": torch.tensor([[0]]),
        "modality_ids": torch.tensor([[int(Modality.TEXT)]]),
        "question_mask": torch.tensor([[False]]),
        "labels": torch.tensor([[IGNORE_INDEX]]),
        "attention_mask": torch.tensor([[1]]),
        "features": {},
    }
    out = model(stand_in, label_normalizer=7)
    assert out.loss.item() == 0.0 and out.label_count == 0 and out.loss.requires_grad
    out.loss.backward()  # the training loop runs a filler as it is
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.startswith("projectors.audio.") for name in trainable)
    assert all(p.grad is not None and not p.grad.any() for p in trainable.values()), [
        name for name, p in trainable.items() if p.grad is None or p.grad.any()
    ]


def test_loss_is_summed_over_labels_and_normalised():
    model = build()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
        per_token = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1),
            batch["labels"][:, 1:].flatten(),
            reduction="none",
            ignore_index=IGNORE_INDEX,
        )
        global_out = model(batch, label_normalizer=10)
    torch.testing.assert_close(out.loss, per_token.sum() / out.label_count)
    torch.testing.assert_close(global_out.loss, per_token.sum() / 10)


def test_left_and_right_padding_give_the_same_logits():
    model = build()
    left, right = make_batch(pad_side="left"), make_batch(pad_side="right")
    with torch.no_grad():
        out_left, out_right = model(left), model(right)
    for row in range(2):
        keep_left, keep_right = left["attention_mask"][row].bool(), right["attention_mask"][row].bool()
        torch.testing.assert_close(
            out_left.logits[row, keep_left], out_right.logits[row, keep_right], rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(out_left.loss, out_right.loss, rtol=1e-6, atol=1e-6)


def test_generate_equals_step_by_step_greedy_full_forward():
    model = build()
    batch = make_batch(with_answers=False)  # left-padded prompts
    steps = 4
    generated = model.generate(batch, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
    assert generated.shape == (2, steps)
    with torch.no_grad():
        prompt, _ = model.prepare(batch)
        tokens = torch.empty(2, 0, dtype=torch.long)
        for _ in range(steps):
            embeds = torch.cat([prompt, model.embed(tokens)], dim=1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], dim=1)
            logits = model.llm(
                inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
            ).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_stages_and_parameter_report():
    model = build()
    model.set_stage("pretrain")
    report = model.parameter_report()
    assert report["adapter"][0] == 0 and report["adapter"][1] > 0
    assert report["llm"][0] == 0
    assert report["added_tokens"] == (3 * 64, 3 * 64)
    assert all(trainable == total > 0 for name, (trainable, total) in report.items() if name.startswith("projector."))
    model.set_stage("instruct")
    assert model.parameter_report()["adapter"][0] == model.parameter_report()["adapter"][1]
    assert not any(isinstance(m, AdaptedLinear) for m in model.projectors.modules())
    # The official stage 2's trainables: projectors and adapter, the added rows frozen.
    model.set_stage("instruct", train_added_tokens=False)
    report = model.parameter_report()
    assert report["added_tokens"] == (0, 3 * 64) and report["adapter"][0] == report["adapter"][1] > 0
    assert all(trainable == total > 0 for name, (trainable, total) in report.items() if name.startswith("projector."))
    with pytest.raises(ValueError, match="stage must be one of"):
        model.set_stage("finetune")


def test_stage_one_without_an_adapter():
    model = build(adapter=None)
    model.set_stage("pretrain")
    out = model(make_batch())
    out.loss.backward()
    assert model.embed.weight.grad is not None
    with pytest.raises(ValueError, match="carries none"):
        model.set_stage("instruct")


def test_bad_batches_are_named():
    model = build()
    batch = make_batch()
    wrong = dict(
        batch, modality_ids=batch["modality_ids"].masked_fill(batch["input_ids"] == AUDIO, int(Modality.VISUAL))
    )
    with pytest.raises(ValueError, match="modality_ids disagree with input_ids at sample 0"):
        model(wrong)
    short = dict(batch, features={**batch["features"], "visual": batch["features"]["visual"][:3]})
    with pytest.raises(ValueError, match=r"visual: 3 segments x 2 tokens = 6 projector tokens, but input_ids hold 8"):
        model(short)
    missing = dict(batch, features={"visual": batch["features"]["visual"]})
    with pytest.raises(ValueError, match="4 <audio> placeholders but the batch has no audio features"):
        model(missing)
    extra = dict(batch, features={**batch["features"], "speech": torch.zeros(1, 2, 3)})
    with pytest.raises(ValueError, match=r"features or media for \['speech'\]"):
        model(extra)
    with pytest.raises(ValueError, match="not among the added token ids"):
        MultimodalLM(tiny_llama(), {"visual": build().projectors["visual"]}, {"visual": 200}, [VIDEO])
