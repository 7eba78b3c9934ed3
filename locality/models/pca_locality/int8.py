"""The int8 kernels of pca_locality for 8-bit image data: exact integer sums through oneDNN's
quantized linear (``int8_onednn``, x86 CPUs) or ``torch._int_mm`` (``int8_intmm``, any CPU and
CUDA's integer tensor cores).

Every image dataset here stores 8-bit pixels q ∈ 0..255 as y = (2q - 255)/255 (SPEC), so with
D = q - 128 (int8) and c = 1/255, y = c + (2/255)·D exactly. With x'' = x - a·c (a = sqrt(ᾱ),
s = 1/(2(1-ᾱ)τ)) the masked logit of SPEC step 3 expands to

    logit[b, k, m] = const(b, m) + s·2a·(2/255) Σ_n M[n, m] x''[b, n] D[k, n]
                                 - s·a²·(4/255²) Σ_n M[n, m] (D[k, n]² - 8192)

(the x''² term and the offset 8192 do not depend on k: they cancel in the softmax). The
samples are written in fixed point, x'' ≈ δ·X with X an integer of p balanced base-256
digits X = Σ_j 256^j X_j (X_j int8), and D² - 8192 = 128·H + L with H, L int8. With a binary
mask every product is then an int8 GEMM with exact int32 sums (oneDNN's float32 output is exact
while n·128² < 2^24, i.e. n ≤ 1024). The only errors left are the fixed-point rounding of x''
(at most δ/2 a value) and the final float combination; :func:`int8_error_estimate` estimates
both, and the kernel takes the fewest digits p that keep the logits within
``LOGIT_TOLERANCE`` in the combination dtype asked for. With 4-5 digits and a float64
combination it reaches float64 accuracy, so it can also serve the low-noise steps.

The two backends are separate kernels because their speed differs by orders of magnitude from
one machine to another (oneDNN's quantized linear ran at ~1 TOPS on a Xeon with AMX and at
0.24 GOPS on an EPYC Zen 4): which one runs is measured (:mod:`.selection`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
import math
import statistics
import time
from typing import TYPE_CHECKING

import torch

from locality.models.memory import Workspace, chunk_rows, memory_budget
from locality.models.pca_locality.kernel import Kernel, Precision, Step
from locality.models.pca_locality.plan import MaskPlan
from locality.models.pca_locality.selection import (
    INT8_CPU_CHUNK_CAP_BYTES, LAYOUT_COPY_MARGIN, LOGIT_TOLERANCE, MAX_DIGITS, ONEDNN_MAX_VALUES, int8_sums_exact,
)
from locality.models.softmax import softmax_average_in_groups

if TYPE_CHECKING:
    from locality.models.native import NativeSoftmax

log = logging.getLogger("locality.models.pca_locality")
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


def quad_digits(codes: torch.Tensor, rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, L) int8 with D² - 8192 = 128·H + L, H ∈ [-64, 64], L ∈ [-64, 63]; computed in
    blocks of ``rows`` images (the int32 intermediates of all of them at once would be 16 bytes
    an input: 750 MB on Fashion-MNIST)."""
    high = torch.empty_like(codes)
    low = torch.empty_like(codes)
    for start in range(0, codes.shape[0], rows):
        e = codes[start : start + rows].to(torch.int32).square_().sub_(QUAD_OFFSET)
        part = torch.remainder(e + 64, 128).sub_(64)
        low[start : start + rows] = part
        high[start : start + rows] = e.sub_(part).div_(128, rounding_mode="floor")
    return high, low


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
    tests/test_pca_locality_8bit.py checks every choice it allows against float64."""
    j = max(max_column_nnz, 1)
    delta = x_abs_max / digit_max(digits)
    quantisation = scale * 2 * a * (delta / 2) * Y_ABS_MAX * min(j, 4 * math.sqrt(j))
    magnitude = scale * (2 * a * colsum_x * Y_ABS_MAX + a * a * (4 / 255**2) * QUAD_OFFSET * j)
    return quantisation + torch.finfo(dtype).eps / 2 * magnitude


class Int8Images:
    """The image side of an int8 kernel: codes D [N, n_pad] int8, the quadratic digits H, L,
    and per chunk size the weights in the backend's form (oneDNN: prepacked; int_mm: [n_pad, K]
    as ``layout`` says, row-major copies or column-major views). n_pad rounds n up to a
    multiple of 8 for cuBLAS."""

    def __init__(self, codes: torch.Tensor, backend: str, layout: str = "view",
                 quad: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """``quad``: the (H, L) digits of these codes when already computed."""
        n = codes.shape[1]
        self.backend = backend
        self.layout = layout
        pad = int_mm_width(n) - n if backend == "int_mm" else 0
        self.codes = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
        if quad is None:
            self.high, self.low = quad_digits(self.codes)
        else:
            self.high, self.low = (torch.nn.functional.pad(q, (0, pad)) if pad else q for q in quad)
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
                else:
                    parts = tuple(int_mm_operand(p, self.layout) for p in parts)
                out.append((start, stop, *parts))
            self._chunks = {size: out}  # one chunking at a time: prepacked weights are big
        return self._chunks[size]


def int_mm_width(n: int) -> int:
    """Values per image of the int_mm codes: n rounded up to a multiple of 8 (cuBLAS's int8
    GEMM wants it; the padded columns are zeros)."""
    return n + (-n) % 8


def int_mm_chunk(size: int, chunk_size: int | None, backend: str = "int_mm") -> int:
    """A chunk size the memory budget gave (``chunk_size`` None) rounded down to a multiple of 8
    for torch._int_mm, whose operands are padded to multiples of 8 images: any other size pads
    (copies) every chunk's codes, which on Fashion-MNIST kept 138 MB of copies per kernel. An
    explicit ``model.chunk_size`` is taken as given."""
    if backend != "int_mm" or chunk_size is not None or size <= 8:
        return size
    return size - size % 8


def int_mm_operand(weights: torch.Tensor, layout: str) -> torch.Tensor:
    """weights [K, n] as the second operand [n, K] of ``torch._int_mm``: ``view`` (column-major,
    cuBLAS's "T" layout) or ``copy`` (row-major), K padded to a multiple of 8."""
    pad_k = (-weights.shape[0]) % 8
    if pad_k:
        weights = torch.nn.functional.pad(weights, (0, 0, 0, pad_k))
    return weights.T if layout == "view" else weights.T.contiguous()


def fastest_accepted(products: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                     margin: float = 0.0) -> str:
    """The name of the fastest of ``products`` (name -> a call of torch._int_mm on some operand
    form): the median of ``repeats`` timed calls after one untimed one, the forms in alternation
    (A B A B …: a machine whose speed drifts treats them alike); a form whose call raises (the
    build refuses it) is never taken. ``margin``: the first accepted form (the cheaper one to
    keep) stays unless another is faster by more than this fraction of its time."""
    accepted = {}
    for name, product in products.items():
        try:
            product()
        except RuntimeError:
            continue
        accepted[name] = product
    if not accepted:
        raise RuntimeError(f"torch._int_mm accepts none of the operand forms {', '.join(products)} here")
    samples: dict[str, list[float]] = {name: [] for name in accepted}
    for _ in range(repeats):
        for name, product in accepted.items():
            start = time.perf_counter()
            product()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[name].append(time.perf_counter() - start)
    times = {name: statistics.median(ts) for name, ts in samples.items()}
    first = next(iter(times))
    fastest = min(times, key=times.get)
    return first if times[fastest] >= times[first] * (1 - margin) else fastest


def fastest_int_mm_layout(codes: torch.Tensor, repeats: int = 5) -> str:
    """The operand layout of ``torch._int_mm`` that runs faster here, timed on a product of
    the real width (1 024 rows, 1 024 images; a layout the build refuses is never taken). On
    the EPYC of the README both ran at the same speed (Fashion-MNIST, 4 096 images: 0.26 and
    0.31 ms for 24 rows, 6.0 and 5.9 ms for 784), so which one wins there is noise: ``view``
    stays unless ``copy`` is more than 25 % faster (the copies hold three more int8 copies of
    the images, 141 MB on Fashion-MNIST)."""
    weights = codes[:1024]
    act = codes[: min(1024, len(codes))].repeat(max(1, -(-1024 // max(len(codes), 1))), 1)[:1024]
    operands = {layout: int_mm_operand(weights, layout) for layout in ("view", "copy")}
    return fastest_accepted({layout: (lambda op=op: int_mm_padded(act, op)) for layout, op in operands.items()},
                            codes.device, repeats, margin=LAYOUT_COPY_MARGIN)


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


def int_mm_padded(act: torch.Tensor, operand: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """act [R, n] @ operand [n, K'] -> int32 [R, K'], exact (operand from
    :func:`int_mm_operand`, K' a multiple of 8), into ``out`` when given. cuBLAS wants more than
    16 rows: fewer are padded and sliced off. The CPU runs the same padding, so CPU tests cover it."""
    rows = act.shape[0]
    if rows < 17:
        return torch._int_mm(torch.nn.functional.pad(act, (0, 0, 0, 17 - rows)), operand)[:rows]
    if out is None:
        return torch._int_mm(act, operand)
    return torch._int_mm(act, operand, out=out)


def int8_logits(act_digits: torch.Tensor, mask_codes: torch.Tensor, chunk: tuple, backend: str,
                dtype: torch.dtype, cross_scale: float, quad_scale: float, batch: int,
                workspace: Workspace | None = None) -> torch.Tensor:
    """Logits [n_out, B, K] in ``dtype`` for one image chunk (start, stop, D, H, L):
    cross_scale·Σ_j 256^j (A_j @ Dᵀ) - quad_scale·Mᵀ @ (D² - 8192)ᵀ, from the digit
    activations ``act_digits`` [p, n_out·B, n] (low digit first, rows (m, b)) and
    ``mask_codes`` Mᵀ [n_out, n] int8 (cross_scale = s·2a·(2/255)·δ, quad_scale = s·a²·(2/255)²).
    The logits and temporaries live in the ``workspace``'s buffers when given (valid until the next call)."""
    start, stop, codes, high, low = chunk
    count = stop - start  # int_mm operands may carry up to 7 padded images: sliced off below
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
    ws = workspace or Workspace(act_digits.device)

    def product(act: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """act @ weights in ``dtype`` [R, count], exact (integers below 2^24): the sums land in a
        reused buffer and are converted there, since adding an int32 tensor into a float one
        takes a mixed-dtype path ~10x slower than a plain float add."""
        if backend == "onednn":  # float32 outputs of exact integers
            return ws.take("product", (act.shape[0], count), dtype).copy_(_onednn_mm(act, weights, count, 1.0, None))
        sums = int_mm_padded(act, weights, ws.take("sums", (act.shape[0], weights.shape[1]), torch.int32))
        return ws.take("product", tuple(sums.shape), dtype).copy_(sums)[:, :count]

    quad = ws.take("quad", (n_out, count), dtype).copy_(product(mask_codes, high)).mul_(128.0)
    quad.add_(product(mask_codes, low)).mul_(-quad_scale)  # [n_out, K]
    # the quadratic term, then each digit's converted sums scaled and added, high digits first
    logits = ws.take("logits", (n_out, batch, count), dtype).copy_(quad.unsqueeze(1))
    for j in reversed(range(digits)):
        logits.add_(product(act_digits[j], codes).view(n_out, batch, count), alpha=cross_scale * 256**j)
    return logits


def int8_step(images8: Int8Images, values: torch.Tensor, mask_codes: torch.Tensor, x64: torch.Tensor,
              a: float, scale: float, digits: int, dtype: torch.dtype, chunk_size: int | None,
              native: NativeSoftmax | None = None) -> torch.Tensor:
    """One dense step with an int8 kernel: x64 [B, n] float64, ``values`` the images [N, n]
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
        size = int_mm_chunk(chunk_rows(per_image, device, chunk_size, total=values.shape[0],
                                       cpu_cap=INT8_CPU_CHUNK_CAP_BYTES), chunk_size, images8.backend)
        workspace = Workspace(device)
        for chunk in images8.chunks(size):
            logits = int8_logits(acts, mask_codes, chunk, images8.backend, dtype, cross_scale * delta, quad_scale,
                                 batch, workspace)
            yield logits, values[chunk[0] : chunk[1]].T.to(dtype)

    return softmax_average_in_groups(x64, group, chunks_of, native)


class Int8Kernel(Kernel):
    """``int8_onednn`` or ``int8_intmm``: :func:`int8_step` through one backend. Available for
    8-bit images and binary masks where the backend runs here and a probe
    (:func:`~.selection.int8_sums_exact`, once per model) finds its integer sums exact."""

    def __init__(self, images, backend: str) -> None:
        super().__init__(images)
        self.backend = backend
        self.name = "int8_onednn" if backend == "onednn" else "int8_intmm"
        self._exact: bool | None = None
        self._layout: str | None = None

    def unavailable(self, plan: MaskPlan, forced: bool) -> str | None:
        device = self.images.device
        if self.backend == "onednn":
            if device.type != "cpu" or not torch.backends.mkldnn.is_available():
                return f"oneDNN runs on the CPU only, with torch's mkldnn build (here: {device})"
            if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
                return "this torch build has no oneDNN quantized linear"
            if self.images.values.shape[1] > ONEDNN_MAX_VALUES:
                return f"more than {ONEDNN_MAX_VALUES} values per image (its float32 sums would round)"
        if self.images.codes() is None:
            return "needs 8-bit images (values (2q - 255)/255 for q in 0..255)"
        if not plan.binary:
            return "needs a binary mask: set model.mask_threshold > 0"
        if self._exact is None:
            self._exact = int8_sums_exact(self.backend, device)
            if not self._exact:
                log.warning("pca_locality: the int8 products of the %s backend are not exact on %s (no VNNI?): "
                            "%s is not used", self.backend, device, self.name)
        if not self._exact:
            return (f"the int8 products of the {self.backend} backend are not exact on {device} (a probe with "
                    "extreme operands came out wrong, as on CPUs without VNNI, which add u8·s8 pairs in "
                    "saturating int16)")
        return None

    def precision(self, step: Step, dtypes: tuple[torch.dtype, ...]) -> Precision | None:
        plan = step.plan
        xq = step.x64 - step.a / 255.0  # x'' = x - a·c, c = 1/255
        x_abs_max = float(xq.abs().max())
        colsum_x = plan.max_weighted_column_sum(xq.abs())
        for dtype in dtypes:
            for digits in range(1, MAX_DIGITS + 1):
                estimate = int8_error_estimate(digits, dtype, step.a, step.scale, x_abs_max, colsum_x,
                                               plan.max_column_nnz)
                if estimate <= LOGIT_TOLERANCE:
                    return Precision(dtype, digits)
        return None

    def int_mm_layout(self) -> str:
        """The measured ``torch._int_mm`` operand layout (:func:`fastest_int_mm_layout`), once."""
        if self._layout is None:
            self._layout = fastest_int_mm_layout(self.images.codes())
        return self._layout

    def build(self, count: int) -> Int8Images:
        codes = self.images.codes()
        layout = self.int_mm_layout() if self.backend == "int_mm" else "view"
        high, low = self.images.quad_digits()
        return Int8Images(codes[:count], self.backend, layout, (high[:count], low[:count]))

    def run(self, side: Int8Images, step: Step, precision: Precision, chunk_size: int | None) -> torch.Tensor:
        count = side.codes.shape[0]
        return int8_step(side, self.images.values[:count], step.plan.dense_mask(torch.int8), step.x64, step.a,
                         step.scale, precision.digits, precision.dtype, chunk_size, self.images.native)

    def label(self, precision: Precision) -> str:
        return f"{self.name}x{precision.digits}"
