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
* ``sparse`` (direct differences through a sparse mask). When every output's mask has at most
  J ≪ n ones (the low-noise steps: at θ = 0.005 on Fashion-MNIST t = 0 has J = 23 of n = 784),
  the logits are Mᵀ (sparse CSR) @ (x - a y)²: nnz(M)·B·K operations, no dense GEMM. It runs
  in float64 and uses the direct difference, because there 1 - ᾱ is 1e-4, so a rounding
  error e in a distance becomes e / 2e-4 in the logit; the expanded form would cancel
  catastrophically. (The CSR product made the logits 1.9x faster here than gathering and
  scatter-adding the rows of the mask's ones, a whole t = 0 step 1.5x.)

Why not more strategies (measured on the full Fashion-MNIST masks, see the bench report):
the complement M = 1 - C and sparse-CSR products gain nothing on the CPU (C has no empty rows
or columns; torch's CSR @ dense ran 1.6x slower than the dense GEMM already at density 0.12),
and (input-row x output-pixel-group) blocks stay 15-50 % mixed at the dense steps.

Precision of the dense form in float32 (:func:`dense_logit_error_estimate`): a rounding
estimate of the logits from the mask's column sums and the value ranges; above
``LOGIT_TOLERANCE`` the step is computed in float64 instead. float64 is the exactness oracle
and always allowed.

Dense kernels for a float32 step (``dense_kernel``):

* ``float32``: one float32 GEMM per chunk (the CPU's choice: its float32 GEMM runs at the FMA
  peak, and it has no bfloat16 GEMM with a float32 output).
* ``bf16x6``: float32 accuracy on bfloat16 tensor cores (CUDA's choice). Every float32 value
  splits exactly into three bfloat16 values v = v0 + v1 + v2 (:func:`split_bf16x3`). The logits
  are Σ_n y'[k, n] W[n, (m, b)] with W = M ⊙ x' (per step, small) and y' the centred images;
  of the nine products y'_i W_j the six with i + j ≤ 2 are kept (the other three are below
  float32's own rounding), and they run as ONE GEMM with float32 accumulation by stacking along
  the reduction: [y'0 y'0 y'0 y'1 y'1 y'2] @ [W0; W1; W2; W0; W1; W0]. The image side
  [K, 6n] is split once per model, so a step only splits W; y'² @ M (sample-independent) is
  [y'²0 y'²1 y'²2] @ [M; M; M] (a binary mask is exact in bfloat16). TF32 is never used: its
  10-bit operands would put errors of 1e-3 into the logits.
* ``bf16x3`` and ``int8``: for 8-bit images (every dataset here) the image side is exact in
  bfloat16 and in int8, so fewer products suffice: :mod:`locality.models.eight_bit`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from locality.models.memory import Workspace, chunk_rows, memory_budget
from locality.models.softmax import softmax_average, softmax_average_in_groups

DENSE_KERNELS = ("auto", "float32", "bf16x6", "bf16x3", "int8")  # auto: PcaLocalityDenoiser.candidates
# rounding of a kernel's logits relative to the float32 GEMM, for the error estimate: on the H100
# the probe of scripts/gpu_check.py put bf16x6 logits 5.2x further from float64 than the float32
# kernel's (2.1e-3 vs 4.1e-4 on logits up to 383: tensor cores sum 6n terms); 8 keeps the margin.
# bf16x3 (exact products, 3n terms, the same float32 accumulation) reuses it: on the H100 its
# Fashion-MNIST steps stayed within 2.9e-5 of float64
KERNEL_ROUNDING_FACTOR = {"float32": 1.0, "bf16x6": 8.0, "bf16x3": 8.0}
SPARSE_MAX_FRACTION = 1 / 16  # sparse when the longest mask column has ≤ n/16 ones
# CUDA: the sparse kernel moved ~40 bytes per mask one, sample and image (gather/scatter form) at ~3 TB/s, where a
# GEMM does ~12·n flops per mask entry at ~700 TFLOP/s (bf16x6) or ~2·n at ~50 (float64):
# sparse pays off only below these densities (for the float32-accurate and the float64 dense
# step; on the H100 a t = 0 step of full Fashion-MNIST, 32 samples, density 0.004, took 0.11 s
# sparse and 0.10 s dense in float64, measured with the earlier gather/scatter form of the sparse
# kernel: scripts/gpu_check.py --kernels times the CSR form against both dense kernels)
CUDA_SPARSE_MAX_DENSITY = {torch.float32: 1 / 1600, torch.float64: 1 / 1000}
LOGIT_TOLERANCE = 2e-4  # float32 where the rounding estimate is below this (outputs stay within 1e-4)


@dataclass
class MaskPlan:
    """Per-timestep plan: the mask's statistics and, built once when first needed, the forms
    the kernels read.

    ``strategy`` is the mask-only choice (``sparse`` when the mask is binary and its longest
    column has at most n/16 ones, else ``dense``); on the CPU it is final, on CUDA the model
    also weighs the step's precision (:meth:`PcaLocalityDenoiser.strategy`). ``source`` is M
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
                    device=torch.device(device))
    if binary and jmax <= max(1, int(n * SPARSE_MAX_FRACTION)):
        plan.strategy = "sparse"
        with warnings.catch_warnings():  # torch calls its CSR support beta: the product below is all we use
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            plan.sparse_t = mask.T.contiguous().to_sparse_csr().to(device)
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


def split_bf16x3(values: torch.Tensor) -> torch.Tensor:
    """float32 [*s] -> bfloat16 [3, *s] with values == hi + mid + lo exactly.

    hi is values rounded to bfloat16 (8 significand bits); values - hi is exact in float32 and
    spans the next 16 bits; mid takes 8 of them and the remainder (at most 8 bits) is lo. Each
    subtraction is exact (the operands agree in their leading bits), so nothing is lost."""
    if values.dtype != torch.float32:
        raise TypeError(f"split_bf16x3 takes float32, got {values.dtype}")
    parts = torch.empty((3, *values.shape), dtype=torch.bfloat16, device=values.device)
    parts[0].copy_(values)
    rest = values - parts[0].float()
    parts[1].copy_(rest)
    rest.sub_(parts[1].float())
    parts[2].copy_(rest)
    return parts


def matmul_bf16_to_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] @ b [k, n], bfloat16 operands, float32 products summed in float32 -> float32.

    CUDA: cuBLAS with a float32 output (``torch.mm(..., out_dtype=float32)``). Elsewhere (no
    such kernel on the CPU) the same arithmetic in a float32 GEMM: bfloat16 products are exact
    in float32, so only the order of the float32 sums differs."""
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


class SplitImages:
    """The image side of the bf16x6 kernel, split once per model: centred images y' [N, n]
    float32 as ``stacked`` [y'0 y'0 y'0 y'1 y'1 y'2] [N, 6n] and ``squares`` [y'²0 y'²1 y'²2]
    [N, 3n] bfloat16, the values of the softmax average ``values`` y'ᵀ [n, N] float32, and
    the mean μ ``mean64`` [n] float64 they are centred on."""

    def __init__(self, images: torch.Tensor, mean: torch.Tensor, rows: int = 4096) -> None:
        num, n = images.shape
        device = images.device
        self.stacked = torch.empty(num, 6 * n, dtype=torch.bfloat16, device=device)
        self.squares = torch.empty(num, 3 * n, dtype=torch.bfloat16, device=device)
        self.values = torch.empty(n, num, dtype=torch.float32, device=device)
        self.mean64 = mean.to(device, torch.float64)
        mean32 = mean.to(device, torch.float32)
        for start in range(0, num, rows):  # in slices: float32 temporaries stay small
            part = slice(start, min(start + rows, num))
            y_c = images[part].to(torch.float32) - mean32
            self.values[:, part] = y_c.T
            p = split_bf16x3(y_c)
            for slot, i in enumerate((0, 0, 0, 1, 1, 2)):
                self.stacked[part, slot * n : (slot + 1) * n] = p[i]
            self.squares[part] = split_bf16x3(y_c.square_()).permute(1, 0, 2).reshape(-1, 3 * n)


def bf16x6_fits(n: int, num_images: int, free_bytes: int) -> bool:
    """Whether ``auto`` may choose bf16x6: the split images (22 bytes a value: nine bfloat16
    parts and the float32 values) and one sample's split weights (26·n² bytes) take at most half
    of the free device memory (else the float32 kernel, which needs neither)."""
    return 22 * num_images * n + 26 * n * n <= free_bytes // 2


def split_weights_bf16x6(x_c: torch.Tensor, mask_t: torch.Tensor) -> torch.Tensor:
    """W[n, (m, b)] = M[n, m] x'[b, n] for x_c [B, n] and Mᵀ ``mask_t`` [n_out, n_in] float32,
    as [W0; W1; W2; W0; W1; W0] [6n, n_out·B] bfloat16 (pairs with SplitImages.stacked)."""
    weights = mask_t.T.unsqueeze(2) * x_c.T.unsqueeze(1)  # [n_in, n_out, B]
    p = split_bf16x3(weights.view(weights.shape[0], -1))
    del weights
    return torch.cat([p[0], p[1], p[2], p[0], p[1], p[0]], dim=0)


def dense_logits_bf16x6(stacked: torch.Tensor, squares: torch.Tensor, weights6: torch.Tensor,
                        mask3_t: torch.Tensor, batch: int, a: float, scale: float) -> torch.Tensor:
    """:func:`dense_logits` with the bf16x6 kernel for one chunk of K images: ``stacked``
    [K, 6n] and ``squares`` [K, 3n] (rows of :class:`SplitImages`), ``weights6`` [6n, n_out·B]
    (:func:`split_weights_bf16x6`), ``mask3_t`` [n_out, 3n]. Returns logits [n_out, B, K] float32."""
    k = stacked.shape[0]
    cross = matmul_bf16_to_float32(weights6.T, stacked.T).view(-1, batch, k)  # [n_out, B, K]
    y2m = matmul_bf16_to_float32(mask3_t, squares.T)  # [n_out, K]
    cross.mul_(2.0 * a * scale)
    cross.sub_(y2m.mul_(a * a * scale).unsqueeze(1))
    return cross


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


# One step of each kernel: x64 [B, n] float64 samples in, x̂0 [B, n] float64 out. Image chunks
# are sized by the memory budget (model.chunk_size overrides); every step streams them through
# the exact online softmax (locality.models.softmax).


def sparse_step(images: torch.Tensor, plan: MaskPlan, x64: torch.Tensor, a: float, scale: float,
                chunk_size: int | None) -> torch.Tensor:
    """One low-noise step from the mask's ones only, in float64 (:func:`sparse_logits`), over
    the images [N, n]."""
    batch, n = x64.shape
    # bytes per image: diff and logits [n, B], the pixel-major copy and the softmax's [n, 2], float64
    size = chunk_rows(8 * (2 * batch + 3) * n, x64.device, chunk_size, total=images.shape[0])

    def chunks():
        for start in range(0, images.shape[0], size):
            y = images[start : start + size].T.to(torch.float64).contiguous()  # [n, K] pixel-major
            yield sparse_logits(x64, y, plan.sparse_t, a, scale), y

    return softmax_average(chunks())


def float_step(images: torch.Tensor, mean64: torch.Tensor, plan: MaskPlan, x64: torch.Tensor, a: float,
               scale: float, dtype: torch.dtype, chunk_size: int | None) -> torch.Tensor:
    """One dense step with one GEMM in ``dtype`` (float32 or float64) per chunk
    (:func:`dense_logits`) over the images [N, n], centred on ``mean64`` [n]."""
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

    return softmax_average(chunks()) + mean64  # the average of centred values, shifted back


def bf16x6_step(split: SplitImages, plan: MaskPlan, x64: torch.Tensor, a: float, scale: float,
                chunk_size: int | None) -> torch.Tensor:
    """One float32-accurate dense step on tensor cores (:func:`dense_logits_bf16x6`) over the
    split images. Samples run in groups whose split weights [6n, n_out·B] fit the memory budget."""
    n = x64.shape[1]
    num = split.stacked.shape[0]
    x_c = (x64 - a * split.mean64).float()  # [B, n] centred samples
    mask_t, mask3_t = plan.dense_mask(torch.float32), plan.mask_bf16(3)
    # 48 bytes per mask entry and sample: the split weights peak at 26 (float32 weights and
    # remainder, three parts, the six stacked), with headroom for the allocator
    group = max(1, memory_budget(x64.device) // (48 * n * n))

    def chunks_of(xs: torch.Tensor):
        weights6 = split_weights_bf16x6(xs, mask_t)
        # bytes per image: logits [n, B] and y²@M [n] float32, plus the softmax's [n, 2]
        size = chunk_rows(4 * (len(xs) + 4) * n, x64.device, chunk_size, total=num)
        for start in range(0, num, size):
            part = slice(start, start + size)
            logits = dense_logits_bf16x6(split.stacked[part], split.squares[part], weights6, mask3_t,
                                         len(xs), a, scale)
            yield logits, split.values[:, part]

    return softmax_average_in_groups(x_c, group, chunks_of) + split.mean64
