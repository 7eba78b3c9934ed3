"""``hardware.device`` resolved to a torch.device: an absent device is an error, never a silent
fallback."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


class DeviceUnavailableError(RuntimeError):
    pass


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; 'cuda', 'cuda:1', 'mps', 'cpu' must exist."""
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise ValueError(
            f"hardware.device={name!r} is not a device; choose one of {', '.join(DEVICE_CHOICES)} "
            "(e.g. hardware=cpu)"
        )
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "hardware=cuda was asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
            "Run on a machine with an NVIDIA GPU, or choose hardware=cpu or hardware=auto."
        )
    if base == "mps" and not _mps_available():
        raise DeviceUnavailableError(
            "hardware=mps was asked for, but torch.backends.mps is not available "
            "(it needs Apple silicon and macOS 12.3+). Choose hardware=cpu or hardware=auto."
        )
    return torch.device(name)
