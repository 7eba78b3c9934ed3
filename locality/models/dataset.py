"""What every model that reads the training images shares: the images flattened [N, n] on the
compute device, the chunk size (``chunk_size`` or the memory budget), and the kernel tuner."""

from __future__ import annotations

import torch

from locality.models.autotune import KernelTuner
from locality.models.base import Denoiser
from locality.models.memory import chunk_rows


def flatten(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (or any [B, ...]) -> [B, n]."""
    return images.reshape(images.shape[0], -1)


class DatasetDenoiser(Denoiser):
    """Holds the training images flattened [N, n] on the compute device in ``dtype``, the
    ``chunk_size`` override and the ``tuner`` that measures its kernels (None: one that keeps
    its decisions for the life of the model)."""

    tunes_kernels = True

    def __init__(self, images: torch.Tensor, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64, chunk_size: int | None = None,
                 tuner: KernelTuner | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.images = flatten(images).to(self.device, self.dtype)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or null, got {chunk_size}")
        self.chunk_size = chunk_size
        self.tuner = tuner if tuner is not None else KernelTuner(self.device)

    def chunks(self, bytes_per_image: int, count: int | None = None, cpu_cap: int | None = None):
        """Yield (start, slice [K, n]) of the first ``count`` images (default all). K =
        ``chunk_size`` if given, else the memory budget (``cpu_cap`` on the CPU) divided by
        the working set one image adds."""
        num = self.images.shape[0] if count is None else count
        caps = {} if cpu_cap is None else {"cpu_cap": cpu_cap}
        size = chunk_rows(bytes_per_image, self.device, self.chunk_size, total=num, **caps)
        for start in range(0, num, size):
            yield start, self.images[start : min(start + size, num)]
