"""scripts/infer.py on the CPU: a tiny MokA run trained for one step on the synthetic demo set (its adapter then
given random B's, so that the adapter path and MokA's question keys change the answers), asked about the demo's own
videos and about an image. Every answer is checked against an independent path: the benchmarks' builders
(MUSIC-AVQA's on the same video and question, MME's on the same image) through the run's model and
``generate_predictions``, with the prompt infer.py must pick. Bad input is refused, naming what is wrong."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from moka_train.adapters import active_modalities
from moka_train.data.dataset import MultimodalDataset
from moka_train.data.datasets.mme import build_mme
from moka_train.data.datasets.music_avqa import build_music_avqa
from moka_train.data.datasets.user_files import (
    build_user_records,
    preset_prompt,
    prompt_for,
    prompt_modalities,
)
from moka_train.data.media import build_media_loader
from moka_train.data.prompts import AUDIO, AUDIO_VISUAL, SPEECH, VISUAL, Prompt
from moka_train.evaluation.generate import generate_predictions
from moka_train.models.trainables import load_trainables
from moka_train.training.recipe import build_data_and_model
from tests.helpers import loaded_script
from tests.launch import ROOT, environment
from tests.trained_runs import CPU

INFER = ROOT / "scripts" / "infer.py"
TOKENS = 6  # max_new_tokens on both paths
SETTINGS = ["--max-new-tokens", str(TOKENS), "--device", "cpu"]  # the reference runs on the CPU, also beside a GPU
VIDEO_BLOCK = "This is a video:\n<video_start><video><video_end>\n"


@pytest.fixture(scope="module")
def trained(demo_runs) -> tuple[Path, Path]:
    """The demo set (test split: 2 videos, 6 questions) and a MokA run trained on it, with random B's
    (tests/trained_runs.py), so that the adapter path and MokA's question keys change the answers."""
    return demo_runs["data"], demo_runs["moka"]


def reference_config(run_dir: Path) -> DictConfig:
    """The run's config set up for inference on its own test split with raw media, as scripts/evaluate.py does."""
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    run_cfg.data.builder.split = "test"
    run_cfg.features.cache_dir = None
    run_cfg.stage.init_from = None
    run_cfg.probe_media = False
    return run_cfg


@pytest.fixture(scope="module")
def reference(trained) -> Callable[..., list[str]]:
    """Answers of the run's model (built and loaded once, as scripts/evaluate.py does) to a benchmark builder's
    records: ``answers(records, active=None)``, ``active`` the modalities that keep the adapter path."""
    _, run_dir = trained
    run_cfg = reference_config(run_dir)
    _, model, collator, encoders = build_data_and_model(run_cfg, CPU, inference=True)
    model.encoders.update(encoders)
    load_trainables(model, run_dir / "trainables")
    loader = build_media_loader(OmegaConf.to_container(run_cfg.data.media), encoders["visual"])

    def answers(records: list, active: list[str] | None = None) -> list[str]:
        dataset = MultimodalDataset(records, loader=loader, inference=True)
        with contextlib.nullcontext() if active is None else active_modalities(model.llm, active):
            predictions = generate_predictions(
                model, dataset, collator, batch_size=2, max_new_tokens=TOKENS, progress=False
            )
        return [p["prediction"] for p in predictions]

    return answers


@pytest.fixture(scope="module")
def script():
    with loaded_script(INFER) as module:
        yield module


def demo_questions(root: Path) -> list[dict]:
    """The demo's test questions in file order: ``video`` (the mp4) and ``question`` (its template filled in)."""
    records = build_music_avqa(root, split="test")
    return [
        {"video": root / "MUSIC-AVQA-Videos" / f"{r.metadata['video_id']}.mp4", "question": r.metadata["question"]}
        for r in records
    ]


def ask(script, capsys, run_dir: Path, *args: str) -> dict:
    """infer.py's main in-process with --json: the printed object (which must be all of stdout)."""
    code = script.main([str(run_dir), *args, *SETTINGS, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def refused(script, capsys, *argv: str) -> str:
    """infer.py's main in-process on bad input: exit code 2, nothing on stdout; the message on stderr."""
    code = script.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("infer.py: error: ") and "Traceback" not in err, err
    return last


# -- answers against the benchmark builders --------------------------------------------------------------------
def test_a_video_question_gets_the_answer_of_the_benchmark_path(trained, reference, script, capsys):
    root, run_dir = trained
    # The run's own data builder (MUSIC-AVQA's, with the prompt its config.yaml records) on its test split.
    expected = reference(instantiate(reference_config(run_dir).data.builder))
    assert len(set(expected)) > 2, expected  # the answers depend on the video and the question
    # Every other question: both videos, three question types (each call builds the model anew).
    for item, answer in zip(demo_questions(root)[::2], expected[::2], strict=True):
        result = ask(script, capsys, run_dir, "--video", str(item["video"]), "--question", item["question"])
        assert result["prediction"] == answer, item
        assert result["question"] == item["question"]
        path = str(item["video"].resolve())
        assert result["media"] == [
            {"modality": "visual", "path": path, "kind": "video"},
            {"modality": "audio", "path": path, "kind": "audio"},  # the run hears sound: the video's own track
        ]

    # Plain output: the answer alone on stdout.
    item = demo_questions(root)[0]
    code = script.main([str(run_dir), "--video", str(item["video"]), "-q", item["question"], *SETTINGS])
    out, _ = capsys.readouterr()
    assert code == 0 and out == expected[0] + "\n"


def test_one_modality_uses_the_preset_with_the_runs_system_and_lead_in(trained, reference, script, capsys):
    root, run_dir = trained
    lead_in = "Please answer this question: "  # configs/data/demo.yaml's prompt, as the run recorded it

    def answers(template: str) -> list[str]:  # one question per video (the full set ran in the test above)
        return reference(build_music_avqa(root, split="test", prompt=Prompt(template, question_prefix=lead_in))[::3])

    # MUSIC-AVQA's builder with a one-modality prompt gives the same videos' sound alone, or their frames alone.
    full, heard, seen = answers(AUDIO_VISUAL), answers(AUDIO), answers(VIDEO_BLOCK + "{question}")
    assert heard != full and seen != full and heard != seen  # the media given change the answers
    for item, sound, frames in zip(demo_questions(root)[::3], heard, seen, strict=True):
        video, question = str(item["video"]), item["question"]
        assert ask(script, capsys, run_dir, "--audio", video, "-q", question)["prediction"] == sound
        result = ask(script, capsys, run_dir, "--video", video, "--no-video-audio", "-q", question)
        assert result["prediction"] == frames
        assert [m["modality"] for m in result["media"]] == ["visual"]


def test_an_image_question_gets_the_answer_of_the_mme_path(trained, reference, script, capsys, tmp_path):
    _, run_dir = trained
    folder = tmp_path / "mme" / "existence"
    folder.mkdir(parents=True)
    questions = ["Is there a red square in the image?", "Is there a blue circle?"]
    for stem, colour in (("0001", "red"), ("0002", "blue")):
        image = Image.new("RGB", (48, 40), "white")
        image.paste(Image.new("RGB", (20, 20), colour), (10, 8))
        image.save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text("".join(f"{q} Please answer yes or no.\tYes\n" for q in questions))
    # The preset image turn (VISUAL) with the run prompt's system turn and lead-in: what infer.py must choose.
    records = build_mme(
        tmp_path / "mme", prompt=Prompt(VISUAL, question_prefix="Please answer this question: "), subtasks=["existence"]
    )
    expected = reference(records)
    assert len(set(expected)) > 1, expected
    for record, answer in zip(records[::3], expected[::3], strict=True):  # each image, each question once
        image = folder / record.metadata["image"]
        question = record.metadata["question"].removesuffix(" Please answer yes or no.")
        result = ask(script, capsys, run_dir, "--image", str(image), "-q", question)
        assert result["prediction"] == answer, record.id
        assert result["media"] == [{"modality": "visual", "path": str(image.resolve()), "kind": "image"}]


def test_partial_modality_inference_keeps_the_adapter_on_the_chosen_tokens(trained, reference, script, capsys):
    root, run_dir = trained
    records = build_music_avqa(root, split="test")[:1]
    item = demo_questions(root)[0]
    args = ["--video", str(item["video"]), "-q", item["question"]]
    full = reference(records)[0]
    answers = {}
    for flag, active in (("text,visual", ["text", "visual"]), ("none", [])):
        answers[flag] = ask(script, capsys, run_dir, *args, "--adapter-modalities", flag)["prediction"]
        assert answers[flag] == reference(records, active=active)[0], flag
    assert answers["none"] != full  # the switch takes effect: without the adapter path the answer changes
    err = refused(script, capsys, str(run_dir), *args, "--adapter-modalities", "text,speech")
    assert "['speech']" in err and "['text', 'visual', 'audio']" in err


# -- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_is_refused_naming_what_is_wrong(trained, script, capsys, tmp_path):
    root, run_dir = trained
    video = str(next((root / "MUSIC-AVQA-Videos").glob("*.mp4")))
    run, q = str(run_dir), ["-q", "What is playing?"]
    missing = tmp_path / "nowhere" / "clip.mp4"
    assert f"--video {missing}: no such file" in refused(script, capsys, run, "--video", str(missing), *q)
    assert f"--image {missing}: no such file" in refused(script, capsys, run, "--image", str(missing), *q)
    err = refused(script, capsys, run, "--speech", video, *q)
    assert "this run was trained on ['audio', 'visual']; --speech needs a speech encoder" in err
    assert "no text-only path" in refused(script, capsys, run, *q)
    assert "not both" in refused(script, capsys, run, "--video", video, "--image", video, *q)
    assert "--question is empty" in refused(script, capsys, run, "--video", video, "-q", "  ")
    assert "--device tpu9:" in refused(script, capsys, run, "--video", video, *q, "--device", "tpu9")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in refused(script, capsys, run, "--video", video, *q, "--device", "cuda")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusals: the same exit code and prefix
        script.main([run, "--video", video, *q, "--max-new-tokens", "0"])
    assert exit_info.value.code == 2 and "infer.py: error: argument --max-new-tokens" in capsys.readouterr().err

    silent = tmp_path / "silent.png"  # an image has no sound track: as a --video on a run that hears sound
    Image.new("RGB", (32, 32), "red").save(silent)
    err = refused(script, capsys, run, "--video", str(silent), *q)
    assert "has no sound track" in err and "--no-video-audio" in err
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    assert str(broken) in refused(script, capsys, run, "--video", str(broken), "--no-video-audio", *q)

    empty, half = tmp_path / "empty", tmp_path / "half"
    empty.mkdir()
    half.mkdir()
    (half / "config.yaml").write_text("seed: 1\n")
    cases = {
        str(tmp_path / "no_run"): "no such folder",
        str(empty): "has no config.yaml file",
        str(half): "has no trainables folder",
    }
    for bad, message in cases.items():
        assert message in refused(script, capsys, bad, "--video", video, *q)

    stage1 = tmp_path / "stage1"  # the run without its adapter, as a stage-1 run's config has none
    (stage1 / "trainables").mkdir(parents=True)
    (stage1 / "trainables" / "trainables.json").write_text((run_dir / "trainables" / "trainables.json").read_text())
    config = OmegaConf.load(run_dir / "config.yaml")
    config.adapter = None
    OmegaConf.save(config, stage1 / "config.yaml")
    err = refused(script, capsys, str(stage1), "--video", video, *q, "--adapter-modalities", "text")
    assert "this run has no adapter" in err
    # An unset shell variable is not a silent "none" (which turns the adapter off).
    err = refused(script, capsys, run, "--video", video, *q, "--adapter-modalities", "")
    assert "--adapter-modalities is empty" in err
    # The run moved to a machine without its encoder checkpoint: one line naming it (it was a traceback).
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "trainables").symlink_to(run_dir / "trainables")
    config = OmegaConf.load(run_dir / "config.yaml")
    config.encoder.visual = OmegaConf.merge(
        OmegaConf.load(ROOT / "configs" / "encoder" / "visual" / "clip_vit_l14.yaml"), {"checkpoint": "/gone.pt"}
    )
    OmegaConf.save(config, moved / "config.yaml")
    err = refused(script, capsys, str(moved), "--video", video, "--no-video-audio", *q)
    assert "cannot build the run's model:" in err and "CLIP checkpoint /gone.pt does not exist" in err


def test_the_command_line_exits_with_2_and_a_message(tmp_path):
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), "red").save(image)
    command = [sys.executable, str(INFER), str(tmp_path / "no_run"), "--image", str(image), "-q", "What is this?"]
    done = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.startswith("infer.py: error: run_dir ") and "no such folder" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# -- the builder and the prompt choice ---------------------------------------------------------------------------
def test_preset_prompts_are_the_official_ones():
    video, image = ("visual", "v.mp4", "video"), ("visual", "i.png", "image")
    audio, speech = ("audio", "v.mp4", "audio"), ("speech", "s.wav", "audio")
    assert preset_prompt([image]).template == VISUAL
    assert preset_prompt([audio]).template == AUDIO
    assert preset_prompt([speech]).template == SPEECH
    assert preset_prompt([audio, video]).template == AUDIO_VISUAL  # seen first, then heard, whatever the order given
    assert preset_prompt([video]).template == VIDEO_BLOCK + "{question}"
    assert prompt_modalities(preset_prompt([speech, image])) == ["visual", "speech"]

    run = Prompt(AUDIO_VISUAL, system="Be brief.", question_prefix="Please answer this question: ")
    assert prompt_for([video, audio], run) is run  # exactly the run's media: the run's own prompt
    assert prompt_for([audio], run) == Prompt(AUDIO, system="Be brief.", question_prefix=run.question_prefix)
    assert prompt_for([image], None) == Prompt(VISUAL)  # no run prompt: the preset's defaults
    vt = Prompt(VISUAL, question_prefix="Q: ")
    assert prompt_for([video], vt) is vt  # a visual run's image prompt takes the frames of a video too


def test_the_builder_places_media_on_the_placeholders_and_refuses_bad_input(tmp_path):
    clip, wav = tmp_path / "clip.mp4", tmp_path / "sound.wav"
    clip.write_bytes(b"")
    wav.write_bytes(b"")
    prompt = Prompt(AUDIO_VISUAL, question_prefix="Please answer this question: ")
    media = [{"modality": "audio", "path": str(wav), "kind": "audio"}, ("visual", str(clip), "video")]
    (record,) = build_user_records("  How many?\n", media, prompt)
    assert record.id == "user/0" and record.metadata == {"question": "How many?"}
    assert [(r.modality, r.path, r.kind) for r in record.media] == [
        ("visual", str(clip), "video"),
        ("audio", str(wav), "audio"),
    ]  # in the prompt's order
    user = record.messages[-1]["content"]
    assert user[slice(*record.question_span)] == "Please answer this question: How many?"
    assert record.messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert len(record.messages) == 2  # no answer turn: an inference record

    with pytest.raises(ValueError, match="non-empty"):
        build_user_records(" ", media, prompt)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gone.mp4")):
        build_user_records("How many?", [("visual", str(tmp_path / "gone.mp4"), "video")])
    with pytest.raises(ValueError, match="placeholders for"):
        build_user_records("How many?", media[:1], prompt)
    with pytest.raises(ValueError, match="not supported"):
        build_user_records("How many?", [("audio", str(clip), "video")])


def test_strings_reach_the_builder_unchanged_through_the_config(script):
    for text in ["What is ${x}?", "a \\${y}", "c:\\dir\\${z}", "tail \\", "${oc.env:HOME}", "plain"]:
        assert OmegaConf.create({"value": script.literal(text)}).value == text
