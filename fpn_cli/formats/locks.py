"""Who may write an output folder, and with which settings.

    OUT/.lock                   a whole run holds it exclusively, each shard shared (flock)
    OUT/.shards/lock-I-of-N     shard I of N holds it exclusively
    OUT/.fpn-extract.json       the settings the features were made with, checked on resume
    OUT/.overwrite-unfinished   (-I-of-N for a shard) an --overwrite run that has not finished

``fcntl`` is POSIX-only: it is imported where a lock is taken, so the package imports anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

from fpn_cli.errors import UsageError, describe_os_error
from fpn_cli.layout import (
    HOST,
    LOCK_FILE,
    OVERWRITE_MARKER,
    REPORT_FILE,
    SETTINGS_FILE,
    SHARDS_DIR,
    atomic_write_json,
    create_folder,
)

# Sections of the settings that only some runs use (``roi``: how rois.npy is pooled, recorded by
# runs with --boxes; ``weights_sha256``, absent from folders made before it). A run without one
# neither checks nor drops it; a run with one must match it.
OPTIONAL_SETTINGS = ("roi", "weights_sha256")


@contextlib.contextmanager
def lock_folder(root: Path, shard: tuple[int, int] | None) -> Iterator[None]:
    """Makes ``root`` if need be and holds it against other runs: a whole run locks it
    exclusively; a shard locks it shared (other shards may run beside it) and its own shard
    exclusively. A run that finds it taken is refused with a :class:`UsageError`; locks end with
    the process."""
    create_folder(root)
    files = []
    try:
        files.append(_take(root, root / LOCK_FILE, exclusive=shard is None))
        if shard is not None:
            try:
                (root / SHARDS_DIR).mkdir(exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create {root / SHARDS_DIR}: {e.strerror or e}") from None
            files.append(_take(root, root / SHARDS_DIR / f"lock-{shard[0]}-of-{shard[1]}", True))
        yield
    finally:
        for f in files:
            f.close()


def _take(root: Path, path: Path, exclusive: bool) -> IO[str]:
    import fcntl  # POSIX only

    try:
        f = open(path, "a+")
    except OSError as e:
        raise UsageError(f"output folder {root} is not writable: {describe_os_error(e)}") from None
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UsageError(
            f"another fpn-extract run ({holder}) is writing to {root}; "
            "wait for it to finish, or choose another --out"
        ) from None
    if exclusive:  # who holds it, for the message of a run refused; a full disk refuses the run
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {HOST}")
            f.flush()
        except OSError as e:
            with contextlib.suppress(OSError):  # its flush fails again; the file is closed all the same
                f.close()
            raise UsageError(f"cannot write the lock file {path}: {e.strerror or e}") from None
    return f


def record_settings(
    root: Path,
    settings: Mapping[str, object],
    overwrite: bool,
    shard: tuple[int, int] | None,
    holds_features: Callable[[Path], bool] = lambda root: False,
) -> dict | None:
    """Records ``settings`` (under :func:`lock_folder`); features made with other settings are a
    usage error unless ``overwrite`` (then they are recomputed). An ``overwrite`` run leaves a
    marker until :func:`finish_overwrite`: until then the folder may mix old and new features, so
    a run without ``overwrite`` is refused. ``holds_features(root)``: whether a format's files are
    there (the registry asks every format). Returns the settings recorded before (None if none)."""
    pending = sorted(p.name for p in root.glob(OVERWRITE_MARKER + "*"))
    recorded = read_settings(root)
    unknown = recorded is None and _holds_features(root, holds_features)
    check_settings(root, recorded, settings, pending, overwrite, unknown)
    try:
        if overwrite:
            _overwrite_marker(root, shard).touch()
        atomic_write_json(root / SETTINGS_FILE, settings_to_record(recorded, settings))
    except OSError as e:
        raise UsageError(f"output folder {root} is not writable: {describe_os_error(e)}") from None
    return recorded


def check_settings(
    root: object,
    recorded: Mapping[str, object] | None,
    settings: Mapping[str, object],
    pending: list[str],
    overwrite: bool,
    unknown: bool = False,
) -> None:
    """The rule of :func:`record_settings`, for any folder (a URL too): ``pending`` are the
    unfinished-overwrite markers found, ``recorded`` the settings found (None if none);
    ``unknown``: the folder holds features but no readable settings, so nothing says what they
    were made with (a lost or damaged settings file), and none may be kept."""
    if unknown and not overwrite:
        raise UsageError(
            f"{root} holds features but no readable record of their settings ({SETTINGS_FILE}), so "
            "they cannot be checked against this run's: pass --overwrite to recompute them, or "
            "choose another --out"
        )
    if pending and not overwrite:
        raise UsageError(
            f"{root} holds an unfinished --overwrite run ({', '.join(pending)}), so old and new "
            "features may be mixed: run it again with --overwrite to finish it"
        )
    settings = json.loads(json.dumps(dict(settings)))  # as recorded: a tuple reads back as a list
    differing = _differing(recorded or {}, settings)
    if recorded is not None and differing and not overwrite:
        diff = ", ".join(f"{k} {_shown(k, recorded)} -> {_shown(k, settings)}" for k in differing)
        raise UsageError(
            f"{root} holds features made with other settings ({diff}); "
            "pass --overwrite to recompute them, or choose another --out"
        )


def _holds_features(root: Path, holds: Callable[[Path], bool]) -> bool:
    """Whether ``root`` holds anything a run wrote: a report, or what a format says is its own."""
    return (root / REPORT_FILE).exists() or holds(root)


def settings_to_record(recorded: Mapping[str, object] | None, settings: Mapping[str, object]) -> dict:
    """What the folder's settings file holds after a run with ``settings``: they, and the
    optional sections recorded before that this run does not use (their files are still there)."""
    kept = {k: v for k, v in (recorded or {}).items() if k in OPTIONAL_SETTINGS and k not in settings}
    return {**dict(settings), **kept}


def finish_overwrite(root: Path, shard: tuple[int, int] | None) -> None:
    """Marks this run (or shard) as finished: an ``overwrite`` is complete."""
    _overwrite_marker(root, shard).unlink(missing_ok=True)


def _overwrite_marker(root: Path, shard: tuple[int, int] | None) -> Path:
    return root / overwrite_marker_name(shard)


def overwrite_marker_name(shard: tuple[int, int] | None) -> str:
    suffix = f"-{shard[0]}-of-{shard[1]}" if shard else ""
    return f"{OVERWRITE_MARKER}{suffix}"


def _shown(key: str, settings: Mapping[str, object]) -> str:
    """A setting's value for a message; the npy layout's record leaves ``format`` out."""
    value = settings.get(key, "npy" if key == "format" else None)
    return "(none)" if value is None else repr(value)


def _differing(recorded: Mapping[str, object], settings: Mapping[str, object]) -> list[str]:
    """Settings that differ; an optional section counts only where both record it."""
    return [
        k
        for k in sorted(set(recorded) | set(settings))
        if recorded.get(k) != settings.get(k)
        and not (k in OPTIONAL_SETTINGS and (k not in recorded or k not in settings))
    ]


def read_settings(root: Path) -> dict | None:
    """The settings recorded in ``root``; None where there are none (or they cannot be read)."""
    try:
        recorded = json.loads((root / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None
