"""The audio and speech builders (AudioCaps, LibriSpeech, MMAU, AIR-Bench) and their data configs.

Expectations are written out by hand from the documented formats (benchmarks.md §7-8, the AudioCaps and
LibriSpeech layouts) and, for MMAU, from the real excerpt in ../shared/samples/mmau. Fixtures are written in
tmp_path; audio files only need to exist (the builders read no audio).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moka_train.data import prompts
from moka_train.data.datasets.air_bench import INSTRUCTION, SPEECH_TASKS, build_air_bench
from moka_train.data.datasets.audiocaps import build_audiocaps
from moka_train.data.datasets.librispeech import build_librispeech
from moka_train.data.datasets.mmau import build_mmau, normalise_category
from moka_train.data.records import Record
from tests.reference_files import shared_file

DATA_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
AUDIO_HEAD = "This is an audio:\n<audio_start><audio><audio_end>\n"
SPEECH_HEAD = "This is a speech clip:\n<speech_start><speech><speech_end>\n"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def span_text(record: Record) -> str:
    """The question span's text, in the last user turn."""
    start, end = record.question_span
    return [m for m in record.messages if m["role"] == "user"][-1]["content"][start:end]


def by_id(records: list[Record]) -> dict[str, Record]:
    ids = [r.id for r in records]
    assert len(set(ids)) == len(ids)
    return {r.id: r for r in records}


# ----------------------------------------------------------------------------------------------- AudioCaps
AUDIOCAPS_TRAIN = [
    ["audiocap_id", "youtube_id", "start_time", "caption"],
    ["91139", "r1nicOVtvkQ", "130", "A woman talks nearby as water pours"],
    ["58146", "UDGBjjwyaqE", "20", "Multiple clanging and clanking sounds, then a man speaks"],
    ["11542", "7fmOlUlwoNg", "20", "Constant rattling noise and sharp vibrations"],
]
# Val/test give five captions per clip, not always on adjacent lines: clip X on lines 2 and 4, clip Y on 3.
AUDIOCAPS_TEST = [
    ["audiocap_id", "youtube_id", "start_time", "caption"],
    ["103549", "--0w1YA1Hm4", "30", "A vehicle driving as a man and woman are talking and laughing"],
    ["103548", "-AheI8Epim4", "30", "Pigeons coo, a man speaks"],
    ["103541", "--0w1YA1Hm4", "30", "Men speak, a car goes by"],
]


def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


@pytest.fixture
def audiocaps(tmp_path: Path) -> Path:
    write_csv(tmp_path / "train.csv", AUDIOCAPS_TRAIN)
    write_csv(tmp_path / "test.csv", AUDIOCAPS_TEST)
    for split, rows in (("train", AUDIOCAPS_TRAIN), ("test", AUDIOCAPS_TEST)):
        for row in rows[1:]:
            touch(tmp_path / split / f"{row[0]}.wav")
    return tmp_path


def test_audiocaps_train_records(audiocaps):
    records = build_audiocaps(audiocaps, split="train")
    assert [r.id for r in records] == ["audiocaps/train/91139", "audiocaps/train/58146", "audiocaps/train/11542"]
    first = records[0]
    assert first.messages == [
        SYSTEM,
        {"role": "user", "content": AUDIO_HEAD + "Please describe this audio."},
        {"role": "assistant", "content": "A woman talks nearby as water pours"},
    ]
    assert span_text(first) == "Please describe this audio."
    # The caption with commas survives the CSV quoting whole.
    assert records[1].messages[-1]["content"] == "Multiple clanging and clanking sounds, then a man speaks"
    (ref,) = first.media
    assert (ref.modality, ref.kind, ref.path) == ("audio", "audio", str(audiocaps / "train" / "91139.wav"))
    assert os.path.isabs(ref.path)
    assert first.metadata == {
        "split": "train",
        "audiocap_id": 91139,
        "audiocap_ids": [91139],
        "youtube_id": "r1nicOVtvkQ",
        "start_time": 130.0,
        "caption": "A woman talks nearby as water pours",
        "references": ["A woman talks nearby as water pours"],
    }


def test_audiocaps_references_and_one_per_clip(audiocaps):
    records = by_id(build_audiocaps(audiocaps, split="test"))
    assert list(records) == ["audiocaps/test/103549", "audiocaps/test/103548", "audiocaps/test/103541"]
    clip_x = ["A vehicle driving as a man and woman are talking and laughing", "Men speak, a car goes by"]
    assert records["audiocaps/test/103541"].metadata["references"] == clip_x
    assert records["audiocaps/test/103541"].metadata["audiocap_ids"] == [103549, 103541]
    assert records["audiocaps/test/103548"].metadata["references"] == ["Pigeons coo, a man speaks"]

    clips = build_audiocaps(audiocaps, split="test", one_per_clip=True)
    assert [r.id for r in clips] == ["audiocaps/test/103549", "audiocaps/test/103548"]
    assert clips[0].messages[-1]["content"] == clip_x[0]
    assert clips[0].metadata["references"] == clip_x


def test_audiocaps_file_name_pattern_and_prompt(audiocaps):
    for row in AUDIOCAPS_TRAIN[1:]:
        touch(audiocaps / "clips" / f"{row[1]}_{row[2]}.wav")
    prompt = prompts.Prompt("<audio> {question}", system=None)
    records = build_audiocaps(
        audiocaps, audio_path="clips/{youtube_id}_{start_time}.wav", prompt=prompt, instruction="Caption it."
    )
    assert records[0].media[0].path == str(audiocaps / "clips" / "r1nicOVtvkQ_130.wav")
    assert records[0].messages[0] == {"role": "user", "content": "<audio> Caption it."}
    assert records[0].question_span == (8, 19)


def test_audiocaps_missing_audio(audiocaps):
    (audiocaps / "train" / "58146.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"audiocaps/train/58146.*58146\.wav"):
        build_audiocaps(audiocaps)
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        records = build_audiocaps(audiocaps, on_missing="skip")
    assert [r.metadata["audiocap_id"] for r in records] == [91139, 11542]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["id", "youtube_id", "start_time", "caption"]], "expected the header"),
        ([], "expected the header"),
        ([AUDIOCAPS_TRAIN[0], ["1", "a", "0"]], r"line 2: expected 4 columns"),
        ([AUDIOCAPS_TRAIN[0], ["1", "a", "0", "x", "y"]], r"line 2: expected 4 columns"),
        ([AUDIOCAPS_TRAIN[0], ["1", "a", "0", "x"], ["x1", "b", "0", "y"]], r"line 3: audiocap_id must be an integer"),
        ([AUDIOCAPS_TRAIN[0], ["1", "a", "ten", "x"]], r"line 2: .*start_time a number"),
        ([AUDIOCAPS_TRAIN[0], ["1", "a", "0", " "]], r"line 2: the field 'caption' is empty"),
        ([AUDIOCAPS_TRAIN[0], ["1", "a", "0", "x"], ["1", "b", "0", "y"]], r"line 3: audiocap_id 1 repeats line 2"),
    ],
)
def test_audiocaps_bad_csv(tmp_path, rows, message):
    write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(ValueError, match=message) as error:
        build_audiocaps(tmp_path, on_missing="skip")
    assert "train.csv" in str(error.value)


def test_audiocaps_bad_options(audiocaps, tmp_path):
    with pytest.raises(ValueError, match="audio_path '.*ytid.*' is not a pattern"):
        build_audiocaps(audiocaps, audio_path="{split}/{ytid}.wav")
    with pytest.raises(FileNotFoundError, match="val.csv"):
        build_audiocaps(audiocaps, split="val")
    with pytest.raises(ValueError, match="on_missing"):
        build_audiocaps(audiocaps, on_missing="ignore")


# --------------------------------------------------------------------------------------------- LibriSpeech
LIBRISPEECH = {
    "train-clean-100/19/198/19-198.trans.txt": [
        "19-198-0000 NORTHANGER ABBEY",
        "19-198-0001 THIS LITTLE WORK WAS FINISHED IN THE YEAR EIGHTEEN O THREE",
    ],
    "train-clean-100/103/1240/103-1240.trans.txt": ["103-1240-0000 CHAPTER ONE MISSUS RACHEL LYNDE IS SURPRISED"],
    "dev-clean/84/121123/84-121123.trans.txt": ["84-121123-0000 GO DO YOU HEAR"],
}


@pytest.fixture
def librispeech(tmp_path: Path) -> Path:
    for relative, lines in LIBRISPEECH.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        for line in lines:
            touch(path.parent / f"{line.split()[0]}.flac")
    return tmp_path


def test_librispeech_records(librispeech):
    records = by_id(build_librispeech(librispeech))
    assert sorted(records) == [
        "librispeech/train-clean-100/103-1240-0000",
        "librispeech/train-clean-100/19-198-0000",
        "librispeech/train-clean-100/19-198-0001",
    ]
    record = records["librispeech/train-clean-100/19-198-0001"]
    assert record.messages == [
        SYSTEM,
        {"role": "user", "content": SPEECH_HEAD + "Please transcribe this speech."},
        {"role": "assistant", "content": "THIS LITTLE WORK WAS FINISHED IN THE YEAR EIGHTEEN O THREE"},
    ]
    assert span_text(record) == "Please transcribe this speech."
    (ref,) = record.media
    expected = librispeech / "train-clean-100" / "19" / "198" / "19-198-0001.flac"
    assert (ref.modality, ref.kind, ref.path) == ("speech", "audio", str(expected))
    assert record.metadata == {
        "split": "train-clean-100",
        "utterance": "19-198-0001",
        "speaker": "19",
        "chapter": "198",
        "transcript": "THIS LITTLE WORK WAS FINISHED IN THE YEAR EIGHTEEN O THREE",
    }


def test_librispeech_options(librispeech):
    records = build_librispeech(librispeech, split=["train-clean-100", "dev-clean"], lowercase=True)
    assert len(records) == 4
    last = by_id(records)["librispeech/dev-clean/84-121123-0000"]
    assert last.messages[-1]["content"] == "go do you hear"
    assert last.metadata["transcript"] == "GO DO YOU HEAR"
    touch(librispeech / "dev-clean" / "84" / "121123" / "84-121123-0000.wav")
    (wav,) = build_librispeech(librispeech, split="dev-clean", audio_ext=".wav")
    assert wav.media[0].path.endswith("84-121123-0000.wav")


def test_librispeech_missing_audio(librispeech):
    (librispeech / "dev-clean" / "84" / "121123" / "84-121123-0000.flac").unlink()
    with pytest.raises(FileNotFoundError, match=r"librispeech/dev-clean/84-121123-0000.*\.flac"):
        build_librispeech(librispeech, split="dev-clean")
    with pytest.warns(UserWarning, match="skipped 1 of 1"):
        assert build_librispeech(librispeech, split="dev-clean", on_missing="skip") == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("84-121123-0001", r"line 2: expected 'UTT-ID TRANSCRIPT'"),
        ("84-121123-0001   ", r"line 2: expected 'UTT-ID TRANSCRIPT'"),
        ("85-121123-0001 HELLO", r"line 2: utterance id '85-121123-0001' does not belong to speaker 84"),
        ("84-121123-0000 AGAIN", r"line 2: utterance '84-121123-0000' repeats .*line 1"),
    ],
)
def test_librispeech_bad_lines(librispeech, line, message):
    path = librispeech / "dev-clean" / "84" / "121123" / "84-121123.trans.txt"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        build_librispeech(librispeech, split="dev-clean", on_missing="skip")
    assert "84-121123.trans.txt" in str(error.value)


def test_librispeech_bad_layout(librispeech):
    with pytest.raises(FileNotFoundError, match="test-other"):
        build_librispeech(librispeech, split="test-other")
    (librispeech / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        build_librispeech(librispeech, split="empty")
    touch(librispeech / "misnamed" / "1" / "2" / "1-3.trans.txt")
    with pytest.raises(ValueError, match=r"1-3.trans.txt: .* must be named 1-2.trans.txt"):
        build_librispeech(librispeech, split="misnamed")
    # The same utterance in two subsets: ids must stay unique within a build.
    copy = librispeech / "dev-other" / "84" / "121123" / "84-121123.trans.txt"
    copy.parent.mkdir(parents=True)
    copy.write_text("84-121123-0000 GO DO YOU HEAR\n")
    with pytest.raises(ValueError, match="utterance '84-121123-0000' repeats"):
        build_librispeech(librispeech, split=["dev-clean", "dev-other"], on_missing="skip")


# ---------------------------------------------------------------------------------------------------- MMAU
def mmau_root(tmp_path: Path, items: list | None = None, source: Path | None = None) -> Path:
    """A dataset folder: the annotation file (the real excerpt linked, not copied, or items) and the clips."""
    annotation = tmp_path / "mmau-test-mini.json"
    if source is not None:
        annotation.symlink_to(source)
    else:
        annotation.write_text(json.dumps(items))
    for item in json.loads(annotation.read_text()):
        if isinstance(item, dict) and isinstance(item.get("audio_id"), str) and item["audio_id"].startswith("./"):
            touch(tmp_path / item["audio_id"])
    return tmp_path


def mmau_item(**changes) -> dict:
    item = {
        "id": "q1",
        "audio_id": "./test-mini-audios/q1.wav",
        "question": "What is the speaker's emotion?",
        "choices": ["happy", "sad", "angry"],
        "answer": "sad",
        "dataset": "meld",
        "task": "speech",
        "category": "Information Extraction",
        "difficulty": "easy",
        "split": "test-mini",
        "sub-category": "Emotion Recognition",
    }
    return {**item, **changes}


def test_mmau_real_excerpt(tmp_path):
    source = shared_file("samples", "mmau", "mmau-test-mini.json")
    raw = json.loads(source.read_text())
    root = mmau_root(tmp_path, source=source)
    records = build_mmau(root)
    # The excerpt: the first 26 speech records of 50 (its README); the full v05.15.25 file has 333.
    assert len(records) == {50: 26, 1000: 333}[len(raw)]
    assert all(r.metadata["task"] == "speech" and r.media[0].modality == "speech" for r in records)
    # benchmarks.md §7's example, the first speech record.
    first = records[0]
    assert first.id == "mmau/test-mini/62b58932-80b8-4c3b-8229-cf356ad7d059"
    question = (
        "What makes the last sentence sarcastic given the conversation?\nChoices:\n"
        "- Complimenting the organizational system.\n- Praising the coffee table.\n"
        "- Exaggerates messiness to absurd extent.\n- Suggesting a real garage sale.\n"
        "Answer with the exact text of the correct choice and nothing else."
    )
    assert first.messages == [
        SYSTEM,
        {"role": "user", "content": SPEECH_HEAD + question},
        {"role": "assistant", "content": "Exaggerates messiness to absurd extent."},
    ]
    assert span_text(first) == question
    assert first.media[0].path == str(root / "test-mini-audios" / "62b58932-80b8-4c3b-8229-cf356ad7d059.wav")
    assert first.metadata == {
        "id": "62b58932-80b8-4c3b-8229-cf356ad7d059",
        "question": "What makes the last sentence sarcastic given the conversation?",
        "choices": [
            "Complimenting the organizational system.",
            "Praising the coffee table.",
            "Exaggerates messiness to absurd extent.",
            "Suggesting a real garage sale.",
        ],
        "answer": "Exaggerates messiness to absurd extent.",
        "answer_letter": "C",
        "letters": {
            "A": "Complimenting the organizational system.",
            "B": "Praising the coffee table.",
            "C": "Exaggerates messiness to absurd extent.",
            "D": "Suggesting a real garage sale.",
        },
        "choice_format": "text",
        "task": "speech",
        "category": "Reasoning",
        "category_raw": "Reasoning",
        "sub_category": "Dissonant Emotion Interpretation",
        "difficulty": "medium",
        "dataset": "mustard",
        "split": "test-mini",
    }
    # Every task: sound and music clips go to the audio encoder under the <audio> turn.
    everything = build_mmau(root, tasks=["sound", "music", "speech"])
    assert len(everything) == len(raw)
    assert [r.metadata["id"] for r in everything] == [item["id"] for item in raw]
    for record, item in zip(everything, raw, strict=True):
        assert record.media[0].modality == ("speech" if item["task"] == "speech" else "audio")
        assert record.messages[1]["content"].startswith(SPEECH_HEAD if item["task"] == "speech" else AUDIO_HEAD)
        assert record.messages[-1]["content"] == item["answer"]
        assert record.metadata["letters"][record.metadata["answer_letter"]] == item["answer"]


def test_mmau_letter_form(tmp_path):
    root = mmau_root(tmp_path, [mmau_item()])
    (record,) = build_mmau(root, choice_format="letter")
    question = (
        "What is the speaker's emotion?\nA. happy\nB. sad\nC. angry\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert record.messages[1]["content"] == SPEECH_HEAD + question
    assert record.messages[-1]["content"] == "B"
    assert (record.metadata["answer_letter"], record.metadata["letters"]["B"]) == ("B", "sad")
    assert record.metadata["choice_format"] == "letter"
    (custom,) = build_mmau(root, instruction="Pick one.")
    assert custom.messages[1]["content"].endswith("- angry\nPick one.")


def test_mmau_category_normalised(tmp_path):
    root = mmau_root(tmp_path, [mmau_item(category="['Reasoning']")])
    (record,) = build_mmau(root)
    assert (record.metadata["category"], record.metadata["category_raw"]) == ("Reasoning", "['Reasoning']")
    assert normalise_category("Information Extraction") == "Information Extraction"
    assert normalise_category("['a', 'b']") == "['a', 'b']"
    assert normalise_category("[not python") == "[not python"


def test_mmau_missing_audio(tmp_path):
    root = mmau_root(tmp_path, [mmau_item(), mmau_item(id="q2", audio_id="./test-mini-audios/q2.wav")])
    (root / "test-mini-audios" / "q2.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"mmau/test-mini/q2.*q2\.wav"):
        build_mmau(root)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert [r.metadata["id"] for r in build_mmau(root, on_missing="skip")] == ["q1"]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ({"a": 1}, "expected a JSON array"),
        (["q"], "record 0: expected a JSON object, got str"),
        (
            [mmau_item(), {k: v for k, v in mmau_item(id="q2").items() if k != "answer"}],
            r"record 1 .*'q2'.*missing field\(s\) 'answer'",
        ),
        ([mmau_item(answer="bored")], r"record 0 \(id 'q1'\): the answer 'bored' is not one of the choices"),
        ([mmau_item(task="noise")], "unknown task 'noise'"),
        ([mmau_item(category="Perception")], "unknown category 'Perception'"),
        ([mmau_item(choices="happy, sad")], "choices must be a list"),
        ([mmau_item(choices=["sad"])], "choices must be a list of two or more"),
        ([mmau_item(question=3)], r"\['question'\] must be strings"),
        ([mmau_item(id="")], "must not be empty"),
        ([mmau_item(audio_id="/abs/q1.wav")], "must be relative"),
        ([mmau_item(), mmau_item(audio_id="./test-mini-audios/x.wav")], "record 1: id 'q1' repeats record 0"),
    ],
)
def test_mmau_bad_annotations(tmp_path, items, message):
    root = mmau_root(tmp_path, items)
    with pytest.raises(ValueError, match=message) as error:
        build_mmau(root, on_missing="skip")
    assert "mmau-test-mini.json" in str(error.value)


def test_mmau_bad_file_and_options(tmp_path):
    (tmp_path / "mmau-test-mini.json").write_text('[{"id": "q1",')
    with pytest.raises(ValueError, match="mmau-test-mini.json: not valid JSON"):
        build_mmau(tmp_path)
    with pytest.raises(FileNotFoundError, match="mmau-test.json"):
        build_mmau(tmp_path, split="test")
    with pytest.raises(ValueError, match=r"unknown MMAU task\(s\) \['speeech'\]"):
        build_mmau(tmp_path, tasks=["speeech"])
    with pytest.raises(ValueError, match="choice_format"):
        build_mmau(tmp_path, choice_format="number")


# ----------------------------------------------------------------------------------------------- AIR-Bench
def air_item(**changes) -> dict:
    # evalscope's converted example (benchmarks.md §8).
    item = {
        "path": "common_voice_en_1.wav",
        "question": "Which age range do you believe best matches the speaker's voice?",
        "choice_a": "teens to twenties",
        "choice_b": "thirties to fourties",
        "choice_c": "fifties to sixties",
        "choice_d": "seventies to eighties",
        "answer_gt": "thirties to fourties",
        "task_name": "Speaker_Age_Prediction",
        "dataset_name": "common_voice_13.0_en",
        "uniq_id": 5973,
    }
    return {**item, **changes}


AIR_ITEMS = [
    air_item(),
    # Two options: choice_c null, choice_d absent (both read as missing).
    {
        **{k: v for k, v in air_item().items() if k != "choice_d"},
        "path": "meld/dia1_utt2.wav",
        "question": "What is the gender of the speaker?",
        "choice_a": "female",
        "choice_b": "male",
        "choice_c": None,
        "answer_gt": "male",
        "task_name": "Speaker_Gender_Recognition",
        "dataset_name": "meld",
        "uniq_id": 12,
    },
    # A sound task whose clip is stored as .flac although listed as wav.
    air_item(
        path="grounding_7.wav",
        question="When is the dog barking?",
        choice_a="[0.0, 1.5]",
        choice_b="[2.0, 3.1]",
        choice_c="[5.2, 6.0]",
        choice_d="[7.0, 9.9]",
        answer_gt="[5.2, 6.0]",
        task_name="Audio_Grounding",
        dataset_name="AudioGrounding",
        uniq_id=40,
    ),
]


def air_root(tmp_path: Path, items: list | dict) -> Path:
    meta = tmp_path / "Foundation" / "Foundation_meta.json"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(items))
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and {"task_name", "dataset_name", "path"} <= set(item):
            touch(tmp_path / "Foundation" / f"{item['task_name']}_{item['dataset_name']}" / str(item["path"]))
    return tmp_path


@pytest.fixture
def air_bench(tmp_path: Path) -> Path:
    root = air_root(tmp_path, AIR_ITEMS)
    folder = root / "Foundation" / "Audio_Grounding_AudioGrounding"
    (folder / "grounding_7.wav").rename(folder / "grounding_7.flac")
    return root


def test_air_bench_speech_records(air_bench):
    records = build_air_bench(air_bench)
    assert [r.id for r in records] == ["air_bench/foundation/5973", "air_bench/foundation/12"]
    age = records[0]
    question = (
        "Choose the most suitable answer from options A, B, C, and D to respond the question in next line, "
        "you may only choose A or B or C or D.\n"
        "Which age range do you believe best matches the speaker's voice?\n"
        "A. teens to twenties\nB. thirties to fourties\nC. fifties to sixties\nD. seventies to eighties"
    )
    assert age.messages == [
        SYSTEM,
        {"role": "user", "content": SPEECH_HEAD + question},
        {"role": "assistant", "content": "B"},
    ]
    assert span_text(age) == question
    folder = air_bench / "Foundation" / "Speaker_Age_Prediction_common_voice_13.0_en"
    assert (age.media[0].modality, age.media[0].kind) == ("speech", "audio")
    assert age.media[0].path == str(folder / "common_voice_en_1.wav")
    assert age.metadata == {
        "uniq_id": 5973,
        "task_name": "Speaker_Age_Prediction",
        "dataset_name": "common_voice_13.0_en",
        "group": "Speaker_Age_Prediction_common_voice_13.0_en",
        "question": "Which age range do you believe best matches the speaker's voice?",
        "choices": ["teens to twenties", "thirties to fourties", "fifties to sixties", "seventies to eighties"],
        "answer_gt": "thirties to fourties",
        "answer_letter": "B",
        "path": "common_voice_en_1.wav",
        "split": "Foundation",
    }
    gender = records[1]
    # The official script prints missing options as "None"; the path keeps its sub-folder.
    assert gender.messages[1]["content"].endswith(
        "What is the gender of the speaker?\nA. female\nB. male\nC. None\nD. None"
    )
    assert gender.metadata["choices"] == ["female", "male", None, None]
    assert gender.media[0].path == str(
        air_bench / "Foundation" / "Speaker_Gender_Recognition_meld" / "meld/dia1_utt2.wav"
    )
    omitted = build_air_bench(air_bench, missing_options="omit")[1]
    assert omitted.messages[1]["content"].endswith("What is the gender of the speaker?\nA. female\nB. male")


def test_air_bench_all_tasks_and_flac_quirk(air_bench):
    records = by_id(build_air_bench(air_bench, tasks=None))
    assert len(records) == 3
    grounding = records["air_bench/foundation/40"]
    folder = air_bench / "Foundation" / "Audio_Grounding_AudioGrounding"
    assert grounding.media[0].path == str(folder / "grounding_7.flac")
    assert grounding.media[0].modality == "audio"
    assert grounding.messages[1]["content"].startswith(AUDIO_HEAD + INSTRUCTION + "\nWhen is the dog barking?")
    assert (grounding.messages[-1]["content"], grounding.metadata["path"]) == ("C", "grounding_7.wav")
    assert [r.id for r in build_air_bench(air_bench, tasks=["Audio_Grounding"])] == ["air_bench/foundation/40"]
    # Neither extension on disk: the listed path is the one reported.
    (folder / "grounding_7.flac").unlink()
    with pytest.raises(FileNotFoundError, match=r"air_bench/foundation/40.*grounding_7\.wav"):
        build_air_bench(air_bench, tasks=None)


def test_air_bench_first_matching_option_is_the_answer(tmp_path):
    root = air_root(
        tmp_path, [air_item(choice_c="thirties to fourties", choice_b="x", answer_gt="thirties to fourties")]
    )
    (record,) = build_air_bench(root)
    assert record.metadata["answer_letter"] == "C"
    root = air_root(tmp_path, [air_item(choice_d="thirties to fourties")])
    (record,) = build_air_bench(root)
    assert record.metadata["answer_letter"] == "B"


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ({"path": "a.wav"}, "expected a JSON array"),
        ([3], "record 0: expected a JSON object, got int"),
        ([air_item(answer_gt="eighties")], r"record 0 \(uniq_id 5973\): answer_gt 'eighties' is none of the options"),
        (
            [air_item(), {k: v for k, v in air_item(uniq_id=6).items() if k != "question"}],
            r"record 1 .*missing field\(s\) 'question'",
        ),
        ([air_item(choice_b=None)], r"missing field\(s\) 'choice_b'"),
        ([air_item(uniq_id="5973")], "uniq_id must be an integer"),
        ([air_item(choice_c=3)], r"\['choice_c'\] must be strings"),
        ([air_item(), air_item(path="b.wav")], "record 1: uniq_id 5973 repeats record 0"),
    ],
)
def test_air_bench_bad_annotations(tmp_path, items, message):
    root = air_root(tmp_path, items)
    with pytest.raises(ValueError, match=message) as error:
        build_air_bench(root, tasks=None, on_missing="skip")
    assert "Foundation_meta.json" in str(error.value)


def test_air_bench_bad_file_and_options(tmp_path, air_bench):
    with pytest.raises(ValueError, match=r"no question of the task\(s\) \['Speaker_Emotion_Recognition'\]"):
        build_air_bench(air_bench, tasks=["Speaker_Emotion_Recognition"])
    # A default speech task that a partial file lacks is no error (the fixture has two of the nine).
    assert len(SPEECH_TASKS) == 9
    assert len(build_air_bench(air_bench, tasks=[*SPEECH_TASKS, "Audio_Grounding"])) == 3
    with pytest.raises(ValueError, match="only the AIR-Bench Foundation split"):
        build_air_bench(air_bench, split="Chat")
    with pytest.raises(ValueError, match="missing_options"):
        build_air_bench(air_bench, missing_options="skip")
    (air_bench / "Foundation" / "Foundation_meta.json").write_text("[{]")
    with pytest.raises(ValueError, match="Foundation_meta.json: not valid JSON"):
        build_air_bench(air_bench)
    with pytest.raises(FileNotFoundError, match="Foundation_meta.json"):
        build_air_bench(tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------------------- configs
def compose_data(name: str, root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(DATA_CONFIGS), version_base=None):
        return compose(config_name=name, overrides=[f"builder.root='{root}'", *overrides])


@pytest.fixture
def air_bench_speech(tmp_path: Path) -> Path:
    """A Foundation file with one question of every default speech task."""
    items = [air_item(task_name=task, uniq_id=i, path=f"{i}.wav") for i, task in enumerate(SPEECH_TASKS)]
    return air_root(tmp_path, items)


@pytest.mark.parametrize(
    ("name", "fixture", "builder", "template", "windows", "count"),
    [
        ("audiocaps", "audiocaps", build_audiocaps, prompts.AUDIO, "ave", 3),
        ("librispeech", "librispeech", build_librispeech, prompts.SPEECH, "whole", 3),
        ("air_bench", "air_bench_speech", build_air_bench, prompts.SPEECH, "whole", 9),
    ],
)
def test_config_builds_the_default_records(request, name, fixture, builder, template, windows, count):
    root = request.getfixturevalue(fixture)
    cfg = compose_data(name, root)
    assert cfg.builder.prompt.template == template
    assert cfg.media.audio_windows == windows
    records = instantiate(cfg.builder)
    assert len(records) == count
    # The config's defaults are the builder's defaults.
    assert [r.to_json() for r in records] == [r.to_json() for r in builder(root)]


def test_mmau_config(tmp_path):
    root = mmau_root(tmp_path, [mmau_item(), mmau_item(id="q2", task="music", audio_id="./test-mini-audios/q2.wav")])
    cfg = compose_data("mmau", root)
    assert (cfg.builder.prompt.template, cfg.builder.audio_prompt.template) == (prompts.SPEECH, prompts.AUDIO)
    records = instantiate(cfg.builder)
    assert [r.to_json() for r in records] == [r.to_json() for r in build_mmau(root)]
    assert [r.id for r in records] == ["mmau/test-mini/q1"]
    both = instantiate(
        compose_data("mmau", root, "builder.tasks=[speech,music]", "builder.choice_format=letter").builder
    )
    assert [r.media[0].modality for r in both] == ["speech", "audio"]
    assert both[1].messages[-1]["content"] == "B"


def test_air_bench_config_prompt_is_official(air_bench):
    cfg = compose_data("air_bench", air_bench)
    assert tuple(cfg.builder.tasks) == SPEECH_TASKS
    assert cfg.builder.prompt.question_prefix == cfg.builder.audio_prompt.question_prefix == INSTRUCTION + "\n"
    everything = instantiate(compose_data("air_bench", air_bench, "builder.tasks=null").builder)
    assert len(everything) == 3


def test_config_window_presets_exist():
    from moka_train.data.media import WINDOW_PRESETS

    for name in ("audiocaps", "librispeech", "mmau", "air_bench"):
        with initialize_config_dir(config_dir=str(DATA_CONFIGS), version_base=None):
            assert compose(config_name=name).media.audio_windows in WINDOW_PRESETS
