"""Backbones from local checkpoint directories, the presets in configs/model, tokenizers, the multimodal
special tokens and the chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

from moka_train.data.collate import MultimodalCollator
from moka_train.data.sample import Sample
from moka_train.models.backbones import build_random_backbone, load_backbone
from moka_train.models.chat_templates import set_chat_template
from moka_train.models.tokenizer import (
    add_multimodal_tokens,
    build_demo_tokenizer,
    load_tokenizer,
    multimodal_special_tokens,
)
from tests.reference_files import shared_file

MODEL_PRESETS = sorted((Path(__file__).parents[1] / "configs" / "model").glob("*.yaml"))
TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
IDS = torch.tensor([[5, 17, 200, 3, 99, 1], [7, 7, 8, 300, 2, 4]])


# -- backbones -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_load_backbone_reads_a_saved_checkpoint(model_type, tmp_path):
    original = build_random_backbone(model_type, seed=3, **TINY)
    original.save_pretrained(tmp_path)
    loaded = load_backbone(tmp_path, dtype="fp32")
    assert type(loaded) is type(original)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    torch.testing.assert_close(loaded(IDS).logits, original(IDS).logits, rtol=0, atol=0)
    bf16 = load_backbone(tmp_path, dtype="bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_checkpoint_decoding_defaults_are_not_inherited(tmp_path):
    """Qwen instruct checkpoints ship sampling settings and a repetition penalty; generate must not apply
    them behind the config's back, but the end-of-turn ids must survive."""
    original = build_random_backbone("qwen2", **TINY)
    original.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, repetition_penalty=1.3, eos_token_id=[2, 7], pad_token_id=0
    )
    original.save_pretrained(tmp_path)
    loaded = load_backbone(tmp_path, dtype="fp32")
    config = loaded.generation_config
    assert (config.eos_token_id, config.pad_token_id) == ([2, 7], 0)
    assert not config.do_sample and config.repetition_penalty in (None, 1.0) and config.temperature in (None, 1.0)
    prompt = torch.tensor([[5, 9, 9, 9, 5, 9]])
    greedy = loaded.generate(prompt, max_new_tokens=5, eos_token_id=None)
    steps = prompt
    for _ in range(5):  # greedy by hand: argmax of the full forward, no penalty
        steps = torch.cat([steps, loaded(steps).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, steps)


def test_random_backbones_follow_their_seed():
    a, b, c = (build_random_backbone("llama", seed=s, **TINY) for s in (1, 1, 2))
    assert isinstance(a, LlamaForCausalLM)
    torch.testing.assert_close(a(IDS).logits, b(IDS).logits, rtol=0, atol=0)
    assert not torch.allclose(a(IDS).logits, c(IDS).logits)


def test_backbone_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'absent'}: no config.json"):
        load_backbone(tmp_path / "absent")
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2'; supported"):
        load_backbone(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_backbone(tmp_path, dtype="float8")
    with pytest.raises(ValueError, match="model_type must be one of"):
        build_random_backbone("gpt2")


def test_load_backbone_dispatches_qwen2_5_vl_to_its_language_model(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(TINY, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
    )
    vl = Qwen2_5_VLForConditionalGeneration(config).eval()
    vl.save_pretrained(tmp_path)
    loaded = load_backbone(tmp_path, dtype="fp32")
    assert isinstance(loaded, Qwen2ForCausalLM)
    torch.testing.assert_close(loaded(IDS).logits, vl(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


# -- presets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", MODEL_PRESETS, ids=[p.stem for p in MODEL_PRESETS])
def test_model_preset_instantiates(path, tmp_path):
    """Tiny presets build as they are; the real ones read a local directory, here a tiny checkpoint and
    tokenizer saved in the real format, with the tokenizer's path following the backbone's."""
    preset = OmegaConf.load(path)
    if OmegaConf.is_missing(preset.backbone, "path"):
        build_random_backbone("llama", **TINY).save_pretrained(tmp_path)
        demo = build_demo_tokenizer()
        demo.chat_template = None if path.stem == "llama2_7b_chat" else demo.chat_template
        demo.save_pretrained(tmp_path)
        preset.backbone.path = str(tmp_path)
        preset.backbone.dtype = "fp32"
    backbone, tokenizer = instantiate(preset.backbone), instantiate(preset.tokenizer)
    set_chat_template(tokenizer, preset.chat_template)
    assert backbone.get_input_embeddings().num_embeddings >= len(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is playing?"}], tokenize=False)
    assert "What is playing?" in text


# -- tokenizers ----------------------------------------------------------------------------------------
def test_demo_tokenizer_is_reproducible_and_byte_level():
    a, b = build_demo_tokenizer(), build_demo_tokenizer()
    assert a.get_vocab() == b.get_vocab() and len(a) == 384
    text = "Is the piano louder than the erhu? ünïcode 音乐"
    assert a.decode(a(text)["input_ids"]) == text  # any byte encodes


def test_multimodal_tokens_are_single_special_ids():
    tokenizer = build_demo_tokenizer()
    tokens = add_multimodal_tokens(tokenizer)
    assert list(tokens.ids) == multimodal_special_tokens()
    assert tokens.added_token_ids == list(range(384, 384 + 12))  # appended after the base vocabulary
    assert tokens.placeholder_ids() == {
        "visual": [tokens.ids["<image>"], tokens.ids["<video>"]],
        "audio": [tokens.ids["<audio>"]],
        "speech": [tokens.ids["<speech>"]],
    }
    ids = tokenizer("x<video_start><video><video>piano<video_end>")["input_ids"]
    video = tokens.ids["<video>"]
    assert ids.count(video) == 2 and tokens.ids["<video_start>"] in ids and tokens.ids["<video_end>"] in ids
    assert tokenizer.decode(ids) == "x<video_start><video><video>piano<video_end>"
    assert add_multimodal_tokens(tokenizer) == tokens  # adding again changes nothing


def test_saved_tokenizer_reloads_with_the_same_ids_and_template(tmp_path):
    tokenizer = build_demo_tokenizer()
    tokens = add_multimodal_tokens(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert add_multimodal_tokens(reloaded) == tokens
    assert reloaded.chat_template == tokenizer.chat_template and reloaded.padding_side == "left"
    text = "This is a video: <video_start><video><video_end> Where is the cello?"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_load_tokenizer_pads_with_eos_when_it_has_no_pad(tmp_path):
    tokenizer = build_demo_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token == reloaded.eos_token == "<|im_end|>"
    with pytest.raises(FileNotFoundError, match="tokenizer directory .*absent does not exist"):
        load_tokenizer(tmp_path / "absent")


# -- chat templates ------------------------------------------------------------------------------------
def llama2_tokenizer():
    tokenizer = build_demo_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    set_chat_template(tokenizer, "llama2_official")
    return tokenizer


AVE_QUESTION = "Please describe the events and time range that occurred in the video."
AVE_USER = (
    "This is a video:\n<video_start><video><video_end>\nThis is an audio:\n<audio_start><audio><audio_end>\n"
    + AVE_QUESTION
)


def test_llama2_official_frame_matches_the_documented_prompt():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": AVE_USER},
        {"role": "assistant", "content": "event:Church bell start_time:0 end_time:10"},
    ]
    # moka_reference.md §3: "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n... [/INST]" + "{output}</s>"
    expected = (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n"
        + AVE_USER
        + " [/INST]event:Church bell start_time:0 end_time:10</s>"
    )
    assert llama2_tokenizer().apply_chat_template(messages, tokenize=False) == expected


def test_llama2_official_frame_matches_the_released_predictions():
    """The official repository's released AVE predictions store each prompt and target verbatim; ours is the
    same text without the question markers (the question span is a character span here, not tokens)."""
    record = json.loads(shared_file("samples", "ave", "moka", "inference_ave.jsonl").read_text().splitlines()[0])
    official = record["instruction"] + record["output"]
    ours = llama2_tokenizer().apply_chat_template(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": AVE_USER},
            {"role": "assistant", "content": record["output"].removesuffix("</s>")},
        ],
        tokenize=False,
    )
    assert ours == official.replace("<question_start>", "").replace("<question_end>", "")


def test_llama2_frame_later_turns_and_prompt_only():
    tokenizer = llama2_tokenizer()
    turns = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert tokenizer.apply_chat_template(turns, tokenize=False) == "<s>[INST] Q1 [/INST]A1</s><s>[INST] Q2 [/INST]"
    with pytest.raises(Exception, match="system message may only be the first"):
        tokenizer.apply_chat_template([*turns, {"role": "system", "content": "late"}], tokenize=False)


def test_llama2_chat_matches_the_official_visual_text_format():
    """Table 2's LLaMA-2 runs: the official visual-text code sets Llama-2-chat's own template, where the answer is
    framed by spaces (" {answer} </s>") and every turn's content is stripped; the prompt ends at " [/INST]", so
    the collator supervises exactly " {answer} </s>"."""
    tokenizer = build_demo_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    add_multimodal_tokens(tokenizer)
    set_chat_template(tokenizer, "llama2_chat")
    user = "This is an image:\n<image_start><image><image_end>\nPlease answer this question: What is it?"
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": user + "\n"},
        {"role": "assistant", "content": "A cat."},
    ]
    prompt = "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n" + user + " [/INST]"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == prompt + " A cat. </s>"
    assert tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == prompt
    turns = [
        {"role": "user", "content": " Q1"},
        {"role": "assistant", "content": "A1 "},
        {"role": "user", "content": "Q2"},
    ]
    assert tokenizer.apply_chat_template(turns, tokenize=False) == "<s>[INST] Q1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
    with pytest.raises(Exception, match="must alternate"):
        tokenizer.apply_chat_template([turns[0], turns[0]], tokenize=False)
    text_only = [messages[0], {"role": "user", "content": "What is it?"}, messages[2]]  # a Sample's media must exist
    text, prompt_end, response_end = MultimodalCollator(tokenizer, {}).render(Sample("s", text_only, None))
    assert text[:prompt_end].endswith("What is it? [/INST]") and text[prompt_end:response_end] == " A cat. </s>"


def test_chatml_and_template_choice_errors():
    tokenizer = build_demo_tokenizer()
    set_chat_template(tokenizer, "tokenizer")  # keeps its own ChatML
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="ships no chat template"):
        set_chat_template(tokenizer, "tokenizer")
    with pytest.raises(ValueError, match="unknown chat_template 'vicuna'"):
        set_chat_template(tokenizer, "vicuna")
