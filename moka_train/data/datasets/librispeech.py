"""LibriSpeech-style speech transcription: speech stage-1 pretraining pairs (audio -> transcript).

Files as users download them (openslr.org/12, unpacked): ``<root>/<split>/<speaker>/<chapter>/`` holds
``<speaker>-<chapter>.trans.txt`` beside ``<speaker>-<chapter>-<utterance>.flac``; every transcript line is
``UTT-ID TRANSCRIPT`` (the id, one space, the upper-case text). ``root`` is the ``LibriSpeech`` folder and
``split`` one of its subsets (``train-clean-100``, ``dev-clean``, ...) or a list of them (the 960 h training
set is ``[train-clean-100, train-clean-360, train-other-500]``). Other corpora in this layout (e.g.
Multilingual LibriSpeech converted to flac, LibriTTS-style copies) read the same way; ``audio_ext`` covers
copies converted to wav.

The target is the transcript as written (upper case, no punctuation), or lower-cased with ``lowercase``:
a chat backbone's tokenizer splits upper-case text into many more tokens. The instruction is the question
span. MokA released no speech code (moka_reference.md, open question 5), so the instruction is ours.

Metadata (what scorers read):

=============== ====================================================================
key             value
=============== ====================================================================
``split``       the subset folder the utterance comes from
``utterance``   str, the utterance id (``<speaker>-<chapter>-<utterance>``)
``speaker``     str, the speaker id (folder name)
``chapter``     str, the chapter id (folder name)
``transcript``  str, the transcript as written in the file (the reference for WER)
=============== ====================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moka_train.data.datasets.common import absolute_root, check_unique
from moka_train.data.prompts import SPEECH, Prompt
from moka_train.data.records import MediaRef, Record, check_media

DEFAULT_INSTRUCTION = "Please transcribe this speech."


def _transcript_files(root: Path, split: str) -> list[Path]:
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"LibriSpeech split folder {folder} does not exist")
    files = sorted(folder.glob("*/*/*.trans.txt"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt file")
    return files


def _read_transcripts(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, utterance id, transcript)`` for each line; a line without both is an error naming it."""
    speaker, chapter = path.parent.parent.name, path.parent.name
    if path.name != f"{speaker}-{chapter}.trans.txt":
        raise ValueError(
            f"{path}: a transcript file in {speaker}/{chapter}/ must be named {speaker}-{chapter}.trans.txt"
        )
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():  # a blank line holds no utterance (e.g. a trailing newline)
            continue
        utterance, _, transcript = line.strip().partition(" ")
        transcript = transcript.strip()
        if not transcript:
            raise ValueError(f"{path}, line {number}: expected 'UTT-ID TRANSCRIPT', got {line!r}")
        if not utterance.startswith(f"{speaker}-{chapter}-"):
            raise ValueError(
                f"{path}, line {number}: utterance id {utterance!r} does not belong to speaker {speaker}, "
                f"chapter {chapter}"
            )
        entries.append((number, utterance, transcript))
    return entries


def build_librispeech(
    root: str | Path,
    split: str | Sequence[str] = "train-clean-100",
    prompt: Prompt | None = None,
    on_missing: str = "error",
    instruction: str = DEFAULT_INSTRUCTION,
    lowercase: bool = False,
    audio_ext: str = ".flac",
) -> list[Record]:
    """Records of one or more LibriSpeech subsets: the utterance (modality speech) and its transcript.

    ``split``: a subset folder under ``root`` or a list of them. ``instruction``: the user's request (the
    question span). ``lowercase``: lower-case the target (metadata keeps the transcript as written).
    ``audio_ext``: the audio files' extension. ``prompt`` defaults to the speech user turn.
    """
    root = absolute_root(root)
    prompt = prompt or Prompt(SPEECH)
    splits = [split] if isinstance(split, str) else list(split)
    records: list[Record] = []
    seen: dict[str, str] = {}
    for name in splits:
        for path in _transcript_files(root, name):
            speaker, chapter = path.parent.parent.name, path.parent.name
            for number, utterance, transcript in _read_transcripts(path):
                where = f"{path}, line {number}"
                check_unique(seen, utterance, "utterance", where=where, place=where)
                messages, span = prompt.messages(instruction, transcript.lower() if lowercase else transcript)
                records.append(
                    Record(
                        id=f"librispeech/{name}/{utterance}",
                        messages=messages,
                        question_span=span,
                        media=[MediaRef("speech", path.parent / f"{utterance}{audio_ext}", "audio")],
                        metadata={
                            "split": name,
                            "utterance": utterance,
                            "speaker": speaker,
                            "chapter": chapter,
                            "transcript": transcript,
                        },
                    )
                )
    return check_media(records, on_missing, source=f"LibriSpeech {'+'.join(splits)} under {root}")
