"""The embedded CPU demo: the synthetic MUSIC-AVQA-layout set, stage 1, stage 2 (MokA and LoRA from the same
stage 1), then greedy answers on the held-out test videos, scored per question type against the best
media-blind answers. ``--blind`` adds the control: both stages and the evaluation with every media input
zeroed, which must fall to that chance level.

    python scripts/demo.py                          # writes demo_data/ if missing, then outputs/demo/
    python scripts/demo.py --adapters moka --steps 50 --videos 48   # a quick look
    python scripts/demo.py stage.lr=1e-3            # anything after the options is a Hydra override

Each stage is the same ``train(cfg)`` that ``scripts/train.py experiment=demo`` runs; the commands it runs are
printed, so each step can be redone by hand. A stage stopped part-way (Ctrl-C saves a checkpoint) continues from
it when the same command is run again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from moka_train.evaluation.accuracy import MUSIC_AVQA_TYPE, accuracy_by, format_accuracy_table
from moka_train.evaluation.generate import generate_predictions, target_text, write_predictions
from moka_train.evaluation.runner import load_run
from moka_train.training.checkpoints import describe_differences
from moka_train.training.distributed import init_distributed
from moka_train.training.recipe import RunStoppedError, fingerprinted_config, train

ROOT = Path(__file__).resolve().parents[1]


def make_demo_data(root: Path, videos: int, questions: str = "demo") -> dict[str, Any]:
    """The demo set under ``root`` (kept when it is already there: the generator skips what exists)."""
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "data_prep" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    held_out = max(2, videos // 12)
    return module.generate(
        root, num_videos=videos, val_videos=held_out, test_videos=held_out, questions=questions, progress=True
    )


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """configs/<name>.yaml composed with ``overrides``."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=overrides)


def config(overrides: list[str]) -> DictConfig:
    """The training config of the demo (``experiment=demo``) with ``overrides``."""
    return compose_config("train", ["experiment=demo", *overrides])


def run_stage(overrides: list[str], run_dir: Path) -> Path:
    """Train one stage into ``run_dir``; a finished run there is kept if it was trained with the same settings, and
    a stopped one continues from its last checkpoint (``resume=auto`` refuses one trained with other settings)."""
    args = [*overrides, f"run_dir={run_dir}", "resume=auto"]
    cfg = config(args)
    if (run_dir / "trainables").is_dir():
        kept = fingerprinted_config(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
        wanted = fingerprinted_config(OmegaConf.to_container(cfg, resolve=True))
        if kept != wanted:
            raise SystemExit(
                f"{run_dir} holds a run with other settings ({describe_differences(kept, wanted)}): delete it, or "
                "write this demo elsewhere with --out"
            )
        print(f"{run_dir}/trainables exists, trained with these settings: kept (delete the folder to train again)")
        return run_dir
    print("\n$ python scripts/train.py experiment=demo " + " ".join(args))
    try:
        return train(cfg)
    except RunStoppedError as stopped:
        print(f"\n{stopped}\nRun the same demo command again to continue.", file=sys.stderr)
        raise SystemExit(stopped.exit_code) from None


def evaluate(run_dir: Path, split: str = "test") -> dict[str, dict[str, Any]]:
    """Greedy answers of the run's model on ``split``, scored per question type (``predictions_<split>.jsonl``).
    The model and data are built as scripts/evaluate.py builds them (``moka_train.evaluation.runner``)."""
    ctx = init_distributed(use_deepspeed=False)
    run = load_run(compose_config("evaluate", [f"run_dir={run_dir}", f"split={split}"]), run_dir, ctx)
    # Room for the longest answer of the split and its EOS: a fixed small budget cut "flute" to "flut".
    answers = {target_text(record) for record in run.dataset.records}
    longest = max(len(run.collator.tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers)
    predictions = generate_predictions(run.model, run.dataset, run.collator, batch_size=32, max_new_tokens=longest + 1)
    write_predictions(run_dir / f"predictions_{split}.jsonl", predictions)
    return accuracy_by(predictions, MUSIC_AVQA_TYPE, sep=" ")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("demo_data"), help="the demo set (written if missing)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--videos", type=int, default=1500)
    parser.add_argument(
        "--questions", default="demo", help="demo (default) | musicavqa: the question set (data_prep/make_demo_data.py)"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per stage (default: the preset's)")
    parser.add_argument("--adapters", default="moka,lora", help="stage-2 methods, comma-separated")
    parser.add_argument("--blind", action="store_true", help="also run the blind control (media zeroed)")
    args, overrides = parser.parse_known_args(argv)
    adapters = [a for a in args.adapters.split(",") if a]

    summary = make_demo_data(args.data, args.videos, args.questions)
    chance = {kind: row["per_template"] for kind, row in summary["splits"]["test"]["chance"].items()}
    cache = (args.data / "feature_cache").resolve()
    common = [f"data.builder.root={args.data.resolve()}", f"features.cache_dir={cache}"]
    common += ["validation.split=val", "validation.every_steps=50"]  # val_loss on every stage's loss curve
    common += [f"stage.max_steps={args.steps}"] if args.steps else []
    common += overrides

    variants = [("", [])] + ([("blind_", ["blind=true"])] if args.blind else [])
    results = {}
    for prefix, blind in variants:
        stage1 = run_stage(["stage=pretrain", *common, *blind], args.out / f"{prefix}stage1")
        for adapter in adapters if not blind else adapters[:1]:
            name = f"{prefix}stage2_{adapter}"
            init = f"stage.init_from={stage1 / 'trainables'}"
            run_dir = run_stage(["stage=instruct", f"adapter={adapter}", init, *common, *blind], args.out / name)
            results[name] = evaluate(run_dir)
            print(f"\n{name}: test accuracy by question type (chance = the best media-blind answer per template)")
            print(format_accuracy_table(results[name], chance))
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nall results: {args.out / 'results.json'}; runs, logs, loss curves and predictions under {args.out}/")


if __name__ == "__main__":
    main()
