"""Convert the official MokA / Crab checkpoints into a moka_train trainables checkpoint.

    python scripts/import_official.py --kind avt --src adapter_model.bin non_lora_trainables.bin \\
        --attn-scale rank --out imported/musicavqa
    python scripts/import_official.py --kind vt --src model-00001-of-00004.safetensors ... --out imported/vt
    python scripts/import_official.py --kind crab_projector --src visual_pretrain.bin audio_pretrain.bin \\
        --out imported/crab_stage1

``--kind`` picks the official layout (``moka_train.official_import``, whose docstring lists every key
mapping): ``avt`` (MokA AudioVisualText: ``lora_A0/1/2`` + ``lora_B0``, projectors), ``vt`` (MokA VisualText:
the ``image`` / ``text`` peft adapters, the projector) or ``crab_projector`` (Crab's stage-1 Q-Former
projectors). ``--src`` takes ``.bin`` / ``.pt`` / ``.pth`` files (read with ``torch.load(weights_only=True)``)
and ``.safetensors`` files, merged; a key in two files is refused.

The output folder (new or empty) is a trainables checkpoint: the projectors in ``trainables.safetensors``,
the adapter under ``adapter/`` and ``trainables.json``. It holds no added-token rows (the official AVT ones
were never saved; Crab's rows belong to other token ids), so the model keeps its own: load it with
``stage.init_from=<out>`` (or ``load_trainables``, which loads the parts it has) and an adapter config equal
to the printed one
(``configs/adapter/moka_official_av.yaml`` is the AVT one with ``--attn-scale rank``).

Values the weights do not record take the official scripts' defaults unless given: ``--alpha`` (16),
``--cross-attn-lambda`` (avt 1.0, vt 0.05), ``--dropout`` (0.05), ``--qformer-heads`` (12), or come from the
official run's ``--adapter-config adapter_config.json``. ``--attn-scale`` is required for ``avt``: the official
code changed from sqrt(question tokens) to sqrt(rank) on 2025-12-28 and the checkpoint does not say which
(``vt`` defaults to ``rank``).

A summary is printed: tensors converted, parameter counts, what was skipped and why, and the inferred configs
with where each value came from. Bad input (a missing file, an unreadable one, an unexpected or missing key, a
shape that does not fit) is one line on stderr naming the file or key, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("avt", "vt", "crab_projector")  # moka_train.official_import.KINDS, repeated so that --help stays instant
ATTN_SCALES = ("question_tokens", "rank")


class UsageError(Exception):
    """Bad input, reported as one line on stderr with exit status 2 (no traceback)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", required=True, choices=KINDS, help="the official checkpoint's layout")
    parser.add_argument("--src", required=True, nargs="+", type=Path, help=".bin / .pt / .pth / .safetensors files")
    parser.add_argument("--out", required=True, type=Path, help="the trainables checkpoint folder (new or empty)")
    parser.add_argument("--attn-scale", choices=ATTN_SCALES, help="required for avt; vt: rank (default)")
    parser.add_argument("--adapter-config", type=Path, help="the official run's adapter_config.json (avt / vt)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default: adapter_config.json's, else 16)")
    parser.add_argument("--cross-attn-lambda", type=float, help="lambda (default: avt 1.0, vt 0.05)")
    parser.add_argument("--dropout", type=float, help="adapter dropout, for further training (default 0.05)")
    parser.add_argument("--qformer-heads", type=int, default=12, help="Q-Former attention heads (default 12)")
    return parser.parse_args(argv)


def adapter_options(args: argparse.Namespace) -> dict[str, Any]:
    """The converter's keyword arguments; adapter options are refused for ``crab_projector``."""
    from moka_train.official_import import read_adapter_config_json

    adapter_flags = {
        "--attn-scale": args.attn_scale,
        "--adapter-config": args.adapter_config,
        "--alpha": args.alpha,
        "--cross-attn-lambda": args.cross_attn_lambda,
        "--dropout": args.dropout,
    }
    if args.qformer_heads < 1:
        raise UsageError(f"--qformer-heads must be a positive number of attention heads, got {args.qformer_heads}")
    options: dict[str, Any] = {"qformer_heads": args.qformer_heads}
    if args.kind == "crab_projector":
        given = [flag for flag, value in adapter_flags.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: adapter options; a crab_projector checkpoint has no adapter")
        return options
    if args.kind == "avt" and args.attn_scale is None:
        raise UsageError(
            "--attn-scale is required for avt: the checkpoint does not record whether it was trained with "
            "sqrt(question tokens) (official code until 2025-12-27: question_tokens) or sqrt(r) (from "
            "2025-12-28: rank)"
        )
    if args.attn_scale is not None:
        options["attn_scale"] = args.attn_scale
    if args.adapter_config is not None:
        options["official_config"] = read_adapter_config_json(args.adapter_config)
    options.update(alpha=args.alpha, cross_attn_lambda=args.cross_attn_lambda, dropout=args.dropout)
    return options


def adapter_hint(config) -> str:
    """How to build a model whose adapter equals ``config`` (``load_trainables`` refuses any other): the
    ``configs/adapter`` preset that matches it, else Hydra overrides of ``adapter=moka``."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from moka_train.adapters import AdapterConfig

    presets = {}
    for path in sorted((ROOT / "configs" / "adapter").glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path))
        raw.pop("_target_", None)
        presets[path.stem] = AdapterConfig(**raw)
    for name, preset in presets.items():
        if preset == config:
            return f"adapter={name}"
    if "moka" not in presets:
        return "an adapter config with the fields above"
    base = asdict(presets["moka"])
    changed = {k: v for k, v in asdict(config).items() if base[k] != v}

    def hydra(value: Any) -> str:
        return f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)

    return " ".join(["adapter=moka", *(f"adapter.{k}={hydra(v)}" for k, v in changed.items())])


def run(args: argparse.Namespace):
    """Convert and write; returns the ``ImportedCheckpoint``."""
    # Imported here: torch and transformers take seconds, which --help and argument errors should not wait for.
    from moka_train.official_import import OfficialStateDict, convert_official, write_imported

    out = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not an empty folder; choose a new output folder")
    options = adapter_options(args)
    state = OfficialStateDict(args.src)
    result = convert_official(args.kind, state, **options)
    write_imported(result, out, sources=[str(p) for p in args.src])
    print(f"read {len(state)} tensors from {len(args.src)} file(s)")
    print(result.summary())
    parts = "[" + ", ".join(["projectors"] * bool(result.projectors) + ["adapter"] * bool(result.adapter_weights)) + "]"
    print(f"\nwrote {out}\nload it with: stage.init_from=[{{path: {out}, parts: {parts}}}]")
    if result.adapter_config is not None:
        print(f"and this adapter: {adapter_hint(result.adapter_config)}")
    return result


def main(argv: Sequence[str] | None = None):
    """Convert the files named in ``argv``; bad input exits with status 2."""
    args = parse_args(argv)
    from moka_train.official_import import OfficialImportError

    try:
        return run(args)
    except (UsageError, OfficialImportError, FileNotFoundError) as error:
        print(f"import_official.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
