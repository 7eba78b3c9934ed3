"""pca_locality, the paper's analytical denoiser (SPEC, steps 1-4).

For each output value m, a softmax over ALL N training images of the masked distance
logit_k(m) = -Σ_n M_t[n, m] (x_t[n] - sqrt(ᾱ_t) y_k[n])² / (2(1-ᾱ_t)τ), and
x̂0[m] = Σ_k softmax_k(logit(m)) y_k[m]. The softmax is exact (online log-sum-exp), so the
output does not depend on the chunk size.

Speed (see :mod:`locality.models.fast_masked`): the mask of a timestep is the same for every
sample and chunk, so it is built and planned once per timestep; each step then uses the
cheapest exact strategy for that mask (``dense`` expanded GEMM or ``sparse`` direct
differences) and a precision that keeps the logits within the float64 result:

* ``dtype=float64``: everything in float64 (the exactness oracle).
* ``dtype=float32`` (the app's default): each dense step tries the kernels of
  :meth:`PcaLocalityDenoiser.candidates` in order and takes the first whose error estimate
  keeps the logits within ``LOGIT_TOLERANCE`` (float kernels: the rounding estimate
  :func:`~locality.models.fast_masked.dense_logit_error_estimate` times the kernel's rounding
  factor; int8: :func:`~locality.models.eight_bit.int8_error_estimate` for 1-5 digits combined in
  float32 or float64), else float64; sparse (low-noise) steps always sum float64
  differences. On CUDA a sparse-eligible mask runs sparse only below the densities of
  ``CUDA_SPARSE_MAX_DENSITY`` (the sparse kernel is memory-bound there).

``dense_kernel``: ``float32`` (one float32 GEMM), ``bf16x6`` (float32 accuracy from exact
bfloat16 parts on tensor cores; binary masks), ``bf16x3`` and ``int8`` (8-bit images and
binary masks: exact bfloat16 products on tensor cores, exact integer sums on CPU VNNI/AMX or
CUDA integer tensor cores; :mod:`locality.models.eight_bit`), or ``auto`` (see
:meth:`PcaLocalityDenoiser.candidates`: bf16x3/int8 on CUDA and int8 on an AVX-512 CPU for
8-bit images, bf16x6 on CUDA or float32 otherwise).

Chunk sizes derive from the free memory of the device (:mod:`locality.models.memory`),
unless ``chunk_size`` is given.
"""

from __future__ import annotations

import logging
import math

import torch

from locality.models.analytical import _DatasetDenoiser, _flat
from locality.models.base import register_model
from locality.models.fast_masked import (
    CUDA_SPARSE_MAX_DENSITY, DENSE_KERNELS, KERNEL_ROUNDING_FACTOR, LOGIT_TOLERANCE, MaskPlan, SplitImages,
    bf16x6_fits, bf16x6_step, dense_logit_error_estimate, float_step, plan_mask, sparse_step,
)
from locality.models.eight_bit import (
    MAX_DIGITS, ONEDNN_MAX_VALUES, Bf16CodeImages, Int8Images, bf16x3_fits, bf16x3_step, eight_bit_codes,
    int8_error_estimate, int8_step, int8_sums_exact,
)
from locality.models.masks import locality_mask
from locality.models.memory import available_memory
from locality.statistics import DataStatistics

log = logging.getLogger(__name__)

# auto on CUDA, 8-bit images: int8 before bf16x3 from this many logit rows (n·B) on. One dense
# step on an H100 (scripts/gpu_check.py --kernels, 2026-11-26): n·B = 25 088 (Fashion-MNIST, 32
# samples) bf16x3 31 ms, int8 55 ms; 98 304 (64 px RGB, 8 samples) 0.58 s, 0.72 s; 196 608
# (CIFAR-10 size, 64 samples) 1.42 s, 0.49 s: the bfloat16 GEMM slows down on the tallest shape
INT8_FIRST_ROWS = 1 << 17


@register_model("pca_locality")
class PcaLocalityDenoiser(_DatasetDenoiser):
    name = "pca_locality"

    def __init__(self, images: torch.Tensor, stats: DataStatistics, temperature: float = 1.0,
                 mask_threshold: float = 0.02, dense_kernel: str = "auto", **kw) -> None:
        super().__init__(images, **kw)
        if not temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        if not 0 <= mask_threshold <= 1:
            raise ValueError(f"model.mask_threshold must lie in [0, 1], got {mask_threshold}")
        if stats.dim != self.images.shape[1]:
            raise ValueError(
                f"statistics are for {stats.dim} values per image, the images have "
                f"{self.images.shape[1]}"
            )
        if dense_kernel not in DENSE_KERNELS:
            raise ValueError(f"model.dense_kernel must be one of {', '.join(DENSE_KERNELS)}, got {dense_kernel!r}")
        self.stats = stats
        self.dense_kernel = dense_kernel
        self.temperature = float(temperature)
        self.mask_threshold = float(mask_threshold)
        self._masks: dict[int, torch.Tensor] = {}
        self._plans: dict[int, MaskPlan] = {}
        self.mean64 = stats.mean.to(self.device, torch.float64)  # [n]
        # |y - μ| max over the data, for the rounding estimate (one pass at construction)
        self.y_abs_max = max(
            float((ys.double() - self.mean64).abs().max()) for ys in self.images.split(8192)
        )
        self.last_strategy: tuple[str, torch.dtype] | None = None  # for tests and the bench
        self.last_kernel: str | None = None  # sparse, float64, float32, bf16x6, bf16x3 or int8x<digits>
        self._auto_fits: dict[str, bool] = {}  # auto on CUDA: do bf16x6 / bf16x3 fit (decided once)
        self._int8_exact: dict[str, bool] = {}  # per int8 backend: do its sums come out exact here (probed once)
        # image sides of the kernels, built on first use
        self._split: SplitImages | None = None  # bf16x6
        self._codes: torch.Tensor | None | bool = False  # 8-bit codes (False: not looked at yet)
        self._int8: Int8Images | None = None  # int8
        self._bf16: Bf16CodeImages | None = None  # bf16x3

    @classmethod
    def from_data(cls, images: torch.Tensor, stats: DataStatistics, **params):
        return cls(images, stats, **params)

    def mask(self, t: int) -> torch.Tensor:
        """M_t [n, n] float64 on the CPU (the same for every sample and chunk: built once)."""
        if t not in self._masks:
            self._masks[t] = locality_mask(self.stats, self.alpha_bar(t), self.mask_threshold)
        return self._masks[t]

    def plan(self, t: int) -> MaskPlan:
        """The timestep's mask statistics and kernel forms (built once per timestep)."""
        if t not in self._plans:
            self._plans[t] = plan_mask(self.mask(t), self.device)
        return self._plans[t]

    def planned_strategies(self) -> dict[int, str]:
        """The mask-only strategy (``dense`` or ``sparse``) of every timestep planned so far."""
        return {t: p.strategy for t, p in self._plans.items()}

    def share_masks(self, other: PcaLocalityDenoiser) -> None:
        """Use ``other``'s masks and plans, built once for both (they are the same for two
        models of one statistics object, threshold and device: the bench's rival kernel)."""
        if other.stats is not self.stats or other.mask_threshold != self.mask_threshold or other.device != self.device:
            raise ValueError("share_masks needs a model of the same statistics, mask_threshold and device")
        self._masks, self._plans = other._masks, other._plans

    def eight_bit_codes(self) -> torch.Tensor | None:
        """D = q - 128 [N, n] int8 when the images are 8-bit values (2q - 255)/255, else None
        (looked up once per model)."""
        if self._codes is False:
            self._codes = eight_bit_codes(self.images)
        return self._codes

    def int8_backend(self) -> str:
        """How the int8 kernel multiplies here: ``onednn`` (an x86 CPU with oneDNN and
        n ≤ 1024), else ``int_mm`` (CUDA's integer tensor cores, or any CPU)."""
        onednn = (self.device.type == "cpu" and torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.onednn, "qlinear_pointwise") and self.images.shape[1] <= ONEDNN_MAX_VALUES)
        return "onednn" if onednn else "int_mm"

    def int8_exact(self) -> bool:
        """Whether :meth:`int8_backend`'s integer sums are exact on this machine
        (:func:`int8_sums_exact`, probed once per backend): CPUs without VNNI saturate them."""
        backend = self.int8_backend()
        if backend not in self._int8_exact:
            self._int8_exact[backend] = int8_sums_exact(backend, self.device)
            if not self._int8_exact[backend]:
                log.warning("pca_locality: the int8 products of the %s backend are not exact on %s (no VNNI?): "
                            "the int8 kernel is not used", backend, self.device)
        return self._int8_exact[backend]

    def _fits(self, kernel: str) -> bool:
        """auto on CUDA: whether a tensor-core kernel's image side fits (decided once per model)."""
        if kernel not in self._auto_fits:
            num, n = self.images.shape
            rule = bf16x6_fits if kernel == "bf16x6" else bf16x3_fits
            self._auto_fits[kernel] = rule(n, num, available_memory(self.device))
            if not self._auto_fits[kernel]:
                log.info("pca_locality: the %s kernel would not fit the free memory of %s", kernel, self.device)
        return self._auto_fits[kernel]

    def candidates(self, plan: MaskPlan, batch: int) -> list[str]:
        """The dense kernels a float32-accuracy step of ``batch`` samples tries, in order,
        before float64.

        An explicit ``dense_kernel`` is the only candidate (binary masks and, for bf16x3 and
        int8, 8-bit images required). ``auto``, for 8-bit images with a binary mask: on CUDA
        bf16x3 then int8, or int8 alone from ``INT8_FIRST_ROWS`` logit rows (n·B) on or where
        bf16x3 does not fit; on the CPU int8 where oneDNN runs it on AVX-512 (VNNI/AMX integer
        units beat the float32 FMAs). int8 only where :meth:`int8_exact` (an explicit int8 is
        refused otherwise). Other images: bf16x6 on CUDA where it fits, else float32."""
        kernel = self.dense_kernel
        if kernel != "auto":
            if kernel != "float32" and not plan.binary:
                raise ValueError(f"model.dense_kernel={kernel} needs a binary mask: set model.mask_threshold > 0, "
                                 "or use model.dense_kernel=auto")
            if kernel in ("bf16x3", "int8") and self.eight_bit_codes() is None:
                raise ValueError(f"model.dense_kernel={kernel} needs 8-bit images (values (2q - 255)/255 for q in "
                                 "0..255), or use model.dense_kernel=auto")
            if kernel == "int8" and not self.int8_exact():
                raise ValueError(f"model.dense_kernel=int8: the int8 products of the {self.int8_backend()} backend "
                                 f"are not exact on {self.device} (a probe with extreme operands came out wrong, as "
                                 "on CPUs without VNNI, which add u8·s8 pairs in saturating int16): use "
                                 "model.dense_kernel=auto or float32")
            return [kernel]
        if not plan.binary:
            return ["float32"]
        eight_bit = self.eight_bit_codes() is not None
        if self.device.type == "cuda":
            if eight_bit:
                int8 = ["int8"] if self.int8_exact() else []
                tall = self.images.shape[1] * batch >= INT8_FIRST_ROWS
                if self._fits("bf16x3") and not (tall and int8):
                    return ["bf16x3", *int8]
                if int8:
                    return int8
            return ["bf16x6"] if self._fits("bf16x6") else ["float32"]
        avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
        use_int8 = eight_bit and avx512 and self.int8_backend() == "onednn" and self.int8_exact()
        return ["int8"] if use_int8 else ["float32"]

    def dense_choice(self, plan: MaskPlan, abar: float, scale: float,
                     x64: torch.Tensor) -> tuple[str, torch.dtype, int]:
        """(kernel, dtype, digits) of a dense step: the first candidate whose error estimate
        stays within the tolerance (float kernels: :func:`dense_logit_error_estimate` times the
        kernel's rounding factor; int8: the fewest digits, float32 before float64, within
        :func:`int8_error_estimate`), else float64. ``dtype=float64`` is always float64."""
        if self.dtype == torch.float64:
            return "float64", torch.float64, 0
        a = math.sqrt(abar)
        for kernel in self.candidates(plan, x64.shape[0]):
            if kernel == "int8":
                xq = x64 - a / 255.0  # x'' = x - a·c, c = 1/255
                x_abs_max = float(xq.abs().max())
                colsum_x = plan.max_weighted_column_sum(xq.abs())
                for dtype in (torch.float32, torch.float64):
                    for digits in range(1, MAX_DIGITS + 1):
                        estimate = int8_error_estimate(digits, dtype, a, scale, x_abs_max, colsum_x,
                                                       plan.max_column_nnz)
                        if estimate <= LOGIT_TOLERANCE:
                            return "int8", dtype, digits
                continue
            if kernel == "bf16x3":
                codes = self._bf16_codes()
                x_abs_max, y_abs_max = float((x64 - a * codes.offset).abs().max()), codes.y_abs_max
            else:
                x_abs_max, y_abs_max = float((x64 - a * self.mean64).abs().max()), self.y_abs_max
            estimate = dense_logit_error_estimate(plan, abar, scale, x_abs_max, y_abs_max, torch.float32)
            if estimate * KERNEL_ROUNDING_FACTOR[kernel] <= LOGIT_TOLERANCE:
                return kernel, torch.float32, 0
        return "float64", torch.float64, 0

    def strategy(self, plan: MaskPlan, dense_dtype: torch.dtype) -> str:
        """``sparse`` or ``dense`` for this step. CPU: the mask's own classification. CUDA: a
        sparse-eligible mask still goes dense unless it is sparser than the crossover for the
        dense step's dtype (the sparse kernel is memory-bound, the GEMM is not)."""
        if plan.strategy != "sparse" or self.device.type != "cuda":
            return plan.strategy
        return "sparse" if plan.density <= CUDA_SPARSE_MAX_DENSITY[dense_dtype] else "dense"

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        t = int(t)
        abar = self.alpha_bar(t)
        a = math.sqrt(abar)
        scale = 1.0 / (2.0 * (1.0 - abar) * self.temperature)
        plan = self.plan(t)
        x64 = _flat(x_t).to(self.device, torch.float64)
        kernel, cdt, digits = self.dense_choice(plan, abar, scale, x64)
        strategy = self.strategy(plan, cdt)
        if strategy == "sparse":
            kernel, cdt = "sparse", torch.float64  # float64 direct differences
        self.last_strategy = (strategy, cdt)
        self.last_kernel = f"int8x{digits}" if kernel == "int8" else kernel
        if kernel == "int8":
            if self._int8 is None or self._int8.backend != self.int8_backend():
                self._int8 = Int8Images(self.eight_bit_codes(), self.int8_backend())
            out = int8_step(self._int8, self.images, plan.dense_mask(torch.int8), x64, a, scale, digits, cdt,
                            self.chunk_size)
        elif kernel == "bf16x3":
            out = bf16x3_step(self._bf16_codes(), self.images, plan, x64, a, scale, self.chunk_size)
        elif kernel == "bf16x6":
            if self._split is None:
                self._split = SplitImages(self.images, self.mean64)
            out = bf16x6_step(self._split, plan, x64, a, scale, self.chunk_size)
        elif kernel == "sparse":
            out = sparse_step(self.images, plan, x64, a, scale, self.chunk_size)
        else:
            out = float_step(self.images, self.mean64, plan, x64, a, scale, cdt, self.chunk_size)
        return out.to(x_t.dtype).reshape(x_t.shape)

    def _bf16_codes(self) -> Bf16CodeImages:
        if self._bf16 is None:
            self._bf16 = Bf16CodeImages(self.eight_bit_codes())
        return self._bf16
