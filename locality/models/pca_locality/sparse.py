"""The ``sparse`` kernel of pca_locality: direct differences through a sparse mask.

When every output's mask has at most J ≪ n ones (the low-noise steps: at θ = 0.005 on
Fashion-MNIST t = 0 has J = 23 of n = 784), the logits are Mᵀ (sparse CSR) @ (x - a y)²:
nnz(M)·B·K operations, no dense GEMM. It runs in float64 and uses the direct difference,
because there 1 - ᾱ is 1e-4, so a rounding error e in a distance becomes e / 2e-4 in the
logit; the expanded form would need float64 or many int8 digits. Whether it beats the dense
kernels at such a step is measured (:mod:`.selection`): on a CPU it usually does, on a GPU the
GEMMs can win even at low density.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from locality.models.memory import chunk_rows
from locality.models.pca_locality.kernel import Kernel, Precision, Step
from locality.models.pca_locality.plan import MaskPlan
from locality.models.softmax import OnlineSoftmaxAverage

if TYPE_CHECKING:
    from locality.models.native import NativeSoftmax


def sparse_logits(x: torch.Tensor, y: torch.Tensor, sparse_t: torch.Tensor, a: float,
                  scale: float) -> torch.Tensor:
    """Direct-difference logits [n_out, B, K] from the mask's ones only: x [B, n], y [n, K]
    pixel-major (float64 expected), ``sparse_t`` Mᵀ in CSR from :func:`plan_mask`. One sparse
    product Mᵀ @ (x - a y)² [n_in, B·K]: nnz(M)·B·K multiply-adds."""
    batch, n = x.shape
    k = y.shape[1]
    diff = torch.sub(x.T.contiguous().unsqueeze(2), y.unsqueeze(1), alpha=a).square_()  # [n_in, B, K]
    logits = sparse_t @ diff.view(n, batch * k)
    return logits.view(-1, batch, k).mul_(-scale)


def sparse_step(images: torch.Tensor, plan: MaskPlan, x64: torch.Tensor, a: float, scale: float,
                chunk_size: int | None, native: NativeSoftmax | None = None) -> torch.Tensor:
    """One low-noise step from the mask's ones only, in float64 (:func:`sparse_logits`), over
    the images [N, n]; with ``native``, logits and softmax fused in C (no [n, B, K] temporaries)."""
    batch, n = x64.shape
    # bytes per image: diff and logits [n, B], the pixel-major copy and the softmax's [n, 2], float64
    size = chunk_rows(8 * (2 * batch + 3) * n, x64.device, chunk_size, total=images.shape[0])
    acc = OnlineSoftmaxAverage(native=native if x64.device.type == "cpu" else None)
    for start in range(0, images.shape[0], size):
        y = images[start : start + size].T.to(torch.float64).contiguous()  # [n, K] pixel-major
        acc.update_sparse(x64, y, plan.sparse_t, a, scale, lambda: sparse_logits(x64, y, plan.sparse_t, a, scale))
    return acc.result()


class SparseKernel(Kernel):
    """``sparse``: :func:`sparse_step`, float64 throughout (always within the tolerance)."""

    name = "sparse"

    def unavailable(self, plan: MaskPlan, forced: bool) -> str | None:
        if plan.sparse_t is None:
            return "the mask has a column with more than n/16 ones (or is not binary)"
        return None

    def precision(self, step: Step, dtypes: tuple[torch.dtype, ...]) -> Precision | None:
        return Precision(torch.float64)

    def run(self, side: torch.Tensor, step: Step, precision: Precision, chunk_size: int | None) -> torch.Tensor:
        return sparse_step(side, step.plan, step.x64, step.a, step.scale, chunk_size, self.images.native)
