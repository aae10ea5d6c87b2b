"""Stop signals: a preemption or ``scancel`` (SIGTERM, which torchrun passes on to its workers), Ctrl-C (SIGINT)
or SLURM's warning before the time limit (SIGUSR1, ``sbatch --signal``) ends a training run at the next step
boundary, with a checkpoint, instead of mid-step with everything since the last checkpoint lost.

The handler only records the signal; the training loop reads ``StopSignals.received`` once per step, in the
all-reduce it already makes, so every rank stops after the same step even when only some got the signal. A
second Ctrl-C stops at once (KeyboardInterrupt), leaving the last complete checkpoint. Other signals are not
counted twice: a scheduler that signals every process of a job reaches a torchrun worker both directly and
through torchrun, which passes the signal on.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# SIGKILL and SIGSTOP cannot be caught; other signals (SIGSEGV, SIGCHLD, ...) are not requests to stop.
CATCHABLE = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")


def parse_stop_signals(names: Iterable[Any], key: str = "stop_signals") -> tuple[signal.Signals, ...]:
    """Signal names (``SIGTERM``, ...) as signals; an unknown or uncatchable name is an error naming ``key``."""
    if isinstance(names, str):
        raise ValueError(f"{key} must be a list of signal names, e.g. [SIGTERM, SIGINT], got {names!r}")
    parsed = []
    for i, name in enumerate(names):
        if name not in CATCHABLE or not hasattr(signal, name):
            raise ValueError(f"{key}[{i}]: {name!r} is not one of the signals a run can stop on: {list(CATCHABLE)}")
        parsed.append(signal.Signals[name])
    return tuple(dict.fromkeys(parsed))


class StopSignals:
    """Within ``with StopSignals(["SIGTERM", ...]) as stop:``, the first of these signals sets ``stop.received``;
    after it, a SIGINT runs the SIGINT handler that was there before (Python's raises KeyboardInterrupt) and the
    others are ignored. Handlers can only be set in the main thread; elsewhere nothing is installed and a signal
    keeps its usual effect."""

    def __init__(self, names: Iterable[Any]) -> None:
        self.signals = parse_stop_signals(names)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig
            logger.warning(
                "%s received: finishing the step (or its validation or save) in progress, then saving a checkpoint and "
                "stopping (Ctrl-C again stops at once, keeping the last complete checkpoint)",
                sig.name,
            )
            return
        if sig != signal.SIGINT:
            return
        previous = self._previous.get(sig, signal.SIG_DFL)
        self._restore()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.raise_signal(sig)  # its default action, now that the default handler is back


def ignore_stop_signals(signals: tuple[signal.Signals, ...], worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn`` (bind ``signals`` with functools.partial): a signal sent to the whole
    process group (Ctrl-C, SLURM's) must not end the workers, whose death the main process would report as an
    error before it reaches the step boundary. The owner of the loader must then shut them down itself before the
    interpreter exits (iterate it with ``iterate_loader``): multiprocessing's exit handler ends workers with a
    SIGTERM."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def iterate_loader(loader: Iterable[T]) -> Iterator[T]:
    """Iterate a DataLoader whose workers ignore the stop signals so that they leave whenever this generator ends:
    exhausted, closed (drop it in a ``finally``) or failed.

    A worker's error (a corrupt media file) is re-raised by the DataLoader from inside its iterator, whose frames
    the traceback keeps, and with them the iterator and its workers, until the interpreter's exit, where
    multiprocessing's SIGTERM cannot end them: the process would hang after printing the error. So the error is
    raised here without those frames; its message still holds the worker's own traceback.
    """
    iterator = iter(loader)
    try:
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as error:
                error.__traceback__ = None
                raise error
            yield item
    finally:
        del iterator
