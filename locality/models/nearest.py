"""nearest_dataset: the training image nearest to x_t (L2, x_t unscaled as in the reference);
ties take the lowest index. Exactly the float64 brute force's winner, with its kernel measured.

Kernels (``last_kernel``):

* ``expanded``: scores ‖y_k‖² - 2x·y_k (‖x‖² is the same for every k) from one GEMM per chunk
  in the images' dtype, a rigorous bound on their rounding, then the direct float64 distances
  of the few images within twice that bound of the best score: rounding cannot change the
  winner, and a tie is settled by the direct distances and the lowest index;
* ``direct``: float64 differences [B, K, n] for every image (memory-bound).
"""

from __future__ import annotations


import torch

from locality.models.base import register_model
from locality.models.dataset import DatasetDenoiser, flatten
from locality.statistics import DataStatistics

CPU_CHUNK_CAP_BYTES = 4 << 20  # like optimal's: a chunk's images are read from cache by its products


@register_model("nearest_dataset")
class NearestDatasetDenoiser(DatasetDenoiser):
    """See the module docstring."""

    name = "nearest_dataset"

    def __init__(self, images: torch.Tensor, **kw) -> None:
        super().__init__(images, **kw)
        self.sq_norms, self.y_norm_max = self.image_norms()
        self.last_kernel: str | None = None

    @classmethod
    def from_data(cls, images: torch.Tensor, stats: DataStatistics, **params):
        return cls(images, **params)

    def expanded(self, x64: torch.Tensor, count: int) -> torch.Tensor:
        """Indices [B] of the nearest of the first ``count`` images (module docstring)."""
        batch, n = x64.shape
        dtype = self.images.dtype
        x = x64.to(dtype)
        scores = torch.empty(batch, count, dtype=torch.float64, device=self.device)
        for start, y in self.chunks((n + batch) * self.images.element_size(), count, CPU_CHUNK_CAP_BYTES):
            scores[:, start : start + len(y)] = self.sq_norms[start : start + len(y)] - 2.0 * (x @ y.T).double()
        # |fl(x·y) - x·y| ≤ (n+1)·u·‖x‖·‖y‖ (n products and sums, plus rounding x to dtype); the
        # float64 ‖y‖² and the subtraction add far less than the factor 2 of headroom below
        bound = 2.0 * (n + 1) * torch.finfo(dtype).eps * x64.norm(dim=1) * self.y_norm_max  # [B]
        near = scores <= (scores.amin(dim=1) + 2.0 * bound).unsqueeze(1)
        best = torch.empty(batch, dtype=torch.long, device=self.device)
        for b in range(batch):
            idx = near[b].nonzero().squeeze(1)  # ascending: argmin's first minimum is the lowest index
            dist = (x64[b] - self.images[idx].double()).square().sum(dim=1)
            best[b] = idx[dist.argmin()]
        return best

    def direct(self, x64: torch.Tensor, count: int) -> torch.Tensor:
        """Indices [B] of the nearest of the first ``count`` images from float64 differences."""
        batch, n = x64.shape
        best = torch.full((batch,), float("inf"), dtype=torch.float64, device=self.device)
        best_idx = torch.zeros(batch, dtype=torch.long, device=self.device)
        for start, ys in self.chunks(batch * n * 8, count):
            dist = (x64.unsqueeze(1) - ys.double().unsqueeze(0)).square().sum(-1)  # [B, K]
            d, idx = dist.min(dim=1)  # first minimum within the chunk
            better = d < best  # strict: earlier chunks win ties
            best = torch.where(better, d, best)
            best_idx = torch.where(better, idx + start, best_idx)
        return best_idx

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        x64 = flatten(x_t).to(self.device, torch.float64)
        kernels = {"expanded": self.expanded, "direct": self.direct}
        self.last_kernel = self.measured_kernel("exact", kernels, x64)
        best = kernels[self.last_kernel](x64, self.images.shape[0])
        return self.images[best].to(x_t.dtype).reshape(x_t.shape)
