"""The visual builders (LLaVA instruct / pretrain, MME, MMBench, POPE, SEED-Bench) and their data configs.

Expectations are written out by hand from the documented formats (benchmarks.md, the official MokA code's
prompts) or read from the real excerpts in ../shared/samples (skipped when that folder is absent); fixtures
are written in tmp_path in the published layouts.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from moka_train.data.datasets.llava import build_llava_instruct, build_llava_pretrain, build_video_llava_pretrain
from moka_train.data.datasets.mmbench import build_mmbench
from moka_train.data.datasets.mme import build_mme
from moka_train.data.datasets.pope import build_pope
from moka_train.data.datasets.seed_bench import build_seed_bench
from moka_train.data.records import Record
from tests.reference_files import shared_file

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SYSTEM = "You are a helpful assistant."
IMAGE_LINE = "This is an image:\n<image_start><image><image_end>\n"
YES_NO = "Please answer this question with yes or no, and no other content. Question: "
MC_INSTRUCTION = (
    "Please select the correct answer from the options above. Output only the selected option in the format "
    "(A), (B), (C), or (D). No explanation or extra text."
)


def touch(path: Path, data: bytes = b"\xff\xd8 not decoded by the builders") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def user_turn(record: Record) -> str:
    return next(m["content"] for m in record.messages if m["role"] == "user")


def question_text(record: Record) -> str:
    start, end = record.question_span
    return user_turn(record)[start:end]


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), color).save(buffer, format="PNG")
    return buffer.getvalue()


def check_common(records: list[Record]) -> None:
    assert len({r.id for r in records}) == len(records)
    for record in records:
        assert [m["role"] for m in record.messages][:2] == ["system", "user"]
        assert all(Path(ref.path.split("#")[0]).is_absolute() for ref in record.media)


# ---------------------------------------------------------------------------------------------------------
# LLaVA
# ---------------------------------------------------------------------------------------------------------
LLAVA_ENTRIES = [
    {
        "id": "000000033471",
        "image": "000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ],
    },
    {
        "id": 52,
        "image": "000000000052.jpg",
        "conversations": [
            {"from": "human", "value": "Is the man wearing a hat?\n<image>"},
            {"from": "gpt", "value": "Yes."},
        ],
    },
    {"id": "text_1", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]},
]


def write_llava(root: Path, entries=None, name: str = "llava_instruct_150k.json", folder: str = "coco/train2017"):
    entries = LLAVA_ENTRIES if entries is None else entries
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(entries))
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("image"), str):
            touch(root / folder / entry["image"])
    return root


def test_llava_instruct_single_turns_like_the_official_vt_code(tmp_path):
    root = write_llava(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 entries with no image .*text_1"):
        records = build_llava_instruct(root)
    check_common(records)
    assert [r.id for r in records] == [
        "llava_instruct/000000033471/0",
        "llava_instruct/000000033471/1",
        "llava_instruct/52/0",
    ]
    first, second, third = records
    assert first.messages == [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": IMAGE_LINE + "Please answer this question: What are the colors of the bus in the image?",
        },
        {"role": "assistant", "content": "The bus in the image is white and red."},
    ]
    assert question_text(first) == "Please answer this question: What are the colors of the bus in the image?"
    # The second pair gets the same image and no history; <image> at the end of a turn is removed too.
    assert (
        user_turn(second)
        == IMAGE_LINE + "Please answer this question: What feature can be seen on the back of the bus?"
    )
    assert user_turn(third) == IMAGE_LINE + "Please answer this question: Is the man wearing a hat?"
    assert third.messages[-1]["content"] == "Yes."
    for record, image in zip(records, ["000000033471.jpg", "000000033471.jpg", "000000000052.jpg"], strict=True):
        assert len(record.media) == 1
        ref = record.media[0]
        assert (ref.modality, ref.kind, ref.data) == ("visual", "image", None)
        assert ref.path == str(root.resolve() / "coco" / "train2017" / image)
    assert first.metadata == {
        "source_id": "000000033471",
        "index": 0,
        "turn": 0,
        "num_turns": 2,
        "image": "000000033471.jpg",
        "answer": "The bus in the image is white and red.",
        "split": "train",
    }
    assert (second.metadata["turn"], third.metadata["source_id"], third.metadata["index"]) == (1, "52", 1)


def test_llava_text_only_keep_and_error(tmp_path):
    root = write_llava(tmp_path)
    records = build_llava_instruct(root, text_only="keep")
    assert len(records) == 4
    text = records[-1]
    assert text.id == "llava_instruct/text_1/0"
    assert text.media == [] and text.metadata["image"] is None
    assert text.messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Please answer this question: Hello?"},
        {"role": "assistant", "content": "Hi."},
    ]
    assert text.question_span == (0, len("Please answer this question: Hello?"))
    with pytest.raises(ValueError, match=r"entry 2 \(id 'text_1'\) has no image"):
        build_llava_instruct(root, text_only="error")


def test_llava_repeated_ids_stay_unique_and_stable(tmp_path):
    entry = LLAVA_ENTRIES[1]
    root = write_llava(tmp_path, [entry, LLAVA_ENTRIES[0], entry])
    ids = [r.id for r in build_llava_instruct(root)]
    assert ids == [
        "llava_instruct/52@0/0",
        "llava_instruct/000000033471/0",
        "llava_instruct/000000033471/1",
        "llava_instruct/52@2/0",
    ]
    assert ids == [r.id for r in build_llava_instruct(root)]


LLAVA_PRETRAIN_ENTRIES = [
    {
        "id": "004539375",
        "image": "00453/004539375.jpg",
        "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"},
        ],
    },
    {
        "id": "002239345",
        "image": "00223/002239345.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nGive a brief description of the image."},
            {"from": "gpt", "value": "a grey watch with an army style strap"},
        ],
    },
]


def test_llava_pretrain_captions(tmp_path):
    entries = LLAVA_PRETRAIN_ENTRIES
    root = write_llava(tmp_path, entries, name="blip_laion_cc_sbu_558k.json", folder="images")
    records = build_llava_pretrain(root)
    check_common(records)
    assert [r.id for r in records] == ["llava_pretrain/004539375/0", "llava_pretrain/002239345/0"]
    assert records[0].messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": IMAGE_LINE + "Render a clear and concise summary of the photo."},
        {"role": "assistant", "content": "select luxury furniture 3 - inch gel memory foam mattress topper"},
    ]
    assert question_text(records[1]) == "Give a brief description of the image."
    assert records[1].media[0].path == str(root.resolve() / "images" / "00223" / "002239345.jpg")
    assert records[1].metadata["answer"] == "a grey watch with an army style strap"
    # Every LLaVA-Pretrain entry has an image: a text-only one is an error by default.
    write_llava(tmp_path, [*entries, LLAVA_ENTRIES[2]], name="blip_laion_cc_sbu_558k.json", folder="images")
    with pytest.raises(ValueError, match="entry 2 .* has no image"):
        build_llava_pretrain(root)


# Video-LLaVA's llava_image_.json: the same captions, the paths under llava_image/.
VIDEO_LLAVA_IMAGES = [{**LLAVA_PRETRAIN_ENTRIES[0], "image": "llava_image/00453/004539375.jpg"}]
VIDEO_LLAVA_VIDEOS = [
    {
        "id": "v_2Kf0ZfS6lhQ",
        "video": "valley/005401_005450/1040617261.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nDescribe what is happening in this video."},
            {"from": "gpt", "value": "A chef slices tomatoes on a wooden board"},
        ],
    },
    {
        "id": "v_3aNQ1Mj2Xo0",
        "video": "valley/005401_005450/1040620418.mp4",
        "conversations": [
            {"from": "human", "value": "Summarize the video briefly.\n<video>"},
            {"from": "gpt", "value": "Waves roll onto a beach at sunset"},
        ],
    },
]
VIDEO_LINE = "This is a video:\n<video_start><video><video_end>\n"


def write_video_llava(root: Path, images=VIDEO_LLAVA_IMAGES, videos=VIDEO_LLAVA_VIDEOS) -> Path:
    """Video-LLaVA's layout: train_json/ beside the media folders the entries' paths name."""
    (root / "train_json").mkdir(parents=True, exist_ok=True)
    (root / "train_json" / "llava_image_.json").write_text(json.dumps(images))
    (root / "train_json" / "valid_valley_.json").write_text(json.dumps(videos))
    for entry in [*images, *videos]:
        touch(root / entry.get("image", entry.get("video")))
    return root


def test_video_llava_pretrain_images_then_valley_videos(tmp_path):
    root = write_video_llava(tmp_path)
    records = build_video_llava_pretrain(root)
    check_common(records)
    assert [r.id for r in records] == [
        "llava_image/004539375/0",
        "valley/v_2Kf0ZfS6lhQ/0",
        "valley/v_3aNQ1Mj2Xo0/0",
    ]
    assert user_turn(records[0]) == IMAGE_LINE + "Render a clear and concise summary of the photo."
    assert records[1].messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": VIDEO_LINE + "Describe what is happening in this video."},
        {"role": "assistant", "content": "A chef slices tomatoes on a wooden board"},
    ]
    assert question_text(records[2]) == "Summarize the video briefly."
    assert [(m.modality, m.kind) for r in records for m in r.media] == [("visual", "image"), *[("visual", "video")] * 2]
    assert records[2].media[0].path == str(root.resolve() / "valley" / "005401_005450" / "1040620418.mp4")
    assert records[2].metadata["video"] == "valley/005401_005450/1040620418.mp4"
    assert records[0].metadata["image"] == "llava_image/00453/004539375.jpg"
    # Either part alone.
    assert [r.id for r in build_video_llava_pretrain(root, video_annotation=None)] == ["llava_image/004539375/0"]
    assert len(build_video_llava_pretrain(root, image_annotation=None)) == 2
    with pytest.raises(ValueError, match="both None"):
        build_video_llava_pretrain(root, image_annotation=None, video_annotation=None)


def test_video_llava_pretrain_bad_entries_and_missing_videos(tmp_path):
    root = write_video_llava(tmp_path)
    (root / VIDEO_LLAVA_VIDEOS[1]["video"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"valley/v_3aNQ1Mj2Xo0/0.*1040620418\.mp4"):
        build_video_llava_pretrain(root)
    with pytest.warns(UserWarning, match="skipped 1 of 2 records whose media are missing"):
        records = build_video_llava_pretrain(root, on_missing="skip")
    assert [r.id for r in records] == ["llava_image/004539375/0", "valley/v_2Kf0ZfS6lhQ/0"]
    # A Valley entry without its video (an image instead) is named, with the file.
    no_video = [{**VIDEO_LLAVA_IMAGES[0], "id": "v_x"}]
    write_video_llava(root, videos=no_video)
    with pytest.raises(ValueError, match=r"valid_valley_\.json: entry 0 \(id 'v_x'\) has no video"):
        build_video_llava_pretrain(root)


def test_llava_missing_image(tmp_path):
    root = write_llava(tmp_path, LLAVA_ENTRIES[:2])
    (root / "coco" / "train2017" / "000000000052.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"llava_instruct/52/0.*000000000052\.jpg"):
        build_llava_instruct(root)
    with pytest.warns(UserWarning, match="skipped 1 of 3 records whose media are missing"):
        records = build_llava_instruct(root, on_missing="skip")
    assert [r.id for r in records] == ["llava_instruct/000000033471/0", "llava_instruct/000000033471/1"]


def _pair(human="<image>\nQ?", gpt="A."):
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[{", "not valid JSON"),
        ('{"id": 1}', "expected a JSON array"),
        ('["x"]', "entry 0 must be an object"),
        (json.dumps([{"image": "a.jpg", "conversations": _pair()}]), r"entry 0: missing field\(s\) 'id'"),
        (json.dumps([{"id": None, "image": "a.jpg", "conversations": _pair()}]), "'id' must be"),
        (json.dumps([{"id": "a", "image": "a.jpg"}]), r"entry 0 \(id 'a'\): 'conversations' must be"),
        (json.dumps([{"id": "a", "image": 3, "conversations": _pair()}]), "'image' must be a non-empty string"),
        (json.dumps([{"id": "a", "image": "a.jpg", "conversations": _pair()[:1]}]), "1 turns; expected human/gpt"),
        (json.dumps([{"id": "a", "image": "a.jpg", "conversations": _pair()[::-1]}]), "turn 0: expected .*'human'"),
        (
            json.dumps([{"id": "a", "image": "a.jpg", "conversations": [*_pair(), *_pair()[:1], *_pair()[:1]]}]),
            "turn 3: expected .*'gpt'",
        ),
        (
            json.dumps([{"id": "a", "image": "a.jpg", "conversations": [{"from": "user", "value": "Q"}, _pair()[1]]}]),
            "turn 0: expected",
        ),
        (
            json.dumps([{"id": "a", "image": "a.jpg", "conversations": _pair(gpt="Use a <video> tag.")}]),
            r"entry 0 \(id 'a'\), turn 0: .*placeholders",
        ),
    ],
)
def test_llava_bad_annotations(tmp_path, content, match):
    (tmp_path / "llava_instruct_150k.json").write_text(content)
    touch(tmp_path / "coco" / "train2017" / "a.jpg")
    with pytest.raises(ValueError, match=match) as error:
        build_llava_instruct(tmp_path)
    assert "llava_instruct_150k.json" in str(error.value)


def test_llava_bad_arguments(tmp_path):
    root = write_llava(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        build_llava_instruct(root, split="test")
    with pytest.raises(ValueError, match="text_only must be one of"):
        build_llava_instruct(root, text_only="drop")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_llava_instruct(root, annotation="missing.json")
    with pytest.raises(ValueError, match="on_missing"):
        build_llava_instruct(root, on_missing="ignore", text_only="keep")


# ---------------------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------------------
MME_SPLIT_SUBTASKS = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/
MME_SUBTASKS = {
    "existence": "perception",
    "count": "perception",
    "position": "perception",
    "color": "perception",
    "posters": "perception",
    "celebrity": "perception",
    "scene": "perception",
    "landmark": "perception",
    "artwork": "perception",
    "OCR": "perception",
    "commonsense_reasoning": "cognition",
    "numerical_calculation": "cognition",
    "text_translation": "cognition",
    "code_reasoning": "cognition",
}


def mme_excerpt() -> dict[str, list[tuple[str, str, str]]]:
    """Subtask -> the official tool's (image, question, GT) lines from the real excerpt."""
    lines = {}
    for subtask in MME_SUBTASKS:
        path = shared_file("samples", "mme", "eval_tool", "Your_Results", f"{subtask}.txt")
        lines[subtask] = [tuple(line.split("\t")) for line in path.read_text(encoding="utf-8").splitlines()]
    return lines


def write_mme(base: Path, lines: dict[str, list[tuple[str, str, str]]], flat: bool = False) -> None:
    """The release layout (or the flattened one MokA reads): per image, <stem>.txt with its question lines."""
    for subtask, rows in lines.items():
        nested = subtask in MME_SPLIT_SUBTASKS and not flat
        image_dir = base / subtask / "images" if nested else base / subtask
        question_dir = base / subtask / "questions_answers_YN" if nested else base / subtask
        by_image: dict[str, list[str]] = {}
        for image, question, answer in rows:
            by_image.setdefault(image, []).append(f"{question}\t{answer}\n")
        for image, text in by_image.items():
            touch(image_dir / image)
            question_dir.mkdir(parents=True, exist_ok=True)
            (question_dir / f"{Path(image).stem}.txt").write_text("".join(text), encoding="utf-8")


def test_mme_release_layout_reproduces_the_official_tool_lines(tmp_path):
    lines = mme_excerpt()
    base = tmp_path / "MME_Benchmark_release_version" / "MME_Benchmark"
    write_mme(base, lines)
    records = build_mme(tmp_path)
    check_common(records)
    assert len(records) == 56  # 14 subtasks x 2 images x 2 questions
    assert sum(r.metadata["category"] == "perception" for r in records) == 40
    assert sum(r.metadata["category"] == "cognition" for r in records) == 16
    assert [r.metadata["subtask"] for r in records[::4]] == list(MME_SUBTASKS)
    for subtask, rows in lines.items():
        got = [r for r in records if r.metadata["subtask"] == subtask]
        assert [(r.metadata["image"], r.metadata["question"], r.metadata["answer"]) for r in got] == rows
        assert all(r.metadata["category"] == MME_SUBTASKS[subtask] for r in got)
    # The two questions of an image are adjacent (the official calculation.py reads them in pairs).
    for first, second in zip(records[::2], records[1::2], strict=True):
        assert first.media[0].path == second.media[0].path
        assert (first.metadata["question_index"], second.metadata["question_index"]) == (0, 1)
    ocr = next(r for r in records if r.id == "mme/OCR/0001/0")
    assert ocr.media[0].path == str(base.resolve() / "OCR" / "0001.jpg")
    assert ocr.messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": IMAGE_LINE + YES_NO + 'Is the word in the logo "angie\'s"?'},
        {"role": "assistant", "content": "Yes"},
    ]
    assert question_text(ocr) == YES_NO + 'Is the word in the logo "angie\'s"?'
    artwork = next(r for r in records if r.id == "mme/artwork/10049/1")
    assert artwork.media[0].path == str(base.resolve() / "artwork" / "images" / "10049.jpg")
    assert artwork.metadata["answer"] == "No" and artwork.metadata["split"] == "test"
    code = next(r for r in records if r.id == "mme/code_reasoning/0001/0")
    assert code.media[0].path.endswith("code_reasoning/0001.png")
    # A question without the "?" before the suffix (position, as released) loses only the suffix.
    position = next(r for r in records if r.id == "mme/position/000000006471/1")
    assert user_turn(position).endswith("Question: Is the cricket bat under the batter's body")


def test_mme_questions_equal_the_official_moka_prompts(tmp_path):
    """The user turns equal the official MokA run's prompts for the same image and GT (its merged.jsonl)."""
    write_mme(tmp_path, mme_excerpt())
    records = build_mme(tmp_path)
    moka = {}
    for line in shared_file("samples", "mme", "moka", "merged.jsonl").read_text().splitlines():
        item = json.loads(line)
        moka[item["subtask"], Path(item["image_path"]).name, item["answer"]] = item["question"]
    for record in records:
        key = (record.metadata["subtask"], record.metadata["image"], record.metadata["answer"])
        assert user_turn(record) == IMAGE_LINE + YES_NO + moka[key]


def test_mme_flat_layout_gives_the_same_records(tmp_path):
    lines = mme_excerpt()
    write_mme(tmp_path / "nested", lines)
    write_mme(tmp_path / "flat" / "MME_Benchmark_release_version", lines, flat=True)
    nested, flat = build_mme(tmp_path / "nested"), build_mme(tmp_path / "flat")
    assert [(r.id, r.messages, r.question_span, r.metadata) for r in nested] == [
        (r.id, r.messages, r.question_span, r.metadata) for r in flat
    ]
    assert next(r for r in flat if r.id == "mme/scene/Places365_val_00000002/0").media[0].path == str(
        (tmp_path / "flat" / "MME_Benchmark_release_version" / "scene" / "Places365_val_00000002.jpg").resolve()
    )
    subset = build_mme(tmp_path / "flat", subtasks=["OCR", "existence"])
    assert [r.id for r in subset][::2] == [
        "mme/OCR/0001/0",
        "mme/OCR/0002/0",
        *[f"mme/existence/{s}/0" for s in ("000000006040", "000000006471")],
    ]


def write_mme_fixture(root: Path) -> Path:
    """A hand-written two-subtask MME (flat layout), for the configs and the bad-input tests."""
    lines = {
        "existence": [
            ("a.jpg", "Is there a dog in this image? Please answer yes or no.", "Yes"),
            ("a.jpg", "Is there a cat in this image? Please answer yes or no.", "No"),
        ],
        "OCR": [
            ("b.png", 'Is the word "x"? Please answer yes or no.', "No"),
            ("b.png", 'Is the word "y"? Please answer yes or no.', "Yes"),
        ],
    }
    write_mme(root, lines, flat=True)
    return root


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("Q1? Please answer yes or no.\nQ2? Please answer yes or no.\tNo\n", r"a\.txt:1: expected 'question<TAB>"),
        ("Q1?\tYes\tx\nQ2?\tNo\n", r"a\.txt:1: expected .* 3 columns"),
        ("Q1?\tYes\nQ2?\tMaybe\n", r"a\.txt:2: expected a question and a Yes/No"),
        ("\tYes\nQ2?\tNo\n", r"a\.txt:1: expected a question"),
        ("Q1?\tYes\n", r"a\.txt: 1 questions; MME has 2 per image"),
        ("Q1?\tYes\nQ2?\tNo\nQ3?\tNo\n", r"a\.txt: 3 questions"),
    ],
)
def test_mme_bad_question_files(tmp_path, text, match):
    write_mme_fixture(tmp_path)
    (tmp_path / "existence" / "a.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
        build_mme(tmp_path, subtasks=["existence"])


def test_mme_bad_folders_and_arguments(tmp_path):
    root = write_mme_fixture(tmp_path / "mme")
    records = build_mme(root, subtasks=["existence", "OCR"])
    assert [r.metadata["answer"] for r in records] == ["Yes", "No", "No", "Yes"]
    assert records[2].media[0].path.endswith("OCR/b.png")
    with pytest.raises(FileNotFoundError, match=r"subtask folder .*count does not exist"):
        build_mme(root)  # the default asks for all 14
    with pytest.raises(ValueError, match=r"unknown MME subtasks \['ocr'\]"):
        build_mme(root, subtasks=["ocr"])
    with pytest.raises(ValueError, match="MME has one split"):
        build_mme(root, split="val", subtasks=["OCR"])
    with pytest.raises(FileNotFoundError, match="no MME subtask folder"):
        build_mme(tmp_path / "elsewhere")
    (root / "OCR" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"mme/OCR/b/0.*b\.jpg"):
        build_mme(root, subtasks=["OCR"])
    with pytest.warns(UserWarning, match="skipped 2 of 4 records"):
        assert len(build_mme(root, subtasks=["existence", "OCR"], on_missing="skip")) == 2
    (root / "OCR" / "b.txt").unlink()
    with pytest.raises(ValueError, match="holds no question file"):
        build_mme(root, subtasks=["OCR"])


# ---------------------------------------------------------------------------------------------------------
# MMBench
# ---------------------------------------------------------------------------------------------------------
MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source"]
MMBENCH_HEADER += ["l2-category", "comment", "split"]
RED, BLUE = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))


def write_tsv(path: Path, header: list[str], rows: list[dict[str, str]]) -> Path:
    """A TSV as pandas' to_csv(sep="\\t") writes it: minimal quoting, NaN as an empty cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(column, "") for column in header])
    return path


def mmbench_rows() -> list[dict[str, str]]:
    red, blue = base64.b64encode(RED).decode(), base64.b64encode(BLUE).decode()
    common = {"category": "image_scene", "l2-category": "coarse_perception", "source": "ScienceQA", "split": "dev"}
    return [
        {"index": "0", "question": "Which color is it?", "A": "red", "B": "blue", "C": "None", "D": "green"}
        | {"answer": "A", "image": red, **common},
        {"index": "1", "question": 'What is "it"?', "hint": 'A "quoted"\nhint', "A": "a\tb", "B": "x", "C": "nan"}
        | {"answer": "B", "image": blue, **common},
        # Circular copies: options rotated; the new TSV layout points at the row holding the image,
        # the legacy layout repeats the base64.
        {"index": "1000000", "question": "Which color is it?", "A": "blue", "B": "None", "C": "green", "D": "red"}
        | {"answer": "D", "image": "0", **common},
        {"index": "1000001", "question": 'What is "it"?', "hint": 'A "quoted"\nhint', "A": "x", "B": "a\tb"}
        | {"answer": "A", "image": blue, **common},
    ]


def test_mmbench_moka_prompt_circular_groups_and_embedded_images(tmp_path):
    write_tsv(tmp_path / "MMBench_DEV_EN_legacy.tsv", MMBENCH_HEADER, mmbench_rows())
    records = build_mmbench(tmp_path)
    check_common(records)
    assert [r.id for r in records] == [f"mmbench/DEV_EN_legacy/{i}" for i in (0, 1, 1000000, 1000001)]
    first = records[0]
    question = "Question: Which color is it?\nOptions:\n(A) red\n(B) blue\n(C) None\n(D) green\n\n" + MC_INSTRUCTION
    assert first.messages == [
        {
            "role": "system",
            "content": "You are a classification assistant. You need to classify the image into the correct option.",
        },
        {"role": "user", "content": "\n This is an image:\n<image_start><image><image_end>\n" + question},
        {"role": "assistant", "content": "(A)"},
    ]
    assert question_text(first) == question
    assert user_turn(records[1]).endswith(
        'Hint: A "quoted"\nhint\nQuestion: What is "it"?\nOptions:\n(A) a\tb\n(B) x\n\n' + MC_INSTRUCTION
    )
    assert [r.metadata["group_index"] for r in records] == [0, 1, 0, 1]
    assert [r.metadata["circular_offset"] for r in records] == [0, 0, 1, 1]
    assert [r.metadata["answer"] for r in records] == ["A", "B", "D", "A"]
    assert records[1].metadata == {
        "index": 1,
        "group_index": 1,
        "circular_offset": 0,
        "question": 'What is "it"?',
        "hint": 'A "quoted"\nhint',
        "options": {"A": "a\tb", "B": "x"},
        "answer": "B",
        "category": "image_scene",
        "l2_category": "coarse_perception",
        "source": "ScienceQA",
        "split": "DEV_EN_legacy",
    }
    assert first.metadata["hint"] is None and first.metadata["options"]["C"] == "None"
    for record, image in zip(records, [RED, BLUE, RED, BLUE], strict=True):
        ref = record.media[0]
        assert (ref.modality, ref.kind, ref.data) == ("visual", "image", image)
        assert ref.path == f"{(tmp_path / 'MMBench_DEV_EN_legacy.tsv').resolve()}#{record.metadata['index']}"
    assert [r.id for r in build_mmbench(tmp_path, circular_copies=False)] == [r.id for r in records[:2]]


def test_mmbench_vlmevalkit_style_and_test_split_without_answers(tmp_path):
    header = [c for c in MMBENCH_HEADER if c != "answer"] + ["E"]
    rows = mmbench_rows()
    rows[0]["E"] = "purple"
    write_tsv(tmp_path / "MMBench_TEST_EN.tsv", header, rows)
    records = build_mmbench(tmp_path, split="TEST_EN", style="vlmevalkit")
    assert user_turn(records[0]).endswith(
        "Question: Which color is it?\nOptions:\nA. red\nB. blue\nC. None\nD. green\nE. purple\n"
        "Please select the correct answer from the options above. \n"
    )
    assert question_text(records[1]) == (
        'Hint: A "quoted"\nhint\nQuestion: What is "it"?\nOptions:\nA. a\tb\nB. x\n'
        "Please select the correct answer from the options above. \n"
    )
    assert all(r.messages[-1]["role"] == "user" and r.metadata["answer"] is None for r in records)
    write_tsv(tmp_path / "dev.tsv", MMBENCH_HEADER, mmbench_rows())
    assert build_mmbench(tmp_path, tsv="dev.tsv", style="vlmevalkit")[0].messages[-1]["content"] == "A"


def parse_moka_mmbench(text: str) -> dict[str, object]:
    """Hint, question and options back out of an official MokA MMBench user turn."""
    prefix = "\n This is an image:\n<image_start><image><image_end>\n"
    assert text.startswith(prefix)
    body, instruction = text[len(prefix) :].split("\n\n" + MC_INSTRUCTION)
    assert instruction == ""
    hint = None
    if body.startswith("Hint: "):
        hint, body = body[len("Hint: ") :].split("\nQuestion: ", 1)
    else:
        body = body[len("Question: ") :]
    question, options = body.split("\nOptions:", 1)
    parts = re.split(r"\n\(([A-E])\) ", options)
    assert parts[0] == ""
    return {"hint": hint, "question": question, "options": dict(zip(parts[1::2], parts[2::2], strict=True))}


def test_mmbench_user_turns_equal_the_official_moka_prompts(tmp_path):
    """Rows rebuilt from the official MokA run's prompts (merged.jsonl) give back exactly those prompts."""
    lines = shared_file("samples", "mmbench", "moka", "merged.jsonl").read_text().splitlines()[:300]
    items = [json.loads(line) for line in lines]
    rows = []
    for index, item in enumerate(items):
        parsed = parse_moka_mmbench(item["question"])
        rows.append(
            {
                "index": str(index),
                "question": parsed["question"],
                "hint": parsed["hint"] or "",
                "answer": item["answer"],
            }
            | parsed["options"]
            | {"image": base64.b64encode(RED).decode()}
        )
    assert sum(row["hint"] != "" for row in rows) > 10
    write_tsv(tmp_path / "MMBench_DEV_EN_legacy.tsv", MMBENCH_HEADER, rows)
    records = build_mmbench(tmp_path)
    assert len(records) == 300
    for record, item in zip(records, items, strict=True):
        assert user_turn(record) == item["question"]
        assert record.metadata["answer"] == item["answer"]
        assert record.messages[-1]["content"] == f"({item['answer']})"


def test_mmbench_bad_files(tmp_path):
    path = tmp_path / "MMBench_DEV_EN.tsv"

    def build_with(rows, header=MMBENCH_HEADER):
        write_tsv(path, header, rows)
        return build_mmbench(tmp_path, split="DEV_EN")

    rows = mmbench_rows()
    with pytest.raises(ValueError, match=r"header lacks the columns \['image'\]"):
        build_with(rows, [c for c in MMBENCH_HEADER if c != "image"])
    with pytest.raises(ValueError, match=r"MMBench_DEV_EN\.tsv:5: index 'x' is not an integer"):
        build_with([rows[0], rows[1], rows[2] | {"index": "x"}])
    with pytest.raises(ValueError, match=r":5: index 0 repeats line 2"):
        build_with([rows[0], rows[1], rows[0]])
    with pytest.raises(ValueError, match=r"\(index 1\): answer 'C' is not one of its options \['A', 'B'\]"):
        build_with([rows[1] | {"answer": "C"}])
    with pytest.raises(ValueError, match=r"\(index 0\): the image is not valid base64"):
        build_with([rows[0] | {"image": "!" * 100}])
    with pytest.raises(ValueError, match=r"\(index 1000000\): image '7' is neither base64"):
        build_with([rows[0], rows[2] | {"image": "7"}])
    write_tsv(path, MMBENCH_HEADER, rows)
    with path.open("a") as file:
        file.write("5\tonly three\tcells\n")
    with pytest.raises(ValueError, match=r"MMBench_DEV_EN\.tsv:8: 3 columns, the header has 14"):
        build_mmbench(tmp_path, split="DEV_EN")
    path.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        build_mmbench(tmp_path, split="DEV_EN")
    with pytest.raises(FileNotFoundError, match="MMBench_TEST_CN.tsv"):
        build_mmbench(tmp_path, split="TEST_CN")
    with pytest.raises(ValueError, match="unknown MMBench prompt style"):
        build_mmbench(tmp_path, split="DEV_EN", style="circular")


# ---------------------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------------------
POPE_SPLITS = ("random", "popular", "adversarial")


def test_pope_real_excerpts(tmp_path):
    paths = {s: shared_file("samples", "pope", "output", "coco", f"coco_pope_{s}.json") for s in POPE_SPLITS}
    root = paths["random"].parents[2]
    images = tmp_path / "val2014"
    for path in paths.values():
        for name in re.findall(r'"image": "([^"]+)"', path.read_text()):
            touch(images / name)
    records = build_pope(root, image_folder=str(images))
    check_common(records)
    assert len(records) == 90  # the excerpts hold the first 30 lines of each split
    assert [r.metadata["split"] for r in records] == [s for s in POPE_SPLITS for _ in range(30)]
    for split, path in paths.items():
        got = [r for r in records if r.metadata["split"] == split]
        assert sum(r.metadata["label"] == "yes" for r in got) == path.read_text().count('"label": "yes"')
        assert [r.metadata["question_id"] for r in got] == list(range(1, 31))
        assert [r.metadata["line"] for r in got] == list(range(1, 31))
    first = records[0]
    # benchmarks.md's example: the first line of coco_pope_random.json.
    assert first.id == "pope/coco/random/1"
    assert first.messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": IMAGE_LINE + YES_NO + "Is there a snowboard in the image?"},
        {"role": "assistant", "content": "yes"},
    ]
    assert question_text(first) == YES_NO + "Is there a snowboard in the image?"
    assert first.media[0].path == str(images / "COCO_val2014_000000310196.jpg")
    assert first.metadata == {
        "question_id": 1,
        "image": "COCO_val2014_000000310196.jpg",
        "question": "Is there a snowboard in the image?",
        "label": "yes",
        "split": "random",
        "category": "random",
        "dataset": "coco",
        "line": 1,
    }
    popular = build_pope(root, split="popular", image_folder=str(images))
    assert [r.id for r in popular] == [f"pope/coco/popular/{i}" for i in range(1, 31)]


def write_pope(root: Path, lines: dict[str, list[str]] | None = None) -> Path:
    default = [
        '{"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat in the image?", '
        '"label": "yes"}',
        "",
        '{"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the imange?", '
        '"label": "no"}',
    ]
    lines = lines or {}
    for split in POPE_SPLITS:
        path = root / "output" / "coco" / f"coco_pope_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines.get(split, default)) + "\n")
    touch(root / "val2014" / "COCO_val2014_000000000001.jpg")
    return root


def test_pope_fixture_relative_images_and_typos_kept(tmp_path):
    root = write_pope(tmp_path)
    records = build_pope(root, split="adversarial")
    assert [r.id for r in records] == ["pope/coco/adversarial/1", "pope/coco/adversarial/2"]
    assert records[1].metadata["line"] == 3  # the blank line 2 is not a question
    assert user_turn(records[1]).endswith("Question: Is there a dog in the imange?")
    assert records[1].media[0].path == str(root.resolve() / "val2014" / "COCO_val2014_000000000001.jpg")
    assert len(build_pope(root)) == 6


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"question_id": 1, "image": "a.jpg", "text": "Q?", "label": "yes"', r"random\.json:1: not a JSON object"),
        ("[1, 2]", r"random\.json:1: expected a JSON object"),
        ('{"question_id": 1, "image": "a.jpg", "text": "Q?"}', r":1: 'label' must be a non-empty str"),
        (
            '{"question_id": "1", "image": "a.jpg", "text": "Q?", "label": "no"}',
            "'question_id' must be a non-empty int",
        ),
        ('{"question_id": true, "image": "a.jpg", "text": "Q?", "label": "no"}', "'question_id' must be"),
        ('{"question_id": 1, "image": "", "text": "Q?", "label": "no"}', "'image' must be a non-empty str"),
        ('{"question_id": 1, "image": "a.jpg", "text": "Q?", "label": "Yes"}', r"label must be one of \('yes', 'no'\)"),
    ],
)
def test_pope_bad_lines(tmp_path, line, match):
    write_pope(tmp_path, {"random": [line]})
    with pytest.raises(ValueError, match=match):
        build_pope(tmp_path, split="random")


def test_pope_bad_files_and_arguments(tmp_path):
    root = write_pope(tmp_path, {"popular": [""]})
    with pytest.raises(ValueError, match=r"coco_pope_popular\.json: no questions"):
        build_pope(root)
    line = '{"question_id": 7, "image": "COCO_val2014_000000000001.jpg", "text": "Q?", "label": "no"}'
    write_pope(root, {"random": [line, line]})
    with pytest.raises(ValueError, match=r"random\.json:2: question_id 7 repeats line 1"):
        build_pope(root, split="random")
    with pytest.raises(ValueError, match="POPE split must be one of"):
        build_pope(root, split="test")
    with pytest.raises(FileNotFoundError, match=r"output/gqa/gqa_pope_random\.json"):
        build_pope(root, split="random", dataset="gqa")
    with pytest.raises(FileNotFoundError, match=r"pope/coco/adversarial/1.*val2017"):
        build_pope(root, split="adversarial", image_folder="val2017")


# ---------------------------------------------------------------------------------------------------------
# SEED-Bench
# ---------------------------------------------------------------------------------------------------------
SEED_TYPES = {
    "Scene Understanding": 1,
    "Instance Identity": 2,
    "Instance Attributes": 3,
    "Instance Location": 4,
    "Instances Counting": 5,
    "Spatial Relation": 6,
    "Instance Interaction": 7,
    "Visual Reasoning": 8,
    "Text Understanding": 9,
    "Action Recognition": 10,
    "Action Prediction": 11,
    "Procedure Understanding": 12,
}


def seed_question(qid: str, type_id: int, data_id: str, data_type: str = "image", **extra) -> dict:
    return {
        "answer": "A",
        "choice_a": "One",
        "choice_b": "Two",
        "choice_c": "Three",
        "choice_d": "Four",
        "data_id": data_id,
        "data_type": data_type,
        "question": "How many towels are in the image?",
        "question_id": qid,
        "question_type_id": type_id,
    } | extra


SEED_QUESTIONS = [
    seed_question("101669", 5, "1454426_2591111986"),  # the README's example, no extension
    seed_question("v1738", 10, "94328.webm", "video", answer="C"),
    seed_question("2", 9, "text_1.jpg", question="What does the sign say?", choice_d="Stop"),
    seed_question("v3", 12, "P03/P03_24.MP4", "video", segment=[30, 120]),
    seed_question("4", 1, "scene.png", answer="D"),
]


def write_seed(root: Path, questions=None, table=SEED_TYPES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    content = {"questions": SEED_QUESTIONS if questions is None else questions}
    if table is not None:
        content["question_type"] = table
    (root / "SEED-Bench.json").write_text(json.dumps(content))
    for name in ("1454426_2591111986.jpg", "text_1.jpg", "scene.png"):
        touch(root / "SEED-Bench-image" / name)
    for name in ("94328.webm", "P03/P03_24.MP4"):
        touch(root / "videos" / name)
    return root


def test_seed_bench_image_dimensions_by_default(tmp_path):
    root = write_seed(tmp_path).resolve()
    records = build_seed_bench(root)
    check_common(records)
    assert [r.id for r in records] == ["seed_bench/101669", "seed_bench/2", "seed_bench/4"]
    question = (
        "Question: How many towels are in the image?\nOptions:\n(A) One\n(B) Two\n(C) Three\n(D) Four\n"
        + MC_INSTRUCTION
    )
    assert records[0].messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "This is an image:\n<image_start><image><image_end>. " + question},
        {"role": "assistant", "content": "(A)"},
    ]
    assert question_text(records[0]) == question
    assert records[0].media[0].path == str(root / "SEED-Bench-image" / "1454426_2591111986.jpg")
    assert records[1].media[0].path == str(root / "SEED-Bench-image" / "text_1.jpg")
    assert records[0].metadata == {
        "question_id": "101669",
        "question_type_id": 5,
        "dimension": "Instances Counting",
        "question": "How many towels are in the image?",
        "choices": {"A": "One", "B": "Two", "C": "Three", "D": "Four"},
        "answer": "A",
        "data_type": "image",
        "data_id": "1454426_2591111986",
        "segment": None,
        "split": "test",
    }
    assert [r.metadata["dimension"] for r in records] == [
        "Instances Counting",
        "Text Understanding",
        "Scene Understanding",
    ]
    assert records[2].messages[-1]["content"] == "(D)"


def test_seed_bench_video_questions_and_filters(tmp_path):
    root = write_seed(tmp_path).resolve()
    records = build_seed_bench(root, include_video=True)
    assert [r.id for r in records] == [f"seed_bench/{q['question_id']}" for q in SEED_QUESTIONS]
    video = records[1]
    assert (video.media[0].kind, video.media[0].modality) == ("video", "visual")
    assert video.media[0].path == str(root / "videos" / "94328.webm")
    assert (video.metadata["dimension"], video.metadata["answer"]) == ("Action Recognition", "C")
    assert records[3].metadata["segment"] == [30, 120]
    assert records[3].media[0].path == str(root / "videos" / "P03" / "P03_24.MP4")
    assert [r.id for r in build_seed_bench(root, dimensions=[5, 10])] == ["seed_bench/101669"]
    assert [r.id for r in build_seed_bench(root, include_video=True, dimensions=[12, 9])] == [
        "seed_bench/2",
        "seed_bench/v3",
    ]
    llava = build_seed_bench(root, style="llava")[1]
    assert question_text(llava) == (
        "What does the sign say?\nA. One\nB. Two\nC. Three\nD. Stop\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert llava.messages[-1]["content"] == "A"
    # A file without the dimension table uses SEED-Bench v1's.
    write_seed(tmp_path, table=None)
    assert build_seed_bench(root)[0].metadata["dimension"] == "Instances Counting"


def test_seed_bench_missing_media(tmp_path):
    root = write_seed(tmp_path)
    (root / "SEED-Bench-image" / "1454426_2591111986.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"seed_bench/101669.*SEED-Bench-image/1454426_2591111986"):
        build_seed_bench(root)
    (root / "videos" / "94328.webm").unlink()
    with pytest.warns(UserWarning, match="skipped 2 of 5 records"):
        assert len(build_seed_bench(root, include_video=True, on_missing="skip")) == 3


@pytest.mark.parametrize(
    ("questions", "match"),
    [
        (["x"], r"question 0: expected an object"),
        ([seed_question("1", 1, "a.jpg", choice_c=None)], r"question 0 \(id 1\): 'choice_c' must be a string"),
        ([{k: v for k, v in seed_question("1", 1, "a.jpg").items() if k != "question"}], "'question' must be"),
        ([seed_question(None, 1, "a.jpg")], "'question_id' must be"),
        ([seed_question("1", 13, "a.jpg")], r"question_type_id 13 is not a known dimension"),
        ([seed_question("1", "1", "a.jpg")], r"question_type_id '1' is not a known dimension"),
        ([seed_question("1", 1, "a.jpg", answer="E")], r"question 0 \(id 1\): answer must be one of"),
        ([seed_question("1", 1, "a.jpg", data_type="audio")], "data_type must be one of"),
        ([seed_question("1", 1, "")], "empty data_id"),
        (
            [seed_question("1", 1, "a.jpg"), seed_question("1", 2, "b.jpg")],
            r"question 1 \(id 1\): .*repeats question 0",
        ),
    ],
)
def test_seed_bench_bad_questions(tmp_path, questions, match):
    write_seed(tmp_path, questions)
    with pytest.raises(ValueError, match=match) as error:
        build_seed_bench(tmp_path, on_missing="skip")
    assert "SEED-Bench.json" in str(error.value)


def test_seed_bench_bad_files_and_arguments(tmp_path):
    root = write_seed(tmp_path)
    with pytest.raises(ValueError, match=r"unknown SEED-Bench dimensions \[13\]"):
        build_seed_bench(root, dimensions=[1, 13])
    with pytest.raises(ValueError, match="unknown SEED-Bench prompt style"):
        build_seed_bench(root, style="ppl")
    with pytest.raises(ValueError, match="SEED-Bench has one split"):
        build_seed_bench(root, split="train")
    write_seed(root, table={"Scene Understanding": "1"})
    with pytest.raises(ValueError, match="'question_type' must map dimension names to integer ids"):
        build_seed_bench(root)
    (root / "SEED-Bench.json").write_text('{"questions": [}')
    with pytest.raises(ValueError, match=r"SEED-Bench\.json: not valid JSON"):
        build_seed_bench(root)
    (root / "SEED-Bench.json").write_text("[]")
    with pytest.raises(ValueError, match="expected an object with a 'questions' list"):
        build_seed_bench(root)
    with pytest.raises(FileNotFoundError, match="SEED-Bench-2.json"):
        build_seed_bench(root, annotation="SEED-Bench-2.json")


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------
def fixture_llava_instruct(root: Path) -> Path:
    return write_llava(root, LLAVA_ENTRIES[:2])


def fixture_llava_pretrain(root: Path) -> Path:
    return write_llava(root, LLAVA_ENTRIES[:2], name="blip_laion_cc_sbu_558k.json", folder="images")


def fixture_mmbench(root: Path) -> Path:
    write_tsv(root / "MMBench_DEV_EN_legacy.tsv", MMBENCH_HEADER, mmbench_rows())
    return root


def fixture_mme(root: Path) -> Path:
    """All 14 subtasks, one image each."""
    lines = {
        subtask: [
            ("0001.jpg", "Is it? Please answer yes or no.", "Yes"),
            ("0001.jpg", "Is not? Please answer yes or no.", "No"),
        ]
        for subtask in MME_SUBTASKS
    }
    write_mme(root / "MME_Benchmark_release_version", lines)
    return root


CONFIG_FIXTURES = {
    "llava_instruct": (fixture_llava_instruct, build_llava_instruct, 3),
    "llava_pretrain": (fixture_llava_pretrain, build_llava_pretrain, 3),
    "mme": (fixture_mme, build_mme, 28),
    "mmbench": (fixture_mmbench, build_mmbench, 4),
    "pope": (write_pope, build_pope, 6),
    "seed_bench": (write_seed, build_seed_bench, 3),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FIXTURES))
def test_data_config_composes_and_builds_the_default_records(tmp_path, name):
    make_fixture, builder, count = CONFIG_FIXTURES[name]
    root = make_fixture(tmp_path / "data")
    with initialize_config_dir(version_base=None, config_dir=str(CONFIGS)):
        cfg = compose(overrides=[f"+data={name}", f"data.builder.root={root}"])
    assert cfg.data.media.frames == 10
    assert cfg.data.media.audio_windows in ("music_avqa", "music_avqa_official", "ave", "whole")
    records = instantiate(cfg.data.builder)
    assert len(records) == count and all(isinstance(r, Record) for r in records)
    # The config's prompt is the builder's default (the official MokA prompt), so both give the same records.
    defaults = builder(root)
    assert [(r.id, r.messages, r.question_span, r.metadata) for r in records] == [
        (r.id, r.messages, r.question_span, r.metadata) for r in defaults
    ]


def test_data_config_list_options_from_the_command_line(tmp_path):
    """Hydra hands list options over as ListConfig; the builders take any sequence."""
    mme_root, seed_root = fixture_mme(tmp_path / "mme"), write_seed(tmp_path / "seed")
    with initialize_config_dir(version_base=None, config_dir=str(CONFIGS)):
        mme = compose(overrides=["+data=mme", f"data.builder.root={mme_root}", "data.builder.subtasks=[OCR,existence]"])
        seed = compose(
            overrides=[
                "+data=seed_bench",
                f"data.builder.root={seed_root}",
                "data.builder.dimensions=[5,12]",
                "data.builder.include_video=true",
            ]
        )
    assert [r.id for r in instantiate(mme.data.builder)] == [
        "mme/OCR/0001/0",
        "mme/OCR/0001/1",
        "mme/existence/0001/0",
        "mme/existence/0001/1",
    ]
    assert [r.id for r in instantiate(seed.data.builder)] == ["seed_bench/101669", "seed_bench/v3"]
