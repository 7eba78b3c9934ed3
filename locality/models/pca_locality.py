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
* ``dtype=float32`` (the app's default): dense steps in float32 when the rounding estimate
  :func:`~locality.models.fast_masked.dense_logit_error_estimate` allows it, else float64;
  sparse (low-noise) steps always gather float64 differences.

Chunk sizes derive from the free memory of the device (:mod:`locality.models.memory`),
unless ``chunk_size`` is given.
"""

from __future__ import annotations

import math

import torch

from locality.models.analytical import _DatasetDenoiser, _flat
from locality.models.base import register_model
from locality.models.fast_masked import (
    LOGIT_TOLERANCE, MaskPlan, dense_logit_error_estimate, dense_logits, plan_mask, sparse_logits,
)
from locality.models.masks import locality_mask
from locality.models.softmax import OnlineSoftmaxAverage
from locality.statistics import DataStatistics


@register_model("pca_locality")
class PcaLocalityDenoiser(_DatasetDenoiser):
    name = "pca_locality"

    def __init__(self, images: torch.Tensor, stats: DataStatistics, temperature: float = 1.0,
                 mask_threshold: float = 0.02, **kw) -> None:
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
        self.stats = stats
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

    @classmethod
    def from_data(cls, images: torch.Tensor, stats: DataStatistics, **params):
        return cls(images, stats, **params)

    def mask(self, t: int) -> torch.Tensor:
        """M_t [n, n] float64 on the CPU (the same for every sample and chunk: built once)."""
        if t not in self._masks:
            self._masks[t] = locality_mask(self.stats, self.alpha_bar(t), self.mask_threshold)
        return self._masks[t]

    def plan(self, t: int) -> MaskPlan:
        """The timestep's strategy and mask on the device (built once per timestep)."""
        if t not in self._plans:
            self._plans[t] = plan_mask(self.mask(t), self.device, self.dtype)
        return self._plans[t]

    def compute_dtype(self, plan: MaskPlan, abar: float, scale: float, x64: torch.Tensor) -> torch.dtype:
        """float64 for sparse steps and where the float32 rounding estimate exceeds the tolerance."""
        if plan.strategy == "sparse" or self.dtype == torch.float64:
            return torch.float64
        x_abs_max = float((x64 - math.sqrt(abar) * self.mean64).abs().max())
        estimate = dense_logit_error_estimate(plan, abar, scale, x_abs_max, self.y_abs_max, self.dtype)
        return self.dtype if estimate <= LOGIT_TOLERANCE else torch.float64

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        t = int(t)
        abar = self.alpha_bar(t)
        a = math.sqrt(abar)
        scale = 1.0 / (2.0 * (1.0 - abar) * self.temperature)
        plan = self.plan(t)
        x64 = _flat(x_t).to(self.device, torch.float64)
        batch, n = x64.shape
        cdt = self.compute_dtype(plan, abar, scale, x64)
        self.last_strategy = (plan.strategy, cdt)
        item = torch.tensor([], dtype=cdt).element_size()
        acc = OnlineSoftmaxAverage()
        if plan.strategy == "sparse":
            # working set per image: diff, logits and one gathered slice [n, B]; the chunk
            for ys in self.chunks(batch, (3 * batch + 3) * (n + 1), item):
                y = ys.T.to(torch.float64).contiguous()  # [n, K] pixel-major
                acc.update_pixel_major(sparse_logits(x64, y, plan.pairs, a, scale), y)
            return acc.result().to(x_t.dtype).reshape(x_t.shape)
        mask_t = plan.mask if cdt == self.dtype else self._mask64(plan)
        mean = self.mean64.to(cdt).unsqueeze(1)
        x_c = (x64 - a * self.mean64).to(cdt)
        # working set per image: cross and logits [n, B]; centred y, y², y²@M, values [n]
        for ys in self.chunks(batch, (2 * batch + 6) * n, item):
            y_c = ys.T.to(cdt).contiguous() - mean  # [n, K] pixel-major
            acc.update_pixel_major(dense_logits(x_c, y_c, mask_t, a, scale), y_c)
        out = acc.result() + self.mean64  # the average of centred values, shifted back
        return out.to(x_t.dtype).reshape(x_t.shape)

    @staticmethod
    def _mask64(plan: MaskPlan) -> torch.Tensor:
        if plan.mask64 is None:
            plan.mask64 = plan.source.T.contiguous().to(plan.mask.device, torch.float64)  # θ = 0: not float32-exact
        return plan.mask64
