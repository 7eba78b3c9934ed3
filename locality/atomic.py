"""Atomic file writes: a temporary file in the target folder, then ``os.replace``, so a crash or
a full disk never leaves a truncated file under the final name (caches, checkpoints, outputs,
status files). Files get the permissions an ordinary ``open()`` would give (0666 & ~umask), and
a write that fails for lack of space is raised as :class:`DiskFullError`, saying so."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

_UMASK_LOCK = threading.Lock()


class DiskFullError(OSError):
    """An output could not be written because its filesystem is full (or over quota)."""


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


class _RecordingFile:
    """A file object that remembers the OSError of a failed write: torch.save's zip writer turns
    ENOSPC into ``RuntimeError: unexpected pos …``, which alone does not say the disk is full."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _no_space(path: Path, cause: OSError) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free} bytes free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(cause.errno, f"no space left on the device of {path.parent} ({free}) while writing "
                                      f"{path.name}; nothing was left under that name: free some space or write "
                                      f"to another disk")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    On any error the temporary file is removed (which also gives back the space it took);
    running out of space raises :class:`DiskFullError`, whatever error the writer raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    recorder = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are shared like any other file
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingFile(f)
            write(recorder)
            recorder.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = exc if isinstance(exc, OSError) else (recorder.error if recorder else None)
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, DiskFullError):
            raise _no_space(path, cause) from exc
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """``data`` as indented, key-sorted JSON at ``path``, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True).encode()
    return atomic_write(path, lambda f: f.write(text))


def write_cache_or_warn(save: Callable[[], Any], path: str | os.PathLike, what: str, log: logging.Logger,
                        hint: str) -> bool:
    """Run ``save()``, the atomic write of the cache file ``path``; any error (read-only or
    blocked folder, full disk, a writer's own RuntimeError) becomes a warning on ``log`` naming
    ``what``, the error and ``hint`` (how to fix it), not a failed run: what a cache holds is
    computed already, so not keeping it loses nothing. Returns whether the file was written."""
    try:
        save()
    except Exception as e:  # noqa: BLE001 - caches are optional whatever the failure
        log.warning("could not write the %s %s (%s: %s); continuing without it (%s)", what, path,
                    type(e).__name__, e, hint)
        return False
    return True
