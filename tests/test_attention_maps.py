"""MokA's cross-attention maps: the weights of the attention path against a softmax by hand, the recorded maps against
a softmax computed by hand from a layer's input and its A matrices, recording leaves the outputs unchanged, and
scripts/attention_maps.py end to end on a tiny trained run (its question tokens spell the record's question)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra.utils import instantiate

from moka_train.adapters import AdapterConfig, inject_adapters, set_routing
from moka_train.adapters.lowrank import cross_attend, cross_attend_with_weights, gather_tokens
from moka_train.evaluation.attention_maps import CrossAttentionRecorder, layer_index, select_layers
from moka_train.evaluation.runner import UsageError
from moka_train.modality import Modality
from moka_train.models.tokenizer import build_demo_tokenizer
from tests.helpers import VOCAB, loaded_script, position_ids, randomize_adapters, routing_batch, tiny_llama
from tests.launch import ROOT
from tests.test_lowrank import key_slots
from tests.trained_runs import compose_config

SCRIPT = ROOT / "scripts" / "attention_maps.py"


def test_the_attention_weights_are_the_softmax_over_each_samples_keys():
    torch.manual_seed(0)
    slots = key_slots()  # sample 0: keys at 1, 2, 5; sample 1: none; sample 2: 1-5
    a = torch.randn(3, 7, 4)
    keys = gather_tokens(a, slots.index)
    scale = slots.count.clamp(min=1).float().rsqrt().view(-1, 1, 1)
    attended, weights = cross_attend_with_weights(a, keys, slots, scale)
    torch.testing.assert_close(attended, cross_attend(a, keys, slots, scale), atol=1e-6, rtol=1e-5)
    assert weights.shape == (3, 7, 5)
    torch.testing.assert_close(weights[[0, 2]].sum(-1), torch.ones(2, 7))
    assert torch.all(weights[0, :, 3:] == 0)  # sample 0 has 3 keys: its other slots get no weight
    assert torch.all(attended[1] == 0)  # no key: nothing attended
    # Sample 0, token 4, by hand.
    k = a[0, [1, 2, 5]]
    expected = torch.softmax(a[0, 4] @ k.T / math.sqrt(3), dim=-1)
    torch.testing.assert_close(weights[0, 4, :3], expected)


LAYOUTS = [
    [("text", 2), ("visual", 3), ("audio", 2), ("question", 4), ("text", 1)],
    [("text", 1), ("audio", 3), ("question", 2)],
]


def moka_model(method: str = "moka"):
    model = inject_adapters(tiny_llama(layers=2), AdapterConfig(method=method, rank=4, alpha=16))
    randomize_adapters(model)
    return model


def run_forward(model, embeds):
    ids, question, attention = routing_batch(LAYOUTS)
    set_routing(model, ids, question)
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids(attention)).logits


def test_recorded_maps_are_the_softmax_of_each_media_token_over_the_question():
    torch.manual_seed(1)
    model = moka_model()
    embeds = torch.randn(2, 12, 64)
    input_ids = torch.randint(3, VOCAB, (2, 12))
    name = "model.layers.1.self_attn.v_proj"
    layer = dict(model.named_modules())[name]
    captured = {}

    def keep_input(module, args, output):  # returns None: a hook's return value would replace the output
        captured["x"] = args[0].detach()

    layer.register_forward_hook(keep_input)
    recorded = select_layers(model, layers=[1], projections=["v_proj"])
    assert list(recorded) == [name]
    tokenizer = build_demo_tokenizer()
    with CrossAttentionRecorder(recorded) as recorder:
        run_forward(model, embeds)
    maps = recorder.maps(tokenizer, input_ids)
    assert layer.attention_recorder is None  # removed on leaving

    x = captured["x"]
    ids, question, _ = routing_batch(LAYOUTS)
    A = {m: layer.lora_A[m].weight for m in ("text", "visual", "audio")}
    for sample in range(2):
        q = question[sample].nonzero().flatten()
        keys = x[sample, q] @ A["text"].T
        assert maps[sample].question_tokens == [tokenizer.decode([int(input_ids[sample, p])]) for p in q]
        expected = {}
        for modality in ("visual", "audio"):
            positions = (ids[sample] == int(Modality.parse(modality))).nonzero().flatten()
            if len(positions):
                rows = [torch.softmax(x[sample, i] @ A[modality].T @ keys.T / math.sqrt(len(q)), -1) for i in positions]
                expected[modality] = torch.stack(rows).mean(0)
        assert sorted(maps[sample].weights) == sorted(expected)  # sample 1 has no visual row
        for modality, weights in expected.items():
            torch.testing.assert_close(torch.tensor(maps[sample].weights[modality]), weights, atol=1e-5, rtol=1e-4)


def test_recording_leaves_the_outputs_unchanged_and_averages_over_layers():
    torch.manual_seed(2)
    model = moka_model()
    embeds = torch.randn(2, 12, 64)
    plain = run_forward(model, embeds)
    every = select_layers(model)
    assert len(every) == 2 * 7  # 2 layers x 7 target modules
    with CrossAttentionRecorder(every) as recorder:
        recorded = run_forward(model, embeds)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    maps = recorder.maps(build_demo_tokenizer(), torch.randint(3, VOCAB, (2, 12)))
    for sample in maps:
        for weights in sample.weights.values():
            assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    with CrossAttentionRecorder(every) as recorder:  # a second forward without reset() is refused
        run_forward(model, embeds)
        with pytest.raises(RuntimeError, match="two forwards"):
            run_forward(model, embeds)


def test_layer_selection_names_what_does_not_exist():
    model = moka_model()
    assert layer_index("model.layers.12.mlp.down_proj") == 12 and layer_index("lm_head") is None
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist; the adapted decoder layers are \[0, 1\]"):
        select_layers(model, layers=[5])
    with pytest.raises(ValueError, match=r"projections \['qproj'\] carry no MokA layer"):
        select_layers(model, projections=["qproj"])
    for method in ("lora", "naive", "moka_no_ca", "text_query"):
        with pytest.raises(ValueError, match=f"adapter is '{method}'"):
            select_layers(moka_model(method))


def test_the_script_maps_the_question_of_each_record(demo_runs, tmp_path):
    overrides = [
        f"run_dir={demo_runs['moka']}", "samples=4", "layers=[1]", "projections=[q_proj,v_proj]",
        f"out_dir={tmp_path}", "batch_size=3", "progress=false",
    ]  # fmt: skip
    with loaded_script(SCRIPT) as script:
        written = script.map_attention(compose_config("attention_maps", overrides))
    summary = json.loads((tmp_path / "attention_maps.json").read_text())
    assert summary["maps"] == written and len(written) == 4
    assert summary["recorded_layers"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    # The records as the demo data config builds them: the question span is the prompt's, independent of the maps.
    data = compose_config("train", ["experiment=demo", f"data.builder.root={demo_runs['data']}"]).data
    data.builder.split = "test"
    by_id = {r.id: r for r in instantiate(data.builder)}
    for entry in written:
        record = by_id[entry["id"]]
        user = record.messages[-2]["content"] if record.messages[-1]["role"] == "assistant" else None
        start, end = record.question_span
        assert "".join(entry["question_tokens"]) == user[start:end]
        assert sorted(entry["weights"]) == ["audio", "visual"]
        for weights in entry["weights"].values():
            assert len(weights) == len(entry["question_tokens"])
            assert sum(weights) == pytest.approx(1.0, abs=1e-4)
        assert (tmp_path / entry["image"]).read_bytes()[:4] == b"\x89PNG"

    moka = f"run_dir={demo_runs['moka']}"
    refused = {
        "adapter is 'lora'": [f"run_dir={demo_runs['lora']}"],
        r"ids \['music_avqa/test/nope'\] are not in this data": [moka, "ids=[music_avqa/test/nope]"],
        "layers must be a non-empty list": [moka, "layers=[]"],
    }
    with loaded_script(SCRIPT) as script:
        for message, settings in refused.items():
            with pytest.raises(UsageError, match=message):
                script.map_attention(compose_config("attention_maps", [*settings, f"out_dir={tmp_path / 'x'}"]))
