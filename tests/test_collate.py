"""The collator against independent expectations: labels decode to the answer and EOS, question tokens to
the question, placeholder runs sit where the placeholders were, padding sides agree, the batch routes and
runs through a tiny real model (raw media and cached features alike), overflow and bad input fail clearly."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moka_train.data.collate import MultimodalCollator
from moka_train.data.sample import PLACEHOLDER_PATTERN, Sample
from moka_train.modality import Modality
from moka_train.models.build import build_multimodal_lm
from moka_train.models.chat_templates import set_chat_template
from moka_train.models.mllm import IGNORE_INDEX
from moka_train.models.tokenizer import PLACEHOLDERS, add_multimodal_tokens, build_demo_tokenizer

CONFIGS = Path(__file__).parents[1] / "configs"
ENCODERS = {
    "visual": "visual/clip_tiny_random",
    "audio": "audio/beats_tiny_random",
    "speech": "speech/whisper_tiny_random",
}
QUERIES = 4  # configs/projector/qformer_tiny.yaml
TOKENS = {"visual": 2, "audio": 3, "speech": 5}  # distinct counts, so that a run of the wrong modality shows
SYSTEM = "You are a helpful assistant."


def preset(path: str):
    return OmegaConf.load(CONFIGS / f"{path}.yaml")


def make_tokenizer(template: str):
    tokenizer = build_demo_tokenizer()
    add_multimodal_tokens(tokenizer)
    if template == "llama2_official":
        tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    set_chat_template(tokenizer, template)
    return tokenizer


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(torch.as_tensor(ids).tolist(), clean_up_tokenization_spaces=False)


def sample(sid: str, before: str, question: str, after: str = "", answer: str | None = None, **kwargs) -> Sample:
    """A sample whose last user turn is ``before + question + after``, the span on the question."""
    content = before + question + after
    messages = [*kwargs.pop("history", []), {"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    span = (len(before), len(before) + len(question))
    return Sample(sid, messages, span, metadata={"answer": answer, "question": question}, **kwargs)


def media(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {  # 2 video frames, two 1 s audio windows, a 1.5 s speech clip
            "visual": [torch.randn(2, 3, 32, 32, generator=g)],
            "audio": [torch.randn(2, 16000, generator=g) * 0.1],
            "speech": [torch.randn(1, 24000, generator=g) * 0.1],
        },
        {  # an image, 3 video frames, a 1 s speech clip
            "visual": [torch.randn(1, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)],
            "speech": [torch.randn(1, 16000, generator=g) * 0.1],
        },
        {},
    ]


ANSWERS = ["piano", "left", "two"]


def samples(training: bool = True, seed: int = 0) -> list[Sample]:
    """An audio-visual-speech sample with a system turn, an image-and-video sample whose question is followed
    by more text, and a text-only multi-turn sample whose question also appears in an earlier turn."""
    m = media(seed)
    answers = ANSWERS if training else [None] * 3
    return [
        sample(
            "avs",
            "This is a video:\n<video_start><video><video_end>\nThis is an audio:\n<audio_start><audio><audio_end>\n"
            "This is a speech clip:\n<speech_start><speech><speech_end>\nPlease answer this question: ",
            "Which instrument makes the sound first?",
            answer=answers[0],
            media=m[0],
            history=[{"role": "system", "content": SYSTEM}],
        ),
        sample(
            "image_video",
            "This is an image:<image> This is a video:<video>\n<speech>",
            "Where is the cello?",
            " Is the piano louder than the violin?",
            answer=answers[1],
            media=m[1],
        ),
        sample(
            "chat",
            "",
            "How many instruments are sounding?",
            answer=answers[2],
            history=[
                {"role": "user", "content": "How many instruments are sounding?"},
                {"role": "assistant", "content": "one"},
            ],
        ),
    ]


def rendered(tokenizer, s: Sample) -> str:
    return tokenizer.apply_chat_template(s.messages, tokenize=False, add_generation_prompt=not s.is_training)


def runs(row) -> list[tuple[int, int]]:
    """``(start, end)`` of each maximal run of media positions in a 1-D modality row."""
    media_positions = (row > int(Modality.TEXT)).tolist()
    out, start = [], None
    for i, is_media in enumerate([*media_positions, False]):
        if is_media and start is None:
            start = i
        elif not is_media and start is not None:
            out.append((start, i))
            start = None
    return out


def unpadded(batch: dict, index: int) -> dict:
    keep = batch["attention_mask"][index].bool()
    return {k: batch[k][index][keep] for k in ("input_ids", "labels", "modality_ids", "question_mask") if k in batch}


@pytest.mark.parametrize("template", ["chatml", "llama2_official"])
def test_labels_question_and_placeholder_runs(template):
    tokenizer = make_tokenizer(template)
    batches = {side: MultimodalCollator(tokenizer, TOKENS, padding_side=side)(samples()) for side in ("left", "right")}
    batch = batches["right"]
    assert batch["ids"] == ["avs", "image_video", "chat"] and batch["dropped"] == []
    assert [m["answer"] for m in batch["metadata"]] == ANSWERS
    for index, s in enumerate(samples()):
        row = unpadded(batch, index)
        # Labels: the answer and EOS, nothing of the template around them (ChatML's newline after EOS is not
        # supervised), nothing of the earlier assistant turn.
        labels = row["labels"][row["labels"] != IGNORE_INDEX]
        assert decode(tokenizer, labels) == ANSWERS[index] + tokenizer.eos_token
        # Question: contiguous, exactly the question, and minimal: without its first or last token the
        # question is no longer whole (an earlier turn's identical text is not marked).
        positions = row["question_mask"].nonzero().flatten()
        assert positions.tolist() == list(range(int(positions[0]), int(positions[-1]) + 1))
        question_ids = row["input_ids"][positions]
        question = s.metadata["question"]
        assert decode(tokenizer, question_ids).strip() == question
        assert question not in decode(tokenizer, question_ids[1:])
        assert question not in decode(tokenizer, question_ids[:-1])
        assert question not in decode(tokenizer, row["input_ids"][int(positions[-1]) + 1 :])  # the last user turn's
        # Placeholder runs: one per placeholder, of its item's segments x tokens, with its id and modality,
        # unsupervised and out of the question; the text between them decodes to the rendered text.
        text = rendered(tokenizer, s)
        placeholders = PLACEHOLDER_PATTERN.findall(text)
        consumed = {m: iter(items) for m, items in s.media.items()}
        expected_lengths = [
            next(consumed[PLACEHOLDERS[p].key]).shape[0] * TOKENS[PLACEHOLDERS[p].key] for p in placeholders
        ]
        found = runs(row["modality_ids"])
        assert [e - b for b, e in found] == expected_lengths
        pieces, cursor = [], 0
        for (b, e), placeholder in zip(found, placeholders, strict=True):
            assert set(row["input_ids"][b:e].tolist()) == {tokenizer.convert_tokens_to_ids(placeholder)}
            assert set(row["modality_ids"][b:e].tolist()) == {int(PLACEHOLDERS[placeholder])}
            assert (row["labels"][b:e] == IGNORE_INDEX).all() and not row["question_mask"][b:e].any()
            pieces.append(decode(tokenizer, row["input_ids"][cursor:b]))
            cursor = e
        pieces.append(decode(tokenizer, row["input_ids"][cursor:]))
        assert pieces == re.split(PLACEHOLDER_PATTERN, text)
        # Padding side changes where the pads go, nothing else.
        left = unpadded(batches["left"], index)
        for key, value in row.items():
            torch.testing.assert_close(left[key], value, rtol=0, atol=0)
    for side, b in batches.items():
        pads = b["attention_mask"] == 0
        assert pads.any()
        assert (b["input_ids"][pads] == tokenizer.pad_token_id).all()
        assert (b["modality_ids"][pads] == int(Modality.PAD)).all() and (b["labels"][pads] == IGNORE_INDEX).all()
        assert not b["question_mask"][pads].any()
        # Pads at the chosen end: the first (left) or last (right) column of the shortest row is a pad.
        shortest = int(b["attention_mask"].sum(1).argmin())
        assert pads[shortest, 0 if side == "left" else -1]
    # Raw media, batch-major in order of appearance; waveforms of different lengths padded, lengths given.
    m = media()
    torch.testing.assert_close(batch["media"]["visual"], torch.cat([m[0]["visual"][0], *m[1]["visual"]]))
    torch.testing.assert_close(batch["media"]["audio"], m[0]["audio"][0])
    assert batch["media"]["speech"].shape == (2, 24000)
    torch.testing.assert_close(batch["media"]["speech"][1, :16000], m[1]["speech"][0][0])
    assert not batch["media"]["speech"][1, 16000:].any()
    assert set(batch["media_lengths"]) == {"speech"} and batch["media_lengths"]["speech"].tolist() == [24000, 16000]


def test_a_template_whose_turns_do_not_end_in_eos_is_warned_about_once():
    """A base checkpoint's tokenizer under an instruct template: Qwen2's EOS <|endoftext|> with ChatML's turns,
    which end in "<|im_end|>\\n". The supervised response runs to the text's end, newline included, so the user is
    told, once per collator. The instruct tokenizer (EOS <|im_end|>) is not warned about."""
    tokenizer = make_tokenizer("chatml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MultimodalCollator(tokenizer, TOKENS)(samples())
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    collator = MultimodalCollator(tokenizer, TOKENS)
    with pytest.warns(UserWarning, match=r"holds no eos_token '<\|endoftext\|>' and ends in plain text") as caught:
        batch = collator(samples())
    assert len(caught) == 1
    labels = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    assert decode(tokenizer, labels) == f"{ANSWERS[0]}<|im_end|>\n"


def test_inference_batch_has_the_generation_prompt_and_no_labels():
    tokenizer = make_tokenizer("chatml")
    batch = MultimodalCollator(tokenizer, TOKENS, padding_side="left")(samples(training=False))
    assert "labels" not in batch
    for index, s in enumerate(samples(training=False)):
        row = unpadded(batch, index)
        text = decode(tokenizer, row["input_ids"][row["modality_ids"] == int(Modality.TEXT)])
        assert text == re.sub(PLACEHOLDER_PATTERN, "", rendered(tokenizer, s))
        assert text.endswith("<|im_start|>assistant\n")
        assert decode(tokenizer, row["input_ids"][row["question_mask"]]).strip() == s.metadata["question"]


def test_windows_of_different_lengths_and_feature_padding():
    tokenizer = make_tokenizer("chatml")
    windows = [torch.randn(2, 1600), torch.randn(1, 1000), torch.randn(3, 1600)]
    batch_samples = [
        Sample("a", [{"role": "user", "content": "<audio> and <audio>"}], media={"audio": windows[:2]}),
        Sample("b", [{"role": "user", "content": "<audio>"}], media={"audio": windows[2:]}),
    ]
    batch = MultimodalCollator(tokenizer, TOKENS)(batch_samples)
    assert batch["media"]["audio"].shape == (6, 1600)
    assert batch["media_lengths"]["audio"].tolist() == [1600, 1600, 1000, 1600, 1600, 1600]
    assert not batch["media"]["audio"][2, 1000:].any()
    same = MultimodalCollator(tokenizer, TOKENS)(batch_samples[1:])
    assert "media_lengths" not in same

    features = [torch.randn(2, 5, 8), torch.randn(1, 3, 8)]
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    featured = [
        Sample("a", [{"role": "user", "content": "<video>"}], media={"visual": features[:1]}),
        Sample("b", [{"role": "user", "content": "<image>"}], media={"visual": features[1:]}),
    ]
    collate = MultimodalCollator(tokenizer, TOKENS, media_kind="features")
    batch = collate(featured)
    assert batch["features"]["visual"].shape == (3, 5, 8)
    assert batch["feature_masks"]["visual"].tolist() == [[True] * 5, [True] * 5, [True] * 3 + [False] * 2]
    assert not batch["features"]["visual"][2, 3:].any()
    featured[0] = Sample("a", featured[0].messages, media={"visual": features[:1]}, feature_masks={"visual": [mask]})
    batch = collate(featured[:1])
    assert batch["feature_masks"]["visual"].tolist() == mask.tolist()
    plain = Sample("p", [{"role": "user", "content": "<video>"}], media={"visual": features[:1]})
    assert "feature_masks" not in collate([plain])


def test_template_that_trims_the_content_still_locates_the_question():
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    s = sample("trimmed", "  <image>\n", "Where is the cello?", "  ", media={"visual": [torch.zeros(1, 3, 8, 8)]})
    batch = MultimodalCollator(tokenizer, TOKENS)([s])
    assert decode(tokenizer, batch["input_ids"][0][batch["question_mask"][0]]).strip() == "Where is the cello?"


def test_a_token_straddling_the_prompt_end_is_supervised():
    """A template whose generation prompt ends inside a word ("pi" + answer "ano" tokenizes as "piano"): the
    token holding characters of both is a label, so the answer is never silently cut."""
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\npi' + message['content'] + '<|im_end|>' }}"
        "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\npi' }}{%- endif -%}"
    )
    s = Sample("straddle", [*USER, {"role": "assistant", "content": "ano"}], None, {"visual": [IMAGE]})
    batch = MultimodalCollator(tokenizer, TOKENS)([s])
    labels = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(labels.tolist()) == ["piano", "<|im_end|>"]


@pytest.mark.parametrize("training", [True, False])
def test_after_media_keys_are_every_unsupervised_prompt_token_after_the_last_placeholder(training):
    """question_keys="after_media", the official visual-text code's mask (not an image token, not supervised,
    after the last image token): with Llama-2-chat's template that is "<image_end>", the question and the
    template's " [/INST]", training or not; never the answer, and nothing for a sample without media."""
    tokenizer = make_tokenizer("llama2_chat")
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    before, question = "This is an image:\n<image_start><image><image_end>\n", "Please answer this question: Who?"
    image = sample("vt", before, question, answer="A cat." if training else None, media={"visual": [IMAGE]})
    text_only = sample("text", "", question, answer="A cat." if training else None)
    collator = MultimodalCollator(tokenizer, TOKENS, question_keys="after_media", padding_side="right")
    batch = collator([image, text_only])
    row = unpadded(batch, 0)
    keys = row["input_ids"][row["question_mask"]]
    assert decode(tokenizer, keys).replace(" ", "") == "<image_end>\nPleaseanswerthisquestion:Who?[/INST]"
    last_media = int((row["modality_ids"] != int(Modality.TEXT)).nonzero().max())
    positions = row["question_mask"].nonzero().flatten().tolist()
    assert positions[0] == last_media + 1 and positions == list(range(positions[0], positions[-1] + 1))
    if training:
        assert not (row["question_mask"] & (row["labels"] != IGNORE_INDEX)).any()
        assert positions[-1] + 1 == int((row["labels"] != IGNORE_INDEX).nonzero().min())  # up to the answer
    else:
        assert positions[-1] == len(row["input_ids"]) - 1  # up to the prompt's end
    assert not batch["question_mask"][1].any()
    span = MultimodalCollator(tokenizer, TOKENS, padding_side="right")([image])["question_mask"][0]
    assert decode(tokenizer, batch["input_ids"][0][span]).strip() == question  # the default: the span alone


# -- the tiny real model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built():
    model_cfg = preset("model/tiny_llama")
    tokenizer = instantiate(model_cfg.tokenizer)
    model = build_multimodal_lm(
        backbone=instantiate(model_cfg.backbone),
        tokenizer=tokenizer,
        encoders={m: instantiate(preset(f"encoder/{p}")) for m, p in ENCODERS.items()},
        projector=preset("projector/qformer_tiny"),
        adapter=instantiate(preset("adapter/moka"), modalities=["text", "visual", "audio", "speech"]),
        chat_template=model_cfg.chat_template,
    )
    collate = MultimodalCollator(tokenizer, dict.fromkeys(ENCODERS, QUERIES), padding_side="left")
    return model.eval(), tokenizer, collate


def test_batch_routes_and_runs_through_the_model(built):
    model, tokenizer, collate = built
    batch = collate(samples())
    model.check_routing(batch)
    output = model(batch)
    assert torch.isfinite(output.loss)
    expected = sum(len(tokenizer(a + tokenizer.eos_token, add_special_tokens=False)["input_ids"]) for a in ANSWERS)
    assert output.label_count == expected
    prompts = collate(samples(training=False))
    generated = model.generate(prompts, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[0] == len(prompts["ids"]) == 3


def test_cached_features_give_the_logits_of_raw_media(built):
    """Each item encoded alone (as a feature cache would) and collated as features: the model's logits equal
    those of the raw batch, whose speech clips of two lengths are padded and encoded together."""
    model, tokenizer, raw_collate = built
    raw = raw_collate(samples())
    cached_samples = []
    for s in samples():
        features, masks = {}, {}
        for name, items in s.media.items():
            encoded = [model.encoders[name].encode_segments(item) for item in items]
            features[name] = [f for f, _ in encoded]
            if any(mask is not None for _, mask in encoded):
                masks[name] = [m if m is not None else torch.ones(f.shape[:2], dtype=torch.bool) for f, m in encoded]
        cached_samples.append(Sample(s.id, s.messages, s.question_span, features, masks, s.metadata))
    collate = MultimodalCollator(
        tokenizer, dict.fromkeys(ENCODERS, QUERIES), padding_side="left", media_kind="features"
    )
    cached = collate(cached_samples)
    for key in ("input_ids", "labels", "modality_ids", "question_mask", "attention_mask"):
        torch.testing.assert_close(cached[key], raw[key], rtol=0, atol=0)
    assert cached["features"]["speech"].shape[:2] == (2, 75) and cached["feature_masks"]["speech"][1].sum() == 50
    with torch.no_grad():
        torch.testing.assert_close(model(cached).logits, model(raw).logits, rtol=1e-5, atol=1e-5)


# -- overflow ----------------------------------------------------------------------------------------------
def test_overflow_errors_or_drops_with_a_counted_warning():
    tokenizer = make_tokenizer("chatml")
    lengths = [len(MultimodalCollator(tokenizer, TOKENS).encode(s)) for s in samples()]
    limit = sorted(lengths)[1]  # the longest sample does not fit
    longest = samples()[lengths.index(max(lengths))].id
    with pytest.raises(ValueError, match=rf"sample '{longest}' is {max(lengths)} tokens long .*max_length {limit}"):
        MultimodalCollator(tokenizer, TOKENS, max_length=limit)(samples())
    collate = MultimodalCollator(tokenizer, TOKENS, max_length=limit, on_overflow="drop")
    with pytest.warns(UserWarning, match=f"dropped sample '{longest}'"):
        batch = collate(samples())
    assert batch["dropped"] == [longest] and longest not in batch["ids"] and len(batch["ids"]) == 2
    assert batch["input_ids"].shape == (2, limit) and collate.dropped == 1
    kept_frames = [item for s in samples() if s.id != longest for item in s.media.get("visual", [])]
    torch.testing.assert_close(batch["media"]["visual"], torch.cat(kept_frames))
    # A batch with nothing left is an error, unless the collator fills empty batches (the training loop's): then a
    # training batch with nothing left is one pad token, no label, no media and no id, which the loop runs as a
    # filler so that every rank runs every micro-step. An inference batch with nothing left is always an error.
    with warnings.catch_warnings(), pytest.raises(ValueError, match="every sample of the batch was dropped"):
        warnings.simplefilter("ignore")
        MultimodalCollator(tokenizer, TOKENS, max_length=5, on_overflow="drop")(samples())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        empty = MultimodalCollator(tokenizer, TOKENS, max_length=5, on_overflow="drop", fill_empty=True)(samples())
    assert empty["ids"] == [] and empty["dropped"] == [s.id for s in samples()]
    assert empty["input_ids"].tolist() == [[tokenizer.pad_token_id]] and empty["labels"].tolist() == [[-100]]
    assert empty["attention_mask"].tolist() == [[1]] and empty["modality_ids"].tolist() == [[0]]
    assert not empty["question_mask"].any() and not empty["media"]
    # So is a micro-batch given no sample at all (an empty slot of an epoch's last step).
    none_given = MultimodalCollator(tokenizer, TOKENS, fill_empty=True)([])
    assert none_given["ids"] == [] == none_given["dropped"]
    for key in ("input_ids", "labels", "attention_mask", "modality_ids", "question_mask"):
        assert torch.equal(none_given[key], empty[key]), key
    questions = [dataclasses.replace(s, messages=s.messages[:-1]) for s in samples()]
    with warnings.catch_warnings(), pytest.raises(ValueError, match="every sample of the batch was dropped"):
        warnings.simplefilter("ignore")
        MultimodalCollator(tokenizer, TOKENS, max_length=5, on_overflow="drop", fill_empty=True)(questions)
    # Exactly max_length fits.
    assert MultimodalCollator(tokenizer, TOKENS, max_length=max(lengths))(samples())["input_ids"].shape[1] == max(
        lengths
    )


# -- bad input ---------------------------------------------------------------------------------------------
USER = [{"role": "user", "content": "<image> Where is the cello?"}]
IMAGE = torch.zeros(1, 3, 8, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"media": {}}, r"sample 'bad': 1 visual placeholder\(s\) in the messages but 0 visual media item"),
        ({"media": {"visual": [IMAGE, IMAGE]}}, r"1 visual placeholder\(s\) .* but 2 visual media item"),
        ({"media": {"visual": [IMAGE], "audio": [torch.zeros(1, 10)]}}, r"0 audio placeholder\(s\) .* but 1 audio"),
        ({"media": {"visual": [IMAGE], "smell": []}}, "sample 'bad': media: unknown modality 'smell'"),
        ({"media": {"visual": IMAGE}}, r"media\['visual'\] must be a list"),
        ({"media": {"visual": [torch.zeros(3, 8, 8, 8, 1)]}}, r"visual item 0 has shape \(3, 8, 8, 8, 1\)"),
        ({"question_span": (10, 40)}, r"sample 'bad': question_span \(10, 40\) is not a non-empty span"),
        ({"question_span": (5, 5)}, "question_span .* is not a non-empty span"),
        ({"question_span": (-1, 3)}, "question_span .* is not a non-empty span"),
        ({"question_span": (1.0, 3)}, "question_span must be two ints"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "message 0 has role 'robot'"),
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages hold no user turn"),
        ({"messages": [*USER, {"role": "assistant", "content": "<image>"}]}, "assistant. holds a media placeholder"),
        ({"messages": [*USER, {"role": "system", "content": "x"}]}, "the last message is a system turn"),
        ({"messages": [{"role": "user"}]}, "must be a dict with 'role' and 'content'"),
        ({"feature_masks": {"visual": [torch.ones(1, 3, dtype=torch.bool)]}}, "has a feature mask but is not feat"),
    ],
)
def test_bad_samples_are_refused_with_their_id(kwargs, match):
    fields = {"messages": USER, "question_span": None, "media": {"visual": [IMAGE]}, **kwargs}
    with pytest.raises(ValueError, match=match):
        Sample("bad", **fields)


def test_feature_mask_errors():
    features = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match=r"feature mask 0 must be a bool tensor of shape \(2, 3\)"):
        Sample("m", USER, media={"visual": [features]}, feature_masks={"visual": [torch.ones(2, 3)]})
    with pytest.raises(ValueError, match="feature mask 0 has a segment with no real token"):
        mask = torch.tensor([[True, False, False], [False, False, False]])
        Sample("m", USER, media={"visual": [features]}, feature_masks={"visual": [mask]})


def test_collator_errors_name_the_sample():
    tokenizer = make_tokenizer("chatml")
    collate = MultimodalCollator(tokenizer, TOKENS)
    good = Sample("good", USER, (8, 27), {"visual": [IMAGE]})
    # A sample changed after it was built is checked again.
    changed = Sample("changed", USER, None, {"visual": [IMAGE]})
    changed.media["visual"].append(IMAGE)
    with pytest.raises(ValueError, match=r"sample 'changed': 1 visual placeholder\(s\) .* but 2 visual media"):
        collate([good, changed])
    with pytest.raises(ValueError, match=r"must share their frame shape .*good: \(1, 3, 8, 8\), odd: \(1, 3, 16, 16\)"):
        collate([good, Sample("odd", USER, None, {"visual": [torch.zeros(1, 3, 16, 16)]})])
    with pytest.raises(ValueError, match=r"sample 'feat': raw visual item 0 has shape \(1, 4, 8\).*'features'"):
        collate([Sample("feat", USER, None, {"visual": [torch.zeros(1, 4, 8)]})])
    with pytest.raises(ValueError, match=r"sample 'good': visual item 0 has shape .* collates cached features"):
        MultimodalCollator(tokenizer, TOKENS, media_kind="features")([good])
    with pytest.raises(ValueError, match=r"sample 'good' has \['visual'\] media, but tokens_per_segment only covers"):
        MultimodalCollator(tokenizer, {"audio": 2})([good])
    with pytest.raises(ValueError, match="mixes training samples .* and inference samples"):
        collate([good, Sample("train", [*USER, {"role": "assistant", "content": "left"}], None, {"visual": [IMAGE]})])
    with pytest.raises(ValueError, match=r"sample 'spanless': question_span \(0, 7\) covers no text token"):
        collate([Sample("spanless", USER, (0, 7), {"visual": [IMAGE]})])
    with pytest.raises(TypeError, match="takes Sample objects, got dict"):
        collate([{"id": "x"}])
    with pytest.raises(ValueError, match="empty list"):
        collate([])


def test_templates_that_change_the_text_are_refused():
    tokenizer = make_tokenizer("chatml")
    answered = Sample("answered", [*USER, {"role": "assistant", "content": "left"}], (8, 27), {"visual": [IMAGE]})
    upper = make_tokenizer("chatml")
    upper.chat_template = upper.chat_template.replace("message['content']", "message['content'] | upper")
    with pytest.raises(ValueError, match="sample 'answered': the last user turn's content is not in the rendered"):
        MultimodalCollator(upper, TOKENS)([answered])
    unstable = make_tokenizer("chatml")
    unstable.chat_template = unstable.chat_template.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'")
    with pytest.raises(ValueError, match="sample 'answered': the chat template is not prefix-stable"):
        MultimodalCollator(unstable, TOKENS)([answered])
    injecting = make_tokenizer("chatml")
    injecting.chat_template = "{{ '<image>' }}" + injecting.chat_template
    with pytest.raises(ValueError, match=r"sample 'answered': the rendered text holds 2 visual placeholder token"):
        MultimodalCollator(injecting, TOKENS)([answered])
    MultimodalCollator(tokenizer, TOKENS)([answered])  # the unchanged template is fine


def test_collator_settings_are_checked():
    tokenizer = make_tokenizer("chatml")
    with pytest.raises(ValueError, match="on_overflow must be one of"):
        MultimodalCollator(tokenizer, TOKENS, on_overflow="truncate")
    with pytest.raises(ValueError, match="media_kind must be one of"):
        MultimodalCollator(tokenizer, TOKENS, media_kind="pixels")
    with pytest.raises(ValueError, match="padding_side must be one of"):
        MultimodalCollator(tokenizer, TOKENS, padding_side="middle")
    with pytest.raises(ValueError, match="question_keys must be one of"):
        MultimodalCollator(tokenizer, TOKENS, question_keys="everything")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        MultimodalCollator(tokenizer, TOKENS, max_length=0)
    with pytest.raises(ValueError, match=r"tokens_per_segment\['audio'\] must be a positive int"):
        MultimodalCollator(tokenizer, {"audio": 0})
    with pytest.raises(ValueError, match="does not keep <image> as one special token: call add_multimodal_tokens"):
        MultimodalCollator(build_demo_tokenizer(), TOKENS)
