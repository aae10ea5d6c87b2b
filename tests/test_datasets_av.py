"""The audio-visual builders (MUSIC-AVQA, AVE, and the official MokA files of both) against independent
expectations: questions and targets written out by hand from the documented formats and the real annotation
excerpts in ../shared, MokA's released AVE predictions (its prompts and ground-truth strings), every Hydra
config, and every malformed-input path."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moka_train.data.datasets import ave, music_avqa
from moka_train.data.datasets.ave import CATEGORIES, INSTRUCTION, build_ave
from moka_train.data.datasets.moka_official import build_ave_moka, build_music_avqa_moka
from moka_train.data.datasets.music_avqa import ANSWERS, build_music_avqa
from moka_train.data.media import WINDOW_PRESETS
from moka_train.data.prompts import Prompt
from moka_train.data.records import Record
from tests.reference_files import shared_file

CONFIGS = Path(__file__).parents[1] / "configs"
SYSTEM = "You are a helpful assistant."
AV_TURN = "This is a video:\n<video_start><video><video_end>\nThis is an audio:\n<audio_start><audio><audio_end>\n"
AVQA_LEAD = "Please answer this question: "


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def link(target: Path, path: Path) -> None:
    """Put a ../shared excerpt where the builder looks for it, without copying it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def question_of(record: Record) -> str:
    start, end = record.question_span
    return record.messages[-2]["content"][start:end]


def media_of(record: Record) -> list[tuple[str, str, str]]:
    return [(ref.modality, ref.kind, ref.path) for ref in record.media]


# -- MUSIC-AVQA ---------------------------------------------------------------------------------------------------

# question_id -> (filled question, answer, modality, type), written out by hand from the excerpt's templates.
EXCERPT_TEST = {
    12: ("How many musical instruments were heard throughout the video?", "one", "Audio", "Counting"),
    28: ("Is the violin in the video always playing?", "no", "Audio-Visual", "Existential"),
    35: ("How many sounding violin in the video\uff1f", "three", "Audio-Visual", "Counting"),  # full-width ? kept
    95: (
        "Is the instrument on the right more rhythmic than the instrument on the left?",
        "yes",
        "Audio-Visual",
        "Comparative",
    ),
    1294: ("What is the instrument on the left of saxophone?", "saxophone", "Visual", "Location"),
    1305: ("Is there a flute in the entire video?", "yes", "Visual", "Counting"),
    2945: ("Is the clarinet louder than the acoustic_guitar?", "yes", "Audio", "Comparative"),
    3952: (
        "Is the banjo on the left more rhythmic than the acoustic_guitar on the right?",
        "no",
        "Audio-Visual",
        "Comparative",
    ),
    4164: ("Are there cello and accordion sound?", "yes", "Audio", "Counting"),  # template ends in a space
    4457: ("Which bassoon makes the sound last?", "simultaneously", "Audio-Visual", "Temporal"),
    4829: ("What kind of instrument is the rightest instrument?", "bassoon", "Visual", "Location"),
    31005: ("How many types of musical instruments appeared in the entire video?", "two", "Visual", "Counting"),
}


def avqa_excerpt_root(tmp_path: Path) -> Path:
    for name in ("avqa-test.json", "avqa-val.json"):
        source = shared_file("samples", "music_avqa", "json_update", name)
        link(source, tmp_path / "json_update" / name)
        for item in json.loads(source.read_text()):
            touch(tmp_path / "MUSIC-AVQA-Videos" / f"{item['video_id']}.mp4")
    return tmp_path


def test_music_avqa_real_test_excerpt(tmp_path):
    root = avqa_excerpt_root(tmp_path)
    records = build_music_avqa(root, split="test")
    assert len(records) == 40  # the excerpt: one question per template (33) + 7 others
    by_id = {record.id: record for record in records}
    assert len(by_id) == 40
    for qid, (question, answer, modality, qtype) in EXCERPT_TEST.items():
        record = by_id[f"music_avqa/test/{qid}"]
        assert question_of(record) == AVQA_LEAD + question
        assert record.messages[-1] == {"role": "assistant", "content": answer}
        assert record.metadata["question"] == question
        assert (record.metadata["answer"], record.metadata["question_modality"]) == (answer, modality)
        assert record.metadata["question_type"] == qtype
        assert record.metadata["question_id"] == qid
        assert record.metadata["split"] == "test"
    # Hand count of the excerpt's types: 6 Audio, 8 Visual, 26 Audio-Visual.
    modalities = [record.metadata["question_modality"] for record in records]
    assert (modalities.count("Audio"), modalities.count("Visual"), modalities.count("Audio-Visual")) == (6, 8, 26)
    for record in records:
        assert "<" not in record.metadata["question"] and ">" not in record.metadata["question"]
        assert record.metadata["answer"] in ANSWERS
        video = str(root / "MUSIC-AVQA-Videos" / f"{record.metadata['video_id']}.mp4")
        assert media_of(record) == [("visual", "video", video), ("audio", "audio", video)]
    record = by_id["music_avqa/test/1415"]
    assert record.metadata["templ_values"] == ["accordion", "violin"]
    assert record.metadata["question_content"] == "Are there <Object> and <Object> instruments in the video?"
    assert record.metadata["video_id"] == "00008051"


def test_music_avqa_real_val_excerpt_messages(tmp_path):
    records = build_music_avqa(avqa_excerpt_root(tmp_path), split="val", target_format="tagged")
    assert [r.id for r in records][:3] == ["music_avqa/val/7", "music_avqa/val/10", "music_avqa/val/11"]
    record = records[1]  # the benchmarks.md example: guzheng vs piano
    user = AV_TURN + AVQA_LEAD + "Is the guzheng louder than the piano?"
    assert record.messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": "<answer>yes</answer>"},
    ]
    assert record.question_span == (len(AV_TURN), len(user))
    assert records[2].metadata["question"] == "What is the instrument on the left of electric_bass?"
    assert Record.from_json(json.loads(json.dumps(record.to_json()))) == record


def avqa_item(qid=1, video="00000001", **fields) -> dict:
    """A record in the release's format (``type`` and ``templ_values`` as JSON text)."""
    item = {
        "video_id": video,
        "question_id": qid,
        "type": '["Audio", "Counting"]',
        "question_content": "Is there a <Object> sound?",
        "templ_values": '["piano"]',
        "question_deleted": 0,
        "anser": "yes",
    }
    return item | fields


def avqa_root(tmp_path: Path, items, split="test", annotation_dir="json_update", video_dir="MUSIC-AVQA-Videos"):
    write_json(tmp_path / annotation_dir / f"avqa-{split}.json", items)
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("video_id"), str):
            touch(tmp_path / video_dir / f"{item['video_id']}.mp4")
    return tmp_path


def test_music_avqa_options_and_prompt_order(tmp_path):
    fields = {"type": '["Visual", "Location"]', "question_content": "Where is the <LL> instrument? "}
    items = [avqa_item(5, "00000005", templ_values='["loudest"]', anser="left", **fields)]
    root = avqa_root(tmp_path, items, split="train", annotation_dir="json", video_dir="videos")
    (record,) = build_music_avqa(root, split="train", annotation_dir="json", video_dir="videos")
    assert record.id == "music_avqa/train/5"
    assert record.metadata["question"] == "Where is the loudest instrument?"
    video = str(root / "videos" / "00000005.mp4")
    # The audio placeholder first: the media follow the prompt's placeholders.
    audio_first = Prompt("Listen:\n<audio>\nWatch:\n<video>\n{question}", system=None)
    (record,) = build_music_avqa(root, "train", audio_first, annotation_dir="json", video_dir="videos")
    assert media_of(record) == [("audio", "audio", video), ("visual", "video", video)]
    user = "Listen:\n<audio>\nWatch:\n<video>\nWhere is the loudest instrument?"
    assert record.messages == [{"role": "user", "content": user}, {"role": "assistant", "content": "left"}]
    visual_only = Prompt("<image>\n{question}")  # an ablation without the audio
    (record,) = build_music_avqa(root, "train", visual_only, annotation_dir="json", video_dir="videos")
    assert media_of(record) == [("visual", "video", video)]
    with pytest.raises(ValueError, match=r"placeholders for \['speech'\].*MUSIC-AVQA"):
        build_music_avqa(root, "train", Prompt("<speech>{question}"), annotation_dir="json", video_dir="videos")


def test_music_avqa_repeated_question_ids_get_suffixes(tmp_path):
    items = [avqa_item(3, "00000001"), avqa_item(4, "00000002"), avqa_item(3, "00000003"), avqa_item(3, "00000004")]
    with pytest.warns(UserWarning, match="2 records repeat the id"):
        records = build_music_avqa(avqa_root(tmp_path, items))
    assert [r.id for r in records] == [
        "music_avqa/test/3",
        "music_avqa/test/4",
        "music_avqa/test/3#2",
        "music_avqa/test/3#3",
    ]
    assert [r.metadata["question_id"] for r in records] == [3, 4, 3, 3]


def test_music_avqa_missing_video(tmp_path):
    root = avqa_root(tmp_path, [avqa_item(1, "00000001"), avqa_item(2, "00000002")])
    (root / "MUSIC-AVQA-Videos" / "00000002.mp4").unlink()
    with pytest.raises(FileNotFoundError, match=r"avqa-test\.json: record 'music_avqa/test/2' needs .*00000002\.mp4"):
        build_music_avqa(root)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        records = build_music_avqa(root, on_missing="skip")
    assert [r.id for r in records] == ["music_avqa/test/1"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda item: item.pop("anser"), r"missing field\(s\) 'anser'"),
        (lambda item: item.update(type='["Audio", '), r"'type' is not JSON text of a list"),
        (lambda item: item.update(type='["Audio", "Location"]'), r"unknown question type \['Audio', 'Location'\]"),
        (lambda item: item.update(type='["Audio"]'), r"'type' must be a \[modality, question type\] pair"),
        (lambda item: item.update(templ_values="[piano]"), r"'templ_values' is not JSON text of a list"),
        (lambda item: item.update(templ_values="[1]"), r"'templ_values' must be a list of strings"),
        (
            lambda item: item.update(templ_values='["a", "b"]'),
            r"question_content has 1 placeholder\(s\) \['<Object>'\] but .* has 2",
        ),
        (lambda item: item.update(templ_values="[]"), r"question_content has 1 placeholder\(s\).*has 0 value"),
        (lambda item: item.update(video_id=7), r"'video_id' must be a non-empty string"),
        (lambda item: item.update(anser=""), r"'anser' must be a non-empty string"),
        (lambda item: item.update(question_id=None), r"'question_id' must be an int or a non-empty string"),
    ],
)
def test_music_avqa_malformed_record(tmp_path, change, message):
    bad = avqa_item(2, "00000002")
    change(bad)
    root = avqa_root(tmp_path, [avqa_item(1, "00000001"), bad])
    with pytest.raises(ValueError, match=r"avqa-test\.json: record 1 \(question_id .*\): " + message):
        build_music_avqa(root)


def test_music_avqa_bad_files_and_arguments(tmp_path):
    root = avqa_root(tmp_path, [avqa_item()])
    with pytest.raises(ValueError, match="record 0: expected a JSON object, got list"):
        build_music_avqa(avqa_root(tmp_path / "a", [["not", "a", "record"]]))
    with pytest.raises(FileNotFoundError, match=r"avqa-val\.json does not exist"):
        build_music_avqa(root, split="val")
    with pytest.raises(ValueError, match="split must be train, val or test"):
        build_music_avqa(root, split="valid")
    with pytest.raises(ValueError, match="target_format must be one of"):
        build_music_avqa(root, target_format="letter")
    (root / "json_update" / "avqa-train.json").write_text('[{"video_id": ', encoding="utf-8")
    with pytest.raises(ValueError, match=r"avqa-train\.json: not valid JSON"):
        build_music_avqa(root, split="train")
    write_json(root / "json_update" / "avqa-train.json", {"questions": []})
    with pytest.raises(ValueError, match=r"avqa-train\.json: expected a JSON array of records, got a JSON dict"):
        build_music_avqa(root, split="train")
    with pytest.raises(ValueError, match="on_missing must be one of"):
        build_music_avqa(root, on_missing="ignore")


# -- AVE ----------------------------------------------------------------------------------------------------------


def ave_excerpt_root(tmp_path: Path) -> Path:
    source = shared_file("samples", "ave", "Annotations.txt")
    link(source, tmp_path / "Annotations.txt")
    for line in source.read_text().splitlines():
        touch(tmp_path / "AVE" / f"{line.split('&')[1]}.mp4")
    return tmp_path


def ave_target(event: str, start: int, end: int) -> str:
    return (
        f"The audible and visible event in the video is <event>{event}</event>, "
        f"and the time range is <range>{start},{end}</range>."
    )


def test_ave_real_excerpt(tmp_path):
    root = ave_excerpt_root(tmp_path)
    records = build_ave(root, split="all")
    assert len(records) == 42  # 28 categories + 12 partial events + the second line of -ccciEuH9FE
    assert [r.id for r in records] == [f"ave/all/{i}" for i in range(42)]
    assert {r.metadata["category"] for r in records} == set(CATEGORIES)
    assert len(CATEGORIES) == 28
    record = records[1]  # Church bell&MH3m4AwEcRY&good&6&8
    video = str(root / "AVE" / "MH3m4AwEcRY.mp4")
    assert media_of(record) == [("visual", "video", video), ("audio", "audio", video)]
    assert record.messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": AV_TURN + INSTRUCTION},
        {"role": "assistant", "content": ave_target("Church bell", 6, 8)},
    ]
    assert question_of(record) == "Please describe the events and time range that occurred in the video."
    assert record.metadata == {
        "split": "all",
        "index": 1,
        "line_number": 2,
        "video_id": "MH3m4AwEcRY",
        "category": "Church bell",
        "quality": "good",
        "start": 6,
        "end": 8,
        "end_exclusive": True,
    }
    # One video, two events (lines 15 and 20): two records, keyed by line.
    twice = [r for r in records if r.metadata["video_id"] == "-ccciEuH9FE"]
    assert [(r.id, r.metadata["category"], r.metadata["start"], r.metadata["end"]) for r in twice] == [
        ("ave/all/14", "Male speech, man speaking", 5, 10),
        ("ave/all/19", "Female speech, woman speaking", 5, 10),
    ]
    assert records[6].metadata["video_id"] == "VWi2ENBuTbw"  # Church bell&...&0&0: an empty event, kept
    assert records[6].messages[-1]["content"] == ave_target("Church bell", 0, 0)
    assert records[21].messages[-1]["content"] == ave_target("Violin, fiddle", 0, 10)  # commas in the name


def test_ave_splits_header_and_line_endings(tmp_path):
    header = "Category&VideoID&Quality&StartTime&EndTime"
    (tmp_path / "testSet.txt").write_bytes(
        f"\ufeff{header}\r\nBark&abc_1&good&1&3\r\n\r\nCat&-xyz&good&0&10\r\n".encode()
    )
    (tmp_path / "trainSet.txt").write_text("Frying (food)&t1&good&2&9\n", encoding="utf-8")
    (tmp_path / "valSet.txt").write_text("Bus&v1&good&0&10\nBus&v1&good&0&10\n", encoding="utf-8")
    for vid in ("abc_1", "-xyz", "t1", "v1"):
        touch(tmp_path / "clips" / f"{vid}.mp4")
    test = build_ave(tmp_path, "test", video_dir="clips")
    assert [r.id for r in test] == ["ave/test/0", "ave/test/1"]
    assert [(r.metadata["line_number"], r.metadata["video_id"]) for r in test] == [(2, "abc_1"), (4, "-xyz")]
    assert test[1].media[0].path == str(tmp_path / "clips" / "-xyz.mp4")
    (train,) = build_ave(tmp_path, "train", video_dir="clips", target_template="<event>{event}</event>{start}-{end}")
    assert (train.id, train.messages[-1]["content"]) == ("ave/train/0", "<event>Frying (food)</event>2-9")
    val = build_ave(tmp_path, "val", video_dir="clips", question="What happens?")
    assert [r.id for r in val] == ["ave/val/0", "ave/val/1"]
    assert question_of(val[0]) == "What happens?"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("Bark&abc&good&1", r"expected 5 '&'-separated fields .*got 4"),
        ("Bark&abc&good&1&3&5", r"expected 5 '&'-separated fields .*got 6"),
        ("Dog&abc&good&1&3", r"unknown category 'Dog' \(not one of the 28 AVE categories\)"),
        ("bark&abc&good&1&3", r"unknown category 'bark'"),
        ("Category&VideoID&Quality&StartTime&EndTime", r"unknown category 'Category'"),  # a header off line 1
        ("Bark&&good&1&3", r"empty video id"),
        ("Bark&abc&good&one&3", r"start must be a whole number of seconds, got 'one'"),
        ("Bark&abc&good&1&11", r"times must satisfy 0 <= start <= end <= 10, got start 1, end 11"),
        ("Bark&abc&good&7&3", r"times must satisfy .*, got start 7, end 3"),
        ("Bark&abc&good&-1&3", r"start must be a whole number of seconds, got '-1'"),
    ],
)
def test_ave_malformed_line(tmp_path, line, message):
    (tmp_path / "testSet.txt").write_text(f"Bark&ok&good&0&10\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"testSet\.txt, line 2: " + message):
        build_ave(tmp_path, "test")


def test_ave_bad_arguments_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"valSet\.txt does not exist"):
        build_ave(tmp_path, "val")
    with pytest.raises(ValueError, match=r"AVE split must be one of \['all', 'test', 'train', 'val'\]"):
        build_ave(tmp_path, "validation")
    with pytest.raises(ValueError, match=r"target_template may use the fields \{event\}, \{start\} and \{end\}"):
        build_ave(tmp_path, "test", target_template="<event>{evnt}</event>")
    (tmp_path / "testSet.txt").write_text("Bark&here&good&0&10\nBark&gone&good&0&10\n", encoding="utf-8")
    touch(tmp_path / "AVE" / "here.mp4")
    with pytest.raises(FileNotFoundError, match=r"testSet\.txt: record 'ave/test/1' needs .*gone\.mp4"):
        build_ave(tmp_path, "test")
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert [r.id for r in build_ave(tmp_path, "test", on_missing="skip")] == ["ave/test/0"]


# -- the official MokA files ----------------------------------------------------------------------------------------

AUTHORS = "/group/40061/cserdu/data/MUSIC_AVQA_data"  # where the authors' files point
MOKA_AVQA_FILES = {"train": "train_samples_with_reasoning_avqa.json", "test": "test_samples_avqa.json"}


def moka_avqa_item(qid, vid, answer, **fields) -> dict:
    """A record in MokA's format: ``type`` a list, the authors' absolute media paths, the filled question."""
    item = {
        "video_id": vid,
        "question_id": qid,
        "type": ["Audio", "Counting"],
        "video_path": f"{AUTHORS}/video_data/{vid}.mp4",
        "audio_path": f"{AUTHORS}/audio_data/{vid}.mp3",
        "question": "How many instruments are sounding?",
        "answer": answer,
    }
    return item | fields


def moka_avqa_root(tmp_path: Path, split: str, items, video_dir="video_data", audio_dir="audio_data") -> Path:
    write_json(tmp_path / MOKA_AVQA_FILES[split], items)
    for item in items:
        touch(tmp_path / video_dir / f"{item['video_id']}.mp4")
        touch(tmp_path / audio_dir / f"{item['video_id']}.mp3")
    return tmp_path


def test_music_avqa_moka_train_and_test(tmp_path):
    label = "The violin and the piano both sound, so the answer is two. <answer> two </answer>"
    train = [
        moka_avqa_item(11, "00000093", "two", label=label),
        # The type as JSON text (the benchmark's own form) and a Windows path.
        moka_avqa_item(
            12,
            "00000108",
            "yes",
            type='["Audio", "Comparative"]',
            video_path="D:\\avqa\\video_data\\00000108.mp4",
            question="Is the guzheng louder than the piano? ",
            label="<answer> yes </answer>",
        ),
    ]
    root = moka_avqa_root(tmp_path, "train", train)
    records = build_music_avqa_moka(root, "train")
    assert [r.id for r in records] == ["music_avqa_moka/train/11", "music_avqa_moka/train/12"]
    first, second = records
    assert first.messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": AV_TURN + AVQA_LEAD + "How many instruments are sounding?"},
        {"role": "assistant", "content": label},
    ]
    assert media_of(first) == [
        ("visual", "video", str(root / "video_data" / "00000093.mp4")),
        ("audio", "audio", str(root / "audio_data" / "00000093.mp3")),
    ]
    assert first.metadata == {
        "split": "train",
        "question_id": 11,
        "video_id": "00000093",
        "question_modality": "Audio",
        "question_type": "Counting",
        "answer": "two",
        "question": "How many instruments are sounding?",
    }
    assert question_of(second) == AVQA_LEAD + "Is the guzheng louder than the piano?"
    assert second.media[0].path == str(root / "video_data" / "00000108.mp4")
    assert second.metadata["question_type"] == "Comparative"
    assert [r.messages[-1]["content"] for r in build_music_avqa_moka(root, "train", target_format="tagged")] == [
        "<answer>two</answer>",
        "<answer>yes</answer>",
    ]
    assert build_music_avqa_moka(root, "train", target_format="word")[0].messages[-1]["content"] == "two"

    test_root = moka_avqa_root(tmp_path / "t", "test", [moka_avqa_item(7, "00000001", "zero")])
    (record,) = build_music_avqa_moka(test_root, "test")
    assert (record.id, record.messages[-1]["content"]) == ("music_avqa_moka/test/7", "zero")
    message = r"test_samples_avqa\.json: record 0 \(question_id 7\): target_format 'label' needs a 'label'"
    with pytest.raises(ValueError, match=message):
        build_music_avqa_moka(test_root, "test", target_format="label")


def test_music_avqa_moka_media_dirs_and_missing_audio(tmp_path):
    root = moka_avqa_root(tmp_path, "test", [moka_avqa_item(1, "00000001", "one")], "mp4", "mp3")
    (record,) = build_music_avqa_moka(root, video_dir="mp4", audio_dir="mp3")
    assert [Path(ref.path).parent.name for ref in record.media] == ["mp4", "mp3"]
    (root / "mp3" / "00000001.mp3").unlink()
    with pytest.raises(FileNotFoundError, match=r"record 'music_avqa_moka/test/1' needs .*mp3/00000001\.mp3"):
        build_music_avqa_moka(root, video_dir="mp4", audio_dir="mp3")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda item: item.pop("audio_path"), r"missing field\(s\) 'audio_path'"),
        (lambda item: item.update(video_path="/data/video_data/"), r"'video_path' names no file"),
        (lambda item: item.update(type=["Audio-Visual", "Rhythm"]), r"unknown question type"),
        (lambda item: item.update(question=" "), r"'question' must be a non-empty string"),
        (lambda item: item.update(label=17), r"'label' must be a non-empty string"),
    ],
)
def test_music_avqa_moka_malformed_record(tmp_path, change, message):
    bad = moka_avqa_item(2, "00000002", "one", label="<answer> one </answer>")
    change(bad)
    write_json(tmp_path / "train_samples_with_reasoning_avqa.json", [bad])
    with pytest.raises(ValueError, match=r"record 0 \(question_id 2\): " + message):
        build_music_avqa_moka(tmp_path, "train")


def test_music_avqa_moka_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"MokA MUSIC-AVQA split must be one of \['test', 'train'\]"):
        build_music_avqa_moka(tmp_path, "val")
    with pytest.raises(ValueError, match="target_format must be one of"):
        build_music_avqa_moka(tmp_path, target_format="reasoning")
    with pytest.raises(FileNotFoundError, match=r"test_samples_avqa\.json does not exist"):
        build_music_avqa_moka(tmp_path)


def released_ave_predictions() -> list[dict]:
    path = shared_file("samples", "ave", "moka", "inference_ave.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ave_moka_reproduces_the_released_prompts_and_ground_truth(tmp_path):
    """MokA's 402 released test predictions carry the exact prompt and ground-truth string of each video:
    a test file written from them must give back both (the prompt with its question markers re-inserted)."""
    released = released_ave_predictions()
    items = []
    for row in released:
        event, start, end = re.fullmatch(r"event:(.+) start_time:(\d+) end_time:(\d+)</s>", row["output"]).groups()
        vid = row["video_path"].rsplit("/", 1)[1].removesuffix(".mp4")
        items.append({"event": event, "vid": vid, "start_time": int(start), "end_time": int(end)})
        touch(tmp_path / "AVE" / f"{vid}.mp4")
        touch(tmp_path / "audio_data" / f"{vid}.mp3")
    write_json(tmp_path / "test_samples_ave.json", items)

    records = build_ave_moka(tmp_path, "test")
    assert len(records) == len(released) == 402
    assert len({r.id for r in records}) == 402
    for record, row in zip(records, released, strict=True):
        assert record.messages[-1]["content"] + "</s>" == row["output"]
        assert record.metadata["ground_truth"] + "</s>" == row["output"]
        system, user = record.messages[0]["content"], record.messages[1]["content"]
        start, end = record.question_span
        marked = f"{user[:start]}<question_start>{user[start:end]}<question_end>{user[end:]}"
        assert f"<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{marked} [/INST]" == row["instruction"]
        assert [Path(ref.path).name for ref in record.media] == [
            Path(row["video_path"]).name,
            Path(row["audio_path"]).name,
        ]
        assert [(ref.modality, ref.kind) for ref in record.media] == [("visual", "video"), ("audio", "audio")]
    assert records[2].metadata == {
        "split": "test",
        "index": 2,
        "video_id": "0vJPhb4hqUw",
        "category": "Male speech, man speaking",
        "start": 0,
        "end": 3,
        "end_exclusive": True,
        "ground_truth": "event:Male speech, man speaking start_time:0 end_time:3",
    }


def ave_moka_root(tmp_path: Path, items, labels: dict[str, str]) -> Path:
    write_json(tmp_path / "train_samples_ave.json", items)
    for item in items:
        touch(tmp_path / "AVE" / f"{item['vid']}.mp4")
        touch(tmp_path / "audio_data" / f"{item['vid']}.mp3")
    for vid, text in labels.items():
        (tmp_path / "converted_label").mkdir(exist_ok=True)
        (tmp_path / "converted_label" / f"{vid}.txt").write_text(text, encoding="utf-8")
    return tmp_path


def test_ave_moka_train_labels(tmp_path):
    label = (
        "Two people talk. So the audible and visible event in the video is <event> Male speech, man speaking "
        "</event>, and the time range is <range> 5,10 </range>."
    )
    items = [
        {"event": "Male speech, man speaking", "vid": "-ccciEuH9FE", "start_time": 5, "end_time": 10},
        {"event": "Female speech, woman speaking", "vid": "-ccciEuH9FE", "start_time": "5", "end_time": "10"},
    ]
    root = ave_moka_root(tmp_path, items, {"-ccciEuH9FE": label + "\n"})
    records = build_ave_moka(root, "train")
    assert [r.id for r in records] == ["ave_moka/train/0", "ave_moka/train/1"]
    assert [r.messages[-1]["content"] for r in records] == [label, label]  # one label file per video
    assert question_of(records[0]) == INSTRUCTION
    assert [r.metadata["category"] for r in records] == [items[0]["event"], items[1]["event"]]
    assert records[1].metadata["ground_truth"] == "event:Female speech, woman speaking start_time:5 end_time:10"
    ground_truth = build_ave_moka(root, "train", target_format="ground_truth")
    assert ground_truth[0].messages[-1]["content"] == "event:Male speech, man speaking start_time:5 end_time:10"

    (root / "converted_label" / "-ccciEuH9FE.txt").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"train_samples_ave\.json: record 0 needs its target .*-ccciEuH9FE\.txt"
    ):
        build_ave_moka(root, "train")
    (root / "converted_label" / "-ccciEuH9FE.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"record 0: the label file .* is empty"):
        build_ave_moka(root, "train")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"event": "Dog"}, r"unknown category 'Dog'"),
        ({"event": "church bell"}, r"unknown category 'church bell'"),
        ({"start_time": 3.5}, r"start_time must be a whole number of seconds, got 3\.5"),
        ({"end_time": 12}, r"times must satisfy .*, got start 0, end 12"),
        ({"vid": ""}, r"'vid' must be a non-empty string"),
    ],
)
def test_ave_moka_malformed_record(tmp_path, change, message):
    good = {"event": "Bark", "vid": "ok", "start_time": 0, "end_time": 10}
    write_json(tmp_path / "test_samples_ave.json", [good, good | change])
    with pytest.raises(ValueError, match=r"test_samples_ave\.json: record 1 \(vid .*\): " + message):
        build_ave_moka(tmp_path, "test")


def test_ave_moka_bad_arguments(tmp_path):
    write_json(tmp_path / "test_samples_ave.json", [{"event": "Bark", "vid": "x", "start_time": 0}])
    with pytest.raises(ValueError, match=r"record 0 \(vid 'x'\): missing field\(s\) 'end_time'"):
        build_ave_moka(tmp_path)
    with pytest.raises(ValueError, match=r"MokA AVE split must be one of \['test', 'train'\]"):
        build_ave_moka(tmp_path, "val")
    with pytest.raises(ValueError, match="target_format must be one of"):
        build_ave_moka(tmp_path, target_format="word")


# -- the Hydra configs ----------------------------------------------------------------------------------------------


def config_fixture(name: str, root: Path) -> int:
    """Write a minimal dataset for the config's default split under ``root``; return its record count."""
    if name == "music_avqa":
        avqa_root(root, [avqa_item(1, "00000001"), avqa_item(2, "00000002")])
        return 2
    if name == "music_avqa_moka":
        moka_avqa_root(root, "test", [moka_avqa_item(1, "00000001", "one")])
        return 1
    if name == "ave":
        (root / "testSet.txt").write_text("Bark&a&good&0&10\nCat&b&good&1&2\nCat&c&good&3&4\n", encoding="utf-8")
        for vid in "abc":
            touch(root / "AVE" / f"{vid}.mp4")
        return 3
    write_json(root / "test_samples_ave.json", [{"event": "Bark", "vid": "a", "start_time": 0, "end_time": 10}])
    touch(root / "AVE" / "a.mp4")
    touch(root / "audio_data" / "a.mp3")
    return 1


@pytest.mark.parametrize(
    ("name", "windows", "default_prompt", "id_prefix"),
    [
        ("music_avqa", "music_avqa", music_avqa.DEFAULT_PROMPT, "music_avqa/test/"),
        ("music_avqa_moka", "music_avqa_official", music_avqa.DEFAULT_PROMPT, "music_avqa_moka/test/"),
        ("ave", "ave", ave.DEFAULT_PROMPT, "ave/test/"),
        ("ave_moka", "ave", ave.DEFAULT_PROMPT, "ave_moka/test/"),
    ],
)
def test_config_composes_and_builds(tmp_path, name, windows, default_prompt, id_prefix):
    count = config_fixture(name, tmp_path)
    with initialize_config_dir(version_base=None, config_dir=str(CONFIGS)):
        cfg = compose(overrides=[f"+data={name}", f"data.builder.root={tmp_path}"])
    assert (cfg.data.media.frames, cfg.data.media.audio_windows) == (10, windows)
    assert windows in WINDOW_PRESETS
    assert instantiate(cfg.data.builder.prompt) == default_prompt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = instantiate(cfg.data.builder)
    assert len(records) == count
    assert all(isinstance(r, Record) and r.id.startswith(id_prefix) for r in records)
    assert all(r.messages[0] == {"role": "system", "content": SYSTEM} for r in records)
