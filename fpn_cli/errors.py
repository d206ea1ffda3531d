"""The project's exceptions: one-line messages that the CLI turns into exit statuses."""

from __future__ import annotations


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
