"""moka_train.official_import and scripts/import_official.py: state dicts built here in the official naming
(GeWu-Lab/MokA AudioVisualText peft_hyper, VisualText modified_peft, Crab's BERT-style Q-Former), converted,
loaded into our model and checked against the official formulas, transcribed here from the official code
(moka_reference.md sections 2a, 2b, 3), in float64."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import Tensor

from moka_train.adapters import adapted_layers, inject_adapters, set_routing
from moka_train.adapters.checkpoint import load_adapter_weights, read_adapter_config
from moka_train.adapters.config import DEFAULT_TARGET_MODULES
from moka_train.models.backbones import build_random_backbone
from moka_train.models.build import build_multimodal_lm
from moka_train.models.projector import QFormerProjector
from moka_train.models.tokenizer import build_demo_tokenizer
from moka_train.models.trainables import load_trainables
from moka_train.official_import import (
    SKIP_EMBEDDINGS,
    SKIP_FROZEN_ENCODER,
    SKIP_FROZEN_LLM,
    SKIP_QFORMER_HEAD,
    SKIP_QFORMER_TEXT,
    SKIP_VT_IMAGE_B,
    OfficialImportError,
    OfficialStateDict,
    convert_avt,
    convert_crab_projectors,
    convert_vt,
)
from tests.helpers import loaded_script, routing_batch

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "import_official.py"
LLM = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
RANK = 4
AVT_LLM = "base_model.model.model."  # PeftModel -> LoraModel -> UnifiedForCausalLM -> LlamaModel
VT_LLM = "base_model.model.model.language_model."  # PeftMixedModel -> LLaVA (transformers 4.53) -> LlamaModel
# A tiny projector: Q-Former width 32, 4 heads, 2 layers, 4 queries; features 16 (visual) / 12 (audio) wide.
QF = dict(hidden=32, heads=4, intermediate=48, queries=4, layers=2)
ENCODER_WIDTHS = {"visual": 16, "audio": 12}


def randn(generator: torch.Generator, *shape: int, std: float = 0.3) -> Tensor:
    return torch.randn(*shape, generator=generator) * std


def llama_linears(backbone) -> dict[str, torch.nn.Linear]:
    """``layers.N.<block>.<proj>`` -> the linear, for every projection MokA adapts."""
    return {
        name.removeprefix("model."): module
        for name, module in backbone.named_modules()
        if name.rpartition(".")[2] in DEFAULT_TARGET_MODULES
    }


def backbone64(seed: int = 0):
    return build_random_backbone("llama", seed=seed, **LLM).double()


# -- official state dicts -------------------------------------------------------------------------------------
def official_avt_lora(backbone, seed: int = 1, rank: int = RANK) -> dict[str, Tensor]:
    """``adapter_model.bin`` as peft_hyper saves it: per linear lora_A0 (text), A1 (video), A2 (audio), B0."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path, linear in llama_linears(backbone).items():
        for i in range(3):
            state[f"{AVT_LLM}{path}.lora_A{i}.weight"] = randn(g, rank, linear.in_features)
        state[f"{AVT_LLM}{path}.lora_B0.weight"] = randn(g, linear.out_features, rank)
    return state


def official_vt_state(backbone, seed: int = 2) -> dict[str, Tensor]:
    """A VT full save (HF Trainer on the PeftMixedModel): LoRA ``text`` / ``image``, frozen base layers, other
    frozen LLM and CLIP weights, and the projector."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path, linear in llama_linears(backbone).items():
        for adapter in ("text", "image"):
            state[f"{VT_LLM}{path}.lora_A.{adapter}.weight"] = randn(g, RANK, linear.in_features)
            state[f"{VT_LLM}{path}.lora_B.{adapter}.weight"] = randn(g, linear.out_features, RANK)
        state[f"{VT_LLM}{path}.base_layer.weight"] = linear.weight.detach().float().clone()
    state[f"{VT_LLM}embed_tokens.weight"] = randn(g, 8, LLM["hidden_size"])
    state[f"{VT_LLM}layers.0.input_layernorm.weight"] = torch.ones(LLM["hidden_size"])
    state[f"{VT_LLM}norm.weight"] = torch.ones(LLM["hidden_size"])
    state["base_model.model.lm_head.weight"] = randn(g, 8, LLM["hidden_size"])
    state["base_model.model.model.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(4)
    projector = bert_projector("visual", ENCODER_WIDTHS["visual"], LLM["hidden_size"], seed=seed + 1)
    state.update({f"base_model.model.model.multi_modal_projector.{k}": v for k, v in projector.items()})
    return state


def bert_projector(stem: str, encoder_width: int, llm_width: int, seed: int) -> dict[str, Tensor]:
    """A ``VLProjector`` / ``ALProjector`` state dict (LAVIS BertLMHeadModel Q-Former), every tensor distinct."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter, queries = QF["hidden"], QF["intermediate"], QF["queries"]

    def linear(prefix: str, out: int, inp: int) -> dict[str, Tensor]:
        return {f"{prefix}.weight": randn(g, out, inp, std=inp**-0.5), f"{prefix}.bias": randn(g, out, std=0.1)}

    def norm(prefix: str, width: int) -> dict[str, Tensor]:
        return {f"{prefix}.weight": 1 + randn(g, width, std=0.1), f"{prefix}.bias": randn(g, width, std=0.1)}

    q = f"{stem}_Qformer.bert."
    state = {
        **norm(f"{stem}_ln", encoder_width),
        f"{stem}_query_tokens": randn(g, 1, queries, hidden, std=1.0),
        **linear(f"{stem}_proj.0", llm_width, hidden),
        **linear(f"{stem}_proj.2", llm_width, llm_width),
        f"{q}embeddings.word_embeddings.weight": randn(g, 30, hidden),
        f"{q}embeddings.position_embeddings.weight": randn(g, 16, hidden),
        f"{q}embeddings.position_ids": torch.arange(16).unsqueeze(0),
        **norm(f"{q}embeddings.LayerNorm", hidden),
        f"{stem}_Qformer.cls.predictions.bias": randn(g, 30),
        **linear(f"{stem}_Qformer.cls.predictions.transform.dense", hidden, hidden),
        f"{stem}_Qformer.cls.predictions.decoder.weight": randn(g, 30, hidden),
    }
    for n in range(QF["layers"]):
        layer = f"{q}encoder.layer.{n}."
        for attention, width in (("attention", hidden), ("crossattention", encoder_width)):
            state.update(linear(f"{layer}{attention}.self.query", hidden, hidden))
            state.update(linear(f"{layer}{attention}.self.key", hidden, width))
            state.update(linear(f"{layer}{attention}.self.value", hidden, width))
            state.update(linear(f"{layer}{attention}.output.dense", hidden, hidden))
            state.update(norm(f"{layer}{attention}.output.LayerNorm", hidden))
        for ffn in ("", "_query"):  # the text tokens' feed-forward and the queries'
            state.update(linear(f"{layer}intermediate{ffn}.dense", inter, hidden))
            state.update(linear(f"{layer}output{ffn}.dense", hidden, inter))
            state.update(norm(f"{layer}output{ffn}.LayerNorm", hidden))
    return state


def crab_stage1(llm_width: int = 24) -> dict[str, Tensor]:
    """Crab's visual_pretrain.bin and audio_pretrain.bin merged: the projectors and the whole embedding matrix."""
    state = {"model.embed_tokens.weight": torch.zeros(40, llm_width)}
    for owner, stem, seed in (("vl_projector", "visual", 10), ("al_projector", "audio", 11)):
        projector = bert_projector(stem, ENCODER_WIDTHS[stem], llm_width, seed)
        state.update({f"model.{owner}.{k}": v for k, v in projector.items()})
    return state


# -- the official formulas, transcribed -----------------------------------------------------------------------
def official_avt_linear(x, weight, lora, masks, alpha: float, blc_weight: float, attn_scale: str) -> Tensor:
    """peft_hyper ``Linear.forward`` (training / prefill path), its loops kept: each A on the masked input times
    s = alpha / r; video and audio queries attend to the question slice ``[first, last]`` of ``a_text * mask_q``
    with 1/sqrt(N_t) (to 2025-12-27) or 1/sqrt(r) (from 2025-12-28); ``h = W0 x + B0(a_t + a_v' + a_a')``."""
    A = [lora[f"lora_A{i}.weight"] for i in range(3)]
    B0 = lora["lora_B0.weight"]
    text_mask, video_mask, audio_mask, question_mask = masks
    s = alpha / A[0].shape[0]
    result = x @ weight.T
    only_inputs = [x * text_mask, x * video_mask, x * audio_mask]
    output_a = [(only_inputs[i] @ A[i].T) * s for i in range(3)]
    question_token = output_a[0] * question_mask
    new = []
    for token, mask in ((output_a[1], video_mask), (output_a[2], audio_mask)):
        new_token = torch.zeros_like(token)
        for i in range(x.shape[0]):
            indices = torch.where(question_mask[i, :, 0] == 1)[0]
            key = question_token[i, indices[0] : indices[-1] + 1]
            d = float(question_mask[i].sum()) if attn_scale == "question_tokens" else A[0].shape[0]
            score = torch.softmax(token[i] @ key.T / math.sqrt(d), dim=-1)
            new_token[i] = token[i] + mask[i] * (score @ key) * blc_weight
        new.append(new_token)
    return result + (output_a[0] + new[0] + new[1]) @ B0.T


def official_vt_linear(x, weight, lora, text_mask, image_mask, question_mask, attn_weight: float, alpha: float):
    """modified_peft ``Linear.forward``: text / image tokens through their own A, image tokens attend to the
    question tokens (1/sqrt(r), weight ``attn_weight``), every token through ``lora_B['text']`` times s."""
    A_text, A_image, B_text = lora["lora_A.text.weight"], lora["lora_A.image.weight"], lora["lora_B.text.weight"]
    r = A_text.shape[0]
    result = x @ weight.T
    a = torch.zeros(*x.shape[:2], r, dtype=x.dtype)
    a[text_mask] = x[text_mask] @ A_text.T
    a[image_mask] = x[image_mask] @ A_image.T
    for i in range(x.shape[0]):
        image_indices = torch.where(image_mask[i])[0]
        question_indices = torch.where(question_mask[i])[0]
        if len(image_indices) == 0 or len(question_indices) == 0:
            continue
        query, key = a[i, image_indices], a[i, question_indices]
        score = torch.softmax(query @ key.T / math.sqrt(r), dim=-1)
        a[i, image_indices] = a[i, image_indices] + attn_weight * (score @ key)
    for mask in (text_mask, image_mask):
        result[mask] += (a[mask] @ B_text.T) * (alpha / r)
    return result


def official_projector(state: dict[str, Tensor], stem: str, features: Tensor, heads: int) -> Tensor:
    """``VLProjector.forward(features, question=None)``: LayerNorm, LAVIS's ``BertModel`` on the query embeddings
    alone (query self-attention, cross-attention to the features, the query feed-forward), then the MLP."""

    def p(key: str) -> Tensor:
        return state[f"{stem}_{key}"].double()

    def lin(h: Tensor, key: str) -> Tensor:
        return F.linear(h, p(f"{key}.weight"), p(f"{key}.bias"))

    def norm(h: Tensor, key: str, eps: float = 1e-12) -> Tensor:
        return F.layer_norm(h, h.shape[-1:], p(f"{key}.weight"), p(f"{key}.bias"), eps)

    def attention(h: Tensor, context: Tensor, key: str) -> Tensor:
        def split(t: Tensor) -> Tensor:
            return t.view(*t.shape[:2], heads, -1).transpose(1, 2)

        query = split(lin(h, f"{key}.self.query"))
        keys, values = split(lin(context, f"{key}.self.key")), split(lin(context, f"{key}.self.value"))
        scores = torch.softmax(query @ keys.transpose(-1, -2) / math.sqrt(query.shape[-1]), dim=-1)
        out = (scores @ values).transpose(1, 2).reshape(h.shape)
        return norm(lin(out, f"{key}.output.dense") + h, f"{key}.output.LayerNorm")

    features = F.layer_norm(features, features.shape[-1:], p("ln.weight"), p("ln.bias"), 1e-5)
    bert = "Qformer.bert."
    h = norm(p("query_tokens").expand(features.shape[0], -1, -1), f"{bert}embeddings.LayerNorm")
    for n in range(QF["layers"]):
        layer = f"{bert}encoder.layer.{n}."
        h = attention(h, h, f"{layer}attention")
        h = attention(h, features, f"{layer}crossattention")
        inter = F.gelu(lin(h, f"{layer}intermediate_query.dense"))
        h = norm(lin(inter, f"{layer}output_query.dense") + h, f"{layer}output_query.LayerNorm")
    return lin(F.gelu(lin(h, "proj.0")), "proj.2")


def masks_of(ids: Tensor, question: Tensor) -> tuple[Tensor, ...]:
    """The official per-token 0/1 masks [text, video, audio, question], [B, L, 1]; pads are 0 in all."""
    return tuple(m.unsqueeze(-1).double() for m in (ids == 0, ids == 1, ids == 2, question))


def lora_of(state: dict[str, Tensor], prefix: str, path: str) -> dict[str, Tensor]:
    head = f"{prefix}{path}."
    return {k[len(head) :]: v.double() for k, v in state.items() if k.startswith(head)}


# -- AVT --------------------------------------------------------------------------------------------------------
AVT_LAYOUTS = [  # left-padded, as the official collator does; question spans contiguous
    [("text", 3), ("visual", 4), ("text", 1), ("audio", 3), ("question", 4), ("text", 2)],
    [("text", 2), ("visual", 2), ("text", 1), ("audio", 5), ("question", 2), ("text", 1)],
]


@pytest.mark.parametrize("attn_scale", ["question_tokens", "rank"])
def test_avt_layers_match_the_official_formula(attn_scale):
    backbone = backbone64()
    state = official_avt_lora(backbone)
    result = convert_avt(state, attn_scale=attn_scale)
    config = result.adapter_config
    assert (config.method, config.rank, config.alpha, config.scaling_position) == ("moka", 4, 16.0, "before_attention")
    assert (config.cross_attn_lambda, config.attn_scale, config.dropout) == (1.0, attn_scale, 0.05)
    assert config.question_keys == "span"  # <question_start> ... <question_end>
    assert config.modalities == ["text", "visual", "audio"] and config.target_modules == list(DEFAULT_TARGET_MODULES)
    assert len(result.adapter_weights) == len(state) and not result.skipped
    inject_adapters(backbone, config)
    load_adapter_weights(backbone, result.adapter_weights)

    ids, question, _ = routing_batch(AVT_LAYOUTS, pad_side="left")
    set_routing(backbone, ids, question)
    g = torch.Generator().manual_seed(3)
    layers = dict(adapted_layers(backbone))
    assert len(layers) == 14
    for name, layer in layers.items():
        x = torch.randn(*ids.shape, layer.in_features, generator=g, dtype=torch.float64)
        lora = lora_of(state, AVT_LLM, name.removeprefix("model."))
        expected = official_avt_linear(x, layer.base_layer.weight, lora, masks_of(ids, question), 16.0, 1.0, attn_scale)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6, msg=name)

    # A decode step: the official "test" mode with x.size(1) == 1 is text-A only, h = W0 x + B0(A0 x s).
    set_routing(backbone, None)
    layer = layers["model.layers.1.mlp.down_proj"]
    lora = lora_of(state, AVT_LLM, "layers.1.mlp.down_proj")
    x = torch.randn(2, 1, layer.in_features, generator=g, dtype=torch.float64)
    expected = x @ layer.base_layer.weight.T + (x @ lora["lora_A0.weight"].T) * 4.0 @ lora["lora_B0.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_avt_with_projectors_and_official_config():
    """adapter_model.bin + non_lora_trainables.bin, with peft_hyper's adapter_config.json supplying alpha and
    lambda; the result equals configs/adapter/moka_official_av.yaml when attn_scale is rank."""
    lora = official_avt_lora(build_random_backbone("llama", **LLM))
    state = dict(lora)
    for owner, stem, seed in (("vl_projector", "visual", 5), ("al_projector", "audio", 6)):
        projector = bert_projector(stem, ENCODER_WIDTHS[stem], LLM["hidden_size"], seed)
        state.update({f"{AVT_LLM}{owner}.{k}": v for k, v in projector.items()})
    official = {"r": 444, "lora_nums": 3, "lora_alpha": 16, "blc_weight": 1, "lora_dropout": 0.05}
    result = convert_avt(state, attn_scale="rank", official_config=official, qformer_heads=QF["heads"])
    preset = instantiate(OmegaConf.load(ROOT / "configs" / "adapter" / "moka_official_av.yaml"))
    assert result.adapter_config == preset
    assert sorted(result.projectors) == ["audio", "visual"]
    assert result.provenance["alpha"] == "16 (adapter_config.json lora_alpha)"
    assert result.provenance["attn_scale"] == "rank (given: the checkpoint does not record it)"
    assert len(result.skipped[SKIP_QFORMER_TEXT]) == 2 * 15 and len(result.skipped[SKIP_QFORMER_HEAD]) == 2 * 4

    halved = convert_avt(lora, attn_scale="rank", official_config={**official, "blc_weight": 0.5}, alpha=8)
    assert (halved.adapter_config.cross_attn_lambda, halved.adapter_config.alpha) == (0.5, 8.0)
    assert halved.provenance["alpha"] == "8 (given)"
    with pytest.raises(OfficialImportError, match=r"r=484 gives ranks \[4, 8, 4\]"):
        convert_avt(lora, attn_scale="rank", official_config={"r": 484})
    with pytest.raises(OfficialImportError, match="attn_scale must be one of"):
        convert_avt(lora, attn_scale="sqrt")


# -- VT ---------------------------------------------------------------------------------------------------------
def test_vt_layers_match_the_official_formula():
    backbone = backbone64()
    state = official_vt_state(backbone)
    result = convert_vt(state, qformer_heads=QF["heads"])
    config = result.adapter_config
    assert (config.scaling_position, config.attn_scale, config.cross_attn_lambda) == ("after_b", "rank", 0.05)
    # Its question mask: every unsupervised token after the last image token (train.py), not a marked span.
    assert config.question_keys == "after_media" and "question_keys" in result.provenance
    assert config.modalities == ["text", "visual"] and config.rank == RANK
    assert sorted(result.projectors) == ["visual"]
    assert len(result.skipped[SKIP_VT_IMAGE_B]) == 14
    assert len(result.skipped[SKIP_FROZEN_LLM]) == 14 + 3  # base layers, a layer norm, the final norm, lm_head
    assert result.skipped[SKIP_EMBEDDINGS] == [f"{VT_LLM}embed_tokens.weight"]
    assert len(result.skipped[SKIP_FROZEN_ENCODER]) == 1
    inject_adapters(backbone, config)
    load_adapter_weights(backbone, result.adapter_weights)

    layouts = [  # right-padded, as the VT collator does; the last sample has no question
        [("text", 3), ("visual", 4), ("question", 3), ("text", 2)],
        [("text", 2), ("visual", 4), ("question", 5), ("text", 1)],
        [("text", 2), ("visual", 3), ("text", 2)],
    ]
    ids, question, _ = routing_batch(layouts, pad_side="right")
    set_routing(backbone, ids, question)
    g = torch.Generator().manual_seed(4)
    for name, layer in adapted_layers(backbone):
        x = torch.randn(*ids.shape, layer.in_features, generator=g, dtype=torch.float64)
        lora = lora_of(state, VT_LLM, name.removeprefix("model."))
        expected = official_vt_linear(x, layer.base_layer.weight, lora, ids == 0, ids == 1, question, 0.05, 16.0)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6, msg=name)


# -- Crab projectors ----------------------------------------------------------------------------------------------
def test_crab_projector_keys_land_on_our_parameters():
    state = crab_stage1()
    result = convert_crab_projectors(state, qformer_heads=QF["heads"])
    assert result.adapter_config is None and not result.adapter_weights
    visual, audio = result.projectors["visual"], result.projectors["audio"]
    q = "visual_Qformer.bert."
    pairs = [
        (visual, "queries", "model.vl_projector.visual_query_tokens"),
        (visual, "feature_norm.bias", "model.vl_projector.visual_ln.bias"),
        (visual, "qformer.layernorm.weight", f"model.vl_projector.{q}embeddings.LayerNorm.weight"),
        (visual, "qformer.encoder.layer.1.crossattention.attention.key.weight",
         f"model.vl_projector.{q}encoder.layer.1.crossattention.self.key.weight"),
        (visual, "qformer.encoder.layer.0.attention.output.LayerNorm.bias",
         f"model.vl_projector.{q}encoder.layer.0.attention.output.LayerNorm.bias"),
        (visual, "mlp.2.weight", "model.vl_projector.visual_proj.2.weight"),
        (audio, "qformer.encoder.layer.1.output_query.dense.weight",
         "model.al_projector.audio_Qformer.bert.encoder.layer.1.output_query.dense.weight"),
        (audio, "mlp.0.bias", "model.al_projector.audio_proj.0.bias"),
    ]  # fmt: skip
    for ours, key, official_key in pairs:
        assert torch.equal(ours[key], state[official_key]), key
    config = result.projector_configs["audio"]
    assert (config.encoder_width, config.llm_hidden_size, config.num_queries) == (12, 24, QF["queries"])
    assert (config.qformer_layers, config.qformer_hidden_size, config.qformer_intermediate_size) == (2, 32, 48)
    assert result.skipped[SKIP_EMBEDDINGS] == ["model.embed_tokens.weight"]
    assert "model.vl_projector.visual_Qformer.bert.embeddings.position_ids" in result.skipped[SKIP_QFORMER_TEXT]
    converted = sum(len(p) for p in result.projectors.values())
    assert converted + sum(len(keys) for keys in result.skipped.values()) == len(state)  # nothing dropped silently

    # Our Q-Former with the converted weights computes what the official BERT Q-Former computes.
    g = torch.Generator().manual_seed(9)
    for modality, stem, owner in (("visual", "visual", "vl_projector"), ("audio", "audio", "al_projector")):
        projector = QFormerProjector(result.projector_configs[modality]).double().eval()
        projector.load_state_dict(result.projectors[modality])
        official = {k.removeprefix(f"model.{owner}."): v for k, v in state.items() if k.startswith(f"model.{owner}.")}
        features = torch.randn(3, 5, ENCODER_WIDTHS[modality], generator=g, dtype=torch.float64)
        with torch.no_grad():
            ours = projector(features)
        torch.testing.assert_close(ours, official_projector(official, stem, features, QF["heads"]), rtol=0, atol=1e-6)


# -- refusals -------------------------------------------------------------------------------------------------------
def test_unknown_missing_and_misshaped_keys_are_refused_by_name():
    backbone = build_random_backbone("llama", **LLM)
    state = official_avt_lora(backbone)
    key = f"{AVT_LLM}layers.0.self_attn.q_proj.lora_A3.weight"
    with pytest.raises(OfficialImportError, match=f"unexpected key '{key}'.*lora_A0 .text."):
        convert_avt({**state, key: torch.zeros(RANK, 64)}, attn_scale="rank")
    with pytest.raises(OfficialImportError, match="unexpected key 'model.seg_module.text_hidden_fcs.0.weight'"):
        convert_avt({**state, "model.seg_module.text_hidden_fcs.0.weight": torch.zeros(1)}, attn_scale="rank")

    missing = f"{AVT_LLM}layers.1.mlp.down_proj.lora_A2.weight"
    with pytest.raises(OfficialImportError, match=f"missing key '{missing}'"):
        convert_avt({k: v for k, v in state.items() if k != missing}, attn_scale="rank")
    gone = f"{AVT_LLM}layers.1.self_attn.k_proj."
    with pytest.raises(OfficialImportError, match=f"missing key '{gone}lora_A0.weight'.*every layer"):
        convert_avt({k: v for k, v in state.items() if not k.startswith(gone)}, attn_scale="rank")

    wrong = f"{AVT_LLM}layers.0.mlp.up_proj.lora_A1.weight"
    with pytest.raises(OfficialImportError, match=f"'{wrong}' has shape \\(5, 64\\): rank 5"):
        convert_avt({**state, wrong: torch.zeros(5, 64)}, attn_scale="rank")

    with pytest.raises(OfficialImportError, match="lora_A0 / lora_B0 are the AVT names: use kind 'avt'"):
        convert_vt(state)
    with pytest.raises(OfficialImportError, match="no AVT MokA LoRA keys"):
        convert_avt(crab_stage1(), attn_scale="rank")

    projector = crab_stage1()
    absent = "model.vl_projector.visual_Qformer.bert.encoder.layer.1.output_query.dense.weight"
    with pytest.raises(OfficialImportError, match=f"lacks '{absent}'"):
        convert_crab_projectors({k: v for k, v in projector.items() if k != absent}, qformer_heads=4)
    misshaped = "model.al_projector.audio_Qformer.bert.encoder.layer.0.crossattention.self.value.weight"
    with pytest.raises(OfficialImportError, match=f"'{misshaped}' has shape \\(32, 7\\)"):
        convert_crab_projectors({**projector, misshaped: torch.zeros(32, 7)}, qformer_heads=4)
    odd = "model.vl_projector.visual_Qformer.bert.encoder.layer.0.crossattention.self.gate.weight"
    with pytest.raises(OfficialImportError, match=f"unexpected key '{odd}'"):
        convert_crab_projectors({**projector, odd: torch.zeros(1)}, qformer_heads=4)
    with pytest.raises(OfficialImportError, match="qformer_hidden_size 32 is not divisible by qformer_heads 12"):
        convert_crab_projectors(projector)


# -- the script --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def script():
    with loaded_script(SCRIPT) as module:
        yield module


def test_script_end_to_end_bin_and_safetensors(script, tmp_path, capsys):
    """adapter_model.bin (torch.save) + non_lora_trainables.safetensors -> a trainables checkpoint that
    load_trainables puts into our model."""
    backbone = build_random_backbone("llama", **LLM)
    lora = official_avt_lora(backbone)
    torch.save(lora, tmp_path / "adapter_model.bin")
    projectors = {}
    for owner, stem, seed in (("vl_projector", "visual", 7), ("al_projector", "audio", 8)):
        projector = bert_projector(stem, ENCODER_WIDTHS[stem], LLM["hidden_size"], seed)
        projectors.update({f"{AVT_LLM}{owner}.{k}": v.contiguous() for k, v in projector.items()})
    save_file(projectors, tmp_path / "non_lora_trainables.safetensors")
    peft_config = {"peft_type": "LORA", "r": 444, "lora_alpha": 16, "blc_weight": 1, "lora_nums": 3,
                   "target_modules": list(DEFAULT_TARGET_MODULES)}  # fmt: skip
    (tmp_path / "adapter_config.json").write_text(json.dumps(peft_config))
    out = tmp_path / "imported"
    sources = [str(tmp_path / "adapter_model.bin"), str(tmp_path / "non_lora_trainables.safetensors")]
    config_json = str(tmp_path / "adapter_config.json")
    script.main(
        ["--kind", "avt", "--src", *sources, "--adapter-config", config_json, "--attn-scale", "question_tokens",
         "--qformer-heads", "4", "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert f"read {len(lora) + len(projectors)} tensors from 2 file(s)" in printed
    per_projector = 61  # queries, 2 norms (4), MLP (4), per layer 2 x attention (20) + query feed-forward (6)
    assert f"converted {56 + 2 * per_projector} tensors: adapter 56, projector.audio 61, projector.visual 61" in printed
    assert "scaling_position=before_attention" in printed and "parts: [projectors, adapter]" in printed
    assert "and this adapter: adapter=moka adapter.scaling_position=before_attention" in printed
    manifest = json.loads((out / "trainables.json").read_text())
    assert manifest["imported_from"]["kind"] == "avt" and manifest["added_token_ids"] == []

    config = read_adapter_config(out / "adapter")
    assert (config.attn_scale, config.scaling_position) == ("question_tokens", "before_attention")
    model = build_multimodal_lm(
        backbone,
        build_demo_tokenizer(LLM["vocab_size"]),
        encoder_widths=ENCODER_WIDTHS,
        projector=dict(num_queries=4, qformer_layers=2, qformer_hidden_size=32, qformer_heads=4,
                       qformer_intermediate_size=48),
        adapter=config,
    )  # fmt: skip
    # No parts named: the parts it has (it has no added-token rows, and asking for them is an error).
    loaded = load_trainables(model, out)
    assert loaded == {"projectors": ["audio", "visual"], "adapter": ["adapter"]}
    with pytest.raises(ValueError, match="holds no \\['added_tokens'\\]"):
        load_trainables(model, out, parts=["added_tokens"])
    layer = model.llm.get_submodule("model.layers.1.self_attn.v_proj")
    assert torch.equal(layer.lora_A["audio"].weight, lora[f"{AVT_LLM}layers.1.self_attn.v_proj.lora_A2.weight"])
    assert torch.equal(
        model.projectors["visual"].qformer.encoder.layer[0].crossattention.attention.query.bias,
        projectors[f"{AVT_LLM}vl_projector.visual_Qformer.bert.encoder.layer.0.crossattention.self.query.bias"],
    )


def test_script_crab_from_bin_and_its_refusals(script, tmp_path, capsys):
    state = crab_stage1()
    torch.save(state, tmp_path / "visual_pretrain.bin")
    out = tmp_path / "crab"
    script.main(["--kind", "crab_projector", "--src", str(tmp_path / "visual_pretrain.bin"), "--out", str(out),
                 "--qformer-heads", "4"])  # fmt: skip
    assert "parts: [projectors]" in capsys.readouterr().out
    assert sorted(json.loads((out / "trainables.json").read_text())["projectors"]) == ["audio", "visual"]
    assert not (out / "adapter").exists()

    def refused(argv: list[str], message: str) -> None:
        with pytest.raises(SystemExit) as exit_info:
            script.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err

    src = str(tmp_path / "visual_pretrain.bin")
    refused(["--kind", "avt", "--src", src, "--out", str(tmp_path / "a")], "--attn-scale is required for avt")
    refused(["--kind", "crab_projector", "--src", src, "--out", str(out)], "is not an empty folder")
    refused(["--kind", "crab_projector", "--src", src, "--attn-scale", "rank", "--out", str(tmp_path / "b")],
            "--attn-scale: adapter options")  # fmt: skip
    (tmp_path / "weights.npz").write_bytes(b"x")
    refused(["--kind", "vt", "--src", str(tmp_path / "weights.npz"), "--out", str(tmp_path / "c")],
            "unknown checkpoint type '.npz'")  # fmt: skip
    refused(["--kind", "vt", "--src", str(tmp_path / "none.bin"), "--out", str(tmp_path / "d")], "no such file")
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((tmp_path / "visual_pretrain.bin").read_bytes()[:200])
    refused(["--kind", "crab_projector", "--src", str(truncated), "--out", str(tmp_path / "g")],
            f"{truncated}: torch.load(weights_only=True) cannot read it")  # fmt: skip
    refused(["--kind", "crab_projector", "--src", src, "--qformer-heads", "0", "--out", str(tmp_path / "h")],
            "--qformer-heads must be a positive number")  # fmt: skip
    torch.save({"model": state}, tmp_path / "nested.bin")
    refused(["--kind", "crab_projector", "--src", str(tmp_path / "nested.bin"), "--out", str(tmp_path / "e")],
            "entry 'model' is a dict, not a tensor")  # fmt: skip
    save_file({"model.embed_tokens.weight": torch.zeros(2)}, tmp_path / "twice.safetensors")
    refused(["--kind", "crab_projector", "--src", src, str(tmp_path / "twice.safetensors"), "--out",
             str(tmp_path / "f")], "'model.embed_tokens.weight' is in both")  # fmt: skip


def test_state_dict_reader_is_lazy_for_safetensors(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, tmp_path / "x.safetensors")
    torch.save({"c": torch.full((1,), 2.0)}, tmp_path / "y.pt")
    state = OfficialStateDict([tmp_path / "x.safetensors", tmp_path / "y.pt"])
    assert sorted(state) == ["a", "b", "c"] and len(state) == 3
    assert torch.equal(state["b"], torch.zeros(3)) and state.source("c") == tmp_path / "y.pt"
