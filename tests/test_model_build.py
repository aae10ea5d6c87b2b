"""The whole model built from the config presets: tiny backbone + tokenizer, the three real encoder classes
(random tiny weights), projectors and MokA; raw media through the encoders inside the model; saving and
loading the trainables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from moka_train.adapters import AdapterConfig, adapter_named_parameters, carries_adapters, inject_adapters
from moka_train.modality import Modality
from moka_train.models.build import build_multimodal_lm
from moka_train.models.mllm import IGNORE_INDEX, MultimodalLM
from moka_train.models.trainables import load_trainables, save_trainables
from tests.helpers import randomize_adapters

CONFIGS = Path(__file__).parents[1] / "configs"
ENCODERS = {
    "visual": "visual/clip_tiny_random",
    "audio": "audio/beats_tiny_random",
    "speech": "speech/whisper_tiny_random",
}
QUERIES = 4  # configs/projector/qformer_tiny.yaml


def preset(path: str):
    return OmegaConf.load(CONFIGS / f"{path}.yaml")


def build(
    adapter: str | None = "moka",
    seed: int = 0,
    model: str = "tiny_llama",
    stage: str | None = None,
    dtype: str = "fp32",
):
    model_cfg = preset(f"model/{model}")
    tokenizer = instantiate(model_cfg.tokenizer)
    adapter_cfg = None
    if adapter:
        adapter_cfg = instantiate(preset(f"adapter/{adapter}"), modalities=["text", "visual", "audio", "speech"])
    mllm = build_multimodal_lm(
        backbone=instantiate(model_cfg.backbone, dtype=dtype),
        tokenizer=tokenizer,
        encoders={m: instantiate(preset(f"encoder/{p}")) for m, p in ENCODERS.items()},
        projector=preset("projector/qformer_tiny"),
        adapter=adapter_cfg,
        chat_template=model_cfg.chat_template,
        stage=stage,
        seed=seed,
    )
    if adapter:
        randomize_adapters(mllm.llm, seed=seed + 1)
    return mllm.eval(), tokenizer


def media(seed: int = 0) -> dict:
    """Two samples: sample 0 has 2 video frames, 2 audio windows and a speech clip; sample 1 one image."""
    g = torch.Generator().manual_seed(seed)
    return {
        "visual": torch.randn(3, 3, 32, 32, generator=g),  # 2 frames of sample 0, then sample 1's image
        "audio": torch.randn(2, 16000, generator=g) * 0.1,  # two 1 s windows
        "speech": torch.randn(1, 24000, generator=g) * 0.1,  # a 1.5 s clip
    }


def prompt_batch(tokenizer) -> dict:
    """Rendered with the chat template, placeholders expanded to the projector's token count, the question
    span found through the tokenizer's offsets, labels on the answer: what the collator will do."""
    samples = [
        (
            "This is a video:\n<video_start>" + "<video>" * (2 * QUERIES) + "<video_end>\nThis is an audio:\n"
            "<audio_start>"
            + "<audio>" * (2 * QUERIES)
            + "<audio_end>\nThis is a speech clip:\n<speech_start>"
            + "<speech>" * QUERIES
            + "<speech_end>\nPlease answer this question: ",
            "Which instrument makes the sound first?",
            "piano",
        ),
        ("This is an image:\n<image_start>" + "<image>" * QUERIES + "<image_end>\n", "Where is the cello?", "left"),
    ]
    rows = []
    for prefix, question, answer in samples:
        messages = [{"role": "user", "content": prefix + question}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
        encoded = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False)
        start = prompt.index(question)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        question_mask = [s >= start and e <= start + len(question) and e > s for s, e in offsets]
        labels = [t if s >= len(prompt) else IGNORE_INDEX for t, (s, _) in zip(ids, offsets, strict=True)]
        rows.append((ids, question_mask, labels))
    length = max(len(r[0]) for r in rows)
    batch = {k: [] for k in ("input_ids", "attention_mask", "question_mask", "labels")}
    for ids, question_mask, labels in rows:
        gap = length - len(ids)  # left padding, as for generation
        batch["input_ids"].append([tokenizer.pad_token_id] * gap + ids)
        batch["attention_mask"].append([0] * gap + [1] * len(ids))
        batch["question_mask"].append([False] * gap + question_mask)
        batch["labels"].append([IGNORE_INDEX] * gap + labels)
    batch = {k: torch.tensor(v) for k, v in batch.items()}
    return batch


def with_routing(model: MultimodalLM, batch: dict) -> dict:
    modality_ids = torch.full_like(batch["input_ids"], int(Modality.TEXT))
    for name in model.placeholder_ids:
        modality_ids[model.placeholder_positions(batch["input_ids"], name)] = int(Modality.parse(name))
    modality_ids[batch["attention_mask"] == 0] = int(Modality.PAD)
    return dict(batch, modality_ids=modality_ids)


@pytest.fixture(scope="module")
def built():
    model, tokenizer = build()
    batch = with_routing(model, prompt_batch(tokenizer))
    return model, tokenizer, batch


def test_raw_media_equal_cached_features(built):
    """Encoding inside the model gives exactly what a feature cache holding the encoders' outputs gives."""
    model, tokenizer, batch = built
    raw = model(dict(batch, media=media()))
    features, masks = {}, {}
    for name, segments in media().items():
        features[name], mask = model.encoders[name].encode_segments(segments)
        if mask is not None:
            masks[name] = mask
    cached = model(dict(batch, features=features, feature_masks=masks))
    torch.testing.assert_close(raw.logits, cached.logits, rtol=0, atol=0)
    answers = [tokenizer.decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]
    assert answers == [f"piano{tokenizer.eos_token}", f"left{tokenizer.eos_token}"]
    assert raw.label_count == int((batch["labels"] != IGNORE_INDEX).sum())
    assert torch.isfinite(raw.loss)


def test_speech_lengths_mask_the_padding(built):
    """A speech clip padded with zeros and given its real length encodes as the unpadded clip."""
    model, _, batch = built
    clip = media()["speech"]
    padded = torch.cat([clip, torch.zeros(1, 8000)], dim=1)
    exact = model(dict(batch, media=media())).logits
    masked = model(dict(batch, media={**media(), "speech": padded}, media_lengths={"speech": torch.tensor([24000])}))
    torch.testing.assert_close(masked.logits, exact, rtol=1e-5, atol=1e-5)


def test_training_step_reaches_projectors_tokens_and_adapter_only():
    model, tokenizer = build(stage="instruct")
    model.train()
    assert all(not e.training for e in model.encoders.values())  # frozen encoders stay in eval mode
    batch = with_routing(model, prompt_batch(tokenizer))
    model(dict(batch, media=media())).loss.backward()
    reached: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        trainable = name.startswith(("projectors.", "embed.weight")) or ".lora_" in name
        assert parameter.requires_grad == trainable, name
        assert (parameter.grad is not None) == trainable, name
        if trainable:
            # Some entries are structurally zero (the last layer's q_proj at media positions feeds no label),
            # so gradients are checked per component.
            component = name.split(".")[1] if name.startswith("projectors.") else name.split(".")[-2]
            reached[component] = reached.get(component, 0.0) + float(parameter.grad.abs().sum())
    assert set(reached) == {"visual", "audio", "speech", "text", "embed", "lora_B"}
    assert all(total > 0 for total in reached.values()), reached
    report = model.parameter_report()
    assert {k for k in report if k.startswith("encoder.")} == {"encoder.visual", "encoder.audio", "encoder.speech"}
    assert all(report[f"encoder.{m}"][0] == 0 < report[f"encoder.{m}"][1] for m in ENCODERS)
    assert report["adapter"][0] == report["adapter"][1] > 0


def test_bf16_backbone_with_fp32_trainables():
    """The paper's stage 2: a bf16 backbone, fp32 projectors, added rows and adapters (as peft keeps them)."""
    model, tokenizer = build(stage="instruct", dtype="bf16", model="tiny_qwen2")
    assert model.llm.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    batch = with_routing(model, prompt_batch(tokenizer))
    out = model(dict(batch, media=media()))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    assert model.projectors["visual"].queries.grad is not None and model.embed.weight.grad is not None


def test_adapters_live_in_the_llm_only(built):
    model, _, _ = built
    assert carries_adapters(model.llm)
    for module in [*model.encoders.values(), *model.projectors.values()]:
        assert not carries_adapters(module)
    names = [n for n, _ in adapter_named_parameters(model)]
    assert names and all(n.startswith("llm.") for n in names)
    # BEATs has q_proj / k_proj like the LLM: a model whose encoder was injected by mistake is refused.
    beats = instantiate(preset("encoder/audio/beats_tiny_random"))
    inject_adapters(beats, AdapterConfig(method="lora", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="the audio encoder carries adapters"):
        MultimodalLM(model.llm, {"audio": model.projectors["audio"]}, {"audio": 390}, [390], {"audio": beats})


def test_build_errors():
    with pytest.raises(ValueError, match=r"leave out \['speech'\]"):
        model_cfg = preset("model/tiny_llama")
        build_multimodal_lm(
            instantiate(model_cfg.backbone),
            instantiate(model_cfg.tokenizer),
            encoders={"speech": instantiate(preset("encoder/speech/whisper_tiny_random"))},
            adapter=AdapterConfig(method="moka", modalities=("text", "visual")),
        )
    with pytest.raises(ValueError, match="no media modality"):
        build_multimodal_lm(
            instantiate(preset("model/tiny_llama").backbone), instantiate(preset("model/tiny_llama").tokenizer)
        )


def test_cached_features_model_needs_no_encoder():
    model_cfg = preset("model/tiny_qwen2")
    model = build_multimodal_lm(
        instantiate(model_cfg.backbone),
        instantiate(model_cfg.tokenizer),
        encoder_widths={"visual": 64},
        projector=preset("projector/qformer_tiny"),
    )
    assert list(model.projectors) == ["visual"] and not model.encoders
    assert model.projectors["visual"].config.encoder_width == 64
    assert model.embed.base is model.llm.get_input_embeddings()
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight  # the tied head is untouched


# -- trainables ----------------------------------------------------------------------------------------
def test_trainables_round_trip(built, tmp_path):
    model, _, batch = built
    with torch.no_grad():
        model.embed.weight.normal_()  # rows that differ from their initialisation
    save_trainables(model, tmp_path)
    weights = load_file(tmp_path / "trainables.safetensors")
    # The stable names of the format.
    assert "added_tokens.weight" in weights
    assert "projectors.visual.queries" in weights and "projectors.audio.mlp.2.weight" in weights
    assert "projectors.speech.qformer.encoder.layer.0.crossattention.attention.query.weight" in weights
    assert all(k == "added_tokens.weight" or k.startswith("projectors.") for k in weights)
    manifest = json.loads((tmp_path / "trainables.json").read_text())
    assert manifest["added_token_ids"] == model.embed.token_ids.tolist() and manifest["adapter"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh, _ = build(seed=5)
    before = fresh(dict(batch, media=media())).logits
    loaded = load_trainables(fresh, tmp_path)
    assert set(loaded) == {"projectors", "added_tokens", "adapter"}
    after = fresh(dict(batch, media=media())).logits
    expected = model(dict(batch, media=media())).logits
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_stage1_checkpoint_into_a_stage2_model(tmp_path):
    stage1, _ = build(adapter=None, seed=3, stage="pretrain")
    with torch.no_grad():
        stage1.embed.weight.normal_(generator=torch.Generator().manual_seed(0))  # as if trained
    save_trainables(stage1, tmp_path)
    assert not (tmp_path / "adapter").exists()
    stage2, _ = build(seed=4)
    adapter_before = {n: p.clone() for n, p in adapter_named_parameters(stage2)}
    rows_before = stage2.embed.weight.detach().clone()
    loaded = load_trainables(stage2, tmp_path, modalities=["visual"])
    assert loaded["projectors"] == ["visual"] and "adapter" not in loaded
    for n, p in adapter_named_parameters(stage2):
        torch.testing.assert_close(p, adapter_before[n], rtol=0, atol=0)
    torch.testing.assert_close(stage2.projectors["visual"].queries, stage1.projectors["visual"].queries)
    assert not torch.equal(stage2.projectors["audio"].queries, stage1.projectors["audio"].queries)
    # The added-token rows of the visual medium only (<image>, <image_start>, ... <video_end>: the first six of
    # the twelve), the others as the stage-2 model had them: a visual stage-1 run trained only its own rows.
    assert loaded["added_tokens"] == [str(i) for i in stage2.embed.token_ids[:6].tolist()]
    torch.testing.assert_close(stage2.embed.weight[:6], stage1.embed.weight[:6], rtol=0, atol=0)
    torch.testing.assert_close(stage2.embed.weight[6:], rows_before[6:], rtol=0, atol=0)
    assert not torch.equal(rows_before[:6], stage1.embed.weight[:6])
    with pytest.raises(ValueError, match=r"holds no \['adapter'\]"):
        load_trainables(stage2, tmp_path, parts=["adapter"])


def test_trainables_errors_name_the_problem(built, tmp_path):
    model, _, _ = built
    with pytest.raises(FileNotFoundError, match="trainables checkpoint .*absent does not exist"):
        load_trainables(model, tmp_path / "absent")
    save_trainables(model, tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="has no trainables.json"):
        load_trainables(model, tmp_path)

    weights = load_file(tmp_path / "ok" / "trainables.safetensors")
    renamed = {k.replace("mlp.0.", "mlp.first."): v for k, v in weights.items()}
    save_file(renamed, tmp_path / "ok" / "trainables.safetensors")
    with pytest.raises(ValueError, match=r"the audio projector's keys do not match: 2 missing \['mlp.0.bias'"):
        load_trainables(model, tmp_path / "ok")
    save_file(weights, tmp_path / "ok" / "trainables.safetensors")

    manifest_path = tmp_path / "ok" / "trainables.json"
    manifest = json.loads(manifest_path.read_text())
    shifted = dict(manifest, added_token_ids=[i + 1 for i in manifest["added_token_ids"]])
    manifest_path.write_text(json.dumps(shifted))
    with pytest.raises(ValueError, match="the added tokens had ids .* but this tokenizer gives them"):
        load_trainables(model, tmp_path / "ok", parts=["added_tokens"])
    wider = json.loads(json.dumps(manifest))
    wider["projectors"]["visual"]["num_queries"] = 8
    manifest_path.write_text(json.dumps(wider))
    with pytest.raises(
        ValueError, match="visual projector was saved with another config .num_queries: saved 8, model 4"
    ):
        load_trainables(model, tmp_path / "ok", parts=["projectors"])
    manifest_path.write_text(json.dumps(dict(manifest, format_version=99)))
    with pytest.raises(ValueError, match="format_version 99"):
        load_trainables(model, tmp_path / "ok")
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "ok" / "trainables.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_trainables(model, tmp_path / "ok")
