"""LoRAMoE and HydraLoRA: against slow per-token references written here from their formulas (float64, random
B's and routers, ragged padded layouts), LoRAMoE's load-balancing loss against a hand computation and through
its life cycle, parameter counts, checkpointing, bf16 and cached generation on the tiny backbones."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from moka_train.adapters import (
    AdapterConfig,
    RoutingError,
    adapted_layers,
    adapter_named_parameters,
    count_parameters,
    inject_adapters,
    load_adapter,
    save_adapter,
    set_active_modalities,
    set_routing,
    take_aux_loss,
)
from moka_train.adapters.methods import mixtures
from moka_train.modality import Modality
from moka_train.models.mllm import IGNORE_INDEX
from tests.helpers import (
    VOCAB,
    cached_greedy_steps,
    position_ids,
    randomize_adapters,
    routing_batch,
    tiny_llama,
    tiny_qwen2,
)

METHODS = ["loramoe", "hydralora"]
IN, OUT = 24, 20
LAYOUTS = [
    [("text", 3), ("visual", 5), ("audio", 3), ("question", 4), ("text", 2)],
    [("text", 2), ("visual", 2), ("question", 1), ("text", 1)],
    [("text", 1), ("audio", 6), ("text", 1), ("question", 6), ("text", 3)],
    [("question", 3), ("text", 5)],
]
TWO_MODALITY_LAYOUTS = [
    [("text", 2), ("visual", 6), ("question", 3), ("text", 1)],
    [("text", 1), ("visual", 2), ("question", 2)],
]
BACKBONES = {"llama": tiny_llama, "qwen2": tiny_qwen2}
PRESETS = Path(__file__).parents[1] / "configs" / "adapter"


class TwoLinears(nn.Module):
    """Two adapted layers side by side (the balancing loss is their mean)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(IN, OUT, bias=True)
        self.v_proj = nn.Linear(IN, OUT, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x) + self.v_proj(x)


def randomize(model: nn.Module, seed: int = 1, std: float = 0.5, router_std: float = 0.5) -> None:
    """Random B's (zero at init) and routers (larger than their kaiming-uniform init)."""
    randomize_adapters(model, seed=seed, std=std)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, parameter in adapter_named_parameters(model):
            if ".lora_router." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * router_std)


def config(method: str, **overrides) -> AdapterConfig:
    fields = dict(method=method, rank=3, alpha=6.0, target_modules=["q_proj"], aux_loss_weight=0.1)
    return AdapterConfig(**{**fields, **overrides})


def build(cfg: AdapterConfig, seed: int = 0, module: type[nn.Module] = TwoLinears) -> nn.Module:
    torch.manual_seed(seed)
    model = inject_adapters(module(), cfg)
    randomize(model, seed=seed + 1)
    return model.eval()


# -- the formulas ------------------------------------------------------------------------------------------------
def reference_delta(w: dict[str, torch.Tensor], cfg: AdapterConfig, x: torch.Tensor) -> torch.Tensor:
    """The delta of every token, one token at a time, in float64, from the formulas."""
    x = x.double()
    out = torch.zeros(*x.shape[:-1], OUT, dtype=torch.float64)
    s, experts = cfg.alpha / cfg.rank, cfg.experts
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            token = x[b, i]
            logits = w["lora_router.weight"] @ token
            pi = torch.exp(logits - logits.max())
            pi = pi / pi.sum()
            for e in range(experts):
                down = w[f"lora_A.{e}.weight"] if cfg.method == "loramoe" else w["lora_A.shared.weight"]
                out[b, i] += s * pi[e] * (w[f"lora_B.{e}.weight"] @ (down @ token))
    return out


def weights_of(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().double() for name, p in layer.adapter_parameters()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pad_side", ["left", "right"])
@pytest.mark.parametrize("num_experts", [None, 2, 5])
def test_matches_reference(method, pad_side, num_experts):
    cfg = config(method, num_experts=num_experts)
    model = build(cfg)
    ids, question, _ = routing_batch(LAYOUTS, pad_side=pad_side)
    x = torch.randn(*ids.shape, IN)
    set_routing(model, ids, question)
    with torch.no_grad():
        got = model.q_proj(x) - model.q_proj.base_layer(x)
    want = reference_delta(weights_of(model.q_proj), cfg, x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    layer = model.q_proj
    assert layer.num_experts == (num_experts or 3) and len(layer.lora_B) == layer.num_experts


@pytest.mark.parametrize("method", METHODS)
def test_more_experts_than_modalities(method):
    """num_experts = 3 with two modalities (text, visual); routing never looks at the modality."""
    cfg = config(method, modalities=["text", "visual"], num_experts=3)
    model = build(cfg)
    ids, question, _ = routing_batch(TWO_MODALITY_LAYOUTS)
    x = torch.randn(*ids.shape, IN)
    set_routing(model, ids, question)
    model.train()
    out = model(x)
    out.square().sum().backward()
    take_aux_loss(model)
    model.eval()
    with torch.no_grad():
        got = model.q_proj(x) - model.q_proj.base_layer(x)
    torch.testing.assert_close(got.double(), reference_delta(weights_of(model.q_proj), cfg, x), rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in adapter_named_parameters(model))


@pytest.mark.parametrize("method", METHODS)
def test_eval_needs_no_routing_and_dropout_leaves_the_router_alone(method):
    """Like LoRA, the delta does not depend on modalities: no routing needed outside training. The router reads
    the input before dropout: in training mode with dropout, pi equals the clean input's."""
    cfg = config(method, dropout=0.5)
    model = build(cfg)
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        want = reference_delta(weights_of(model.q_proj), cfg, x)
        torch.testing.assert_close((model.q_proj(x) - model.q_proj.base_layer(x)).double(), want, rtol=1e-5, atol=1e-5)
    seen = []
    model.q_proj.lora_router.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model.train()
    set_routing(model, None)
    model(x)
    assert torch.equal(seen[-1], x)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("active", [["text"], ["visual", "audio"]])
def test_partial_modality_inference(method, active):
    model = build(config(method))
    ids, question, _ = routing_batch(LAYOUTS, pad_side="left")
    x = torch.randn(*ids.shape, IN)
    set_routing(model, ids, question)
    with torch.no_grad():
        full = model.q_proj(x) - model.q_proj.base_layer(x)
        set_active_modalities(model, active)
        partial = model.q_proj(x) - model.q_proj.base_layer(x)
        set_active_modalities(model, None)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for name in active:
        keep |= ids == int(Modality.parse(name))
    torch.testing.assert_close(partial[keep], full[keep], rtol=0, atol=0)
    assert torch.count_nonzero(partial[~keep]) == 0


# -- LoRAMoE's load-balancing loss -------------------------------------------------------------------------------
def hand_aux_loss(model: nn.Module, cfg: AdapterConfig, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """aux_loss_weight times the mean over the layers of Var/Mean^2 (population variance) of the importance."""
    terms = []
    for _, layer in adapted_layers(model):
        logits = x.double() @ layer.lora_router.weight.detach().double().T
        pi = logits.softmax(-1)
        keep = torch.ones(x.shape[:-1], dtype=torch.bool) if ids is None else ids >= 0
        importance = torch.stack([pi[..., e][keep].sum() for e in range(cfg.experts)])
        mean = importance.sum() / cfg.experts
        variance = sum((v - mean) ** 2 for v in importance) / cfg.experts
        terms.append(variance / mean**2)
    return cfg.aux_loss_weight * sum(terms) / len(terms)


@pytest.mark.parametrize("num_experts", [None, 4])
def test_aux_loss_equals_hand_computation(num_experts):
    cfg = config("loramoe", target_modules=["q_proj", "v_proj"], num_experts=num_experts)
    model = build(cfg).train()
    assert [layer.aux_layers for _, layer in adapted_layers(model)] == [2, 2]
    ids, question, _ = routing_batch(LAYOUTS, pad_side="right")
    x = torch.randn(*ids.shape, IN)
    set_routing(model, ids, question)
    model(x)
    aux = take_aux_loss(model)
    want = hand_aux_loss(model, cfg, x, ids)
    assert want > 1e-4
    torch.testing.assert_close(aux.double(), want, rtol=1e-5, atol=1e-8)
    # Pads take no part: other values at the pad positions give the same loss.
    x2 = x.clone()
    x2[ids < 0] = torch.randn_like(x2[ids < 0]) * 10
    model(x2)
    torch.testing.assert_close(take_aux_loss(model), aux, rtol=1e-6, atol=1e-9)
    # set_routing(model, None): all text, every token counts.
    set_routing(model, None)
    model(x)
    torch.testing.assert_close(take_aux_loss(model).double(), hand_aux_loss(model, cfg, x, None), rtol=1e-5, atol=1e-8)


def test_aux_loss_is_zero_for_uniform_routing_and_finite_without_tokens():
    cfg = config("loramoe")
    torch.manual_seed(0)
    model = inject_adapters(TwoLinears(), cfg).train()
    with torch.no_grad():  # router zero: pi = 1/N everywhere
        for name, parameter in adapter_named_parameters(model):
            if ".lora_router." in name:
                parameter.zero_()
    set_routing(model, None)
    model(torch.randn(2, 4, IN))
    assert take_aux_loss(model).item() == 0.0
    randomize(model)
    ids = torch.full((1, 3), int(Modality.PAD))
    set_routing(model, ids, torch.zeros_like(ids, dtype=torch.bool))
    model(torch.randn(1, 3, IN))
    aux = take_aux_loss(model)
    assert torch.isfinite(aux) and aux.item() == 0.0


def test_aux_loss_life_cycle():
    cfg = config("loramoe")
    model = build(cfg)
    ids, question, _ = routing_batch(LAYOUTS)
    x = torch.randn(*ids.shape, IN)
    set_routing(model, ids, question)
    model.eval()
    model(x)
    assert take_aux_loss(model) is None  # eval mode: nothing
    model.train()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(x)
    assert take_aux_loss(model) is None  # no gradients: nothing
    model(x)
    assert take_aux_loss(model) is not None
    assert take_aux_loss(model) is None  # taken
    model(x)
    set_routing(model, ids, question)  # a new batch drops the last one's terms
    assert take_aux_loss(model) is None
    model(x)
    model(x)
    torch.testing.assert_close(take_aux_loss(model), 2 * hand_aux_loss(model, cfg, x, ids).float())  # two calls


def test_aux_loss_weight_zero_and_hydralora_add_nothing():
    ids, question, _ = routing_batch(LAYOUTS)
    x = torch.randn(*ids.shape, IN)
    for cfg in (config("loramoe", aux_loss_weight=0.0), config("hydralora", aux_loss_weight=1.0)):
        model = build(cfg).train()
        model(x)  # no routing needed: no balancing loss
        set_routing(model, ids, question)
        model(x)
        assert take_aux_loss(model) is None


def test_training_loramoe_without_routing_is_an_error():
    model = build(config("loramoe")).train()
    with pytest.raises(RoutingError, match="load-balancing loss.*set_routing"):
        model(torch.randn(1, 4, IN))


@pytest.mark.parametrize("method", METHODS)
def test_training_breaks_the_symmetry_between_experts(method):
    """From the real init (B zero, router kaiming-uniform as both official codes): after a few AdamW steps the
    B heads differ and the routing is not uniform. With a zero router HydraLoRA's heads, behind one shared A, got
    identical gradients and the router none, so they never parted: a rank-r LoRA with a dead router."""
    torch.manual_seed(0)
    model = inject_adapters(TwoLinears(), config(method, target_modules=["q_proj"], aux_loss_weight=0.0)).train()
    layer = model.q_proj
    x, target = torch.randn(8, IN), torch.randn(8, OUT)
    initial_spread = layer.router_probs(x).std(dim=-1).min()
    optimizer = torch.optim.AdamW([p for _, p in adapter_named_parameters(model)], lr=1e-2)
    set_routing(model, None)
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
    heads = torch.stack([layer.lora_B[str(e)].weight.detach() for e in range(layer.num_experts)])
    assert heads.abs().max() > 0 and (heads - heads[0]).abs().amax(dim=(1, 2))[1:].min() > 1e-4
    assert initial_spread > 0  # the routing was not uniform from the start


def test_aux_loss_gradient_reaches_the_router_only():
    model = build(config("loramoe", target_modules=["q_proj", "v_proj"])).train()
    ids, question, _ = routing_batch(LAYOUTS)
    set_routing(model, ids, question)
    model(torch.randn(*ids.shape, IN))
    take_aux_loss(model).backward()
    for name, parameter in adapter_named_parameters(model):
        if ".lora_router." in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_aux_loss_in_the_multimodal_lm():
    """MultimodalLM.forward adds the aux loss weighted by the batch's share of the label tokens."""
    from tests.test_mllm import build as build_mllm
    from tests.test_mllm import make_batch

    model = build_mllm("loramoe")
    randomize(model.llm)
    model.set_stage("instruct")
    model.train()
    batch = make_batch()
    recorded: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model.llm):
        layer.register_forward_pre_hook(lambda module, args, name=name: recorded.__setitem__(name, args[0].detach()))
    labels = batch["labels"][:, 1:]
    normalizer = 2 * int((labels != IGNORE_INDEX).sum())
    out = model(batch, label_normalizer=normalizer)
    task = nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    layers = dict(adapted_layers(model.llm))
    keep = batch["modality_ids"] >= 0
    terms = []
    for name, x in recorded.items():
        pi = (x.double() @ layers[name].lora_router.weight.detach().double().T).softmax(-1)
        importance = pi[keep].sum(0)
        terms.append(importance.var(unbiased=False) / importance.mean() ** 2)
    aux = 0.01 * torch.stack(terms).mean()
    assert len(terms) == 14 and aux > 1e-6
    # The aux loss is weighted by the batch's share of the label tokens (count / normaliser = 1/2).
    torch.testing.assert_close(out.loss.double(), task.double() / normalizer + aux / 2, rtol=1e-5, atol=1e-7)
    out.loss.backward()
    assert all(layer.lora_router.weight.grad.abs().sum() > 0 for layer in layers.values())
    assert take_aux_loss(model.llm) is None  # the MLLM took it


# -- on the backbones --------------------------------------------------------------------------------------------
def backbone_batch(pad_side: str = "left"):
    ids, question, mask = routing_batch(
        [
            [("text", 3), ("visual", 6), ("audio", 4), ("question", 5), ("text", 3)],
            [("text", 2), ("visual", 3), ("question", 2), ("text", 2)],
        ],
        pad_side=pad_side,
    )
    tokens = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(0)) * mask
    return tokens, ids, question, mask


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", METHODS)
def test_parameter_counts_names_and_zero_init(backbone, method):
    cfg = AdapterConfig(method=method, rank=4, num_experts=None)
    base = BACKBONES[backbone]()
    model = inject_adapters(BACKBONES[backbone](), cfg)
    n, r = cfg.experts, cfg.rank
    expected = 0
    for _, layer in adapted_layers(model):
        k, d = layer.in_features, layer.out_features
        if method == "loramoe":
            expected += n * (r * k + d * r) + n * k
        else:
            expected += r * k + n * d * r + n * k
        names = {name for name, _ in layer.adapter_parameters()}
        a_names = {f"lora_A.{e}.weight" for e in range(n)} if method == "loramoe" else {"lora_A.shared.weight"}
        assert names == a_names | {f"lora_B.{e}.weight" for e in range(n)} | {"lora_router.weight"}
    counts = count_parameters(model)
    assert counts.adapter == counts.trainable == expected
    # hidden 64, intermediate 128, kv width 32: the closed form over the 7 targets of the 2 decoder layers.
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # (d, k)
    per_layer = (
        [3 * (4 * k + d * 4) + 3 * k for d, k in shapes]
        if method == "loramoe"
        else [4 * k + 3 * d * 4 + 3 * k for d, k in shapes]
    )
    assert expected == 2 * sum(per_layer)
    tokens, ids, question, mask = backbone_batch()
    set_routing(model, ids, question)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=tokens, attention_mask=mask).logits, base(input_ids=tokens, attention_mask=mask).logits
        )


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_round_trip_keeps_the_router(method, tmp_path):
    model = inject_adapters(tiny_llama(), AdapterConfig(method=method, num_experts=2))
    randomize(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny_llama(), tmp_path)
    tokens, ids, question, mask = backbone_batch()
    for m in (model, loaded):
        set_routing(m, ids, question)
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=tokens, attention_mask=mask).logits, model(input_ids=tokens, attention_mask=mask).logits
        )
    assert loaded.get_submodule("model.layers.0.mlp.up_proj").num_experts == 2


def _grads(method: str, checkpointing: bool, reentrant: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    model = inject_adapters(tiny_llama(layers=3), AdapterConfig(method=method, dropout=0.1, aux_loss_weight=0.5))
    randomize(model, std=0.3, router_std=0.3)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    tokens, ids, question, mask = backbone_batch()
    set_routing(model, ids, question)
    torch.manual_seed(123)
    loss = model(input_ids=tokens, attention_mask=mask, labels=tokens).loss
    aux = take_aux_loss(model)
    (loss if aux is None else loss + aux).backward()
    # Checkpointing's recomputation during backward repeats the term but must not keep it (nor what it holds).
    assert take_aux_loss(model) is None
    return {name: p.grad.clone() for name, p in adapter_named_parameters(model)}, aux


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(method):
    want, want_aux = _grads(method, False, False)
    got, got_aux = _grads(method, True, False)
    if method == "loramoe":
        assert want_aux is not None and want_aux > 1e-4
        torch.testing.assert_close(got_aux, want_aux)
    else:
        assert want_aux is None and got_aux is None
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
        assert want[name].abs().sum() > 0, name


def test_reentrant_checkpointing_loses_the_aux_loss_with_a_warning(monkeypatch):
    monkeypatch.setattr(mixtures, "_warned_no_grad_training", False)
    with pytest.warns(UserWarning, match="use_reentrant=False"):
        got, aux = _grads("loramoe", True, True)
    assert aux is None
    assert all(g.abs().sum() > 0 for g in got.values())  # the task loss still trains every parameter


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_bf16_backbone(method, adapter_dtype):
    tokens, ids, question, mask = backbone_batch()
    reference = inject_adapters(tiny_llama(), AdapterConfig(method=method))
    randomize(reference, std=0.3, router_std=0.3)
    model = inject_adapters(tiny_llama().to(torch.bfloat16), AdapterConfig(method=method))
    model.load_state_dict(reference.state_dict())
    for _, parameter in adapter_named_parameters(model):
        parameter.data = parameter.data.to(adapter_dtype)
    for m in (reference, model):
        set_routing(m, ids, question)
    model.train()
    out = model(input_ids=tokens, attention_mask=mask, labels=tokens)
    aux = take_aux_loss(model)
    assert (aux is not None) == (method == "loramoe")
    (out.loss if aux is None else out.loss + aux).backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    model.eval()
    with torch.no_grad():
        effect_fp32 = (
            reference(input_ids=tokens, attention_mask=mask).logits
            - tiny_llama()(input_ids=tokens, attention_mask=mask).logits
        )
        effect_bf16 = (
            model(input_ids=tokens, attention_mask=mask).logits.float()
            - tiny_llama().to(torch.bfloat16)(input_ids=tokens, attention_mask=mask).logits.float()
        )
    assert torch.nn.functional.cosine_similarity(effect_bf16.flatten(), effect_fp32.flatten(), dim=0) > 0.98
    grads = [p.grad for _, p in adapter_named_parameters(model)]
    assert all(g is not None and g.dtype == adapter_dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", METHODS)
def test_prefill_and_cached_decode_equal_full_forward(backbone, method):
    """In float64: a sharp random router amplifies float32 rounding (about 2e-5 on these logits, 1e-6 with a
    router ten times smaller), while the formula is the same per token in both paths."""
    model = inject_adapters(BACKBONES[backbone]().double(), AdapterConfig(method=method))
    randomize(model, std=0.5, router_std=0.5)
    prompt, ids, question, mask = backbone_batch(pad_side="left")
    set_routing(model, ids, question)
    step_logits, sequences, attention = cached_greedy_steps(model, prompt, mask, steps=4)
    with torch.no_grad():
        full = model(input_ids=sequences, attention_mask=attention, position_ids=position_ids(attention)).logits
        base = BACKBONES[backbone]().double()(input_ids=sequences, attention_mask=attention).logits
    assert full.dtype == torch.float64 and (full - base).abs().max() > 1e-3
    length = prompt.shape[1]
    for step, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, full[:, length - 1 + step], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_preset(method):
    cfg = instantiate(OmegaConf.load(PRESETS / f"{method}.yaml"))
    assert isinstance(cfg, AdapterConfig) and cfg.method == method
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.experts) == (4, 16.0, 0.05, 3)
    assert cfg.modalities == ["text", "visual", "audio"] and len(cfg.target_modules) == 7
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert math.isclose(cfg.aux_loss_weight, 0.01)
