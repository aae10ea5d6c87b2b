"""Stop signals in one process: the first is recorded, a repeat is ignored except Ctrl-C, which stops at once;
the handlers that were there before come back. The training app's use of them (a checkpoint at the step
boundary, every rank stopping after the same step, resume) is tested end to end in tests/test_train_app.py."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from moka_train.training.stop_signals import StopSignals, parse_stop_signals


def test_names_are_parsed_and_bad_ones_refused_naming_the_entry():
    assert parse_stop_signals(["SIGTERM", "SIGUSR1", "SIGTERM"]) == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_stop_signals([]) == ()
    with pytest.raises(ValueError, match=r"stop_signals\[1\]: 'SIGKILL' is not one of"):
        parse_stop_signals(["SIGTERM", "SIGKILL"])  # cannot be caught
    with pytest.raises(ValueError, match=r"stop_signals\[0\]: 'TERM'"):
        parse_stop_signals(["TERM"])
    with pytest.raises(ValueError, match="must be a list of signal names"):
        parse_stop_signals("SIGTERM")


@pytest.fixture
def recorded_usr1():
    """A SIGUSR1 handler that records its calls, standing for whatever handler was there before."""
    calls: list[int] = []

    def record(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGUSR1, record)
    yield record, calls
    signal.signal(signal.SIGUSR1, previous)


def test_the_first_signal_is_recorded_and_a_repeat_ignored(recorded_usr1):
    record, calls = recorded_usr1
    with StopSignals(["SIGUSR1"]) as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1 and calls == []
        # The same request again (a scheduler's signal reaching a worker directly and through torchrun).
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1 and calls == []
    assert signal.getsignal(signal.SIGUSR1) is record and calls == []
    os.kill(os.getpid(), signal.SIGUSR1)
    assert calls == [signal.SIGUSR1]


def test_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(["SIGINT", "SIGUSR1"]) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)  # any first signal
        assert stop.received == signal.SIGUSR1
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # Python's handler, put back
        assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_nothing_is_installed(recorded_usr1):
    record, _ = recorded_usr1
    seen = []

    def enter():
        with StopSignals(["SIGUSR1"]):
            seen.append(signal.getsignal(signal.SIGUSR1))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [record]
