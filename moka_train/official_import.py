"""Importing the official MokA and Crab checkpoints into moka_train's formats, so that the released models run
under our evaluator and can be compared with ours.

Three kinds (``KINDS``), each read from plain state dicts (what ``torch.load`` or safetensors give):

``avt``: GeWu-Lab/MokA ``AudioVisualText`` (its peft fork ``peft_hyper``): ``adapter_model.bin`` (the
    LoRA), ``non_lora_trainables.bin`` (the stage-2 projectors) or an intermediate ``finetune_weights.bin``.
    The MokA layer subclasses ``nn.Linear``, so each adapted linear ``P = <llm>layers.N.<block>.<proj>``
    holds its frozen ``P.weight`` beside::

        P.lora_A0.weight  [r, in]   text            -> model.layers.N.<block>.<proj>.lora_A.text.weight
        P.lora_A1.weight  [r, in]   video (visual)  -> ...lora_A.visual.weight
        P.lora_A2.weight  [r, in]   audio           -> ...lora_A.audio.weight
        P.lora_B0.weight  [out, r]  shared B        -> ...lora_B.weight

    with ``<llm>`` = ``base_model.model.model.`` (PeftModel -> LoraModel -> UnifiedForCausalLM -> its
    LlamaModel; ``model.`` is accepted too). The cross-attention has no parameters. The layer scales every A
    output by s = alpha / r before the cross-attention and nothing after B, so the implied config has
    ``scaling_position: before_attention`` (moka_reference.md section 2a).

``vt``: GeWu-Lab/MokA ``VisualText`` (its fork ``modified_peft``: a ``PeftMixedModel`` with the adapters
    ``image`` and ``text``; the HF Trainer saves the whole model)::

        P.lora_A.text.weight   [r, in]   -> ...lora_A.text.weight
        P.lora_A.image.weight  [r, in]   -> ...lora_A.visual.weight
        P.lora_B.text.weight   [out, r]  -> ...lora_B.weight      (the B every token uses)
        P.lora_B.image.weight            allocated but never read by the forward: skipped, and reported
        P.base_layer.weight              the frozen linear: skipped

    with ``<llm>`` the LLaVA language model (``base_model.model.model.language_model.`` in a
    transformers-4.53 save; ``model.language_model.``, ``base_model.model.language_model.model.`` and
    ``language_model.model.`` are accepted). s multiplies B's output (``scaling_position: after_b``), the
    attention scale is 1/sqrt(r), lambda is ``attn_weight`` (section 2b), and the keys are every unsupervised
    token after the last image token (``question_keys: after_media``).

``crab_projector``: Crab's stage-1 ``visual_pretrain.bin`` / ``audio_pretrain.bin`` (``model.vl_projector.``,
    ``model.al_projector.`` and the whole ``model.embed_tokens.weight``). The same projector keys are
    converted wherever they appear: in ``non_lora_trainables.bin`` (``avt``) and, as
    ``model.multi_modal_projector.``, in a VT save.

The projectors (``VLProjector`` / ``ALProjector``, stems ``visual`` / ``audio``) use LAVIS's BERT Q-Former
(``BertLMHeadModel``); ours is transformers' BLIP-2 Q-Former (``moka_train.models.projector``). With
``S`` the stem and ``Q = S_Qformer.bert.``::

    S_ln.{weight,bias}                                    -> feature_norm.{weight,bias}
    S_query_tokens                                        -> queries
    S_proj.{0,2}.{weight,bias}                            -> mlp.{0,2}.{weight,bias}
    Q embeddings.LayerNorm.*                              -> qformer.layernorm.*
    Q encoder.layer.N.{attention,crossattention}.self.*   -> qformer.encoder.layer.N.{...}.attention.*
    Q encoder.layer.N.{attention,crossattention}.output.* -> qformer.encoder.layer.N.{...}.output.*
    Q encoder.layer.N.{intermediate_query,output_query}.* -> qformer.encoder.layer.N.{...}.*

and, deliberately not converted (the official projector calls ``S_Qformer.bert`` with query embeddings only,
so these never touch its output): ``Q embeddings.{word,position}_embeddings`` and ``position_ids`` (text
embeddings), ``Q encoder.layer.N.{intermediate,output}.*`` (the text tokens' feed-forward) and
``S_Qformer.cls.*`` (the LM head).

Every official key is converted, or skipped for a stated reason (frozen LLM / encoder weights, the unused
tensors above, the stage-1 embedding matrix), or refused: an unknown key, a missing one or a shape that does
not fit stops the import with a message naming the key. The skipped keys are listed in the result and the
script's summary, never dropped silently.

What the weights do not say (the defaults are the official scripts' values; the script takes each as an
option, and an ``adapter_config.json`` given with ``--adapter-config`` supplies the ones it records):

- ``attn_scale`` (``avt``): must be given. The official code divided by sqrt(N_t) (``question_tokens``) until
  2025-12-27 and by sqrt(r) (``rank``) from 2025-12-28; which one a checkpoint was trained with is not
  recorded (moka_reference.md, open question 1). ``vt``: ``rank`` (its code's d_k).
- ``alpha``: 16 (hard-coded in both trainings; ``lora_alpha``). ``rank``: read from the shapes.
- ``cross_attn_lambda``: ``avt`` 1.0 (``blc_weight`` in ``ft_*.sh``), ``vt`` 0.05 (``attn_weight``).
- ``dropout``: 0.05 (matters only for further training).
- ``qformer_heads``: 12 (bert-base; not visible in the shapes). The projector's dropout (0.1) is not checked
  at load.
- The added tokens' embeddings are not imported: in ``avt`` they are random and never saved; Crab's stage-1
  matrix has rows for Crab's 17 tokens, whose ids differ from ours. The checkpoint is written with no added
  tokens; loading it (which loads the parts a checkpoint has) keeps the model's own rows.

Known differences in the official forward that a conversion cannot carry: the AVT keys are the slice from
the first to the last question token (a gap in the span would attend to zero keys; the official prompts'
spans are contiguous, ours are the marked tokens only), and a sample with no question token crashes there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from moka_train.adapters.checkpoint import CONFIG_NAME as ADAPTER_CONFIG_NAME
from moka_train.adapters.checkpoint import WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from moka_train.adapters.config import ATTN_SCALES, DEFAULT_TARGET_MODULES, AdapterConfig
from moka_train.checkpoint_io import write_atomic, write_text_atomic
from moka_train.models.projector import ProjectorConfig, QFormerProjector
from moka_train.models.trainables import ADAPTER_DIR, MANIFEST_NAME
from moka_train.models.trainables import FORMAT_VERSION as TRAINABLES_FORMAT_VERSION
from moka_train.models.trainables import WEIGHTS_NAME as TRAINABLES_WEIGHTS_NAME

KINDS = ("avt", "vt", "crab_projector")
KIND_DESCRIPTIONS = {
    "avt": "MokA audio-visual-text (GeWu-Lab/MokA AudioVisualText, peft_hyper)",
    "vt": "MokA visual-text (GeWu-Lab/MokA VisualText, modified_peft adapters image / text)",
    "crab_projector": "Crab stage-1 projectors (BERT-style Q-Former + MLP)",
}
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"

# The official scripts' values for what the weights do not record (module docstring).
OFFICIAL_ALPHA = 16.0
OFFICIAL_DROPOUT = 0.05
OFFICIAL_LAMBDA = {"avt": 1.0, "vt": 0.05}
OFFICIAL_QFORMER_HEADS = 12  # bert-base-uncased, whose config the official Q-Former is built from
OFFICIAL_PROJECTOR_DROPOUT = 0.1  # bert-base's hidden / attention dropout

# Reasons for skipping, as they appear in the summary.
SKIP_FROZEN_LLM = "frozen LLM weights (not a trainable; the same base LLM is loaded from its own checkpoint)"
SKIP_FROZEN_ENCODER = "frozen encoder weights (CLIP / BEATs are loaded from their own checkpoints)"
SKIP_EMBEDDINGS = (
    "the LLM's embedding matrix (Crab trains it whole in stage 1; our added tokens have other ids, so rows are "
    "not carried over)"
)
SKIP_VT_IMAGE_B = "VT lora_B.image (allocated, never used: every token goes through lora_B.text)"
SKIP_QFORMER_TEXT = "Q-Former text path (word / position embeddings, the text tokens' feed-forward): unused"
SKIP_QFORMER_HEAD = "Q-Former LM head (cls.*): never called by the projector"

_PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


class OfficialImportError(ValueError):
    """An official checkpoint that cannot be converted faithfully: the message names the key or value."""


# -- the layouts of the three kinds ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """Where a kind keeps what: the LLM's prefix, the module that owns the projectors and encoders, and the
    LoRA parameter names of one adapted linear (official name -> our name, None = skipped with ``skip``)."""

    llm_prefixes: tuple[str, ...]
    head_keys: tuple[str, ...]
    owner_prefixes: tuple[str, ...]
    projectors: dict[str, tuple[str, str]]  # owner attribute -> (our modality, official stem)
    encoders: tuple[str, ...]
    lora: dict[str, str | None] = field(default_factory=dict)
    required_lora: tuple[str, ...] = ()
    lora_help: str = ""


_AVT_LAYOUT = _Layout(
    llm_prefixes=("base_model.model.model.", "model."),
    head_keys=("base_model.model.lm_head.weight", "lm_head.weight"),
    owner_prefixes=("base_model.model.model.", "model."),
    projectors={"vl_projector": ("visual", "visual"), "al_projector": ("audio", "audio")},
    encoders=("visual_encoder", "audio_encoder"),
    lora={
        "lora_A0.weight": "lora_A.text.weight",
        "lora_A1.weight": "lora_A.visual.weight",
        "lora_A2.weight": "lora_A.audio.weight",
        "lora_B0.weight": "lora_B.weight",
    },
    required_lora=("lora_A0.weight", "lora_A1.weight", "lora_A2.weight", "lora_B0.weight"),
    lora_help="the AVT MokA layer has lora_A0 (text), lora_A1 (video), lora_A2 (audio) and lora_B0 only",
)
_VT_LAYOUT = _Layout(
    llm_prefixes=(
        "base_model.model.model.language_model.",
        "model.language_model.",
        "base_model.model.language_model.model.",
        "language_model.model.",
    ),
    head_keys=(
        "base_model.model.lm_head.weight",
        "lm_head.weight",
        "base_model.model.language_model.lm_head.weight",
        "language_model.lm_head.weight",
    ),
    owner_prefixes=("base_model.model.model.", "model.", "base_model.model.", ""),
    projectors={"multi_modal_projector": ("visual", "visual")},
    encoders=("vision_tower",),
    lora={
        "lora_A.text.weight": "lora_A.text.weight",
        "lora_A.image.weight": "lora_A.visual.weight",
        "lora_B.text.weight": "lora_B.weight",
        "lora_B.image.weight": None,
    },
    required_lora=("lora_A.text.weight", "lora_A.image.weight", "lora_B.text.weight"),
    lora_help="the VT MokA layer has lora_A.{text,image} and lora_B.{text,image} only",
)
# Crab's stage-1 model is the AVT one (UnifiedForCausalLM), saved without the peft wrapper.
_CRAB_LAYOUT = dataclasses.replace(_AVT_LAYOUT, lora={}, required_lora=(), lora_help="")
_LAYOUTS = {"avt": _AVT_LAYOUT, "vt": _VT_LAYOUT, "crab_projector": _CRAB_LAYOUT}

_ADAPTED_KEY = re.compile(
    r"(?P<prefix>(?:\w+\.)*?)layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+_proj)\.(?P<rest>.+)"
)
_FROZEN_LINEAR_PARTS = ("weight", "bias", "base_layer.weight", "base_layer.bias")
_FROZEN_LLM_KEY = re.compile(
    r"(?P<prefix>(?:\w+\.)*?)(?:layers\.\d+\.(?:input_layernorm|post_attention_layernorm)\.weight"
    r"|layers\.\d+\.self_attn\.rotary_emb\.inv_freq|rotary_emb\.inv_freq|norm\.weight)"
)


# -- reading the official files -------------------------------------------------------------------------------
class OfficialStateDict(Mapping[str, Tensor]):
    """The tensors of one or more official checkpoint files, under their own names, read when asked for: a
    full-model save holds gigabytes of frozen weights the import only names. ``.bin`` / ``.pt`` / ``.pth`` go
    through ``torch.load(weights_only=True)`` (memory-mapped where the file allows it), ``.safetensors``
    through ``safe_open``. A key in two files is refused."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise OfficialImportError("no checkpoint file given")
        self._where: dict[str, int] = {}
        self._torch: dict[int, Mapping[str, Tensor]] = {}
        self._safe: dict[int, Any] = {}
        for index, path in enumerate(self.paths):
            for key in self._open(index, path):
                if key in self._where:
                    raise OfficialImportError(
                        f"{key!r} is in both {self.paths[self._where[key]]} and {path}: give each tensor once"
                    )
                self._where[key] = index

    def _open(self, index: int, path: Path) -> list[str]:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {'a folder, not a checkpoint file' if path.is_dir() else 'no such file'}")
        suffix = path.suffix.lower()
        if suffix == SAFETENSORS_SUFFIX:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as error:
                raise OfficialImportError(f"{path} is not a readable safetensors file: {error}") from None
            self._safe[index] = handle
            return list(handle.keys())
        if suffix in TORCH_SUFFIXES:
            self._torch[index] = _torch_state_dict(path)
            return list(self._torch[index])
        raise OfficialImportError(
            f"{path}: unknown checkpoint type {suffix!r}; give {', '.join(TORCH_SUFFIXES)} (torch.load) or "
            f"{SAFETENSORS_SUFFIX} files"
        )

    def source(self, key: str) -> Path:
        return self.paths[self._where[key]]

    def __getitem__(self, key: str) -> Tensor:
        index = self._where[key]
        if index in self._safe:
            return self._safe[index].get_tensor(key)
        return self._torch[index][key]

    def __contains__(self, key: object) -> bool:
        return key in self._where  # without reading the tensor (Mapping's default would)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _torch_state_dict(path: Path) -> Mapping[str, Tensor]:
    """A ``torch.save``d state dict, loaded with ``weights_only=True`` (no code from the file runs)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # Files in torch's legacy (non-zip) format cannot be memory-mapped; they are small adapter files.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:  # OSError: truncated
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OfficialImportError(f"{path}: torch.load(weights_only=True) cannot read it: {first_line}") from None
    if not isinstance(state, Mapping):
        raise OfficialImportError(f"{path} holds a {type(state).__name__}, not a state dict (a mapping of tensors)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise OfficialImportError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; give the state dict itself "
                "(a training checkpoint's nested entries are not read)"
            )
    return state


def read_adapter_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The official run's ``adapter_config.json`` (peft_hyper's or peft's ``LoraConfig``) as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such adapter config file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise OfficialImportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise OfficialImportError(f"{path} holds a JSON {type(raw).__name__}, not an adapter config object")
    return raw


# -- the result -----------------------------------------------------------------------------------------------
@dataclass
class ImportedCheckpoint:
    """An official checkpoint in our formats.

    ``adapter_weights``: our adapter state dict (names relative to the backbone, ``moka_train.adapters``'
    contract), with ``adapter_config`` the AdapterConfig it implies (None for ``crab_projector``).
    ``projectors``: modality -> a ``QFormerProjector`` state dict, with its ``ProjectorConfig``.
    ``skipped``: reason -> the official keys not converted for it. ``provenance``: config field -> where its
    value came from (the shapes, adapter_config.json, an option, or the official scripts' default).
    """

    kind: str
    adapter_weights: dict[str, Tensor] = field(default_factory=dict)
    adapter_config: AdapterConfig | None = None
    projectors: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    projector_configs: dict[str, ProjectorConfig] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def tensor_count(self) -> int:
        return len(self.adapter_weights) + sum(len(p) for p in self.projectors.values())

    def parameter_counts(self) -> dict[str, int]:
        counts = {"adapter": sum(t.numel() for t in self.adapter_weights.values())} if self.adapter_weights else {}
        counts.update({f"projector.{m}": sum(t.numel() for t in p.values()) for m, p in self.projectors.items()})
        return counts

    def summary(self) -> str:
        """What was converted, skipped and inferred, and how to load it."""
        counts = self.parameter_counts()
        lines = [f"kind: {self.kind} ({KIND_DESCRIPTIONS[self.kind]})"]
        parts = ([f"adapter {len(self.adapter_weights)}"] if self.adapter_weights else []) + [
            f"projector.{m} {len(p)}" for m, p in self.projectors.items()
        ]
        lines.append(f"converted {self.tensor_count} tensors: {', '.join(parts)}")
        lines.append(
            f"parameters: {sum(counts.values()):,} ("
            + ", ".join(f"{name} {count:,}" for name, count in counts.items())
            + ")"
        )
        if self.skipped:
            lines.append("not converted (by design):")
            for reason, keys in self.skipped.items():
                lines.append(f"  {len(keys)} x {reason}; e.g. {keys[0]}")
        if self.adapter_config is not None:
            config = self.adapter_config.to_dict()
            config.pop("format_version")
            lines.append("adapter config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
        for modality, projector in self.projector_configs.items():
            lines.append(f"projector {modality}: " + ", ".join(f"{k}={v}" for k, v in vars(projector).items()))
        if self.provenance:
            lines.append("where the config values come from:")
            lines += [f"  {name}: {source}" for name, source in self.provenance.items()]
        return "\n".join(lines)


# -- classifying every key ------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Every official key, sorted into what becomes ours and what is skipped."""

    # our module path -> {official LoRA parameter name (e.g. "lora_A0.weight"): official key}
    adapted: dict[str, dict[str, str]] = field(default_factory=dict)
    llm_prefixes: set[str] = field(default_factory=set)
    # modality -> {our projector key: official key}
    projectors: dict[str, dict[str, str]] = field(default_factory=dict)
    projector_prefix: dict[str, str] = field(default_factory=dict)  # modality -> official key prefix
    skipped: dict[str, list[str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def skip(self, reason: str, key: str) -> None:
        self.skipped.setdefault(reason, []).append(key)


def _plan(kind: str, keys: Sequence[str]) -> _Plan:
    layout = _LAYOUTS[kind]
    plan = _Plan()
    for key in sorted(keys):
        if not (_plan_projector(layout, plan, key) or _plan_adapter(layout, plan, key)):
            _plan_frozen(layout, plan, key)
    if plan.unknown:
        first = plan.unknown[0]
        hint = _layout_hint(kind, first)
        raise OfficialImportError(
            f"unexpected key {first!r} for kind {kind!r}"
            + (f" ({hint})" if hint else "")
            + (f"; {len(plan.unknown) - 1} more, e.g. {plan.unknown[1:4]}" if len(plan.unknown) > 1 else "")
        )
    return plan


def _plan_projector(layout: _Layout, plan: _Plan, key: str) -> bool:
    for owner, (modality, stem) in layout.projectors.items():
        for outer in layout.owner_prefixes:
            prefix = f"{outer}{owner}."
            if not key.startswith(prefix):
                continue
            known = plan.projector_prefix.setdefault(modality, prefix)
            if known != prefix:
                raise OfficialImportError(
                    f"the {modality} projector's keys come under two prefixes, {known!r} and {prefix!r} "
                    f"(key {key!r}): give one checkpoint's projector"
                )
            ours, reason = _projector_key(key[len(prefix) :], stem)
            if ours is not None:
                plan.projectors.setdefault(modality, {})[ours] = key
            elif reason is not None:
                plan.skip(reason, key)
            else:
                plan.unknown.append(key)
            return True
    return False


def _plan_adapter(layout: _Layout, plan: _Plan, key: str) -> bool:
    match = _ADAPTED_KEY.fullmatch(key)
    if match is None or match["prefix"] not in layout.llm_prefixes:
        return False
    block, proj, rest = match["block"], match["proj"], match["rest"]
    if proj not in _PROJECTIONS[block]:
        plan.unknown.append(key)
        return True
    if rest in _FROZEN_LINEAR_PARTS:
        plan.skip(SKIP_FROZEN_LLM, key)
        return True
    if rest not in layout.lora:
        plan.unknown.append(key)  # a LoRA name of the other kind, a DoRA magnitude, lora_A3, ...
        return True
    if layout.lora[rest] is None:
        plan.skip(SKIP_VT_IMAGE_B, key)
        return True
    plan.llm_prefixes.add(match["prefix"])
    plan.adapted.setdefault(f"model.layers.{int(match['layer'])}.{block}.{proj}", {})[rest] = key
    return True


def _plan_frozen(layout: _Layout, plan: _Plan, key: str) -> None:
    if key in layout.head_keys:
        plan.skip(SKIP_FROZEN_LLM, key)
        return
    for prefix in layout.llm_prefixes:
        if key == f"{prefix}embed_tokens.weight":
            plan.skip(SKIP_EMBEDDINGS, key)
            return
    match = _FROZEN_LLM_KEY.fullmatch(key)
    if match is not None and match["prefix"] in layout.llm_prefixes:
        plan.skip(SKIP_FROZEN_LLM, key)
        return
    if any(key.startswith(f"{outer}{encoder}.") for outer in layout.owner_prefixes for encoder in layout.encoders):
        plan.skip(SKIP_FROZEN_ENCODER, key)
        return
    plan.unknown.append(key)


def _layout_hint(kind: str, key: str) -> str:
    """A pointer to the right ``kind`` when a key clearly belongs to another one."""
    if re.search(r"\.lora_[AB]\d+\.weight$", key) and kind != "avt":
        return "lora_A0 / lora_B0 are the AVT names: use kind 'avt'"
    if re.search(r"\.lora_[AB]\.(image|text)\.weight$", key) and kind != "vt":
        return "lora_A.image / lora_A.text are the VT names: use kind 'vt'"
    if "lora" in key and kind == "crab_projector":
        return "a Crab stage-1 checkpoint holds no LoRA: use kind 'avt' or 'vt'"
    if kind in _LAYOUTS and _LAYOUTS[kind].lora_help and "lora" in key:
        return _LAYOUTS[kind].lora_help
    return ""


# -- projectors -----------------------------------------------------------------------------------------------
def _projector_rules(stem: str) -> list[tuple[re.Pattern, str | None, str | None]]:
    """(official key pattern relative to the projector, our key template or None, skip reason or None)."""
    q = rf"{stem}_Qformer\.bert\."
    layer = rf"{q}encoder\.layer\.(\d+)\."
    ours = "qformer.encoder.layer."
    wb = r"(weight|bias)"
    rules = [
        (rf"{stem}_ln\.{wb}", r"feature_norm.\1", None),
        (rf"{stem}_query_tokens", "queries", None),
        (rf"{stem}_proj\.([02])\.{wb}", r"mlp.\1.\2", None),
        (rf"{q}embeddings\.LayerNorm\.{wb}", r"qformer.layernorm.\1", None),
        (rf"{layer}(attention|crossattention)\.self\.(query|key|value)\.{wb}", ours + r"\1.\2.attention.\3.\4", None),
        (rf"{layer}(attention|crossattention)\.output\.(dense|LayerNorm)\.{wb}", ours + r"\1.\2.output.\3.\4", None),
        (rf"{layer}intermediate_query\.dense\.{wb}", ours + r"\1.intermediate_query.dense.\2", None),
        (rf"{layer}output_query\.(dense|LayerNorm)\.{wb}", ours + r"\1.output_query.\2.\3", None),
        (rf"{q}embeddings\.(word_embeddings|position_embeddings)\.weight", None, SKIP_QFORMER_TEXT),
        (rf"{q}embeddings\.position_ids", None, SKIP_QFORMER_TEXT),
        (rf"{layer}(intermediate\.dense|output\.dense|output\.LayerNorm)\.{wb}", None, SKIP_QFORMER_TEXT),
        (rf"{stem}_Qformer\.cls\..+", None, SKIP_QFORMER_HEAD),
    ]
    return [(re.compile(pattern), template, reason) for pattern, template, reason in rules]


def _projector_key(inner: str, stem: str) -> tuple[str | None, str | None]:
    """(our key, None) for a converted key, (None, reason) for a skipped one, (None, None) for an unknown one."""
    for pattern, template, reason in _projector_rules(stem):
        match = pattern.fullmatch(inner)
        if match is not None:
            return (match.expand(template) if template is not None else None), reason
    return None, None


def _official_projector_key(ours: str, stem: str) -> str:
    """The official name (relative to the projector) that our projector key comes from: for messages."""
    q = f"{stem}_Qformer.bert."
    layer = f"{q}encoder.layer."
    for pattern, template in (
        (r"feature_norm\.(.+)", rf"{stem}_ln.\1"),
        (r"queries", f"{stem}_query_tokens"),
        (r"mlp\.(.+)", rf"{stem}_proj.\1"),
        (r"qformer\.layernorm\.(.+)", rf"{q}embeddings.LayerNorm.\1"),
        (r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.(.+)", rf"{layer}\1.\2.self.\3"),
        (r"qformer\.encoder\.(.+)", rf"{q}encoder.\1"),
    ):
        match = re.fullmatch(pattern, ours)
        if match is not None:
            return match.expand(template)
    return ours


def _convert_projector(
    modality: str, stem: str, prefix: str, keys: dict[str, str], state: Mapping[str, Tensor], heads: int
) -> tuple[dict[str, Tensor], ProjectorConfig]:
    """Our ``QFormerProjector`` state dict and config from the official tensors (``keys``: ours -> official).
    The config is read from the shapes (all but ``qformer_heads``), then the keys and shapes are checked
    against a projector of that config built on the meta device."""

    def official(ours: str) -> str:
        return keys.get(ours, prefix + _official_projector_key(ours, stem))

    def shape_of(ours: str) -> tuple[int, ...]:
        if ours not in keys:
            raise OfficialImportError(f"the {modality} projector has no {official(ours)!r} (needed for our {ours})")
        return tuple(state[keys[ours]].shape)

    queries = shape_of("queries")
    if len(queries) != 3 or queries[0] != 1:
        raise OfficialImportError(f"{official('queries')} has shape {queries}; expected [1, queries, hidden]")
    layer_ids = {int(m[1]) for k in keys if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.", k))}
    try:
        config = ProjectorConfig(
            encoder_width=shape_of("feature_norm.weight")[0],
            llm_hidden_size=shape_of("mlp.2.weight")[0],
            num_queries=queries[1],
            qformer_layers=max(layer_ids, default=-1) + 1,
            qformer_hidden_size=queries[2],
            qformer_heads=heads,
            qformer_intermediate_size=shape_of("qformer.encoder.layer.0.intermediate_query.dense.weight")[0],
            dropout=OFFICIAL_PROJECTOR_DROPOUT,
        )
    except ValueError as error:
        raise OfficialImportError(f"the {modality} projector: {error}") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in QFormerProjector(config).state_dict().items()}
    missing = [k for k in expected if k not in keys]
    if missing:
        raise OfficialImportError(
            f"the {modality} projector lacks {official(missing[0])!r} (our {missing[0]})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + f"; a projector with {config.qformer_layers} layers and cross-attention in each needs them all"
        )
    extra = [k for k in keys if k not in expected]
    if extra:
        raise OfficialImportError(
            f"unexpected key {keys[extra[0]]!r}: our {modality} projector ({config.qformer_layers} layers) has no "
            f"{extra[0]}"
        )
    weights = {}
    for ours, shape in expected.items():
        tensor = _float_tensor(state, keys[ours])
        if tuple(tensor.shape) != shape:
            raise OfficialImportError(
                f"{keys[ours]!r} has shape {tuple(tensor.shape)}; our {modality} projector's {ours} needs {shape} "
                f"(config inferred from the other tensors: {config})"
            )
        weights[ours] = tensor
    return weights, config


# -- adapters -------------------------------------------------------------------------------------------------
def _convert_adapter(kind: str, plan: _Plan, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int, list[str]]:
    """Our adapter weights, the rank and the target modules, after checking that every adapted linear has
    every official tensor, with shapes that fit one rank, and that the same projections are adapted in every
    layer (our injection adapts by module name, so it cannot leave a layer out)."""
    layout = _LAYOUTS[kind]
    if not plan.adapted:
        raise OfficialImportError(
            f"no {kind.upper()} MokA LoRA keys found ({', '.join(layout.required_lora)} under "
            f"'<llm>layers.N.<block>.<proj>.'); for projectors alone use kind 'crab_projector'"
        )
    if len(plan.llm_prefixes) > 1:
        raise OfficialImportError(f"the LoRA keys come under several prefixes {sorted(plan.llm_prefixes)}")
    prefix = next(iter(plan.llm_prefixes))

    def official_key(module: str, name: str) -> str:
        return prefix + module[len("model.") :] + "." + name

    rank: int | None = None
    rank_source = ""
    weights: dict[str, Tensor] = {}
    for module, params in plan.adapted.items():
        for name in layout.required_lora:
            if name not in params:
                raise OfficialImportError(f"missing key {official_key(module, name)!r}: {layout.lora_help}")
        tensors = {name: _float_tensor(state, key) for name, key in params.items()}
        for name, tensor in tensors.items():
            is_b = layout.lora[name] == "lora_B.weight"
            if tensor.dim() != 2:
                raise OfficialImportError(f"{params[name]!r} has shape {tuple(tensor.shape)}; a LoRA matrix is 2-D")
            this_rank = tensor.shape[1] if is_b else tensor.shape[0]
            if rank is None:
                rank, rank_source = this_rank, params[name]
            elif this_rank != rank:
                raise OfficialImportError(
                    f"{params[name]!r} has shape {tuple(tensor.shape)}: rank {this_rank}, but {rank_source!r} "
                    f"has rank {rank}; our MokA has one rank for every A and the shared B"
                )
        in_features = {tuple(t.shape)[1] for n, t in tensors.items() if layout.lora[n] != "lora_B.weight"}
        if len(in_features) != 1:
            shapes = {params[n]: tuple(t.shape) for n, t in tensors.items()}
            raise OfficialImportError(f"the A matrices of {official_key(module, '')[:-1]!r} disagree: {shapes}")
        for name, tensor in tensors.items():
            weights[f"{module}.{layout.lora[name]}"] = tensor

    layers: dict[int, set[str]] = {}
    for module in plan.adapted:
        _, _, index, _, proj = module.split(".")
        layers.setdefault(int(index), set()).add(proj)
    targets = set().union(*layers.values())
    for index in range(max(layers) + 1):
        absent = sorted(targets - layers.get(index, set()))
        if absent:
            block = next(b for b, projs in _PROJECTIONS.items() if absent[0] in projs)
            module = f"model.layers.{index}.{block}.{absent[0]}"
            raise OfficialImportError(
                f"missing key {official_key(module, layout.required_lora[0])!r}: other layers adapt {absent[0]}, "
                "and our adapter adapts a projection in every layer or in none"
            )
    assert rank is not None
    return weights, rank, [name for name in DEFAULT_TARGET_MODULES if name in targets]


def _float_tensor(state: Mapping[str, Tensor], key: str) -> Tensor:
    """A floating-point tensor as fp32 (our checkpoints' precision; bf16 -> fp32 is exact), contiguous."""
    tensor = state[key]
    if not tensor.is_floating_point():
        raise OfficialImportError(f"{key!r} is a {tensor.dtype} tensor; expected floating-point weights")
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _pick(
    name: str,
    given: Any,
    official_config: Mapping[str, Any] | None,
    config_field: str,
    default: tuple[Any, str],
    provenance: dict[str, str],
) -> Any:
    """An option's value: given explicitly, else the official adapter_config.json's ``config_field``, else the
    official scripts' ``default`` (value, where it is set); where it came from goes into ``provenance``."""
    if given is not None:
        provenance[name] = f"{given} (given)"
        return given
    if official_config is not None and official_config.get(config_field) is not None:
        provenance[name] = f"{official_config[config_field]} (adapter_config.json {config_field})"
        return official_config[config_field]
    provenance[name] = f"{default[0]} ({default[1]})"
    return default[0]


def _check_official_rank(official_config: Mapping[str, Any] | None, rank: int, kind: str) -> None:
    if official_config is None or official_config.get("r") is None:
        return
    r = official_config["r"]
    if kind == "avt":
        # peft_hyper reads the rank's digits: r=444 is three A's of rank 4 (finetune.py L81-84).
        ranks = [int(d) for d in str(r)]
        if any(x != rank for x in ranks) or len(ranks) != 3:
            raise OfficialImportError(
                f"adapter_config.json r={r} gives ranks {ranks} (one digit per A), but the weights have three A's "
                f"of rank {rank}"
            )
        lora_nums = official_config.get("lora_nums")
        if lora_nums is not None and int(lora_nums) != 3:
            raise OfficialImportError(f"adapter_config.json lora_nums={lora_nums}; the AVT weights have 3 A's")
    elif int(r) != rank:
        raise OfficialImportError(f"adapter_config.json r={r}, but the weights have rank {rank}")


def _check_official_targets(official_config: Mapping[str, Any] | None, targets: list[str]) -> None:
    if official_config is None or not isinstance(official_config.get("target_modules"), list):
        return
    # VT lists full module paths ("language_model.layers.0.self_attn.q_proj"), AVT the last name component.
    named = {str(t).rpartition(".")[2] for t in official_config["target_modules"]}
    if named != set(targets):
        raise OfficialImportError(
            f"adapter_config.json target_modules name {sorted(named)}, but the weights adapt {sorted(targets)}"
        )


# -- the conversions ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _MokaSpec:
    """What the official code of one kind fixes, and where (for the summary)."""

    modalities: tuple[str, ...]
    scaling_position: str
    question_keys: str  # which prompt tokens its layer takes as keys (AdapterConfig.question_keys)
    lambda_field: str  # its adapter_config.json field
    defaults: dict[str, tuple[Any, str]]  # option -> (the official value, where it is set)


_MOKA_SPECS = {
    "avt": _MokaSpec(
        modalities=("text", "visual", "audio"),
        scaling_position="before_attention",
        question_keys="span",  # <question_start> ... <question_end>
        lambda_field="blc_weight",
        defaults={
            "alpha": (OFFICIAL_ALPHA, "finetune.py's hard-coded lora_alpha"),
            "cross_attn_lambda": (OFFICIAL_LAMBDA["avt"], "blc_weight in ft_*.sh"),
            "dropout": (OFFICIAL_DROPOUT, "finetune.py's hard-coded lora_dropout; training only"),
        },
    ),
    "vt": _MokaSpec(
        modalities=("text", "visual"),
        scaling_position="after_b",
        question_keys="after_media",  # every unsupervised token after the last image token
        lambda_field="attn_weight",
        defaults={
            "alpha": (OFFICIAL_ALPHA, "train.py's lora_alpha"),
            "cross_attn_lambda": (OFFICIAL_LAMBDA["vt"], "train.py's attn_weight default"),
            "dropout": (OFFICIAL_DROPOUT, "train.py's lora_dropout; training only"),
        },
    ),
}


def convert_avt(
    state: Mapping[str, Tensor],
    *,
    attn_scale: str,
    official_config: Mapping[str, Any] | None = None,
    alpha: float | None = None,
    cross_attn_lambda: float | None = None,
    dropout: float | None = None,
    qformer_heads: int = OFFICIAL_QFORMER_HEADS,
) -> ImportedCheckpoint:
    """An AVT MokA checkpoint (``adapter_model.bin``, optionally with ``non_lora_trainables.bin``'s projectors)
    in our formats, with the AdapterConfig it implies: ``method: moka``, modalities text / visual / audio,
    ``scaling_position: before_attention``, the rank from the shapes, alpha 16, lambda 1 and dropout 0.05
    unless ``official_config`` (its adapter_config.json: ``lora_alpha``, ``blc_weight``, ``lora_dropout``) or
    the arguments say otherwise. ``attn_scale`` is not recorded anywhere and must be given."""
    return _convert_moka(
        "avt", state, attn_scale, official_config, alpha, cross_attn_lambda, dropout, qformer_heads,
        attn_scale_source="given: the checkpoint does not record it",
    )  # fmt: skip


def convert_vt(
    state: Mapping[str, Tensor],
    *,
    attn_scale: str = "rank",
    official_config: Mapping[str, Any] | None = None,
    alpha: float | None = None,
    cross_attn_lambda: float | None = None,
    dropout: float | None = None,
    qformer_heads: int = OFFICIAL_QFORMER_HEADS,
) -> ImportedCheckpoint:
    """A VT MokA checkpoint (the HF Trainer's full save of the PeftMixedModel) in our formats: the ``text`` /
    ``image`` adapters and the ``multi_modal_projector``, with the AdapterConfig it implies: ``method: moka``,
    modalities text / visual, ``scaling_position: after_b``, ``attn_scale: rank`` (its code's d_k = r),
    ``question_keys: after_media`` (its question mask: every unsupervised token after the image), the rank from
    the shapes, alpha 16, lambda 0.05 (``attn_weight``) and dropout 0.05 unless ``official_config``
    (``lora_alpha``, ``attn_weight``, ``lora_dropout``) or the arguments say otherwise."""
    for option in ("use_rslora", "use_dora"):
        if official_config is not None and official_config.get(option):
            raise OfficialImportError(f"adapter_config.json sets {option}; the VT MokA layer and ours do not use it")
    return _convert_moka(
        "vt", state, attn_scale, official_config, alpha, cross_attn_lambda, dropout, qformer_heads,
        attn_scale_source="the VT layer divides by sqrt(r)" if attn_scale == "rank" else "given",
    )  # fmt: skip


def _convert_moka(
    kind: str,
    state: Mapping[str, Tensor],
    attn_scale: str,
    official_config: Mapping[str, Any] | None,
    alpha: float | None,
    cross_attn_lambda: float | None,
    dropout: float | None,
    qformer_heads: int,
    attn_scale_source: str,
) -> ImportedCheckpoint:
    spec = _MOKA_SPECS[kind]
    if attn_scale not in ATTN_SCALES:
        raise OfficialImportError(f"attn_scale must be one of {ATTN_SCALES}, got {attn_scale!r}")
    plan = _plan(kind, list(state))
    weights, rank, targets = _convert_adapter(kind, plan, state)
    result = _with_projectors(kind, plan, state, qformer_heads)
    _check_official_rank(official_config, rank, kind)
    _check_official_targets(official_config, targets)
    provenance = {"rank": f"{rank} (the lora_A / lora_B shapes)"}
    alpha = _pick("alpha", alpha, official_config, "lora_alpha", spec.defaults["alpha"], provenance)
    lam = _pick(
        "cross_attn_lambda", cross_attn_lambda, official_config, spec.lambda_field,
        spec.defaults["cross_attn_lambda"], provenance,
    )  # fmt: skip
    dropout = _pick("dropout", dropout, official_config, "lora_dropout", spec.defaults["dropout"], provenance)
    provenance["attn_scale"] = f"{attn_scale} ({attn_scale_source})"
    provenance["scaling_position"] = f"{spec.scaling_position} (where the official {kind.upper()} layer applies s)"
    provenance["question_keys"] = f"{spec.question_keys} (the official {kind.upper()} code's question mask)"
    try:
        config = AdapterConfig(
            method="moka",
            rank=rank,
            alpha=float(alpha),
            dropout=float(dropout),
            target_modules=targets,
            modalities=list(spec.modalities),
            cross_attn_lambda=float(lam),
            attn_scale=attn_scale,
            scaling_position=spec.scaling_position,
            question_keys=spec.question_keys,
        )
    except (TypeError, ValueError) as error:
        raise OfficialImportError(f"the implied adapter config is invalid: {error}") from None
    result.adapter_weights = weights
    result.adapter_config = config
    result.provenance = {**provenance, **result.provenance}
    return result


def convert_crab_projectors(
    state: Mapping[str, Tensor], *, qformer_heads: int = OFFICIAL_QFORMER_HEADS
) -> ImportedCheckpoint:
    """Crab's stage-1 projectors (``model.vl_projector.`` -> visual, ``model.al_projector.`` -> audio) in our
    ``QFormerProjector`` format, their configs read from the shapes (``qformer_heads`` excepted)."""
    plan = _plan("crab_projector", list(state))
    result = _with_projectors("crab_projector", plan, state, qformer_heads)
    if not result.projectors:
        raise OfficialImportError("no projector keys found (model.vl_projector.* or model.al_projector.*)")
    return result


def convert_official(kind: str, state: Mapping[str, Tensor], **options: Any) -> ImportedCheckpoint:
    """Dispatch on ``kind`` (``KINDS``) to ``convert_avt``, ``convert_vt`` or ``convert_crab_projectors``."""
    converters = {"avt": convert_avt, "vt": convert_vt, "crab_projector": convert_crab_projectors}
    if kind not in converters:
        raise OfficialImportError(f"kind must be one of {KINDS}, got {kind!r}")
    return converters[kind](state, **options)


def _with_projectors(kind: str, plan: _Plan, state: Mapping[str, Tensor], heads: int) -> ImportedCheckpoint:
    result = ImportedCheckpoint(kind=kind, skipped=plan.skipped)
    stems = {modality: stem for modality, stem in _LAYOUTS[kind].projectors.values()}
    for modality in sorted(plan.projector_prefix):
        keys = plan.projectors.get(modality, {})
        weights, config = _convert_projector(
            modality, stems[modality], plan.projector_prefix[modality], keys, state, heads
        )
        result.projectors[modality] = weights
        result.projector_configs[modality] = config
        result.provenance[f"projector.{modality}.qformer_heads"] = f"{heads} (not in the shapes; bert-base has 12)"
    return result


# -- writing --------------------------------------------------------------------------------------------------
def write_imported(
    result: ImportedCheckpoint, directory: str | os.PathLike, sources: Sequence[str | os.PathLike] = ()
) -> Path:
    """Write ``result`` as a trainables checkpoint (``moka_train.models.trainables``): ``trainables.safetensors``
    with ``projectors.<modality>.<key>``, ``trainables.json`` (written last) and, for ``avt`` / ``vt``, the
    adapter in ``moka_train.adapters.checkpoint``'s layout under ``adapter/``. No added-token rows are written
    (``added_token_ids`` is empty): loading it keeps the model's own rows. The manifest also records
    ``imported_from`` (kind, sources, what was skipped, where config values came from). ``directory`` must be
    new or empty."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise OfficialImportError(f"{directory} exists and is not an empty folder; choose a new output folder")
    directory.mkdir(parents=True, exist_ok=True)
    if result.adapter_weights:
        assert result.adapter_config is not None
        adapter_dir = directory / ADAPTER_DIR
        adapter_dir.mkdir()
        weights = dict(result.adapter_weights)
        write_atomic(adapter_dir / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
        config = {"library": "moka_train", **result.adapter_config.to_dict(), "base_model_name_or_path": None}
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        write_text_atomic(adapter_dir / ADAPTER_CONFIG_NAME, text)
    state = {
        f"projectors.{modality}.{key}": tensor
        for modality, weights in result.projectors.items()
        for key, tensor in weights.items()
    }
    write_atomic(directory / TRAINABLES_WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    manifest = {
        "format_version": TRAINABLES_FORMAT_VERSION,
        "added_token_ids": [],
        "projectors": {m: dataclasses.asdict(c) for m, c in result.projector_configs.items()},
        "adapter": bool(result.adapter_weights),
        "imported_from": {
            "kind": result.kind,
            "sources": [str(s) for s in sources],
            "skipped": {reason: len(keys) for reason, keys in result.skipped.items()},
            "provenance": result.provenance,
        },
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_text_atomic(directory / MANIFEST_NAME, text)
    return directory
