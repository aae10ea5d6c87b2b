"""Merging LoRA / DoRA into the backbone (adapters/merge.py) and the two commands built on it:
scripts/merge_adapter.py (a plain Hugging Face checkpoint) and scripts/export_peft.py (peft's layout), end to end
on tiny runs trained on the demo set (tests/trained_runs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from moka_train.adapters import (
    AdaptedLinear,
    AdapterConfig,
    adapted_layers,
    adapter_named_parameters,
    available_methods,
    carries_adapters,
    inject_adapters,
    load_adapter,
    save_adapter,
)
from moka_train.adapters.merge import load_run_backbone, merge_adapter, mergeable_methods
from tests.helpers import VOCAB, loaded_script, randomize_adapters, tiny_llama, tiny_qwen2
from tests.launch import ROOT, environment

MERGE = ROOT / "scripts" / "merge_adapter.py"
EXPORT = ROOT / "scripts" / "export_peft.py"
BACKBONES = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def tokens(high: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, high, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted(method: str, backbone: str = "llama") -> nn.Module:
    """A tiny backbone with random B's (and, for DoRA, magnitudes away from ||W0||_c)."""
    model = inject_adapters(BACKBONES[backbone](), AdapterConfig(method=method))
    randomize_adapters(model)
    with torch.no_grad():
        for name, parameter in adapter_named_parameters(model):
            if ".lora_magnitude_vector." in name:
                parameter.mul_(1.1)
    return model


# -- merge_adapter ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", mergeable_methods())
def test_merged_model_equals_the_adapted_one(method, backbone, tmp_path):
    ids = tokens()
    model = adapted(method, backbone)
    want = logits(model, ids)
    assert (want - logits(BACKBONES[backbone](), ids)).abs().max() > 1e-2
    merged = merge_adapter(model)
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-5, atol=1e-5)
    # A plain transformers model: no adapted layer, handle or hook left, the base model's own parameter names.
    assert not any(isinstance(m, AdaptedLinear) for m in merged.modules())
    assert not carries_adapters(merged) and not merged._forward_pre_hooks
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert merged.state_dict().keys() == BACKBONES[backbone]().state_dict().keys()
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), want, rtol=1e-5, atol=1e-5)


def float32_merge_formula(layer: nn.Module, method: str) -> torch.Tensor:
    """``W0 + s B A`` (DoRA: scaled to the magnitude row by row) in float32, from the layer's own weights."""
    w0 = layer.base_layer.weight.detach().float()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    want = w0 + layer.scaling * b @ a
    if method == "dora":
        want = layer.magnitude.detach().unsqueeze(1) * want / torch.linalg.norm(want, dim=1, keepdim=True)
    return want


@pytest.mark.parametrize("method", mergeable_methods())
def test_merge_runs_in_float32_and_casts_back(method):
    """A bf16 backbone with fp32 adapters: the weight is merged in float32 from the bf16 W0, then rounded once."""
    model = inject_adapters(tiny_llama().to(torch.bfloat16), AdapterConfig(method=method))
    randomize_adapters(model)
    want = float32_merge_formula(model.get_submodule("model.layers.1.mlp.down_proj"), method)
    merged = merge_adapter(model)
    weight = merged.get_submodule("model.layers.1.mlp.down_proj").weight
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight.float(), want.to(torch.bfloat16).float(), rtol=0, atol=0)
    as_fp32 = merge_adapter(adapted(method), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in as_fp32.parameters())
    # dtype=float32 from the bf16 backbone: the float32 merge itself, not rounded to bf16 on the way (it was, by
    # about 3 % of the delta's size). The tolerance is float32 summation order, far below bf16's rounding.
    model = inject_adapters(tiny_llama().to(torch.bfloat16), AdapterConfig(method=method))
    randomize_adapters(model)
    want = float32_merge_formula(model.get_submodule("model.layers.1.mlp.down_proj"), method)
    assert (want.to(torch.bfloat16).float() - want).abs().max() > 100 * 1e-6 * want.abs().max()
    merged = merge_adapter(model, dtype=torch.float32)
    weight = merged.get_submodule("model.layers.1.mlp.down_proj").weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("method", sorted(set(available_methods()) - set(mergeable_methods())))
def test_merge_refuses_modality_aware_methods(method):
    model = inject_adapters(tiny_llama(), AdapterConfig(method=method))
    with pytest.raises(ValueError, match=rf"the '{method}' adapter cannot be merged"):
        merge_adapter(model)
    assert carries_adapters(model) and len(list(adapted_layers(model))) == 14  # untouched


def test_merge_refusal_of_moka_says_why():
    with pytest.raises(ValueError, match="MokA's cross-attention .* depend on the input"):
        merge_adapter(inject_adapters(tiny_llama(), AdapterConfig(method="moka")))


@pytest.mark.parametrize("method", mergeable_methods())
def test_peft_layout_round_trip(method, tmp_path):
    """What export_peft.py writes (save_adapter's peft layout) loads with PeftModel.from_pretrained, same logits."""
    ids = tokens()
    model = adapted(method)
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", mergeable_methods())
def test_experiment_settings_do_not_stop_loading(method, tmp_path):
    """A run's adapter config sets modalities and lambda (Table 2: [text, visual], 0.05); peft's layout does not
    store them, and loading into the run's model must not call that a different adapter."""
    cfg = AdapterConfig(method=method, modalities=["text", "visual"], cross_attn_lambda=0.05)
    model = inject_adapters(tiny_llama(), cfg)
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(inject_adapters(tiny_llama(), cfg), tmp_path)
    assert torch.equal(logits(loaded, tokens()), logits(model, tokens()))
    with pytest.raises(ValueError, match="different adapter"):
        load_adapter(inject_adapters(tiny_llama(), AdapterConfig(method=method, rank=2)), tmp_path)


# -- the scripts, on trained runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(demo_runs, tmp_path_factory) -> dict[str, Path]:
    """The session's demo runs (moka, lora) and a DoRA run trained here the same way."""
    from tests.trained_runs import train_run

    dora = train_run(demo_runs["data"], tmp_path_factory.mktemp("runs") / "dora", "dora")
    return {"moka": demo_runs["moka"], "lora": demo_runs["lora"], "dora": dora}


def run_script(path: Path, argv: list[str], capsys) -> tuple[int, str, str]:
    with loaded_script(path) as script:
        code = script.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_backbone(run_dir: Path) -> nn.Module:
    return instantiate(OmegaConf.load(run_dir / "config.yaml").model.backbone)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_script(runs, method, tmp_path, capsys):
    run_dir = runs[method]
    out = tmp_path / "merged"
    code, stdout, stderr = run_script(MERGE, [str(run_dir), "--out", str(out)], capsys)
    assert code == 0, stderr
    assert stdout.strip() == str(out.resolve())
    assert "language model alone" in stderr and "projectors" in stderr
    adapted_model, run_cfg = load_run_backbone(run_dir)
    assert adapted_model.get_submodule("model.layers.0.self_attn.q_proj").method == method
    ids = tokens(high=int(run_cfg.model.backbone.vocab_size))
    want = logits(adapted_model, ids)
    assert (want - logits(run_backbone(run_dir), ids)).abs().max() > 1e-3
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, AdaptedLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer("yes no").input_ids
    assert "<video>" not in tokenizer.get_vocab()  # the multimodal tokens belong to the run, not to a plain LLM


def test_merge_script_dtype(runs, tmp_path, capsys):
    code, _, stderr = run_script(MERGE, [str(runs["dora"]), "--out", str(tmp_path), "--dtype", "bf16"], capsys)
    assert code == 0, stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path).model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_script_loads_in_peft(runs, method, tmp_path, capsys):
    run_dir = runs[method]
    code, stdout, stderr = run_script(EXPORT, [str(run_dir), "--out", str(tmp_path), "--base-model", "my/base"], capsys)
    assert code == 0, stderr
    assert stdout.strip() == str(tmp_path.resolve())
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"] == (method == "dora")
    assert saved["base_model_name_or_path"] == "my/base"
    peft_model = PeftModel.from_pretrained(run_backbone(run_dir), tmp_path)
    adapted_model, run_cfg = load_run_backbone(run_dir)
    ids = tokens(high=int(run_cfg.model.backbone.vocab_size))
    torch.testing.assert_close(logits(peft_model, ids), logits(adapted_model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (MERGE, "merge_adapter.py: error: the 'moka' adapter cannot be merged into the backbone: MokA's"),
        (EXPORT, "export_peft.py: error: the 'moka' adapter has no peft equivalent (only dora, lora export)"),
    ],
)
def test_scripts_refuse_moka(runs, script, message, tmp_path, capsys):
    code, stdout, stderr = run_script(script, [str(runs["moka"]), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and not stdout
    assert stderr.startswith(message) and stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", [MERGE, EXPORT])
def test_scripts_refuse_bad_run_dirs(script, tmp_path, capsys):
    name = script.name
    code, _, stderr = run_script(script, [str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert stderr == f"{name}: error: run_dir {tmp_path / 'nowhere'}: no such folder (a run of scripts/train.py)\n"
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("seed: 0\n")
    code, _, stderr = run_script(script, [str(tmp_path / "half"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and stderr.startswith(f"{name}: error: ") and "has no trainables folder" in stderr
    with loaded_script(script) as module, pytest.raises(SystemExit) as exit_info:
        module.main([str(tmp_path)])  # no --out: argparse's own usage error
    assert exit_info.value.code == 2 and f"{name}: error: the following arguments are required: --out" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("script", [MERGE, EXPORT])
def test_scripts_refuse_an_out_with_files_and_write_readable_files(runs, script, tmp_path, capsys):
    """A second export into the folder of a first (another method's) used to mix the two, which then loaded
    silently as one; an --out inside the run rewrote the run's own adapter. The files are readable by others
    (safetensors writes owner-only)."""
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        code, _, stderr = run_script(script, [str(runs["lora"]), "--out", str(out)], capsys)
    finally:
        os.umask(previous)
    assert code == 0, stderr
    assert all(path.stat().st_mode & 0o777 == 0o644 for path in out.iterdir())
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging folder left
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    code, _, stderr = run_script(script, [str(runs["dora"]), "--out", str(out)], capsys)
    assert code == 2 and f"--out {out} already holds files" in stderr
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    inside = runs["lora"] / "exported"
    code, _, stderr = run_script(script, [str(runs["lora"]), "--out", str(inside)], capsys)
    assert code == 2 and f"--out {inside} is inside the run folder" in stderr and not inside.exists()


@pytest.mark.parametrize("script", [MERGE, EXPORT])
def test_scripts_name_a_backbone_that_does_not_load(runs, script, tmp_path, capsys):
    """A run moved to a machine without its backbone checkpoint: one error line naming it, exit 2 (it was a
    traceback ending in Hydra's InstantiationException)."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(runs["lora"], moved)
    config = OmegaConf.load(moved / "config.yaml")
    config.model.backbone = {"_target_": "moka_train.models.backbones.load_backbone", "path": str(tmp_path / "gone")}
    OmegaConf.save(config, moved / "config.yaml")
    code, _, stderr = run_script(script, [str(moved), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith(f"{script.name}: error: cannot load the run's backbone and adapter:")
    assert f"backbone checkpoint {tmp_path / 'gone'}: no config.json there" in stderr


def test_merge_command_line_exit_code(tmp_path):
    """The real command line: exit status 2 and one error line, before anything heavy is built."""
    command = [sys.executable, str(MERGE), str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"merge_adapter.py: error: run_dir {tmp_path / 'nowhere'}: no such folder (a run of scripts/train.py)"
    ]
