"""The float GEMM kernels of pca_locality, ``float32`` and ``float64``: the expanded distance as
one GEMM per chunk in the kernel's dtype.

With centred values x' = x - aμ, y' = y - μ (the distance is unchanged),
(x' - a y')² = x'² - 2a x'y' + a² y'². The x'² term is the same for every k: it cancels in the
softmax and is dropped, which also removes the largest term from the rounding budget. The
y'² @ M term does not depend on the sample: one GEMM per chunk serves all B samples. Cost:
(B + 1)·K·n² multiply-adds per chunk. ``float64`` is always within the tolerance (the dense
step of ``model.dtype=float64``, the exactness oracle); ``float32`` where
:func:`dense_logit_error_estimate` allows it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from locality.models.memory import Workspace, chunk_rows
from locality.models.pca_locality.kernel import Kernel, Precision, Step
from locality.models.pca_locality.plan import MaskPlan
from locality.models.pca_locality.selection import KERNEL_ROUNDING_FACTOR, LOGIT_TOLERANCE
from locality.models.softmax import softmax_average

if TYPE_CHECKING:
    from locality.models.native import NativeSoftmax


def dense_logit_error_estimate(plan: MaskPlan, abar: float, scale: float, x_abs_max: float,
                               y_abs_max: float, dtype: torch.dtype) -> float:
    """Rounding estimate of the dense (expanded, centred) logits in ``dtype``, errors of J
    terms adding like a random walk:  u · s · (2a|x'|max|y'|max + a²|y'|max²) · max_m Σ_n |M[n, m]| / √J.

    Calibrated on the full Fashion-MNIST (θ = 0.005, every DDIM step forced to float32): the
    estimate exceeds the measured largest output deviation from float64 by 2.4x to 5.4x."""
    unit = torch.finfo(dtype).eps
    a = math.sqrt(abar)
    term = 2 * a * x_abs_max * y_abs_max + abar * y_abs_max**2
    return unit * scale * term * plan.max_column_abs_sum / math.sqrt(max(plan.max_column_nnz, 1))


def float_precision(name: str, step: Step, offset: torch.Tensor, y_abs_max: float,
                    dtype: torch.dtype) -> Precision | None:
    """Precision(dtype) where the expanded logits of kernel ``name``, centred on ``offset`` [n]
    (|y - offset| ≤ ``y_abs_max``), stay within the tolerance: the rounding estimate times the
    kernel's rounding factor. None otherwise."""
    x_abs_max = float((step.x64 - step.a * offset).abs().max())
    estimate = dense_logit_error_estimate(step.plan, step.abar, step.scale, x_abs_max, y_abs_max, dtype)
    return Precision(dtype) if estimate * KERNEL_ROUNDING_FACTOR[name] <= LOGIT_TOLERANCE else None


def dense_logits(x_c: torch.Tensor, y_c: torch.Tensor, mask_t: torch.Tensor, a: float,
                 scale: float, workspace: Workspace | None = None) -> torch.Tensor:
    """Expanded-form logits [n_out, B, K] (up to a per-(m, b) constant), pixel-major, for
    centred samples x_c [B, n], centred images y_c [n, K] (pixel-major) and Mᵀ [n_out, n_in],
    all in one dtype. Pixel-major keeps the softmax's reductions over k contiguous. With a
    ``workspace`` the two [n, B·K] temporaries reuse its buffers (the logits are valid until
    the next call)."""
    batch, n = x_c.shape
    k = y_c.shape[1]
    ws = workspace or Workspace(x_c.device)
    y2m = mask_t @ y_c.square()  # [n, K]: sample-independent
    cross = torch.mul(x_c.T.unsqueeze(2), y_c.unsqueeze(1), out=ws.take("cross", (n, batch, k), x_c.dtype))
    logits = torch.mm(mask_t, cross.view(n, batch * k), out=ws.take("logits", (mask_t.shape[0], batch * k), x_c.dtype))
    logits = logits.view(-1, batch, k)
    logits.mul_(2.0 * a * scale)
    logits.sub_(y2m.mul_(a * a * scale).unsqueeze(1))
    return logits


def float_step(images: torch.Tensor, mean64: torch.Tensor, plan: MaskPlan, x64: torch.Tensor, a: float,
               scale: float, dtype: torch.dtype, chunk_size: int | None, native: NativeSoftmax | None = None
               ) -> torch.Tensor:
    """One dense step with one GEMM in ``dtype`` (float32 or float64) per chunk
    (:func:`dense_logits`) over the images [N, n], centred on ``mean64`` [n]; the softmax
    through ``native`` where given (float32)."""
    batch, n = x64.shape
    mean = mean64.to(dtype).unsqueeze(1)
    x_c = (x64 - a * mean64).to(dtype)
    mask_t = plan.dense_mask(dtype)
    item = torch.tensor([], dtype=dtype).element_size()
    # bytes per image: cross and logits [n, B]; centred y, y², y²@M, values [n]
    size = chunk_rows(item * (2 * batch + 6) * n, x64.device, chunk_size, total=images.shape[0])

    def chunks():
        workspace = Workspace(x64.device)
        for start in range(0, images.shape[0], size):
            y_c = images[start : start + size].T.to(dtype).contiguous() - mean  # [n, K] pixel-major
            yield dense_logits(x_c, y_c, mask_t, a, scale, workspace), y_c

    return softmax_average(chunks(), native) + mean64  # the average of centred values, shifted back


class FloatGemmKernel(Kernel):
    """``float32`` or ``float64``: :func:`float_step` over the model's images (the image side is
    the images themselves: no preparation)."""

    def __init__(self, images, dtype: torch.dtype) -> None:
        super().__init__(images)
        self.dtype = dtype
        self.name = "float32" if dtype == torch.float32 else "float64"

    def unavailable(self, plan: MaskPlan, forced: bool) -> str | None:
        return None

    def precision(self, step: Step, dtypes: tuple[torch.dtype, ...]) -> Precision | None:
        if self.dtype not in dtypes:
            return None
        return float_precision(self.name, step, self.images.mean64, self.images.y_abs_max, self.dtype)

    def run(self, side: torch.Tensor, step: Step, precision: Precision, chunk_size: int | None) -> torch.Tensor:
        return float_step(side, self.images.mean64, step.plan, step.x64, step.a, step.scale, self.dtype, chunk_size,
                          self.images.native)
