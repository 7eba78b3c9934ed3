"""The bfloat16 tensor-core kernels of pca_locality: ``bf16x6`` (float32 accuracy for any
images) and ``bf16x3`` (8-bit images). Both need a binary mask and a bfloat16 GEMM with a
float32 output (CUDA's ``torch.mm(..., out_dtype=float32)``); elsewhere their arithmetic runs
emulated in float32 GEMMs (exactly the same sums, in another order), which the tests use and
``auto`` never probes. TF32 is never used: its 10-bit operands would put errors of 1e-3 into
the logits.

* ``bf16x6``: every float32 value splits exactly into three bfloat16 values v = v0 + v1 + v2
  (:func:`split_bf16x3`). The logits are Σ_n y'[k, n] W[n, (m, b)] with W = M ⊙ x' (per step,
  small) and y' the centred images; of the nine products y'_i W_j the six with i + j ≤ 2 are
  kept (the other three are below float32's own rounding), and they run as ONE GEMM with
  float32 accumulation by stacking along the reduction: [y'0 y'0 y'0 y'1 y'1 y'2] @
  [W0; W1; W2; W0; W1; W0]. The image side [K, 6n] is split once per model, so a step only
  splits W; y'² @ M (sample-independent) is [y'²0 y'²1 y'²2] @ [M; M; M].
* ``bf16x3``: 8-bit images (y = (2q - 255)/255, :mod:`.int8`) centred on the per-pixel rounded
  mean code u: the codes D' = q - u lie in [-255, 255] and are exact in bfloat16 (8 significant
  bits), as are D'² split into two parts. With x' = x - a·c' (c' = (2u - 255)/255) and the
  weights W = κ·M ⊙ x' (κ = s·2a·(2/255)) split exactly into three bfloat16 parts, every
  product is exact and the cross term is ONE GEMM [D' D' D'] @ [W0; W1; W2]: half the
  reduction of bf16x6. Its rounding is that of the float32 accumulation, estimated like bf16x6's.
"""

from __future__ import annotations

import torch

from locality.models.memory import available_memory, chunk_rows, memory_budget
from locality.models.pca_locality.float_gemm import float_precision
from locality.models.pca_locality.kernel import Kernel, Precision, Step
from locality.models.pca_locality.plan import MaskPlan
from locality.models.pca_locality.selection import bf16_gemm_is_native
from locality.models.softmax import softmax_average_in_groups


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


def mean_code(codes: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """u [n] float64: the per-pixel mean of the codes D = q - 128, as a rounded code q in 0..255."""
    total = torch.zeros(codes.shape[1], dtype=torch.float64, device=codes.device)
    for start in range(0, codes.shape[0], rows):
        total += codes[start : start + rows].double().sum(0)
    return (total / max(codes.shape[0], 1) + 128).round().clamp(0, 255)


class Bf16CodeImages:
    """The image side of the bf16x3 kernel, built once per model from the codes D = q - 128:
    ``stacked`` [D' D' D'] [N, 3n] and ``squares`` [E0 E1] [N, 2n] bfloat16 (D' = q - u,
    E = D'² = E0 + E1, all exact), ``offset`` c' [n] float64 and ``y_abs_max`` = max |y - c'|.
    ``centre``: u of :func:`mean_code` (default: of these codes; a subset takes its model's)."""

    def __init__(self, codes: torch.Tensor, centre: torch.Tensor | None = None, rows: int = 8192) -> None:
        num, n = codes.shape
        device = codes.device
        centre = mean_code(codes, rows) if centre is None else centre
        self.offset = (2 * centre - 255) / 255  # c'
        self.stacked = torch.empty(num, 3 * n, dtype=torch.bfloat16, device=device)
        self.squares = torch.empty(num, 2 * n, dtype=torch.bfloat16, device=device)
        shift = (centre - 128).to(torch.int32)
        top = 0
        for start in range(0, num, rows):
            d = codes[start : start + rows].to(torch.int32) - shift  # D' ∈ [-255, 255]: exact
            top = max(top, int(d.abs().max()))
            self.stacked[start : start + rows] = d.to(torch.bfloat16).repeat(1, 3)
            e = d.square_()  # ≤ 65 025 < 2^16: E0 keeps 8 bits, the rest (|E1| ≤ 128) is exact too
            e0 = e.to(torch.bfloat16)
            self.squares[start : start + rows, :n] = e0
            self.squares[start : start + rows, n:] = (e - e0.to(torch.int32)).to(torch.bfloat16)
        self.y_abs_max = 2 / 255 * top


def bf16x3_fits(n: int, num_images: int, free_bytes: int) -> bool:
    """Whether ``auto`` may choose bf16x3: its images (10 bytes a value) and one sample's
    weights (about 22·n² bytes: float32 weights, three parts) take at most half the free memory."""
    return 10 * num_images * n + 22 * n * n <= free_bytes // 2


def bf16x3_weights(x_c: torch.Tensor, mask_t: torch.Tensor, kappa: float) -> torch.Tensor:
    """[W0; W1; W2] [3n, n_out·B] bfloat16 with W[n, (m, b)] = κ·M[n, m]·x'[b, n], for x'
    ``x_c`` [B, n] float64 and Mᵀ ``mask_t`` [n_out, n_in] float32 (κ·x' is rounded to float32
    once; the split is exact)."""
    scaled = (kappa * x_c).float()
    weights = mask_t.T.unsqueeze(2) * scaled.T.unsqueeze(1)  # [n_in, n_out, B]
    parts = split_bf16x3(weights.view(weights.shape[0], -1))
    del weights
    return parts.reshape(-1, parts.shape[-1])


def bf16x3_logits(stacked: torch.Tensor, squares: torch.Tensor, weights3: torch.Tensor,
                  mask2_t: torch.Tensor, batch: int, gamma: float) -> torch.Tensor:
    """Logits [n_out, B, K] float32 for one chunk of K images (rows of :class:`Bf16CodeImages`):
    [D' D' D'] @ [W0; W1; W2] - γ·[Mᵀ Mᵀ] @ [E0 E1]ᵀ, γ = s·a²·(2/255)²."""
    k = stacked.shape[0]
    logits = matmul_bf16_to_float32(weights3.T, stacked.T).view(-1, batch, k)
    quad = matmul_bf16_to_float32(mask2_t, squares.T)  # [n_out, K]
    return logits.sub_(quad.mul_(gamma).unsqueeze(1))


def bf16x3_step(codes: Bf16CodeImages, values: torch.Tensor, plan: MaskPlan, x64: torch.Tensor, a: float,
                scale: float, chunk_size: int | None) -> torch.Tensor:
    """One float32-accurate dense step with the bf16x3 kernel (:func:`bf16x3_logits`): x64
    [B, n] float64, ``values`` the images [N, n]. Samples run in groups whose weights fit the
    memory budget. Returns x̂0 [B, n] float64."""
    n = x64.shape[1]
    device = x64.device
    x_c = x64 - a * codes.offset  # x' [B, n]
    kappa, gamma = scale * 2 * a * 2 / 255, scale * a * a * 4 / 255**2
    mask_t = plan.dense_mask(torch.float32)
    mask2_t = plan.mask_bf16(2)  # [Mᵀ Mᵀ], for the squares' two parts
    # 28 bytes per mask entry and sample: float32 weights (4), their split (6) and remainder, headroom
    group = max(1, memory_budget(device) // (28 * n * n))

    def chunks_of(xs: torch.Tensor):
        batch = xs.shape[0]
        weights3 = bf16x3_weights(xs, mask_t, kappa)
        # bytes per image: logits [n, B] and the squares' product [n] float32
        size = chunk_rows(4 * (batch + 1) * n, device, chunk_size, total=values.shape[0])
        for start in range(0, values.shape[0], size):
            part = slice(start, start + size)
            logits = bf16x3_logits(codes.stacked[part], codes.squares[part], weights3, mask2_t, batch, gamma)
            yield logits, values[part].T.float()

    return softmax_average_in_groups(x_c, group, chunks_of)


class _Bf16Kernel(Kernel):
    """What bf16x6 and bf16x3 share: a binary mask, a native bfloat16 GEMM (under ``auto``) and
    an image side that fits half the free memory (under ``auto``; the subclass's ``fits``
    rule), checked once per model."""

    def __init__(self, images) -> None:
        super().__init__(images)
        self._native: bool | None = None
        self._fits: bool | None = None

    def unavailable(self, plan: MaskPlan, forced: bool) -> str | None:
        if not plan.binary:
            return f"{self.name} needs a binary mask: set model.mask_threshold > 0"
        if forced:
            return None
        if self._native is None:
            self._native = bf16_gemm_is_native(self.images.device)
        if not self._native:
            return f"{self.images.device} has no bfloat16 GEMM with a float32 output (it would run emulated)"
        if self._fits is None:
            self._fits = self.fits(*self.images.values.shape[::-1], available_memory(self.images.device))
        if not self._fits:
            return f"its image side would not fit half the free memory of {self.images.device}"
        return None


class Bf16x6Kernel(_Bf16Kernel):
    name = "bf16x6"
    fits = staticmethod(bf16x6_fits)

    def precision(self, step: Step, dtypes: tuple[torch.dtype, ...]) -> Precision | None:
        if torch.float32 not in dtypes:
            return None
        return float_precision(self.name, step, self.images.mean64, self.images.y_abs_max, torch.float32)

    def build(self, count: int) -> SplitImages:
        return SplitImages(self.images.values[:count], self.images.mean64)

    def run(self, side: SplitImages, step: Step, precision: Precision, chunk_size: int | None) -> torch.Tensor:
        return bf16x6_step(side, step.plan, step.x64, step.a, step.scale, chunk_size)


class Bf16x3Kernel(_Bf16Kernel):
    name = "bf16x3"
    fits = staticmethod(bf16x3_fits)

    def __init__(self, images) -> None:
        super().__init__(images)
        self._centre: torch.Tensor | None = None
        self._y_abs_max = 0.0

    def unavailable(self, plan: MaskPlan, forced: bool) -> str | None:
        if self.images.codes() is None:
            return "bf16x3 needs 8-bit images (values (2q - 255)/255 for q in 0..255)"
        return super().unavailable(plan, forced)

    def centre(self) -> tuple[torch.Tensor, float]:
        """(u [n], max |y - c'|) of all the model's images, computed once."""
        if self._centre is None:
            codes = self.images.codes()
            self._centre = mean_code(codes)
            shift = (self._centre - 128).to(torch.int32)
            self._y_abs_max = 2 / 255 * max((int((part.to(torch.int32) - shift).abs().max())
                                             for part in codes.split(8192)), default=0)
        return self._centre, self._y_abs_max

    def precision(self, step: Step, dtypes: tuple[torch.dtype, ...]) -> Precision | None:
        if torch.float32 not in dtypes:
            return None
        centre, y_abs_max = self.centre()
        return float_precision(self.name, step, (2 * centre - 255) / 255, y_abs_max, torch.float32)

    def build(self, count: int) -> tuple[Bf16CodeImages, torch.Tensor]:
        return Bf16CodeImages(self.images.codes()[:count], self.centre()[0]), self.images.values[:count]

    def run(self, side, step: Step, precision: Precision, chunk_size: int | None) -> torch.Tensor:
        codes, values = side
        return bf16x3_step(codes, values, step.plan, step.x64, step.a, step.scale, chunk_size)
