"""Refusing a request too large for the memory of its device before allocating it, in one line
that says how many bytes it needs and how many are available (instead of an allocation failure
deep inside torch, or the OOM killer)."""

from __future__ import annotations

import torch


class InsufficientMemoryError(ValueError):
    """A request needs more memory than its device has available."""


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def require_memory(needed: int, what: str, hint: str, device: torch.device | str = "cpu") -> None:
    """Raise :class:`InsufficientMemoryError` when ``needed`` bytes exceed what ``device`` has
    available; no check where that cannot be read (MPS, CPUs without /proc/meminfo)."""
    from locality.models.memory import FALLBACK_BUDGET_BYTES, available_memory

    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return
    available = available_memory(device)
    if device.type == "cpu" and available == FALLBACK_BUDGET_BYTES:  # MemAvailable unreadable: unknown
        return
    if needed > available:
        raise InsufficientMemoryError(
            f"{what} needs about {_gib(needed)} ({needed} bytes) of memory, but {_gib(available)} "
            f"({available} bytes) are available on {device.type}; {hint}")
