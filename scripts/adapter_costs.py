"""The adapter cost table: trainable adapter parameters per method and backbone, for each setting.

    python scripts/adapter_costs.py                                   # every real backbone, setting and method
    python scripts/adapter_costs.py --models llama2_7b_chat,qwen2_7b_instruct --setting visual_text
    python scripts/adapter_costs.py --methods lora,moka --rank 8 --out tables/costs
    python scripts/adapter_costs.py --backbone-config /ckpt/Llama-2-7b-chat-hf   # your own checkpoint's shapes

Each backbone is built from its shapes on the meta device (no weights, no memory): the ``architecture:`` block of
a model preset in ``configs/model`` (the published config.json fields), or the config.json of a local checkpoint
directory (``--backbone-config``, read as ``load_backbone`` reads it; repeatable). Each method's adapter is put in
with ``inject_adapters`` and counted with ``count_parameters``, with the setting's modalities (the shared
experiment files: audio-visual text+visual+audio, visual-text text+visual, speech-text text+speech) and the
adapter preset's rank, alpha and target modules (``configs/adapter/<method>.yaml``; ``--rank`` overrides).

Prints one Markdown table per setting (rows: methods, columns: backbones, cells: adapter parameters and their
share of the backbone's); with ``--out DIR`` also writes ``adapter_costs.md`` and ``adapter_costs.csv`` (exact
counts) there. Bad input (an unknown preset, setting or method, a missing checkpoint config) exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from moka_train.adapters import available_methods
from moka_train.evaluation.adapter_costs import (
    SETTINGS,
    Backbone,
    CostTable,
    adapter_costs,
    backbone_from_checkpoint,
    backbone_from_preset,
    countable_presets,
    default_preset_names,
    to_markdown,
    write_outputs,
)

ALL = "all"


def comma_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--models",
        type=comma_list,
        help="model presets (configs/model), comma-separated (default: every preset with an architecture block)",
    )
    source.add_argument(
        "--backbone-config",
        type=Path,
        action="append",
        metavar="PATH",
        help="a local checkpoint directory (or its config.json) to count instead of the presets; repeatable",
    )
    parser.add_argument("--setting", choices=[*SETTINGS, ALL], default=ALL, help="the setting (default: all)")
    parser.add_argument(
        "--methods", type=comma_list, help="adapter methods, comma-separated (default: every registered method)"
    )
    parser.add_argument("--rank", type=int, help="the adapters' rank (default: each adapter preset's, 4)")
    parser.add_argument("--out", type=Path, help="also write adapter_costs.md and adapter_costs.csv here")
    args = parser.parse_args(argv)

    # Name checks here, so that a typo fails before any model is built, with argparse's usage line and status 2.
    if args.models:
        known = countable_presets()
        unknown = [name for name in args.models if name not in known]
        if unknown:
            parser.error(
                f"argument --models: unknown model preset(s) {', '.join(unknown)}; known presets (with shapes): "
                + ", ".join(sorted(known))
            )
    if args.methods:
        unknown = [name for name in args.methods if name not in available_methods()]
        if unknown:
            parser.error(
                f"argument --methods: unknown adapter method(s) {', '.join(unknown)}; known methods: "
                + ", ".join(available_methods())
            )
    if args.rank is not None and args.rank < 1:
        parser.error(f"argument --rank: must be >= 1, got {args.rank}")
    return args


def load_backbones(args: argparse.Namespace) -> list[Backbone]:
    if args.backbone_config:
        return [backbone_from_checkpoint(path) for path in args.backbone_config]
    return [backbone_from_preset(name) for name in args.models or default_preset_names()]


def main(argv: Sequence[str] | None = None) -> CostTable:
    """Count, print the Markdown tables and write the files named in ``argv``; returns the table."""
    args = parse_args(argv)
    try:
        backbones = load_backbones(args)
    except (OSError, ValueError) as error:
        print(f"adapter_costs.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    # Counting runs no kernels worth parallelising, only small initialisations; one thread keeps them from
    # spinning against whatever else uses the cores.
    torch.set_num_threads(1)
    settings = list(SETTINGS) if args.setting == ALL else [args.setting]
    table = adapter_costs(backbones, settings, args.methods, args.rank)
    print(to_markdown(table), end="")
    if args.out is not None:
        try:
            written = write_outputs(table, args.out)
        except OSError as error:
            print(f"adapter_costs.py: error: --out {args.out}: cannot write ({error})", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"\nwrote {', '.join(str(path) for path in written)}")
    return table


if __name__ == "__main__":
    main()
