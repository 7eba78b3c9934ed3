"""Dense kernels of pca_locality for 8-bit image data: ``int8`` (exact integer sums) and
``bf16x3`` (exact bfloat16 products on tensor cores).

Every image dataset here stores 8-bit pixels q ∈ 0..255 as y = (2q - 255)/255 (SPEC), so with
D = q - 128 (int8) and c = 1/255, y = c + (2/255)·D exactly. With x'' = x - a·c (a = sqrt(ᾱ),
s = 1/(2(1-ᾱ)τ)) the masked logit of SPEC step 3 expands to

    logit[b, k, m] = const(b, m) + s·2a·(2/255) Σ_n M[n, m] x''[b, n] D[k, n]
                                 - s·a²·(4/255²) Σ_n M[n, m] (D[k, n]² - 8192)

(the x''² term and the offset 8192 do not depend on k: they cancel in the softmax). The
samples are written in fixed point, x'' ≈ δ·X with X an integer of p balanced base-256
digits X = Σ_j 256^j X_j (X_j int8), and D² - 8192 = 128·H + L with H, L int8. With a binary
mask every product is then an int8 GEMM with exact int32 sums: on the CPU oneDNN's quantized
linear (AMX/VNNI; its float32 output is exact while n·128² < 2^24, i.e. n ≤ 1024), on CUDA
``torch._int_mm`` (integer tensor cores). The only errors left are the fixed-point rounding of
x'' (at most δ/2 a value) and the final float combination; :func:`int8_error_estimate`
estimates both, and the model picks the fewest digits p (and float32 or float64 for the combination)
that keep the logits within ``LOGIT_TOLERANCE``. With 4-5 digits and a float64 combination the
kernel reaches float64 accuracy, so on CUDA it also serves the low-noise steps.

``bf16x3`` (CUDA): centred on the per-pixel rounded mean code u, the codes D' = q - u lie in
[-255, 255] and are exact in bfloat16 (8 significant bits), as are D'² split into two parts.
With x' = x - a·c' (c' = (2u - 255)/255) and the weights W = κ·M ⊙ x' (κ = s·2a·(2/255))
split exactly into three bfloat16 parts (:func:`~locality.models.fast_masked.split_bf16x3`),
every product is exact and the cross term is ONE tensor-core GEMM [D' D' D'] @ [W0; W1; W2]
with float32 accumulation: half the reduction of bf16x6, whose float image parts need six
products. Its rounding is that of the float32 accumulation, estimated like bf16x6's.
"""

from __future__ import annotations

import math

import torch

from locality.models.fast_masked import MaskPlan, matmul_bf16_to_float32, split_bf16x3
from locality.models.memory import Workspace, chunk_rows, memory_budget
from locality.models.softmax import softmax_average_in_groups

ONEDNN_MAX_VALUES = 1024  # n·128·128 < 2^24: oneDNN's float32 output of an int32 sum is exact
MAX_DIGITS = 5
# CPU: logits per chunk for the int8 kernel. One dense step of full Fashion-MNIST, 8 samples,
# alternated 8 times here: 320 images a chunk (8 MB of logits) 1.18 s, 160 1.42 s, 850 (the
# 24 MB general cap) 1.81 s: oneDNN writes the logits once per digit, so they must stay cached
INT8_CPU_CHUNK_CAP_BYTES = 8 << 20
QUAD_OFFSET = 8192  # D² - 8192 ∈ [-8192, 8192] splits into two int8 digits in base 128
Y_ABS_MAX = 2 / 255 * 128  # |y - c| ≤ this for every 8-bit value


def digit_max(digits: int) -> int:
    """The largest |X| that ``digits`` balanced base-256 digits (each in [-128, 127]) hold."""
    return 127 * (256**digits - 1) // 255


def eight_bit_codes(images: torch.Tensor, rows: int = 8192) -> torch.Tensor | None:
    """D = q - 128 int8 [N, n] when every value is (2q - 255)/255 for an integer q in 0..255
    (to within 1e-6: float32 storage), else None (the kernel does not apply)."""
    codes = torch.empty(images.shape, dtype=torch.int8, device=images.device)
    for start in range(0, images.shape[0], rows):
        part = images[start : start + rows]
        part = part if part.dtype in (torch.float32, torch.float64) else part.double()
        q = torch.round((part + 1.0) * 127.5)  # in the images' dtype: float32 resolves 1e-6
        if not bool(((q >= 0) & (q <= 255)).all()) or float(((2 * q - 255) / 255 - part).abs().max()) > 1e-6:
            return None
        codes[start : start + rows] = (q - 128).to(torch.int8)
    return codes


def to_digits(values: torch.Tensor, digits: int) -> tuple[torch.Tensor, float]:
    """float64 [B, n] -> (X int8 [digits, B, n] low digit first, δ) with
    values ≈ δ Σ_j 256^j X_j, each value within δ/2. One δ for the whole batch (from its
    largest |value|), so the digit sums need no per-sample scaling pass."""
    top = max(float(values.abs().max()), 1e-300)
    delta = top / digit_max(digits)
    rest = torch.round(values / delta).to(torch.int64)
    out = torch.empty((digits, *values.shape), dtype=torch.int8, device=values.device)
    for j in range(digits):
        low = torch.remainder(rest + 128, 256) - 128  # balanced digit in [-128, 127]
        out[j] = low.to(torch.int8)
        rest = (rest - low) // 256
    if bool((rest != 0).any()):  # cannot happen with |X| ≤ digit_max: a guard against misuse
        raise AssertionError("to_digits: value out of the digit range")
    return out, delta


def quad_digits(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, L) int8 with D² - 8192 = 128·H + L, H ∈ [-64, 64], L ∈ [-64, 63]."""
    e = codes.to(torch.int32).square_().sub_(QUAD_OFFSET)
    low = torch.remainder(e + 64, 128) - 64
    return ((e - low) // 128).to(torch.int8), low.to(torch.int8)


def int8_error_estimate(digits: int, dtype: torch.dtype, a: float, scale: float, x_abs_max: float,
                     colsum_x: float, max_column_nnz: int) -> float:
    """Error estimate of a logit (used like the float kernels' estimate, against
    ``LOGIT_TOLERANCE``): the fixed-point rounding of x'' (≤ δ/2 a value, δ = |x''|max /
    digit_max; the independent roundings of J terms add like a random walk: at most 4√J of
    their worst case, never more than J), plus one rounding (u/2) of the largest magnitude the
    two sums can take in the float combination (colsum_x = max over samples and outputs of
    Σ_n M|x''|). Calibration: on 300-3000 Fashion-MNIST images (θ = 0.005) with the combination
    forced to float32 at t = 300, 200, 100 and 3 digits, the estimate (3e-5 to 1.1e-4) exceeded
    the measured output deviation from float64 (3e-6 to 6e-6) 10-20 times;
    tests/test_eight_bit.py checks every choice it allows against float64."""
    j = max(max_column_nnz, 1)
    delta = x_abs_max / digit_max(digits)
    quantisation = scale * 2 * a * (delta / 2) * Y_ABS_MAX * min(j, 4 * math.sqrt(j))
    magnitude = scale * (2 * a * colsum_x * Y_ABS_MAX + a * a * (4 / 255**2) * QUAD_OFFSET * j)
    return quantisation + torch.finfo(dtype).eps / 2 * magnitude


class Int8Images:
    """The image side of the int8 kernel, built once per model: codes D [N, n_pad] int8, the
    quadratic digits H, L, and per chunk size the weights in the backend's form (oneDNN:
    prepacked; CUDA: column-major views). n_pad rounds n up to a multiple of 8 for cuBLAS."""

    def __init__(self, codes: torch.Tensor, backend: str) -> None:
        n = codes.shape[1]
        self.backend = backend
        pad = (-n) % 8 if backend == "int_mm" else 0
        self.codes = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
        self.high, self.low = quad_digits(self.codes)
        if pad:  # padded columns must add nothing to the quadratic sum either
            self.high[:, n:] = 0
            self.low[:, n:] = 0
        self._chunks: dict[int, list[tuple]] = {}

    def chunks(self, size: int) -> list[tuple]:
        """Per chunk of ``size`` images: (start, stop, D, H, L) in the backend's form."""
        if size not in self._chunks:
            out = []
            for start in range(0, self.codes.shape[0], size):
                stop = min(start + size, self.codes.shape[0])
                parts = (self.codes[start:stop], self.high[start:stop], self.low[start:stop])
                if self.backend == "onednn":
                    parts = tuple(torch.ops.onednn.qlinear_prepack(p.contiguous(), None) for p in parts)
                out.append((start, stop, *parts))
            self._chunks = {size: out}  # one chunking at a time: prepacked weights are big
        return self._chunks[size]


def _onednn_mm(act: torch.Tensor, packed: torch.Tensor, count: int, scale: float,
               out: torch.Tensor | None) -> torch.Tensor:
    """scale · act [R, n] @ Dᵀ (prepacked, ``count`` rows) -> float32 [R, count], added into
    ``out`` when given (oneDNN's sum post-op)."""
    ones = torch.ones(count, dtype=torch.float32)
    zeros = torch.zeros(count, dtype=torch.int32)
    if out is None:
        return torch.ops.onednn.qlinear_pointwise(act, scale, 0, packed, ones, zeros, None, 1.0, 0,
                                                  torch.float32, "none", [], "")
    return torch.ops.onednn.qlinear_pointwise.binary(act, scale, 0, packed, ones, zeros, out, None, 1.0, 0,
                                                     torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")


def _int_mm(act: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """act [R, n] @ weights[K, n]ᵀ -> int32 [R, K], exact. cuBLAS wants more than 16 rows and
    a column count divisible by 8 (n is padded once by :class:`Int8Images`): pad, multiply,
    slice. The CPU runs the same padding, so CPU tests cover it."""
    rows, count = act.shape[0], weights.shape[0]
    pad_r = max(0, 17 - rows)
    pad_k = (-count) % 8
    if pad_r:
        act = torch.nn.functional.pad(act, (0, 0, 0, pad_r))
    if pad_k:
        weights = torch.nn.functional.pad(weights, (0, 0, 0, pad_k))
    try:
        out = torch._int_mm(act, weights.T)  # weights.T: a column-major view, cuBLAS's "T" layout
    except RuntimeError:  # a build that wants a row-major second operand
        out = torch._int_mm(act, weights.T.contiguous())
    return out[:rows, :count] if (pad_r or pad_k) else out


def int8_sums_exact(backend: str, device: torch.device | str) -> bool:
    """Whether ``backend``'s int8 products sum exactly on this machine: a probe with the
    operands that break CPUs without VNNI (their u8·s8 instructions add pairs of products in
    saturating int16: 255·127·2 > 32 767), rows of all 127, all -128 and alternating signs,
    against the int64 products. Integer tensor cores and VNNI/AMX units pass."""
    n = 64
    even = torch.arange(n) % 2 == 0
    rows = torch.stack([torch.full((n,), 127), torch.full((n,), -128), torch.where(even, 127, -128),
                        torch.where(even, -128, 127)]).to(torch.int8)
    act, weights = rows.repeat(5, 1), rows.repeat(2, 1)  # 20 rows (int_mm wants > 16), 8 images
    exact = act.long() @ weights.long().T  # |sum| ≤ 64·128² = 2^20: exact in float32 as well
    if backend == "onednn":
        packed = torch.ops.onednn.qlinear_prepack(weights.contiguous(), None)
        got = _onednn_mm(act, packed, weights.shape[0], 1.0, None).double()
        return torch.equal(got, exact.double())
    got = _int_mm(act.to(device), weights.to(device)).cpu()
    return torch.equal(got.long(), exact)


def int8_logits(act_digits: torch.Tensor, mask_codes: torch.Tensor, chunk: tuple, backend: str,
                dtype: torch.dtype, cross_scale: float, quad_scale: float, batch: int,
                workspace: Workspace | None = None) -> torch.Tensor:
    """Logits [n_out, B, K] in ``dtype`` for one image chunk (start, stop, D, H, L):
    cross_scale·Σ_j 256^j (A_j @ Dᵀ) - quad_scale·Mᵀ @ (D² - 8192)ᵀ, from the digit
    activations ``act_digits`` [p, n_out·B, n] (low digit first, rows (m, b)) and
    ``mask_codes`` Mᵀ [n_out, n] int8 (cross_scale = s·2a·(2/255)·δ, quad_scale = s·a²·(2/255)²).
    oneDNN/float32 writes into the ``workspace``'s buffers when given (valid until the next call)."""
    start, stop, codes, high, low = chunk
    count = stop - start
    digits = act_digits.shape[0]
    n_out = mask_codes.shape[0]
    if backend == "onednn" and dtype == torch.float32:
        ws = workspace or Workspace("cpu")
        quad = ws.take("quad", (n_out, count), torch.float32).zero_()
        quad = _onednn_mm(mask_codes, high, count, -128.0 * quad_scale, quad)
        quad = _onednn_mm(mask_codes, low, count, -quad_scale, quad)
        # the quadratic term first, then oneDNN adds each digit's scaled sums into the same
        # float32 logits (its sum post-op), high digits first; a reused buffer spares the
        # CPU a fresh (page-faulted) allocation per chunk
        rows = act_digits.shape[1]
        out = ws.take("logits", (n_out, batch, count), torch.float32)
        out.copy_(quad.unsqueeze(1))
        out = out.view(rows, count)
        for j in reversed(range(digits)):
            out = _onednn_mm(act_digits[j], codes, count, cross_scale * 256**j, out)
        return out.view(n_out, batch, count)
    if backend == "onednn":  # float64: every digit's float32 output is an exact integer
        mm = lambda act, w: _onednn_mm(act, w, count, 1.0, None)  # noqa: E731
    else:
        mm = _int_mm
    quad = mm(mask_codes, high).to(dtype).mul_(128.0).add_(mm(mask_codes, low))  # [n_out, K]
    # one pass per digit: converts the int32 sums, scales them and adds them up
    logits = torch.add(quad.mul_(-quad_scale).unsqueeze(1), mm(act_digits[-1], codes).view(n_out, batch, count),
                       alpha=cross_scale * 256 ** (digits - 1))
    for j in reversed(range(digits - 1)):
        logits.add_(mm(act_digits[j], codes).view(n_out, batch, count), alpha=cross_scale * 256**j)
    return logits


class Bf16CodeImages:
    """The image side of the bf16x3 kernel, built once per model from the codes D = q - 128:
    ``stacked`` [D' D' D'] [N, 3n] and ``squares`` [E0 E1] [N, 2n] bfloat16 (D' = q - u,
    E = D'² = E0 + E1, all exact), ``offset`` c' [n] float64 and ``y_abs_max`` = max |y - c'|."""

    def __init__(self, codes: torch.Tensor, rows: int = 8192) -> None:
        num, n = codes.shape
        device = codes.device
        centre = torch.zeros(n, dtype=torch.float64, device=device)
        for start in range(0, num, rows):
            centre += codes[start : start + rows].double().sum(0)
        centre = (centre / max(num, 1) + 128).round().clamp(0, 255)  # u: the rounded mean code
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


def int8_step(images8: Int8Images, values: torch.Tensor, mask_codes: torch.Tensor, x64: torch.Tensor,
              a: float, scale: float, digits: int, dtype: torch.dtype, chunk_size: int | None) -> torch.Tensor:
    """One dense step with the int8 kernel: x64 [B, n] float64, ``values`` the images [N, n]
    (their stored values are averaged), ``mask_codes`` Mᵀ [n_out, n_in] int8; x'' in ``digits``
    digits, exact integer sums, combined in ``dtype``. Returns x̂0 [B, n] float64."""
    n = x64.shape[1]
    device = x64.device
    pad = images8.codes.shape[1] - n
    if pad:
        mask_codes = torch.nn.functional.pad(mask_codes, (0, pad))
    cross_scale = scale * 2 * a * 2 / 255  # s·2a·(2/255), times δ per sample group
    quad_scale = scale * a * a * 4 / 255**2  # s·a²·(2/255)²
    item = torch.tensor([], dtype=dtype).element_size()
    # samples in groups whose digit activations [p, n_out·B, n] (int8) fit the memory budget
    group = max(1, memory_budget(device) // (digits * n * mask_codes.shape[1]))

    def chunks_of(xs: torch.Tensor):
        xd, delta = to_digits(xs - a / 255.0, digits)  # [p, B, n] int8, δ
        batch = xd.shape[1]
        if pad:
            xd = torch.nn.functional.pad(xd, (0, pad))
        # activations A_j[(m, b), n] = M[n, m]·X_j[b, n]: exact in int8 (the mask is 0 or 1)
        acts = (mask_codes.unsqueeze(1).unsqueeze(0) * xd.unsqueeze(1)).reshape(digits, n * batch, -1)
        del xd
        # bytes per image: logits [n, B] and quad sums [n] in dtype, and int_mm's int32 products
        per_image = (batch + 1) * item * n + (4 * batch * n if images8.backend == "int_mm" else 0)
        size = chunk_rows(per_image, device, chunk_size, total=values.shape[0], cpu_cap=INT8_CPU_CHUNK_CAP_BYTES)
        workspace = Workspace(device)
        for chunk in images8.chunks(size):
            logits = int8_logits(acts, mask_codes, chunk, images8.backend, dtype, cross_scale * delta, quad_scale,
                                 batch, workspace)
            yield logits, values[chunk[0] : chunk[1]].T.to(dtype)

    return softmax_average_in_groups(x64, group, chunks_of)


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
