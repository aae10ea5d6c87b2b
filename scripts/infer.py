"""Answer one question about your own media file(s) with a trained run:

    python scripts/infer.py runs/s2 --video my_clip.mp4 --question "How many instruments are playing?"
    python scripts/infer.py runs/vt --image cat.jpg --question "What animal is this?"
    python scripts/infer.py runs/speech --speech hello.wav --question "What does the speaker say?"
    python scripts/infer.py runs/s2 --video clip.mp4 --audio other.wav --question "..." --json
    python scripts/infer.py runs/s2 --video clip.mp4 --question "..." --adapter-modalities text,visual

The answer goes to stdout (``--json``: one object with ``question``, ``media`` and ``prediction``); notes and
warnings go to stderr. Bad input (a missing file, a modality the run was not trained on, a folder that is not a
finished run) ends with ``infer.py: error: ...`` and exit code 2, without a traceback.

How it answers, the way ``scripts/evaluate.py`` does for a benchmark:

1. the run's ``config.yaml`` with its data builder replaced by ``moka_train.data.datasets.user_files``' one-record
   builder (the run's media settings kept: frames per video, audio windows), the media encoded raw (no feature
   cache), and the model built by ``build_data_and_model``, the function that trained it;
2. its ``trainables`` loaded for the modalities asked about (an audio-visual run answers an image question with
   its visual projector alone);
3. greedy generation (``generate_predictions``), ``--max-new-tokens`` at most.

Media: ``--video`` gives the frames (``visual``) and, when the run was trained with sound (an audio projector and
``<audio>`` in its prompt), the video's own sound track as ``audio``, as MUSIC-AVQA's builder does; ``--audio``
gives other sound instead, ``--no-video-audio`` none. ``--image`` is ``visual`` too, ``--speech`` goes to the
speech encoder. The user turn is the run's own prompt when its placeholders are exactly the media given (what the
model was trained on), else the official preset for those media with the run prompt's system turn and question
lead-in (``moka_train.data.datasets.user_files.prompt_for``). A question needs media: the model is built around
its media projectors (``build_multimodal_lm`` refuses a model without one), so there is no text-only path.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moka_train.evaluation.runner import (
    UsageError,
    check_adapter_paths,
    check_run_dir,
    keep_adapter_path,
    one_line,
    parse_modalities,
)

PROG = "infer.py"
BUILDER = "moka_train.data.datasets.user_files.build_user_records"
TRAINABLES_MANIFEST = "trainables.json"  # moka_train.models.trainables.MANIFEST_NAME, read without importing torch
# flag -> (modality, kind) of the media item it names
MEDIA_FLAGS = {"video": ("visual", "video"), "image": ("visual", "image"), "audio": ("audio", "audio"),
               "speech": ("speech", "audio")}  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Answer a question about your own media file(s) with a run of scripts/train.py.",
        epilog='example: python scripts/infer.py runs/s2 --video clip.mp4 -q "How many instruments are playing?"',
    )
    parser.add_argument("run_dir", help="a finished run of scripts/train.py (config.yaml and trainables/)")
    parser.add_argument("--question", "-q", required=True, help="the question, as you would ask it")
    media = parser.add_argument_group("media (at least one)")
    media.add_argument("--video", metavar="FILE", help="a video: its frames, and its sound when the run hears sound")
    media.add_argument("--image", metavar="FILE", help="an image")
    media.add_argument("--audio", metavar="FILE", help="a sound (an audio file, or a video's sound track)")
    media.add_argument("--speech", metavar="FILE", help="a speech clip, for a run with a speech encoder")
    media.add_argument(
        "--no-video-audio", action="store_true", help="--video gives the frames only, not the video's sound track"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="longest answer in tokens (64)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object: question, media, prediction")
    parser.add_argument(
        "--adapter-modalities",
        metavar="LIST",
        help="partial-modality inference: keep the adapter path only for the tokens of these modalities "
        "(comma-separated, e.g. text,visual; 'none': the frozen backbone with the trained projectors)",
    )
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# -- checks before the model is built (the cheap ones before torch is imported) -----------------------------------
def run_modalities(run_dir: Path, run_cfg: DictConfig) -> list[str]:
    """The media modalities the run can take: a trained projector (in its trainables) and an encoder (in its
    config). The encoder list alone is not enough: the train config's defaults name visual and audio encoders
    whatever the data, and only the modalities of the run's data get a projector."""
    path = run_dir / "trainables" / TRAINABLES_MANIFEST
    try:
        projectors = json.loads(path.read_text())["projectors"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{path} cannot be read ({error}): not a finished run of scripts/train.py") from None
    encoders = run_cfg.get("encoder") or {}
    return sorted(m for m in projectors if encoders.get(m) is not None)


def run_prompt(run_cfg: DictConfig) -> Any:
    """The Prompt the run was trained with (its ``data.builder.prompt``), or None when its config names none
    (the builder's own default, which the config does not record)."""
    from hydra.utils import instantiate

    node = OmegaConf.select(run_cfg, "data.builder.prompt")
    return None if node is None else instantiate(node)


def has_sound(path: str) -> bool:
    """Whether a media file has an audio stream (PyAV reads the container's header only)."""
    import av

    try:
        with av.open(path) as container:
            return len(container.streams.audio) > 0
    except (av.error.FFmpegError, OSError) as error:
        raise UsageError(f"{path} could not be opened as a media file: {error}") from None


def user_media(args: argparse.Namespace, modalities: list[str], prompt: Any) -> list[dict[str, str]]:
    """The media items the flags name, checked against the run's modalities: ``{modality, path, kind}`` each."""
    if args.video and args.image:
        raise UsageError("give --video or --image, not both: the run's prompts have one visual slot")
    given = {flag: getattr(args, flag) for flag in MEDIA_FLAGS if getattr(args, flag)}
    if not given:
        raise UsageError(
            "give a media file (--video, --image, --audio or --speech): the model is built around its media "
            "projectors and has no text-only path"
        )
    media = []
    for flag, path in given.items():
        modality, kind = MEDIA_FLAGS[flag]
        if not Path(path).expanduser().is_file():
            raise UsageError(f"--{flag} {path}: no such file")
        if modality not in modalities:
            article = "an" if modality == "audio" else "a"
            raise UsageError(
                f"this run was trained on {modalities}; --{flag} needs {article} {modality} encoder and projector, "
                "which it does not have"
            )
        media.append({"modality": modality, "path": str(Path(path).expanduser().resolve()), "kind": kind})
    from moka_train.data.datasets.user_files import prompt_modalities  # imports torch: after the checks above

    # The run hears a video's sound when it was trained with sound (an audio projector, and <audio> in its prompt
    # when the config records one), as MUSIC-AVQA's builder gives it the video file for both.
    hears = "audio" in modalities and (prompt is None or "audio" in prompt_modalities(prompt))
    if args.video and not args.audio and not args.no_video_audio and hears:
        path = media[0]["path"]
        if not has_sound(path):
            raise UsageError(
                f"--video {args.video} has no sound track, and this run answers from frames and sound: give the "
                "sound with --audio FILE, or pass --no-video-audio to ask about the frames alone"
            )
        media.append({"modality": "audio", "path": path, "kind": "audio"})
    return media


def check_readable(media: list[dict[str, str]]) -> None:
    """Open each file and decode its first frame of the kind needed (milliseconds), so that an unreadable file is
    refused before the model is built, naming it."""
    from moka_train.data.media import probe_media
    from moka_train.data.records import MediaRef

    for item in media:
        try:
            probe_media(MediaRef(item["modality"], item["path"], item["kind"]))
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read {item['path']} as {item['kind']}: {error}") from None


def adapter_modalities(value: str | None, run_cfg: DictConfig) -> list[str] | None:
    """``--adapter-modalities``: None (the whole adapter), or the modalities whose tokens keep the adapter path."""
    if value is None:
        return None
    if run_cfg.get("adapter") is None:
        raise UsageError("--adapter-modalities limits the adapter path, but this run has no adapter (a stage-1 run)")
    if not value.strip():  # an unset shell variable: not a silent "none"
        raise UsageError("--adapter-modalities is empty: give modality names (e.g. text,visual) or none")
    names = [] if value.strip().lower() == "none" else [name for name in value.split(",") if name.strip()]
    chosen = parse_modalities(names, "--adapter-modalities")
    check_adapter_paths(chosen, list(run_cfg.adapter.modalities), "--adapter-modalities")
    return chosen


def literal(text: str) -> str:
    """``text`` as an OmegaConf string that resolves to itself: a question or a file name holding ``${`` must not
    be read as an interpolation (the backslashes right before it are doubled, then it is escaped)."""
    return re.sub(r"(\\*)\$\{", lambda match: match.group(1) * 2 + "\\${", text)


def inference_config(run_cfg: DictConfig, question: str, media: list[dict[str, str]], prompt: Any) -> DictConfig:
    """The run's config with the user's question as its data and raw media, set up for inference as in
    scripts/evaluate.py (the trainables loaded afterwards hold everything trained)."""
    builder = {
        "_target_": BUILDER,
        "question": literal(question),
        "media": [{**item, "path": literal(item["path"])} for item in media],
        "prompt": {
            "_target_": "moka_train.data.prompts.Prompt",
            "template": literal(prompt.template),
            "system": None if prompt.system is None else literal(prompt.system),
            "question_prefix": literal(prompt.question_prefix),
        },
    }
    # The run's media settings (frames per video, audio windows) stay: the answer depends on them.
    run_cfg.data = OmegaConf.create({"builder": builder, "media": run_cfg.data.media})
    run_cfg.features.cache_dir = None  # encode the user's files raw; a run's cache holds its own data only
    run_cfg.stage.init_from = None
    run_cfg.stage.gradient_checkpointing = False
    run_cfg.probe_media = False
    run_cfg.loader.max_length = None  # a training limit on sample length; one question need not fit it
    return run_cfg


def pick_device(value: str | None) -> Any:
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise UsageError(f"--device {value}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {value}: CUDA is not available on this machine")
    return device


# -- answering ----------------------------------------------------------------------------------------------
def infer(args: argparse.Namespace) -> dict[str, Any]:
    """Answer ``args.question`` about the media the flags name; returns ``{question, media, prediction}``."""
    question = args.question.strip()
    if not question:
        raise UsageError("--question is empty")
    run_dir = check_run_dir(args.run_dir)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    modalities = run_modalities(run_dir, run_cfg)
    trained_prompt = run_prompt(run_cfg)
    media = user_media(args, modalities, trained_prompt)
    active = adapter_modalities(args.adapter_modalities, run_cfg)
    from moka_train.data.datasets.user_files import prompt_for

    prompt = prompt_for([(m["modality"], m["path"], m["kind"]) for m in media], trained_prompt)
    run_cfg = inference_config(run_cfg, question, media, prompt)

    # Imported here: torch and the model stack take seconds, which the refusals above need not wait for.
    from moka_train.evaluation.generate import generate_predictions
    from moka_train.models.trainables import load_trainables
    from moka_train.training.distributed import DistributedContext
    from moka_train.training.recipe import build_data_and_model

    device = pick_device(args.device)
    check_readable(media)
    which = "the run's own" if prompt == trained_prompt else "the preset for these media"
    described = ", ".join(f"{m['modality']} {m['kind']} {m['path']}" for m in media)
    print(f"{PROG}: {run_dir} on {device}; {described}; prompt: {which}", file=sys.stderr)
    if prompt != trained_prompt:
        print(
            f"{PROG}: warning: this run never trained on this prompt and media (an image to a video+audio run, say): "
            "its answer may mean nothing",
            file=sys.stderr,
        )

    from hydra.errors import InstantiationException

    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=device)  # one process, whatever the env
    try:
        dataset, model, collator, encoders = build_data_and_model(run_cfg, ctx, inference=True)
    except (OSError, ValueError, InstantiationException) as error:  # a checkpoint that does not load, a bad config
        raise UsageError(f"cannot build the run's model: {one_line(error)}") from None
    model.encoders.update(encoders)  # raw media: the model encodes them itself
    trainables = run_dir / "trainables"
    try:
        load_trainables(model, trainables, modalities=sorted(model.projectors))
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load {trainables}: {error}") from None
    model.to(device)
    try:
        sample = dataset[0]  # decoded here, so that an unreadable file is a usage error, not a traceback
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read the media: {error}") from None

    with keep_adapter_path(model, active):
        (answer,) = generate_predictions(
            model, [sample], collator, batch_size=1, max_new_tokens=args.max_new_tokens, progress=False
        )
    return {"question": question, "media": media, "prediction": answer["prediction"]}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: the answer on stdout; returns the exit code (2: a usage error, on stderr)."""
    args = parse_args(argv)  # argparse's own errors exit with 2 and "infer.py: error: ..."
    try:
        result = infer(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False) if args.json else result["prediction"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
