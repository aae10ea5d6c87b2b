"""Write a run's LoRA or DoRA adapter in peft's ``save_pretrained`` layout:

    python scripts/export_peft.py runs/table2/llama2_vt/lora --out exported/llama2_vt_lora
    python scripts/export_peft.py runs/dora --out exported/dora --base-model meta-llama/Llama-2-7b-chat-hf

The run's backbone is built from its ``config.yaml`` (``model.backbone``, through Hydra) with its adapter
(``adapter``), the trained adapter loaded from ``<run_dir>/trainables/adapter`` (which checks every name and
shape), and written to ``--out`` as ``adapter_config.json`` + ``adapter_model.safetensors``, the files
``PeftModel.from_pretrained(backbone, out)`` reads (DoRA with ``use_dora: true`` and its magnitude vectors).
``--base-model`` records the backbone's name or path in ``adapter_config.json`` (default: the path the run's
backbone was loaded from, if any).

Only the adapter is exported: the run's projectors and added-token embeddings (in ``<run_dir>/trainables``) have
no peft equivalent. MokA and the other modality-aware methods have no peft layout either; their own checkpoint is
``<run_dir>/trainables/adapter`` (``moka_train.adapters.load_adapter`` reads it). Bad input (a missing or
unfinished run folder, a run without an adapter or with one peft cannot hold, a backbone checkpoint that does not
load, an ``--out`` that already holds files or lies inside the run) ends with ``export_peft.py: error: ...`` and
exit code 2. The files are written into a folder beside ``--out`` and renamed into place whole.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from moka_train.evaluation.runner import (
    UsageError,
    check_new_folder,
    check_run_dir,
    load_adapted_backbone,
    run_adapter_method,
)

PROG = "export_peft.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write a run's LoRA or DoRA adapter in peft's save_pretrained layout.",
        epilog="example: python scripts/export_peft.py runs/lora --out exported/lora",
    )
    parser.add_argument("run_dir", help="a finished stage-2 run of scripts/train.py (config.yaml and trainables/)")
    parser.add_argument("--out", required=True, type=Path, help="folder for adapter_config.json and the weights")
    parser.add_argument("--base-model", help="base_model_name_or_path to record (default: the run's backbone path)")
    return parser.parse_args(argv)


def peft_method(run_dir: Path) -> str:
    """The run's adapter method, refused (a UsageError) unless peft's layout holds it."""
    from moka_train.adapters import available_methods, get_method

    method = run_adapter_method(run_dir, "export")
    try:
        layer_cls = get_method(method)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not layer_cls.peft_layout:
        exportable = ", ".join(m for m in available_methods() if get_method(m).peft_layout)
        raise UsageError(
            f"the {method!r} adapter has no peft equivalent (only {exportable} export); its own checkpoint is "
            f"{run_dir / 'trainables' / 'adapter'}, which moka_train.adapters.load_adapter reads"
        )
    return method


def export_run(args: argparse.Namespace) -> Path:
    """Write the run's adapter in peft's layout; returns the output folder."""
    run_dir = check_run_dir(args.run_dir)
    out = check_new_folder(args.out, run_dir)
    method = peft_method(run_dir)

    from moka_train.adapters import save_adapter
    from moka_train.checkpoint_io import write_folder_atomic

    backbone, _ = load_adapted_backbone(run_dir)
    write_folder_atomic(out, lambda folder: save_adapter(backbone, folder, base_model_name_or_path=args.base_model))
    print(f"{PROG}: wrote the {method} adapter of {run_dir} in peft's layout", file=sys.stderr)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: prints the output folder; returns the exit code (2: a usage error, on stderr)."""
    args = parse_args(argv)  # argparse's own errors exit with 2 and "export_peft.py: error: ..."
    try:
        out = export_run(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
