"""The adapter cost table (moka_train/evaluation/adapter_costs.py, scripts/adapter_costs.py).

The counts come from the library (inject_adapters + count_parameters on meta-device backbones); here they are
checked against formulas written from the published config.json shapes, against really instantiated tiny
backbones, and against the published parameter totals. Everything runs on the meta device: seconds, no memory.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moka_train.adapters import available_methods, count_parameters, inject_adapters
from moka_train.evaluation import adapter_costs as costs
from moka_train.evaluation.adapter_costs import (
    adapter_config,
    adapter_costs,
    backbone_from_checkpoint,
    backbone_from_preset,
    build_meta_backbone,
    count_adapter,
    default_preset_names,
    human_count,
    setting_modalities,
    to_markdown,
)
from tests.helpers import loaded_script

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "adapter_costs.py"
RANK = 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The published config.json values (Hugging Face: meta-llama/Llama-2-7b-chat-hf, meta-llama/Meta-Llama-3-8B-Instruct,
# Qwen/Qwen2-7B-Instruct, Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct's text fields), written out here
# independently of the presets so that a typo in a preset shows.
LLAMA2 = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    tie_word_embeddings=False,
)
LLAMA3 = {**LLAMA2, "vocab_size": 128256, "intermediate_size": 14336, "num_key_value_heads": 8}
QWEN2 = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
PUBLISHED = {
    "llama2_7b_chat": LLAMA2,
    "llama3_8b_instruct": LLAMA3,
    "qwen2_7b_instruct": QWEN2,
    "qwen2_5_7b_instruct": QWEN2,
    "qwen2_5_vl_7b_instruct_lm": QWEN2,  # its language model, counted as the qwen2 it loads as
}
# Qwen2 puts a bias on q, k and v (transformers' Qwen2Attention); LLaMA has none.
QKV_BIAS = {"llama": False, "qwen2": True}
# The model cards' totals: Llama-2-7B 6.74 B, Llama-3-8B 8.03 B, Qwen2-7B 7.62 B (7,615,616,512).
PUBLISHED_BILLIONS = {"llama2_7b_chat": 6.74, "llama3_8b_instruct": 8.03, "qwen2_7b_instruct": 7.62}

MOKA_FAMILY = ("moka", "moka_no_ca", "text_query", "naive")  # one A per modality, one shared B
PER_MODALITY_LORA = ("multi_lora", "uni_lora")  # one A and one B per modality
MIXTURES = ("loramoe", "hydralora")  # N experts / heads (N = modalities) and a router (N x in)
UNI_MM = ("uni_mm_lora", "uni_mm_lora_gate")  # N + 1 A's, 2 B's (+ the gate's in + 1)
SETTING_MODALITIES = {
    "audio_visual": ["text", "visual", "audio"],
    "visual_text": ["text", "visual"],
    "speech_text": ["text", "speech"],
}


# ------------------------------------------------------------------------------------------------ formulas
def linear_shapes(dims: dict) -> list[tuple[int, int]]:
    """(in, out) of the seven adapted linears of one decoder layer, from the config fields."""
    hidden, inter = dims["hidden_size"], dims["intermediate_size"]
    kv = dims["num_key_value_heads"] * hidden // dims["num_attention_heads"]  # grouped-query k/v width
    q, k, v, o = (hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)
    return [q, k, v, o, (hidden, inter), (hidden, inter), (inter, hidden)]  # + gate, up, down


def expected_adapter(method: str, dims: dict, modalities: int, rank: int = RANK) -> int:
    """r x (in + out) per LoRA pair; MokA: one A (r x in) per modality and one B (out x r)."""
    shapes = linear_shapes(dims)
    if method == "lora":
        per_layer = sum(rank * (i + o) for i, o in shapes)
    elif method in MOKA_FAMILY:
        per_layer = sum(rank * (modalities * i + o) for i, o in shapes)
    elif method in PER_MODALITY_LORA:
        per_layer = modalities * sum(rank * (i + o) for i, o in shapes)
    elif method == "loramoe":
        per_layer = sum(modalities * (rank * (i + o) + i) for i, o in shapes)
    elif method == "hydralora":
        per_layer = sum(rank * i + modalities * (rank * o + i) for i, o in shapes)
    elif method in UNI_MM:
        gate = method == "uni_mm_lora_gate"
        per_layer = sum(rank * ((modalities + 1) * i + 2 * o) + (i + 1 if gate else 0) for i, o in shapes)
    elif method == "dora":
        per_layer = sum(rank * (i + o) + o for i, o in shapes)  # + the magnitude, one per output channel
    else:
        raise KeyError(method)
    return dims["num_hidden_layers"] * per_layer


def expected_backbone(dims: dict) -> int:
    """Embeddings (+ an untied head), per layer q/k/v/o (+ Qwen2's q/k/v biases), gate/up/down, two RMSNorms,
    and the final norm."""
    hidden, vocab = dims["hidden_size"], dims["vocab_size"]
    kv = dims["num_key_value_heads"] * hidden // dims["num_attention_heads"]
    attention = 2 * hidden * hidden + 2 * hidden * kv + ((hidden + 2 * kv) if QKV_BIAS[dims["model_type"]] else 0)
    layer = attention + 3 * hidden * dims["intermediate_size"] + 2 * hidden
    head = 0 if dims["tie_word_embeddings"] else vocab * hidden
    return vocab * hidden + head + dims["num_hidden_layers"] * layer + hidden


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def one_thread():
    # Counting initialises small adapter tensors only; one thread keeps them from spinning on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paper_table(one_thread):
    """Every method on the three paper backbones with three modalities, and on Qwen2 with two (a few seconds)."""
    backbones = [backbone_from_preset(name) for name in ("llama2_7b_chat", "llama3_8b_instruct", "qwen2_7b_instruct")]
    table = adapter_costs(backbones, ["audio_visual"])
    two_modalities = adapter_costs(backbones[2:], ["visual_text"])
    table.rows += two_modalities.rows
    table.skipped += two_modalities.skipped
    return table


# ------------------------------------------------------------------------------------------------ presets
def test_presets_carry_the_published_shapes():
    assert default_preset_names() == list(PUBLISHED)
    for name, dims in PUBLISHED.items():
        preset = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
        assert OmegaConf.to_container(preset.architecture) == dims, name
        # The block is for counting only: the model still loads from the checkpoint path.
        assert preset.backbone._target_ == "moka_train.models.backbones.load_backbone"


def test_settings_read_from_the_experiments():
    for setting, modalities in SETTING_MODALITIES.items():
        assert setting_modalities(setting) == modalities
    with pytest.raises(ValueError, match="unknown setting 'audio'; known settings: audio_visual"):
        setting_modalities("audio")


def test_adapter_config_takes_the_preset_and_the_setting():
    config, source = adapter_config("moka", ["text", "speech"])
    assert source == "configs/adapter/moka.yaml"
    assert (config.rank, config.alpha, tuple(config.target_modules)) == (4, 16.0, TARGETS)
    assert config.modalities == ["text", "speech"]
    assert adapter_config("lora", ["text", "visual"], rank=8)[0].rank == 8


# ------------------------------------------------------------------------------------------------ formulas
def test_llama2_lora_and_moka_by_hand(paper_table):
    # LoRA r=4 over q,k,v,o (4096 -> 4096), gate,up (4096 -> 11008), down (11008 -> 4096), 32 layers.
    lora = 32 * (4 * (4096 + 4096) * 4 + 4 * (4096 + 11008) * 2 + 4 * (11008 + 4096))
    # MokA with text, visual, audio: three A's (r x in) and one B (out x r) per linear.
    moka = 32 * (4 * (3 * 4096 + 4096) * 4 + 4 * (3 * 4096 + 11008) * 2 + 4 * (3 * 11008 + 4096))
    assert (lora, moka) == (9_994_240, 19_103_744)  # 9.99 M and 19.10 M, as moka_reference.md computes
    assert paper_table.row("llama2_7b_chat", "audio_visual", "lora").adapter_parameters == lora
    assert paper_table.row("llama2_7b_chat", "audio_visual", "moka").adapter_parameters == moka


def test_grouped_query_widths(paper_table):
    # Llama-3-8B: 8 kv heads x 128 -> k/v out width 1024; Qwen2-7B: 4 x 128 -> 512, hidden 3584, 28 layers.
    llama3 = 32 * (4 * (4096 + 4096) * 2 + 4 * (4096 + 1024) * 2 + 4 * (4096 + 14336) * 2 + 4 * (14336 + 4096))
    qwen2 = 28 * (4 * (3584 + 3584) * 2 + 4 * (3584 + 512) * 2 + 4 * (3584 + 18944) * 2 + 4 * (18944 + 3584))
    assert paper_table.row("llama3_8b_instruct", "audio_visual", "lora").adapter_parameters == llama3
    assert paper_table.row("qwen2_7b_instruct", "visual_text", "lora").adapter_parameters == qwen2


def test_every_cell_matches_its_formula(paper_table):
    names = {"llama2_7b_chat": LLAMA2, "llama3_8b_instruct": LLAMA3, "qwen2_7b_instruct": QWEN2}
    assert not paper_table.skipped
    assert {row.method for row in paper_table.rows} == set(available_methods())
    checked = 0
    for row in paper_table.rows:
        if row.method not in ("lora", "dora", *MOKA_FAMILY, *PER_MODALITY_LORA, *MIXTURES, *UNI_MM):
            continue  # a method added later: its formula belongs in this test
        dims = names[row.backbone]
        modalities = len(SETTING_MODALITIES[row.setting])
        assert row.adapter_parameters == expected_adapter(row.method, dims, modalities), row
        assert row.backbone_parameters == expected_backbone(dims), row
        checked += 1
    assert checked == (3 + 1) * 12


def test_variants_share_parameters_and_per_modality_loras_scale(paper_table):
    cells = {(row.backbone, row.setting) for row in paper_table.rows}
    assert len(cells) == 4
    for backbone, setting in sorted(cells):
        modalities = len(SETTING_MODALITIES[setting])

        def count(method: str, backbone=backbone, setting=setting) -> int:
            return paper_table.row(backbone, setting, method).adapter_parameters

        assert {count(m) for m in MOKA_FAMILY} == {count("moka")}
        assert count("multi_lora") == count("uni_lora") == modalities * count("lora")
        moka = paper_table.row(backbone, setting, "moka")
        assert (moka.matrices_a, moka.matrices_b) == (modalities, 1)
        multi = paper_table.row(backbone, setting, "multi_lora")
        assert (multi.matrices_a, multi.matrices_b) == (modalities, modalities)


def test_backbone_totals_are_the_published_ones(paper_table):
    exact = {"llama2_7b_chat": 6_738_415_616, "llama3_8b_instruct": 8_030_261_248, "qwen2_7b_instruct": 7_615_616_512}
    for name, billions in PUBLISHED_BILLIONS.items():
        total = paper_table.row(name, "audio_visual", "lora").backbone_parameters
        assert total == exact[name] == expected_backbone(PUBLISHED[name])
        assert round(total / 1e9, 2) == billions


def test_rank_scales_every_count(one_thread):
    backbone = backbone_from_preset("qwen2_5_vl_7b_instruct_lm")
    table = adapter_costs([backbone], ["speech_text"], ["lora", "moka"], rank=8)
    for method in ("lora", "moka"):
        row = table.row(backbone.name, "speech_text", method)
        assert row.rank == 8
        assert row.adapter_parameters == expected_adapter(method, QWEN2, 2, rank=8)


# ------------------------------------------------------------------------------------------------ meta = real
@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_qwen2"])  # tiny_qwen2 ties its embeddings
def test_meta_counts_equal_real_tiny_models(preset):
    """The cost table's count of a tiny preset equals the count on the preset's really instantiated random model,
    for every method and setting; and on the meta device the adapter tensors have the real ones' names and shapes."""
    backbone_config = OmegaConf.load(ROOT / "configs" / "model" / f"{preset}.yaml").backbone
    table = adapter_costs([backbone_from_preset(preset)])
    assert not table.skipped
    assert len(table.rows) == 3 * len(available_methods())
    for row in table.rows:
        config, _ = adapter_config(row.method, row.modalities)
        real = inject_adapters(instantiate(backbone_config), config)
        assert real.device.type == "cpu"
        counts = count_parameters(real)
        assert (row.adapter_parameters, row.backbone_parameters) == (counts.adapter, counts.total - counts.adapter)
        meta = inject_adapters(build_meta_backbone(backbone_from_preset(preset).config), config)
        shapes = {name: p.shape for name, p in meta.named_parameters()}
        assert shapes == {name: p.shape for name, p in real.named_parameters()}
        assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_a_method_that_cannot_be_built_is_skipped_with_its_reason(monkeypatch):
    real = costs.adapter_config

    def refuse_naive(method, modalities, rank=None):
        if method == "naive":
            raise ValueError("naive needs a question span")
        return real(method, modalities, rank)

    monkeypatch.setattr(costs, "adapter_config", refuse_naive)
    table = adapter_costs([backbone_from_preset("tiny_llama")], ["visual_text"], ["lora", "naive"])
    assert [row.method for row in table.rows] == ["lora"]
    assert [(s.method, s.reason) for s in table.skipped] == [("naive", "naive needs a question span")]
    assert "- skipped: naive on tiny_llama: naive needs a question span" in to_markdown(table)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_config_json(tmp_path):
    """A local checkpoint's config.json as released (extra keys and all) counts as its preset does."""
    llama2 = tmp_path / "Llama-2-7b-chat-hf"
    llama2.mkdir()
    published = {**LLAMA2, "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5}
    (llama2 / "config.json").write_text(json.dumps({**published, "max_position_embeddings": 4096}))
    backbone = backbone_from_checkpoint(llama2)
    assert backbone.name == "Llama-2-7b-chat-hf"
    assert backbone_from_checkpoint(llama2 / "config.json").config.hidden_size == 4096
    count = count_adapter(backbone.config, adapter_config("lora", ["text"])[0])
    assert (count.adapter, count.backbone) == (9_994_240, 6_738_415_616)


def test_qwen2_5_vl_checkpoint_counts_its_language_model(tmp_path):
    """Qwen2.5-VL's released config.json (text fields on top, M-RoPE, a vision tower) counts as the Qwen2 language
    model load_backbone builds from it: the preset's numbers, with no vision-tower parameters."""
    hub = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        **QWEN2,
        "model_type": "qwen2_5_vl",
        "max_position_embeddings": 128000,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 3584},
    }
    (tmp_path / "config.json").write_text(json.dumps(hub))
    moka = adapter_config("moka", ["text", "visual"])[0]
    from_checkpoint = count_adapter(backbone_from_checkpoint(tmp_path).config, moka)
    from_preset = count_adapter(backbone_from_preset("qwen2_5_vl_7b_instruct_lm").config, moka)
    assert from_checkpoint == from_preset
    assert from_checkpoint.adapter == expected_adapter("moka", QWEN2, 2)
    assert from_checkpoint.backbone == expected_backbone(QWEN2)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a checkpoint directory holding config.json"):
        backbone_from_checkpoint(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'; the backbones moka-train loads: \['llama'"):
        backbone_from_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------ output
def test_human_count():
    assert [human_count(n) for n in (512, 9_994_240, 19_103_744, 128_000_000, 6_738_415_616)] == [
        "512",
        "9.99 M",
        "19.1 M",
        "128 M",
        "6.74 B",
    ]


def test_script_end_to_end(tmp_path, capsys, one_thread):
    out = tmp_path / "costs"
    with loaded_script(SCRIPT) as script:
        script.main(
            [
                "--models",
                "llama2_7b_chat,qwen2_7b_instruct",
                "--setting",
                "audio_visual",
                "--methods",
                "moka,lora",
                "--out",
                str(out),
            ]
        )
    printed = capsys.readouterr().out
    markdown = (out / "adapter_costs.md").read_text()
    assert markdown in printed
    assert "### Audio-visual (text, visual, audio)" in markdown
    assert "| method | A / B per layer | llama2_7b_chat (6.74 B) | qwen2_7b_instruct (7.62 B) |" in markdown
    # Rows in the paper's order (LoRA first), cells "adapter (share of the backbone)".
    assert markdown.index("| lora | 1 / 1 | 9.99 M (0.15 %) |") < markdown.index("| moka | 3 / 1 | 19.1 M (0.28 %) |")
    rows = list(csv.DictReader(io.StringIO((out / "adapter_costs.csv").read_text())))
    assert [(r["backbone"], r["method"]) for r in rows] == [
        ("llama2_7b_chat", "lora"),
        ("qwen2_7b_instruct", "lora"),
        ("llama2_7b_chat", "moka"),
        ("qwen2_7b_instruct", "moka"),
    ]
    llama2_moka = rows[2]
    assert int(llama2_moka["adapter_parameters"]) == 19_103_744
    assert int(llama2_moka["backbone_parameters"]) == 6_738_415_616
    assert llama2_moka["modalities"] == "text visual audio"
    assert float(llama2_moka["percent_of_backbone"]) == pytest.approx(100 * 19_103_744 / 6_738_415_616)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "llama2_7b_chat,gpt4"], "unknown model preset(s) gpt4; known presets (with shapes): "),
        (["--methods", "vera"], "unknown adapter method(s) vera; known methods: "),
        (["--setting", "audio"], "invalid choice: 'audio'"),
        (["--backbone-config", "/nonexistent/ckpt"], "expected a checkpoint directory holding config.json"),
    ],
)
def test_script_refuses_bad_input(argv, message, capsys):
    with loaded_script(SCRIPT) as script, pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error
    if argv[0] == "--models":
        for name in [*PUBLISHED, "tiny_llama", "tiny_qwen2"]:
            assert name in error
