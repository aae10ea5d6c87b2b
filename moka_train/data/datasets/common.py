"""What several dataset builders share: finding and reading annotation files, checking a record's fields with
errors that name the file and the record, unique ids, and the media order a prompt asks for.

Checks on one record (``require_fields``, ``text_field``, ...) raise a bare ValueError ("missing field(s)
'anser'"); the builder's loop adds where it happened with ``record_error`` ("<file>: record 3 (question_id
17): missing field(s) 'anser'").
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moka_train.data.prompts import VISUAL, Prompt
from moka_train.data.records import MediaRef, Record
from moka_train.data.sample import PLACEHOLDER_PATTERN
from moka_train.models.tokenizer import PLACEHOLDERS

# The official MokA evaluation's user turn of the yes/no benchmarks (MME, POPE); its lead-in is part of the
# question span, as the official question mask covers it.
MOKA_YES_NO_PROMPT = Prompt(
    VISUAL, question_prefix="Please answer this question with yes or no, and no other content. Question: "
)
# The official MokA evaluation's answer instruction of the multiple-choice benchmarks (MMBench, SEED-Bench).
MOKA_CHOICE_INSTRUCTION = (
    "Please select the correct answer from the options above. Output only the selected option in the format "
    "(A), (B), (C), or (D). No explanation or extra text."
)


# -- dataset folders and annotation files ------------------------------------------------------------------------


def resolve_root(root: str | os.PathLike) -> Path:
    """The dataset folder as an absolute path, ``~`` expanded and symlinks resolved."""
    return Path(root).expanduser().resolve()


def absolute_root(root: str | os.PathLike) -> Path:
    """The dataset folder as an absolute path with its symlinks kept, so media paths stay under ``root``."""
    return Path(os.path.abspath(root))


def require_file(path: Path, what: str) -> Path:
    """``path``, or a FileNotFoundError naming it and what it should have held (``what``: "MMAU annotations")."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist (check root and the dataset layout)")
    return path


def load_json(path: Path, what: str) -> Any:
    """The content of a JSON file; errors name the file (missing, not UTF-8, not valid JSON)."""
    require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def load_json_array(path: Path, what: str) -> list[Any]:
    """A JSON file holding one array of records; errors name the file (as ``load_json``, or not an array)."""
    data = load_json(path, what)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records, got a JSON {type(data).__name__}")
    return data


# -- one record's fields ------------------------------------------------------------------------------------------


def record_error(path: Path | str, index: int, item: Any, id_key: str, error: Exception) -> ValueError:
    """``error`` (a check on one record) as a ValueError naming the file, the record's index and, when the record
    has it, its ``id_key`` field: ``<path>: record 3 (question_id 17): <error>``. Raise it ``from None``."""
    has_id = isinstance(item, Mapping) and id_key in item
    return ValueError(f"{path}: record {index}{f' ({id_key} {item[id_key]!r})' if has_id else ''}: {error}")


def require_fields(item: Any, fields: Iterable[str], *, null_is_missing: bool = False) -> Mapping[str, Any]:
    """The record as a mapping, or a ValueError listing the fields it lacks (with ``null_is_missing``, a field
    whose value is null counts as lacking: files that write absent values as null)."""
    if not isinstance(item, Mapping):
        raise ValueError(f"expected a JSON object, got {type(item).__name__}")
    missing = [name for name in fields if name not in item or (null_is_missing and item[name] is None)]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(map(repr, missing))}")
    return item


def require_strings(item: Mapping[str, Any], fields: Iterable[str], *, optional: Iterable[str] = ()) -> None:
    """A ValueError listing the ``fields`` whose values are not strings, and the ``optional`` fields that are
    present and neither a string nor null."""
    wrong = [name for name in fields if not isinstance(item[name], str)]
    wrong += [name for name in optional if not isinstance(item.get(name), str | None)]
    if wrong:
        raise ValueError(f"field(s) {wrong} must be strings")


def text_field(item: Mapping[str, Any], key: str) -> str:
    """``item[key]``, which must be a string that is not blank."""
    value = item[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string, got {value!r}")
    return value


def id_field(item: Mapping[str, Any], key: str) -> int | str:
    """``item[key]`` (None when absent), which must be an int (not a bool) or a non-empty string."""
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise ValueError(f"{key!r} must be an int or a non-empty string, got {value!r}")
    return value


# -- ids ------------------------------------------------------------------------------------------------------------


def check_unique(seen: dict[Any, str], value: Hashable, what: str, *, where: str, place: str) -> None:
    """Note that ``value`` (a ``what``: "question_id") stands at ``place`` ("line 3"); a ValueError at ``where``
    ("<file>:7") naming the earlier place when ``seen`` already has it. For benchmarks whose ids must be
    unique: a repeat means a corrupt or concatenated file, and scores keyed by id would be wrong."""
    if value in seen:
        raise ValueError(f"{where}: {what} {value!r} repeats {seen[value]}")
    seen[value] = place


def dedupe_ids(records: list[Record], source: str, stacklevel: int = 3) -> None:
    """Make ids unique in place: the second, third... record with an id gets ``#2``, ``#3``... (file order, so
    stable across runs); warn once with the count, since a repeated source id usually means a stale file.
    ``stacklevel``: as for ``warnings.warn`` (3: the caller of the builder that calls this)."""
    seen: dict[str, int] = {}
    repeated = 0
    for record in records:
        count = seen.get(record.id, 0) + 1
        seen[record.id] = count
        if count > 1:
            repeated += 1
            record.id = f"{record.id}#{count}"
    if repeated:
        warnings.warn(
            f"{source}: {repeated} records repeat the id of an earlier record; they get a '#<n>' suffix",
            stacklevel=stacklevel,
        )


# -- media ----------------------------------------------------------------------------------------------------------


def prompt_media_order(prompt: Prompt, available: Iterable[str], dataset: str) -> list[str]:
    """The media modalities in the order the prompt's placeholders name them. A custom prompt may reorder or
    leave out media (a visual-only ablation), but not ask for a medium the dataset lacks."""
    turns, _ = prompt.messages("")
    order = [PLACEHOLDERS[m.group()].key for turn in turns for m in PLACEHOLDER_PATTERN.finditer(turn["content"])]
    unknown = sorted(set(order) - set(available))
    if unknown:
        raise ValueError(
            f"the prompt has placeholders for {unknown}, but {dataset} only has {sorted(available)} media: "
            f"{prompt.template!r}"
        )
    return order


def audio_visual_media(order: Sequence[str], video: Path, audio: Path) -> list[MediaRef]:
    """The frames of ``video`` (``visual``, kind ``video``) and the sound of ``audio`` (``audio``, kind
    ``audio``; the video file itself when its sound track is the audio), in ``order``
    (``prompt_media_order``)."""
    refs = {"visual": MediaRef("visual", video, "video"), "audio": MediaRef("audio", audio, "audio")}
    return [refs[modality] for modality in order]
