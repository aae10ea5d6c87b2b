"""MME (perception and cognition yes/no questions, two per image).

Layouts (benchmarks.md §3), both read, even mixed within one folder:

- the official release, ``MME_Benchmark_release_version/MME_Benchmark/<subtask>/``: artwork, celebrity,
  landmark, posters and scene keep ``images/<stem>.jpg`` and ``questions_answers_YN/<stem>.txt``; the other
  nine subtasks keep ``<stem>.jpg|.png`` and ``<stem>.txt`` side by side;
- the flattened folder the official MokA loader reads (``<subtask>/`` with image + txt pairs for all 14).

``root`` is the folder holding the subtask folders or any parent of it down that path (``root``,
``root/MME_Benchmark``, ``root/MME_Benchmark_release_version``, ``root/MME_Benchmark_release_version/
MME_Benchmark``; the first that holds a subtask folder wins). Each txt has two lines
``question<TAB>Yes|No`` (blank lines are ignored; any other count, a missing tab or a GT other than yes/no
is an error naming the file and line: the official score's acc+ needs both questions of an image).

Order: subtasks in the order given, images by file name, questions in file order, so the two questions of
an image are adjacent, as the official ``calculation.py`` needs (it reads its per-subtask result files in
pairs of lines). The prompt's question is the text before " Please answer yes or no." (stripped), inside the
official MokA user turn ``This is an image:\\n<image_start><image><image_end>\\nPlease answer this question
with yes or no, and no other content. Question: {question}``, the default prompt; the lead-in is part of the
question span, as the official question mask covers it. The target is ``Yes`` / ``No``.

Record ids: ``mme/<subtask>/<image stem>/<0|1>``.

Metadata (what the official tool's result lines ``image<TAB>question<TAB>GT<TAB>response`` need):

==================  =====================================================================================
key                 value
==================  =====================================================================================
``subtask``         the subtask folder name (``OCR``, ``commonsense_reasoning``, ...)
``category``        ``perception`` (10 subtasks, max 2000) or ``cognition`` (4, max 800)
``image``           the image's file name (``0001.jpg``), the tool's first column
``question``        the question as written in the txt, " Please answer yes or no." included
``answer``          ``Yes`` or ``No`` (the GT)
``question_index``  0 or 1: the question's place among the image's two
``split``           ``test`` (MME has one split)
==================  =====================================================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from moka_train.data.datasets.common import MOKA_YES_NO_PROMPT, resolve_root
from moka_train.data.prompts import Prompt
from moka_train.data.records import MediaRef, Record, check_media

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS: dict[str, str] = {**dict.fromkeys(PERCEPTION, "perception"), **dict.fromkeys(COGNITION, "cognition")}
SPLITS = ("test",)
# Where the subtask folders may sit below ``root``: the release zip nests them twice.
LAYOUT_PREFIXES = ("", "MME_Benchmark", "MME_Benchmark_release_version", "MME_Benchmark_release_version/MME_Benchmark")
SPLIT_IMAGES, SPLIT_QUESTIONS = "images", "questions_answers_YN"  # folders of the five split subtasks
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
ANSWER_SUFFIX = "Please answer yes or no."
QUESTIONS_PER_IMAGE = 2
ANSWERS = {"yes": "Yes", "no": "No"}
MOKA_PROMPT = MOKA_YES_NO_PROMPT


def build_mme(
    root: str | os.PathLike,
    split: str = "test",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    *,
    subtasks: Sequence[str] | None = None,
) -> list[Record]:
    """Records of MME: two per image, perception subtasks first, then cognition (``subtasks`` picks some,
    in the order given)."""
    if split not in SPLITS:
        raise ValueError(f"MME has one split, {SPLITS[0]!r}; got {split!r}")
    prompt = prompt or MOKA_PROMPT
    chosen = list(SUBTASKS) if subtasks is None else [str(s) for s in subtasks]
    unknown = [s for s in chosen if s not in SUBTASKS]
    if unknown:
        raise ValueError(f"unknown MME subtasks {unknown}; known: {list(SUBTASKS)}")
    base = _find_base(resolve_root(root))
    records: list[Record] = []
    for subtask in chosen:
        folder = base / subtask
        if not folder.is_dir():
            raise FileNotFoundError(f"MME subtask folder {folder} does not exist")
        image_dir, question_dir = folder, folder
        if (folder / SPLIT_QUESTIONS).is_dir():  # the release's layout for artwork, celebrity, ...
            image_dir, question_dir = folder / SPLIT_IMAGES, folder / SPLIT_QUESTIONS
        txts = sorted(question_dir.glob("*.txt"))
        if not txts:
            raise ValueError(f"MME subtask folder {question_dir} holds no question file (<image stem>.txt)")
        for txt in txts:
            image = _image_path(image_dir, txt.stem)
            for k, (raw_question, answer) in enumerate(_read_questions(txt)):
                question = raw_question.split(ANSWER_SUFFIX)[0].strip()
                messages, span = prompt.messages(question, answer)
                metadata = {
                    "subtask": subtask,
                    "category": SUBTASKS[subtask],
                    "image": image.name,
                    "question": raw_question,
                    "answer": answer,
                    "question_index": k,
                    "split": split,
                }
                media = [MediaRef("visual", str(image), "image")]
                records.append(Record(f"mme/{subtask}/{txt.stem}/{k}", messages, span, media, metadata))
    return check_media(records, on_missing, source=str(base))


def _find_base(root: Path) -> Path:
    for prefix in LAYOUT_PREFIXES:
        base = root / prefix
        if any((base / subtask).is_dir() for subtask in SUBTASKS):
            return base
    raise FileNotFoundError(
        f"no MME subtask folder (existence, OCR, ...) under {root} or its "
        f"{', '.join(p for p in LAYOUT_PREFIXES if p)} subfolders"
    )


def _image_path(folder: Path, stem: str) -> Path:
    """The image beside (or for) ``<stem>.txt``; MME mixes .jpg and .png. A missing image is reported later
    by ``check_media`` under its most likely name."""
    return next(
        (folder / (stem + s) for s in IMAGE_SUFFIXES if (folder / (stem + s)).is_file()), folder / (stem + ".jpg")
    )


def _read_questions(txt: Path) -> list[tuple[str, str]]:
    questions = []
    for number, line in enumerate(txt.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) != 2:
            raise ValueError(f"{txt}:{number}: expected 'question<TAB>Yes|No', got {len(columns)} columns: {line!r}")
        answer = ANSWERS.get(columns[1].strip().lower())
        if answer is None or not columns[0].strip():
            raise ValueError(f"{txt}:{number}: expected a question and a Yes/No answer, got {line!r}")
        questions.append((columns[0].strip(), answer))
    if len(questions) != QUESTIONS_PER_IMAGE:
        raise ValueError(
            f"{txt}: {len(questions)} questions; MME has {QUESTIONS_PER_IMAGE} per image (acc+ scores them together)"
        )
    return questions
