"""Fast exact kernels for the masked softmax of pca_locality (SPEC steps 3-4).

For one timestep with mask M [n_in, n_out], a = sqrt(ᾱ), s = 1 / (2(1-ᾱ)τ), a chunk of K
training images Y [K, n] and B noisy samples x [B, n]:

    logit[b, k, m] = -s Σ_n M[n, m] (x[b, n] - a y[k, n])²

Two exact ways to get the logits, chosen per timestep from the mask alone (:func:`plan_mask`):

* ``dense`` (expanded form, one GEMM). With centred values x' = x - aμ, y' = y - μ (the distance
  is unchanged), (x' - a y')² = x'² - 2a x'y' + a² y'². The x'² term is the same for every k:
  it cancels in the softmax and is dropped, which also removes the largest term from the
  rounding budget. The y'² @ M term does not depend on the sample: one GEMM per chunk serves
  all B samples. Cost: (B + 1)·K·n² multiply-adds per chunk.
* ``sparse`` (gathered direct differences). When every output's mask has at most J ≪ n ones
  (the low-noise steps: at θ = 0.005 on Fashion-MNIST t = 0 has J = 23 of n = 784), the
  logit is a sum of J gathered squared differences: B·K·n·J operations, no GEMM. It runs in
  float64 and uses the direct difference, because there 1 - ᾱ is 1e-4, so a rounding error e
  in a distance becomes e / 2e-4 in the logit; the expanded form would cancel catastrophically.

Why not more strategies (measured on the full Fashion-MNIST masks, see the bench report):
the complement M = 1 - C and sparse-CSR products gain nothing on the CPU (C has no empty rows
or columns; torch's CSR @ dense ran 1.6x slower than the dense GEMM already at density 0.12),
and (input-row x output-pixel-group) blocks stay 15-50 % mixed at the dense steps.

Precision of the dense form in float32 (:func:`dense_logit_error_estimate`): a rounding
estimate of the logits from the mask's column sums and the value ranges; above
``LOGIT_TOLERANCE`` the step is computed in float64 instead. float64 is the exactness oracle
and always allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SPARSE_MAX_FRACTION = 1 / 16  # sparse when the longest mask column has ≤ n/16 ones
LOGIT_TOLERANCE = 2e-4  # float32 where the rounding estimate is below this (outputs stay within 1e-4)


@dataclass
class MaskPlan:
    """Per-timestep plan: strategy, the mask in the form that strategy needs, its statistics.

    dense: ``mask`` is Mᵀ [n_out, n_in] on the device in the compute dtype (``source``: M float64
    on the CPU, as built, for a float64 fallback). sparse: ``pairs`` lists, for the j-th one of
    every column that has more than j ones, (outputs, inputs) index tensors on the device.
    """

    strategy: str
    max_column_nnz: int
    max_column_abs_sum: float
    source: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    mask64: torch.Tensor | None = None
    pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def plan_mask(mask: torch.Tensor, device: torch.device, dtype: torch.dtype) -> MaskPlan:
    """Choose the strategy for M [n_in, n_out] (float64, CPU) from its statistics only."""
    n = mask.shape[0]
    nonzero = mask != 0
    binary = bool(((mask == 0) | (mask == 1)).all())
    col_nnz = nonzero.sum(0)
    jmax = int(col_nnz.max()) if n else 0
    plan = MaskPlan(strategy="dense", max_column_nnz=jmax, max_column_abs_sum=float(mask.abs().sum(0).max()))
    if binary and jmax <= max(1, int(n * SPARSE_MAX_FRACTION)):
        plan.strategy = "sparse"
        # per output (row of Mᵀ) its input pixels, ones first, in input order
        inputs = torch.argsort((~nonzero).T.to(torch.int8), dim=1, stable=True)[:, :max(jmax, 1)]
        plan.pairs = []
        for j in range(jmax):
            outputs = torch.nonzero(col_nnz > j).flatten()
            plan.pairs.append((outputs.to(device), inputs[outputs, j].to(device)))
    else:
        plan.source = mask
        plan.mask = mask.T.contiguous().to(device, dtype)  # Mᵀ [n_out, n_in]
        plan.mask64 = plan.mask if dtype == torch.float64 else None
    return plan


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


def dense_logits(x_c: torch.Tensor, y_c: torch.Tensor, mask_t: torch.Tensor, a: float,
                 scale: float) -> torch.Tensor:
    """Expanded-form logits [n_out, B, K] (up to a per-(m, b) constant), pixel-major, for
    centred samples x_c [B, n], centred images y_c [n, K] (pixel-major) and Mᵀ [n_out, n_in],
    all in one dtype. Pixel-major keeps the softmax's reductions over k contiguous."""
    batch, n = x_c.shape
    k = y_c.shape[1]
    y2m = mask_t @ y_c.square()  # [n, K]: sample-independent
    cross = (x_c.T.unsqueeze(2) * y_c.unsqueeze(1)).reshape(n, batch * k)  # [n_in, B·K]
    logits = (mask_t @ cross).reshape(n, batch, k)
    del cross
    logits.mul_(2.0 * a * scale)
    logits.sub_(y2m.mul_(a * a * scale).unsqueeze(1))
    return logits


def sparse_logits(x: torch.Tensor, y: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                  a: float, scale: float) -> torch.Tensor:
    """Direct-difference logits [n_out, B, K] from the mask's ones only, x [B, n], y [n, K]
    pixel-major (float64 expected); ``pairs`` from :func:`plan_mask`. Each (outputs, inputs)
    pair adds whole [B, K] rows of squared differences: nnz(M)·B·K additions in all."""
    batch, n = x.shape
    k = y.shape[1]
    diff = torch.sub(x.T.unsqueeze(2), y.unsqueeze(1), alpha=a).square_()  # [n_in, B, K]
    logits = diff.new_zeros(n, batch, k)
    for outputs, inputs in pairs:
        logits.index_add_(0, outputs, diff.index_select(0, inputs))
    return logits.mul_(-scale)
