"""Per-timestep mask plans of pca_locality: the mask's statistics and the forms kernels read.

For one timestep with mask M [n_in, n_out], a = sqrt(ᾱ), s = 1 / (2(1-ᾱ)τ), a chunk of K
training images Y [K, n] and B noisy samples x [B, n]:

    logit[b, k, m] = -s Σ_n M[n, m] (x[b, n] - a y[k, n])²

The mask is the same for every sample and chunk, so it is planned once per timestep: is it
binary (θ > 0), how many ones has its longest column (J, which bounds the rounding of a sum),
and is it sparse enough for the direct-difference kernel (:mod:`.sparse`; every column at most
n/16 ones). Dense forms (Mᵀ in a dtype, stacked bfloat16 copies) are built when a kernel first
asks for them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from locality.models.pca_locality.selection import SPARSE_MAX_FRACTION


@dataclass
class MaskPlan:
    """Per-timestep plan: the mask's statistics and, built once when first needed, the forms
    the kernels read.

    ``strategy`` is ``sparse`` when the mask is binary and its longest column has at most
    n/16 ones (the sparse kernel may run; whether it does is measured), else ``dense``. ``source`` is M
    float64 on the CPU as built; :meth:`dense_mask` gives Mᵀ [n_out, n_in] on the device in a
    dtype, :meth:`mask_bf16` [Mᵀ … Mᵀ] bfloat16 (binary masks: exact) for the bf16x6 and bf16x3
    kernels.
    ``sparse_t`` (sparse-eligible masks) is Mᵀ [n_out, n_in] float64 in CSR on the device.
    """

    strategy: str
    max_column_nnz: int
    max_column_abs_sum: float
    density: float
    binary: bool
    source: torch.Tensor
    # Σ_m min(|M[:, m] = 1|, |M[:, m] = 0|) / n²: the share of the dense work int8_gather's
    # GEMMs do (each output reads its mask's inputs or their complement)
    gathered_fraction: float
    device: torch.device
    sparse_t: torch.Tensor | None = None
    _dense: dict = field(default_factory=dict)

    def dense_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Mᵀ [n_out, n_in] on the device in ``dtype`` (θ = 0 masks are not float32-exact:
        float64 gets its own copy), built once per dtype."""
        if dtype not in self._dense:
            self._dense[dtype] = self.source.T.contiguous().to(self.device, dtype)
        return self._dense[dtype]

    def mask_bf16(self, copies: int) -> torch.Tensor:
        """[Mᵀ … Mᵀ] [n_out, copies·n_in] bfloat16 (exact: the mask is binary), built once per
        count: the mask side of a GEMM whose other side stacks ``copies`` bfloat16 parts."""
        if not self.binary:
            raise ValueError("the bfloat16 kernels need a binary mask (model.mask_threshold > 0)")
        key = ("bf16", copies)
        if key not in self._dense:
            self._dense[key] = self.source.T.to(self.device, torch.bfloat16).repeat(1, copies)
        return self._dense[key]

    def gather_columns(self, align: int) -> list[tuple[torch.Tensor, bool]]:
        """Per output value, the inputs the ``int8_gather`` kernel reads and whether they are the
        mask's complement (:func:`.gather.column_sets`), on the device, built once per ``align``."""
        from locality.models.pca_locality.gather import column_sets

        key = ("gather", align)
        if key not in self._dense:
            self._dense[key] = column_sets(self.source, self.device, align)
        return self._dense[key]

    def max_weighted_column_sum(self, weights: torch.Tensor) -> float:
        """max over b and m of Σ_n M[n, m]·weights[b, n] for a binary mask and weights [B, n]
        ≥ 0, rounded up: computed with the float32 mask the kernels keep anyway (no float64
        copy of an n² mask per timestep on the device), then raised by float32's worst relative
        error over n terms, so it never falls below the float64 value."""
        mask_t = self.dense_mask(torch.float32)
        sums = weights.to(torch.float32) @ mask_t.T
        return float(sums.max()) * (1 + (mask_t.shape[1] + 1) * torch.finfo(torch.float32).eps)


def plan_mask(mask: torch.Tensor, device: torch.device) -> MaskPlan:
    """Classify M [n_in, n_out] (float64, CPU) from its statistics; keep a sparse-eligible
    mask as Mᵀ in CSR on the device. Dense forms are built when a kernel first asks for them."""
    n = mask.shape[0]
    nonzero = mask != 0
    binary = bool(((mask == 0) | (mask == 1)).all())
    col_nnz = nonzero.sum(0)
    jmax = int(col_nnz.max()) if n else 0
    plan = MaskPlan(strategy="dense", max_column_nnz=jmax, max_column_abs_sum=float(mask.abs().sum(0).max()),
                    density=float(nonzero.sum()) / max(n * n, 1), binary=binary, source=mask,
                    gathered_fraction=float(torch.minimum(col_nnz, n - col_nnz).sum()) / max(n * n, 1),
                    device=torch.device(device))
    if binary and jmax <= max(1, int(n * SPARSE_MAX_FRACTION)):
        plan.strategy = "sparse"
        with warnings.catch_warnings():  # torch calls its CSR support beta: the product below is all we use
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            plan.sparse_t = mask.T.contiguous().to_sparse_csr().to(device)
    return plan
