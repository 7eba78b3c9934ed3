"""Memory budgets for the dataset-streaming denoisers: chunk sizes derive from the free memory
of the compute device, so a run never allocates more than a fixed share of what is available.

* CUDA: ``torch.cuda.mem_get_info`` (free bytes on the device);
* Linux CPU: ``MemAvailable`` of /proc/meminfo (psutil is not a dependency);
* anything else (MPS, other OSes): a fixed conservative budget.
"""

from __future__ import annotations

import math

import torch

FALLBACK_BUDGET_BYTES = 1 << 30  # 1 GiB where the free memory cannot be read
MEMORY_FRACTION = 0.25  # share of the free memory one chunk's working set may take
CPU_CHUNK_CAP_BYTES = 24 << 20  # CPU: chunks of a few hundred images ran fastest (cache-resident)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: torch.device | str) -> int:
    """Free bytes on ``device`` (CUDA: mem_get_info; CPU: MemAvailable; else a fixed budget)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        avail = _meminfo_available()
        if avail is not None:
            return avail
    return FALLBACK_BUDGET_BYTES


def memory_budget(device: torch.device | str, fraction: float = MEMORY_FRACTION,
                  cpu_cap: int = CPU_CHUNK_CAP_BYTES) -> int:
    """Bytes one chunk's working set may use: ``fraction`` of the free memory; on the CPU at
    most ``cpu_cap`` (the kernels are cache- and bandwidth-bound there)."""
    device = torch.device(device)
    budget = int(available_memory(device) * fraction)
    if device.type != "cuda":
        budget = min(budget, cpu_cap)
    return max(budget, 1 << 20)


def check_chunk_size(chunk_size: int | None) -> int | None:
    """``model.chunk_size`` (images per streamed chunk) checked once, for every model: a positive
    integer, or None to size chunks from free memory."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"model.chunk_size must be a positive integer or null, got {chunk_size!r}")
    return chunk_size


def chunk_rows(bytes_per_row: int, device: torch.device | str, override: int | None = None,
               total: int | None = None, fraction: float = MEMORY_FRACTION,
               cpu_cap: int = CPU_CHUNK_CAP_BYTES) -> int:
    """Dataset images per chunk: ``override`` (model.chunk_size) if given, else the memory
    budget (``cpu_cap`` on the CPU) divided by the working-set bytes one image adds; at least
    1, at most ``total``."""
    if check_chunk_size(override) is not None:
        rows = override
    else:
        rows = memory_budget(device, fraction, cpu_cap) // max(1, int(bytes_per_row))
    rows = max(1, rows)
    return min(rows, total) if total else rows


class Workspace:
    """Named flat buffers reused from chunk to chunk: a kernel's large per-chunk temporaries
    (logits, products) without a fresh allocation per chunk, which the CPU pays in page faults
    (PyTorch's CPU allocator returns large blocks to the OS). A buffer grows when a larger
    shape is asked for; a smaller one (the last chunk) is a view of its start."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` in buffer ``name`` (its contents
        are overwritten by the next take of the same name)."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buffer[:numel].view(shape)
