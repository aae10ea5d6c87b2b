"""Bad input gets a clear error naming what is wrong."""

from __future__ import annotations

import pytest
import torch

from moka_train.adapters import (
    AdapterConfig,
    RoutingError,
    inject_adapters,
    set_active_modalities,
    set_routing,
)
from moka_train.modality import Modality
from tests.helpers import routing_batch, tiny_llama

LAYOUT = [[("text", 2), ("visual", 3), ("question", 2), ("text", 1)]]


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown adapter method 'mokaa'; known methods: .*moka"):
        AdapterConfig(method="mokaa")


def test_unknown_target_module_is_named_with_the_available_ones():
    with pytest.raises(ValueError, match=r"\['qq_proj'\] match no nn.Linear .*'q_proj'"):
        inject_adapters(tiny_llama(), AdapterConfig(target_modules=["q_proj", "qq_proj"]))


def test_target_that_is_not_a_linear():
    with pytest.raises(TypeError, match="'model.embed_tokens' is a Embedding"):
        inject_adapters(tiny_llama(), AdapterConfig(target_modules=["embed_tokens"]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": {"text": 4, "visual": 2, "audio": 4}}, "takes one rank"),
        ({"method": "uni_lora", "rank": {"text": 4}}, r"missing \['visual', 'audio'\]"),
        ({"modalities": ["visual", "audio"]}, "needs 'text'"),
        ({"modalities": ["text", "smell"]}, "unknown modality 'smell'"),
        ({"attn_scale": "sqrt"}, "attn_scale must be one of"),
        ({"scaling_position": "after_a"}, "scaling_position must be one of"),
        ({"cross_attn_lambda": {"speech": 1.0}}, r"names modalities \['speech'\]"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"alpha": float("nan")}, "alpha must be a positive number"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kwargs)


def test_no_routing_bound():
    model = inject_adapters(tiny_llama(), AdapterConfig(method="moka"))
    with pytest.raises(RoutingError, match=r"no routing bound.*set_routing\(model, None\)"):
        model(input_ids=torch.tensor([[5, 6, 7]]))
    set_routing(model, None)  # pure text is explicit
    model(input_ids=torch.tensor([[5, 6, 7]]))


def test_lora_needs_no_routing_but_partial_modality_does():
    model = inject_adapters(tiny_llama(), AdapterConfig(method="lora"))
    model(input_ids=torch.tensor([[5, 6, 7]]))
    set_active_modalities(model, ["visual"])
    with pytest.raises(RoutingError, match="partial-modality inference ran with no routing"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_mismatched_routing_shapes():
    model = inject_adapters(tiny_llama(), AdapterConfig(method="moka"))
    ids, question, _ = routing_batch(LAYOUT)
    with pytest.raises(ValueError, match=r"question_mask shape \(1, 7\) does not match modality_ids shape \(1, 8\)"):
        set_routing(model, ids, question[:, :-1])
    with pytest.raises(ValueError, match=r"modality_ids must be a \[batch, length\] tensor"):
        set_routing(model, ids[0], question[0])
    set_routing(model, ids, question)
    with pytest.raises(RoutingError, match="routing covers 8 positions but the input has 5"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long))
    set_routing(model, ids.repeat(2, 1), question.repeat(2, 1))
    with pytest.raises(RoutingError, match="routing has batch 2 but the input has batch 3"):
        model(input_ids=torch.ones(3, 8, dtype=torch.long))


def test_bad_routing_values_and_types():
    model = inject_adapters(tiny_llama(), AdapterConfig(method="moka"))
    ids, question, _ = routing_batch(LAYOUT)
    with pytest.raises(ValueError, match=r"unknown modality ids \[7\]"):
        set_routing(model, ids.masked_fill(ids == 1, 7), question)
    with pytest.raises(ValueError, match=r"modalities \['speech'\] that this adapter has no A for"):
        set_routing(model, ids.masked_fill(ids == 1, int(Modality.SPEECH)), question)
    with pytest.raises(ValueError, match="modality_ids must be an integer tensor"):
        set_routing(model, ids.float(), question)
    with pytest.raises(ValueError, match="question_mask must be a bool tensor"):
        set_routing(model, ids, question.long())
    with pytest.raises(ValueError, match="question_mask marks a non-text token .sample 0, position 2"):
        set_routing(model, ids, question | (ids == 1))
    with pytest.raises(ValueError, match="active modalities \\['speech'\\]"):
        set_active_modalities(model, ["speech"])


def test_double_injection_is_refused():
    model = inject_adapters(tiny_llama(), AdapterConfig(method="moka"))
    with pytest.raises(ValueError, match="already carries adapters"):
        inject_adapters(model, AdapterConfig(method="lora"))


def test_set_routing_on_a_plain_model():
    with pytest.raises(ValueError, match="carries no adapters"):
        set_routing(tiny_llama(), None)


def test_context_managers_restore_state():
    """``with routing(...)`` unbinds on exit (a later forward raises instead of reusing stale routing);
    ``with active_modalities(...)`` restores the previous choice."""
    from moka_train.adapters import active_modalities, routing

    model = inject_adapters(tiny_llama(), AdapterConfig(method="moka"))
    ids, question, _ = routing_batch(LAYOUT)
    tokens = torch.full(ids.shape, 5)
    with routing(model, ids, question):
        model(input_ids=tokens)
    with pytest.raises(RoutingError, match="no routing bound"):
        model(input_ids=tokens)
    state = model._moka_adapter.routing
    set_active_modalities(model, ["visual"])
    with active_modalities(model, ["text", "audio"]):
        assert [m.key for m in state.active] == ["text", "audio"]
    assert [m.key for m in state.active] == ["visual"]
