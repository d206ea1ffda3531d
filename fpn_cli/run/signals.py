"""How Ctrl-C (SIGINT) and SIGTERM stop fpn-extract, and the exit status they leave.

The first signal raises ``KeyboardInterrupt`` (:class:`~fpn_cli.errors.Interrupted` for SIGTERM)
in the main thread, and the run winds down: queued writes finish, report.json is written. Later
signals are ignored: a burst of Ctrl-C would otherwise break into that cleanup (or into the
interpreter's exit) and end it with a traceback. Light on purpose (no torch): the console script
installs it before its heavy imports, so a Ctrl-C during start-up is handled too.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from fpn_cli.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # SIGTERM: preemption (Slurm, Kubernetes)


def interrupted_status(interrupt: KeyboardInterrupt) -> int:
    """The exit status of a run that ``interrupt`` stopped: 128 + the signal's number, as a shell
    reports a process stopped by it: 130 for Ctrl-C (SIGINT), 143 for SIGTERM. The one place that
    decides it, for a run and for a start-up that was interrupted before any run began.

    >>> interrupted_status(KeyboardInterrupt()), interrupted_status(Interrupted(signal.SIGTERM))
    (130, 143)
    """
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


class StopOnFirstSignal:
    """A signal handler: the first SIGINT or SIGTERM stops the command, later ones are ignored."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.fired:
            return  # already stopping: the cleanup must finish
        self.fired = True
        raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)


def install() -> StopOnFirstSignal:
    """Installs a fresh :class:`StopOnFirstSignal` for SIGINT and SIGTERM (main thread only)."""
    handler = StopOnFirstSignal()
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    return handler


def ignore() -> None:
    """From now on both signals are ignored: the command's work is over and only the interpreter's
    exit remains (joining threads, atexit), which a Ctrl-C would end with a traceback."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def stop_on_first_signal() -> Iterator[None]:
    """For the length of a command: the handler above, unless one is in place already (the console
    script installs it before start-up); previous handlers come back afterwards. Outside the main
    thread, where Python allows no handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread() or isinstance(
        signal.getsignal(signal.SIGINT), StopOnFirstSignal
    ):
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    install()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
