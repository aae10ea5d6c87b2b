"""AdapterConfig: everything that defines an adapter and is saved with it. Field names are a stable format."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moka_train.modality import Modality

# Bump when the saved layout changes; loaders refuse versions they do not know.
FORMAT_VERSION = 1

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_SCALES = ("question_tokens", "rank")
SCALING_POSITIONS = ("after_b", "before_attention")
# Which prompt tokens are the interaction's keys, i.e. the collator's question_mask (see ``question_keys`` below).
QUESTION_KEYS = ("span", "after_media")


@dataclass
class AdapterConfig:
    """One adapter, for every method.

    - ``method``: a registered method (``moka``, ``moka_no_ca``, ``text_query``, ``naive``, ``lora``, ``dora``,
      ``multi_lora``, ``uni_lora``, ``loramoe``, ``hydralora``, ``uni_mm_lora``, ``uni_mm_lora_gate``; see
      ``available_methods()``).
    - ``rank``: r, or a ``{modality: r}`` mapping for the methods with one B per modality.
    - ``alpha``: the LoRA scaling is ``alpha / r``.
    - ``dropout``: dropout on the input of A (the LoRA convention).
    - ``target_modules``: names of the ``nn.Linear`` layers to adapt, matched on the last name component.
    - ``modalities``: the modalities that get their own A (and B, where the method has one per modality);
      ``text`` is required by every modality-aware method, since prompt tokens are text.
    - ``cross_attn_lambda``: the fixed weight of the interaction term, one float or ``{modality: float}``
      (1.0 in the official audio-visual setting, 0.05 in the visual-text one).
    - ``attn_scale``: ``question_tokens`` (1/sqrt of the sample's number of key tokens, the paper) or
      ``rank`` (1/sqrt(r), the newest official code).
    - ``scaling_position``: ``after_b`` (h = W0 x + s B a') or ``before_attention`` (the official
      audio-visual code: s multiplies every A output before the interaction, nothing after B).
    - ``question_keys``: which prompt tokens the interaction's keys are (the collator's ``question_mask``; kept
      here so that training and evaluation use the same): ``span`` (the prompt's marked question span: the paper,
      the official audio-visual code) or ``after_media`` (every unsupervised prompt token after the last media
      token, the chat template's included: the official visual-text code).
    - ``num_experts``: the experts (LoRAMoE) or B heads (HydraLoRA) of the mixture methods; None: one per
      configured modality.
    - ``aux_loss_weight``: the weight of a method's auxiliary training loss (LoRAMoE's load balancing); methods
      without one ignore it.
    """

    method: str = "moka"
    rank: int | dict[str, int] = 4
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    modalities: list[str] = field(default_factory=lambda: ["text", "visual", "audio"])
    cross_attn_lambda: float | dict[str, float] = 1.0
    attn_scale: str = "question_tokens"
    scaling_position: str = "after_b"
    question_keys: str = "span"
    num_experts: int | None = None
    aux_loss_weight: float = 0.01

    def __post_init__(self) -> None:
        # Normalise what Hydra / JSON hand us (ListConfig, tuples, upper-case names) before validating.
        self.target_modules = [str(name) for name in self.target_modules]
        names = [Modality.parse(m) for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"AdapterConfig.modalities has duplicates: {list(self.modalities)}")
        self.modalities = [m.key for m in sorted(names)]
        if isinstance(self.rank, Mapping):
            self.rank = {Modality.parse(k).key: _whole(v, f"rank.{k}") for k, v in self.rank.items()}
        else:
            self.rank = _whole(self.rank, "rank")
        if isinstance(self.cross_attn_lambda, Mapping):
            self.cross_attn_lambda = {Modality.parse(k).key: float(v) for k, v in self.cross_attn_lambda.items()}
        else:
            self.cross_attn_lambda = float(self.cross_attn_lambda)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        self.num_experts = None if self.num_experts is None else _whole(self.num_experts, "num_experts")
        self.aux_loss_weight = float(self.aux_loss_weight)
        self.validate()

    def validate(self) -> None:
        from moka_train.adapters.registry import get_method

        layer_cls = get_method(self.method)
        if not self.target_modules:
            raise ValueError("AdapterConfig.target_modules is empty")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            # alpha = 0 would silence the adapter (and MokA folds 1 / s^2 into its attention logits)
            raise ValueError(f"AdapterConfig.alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.attn_scale not in ATTN_SCALES:
            raise ValueError(f"AdapterConfig.attn_scale must be one of {ATTN_SCALES}, got {self.attn_scale!r}")
        if self.scaling_position not in SCALING_POSITIONS:
            raise ValueError(
                f"AdapterConfig.scaling_position must be one of {SCALING_POSITIONS}, got {self.scaling_position!r}"
            )
        if self.question_keys not in QUESTION_KEYS:
            raise ValueError(f"AdapterConfig.question_keys must be one of {QUESTION_KEYS}, got {self.question_keys!r}")
        if layer_cls.uses_modalities and "text" not in self.modalities:
            raise ValueError(f"method {self.method!r} needs 'text' in AdapterConfig.modalities (prompts are text)")
        if isinstance(self.rank, dict):
            if not layer_cls.per_modality_rank:
                raise ValueError(
                    f"method {self.method!r} takes one rank (an int): per-modality ranks need one B per "
                    "modality (multi_lora, uni_lora)"
                )
            missing = [m for m in self.modalities if m not in self.rank]
            extra = [m for m in self.rank if m not in self.modalities]
            if missing or extra:
                raise ValueError(
                    f"AdapterConfig.rank must give one rank per modality {self.modalities}; "
                    f"missing {missing}, not configured {extra}"
                )
        for modality in self.modalities:
            if self.rank_for(modality) < 1:
                raise ValueError(f"AdapterConfig.rank must be >= 1, got {self.rank}")
        if self.num_experts is not None and self.num_experts < 1:
            raise ValueError(f"AdapterConfig.num_experts must be >= 1 or None, got {self.num_experts}")
        if self.aux_loss_weight < 0:
            raise ValueError(f"AdapterConfig.aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        if isinstance(self.cross_attn_lambda, dict):
            extra = [m for m in self.cross_attn_lambda if m not in self.modalities]
            if extra:
                raise ValueError(
                    f"AdapterConfig.cross_attn_lambda names modalities {extra} that are not in "
                    f"AdapterConfig.modalities {self.modalities}"
                )

    def rank_for(self, modality: str) -> int:
        return self.rank[modality] if isinstance(self.rank, dict) else self.rank

    def scaling_for(self, modality: str) -> float:
        return self.alpha / self.rank_for(modality)

    @property
    def experts(self) -> int:
        """The number of experts / heads of the mixture methods: ``num_experts``, else one per modality."""
        return self.num_experts if self.num_experts is not None else len(self.modalities)

    def lambda_for(self, modality: str) -> float:
        """The interaction weight of a modality (0.0 for a modality missing from a per-modality mapping)."""
        if isinstance(self.cross_attn_lambda, dict):
            return self.cross_attn_lambda.get(modality, 0.0)
        return self.cross_attn_lambda

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Inverse of ``to_dict``; refuses unknown fields and format versions newer than this library."""
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if int(version) > FORMAT_VERSION:
            raise ValueError(
                f"adapter format_version {version} is newer than this moka_train supports ({FORMAT_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def _whole(value: Any, name: str) -> int:
    """A count from Hydra or JSON as an int: ``4`` or ``4.0``; ``4.7``, ``true`` or ``"abc"`` are refused rather
    than silently read as 4, 1 or a bare ``int()`` error."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value % 1:
        raise ValueError(f"AdapterConfig.{name} must be a positive integer, got {value!r}")
    return int(value)
