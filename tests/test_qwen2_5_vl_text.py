"""Qwen2.5-VL's language model loaded as a Qwen2ForCausalLM: the same logits and greedy generations as the VL
model on text, from every checkpoint layout (transformers 5's two save formats, the released hub layout with
top-level text fields and shards, tied embeddings), and loud failures on checkpoints that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

from moka_train.models.qwen2_5_vl_text import load_qwen2_5_vl_language_model
from tests.helpers import position_ids

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
# head_dim 16 -> 8 rotary frequencies, split 2 / 3 / 3 between the temporal, height and width components.
MROPE_SECTION = [2, 3, 3]
ROPE_THETA = 50_000.0  # neither Qwen2's default (1e4) nor Qwen2.5-VL's (1e6), so a dropped theta shows
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # logits far enough apart that greedy decoding has no near-ties
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0])
SPECIAL_TOKENS = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)


def tiny_vl(tie: bool = False, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    config = Qwen2_5_VLConfig(
        text_config={
            **TEXT,
            "rope_parameters": {"rope_type": "default", "mrope_section": MROPE_SECTION, "rope_theta": ROPE_THETA},
        },
        vision_config=VISION,
        tie_word_embeddings=tie,
        **SPECIAL_TOKENS,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Biases start at zero and norms at one: random ones make a misplaced bias or norm show in the logits.
        for parameter in model.model.language_model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


@pytest.fixture(scope="module")
def vl_model() -> Qwen2_5_VLForConditionalGeneration:
    return tiny_vl()


def saved_keys(directory: Path, name: str = "model.safetensors") -> set[str]:
    with safe_open(directory / name, framework="pt") as handle:
        return set(handle.keys())


def text_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of lengths 9 and 5, the shorter one left-padded."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = PAD, 0
    return ids, mask


def assert_same_logits(vl: Qwen2_5_VLForConditionalGeneration, lm: Qwen2ForCausalLM) -> None:
    ids, mask = text_batch()
    with torch.no_grad():
        # Unpadded, no positions given: both count positions from 0.
        want = vl(input_ids=ids[:1]).logits
        torch.testing.assert_close(lm(input_ids=ids[:1]).logits, want, rtol=0, atol=1e-5)
        # Left-padded with positions from the mask, as generation computes them: the VL model broadcasts the
        # 2-D positions to its three M-RoPE components.
        positions = position_ids(mask)
        want = vl(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
        # And the padded sample matches itself run alone, so the padding comparison is about the right positions.
        alone = lm(input_ids=ids[1:, 4:]).logits[0]
        torch.testing.assert_close(got[1, 4:], alone, rtol=0, atol=1e-5)


def test_transformers_5_default_save_is_released_layout(vl_model, tmp_path):
    vl_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    keys = saved_keys(tmp_path)
    # transformers 5 nests the text fields in the config but writes the weights back in the released layout.
    assert config["text_config"]["rope_parameters"]["mrope_section"] == MROPE_SECTION
    assert "hidden_size" not in config
    assert "model.layers.0.self_attn.q_proj.bias" in keys
    assert any(key.startswith("visual.") for key in keys)
    assert not any(key.startswith("model.language_model.") for key in keys)

    lm = load_qwen2_5_vl_language_model(tmp_path, dtype=torch.float32)
    assert type(lm) is Qwen2ForCausalLM
    assert lm.config.rope_parameters == {"rope_type": "default", "rope_theta": ROPE_THETA}
    assert lm.config.rms_norm_eps == 1e-6
    assert not lm.config.tie_word_embeddings
    assert_same_logits(vl_model, lm)


def test_nested_key_layout(vl_model, tmp_path):
    vl_model.save_pretrained(tmp_path, save_original_format=False)
    keys = saved_keys(tmp_path)
    assert "model.language_model.layers.1.mlp.down_proj.weight" in keys
    assert any(key.startswith("model.visual.") for key in keys)
    assert_same_logits(vl_model, load_qwen2_5_vl_language_model(tmp_path, dtype=torch.float32))


def hub_config(config: Qwen2_5_VLConfig) -> dict:
    """config.json as the released checkpoints have it: text fields at the top level, M-RoPE as rope_scaling."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **TEXT,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "rope_theta": ROPE_THETA,
        "rope_scaling": {"type": "mrope", "mrope_section": MROPE_SECTION},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "vision_config": {key: getattr(config.vision_config, key) for key in VISION},
        **SPECIAL_TOKENS,
    }


def write_hub_checkpoint(model: Qwen2_5_VLForConditionalGeneration, directory: Path) -> None:
    """The released layout, written by hand: vision tensors alone in the first shard, the language model split
    over the other two, an index naming them."""
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hub_config(model.config)))
    tensors = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        key = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        tensors[key] = tensor.clone().contiguous()
    shards: dict[str, dict[str, torch.Tensor]] = {f"model-0000{n}-of-00003.safetensors": {} for n in (1, 2, 3)}
    for key, tensor in tensors.items():
        n = 1 if key.startswith("visual.") else 2 if key.startswith("model.layers.0.") else 3
        shards[f"model-0000{n}-of-00003.safetensors"][key] = tensor
    weight_map = {}
    for shard, content in shards.items():
        save_file(content, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(content, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_released_hub_layout_sharded(vl_model, tmp_path):
    write_hub_checkpoint(vl_model, tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 3], "pad_token_id": PAD}))
    # The hand-written checkpoint is one transformers itself reads as this model.
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.text_config.rope_parameters["rope_theta"] == ROPE_THETA
    assert_same_logits(reloaded, load_qwen2_5_vl_language_model(tmp_path, dtype=torch.float32))

    # The vision tower's shard is never opened: the language model loads without it.
    (tmp_path / "model-00001-of-00003.safetensors").unlink()
    lm = load_qwen2_5_vl_language_model(tmp_path, dtype=torch.float32)
    assert_same_logits(vl_model, lm)
    assert lm.generation_config.eos_token_id == [EOS, 3]
    assert lm.config.max_window_layers == 28


def test_default_dtype_frozen_eval(vl_model, tmp_path):
    write_hub_checkpoint(vl_model, tmp_path)
    lm = load_qwen2_5_vl_language_model(tmp_path)
    assert not lm.training
    assert {parameter.dtype for parameter in lm.parameters()} == {torch.bfloat16}
    assert not any(parameter.requires_grad for parameter in lm.parameters())
    assert not any(parameter.is_meta for parameter in lm.parameters())
    assert lm.model.rotary_emb.inv_freq.dtype == torch.float32
    assert lm.config.dtype == torch.bfloat16
    want = vl_model.model.language_model.layers[1].self_attn.k_proj.bias.to(torch.bfloat16)
    assert torch.equal(lm.model.layers[1].self_attn.k_proj.bias, want)


@pytest.mark.parametrize("layout", ["transformers", "hub"])
def test_tied_embeddings(layout, tmp_path):
    vl = tiny_vl(tie=True, seed=1)
    assert vl.lm_head.weight is vl.model.language_model.embed_tokens.weight
    if layout == "hub":
        write_hub_checkpoint(vl, tmp_path)
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert "model.norm.weight" in index["weight_map"]
        assert "lm_head.weight" not in index["weight_map"]
    else:
        vl.save_pretrained(tmp_path)
        assert "lm_head.weight" not in saved_keys(tmp_path)
    lm = load_qwen2_5_vl_language_model(tmp_path, dtype=torch.float32)
    assert lm.config.tie_word_embeddings
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert_same_logits(vl, lm)


def rewrite_weights(directory: Path, edit) -> None:
    file = directory / "model.safetensors"
    with safe_open(file, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in sorted(handle.keys())}
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_tied_checkpoint_may_store_an_equal_lm_head_but_not_a_different_one(tmp_path):
    vl_model = tiny_vl(tie=True, seed=1)
    vl_model.save_pretrained(tmp_path)

    def add_copy(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    rewrite_weights(tmp_path, add_copy)
    lm = load_qwen2_5_vl_language_model(tmp_path, dtype=torch.float32)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight

    def change_copy(tensors):
        tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1

    rewrite_weights(tmp_path, change_copy)
    with pytest.raises(ValueError, match="model.safetensors: tie_word_embeddings is true but lm_head.weight differs"):
        load_qwen2_5_vl_language_model(tmp_path)


def test_greedy_generate_matches(vl_model, tmp_path):
    vl_model.save_pretrained(tmp_path)
    lm = load_qwen2_5_vl_language_model(tmp_path, dtype=torch.float32)
    ids, mask = text_batch(seed=3)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        want = vl_model.generate(input_ids=ids, attention_mask=mask, **settings)
        got = lm.generate(input_ids=ids, attention_mask=mask, **settings)
        # The padded prompt continues as it does alone: generation's positions skip the padding in both models.
        alone = lm.generate(input_ids=ids[1:, 4:], **settings)
    assert want.shape == (2, 15)
    assert torch.equal(got, want)
    assert torch.equal(got[1:, 4:], alone)


@pytest.fixture
def saved(vl_model, tmp_path) -> Path:
    vl_model.save_pretrained(tmp_path)
    return tmp_path


def test_missing_directory_config_or_weights(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        load_qwen2_5_vl_language_model(tmp_path / "nowhere")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{saved}: neither model.safetensors nor"):
        load_qwen2_5_vl_language_model(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{saved}: no config.json"):
        load_qwen2_5_vl_language_model(saved)


def test_missing_shard(vl_model, tmp_path):
    write_hub_checkpoint(vl_model, tmp_path)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lists shard model-00002-of-00003.safetensors"):
        load_qwen2_5_vl_language_model(tmp_path)


def test_wrong_model_type(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="model_type is 'qwen2_vl', expected 'qwen2_5_vl'"):
        load_qwen2_5_vl_language_model(saved)


def test_missing_key(saved):
    rewrite_weights(saved, lambda tensors: tensors.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(ValueError, match="model.safetensors: .*missing model.layers.1.post_attention_layernorm.weight"):
        load_qwen2_5_vl_language_model(saved)


def test_untied_checkpoint_without_lm_head(saved):
    rewrite_weights(saved, lambda tensors: tensors.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing lm_head.weight"):
        load_qwen2_5_vl_language_model(saved)


def test_extra_language_model_key(saved):
    def add(tensors):
        tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(128, 64)
        tensors["visual.extra.weight"] = torch.zeros(3)  # the vision tower's keys are not checked

    rewrite_weights(saved, add)
    with pytest.raises(ValueError, match="unexpected language-model keys model.layers.2.mlp.up_proj.weight$"):
        load_qwen2_5_vl_language_model(saved)


def test_both_layouts_at_once(saved):
    def duplicate(tensors):
        tensors["model.language_model.norm.weight"] = tensors["model.norm.weight"].clone()

    rewrite_weights(saved, duplicate)
    with pytest.raises(ValueError, match="held twice .*model.language_model.norm.weight / model.norm.weight"):
        load_qwen2_5_vl_language_model(saved)


def test_wrong_shape(saved):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.v_proj.bias"] = torch.zeros(16)

    rewrite_weights(saved, shrink)
    with pytest.raises(ValueError, match=r"wrong shape .*v_proj.bias \[16\] \(expected \[32\]\)"):
        load_qwen2_5_vl_language_model(saved)
