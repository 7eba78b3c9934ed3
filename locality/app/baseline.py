"""Where a dataset's baseline UNet checkpoint lives, how to get one, and what the config values
``baseline.checkpoint`` (``auto``, a path, ``null``) and ``model.checkpoint`` mean: a path or a
disabled comparison, never a silently dropped request."""

from __future__ import annotations

import os
from pathlib import Path

#: Where a dataset's published baseline lives, relative to ``paths.model_dir``.
BASELINE_RELATIVE = "baseline_unet/{dataset}/ckpt_epoch_200.pt"


def default_checkpoint_path(model_dir: str | os.PathLike, dataset: str) -> Path:
    """``<model_dir>/baseline_unet/<dataset>/ckpt_epoch_200.pt`` (the published checkpoint's place)."""
    return Path(model_dir) / BASELINE_RELATIVE.format(dataset=dataset)


def how_to_get_checkpoint(dataset: str, data_dir: str | os.PathLike | None = None) -> str:
    """The commands that put a baseline checkpoint in place, for error messages and notices."""
    root = f" --data-root {data_dir}" if data_dir is not None else ""
    return (
        f"download the published one with `python scripts/download_baselines.py --datasets {dataset}{root}`, "
        f"or train one with `python -m locality.train dataset={dataset}`"
    )


def require_checkpoint(path: str | os.PathLike, dataset: str, data_dir: str | os.PathLike | None = None,
                       key: str = "model.checkpoint") -> Path:
    """``path`` if it is a file, else FileNotFoundError saying where it looked and how to get one."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"no UNet checkpoint at {p} ({key}); {how_to_get_checkpoint(dataset, data_dir)}, "
            f"or point {key}=/path/to/checkpoint.pt at an existing file"
        )
    return p


def resolve_baseline_checkpoint(
    value: str | os.PathLike | None, default_path: str | os.PathLike, dataset: str,
    data_dir: str | os.PathLike | None = None,
) -> tuple[Path | None, str]:
    """``baseline.checkpoint`` -> (checkpoint path or None, a notice for the log).

    ``None`` / ``"null"`` / ``"none"`` / ``False``: comparison disabled. ``"auto"``: ``default_path``
    when that file exists, else disabled with a notice. Anything else is a path that must exist
    (FileNotFoundError otherwise: an explicit request is never silently dropped).
    """
    if value is None or value is False or str(value).strip().lower() in ("", "null", "none", "false", "off"):
        return None, "comparison with the UNet disabled (baseline.checkpoint=null)"
    if str(value).strip().lower() == "auto":
        p = Path(default_path).expanduser()
        if p.is_file():
            return p, f"comparing with the baseline UNet {p} (baseline.checkpoint=auto)"
        return None, (
            f"no baseline UNet checkpoint at {p}, so no comparison with the UNet in this run; to compare, "
            f"{how_to_get_checkpoint(dataset, data_dir)}, or set baseline.checkpoint=/path/to/ckpt.pt "
            f"(baseline.checkpoint=null silences this notice)"
        )
    p = require_checkpoint(value, dataset, data_dir, key="baseline.checkpoint")
    return p, f"comparing with the baseline UNet {p}"
