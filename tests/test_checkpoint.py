"""Saving and loading adapters: our safetensors + JSON format, peft's layout for LoRA (both directions),
and clear errors for damaged or mismatched checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from moka_train.adapters import (
    FORMAT_VERSION,
    AdapterConfig,
    available_methods,
    get_adapter_config,
    get_method,
    inject_adapters,
    load_adapter,
    save_adapter,
    set_active_modalities,
    set_routing,
)
from tests.helpers import VOCAB, randomize_adapters, routing_batch, tiny_llama

LAYOUTS = [[("text", 2), ("visual", 4), ("audio", 3), ("question", 3), ("text", 2)]]


def inputs():
    ids, question, mask = routing_batch(LAYOUTS)
    tokens = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(0))
    return tokens, ids, question, mask


def logits(model, tokens, ids, question, mask):
    if hasattr(model, "_moka_adapter"):
        set_routing(model, ids, question)
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits


@pytest.mark.parametrize("method", available_methods())
def test_round_trip_gives_identical_outputs(method, tmp_path):
    cfg = AdapterConfig(
        method=method,
        cross_attn_lambda={"visual": 0.5, "audio": 2.0},
        attn_scale="rank",
        scaling_position="before_attention",
        dropout=0.05,
    )
    model = inject_adapters(tiny_llama(), cfg)
    randomize_adapters(model)
    set_active_modalities(model, ["text"])  # a runtime switch: must not be saved
    save_adapter(model, tmp_path)
    set_active_modalities(model, None)
    loaded = load_adapter(tiny_llama(), tmp_path)
    batch = inputs()
    want = logits(model, *batch)
    assert (want - logits(tiny_llama(), *batch)).abs().max() > 1e-3
    assert torch.equal(logits(loaded, *batch), want)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    if get_method(method).peft_layout:
        assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 16
        assert saved["use_dora"] == (method == "dora")
    else:
        assert saved["format_version"] == FORMAT_VERSION
        assert saved["method"] == method and saved["cross_attn_lambda"] == {"visual": 0.5, "audio": 2.0}
        assert (
            AdapterConfig.from_dict({k: v for k, v in saved.items() if k not in ("library", "base_model_name_or_path")})
            == cfg
        )
        assert "active" not in json.dumps(saved)


def test_parameter_names_are_the_contract(tmp_path):
    save_adapter(inject_adapters(tiny_llama(), AdapterConfig(method="moka")), tmp_path / "moka")
    names = set(load_file(tmp_path / "moka" / "adapter_model.safetensors"))
    prefix = "model.layers.0.self_attn.q_proj."
    assert {
        f"{prefix}lora_A.text.weight",
        f"{prefix}lora_A.visual.weight",
        f"{prefix}lora_A.audio.weight",
        f"{prefix}lora_B.weight",
    } <= names
    assert len(names) == 2 * 7 * 4
    save_adapter(inject_adapters(tiny_llama(), AdapterConfig(method="uni_lora")), tmp_path / "uni")
    names = set(load_file(tmp_path / "uni" / "adapter_model.safetensors"))
    assert f"{prefix}lora_B.visual.weight" in names and len(names) == 2 * 7 * 6


def test_lora_checkpoint_loads_in_peft(tmp_path):
    model = inject_adapters(tiny_llama(), AdapterConfig(method="lora"))
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    tokens, _, _, mask = inputs()
    with torch.no_grad():
        want = model(input_ids=tokens, attention_mask=mask).logits
        got = peft_model(input_ids=tokens, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - tiny_llama()(input_ids=tokens, attention_mask=mask).logits).abs().max() > 1e-3


def test_lora_on_a_bf16_backbone_equals_peft(tmp_path):
    """fp32 adapter on a bf16 backbone (no autocast): peft adds the fp32 delta to the bf16 output and rounds
    once; rounding the delta first differs in about a quarter of a layer's outputs."""
    model = inject_adapters(tiny_llama().to(torch.bfloat16), AdapterConfig(method="lora"))
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path)
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    tokens, _, _, mask = inputs()
    with torch.no_grad():
        want = peft_model(input_ids=tokens, attention_mask=mask).logits
        got = model(input_ids=tokens, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _saved(tmp_path, method="moka"):
    model = inject_adapters(tiny_llama(), AdapterConfig(method=method))
    save_adapter(model, tmp_path)
    return tmp_path


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path)
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(tiny_llama(), tmp_path)


def test_truncated_weights_are_an_error(tmp_path):
    path = _saved(tmp_path) / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        load_adapter(tiny_llama(), tmp_path)


def test_missing_and_mis_shaped_keys_are_named(tmp_path):
    path = _saved(tmp_path) / "adapter_model.safetensors"
    weights = load_file(path)
    dropped = "model.layers.1.mlp.down_proj.lora_B.weight"
    save_file({k: v for k, v in weights.items() if k != dropped}, path)
    with pytest.raises(ValueError, match="1 missing keys.*down_proj"):
        load_adapter(tiny_llama(), tmp_path)
    weights[dropped] = torch.zeros(3, 3)
    save_file(weights, path)
    with pytest.raises(ValueError, match="down_proj.lora_B.weight has shape"):
        load_adapter(tiny_llama(), tmp_path)


def test_config_errors_are_named(tmp_path):
    config_path = _saved(tmp_path) / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**raw, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="format_version"):
        load_adapter(tiny_llama(), tmp_path)
    config_path.write_text(json.dumps({**raw, "lora_rank": 3}))
    with pytest.raises(ValueError, match=r"adapter_config.json: unknown AdapterConfig fields \['lora_rank'\]"):
        load_adapter(tiny_llama(), tmp_path)
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("method", available_methods())
def test_loads_into_a_model_already_carrying_the_same_adapter(method, tmp_path):
    # What evaluation and stage.init_from do: build the model with the run's adapter, then load the weights. The
    # default target_modules are not in sorted order, and peft's layout (LoRA's) stores them sorted.
    cfg = AdapterConfig(method=method)
    assert cfg.target_modules != sorted(cfg.target_modules)
    model = inject_adapters(tiny_llama(), cfg)
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(inject_adapters(tiny_llama(), AdapterConfig(method=method)), tmp_path)
    batch = inputs()
    assert torch.equal(logits(loaded, *batch), logits(model, *batch))


def test_loading_into_a_model_with_another_adapter_is_refused(tmp_path):
    _saved(tmp_path, "moka")
    with pytest.raises(ValueError, match="different adapter"):
        load_adapter(inject_adapters(tiny_llama(), AdapterConfig(method="naive")), tmp_path)


def test_unsupported_peft_options_are_refused(tmp_path):
    config_path = _saved(tmp_path, "lora") / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**raw, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("alora_invocation_tokens", [5, 6]),  # activated LoRA: the delta only from the invocation tokens on
        ("use_qalora", True),
        ("exclude_modules", ["model.layers.0.self_attn.q_proj"]),
        ("a_later_peft_option", {"enabled": True}),  # an option this code does not know is refused when set
    ],
)
def test_peft_options_that_change_the_forward_are_refused(tmp_path, option, value):
    config_path = _saved(tmp_path, "lora") / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**raw, option: value}))
    with pytest.raises(ValueError, match=f"peft option {option}=.*not supported"):
        load_adapter(tiny_llama(), tmp_path)


def test_peft_initialisation_options_load(tmp_path):
    """An init scheme (EVA, LoftQ, ...) is in the saved weights already; unset future options are fine."""
    config_path = _saved(tmp_path, "lora") / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**raw, "eva_config": {"rho": 2.0}, "a_later_peft_option": None}))
    assert get_adapter_config(load_adapter(tiny_llama(), tmp_path)).method == "lora"
