"""Atomic file writes: a temporary file in the target folder, then ``os.replace``, so a crash
never leaves a truncated file under the final name (caches, checkpoints, status files)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
    """Run ``save()``, the atomic write of the cache file ``path``; an OSError (read-only or
    blocked folder, full disk) becomes a warning on ``log`` naming ``what``, the error and
    ``hint`` (how to fix it), not a failed run: what a cache holds is computed already, so
    not keeping it loses nothing. Returns whether the file was written."""
    try:
        save()
    except OSError as e:
        log.warning("could not write the %s %s (%s: %s); continuing without it (%s)", what, path,
                    type(e).__name__, e, hint)
        return False
    return True
