"""Merge a run's LoRA or DoRA adapter into its backbone and write a plain Hugging Face checkpoint:

    python scripts/merge_adapter.py runs/table2/llama2_vt/lora --out merged/llama2_vt_lora
    python scripts/merge_adapter.py runs/table2/llama2_vt/dora --out merged/llama2_vt_dora --dtype bf16

The backbone is built from the run's ``config.yaml`` (``model.backbone``, through Hydra: the local checkpoint
the run trained on), the adapter from its ``adapter`` config and loaded from ``<run_dir>/trainables/adapter``;
every adapted linear is then replaced by one ``nn.Linear`` holding ``W0 + s B A`` (LoRA) or
``m * (W0 + s B A) / ||W0 + s B A||_c`` (DoRA), computed in float32 and written in ``--dtype`` (default: the
backbone's own dtype). ``--out`` receives ``save_pretrained``'s files (config.json, model.safetensors,
generation_config.json) and the run's tokenizer with the chat template it trained with, so
``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` load them.

The result is the language model alone: the multimodal parts of the run (its projectors, and the trained
embeddings of the added special tokens ``<video>``, ``<audio_start>``, ...) live in ``<run_dir>/trainables``
and are not in a plain LLM, nor are those tokens added to the saved tokenizer. The merged model answers text
prompts; for media, use the run itself (scripts/infer.py, scripts/evaluate.py).

MokA and the other modality-aware methods do not merge: their delta depends on each token's modality (and MokA's
cross-attention on the question), so no single weight reproduces it. Bad input (a missing or unfinished run
folder, a run without an adapter or with one that cannot merge, a backbone checkpoint that does not load, an
``--out`` that already holds files) ends with ``merge_adapter.py: error: ...`` and exit code 2. The checkpoint is
written into a folder beside ``--out`` and renamed into place whole.
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

PROG = "merge_adapter.py"
DTYPES = ("bf16", "fp32")
NOTE = (
    "the merged checkpoint is the language model alone: the run's projectors and the embeddings of its added "
    "special tokens (<video>, <audio_start>, ...) stay in {trainables}; it answers text prompts only"
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Merge a run's LoRA or DoRA adapter into its backbone; write a plain Hugging Face checkpoint.",
        epilog="example: python scripts/merge_adapter.py runs/lora --out merged/lora --dtype bf16",
    )
    parser.add_argument("run_dir", help="a finished stage-2 run of scripts/train.py (config.yaml and trainables/)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the merged checkpoint and tokenizer")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the saved weights (default: the backbone's)")
    return parser.parse_args(argv)


def mergeable_method(run_dir: Path) -> str:
    """The run's adapter method, refused (a UsageError) unless it merges."""
    from moka_train.adapters.merge import check_mergeable

    method = run_adapter_method(run_dir, "merge")
    try:
        check_mergeable(method)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return method


def merge_run(args: argparse.Namespace) -> Path:
    """Merge the run's adapter and write the checkpoint; returns the output folder."""
    run_dir = check_run_dir(args.run_dir)
    out = check_new_folder(args.out, run_dir)
    method = mergeable_method(run_dir)

    import torch
    from hydra.utils import instantiate

    from moka_train.adapters.merge import merge_adapter
    from moka_train.models.chat_templates import set_chat_template

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    backbone, run_cfg = load_adapted_backbone(run_dir)
    merged = merge_adapter(backbone, dtype=dtype)
    tokenizer = instantiate(run_cfg.model.tokenizer)
    set_chat_template(tokenizer, run_cfg.model.chat_template)
    from moka_train.checkpoint_io import write_folder_atomic

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_folder_atomic(out, write)
    weights = next(merged.parameters()).dtype
    print(f"{PROG}: merged the {method} adapter of {run_dir} into its backbone ({weights})", file=sys.stderr)
    print(f"{PROG}: note: " + NOTE.format(trainables=run_dir / "trainables"), file=sys.stderr)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: prints the output folder; returns the exit code (2: a usage error, on stderr)."""
    args = parse_args(argv)  # argparse's own errors exit with 2 and "merge_adapter.py: error: ..."
    try:
        out = merge_run(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
