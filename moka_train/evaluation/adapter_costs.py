"""The adapter cost table: how many parameters each adapter method trains on each backbone, per setting.

    from moka_train.evaluation.adapter_costs import adapter_costs, backbone_from_preset, to_markdown
    table = adapter_costs([backbone_from_preset("llama2_7b_chat")], ["audio_visual"], ["lora", "moka"])
    print(to_markdown(table))

The numbers are the library's own, not a formula: each backbone is built from its shapes on PyTorch's meta
device (parameters with a shape and no storage, so a 7B model costs no memory and about 20 ms), the method's
adapter is put in with ``inject_adapters`` exactly as training does, and ``count_parameters`` counts it. A
formula written here could drift from what the methods really allocate; this cannot.

Where the inputs come from, so that the table follows the configs a run uses:

- a backbone's shapes: the ``architecture:`` block of a model preset (``configs/model/<name>.yaml``, the
  published config.json's fields; the weights are never needed), the config fields of a tiny
  ``build_random_backbone`` preset, or a user's local checkpoint directory (its config.json, read as
  ``load_backbone`` would read it);
- a setting's modalities: ``adapter.modalities`` of the shared experiment file of that setting
  (``configs/experiment/_shared/{av,vt,speech}_instruct.yaml``);
- a method's hyperparameters (rank, alpha, target modules): its adapter preset (``configs/adapter/<method>.yaml``),
  else ``AdapterConfig``'s defaults (rank 4, alpha 16, the seven linear layers of a decoder block).

Projector parameters are the same whatever the adapter, so they are not part of this table.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from moka_train.adapters import AdapterConfig, adapted_layers, available_methods, count_parameters, inject_adapters
from moka_train.models.backbones import LOADERS, RANDOM_MODEL_TYPES
from moka_train.models.qwen2_5_vl_text import MODEL_TYPE as QWEN2_5_VL_MODEL_TYPE
from moka_train.models.qwen2_5_vl_text import qwen2_config_from_qwen2_5_vl

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
MODEL_PRESET_DIR = CONFIG_DIR / "model"
ADAPTER_PRESET_DIR = CONFIG_DIR / "adapter"
SHARED_EXPERIMENT_DIR = CONFIG_DIR / "experiment" / "_shared"

# Setting -> the shared experiment file whose ``adapter.modalities`` the paper's cells of that setting train with.
SETTINGS = {"audio_visual": "av_instruct", "visual_text": "vt_instruct", "speech_text": "speech_instruct"}
SETTING_TITLES = {"audio_visual": "Audio-visual", "visual_text": "Visual-text", "speech_text": "Speech-text"}

# The paper's row order (its Tables 1-3, then MokA's Table 4 variants); other registered methods follow,
# alphabetically, so a new method shows up without editing this list.
METHOD_ORDER = (
    "lora", "multi_lora", "loramoe", "dora", "hydralora", "uni_lora", "uni_mm_lora", "uni_mm_lora_gate", "moka",
    "moka_no_ca", "text_query", "naive",
)  # fmt: skip

# The default columns in the paper's order of backbones (LLaMA-2, LLaMA-3, Qwen2, then Qwen2.5 and Qwen2.5-VL's
# language model); other presets with an architecture block follow, alphabetically.
PRESET_ORDER = (
    "llama2_7b_chat",
    "llama3_8b_instruct",
    "qwen2_7b_instruct",
    "qwen2_5_7b_instruct",
    "qwen2_5_vl_7b_instruct_lm",
)

# The build_random_backbone arguments of a tiny preset that are not config.json fields.
RANDOM_BACKBONE_EXTRAS = ("_target_", "seed", "dtype")
RANDOM_BACKBONE_TARGET = "moka_train.models.backbones.build_random_backbone"

META = "meta"


# ------------------------------------------------------------------------------------------------ backbones
@dataclass
class Backbone:
    """A backbone to count on: its label in the table, its transformers config, and where the shapes came from."""

    name: str
    config: PretrainedConfig
    source: str


def model_presets() -> dict[str, Path]:
    """Every model preset in ``configs/model``, by name."""
    if not MODEL_PRESET_DIR.is_dir():
        raise FileNotFoundError(
            f"{MODEL_PRESET_DIR} is missing: the cost table reads the presets of a source checkout of moka-train"
        )
    return {path.stem: path for path in sorted(MODEL_PRESET_DIR.glob("*.yaml"))}


def preset_architecture(name: str) -> dict[str, Any] | None:
    """The config.json fields of model preset ``name``: its ``architecture:`` block, or the config fields of a
    tiny ``build_random_backbone`` preset; None for a preset that names no shapes."""
    preset = OmegaConf.load(model_presets()[name])
    if preset.get("architecture") is not None:
        return OmegaConf.to_container(preset.architecture, resolve=True)
    backbone = preset.get("backbone")
    if backbone is not None and backbone.get("_target_") == RANDOM_BACKBONE_TARGET:
        fields = OmegaConf.to_container(backbone, resolve=True)
        return {key: value for key, value in fields.items() if key not in RANDOM_BACKBONE_EXTRAS}
    return None


def countable_presets() -> dict[str, dict[str, Any]]:
    """Presets whose shapes are known, by name -> their config.json fields."""
    found = {name: preset_architecture(name) for name in model_presets()}
    return {name: arch for name, arch in found.items() if arch is not None}


def default_preset_names() -> list[str]:
    """The presets of real backbones (those with an ``architecture:`` block): the table's default columns."""
    names = {name for name, path in model_presets().items() if OmegaConf.load(path).get("architecture") is not None}
    first = [name for name in PRESET_ORDER if name in names]
    return first + sorted(names - set(first))


def backbone_from_preset(name: str) -> Backbone:
    """The backbone of model preset ``name``; a ValueError names the presets that can be counted."""
    known = countable_presets()
    if name not in known:
        raise ValueError(f"unknown model preset {name!r}; known presets (with shapes): {', '.join(sorted(known))}")
    source = f"configs/model/{name}.yaml"
    return Backbone(name, config_from_architecture(known[name], source), source)


def config_from_architecture(architecture: Mapping[str, Any], where: str = "architecture") -> PretrainedConfig:
    """A transformers config from config.json fields (``model_type`` among them)."""
    fields = dict(architecture)
    model_type = fields.pop("model_type", None)
    # Only types that AutoModelForCausalLM builds as the same model load_backbone returns: a qwen2_5_vl config
    # would build the whole vision-language model, whose language model loads as qwen2 (qwen2_5_vl_text.py).
    if model_type not in RANDOM_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type must be one of {RANDOM_MODEL_TYPES}, got {model_type!r} (Qwen2.5-VL's language "
            "model is counted as qwen2, which is what it loads as)"
        )
    return AutoConfig.for_model(model_type, **fields)


def backbone_from_checkpoint(path: str | os.PathLike, name: str | None = None) -> Backbone:
    """The backbone of a local Hugging Face checkpoint (its directory, or the config.json in it), read as
    ``load_backbone`` reads it: llama and qwen2 through ``AutoConfig``, Qwen2.5-VL as its language model."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    if not (path.is_dir() or path.name == "config.json") or not config_file.is_file():
        raise FileNotFoundError(f"{path}: expected a checkpoint directory holding config.json, or that config.json")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type not in LOADERS:
        raise ValueError(f"{config_file}: model_type {model_type!r}; the backbones moka-train loads: {sorted(LOADERS)}")
    if model_type == QWEN2_5_VL_MODEL_TYPE:
        config = qwen2_config_from_qwen2_5_vl(directory)
    else:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    return Backbone(name or directory.resolve().name, config, str(config_file))


def build_meta_backbone(config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM of ``config`` with every parameter on the meta device: shapes, no storage, no init cost."""
    with torch.device(META):
        return AutoModelForCausalLM.from_config(config)


# ------------------------------------------------------------------------------------------------ settings
def setting_modalities(setting: str) -> list[str]:
    """The adapter modalities of ``setting`` (``audio_visual``, ``visual_text``, ``speech_text``), as its shared
    experiment file sets them."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; known settings: {', '.join(SETTINGS)}")
    path = SHARED_EXPERIMENT_DIR / f"{SETTINGS[setting]}.yaml"
    modalities = OmegaConf.select(OmegaConf.load(path), "adapter.modalities")
    if modalities is None:
        raise ValueError(f"{path} sets no adapter.modalities")
    return [str(m) for m in modalities]


def ordered_methods(methods: Iterable[str] | None = None) -> list[str]:
    """``methods`` (default: every registered method) in the paper's row order, others after, alphabetically."""
    chosen = set(available_methods() if methods is None else methods)
    first = [m for m in METHOD_ORDER if m in chosen]
    return first + sorted(chosen - set(first))


def adapter_config(method: str, modalities: Sequence[str], rank: int | None = None) -> tuple[AdapterConfig, str]:
    """The method's adapter for a setting: its preset's hyperparameters (``configs/adapter/<method>.yaml``, else
    ``AdapterConfig``'s defaults) with the setting's modalities, and ``rank`` if given. Returns it with its
    source. Raises ValueError when the method cannot take these modalities."""
    preset = ADAPTER_PRESET_DIR / f"{method}.yaml"
    fields: dict[str, Any] = {"method": method}
    source = "AdapterConfig defaults"
    if preset.is_file():
        fields = OmegaConf.to_container(OmegaConf.load(preset), resolve=True)
        fields.pop("_target_", None)
        source = f"configs/adapter/{method}.yaml"
    fields["modalities"] = list(modalities)
    # The experiments override cross_attn_lambda per setting; a per-modality mapping from a preset could name a
    # modality this setting lacks, and the weight allocates nothing, so the preset's value is not needed here.
    fields.pop("cross_attn_lambda", None)
    if rank is not None:
        fields["rank"] = rank
    return AdapterConfig(**fields), source


# ------------------------------------------------------------------------------------------------ counting
@dataclass(frozen=True)
class AdapterCount:
    """One adapter on one backbone: its parameters, the backbone's (each shared tensor once), and the A and B
    matrices of one adapted linear layer."""

    adapter: int
    backbone: int
    matrices_a: int
    matrices_b: int


def count_adapter(config: PretrainedConfig, adapter: AdapterConfig) -> AdapterCount:
    """Inject ``adapter`` into the meta-device backbone of ``config`` and count with ``count_parameters``."""
    model = build_meta_backbone(config)
    backbone = count_parameters(model).total
    inject_adapters(model, adapter)
    counts = count_parameters(model)
    if counts.total - counts.adapter != backbone:
        raise AssertionError(f"{adapter.method}: the backbone's count changed when adapters were put in")
    _, layer = next(adapted_layers(model))
    names = [name for name, _ in layer.adapter_parameters()]
    return AdapterCount(
        adapter=counts.adapter,
        backbone=backbone,
        matrices_a=sum(name.startswith("lora_A") for name in names),
        matrices_b=sum(name.startswith("lora_B") for name in names),
    )


@dataclass(frozen=True)
class CostRow:
    """One cell of the table: ``method``'s adapter on ``backbone`` in ``setting``."""

    backbone: str
    setting: str
    method: str
    modalities: tuple[str, ...]
    rank: int | dict[str, int]
    alpha: float
    target_modules: tuple[str, ...]
    adapter_parameters: int
    backbone_parameters: int
    matrices_a: int
    matrices_b: int
    hyperparameters_from: str

    @property
    def percent_of_backbone(self) -> float:
        return 100.0 * self.adapter_parameters / self.backbone_parameters


@dataclass(frozen=True)
class SkippedCell:
    """A method that could not be built for a backbone and setting, with the reason."""

    backbone: str
    setting: str
    method: str
    reason: str


@dataclass
class CostTable:
    """The counted cells and the skipped ones, in the order they were asked for."""

    backbones: list[Backbone]
    settings: list[str]
    methods: list[str]
    rows: list[CostRow] = field(default_factory=list)
    skipped: list[SkippedCell] = field(default_factory=list)

    def row(self, backbone: str, setting: str, method: str) -> CostRow | None:
        for row in self.rows:
            if (row.backbone, row.setting, row.method) == (backbone, setting, method):
                return row
        return None


def adapter_costs(
    backbones: Sequence[Backbone],
    settings: Sequence[str] = tuple(SETTINGS),
    methods: Sequence[str] | None = None,
    rank: int | None = None,
) -> CostTable:
    """Count every method's adapter on every backbone in every setting (``methods`` None: every registered one).

    A method whose ``AdapterConfig`` cannot be built for a setting (or that cannot be put into a backbone, e.g.
    its target modules are not there) is skipped with the reason; other errors propagate.
    """
    methods = ordered_methods(methods)
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise ValueError(f"unknown adapter methods {unknown}; known methods: {', '.join(available_methods())}")
    table = CostTable(list(backbones), list(settings), methods)
    # Presets of the same shapes (Qwen2, Qwen2.5 and Qwen2.5-VL's language model) give the same count: build once.
    counted: list[tuple[PretrainedConfig, AdapterConfig, AdapterCount]] = []

    def count(backbone: PretrainedConfig, adapter: AdapterConfig) -> AdapterCount:
        for seen_backbone, seen_adapter, seen in counted:
            if seen_backbone == backbone and seen_adapter == adapter:
                return seen
        counted.append((backbone, adapter, count_adapter(backbone, adapter)))
        return counted[-1][2]

    for setting in settings:
        modalities = setting_modalities(setting)
        for method in methods:
            try:
                config, source = adapter_config(method, modalities, rank)
            except ValueError as error:
                table.skipped += [SkippedCell(b.name, setting, method, str(error)) for b in backbones]
                continue
            for backbone in backbones:
                try:
                    result = count(backbone.config, config)
                except (ValueError, TypeError) as error:
                    table.skipped.append(SkippedCell(backbone.name, setting, method, str(error)))
                    continue
                table.rows.append(
                    CostRow(
                        backbone=backbone.name,
                        setting=setting,
                        method=method,
                        modalities=tuple(config.modalities),
                        rank=config.rank,
                        alpha=config.alpha,
                        target_modules=tuple(config.target_modules),
                        adapter_parameters=result.adapter,
                        backbone_parameters=result.backbone,
                        matrices_a=result.matrices_a,
                        matrices_b=result.matrices_b,
                        hyperparameters_from=source,
                    )
                )
    return table


# ------------------------------------------------------------------------------------------------ output
def human_count(count: int) -> str:
    """Three significant digits with a unit: 9,994,240 -> ``9.99 M``, 6,738,415,616 -> ``6.74 B``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            value = count / size
            decimals = 2 if value < 10 else 1 if value < 100 else 0
            return f"{value:.{decimals}f} {unit}"
    return str(count)


def _hyperparameters(row: CostRow) -> str:
    return f"rank {row.rank}, alpha {row.alpha:g}, targets {', '.join(row.target_modules)}"


def to_markdown(table: CostTable) -> str:
    """One Markdown table per setting: a row per method, a column per backbone, cells ``19.1 M (0.28 %)``
    (adapter parameters and their share of the backbone's), and the A / B matrices per adapted layer."""
    parts = []
    names = [b.name for b in table.backbones]
    for setting in table.settings:
        rows = [row for row in table.rows if row.setting == setting]
        modalities = ", ".join(rows[0].modalities) if rows else ", ".join(setting_modalities(setting))
        parts.append(f"### {SETTING_TITLES.get(setting, setting)} ({modalities})\n")
        hyper = {_hyperparameters(row) for row in rows}
        if len(hyper) == 1:
            parts.append(f"Adapter parameters (share of the backbone's); {hyper.pop()}.\n")
        else:
            parts.append("Adapter parameters (share of the backbone's); hyperparameters per row.\n")
        totals = {row.backbone: row.backbone_parameters for row in rows}
        header = [f"{name} ({human_count(totals[name])})" if name in totals else name for name in names]
        extra = ["hyperparameters"] if len(hyper) > 1 else []
        parts.append("| method | A / B per layer | " + " | ".join(header + extra) + " |")
        parts.append("| --- | :---: | " + " | ".join(["---:"] * len(header) + ["---"] * len(extra)) + " |")
        for method in table.methods:
            cells = [table.row(name, setting, method) for name in names]
            found = [cell for cell in cells if cell is not None]
            if not found:
                continue
            matrices = {f"{cell.matrices_a} / {cell.matrices_b}" for cell in found}
            values = [
                f"{human_count(c.adapter_parameters)} ({c.percent_of_backbone:.2f} %)" if c else "skipped"
                for c in cells
            ]
            values += [_hyperparameters(found[0])] if extra else []
            parts.append(f"| {method} | {', '.join(sorted(matrices))} | " + " | ".join(values) + " |")
        skipped = [s for s in table.skipped if s.setting == setting]
        if skipped:
            parts.append("")
            parts += [f"- skipped: {s.method} on {s.backbone}: {s.reason}" for s in skipped]
        parts.append("")
    parts.append(
        "Counted by moka_train's `inject_adapters` + `count_parameters` on each backbone built on the meta device "
        "from its shapes (no weights). Backbone totals count tied tensors once; projectors are the same for every "
        "method and are not included."
    )
    return "\n".join(parts) + "\n"


CSV_FIELDS = (
    "backbone",
    "setting",
    "method",
    "modalities",
    "rank",
    "alpha",
    "target_modules",
    "adapter_parameters",
    "backbone_parameters",
    "percent_of_backbone",
    "a_matrices_per_layer",
    "b_matrices_per_layer",
    "hyperparameters_from",
    "skipped",
)


def to_csv(table: CostTable) -> str:
    """Every cell with exact counts (one line per backbone, setting and method; skipped ones with the reason)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in table.rows:
        writer.writerow(
            [
                row.backbone,
                row.setting,
                row.method,
                " ".join(row.modalities),
                json.dumps(row.rank) if isinstance(row.rank, dict) else row.rank,
                f"{row.alpha:g}",
                " ".join(row.target_modules),
                row.adapter_parameters,
                row.backbone_parameters,
                f"{row.percent_of_backbone:.6f}",
                row.matrices_a,
                row.matrices_b,
                row.hyperparameters_from,
                "",
            ]
        )
    for skip in table.skipped:
        writer.writerow([skip.backbone, skip.setting, skip.method, *[""] * (len(CSV_FIELDS) - 4), skip.reason])
    return buffer.getvalue()


def write_outputs(table: CostTable, out_dir: str | os.PathLike) -> list[Path]:
    """``adapter_costs.md`` and ``adapter_costs.csv`` in ``out_dir`` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown, table_csv = out / "adapter_costs.md", out / "adapter_costs.csv"
    markdown.write_text(to_markdown(table), encoding="utf-8")
    table_csv.write_text(to_csv(table), encoding="utf-8")
    return [markdown, table_csv]
