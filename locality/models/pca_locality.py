"""pca_locality, the paper's analytical denoiser (SPEC, steps 1-4).

For each output value m, a softmax over ALL N training images of the masked distance
logit_k(m) = -Σ_n M_t[n, m] (x_t[n] - sqrt(ᾱ_t) y_k[n])² / (2(1-ᾱ_t)τ), and
x̂0[m] = Σ_k softmax_k(logit(m)) y_k[m]. The softmax is exact (online log-sum-exp), so the
output does not depend on the chunk size.

Speed (see :mod:`locality.models.fast_masked`): the mask of a timestep is the same for every
sample and chunk, so it is built and planned once per timestep; each step then uses the
cheapest exact strategy for that mask (``dense`` expanded GEMM or ``sparse`` gathered direct
differences) and a precision that keeps the logits within the float64 result:

* ``dtype=float64``: everything in float64 (the exactness oracle).
* ``dtype=float32`` (the app's default): dense steps at float32 accuracy when the rounding
  estimate :func:`~locality.models.fast_masked.dense_logit_error_estimate` (times the kernel's
  rounding factor) allows it, else float64; sparse (low-noise) steps always gather float64
  differences. On CUDA a sparse-eligible mask runs sparse only below the densities of
  ``CUDA_SPARSE_MAX_DENSITY`` (the gathered kernel is memory-bound there).

``dense_kernel`` picks how a float32 dense step multiplies: ``float32`` (one float32 GEMM),
``bf16x6`` (float32 accuracy from exact bfloat16 parts on tensor cores; binary masks only)
or ``auto`` (bf16x6 on CUDA, float32 elsewhere).

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
    CUDA_SPARSE_MAX_DENSITY, DENSE_KERNELS, LOGIT_TOLERANCE, MaskPlan, dense_logit_error_estimate, dense_logits,
    KERNEL_ROUNDING_FACTOR, SplitImages, bf16x6_fits, dense_logits_bf16x6, plan_mask, sparse_logits,
    split_weights_bf16x6,
)
from locality.models.masks import locality_mask
from locality.models.memory import available_memory, memory_budget
from locality.models.softmax import OnlineSoftmaxAverage
from locality.statistics import DataStatistics

log = logging.getLogger(__name__)


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
        self.last_kernel: str | None = None  # sparse, float64, float32 or bf16x6
        self._split: SplitImages | None = None  # the image side of bf16x6, split on first use
        self._auto_bf16x6: bool | None = None  # auto on CUDA: does bf16x6 fit (decided once)

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

    def float32_kernel(self, plan: MaskPlan) -> str:
        """The kernel of a float32 dense step: ``float32`` or ``bf16x6`` (``dense_kernel``;
        auto: bf16x6 on CUDA where the mask is binary)."""
        if self.dense_kernel == "bf16x6":
            if not plan.binary:
                raise ValueError("model.dense_kernel=bf16x6 needs binary masks: set model.mask_threshold > 0 "
                                 "or model.dense_kernel=auto")
            return "bf16x6"
        if self.dense_kernel == "auto" and self.device.type == "cuda" and plan.binary and self._bf16x6_fits():
            return "bf16x6"
        return "float32"

    def _bf16x6_fits(self) -> bool:
        """auto on CUDA: bf16x6 where its memory fits the device (decided once per model)."""
        if self._auto_bf16x6 is None:
            num, n = self.images.shape
            self._auto_bf16x6 = self._split is not None or bf16x6_fits(n, num, available_memory(self.device))
            if not self._auto_bf16x6:
                log.info("pca_locality: the bf16x6 kernel would not fit the free memory of %s; dense "
                         "steps use the float32 kernel", self.device)
        return self._auto_bf16x6

    def dense_dtype(self, plan: MaskPlan, abar: float, scale: float, x64: torch.Tensor) -> torch.dtype:
        """The dtype a dense step needs: float64 where the rounding estimate of the float32
        kernel exceeds the tolerance (or dtype=float64), else float32."""
        if self.dtype == torch.float64:
            return torch.float64
        x_abs_max = float((x64 - math.sqrt(abar) * self.mean64).abs().max())
        estimate = dense_logit_error_estimate(plan, abar, scale, x_abs_max, self.y_abs_max, self.dtype)
        estimate *= KERNEL_ROUNDING_FACTOR[self.float32_kernel(plan)]
        return self.dtype if estimate <= LOGIT_TOLERANCE else torch.float64

    def strategy(self, plan: MaskPlan, dense_dtype: torch.dtype) -> str:
        """``sparse`` or ``dense`` for this step. CPU: the mask's own classification. CUDA: a
        sparse-eligible mask still goes dense unless it is sparser than the crossover for the
        dense step's dtype (the gathered kernel is memory-bound, the GEMM is not)."""
        if plan.strategy != "sparse" or self.device.type != "cuda":
            return plan.strategy
        return "sparse" if plan.density <= CUDA_SPARSE_MAX_DENSITY[dense_dtype] else "dense"

    def kernel(self, plan: MaskPlan, strategy: str, cdt: torch.dtype) -> str:
        """``sparse``, ``float64``, or for float32 dense steps :meth:`float32_kernel`."""
        if strategy == "sparse":
            return "sparse"
        return "float64" if cdt == torch.float64 else self.float32_kernel(plan)

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        t = int(t)
        abar = self.alpha_bar(t)
        a = math.sqrt(abar)
        scale = 1.0 / (2.0 * (1.0 - abar) * self.temperature)
        plan = self.plan(t)
        x64 = _flat(x_t).to(self.device, torch.float64)
        batch, n = x64.shape
        dense_dtype = self.dense_dtype(plan, abar, scale, x64)
        strategy = self.strategy(plan, dense_dtype)
        cdt = torch.float64 if strategy == "sparse" else dense_dtype  # sparse: float64 differences
        kernel = self.kernel(plan, strategy, cdt)
        self.last_strategy, self.last_kernel = (strategy, cdt), kernel
        if kernel == "bf16x6":
            return self._bf16x6_step(plan, x64, a, scale).to(x_t.dtype).reshape(x_t.shape)
        acc = OnlineSoftmaxAverage()
        if kernel == "sparse":
            # working set per image: diff, logits and one gathered slice [n, B]; the chunk
            for ys in self.chunks(batch, (3 * batch + 3) * (n + 1), 8):
                y = ys.T.to(torch.float64).contiguous()  # [n, K] pixel-major
                acc.update_pixel_major(sparse_logits(x64, y, plan.pairs, a, scale), y)
            return acc.result().to(x_t.dtype).reshape(x_t.shape)
        mean = self.mean64.to(cdt).unsqueeze(1)
        x_c = (x64 - a * self.mean64).to(cdt)
        mask_t = plan.dense_mask(cdt)
        item = torch.tensor([], dtype=cdt).element_size()
        # working set per image: cross and logits [n, B]; centred y, y², y²@M, values [n]
        for ys in self.chunks(batch, (2 * batch + 6) * n, item):
            y_c = ys.T.to(cdt).contiguous() - mean  # [n, K] pixel-major
            acc.update_pixel_major(dense_logits(x_c, y_c, mask_t, a, scale), y_c)
        out = acc.result() + self.mean64  # the average of centred values, shifted back
        return out.to(x_t.dtype).reshape(x_t.shape)

    def _bf16x6_step(self, plan: MaskPlan, x64: torch.Tensor, a: float, scale: float) -> torch.Tensor:
        """One float32-accurate dense step on tensor cores (:func:`dense_logits_bf16x6`).
        Samples run in groups whose split weights [6n, n_out·B] fit the memory budget."""
        if self._split is None:
            self._split = SplitImages(self.images, self.mean64)
        split, n = self._split, x64.shape[1]
        x_c = (x64 - a * self.mean64).float()  # [B, n] centred samples
        mask_t, mask3_t = plan.dense_mask(torch.float32), plan.mask_bf16x3()
        # 48 bytes per mask entry and sample: the split weights peak at 26 (float32 weights and
        # remainder, three parts, the six stacked), with headroom for the allocator
        group = max(1, memory_budget(self.device) // (48 * n * n))
        outs = []
        for b0 in range(0, x_c.shape[0], group):
            xs = x_c[b0 : b0 + group]
            weights6 = split_weights_bf16x6(xs, mask_t)
            acc = OnlineSoftmaxAverage()
            start = 0
            # bytes per image: logits [n, B] and y²@M [n] float32, plus the softmax's [n, 2]
            for chunk in self.chunks(len(xs), 4 * (len(xs) + 4) * n, 1, source=split.stacked):
                stop = start + len(chunk)
                logits = dense_logits_bf16x6(chunk, split.squares[start:stop], weights6, mask3_t,
                                             len(xs), a, scale)
                acc.update_pixel_major(logits, split.values[:, start:stop])
                start = stop
            outs.append(acc.result())
        return torch.cat(outs) + self.mean64
