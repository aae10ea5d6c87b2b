"""Extracted media: every video's sampled frames and every sound track decoded once, read back by ``MediaLoader``.

On-the-fly training decodes each 60 s mp4 every epoch (all frames up to the last pick for the video, the whole
AAC track for the audio), which costs far more than the step itself. ``extract_media`` runs that decoding once
per media file, with the same functions and settings the loader uses, and stores the result; a ``MediaLoader``
with ``extracted_dir`` then reads the stored arrays instead of decoding, and gives the same tensors.

What is stored, one ``.npz`` per media item (kind ``video`` or ``audio`` of one source file):

* ``video``: ``frames`` = ``read_video_frames(path, frames, size=frame_size)``, uint8 ``[N, H, W, 3]``, the
  frames before any transform (so one extraction serves any visual encoder's preprocessing).
* ``audio``: ``audio`` = ``read_audio(path, sample_rate)``, float32 mono ``[T]``, the whole clip before
  windowing (so one extraction serves every window preset). float32, not int16 PCM: reading it back is exact.
* ``meta``: a JSON string (a unicode array, so ``allow_pickle=False`` reads it): the format version, the kind,
  the settings below and the source file's resolved path, size and mtime.

Layout::

    <out_dir>/video-<frames>f[-<H>x<W>]/<xx>/<stem>-<hash>.npz   one settings directory per frame count and size
    <out_dir>/audio-<rate>hz/<xx>/<stem>-<hash>.npz              one per sample rate
    <out_dir>/<settings directory>/settings.json                 what that directory holds

``<hash>`` is the first 16 hex digits of the SHA-256 of the source's resolved absolute path and ``<xx>`` its
first two (a fan-out, so no directory holds 100k files); ``<stem>`` is the source's name, for people reading
the tree. A hash rather than a mirror of the path under the dataset root: the loader sees only a
``MediaRef``'s absolute path, not the root, so a mirror would need the root passed to both the command and
every loader, and two roots (or records of several datasets) sharing one ``out_dir`` could collide; a hash
of the full path needs nothing else and never collides. The price: moving the dataset folder means
extracting again (so does editing a file: its size or mtime no longer match, see below).

Settings are part of the path, so extracting with another frame count, frame size or sample rate writes a
new directory next to the old one, and a loader with other settings than the extraction's finds no file:
its error names the settings directories that exist. Each file's ``meta`` is checked on read as well (a file
copied or renamed into the wrong directory is refused), and so is its source's size and mtime (a video
replaced or re-encoded after extraction is refused, never silently served stale). A re-run extracts what
is missing or stale and skips the rest.

Writes are atomic: a file is written as ``.<name>.<pid>.<random>.tmp`` beside its final name, flushed to
disk and renamed. A process killed mid-write leaves at most such a ``.tmp`` file, which nothing reads (delete
them at leisure: ``find <out_dir> -name '.*.tmp' -delete`` while no extraction runs); the item counts as not
extracted and the next run does it again. Several runs on one ``out_dir`` at once are safe (each rename
is atomic; the last one wins, with identical content).

Not extracted: images (one decode per item already; nothing to save) and media embedded as bytes in the
records (``MediaRef.data``); the loader reads those as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
import warnings
import zipfile
import zlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from moka_train.checkpoint_io import write_text_atomic
from moka_train.data.media import MediaLoader, read_audio, read_video_frames
from moka_train.data.records import MediaRef, Record

__all__ = [
    "EXTRACTED_KINDS",
    "ExtractionReport",
    "extract_media",
    "extracted_path",
    "item_settings",
    "read_extracted",
]

FORMAT_VERSION = 1
EXTRACTED_KINDS = ("video", "audio")
ON_ERROR = ("error", "skip")
SETTINGS_NAME = "settings.json"
_ARRAY_NAME = {"video": "frames", "audio": "audio"}
# What np.load raises on a damaged .npz (cut short, overwritten): zip, zlib and npy-header errors.
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


# ---------------------------------------------------------------------------------------------------------------
# Settings and paths
# ---------------------------------------------------------------------------------------------------------------
def item_settings(kind: str, loader: MediaLoader) -> dict[str, Any]:
    """What an extracted item of ``kind`` depends on, taken from ``loader``: the frame count and size of a
    video, the sample rate of audio (the audio windows are cut later, at load time)."""
    if kind == "video":
        size = None if loader.frame_size is None else [int(loader.frame_size[0]), int(loader.frame_size[1])]
        return {"kind": "video", "frames": int(loader.frames), "frame_size": size}
    if kind == "audio":
        return {"kind": "audio", "sample_rate": int(loader.sample_rate)}
    raise ValueError(f"only {EXTRACTED_KINDS} media are extracted, not {kind!r}")


def _settings_directory(settings: Mapping[str, Any]) -> str:
    """A readable directory name that differs whenever the settings do."""
    if settings["kind"] == "video":
        size = settings["frame_size"]
        return f"video-{settings['frames']}f" + ("" if size is None else f"-{size[0]}x{size[1]}")
    return f"audio-{settings['sample_rate']}hz"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).resolve()


def extracted_path(out_dir: str | os.PathLike, source: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """Where the item of ``source`` extracted with ``settings`` (``item_settings``) lives under ``out_dir``."""
    resolved = _resolved(source)
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    stem = re.sub(r"[^\w.-]", "_", resolved.stem)[:64]
    return Path(out_dir) / _settings_directory(settings) / digest[:2] / f"{stem}-{digest}.npz"


def _source_stat(source: Path) -> dict[str, Any]:
    stat = os.stat(source)
    return {"path": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_meta(handle: Any, target: Path) -> dict[str, Any]:
    try:
        meta = json.loads(str(handle["meta"]))
    except (KeyError, *_UNREADABLE) as error:
        raise ValueError(f"extracted file {target} has no readable meta entry: {error}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"extracted file {target} has format_version {meta.get('format_version')!r}")
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Reading (what MediaLoader calls)
# ---------------------------------------------------------------------------------------------------------------
def read_extracted(out_dir: str | os.PathLike, ref: MediaRef, loader: MediaLoader) -> np.ndarray:
    """The extracted frames (uint8 ``[N, H, W, 3]``) or waveform (float32 ``[T]``) of ``ref``, as
    ``read_video_frames`` / ``read_audio`` with ``loader``'s settings would decode them.

    FileNotFoundError when the item was not extracted with these settings (naming the file looked for and
    the settings directories that exist); ValueError when the file does not match (other settings in its
    meta, or a source file changed since extraction). Never falls back to decoding: a half-done or stale
    extraction should be found and fixed, not make every epoch silently slow again.
    """
    settings = item_settings(ref.kind, loader)
    source = _resolved(ref.path)
    target = extracted_path(out_dir, source, settings)
    try:
        handle = np.load(target, allow_pickle=False)
    except FileNotFoundError:
        existing = sorted(p.name for p in Path(out_dir).glob(f"{ref.kind}-*") if p.is_dir())
        raise FileNotFoundError(
            f"media {ref.path}: no extracted {ref.kind} at {target} (settings {settings}; {ref.kind} settings "
            f"extracted under {out_dir}: {existing or 'none'}). Run data_prep/extract_media.py with these media "
            "settings, or leave extracted_dir unset to decode the file"
        ) from None
    except _UNREADABLE as error:
        raise ValueError(f"media {ref.path}: extracted file {target} is unreadable: {error}") from error
    with handle:
        meta = _read_meta(handle, target)
        if meta.get("settings") != settings:
            raise ValueError(
                f"media {ref.path}: {target} holds {meta.get('settings')}, not the requested {settings}; it was "
                "copied or renamed into the wrong place: extract again"
            )
        current = _source_stat(source)
        if meta.get("source") != current:
            raise ValueError(
                f"media {ref.path} changed since it was extracted to {target} (then {meta.get('source')}, now "
                f"{current}): run data_prep/extract_media.py again"
            )
        try:
            return handle[_ARRAY_NAME[ref.kind]]
        except _UNREADABLE as error:
            raise ValueError(f"media {ref.path}: extracted file {target} is unreadable: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# Writing (one task per media item, run in worker processes)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Task:
    """One item to extract: plain fields, cheap to pickle to a worker."""

    kind: str
    source: str
    target: str
    settings: dict[str, Any]
    compress: bool


def _decode(task: _Task) -> np.ndarray:
    if task.kind == "video":
        size = task.settings["frame_size"]
        return read_video_frames(task.source, task.settings["frames"], size=None if size is None else tuple(size))
    return read_audio(task.source, task.settings["sample_rate"])


def _write_atomic(target: Path, arrays: dict[str, np.ndarray], compress: bool) -> None:
    """Write under a unique temporary name beside ``target``, flush to disk, rename. The tmp file is created
    with mode 0666 minus the umask (mkstemp's 0600 would hide the files from other users of a shared disk)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            (np.savez_compressed if compress else np.savez)(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _extract_one(task: _Task) -> str | None:
    """Decode and store one item; the error text (type and message) if it failed, else None.

    Errors come back as text rather than raised: any failure of one file (a corrupt mp4, a missing stream, a
    decoder crash surfacing as RuntimeError) is that file's failure, reported with its name, and text pickles
    back from a worker whatever the exception class.
    """
    try:
        source = Path(task.source)
        stat = _source_stat(source)  # before decoding: a file changed meanwhile no longer matches and is redone
        array = _decode(task)
        meta = {"format_version": FORMAT_VERSION, "settings": task.settings, "source": stat}
        _write_atomic(
            Path(task.target), {_ARRAY_NAME[task.kind]: array, "meta": np.array(json.dumps(meta))}, task.compress
        )
    except Exception as error:  # every failure is reported per file (see docstring)
        return f"{type(error).__name__}: {error}"
    return None


def _is_done(task: _Task) -> bool:
    """An output exists, is readable, and matches the settings and the source as it is now."""
    target = Path(task.target)
    if not target.is_file():
        return False
    try:
        with np.load(target, allow_pickle=False) as handle:
            meta = _read_meta(handle, target)
        return meta.get("settings") == task.settings and meta.get("source") == _source_stat(Path(task.source))
    except _UNREADABLE:
        return False


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ExtractionReport:
    """What a run did. ``failed``: ``(source path, kind, error)`` per item that could not be extracted."""

    extracted: int = 0
    already_done: int = 0
    not_extracted: int = 0  # images and embedded bytes: read from their source as before
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    directories: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the end of a run: the counts, then every failure with its file and error."""
        lines = [
            f"{self.extracted} extracted, {self.already_done} already extracted, {len(self.failed)} failed, "
            f"{self.not_extracted} not extractable (images, embedded bytes) in {self.seconds:.1f} s; "
            f"under: {', '.join(self.directories) or 'nothing'}"
        ]
        if self.failed:
            lines.append(f"{len(self.failed)} media items could not be extracted:")
            lines.extend(f"  {path} [{kind}]: {error}" for path, kind, error in self.failed)
        return "\n".join(lines)


def _tasks(
    records: Sequence[Record], out_dir: Path, loader: MediaLoader, kinds: Sequence[str], compress: bool
) -> tuple[list[_Task], int]:
    """One task per distinct (kind, resolved source) of the records, in a stable order; and how many media
    items are not extractable."""
    seen: dict[tuple[str, Path], _Task] = {}
    skipped = 0
    for record in records:
        for ref in record.media:
            if ref.kind not in kinds or ref.data is not None:
                skipped += 1
                continue
            source = _resolved(ref.path)
            if (ref.kind, source) not in seen:
                settings = item_settings(ref.kind, loader)
                target = extracted_path(out_dir, source, settings)
                seen[(ref.kind, source)] = _Task(ref.kind, str(source), str(target), settings, compress)
    return sorted(seen.values(), key=lambda task: (task.kind, task.source)), skipped


def _run(tasks: list[_Task], workers: int) -> Iterator[tuple[_Task, str | None]]:
    """(task, error or None) as tasks finish: in this process (``workers=0``) or a pool of ``workers``
    processes. Closing the iterator early (an error with ``on_error="error"``) cancels the tasks not started
    and waits only for the running ones (their outputs are complete files, kept).

    A worker that dies (killed for memory, a crash inside FFmpeg) breaks the whole pool and fails every task
    in flight, not only its own; those tasks are run again one at a time, each in a process of its own, so
    only the one that kills its process is reported (and the others are extracted), then a fresh pool goes on.
    """
    if workers == 0:
        for task in tasks:
            yield task, _extract_one(task)
        return
    queue = deque(tasks)
    pending: dict[Future, _Task] = {}
    suspects: deque[_Task] = deque()
    executor, broken = ProcessPoolExecutor(max_workers=workers), False
    try:
        while queue or pending or suspects:
            if suspects and not pending:
                task = suspects.popleft()
                yield task, _run_alone(task)
                continue
            if broken and not pending:
                executor.shutdown(wait=True)
                executor, broken = ProcessPoolExecutor(max_workers=workers), False
            # At most 4 tasks per worker in flight: the pool's queue stays short, so cancelling is quick.
            while queue and not broken and len(pending) < 4 * workers:
                task = queue.popleft()
                pending[executor.submit(_extract_one, task)] = task
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                try:
                    error = future.result()
                except BrokenProcessPool:
                    broken = True
                    suspects.append(task)
                    continue
                yield task, error
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _run_alone(task: _Task) -> str | None:
    """``_extract_one`` in a process of its own: a crash there is this task's."""
    with ProcessPoolExecutor(max_workers=1) as solo:
        try:
            return solo.submit(_extract_one, task).result()
        except BrokenProcessPool as crash:
            return f"the worker process died while extracting this file (out of memory? a crash in FFmpeg?): {crash}"


def extract_media(
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    media_cfg: Mapping[str, Any] | MediaLoader,
    workers: int = 8,
    on_error: str = "skip",
    kinds: Sequence[str] = EXTRACTED_KINDS,
    compress: bool = False,
    progress: bool = True,
) -> ExtractionReport:
    """Decode every distinct video / audio file of ``records`` once and store it under ``out_dir`` (layout in
    the module docstring), skipping items already extracted with the same settings from the same source.

    ``media_cfg``: a data config's ``media`` block (``frames``, ``frame_size``, ``sample_rate``; the audio
    windows do not matter here) or the ``MediaLoader`` itself, so the stored arrays are exactly what that
    loader decodes. ``workers``: processes decoding in parallel (0: in this process). ``on_error="skip"``: a
    file that cannot be decoded is listed in the report (and one warning) and the rest go on; ``"error"``:
    the first failure stops the run with a ValueError naming the file. ``compress``: zlib the arrays
    (smaller files, slower reads; frames of real video shrink, float audio hardly). ``progress``: a tqdm bar.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    unknown = sorted(set(kinds) - set(EXTRACTED_KINDS))
    if unknown:
        raise ValueError(f"only {EXTRACTED_KINDS} media can be extracted, not {unknown}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    start = time.perf_counter()
    loader = media_cfg if isinstance(media_cfg, MediaLoader) else MediaLoader(**dict(media_cfg))
    out_dir = Path(out_dir)
    tasks, skipped = _tasks(records, out_dir, loader, kinds, compress)
    report = ExtractionReport(not_extracted=skipped)
    for kind in sorted({task.kind for task in tasks}):
        settings = item_settings(kind, loader)
        directory = out_dir / _settings_directory(settings)
        directory.mkdir(parents=True, exist_ok=True)
        settings_file = directory / SETTINGS_NAME
        if not settings_file.is_file():
            body = json.dumps({"format_version": FORMAT_VERSION, "settings": settings}, indent=2)
            write_text_atomic(settings_file, body)
        report.directories.append(str(directory))
    todo = [task for task in tasks if not _is_done(task)]
    report.already_done = len(tasks) - len(todo)
    with tqdm(total=len(todo), desc="extracting media", unit="item", disable=not progress) as bar:
        results = _run(todo, min(workers, len(todo)) if workers else 0)
        try:
            for task, error in results:
                bar.update(1)
                if error is None:
                    report.extracted += 1
                    continue
                if on_error == "error":
                    raise ValueError(f"could not extract the {task.kind} of {task.source}: {error}")
                report.failed.append((task.source, task.kind, error))
                bar.set_postfix(failed=len(report.failed))
        finally:
            results.close()  # stops the pool (cancelling what has not started) when the loop ended early
    report.failed.sort()  # completion order varies from run to run; the summary should not
    report.seconds = time.perf_counter() - start
    if report.failed:
        shown = "; ".join(f"{path} [{kind}]: {error}" for path, kind, error in report.failed[:5])
        more = f" and {len(report.failed) - 5} more" if len(report.failed) > 5 else ""
        warnings.warn(f"{len(report.failed)} media items could not be extracted: {shown}{more}", stacklevel=2)
    return report
