"""What every model that reads the training images shares: the images flattened [N, n] on the
compute device, the chunk size (``chunk_size`` or the memory budget), and the kernel tuner."""

from __future__ import annotations

import torch

from collections.abc import Callable

from locality.models.autotune import KernelTuner, shape_key
from locality.models.base import Denoiser
from locality.models.memory import check_chunk_size, chunk_rows


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
        self.chunk_size = check_chunk_size(chunk_size)
        self.tuner = tuner if tuner is not None else KernelTuner(self.device)

    def image_norms(self) -> tuple[torch.Tensor, float]:
        """(‖y_k‖² [N] float64, max_k ‖y_k‖) of the training images."""
        sq = [ys.double().square().sum(1) for ys in self.images.split(8192)]
        sq_norms = torch.cat(sq) if sq else torch.zeros(0, dtype=torch.float64, device=self.device)
        return sq_norms, float(sq_norms.max().sqrt()) if len(sq_norms) else 0.0

    def measured_kernel(self, kind: str, runs: dict[str, Callable[[torch.Tensor, int], object]],
                        x64: torch.Tensor) -> str:
        """The tuner's choice among ``runs`` (name -> run(samples [B', n], first images)) for
        samples x64 [B, n], remembered under this model's name, ``kind``, candidates and shapes."""
        num, n = self.images.shape
        key = f"{self.name}|{kind}|{'+'.join(runs)}|{shape_key(n, x64.shape[0], num, self.chunk_size)}"

        def probe(name: str):
            return lambda count, samples: (lambda: runs[name](x64[:samples], count))

        return self.tuner.choose(key, {name: probe(name) for name in runs}, num, x64.shape[0]).kernel

    def chunks(self, bytes_per_image: int, count: int | None = None, cpu_cap: int | None = None):
        """Yield (start, slice [K, n]) of the first ``count`` images (default all). K =
        ``chunk_size`` if given, else the memory budget (``cpu_cap`` on the CPU) divided by
        the working set one image adds."""
        num = self.images.shape[0] if count is None else count
        caps = {} if cpu_cap is None else {"cpu_cap": cpu_cap}
        size = chunk_rows(bytes_per_image, self.device, self.chunk_size, total=num, **caps)
        for start in range(0, num, size):
            yield start, self.images[start : min(start + size, num)]
