"""The project's exceptions: one-line messages that the CLI turns into exit statuses."""

from __future__ import annotations

import os
import signal


class FPNError(Exception):
    """Anything fpn-extract reports to the user; the message is one line."""

    exit_code = 1


class UsageError(FPNError):
    """A bad option, input list or environment: nothing was computed (exit status 2)."""

    exit_code = 2


class WeightsError(UsageError):
    """A weight source that cannot be read, downloaded or mapped onto the model."""


class ImageError(FPNError):
    """One input image could not be decoded; the run carries on with the others."""


def describe_os_error(e: OSError) -> str:
    """An OS error as one line, the path and the reason: ``out/report.json: Is a directory``. Of a
    rename, the path is the target (the source is a temporary file of ours)."""
    path = e.filename2 if e.filename2 is not None else e.filename
    reason = e.strerror or str(e) or type(e).__name__
    return f"{os.fsdecode(path)}: {reason}" if path is not None else reason


class Interrupted(KeyboardInterrupt):
    """A signal that stops a run as Ctrl-C does, e.g. SIGTERM (Slurm, Kubernetes preemption).
    ``signum`` says which; a plain ``KeyboardInterrupt`` is Ctrl-C's SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
