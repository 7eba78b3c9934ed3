"""pca_locality, the paper's analytical denoiser (SPEC, steps 1-4).

For each output value m, a softmax over ALL N training images of the masked distance
logit_k(m) = -Σ_n M_t[n, m] (x_t[n] - sqrt(ᾱ_t) y_k[n])² / (2(1-ᾱ_t)τ), and
x̂0[m] = Σ_k softmax_k(logit(m)) y_k[m]. The softmax is exact (online log-sum-exp), so the
output does not depend on the chunk size.

The model keeps the masks and their plans (once per timestep) and the kernels' image sides
(once per model), and dispatches each step: :func:`.selection.step_candidates` lists the
kernels exact enough for it, :func:`.selection.choose_kernel` measures the fastest of them
(remembered per machine), and that kernel runs the step. ``dtype=float64`` allows only the
float64 kernels (the exactness oracle); ``dense_kernel=NAME`` forces one dense kernel.
"""

from __future__ import annotations

import torch

from locality.models.base import register_model
from locality.models.dataset import DatasetDenoiser, flatten
from locality.models.masks import locality_mask
from locality.models.native import measured_softmax
from locality.models.pca_locality.bf16 import Bf16x3Kernel, Bf16x6Kernel
from locality.models.pca_locality.float_gemm import FloatGemmKernel
from locality.models.pca_locality.gather import Int8GatherKernel
from locality.models.pca_locality.int8 import Int8Kernel
from locality.models.pca_locality.kernel import Kernel, Step, TrainingImages
from locality.models.pca_locality.plan import MaskPlan, plan_mask
from locality.models.pca_locality.selection import DENSE_KERNELS, choose_kernel, step_candidates
from locality.models.pca_locality.sparse import SparseKernel
from locality.statistics import DataStatistics


@register_model("pca_locality")
class PcaLocalityDenoiser(DatasetDenoiser):
    name = "pca_locality"
    needs_statistics = True
    float64_accumulation = True

    def __init__(self, images: torch.Tensor, stats: DataStatistics, temperature: float = 1.0,
                 mask_threshold: float = 0.02, dense_kernel: str = "auto", **kw) -> None:
        super().__init__(images, **kw)
        if not 0 < temperature < float("inf"):
            raise ValueError(f"model.temperature must be a finite number > 0, got {temperature}")
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
        self.training = TrainingImages(self.images, stats.mean)
        self.kernels: dict[str, Kernel] = {k.name: k for k in (
            FloatGemmKernel(self.training, torch.float32), FloatGemmKernel(self.training, torch.float64),
            Bf16x6Kernel(self.training), Bf16x3Kernel(self.training), Int8Kernel(self.training, "onednn"),
            Int8Kernel(self.training, "int_mm"), Int8GatherKernel(self.training), SparseKernel(self.training))}
        self.last_strategy: tuple[str, torch.dtype] | None = None  # (dense or sparse, dtype): tests, bench
        self.last_kernel: str | None = None  # the kernel of the last step, e.g. sparse, float32, int8_intmmx3

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
        """Whether each timestep planned so far allows the sparse kernel (``sparse``) or not (``dense``)."""
        return {t: p.strategy for t, p in self._plans.items()}

    def share_masks(self, other: PcaLocalityDenoiser) -> None:
        """Use ``other``'s masks and plans, built once for both (they are the same for two
        models of one statistics object, threshold and device: the bench's kernel table)."""
        if other.stats is not self.stats or other.mask_threshold != self.mask_threshold or other.device != self.device:
            raise ValueError("share_masks needs a model of the same statistics, mask_threshold and device")
        self._masks, self._plans = other._masks, other._plans

    def step_inputs(self, x_t: torch.Tensor, t: int) -> Step:
        """The :class:`Step` of x_t [B, C, H, W] at timestep t."""
        abar = self.alpha_bar(t)
        scale = 1.0 / (2.0 * (1.0 - abar) * self.temperature)
        x64 = flatten(x_t).to(self.device, torch.float64)
        return Step(t=int(t), plan=self.plan(int(t)), x64=x64, abar=abar, a=abar**0.5, scale=scale)

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        self.training.native = measured_softmax(self.tuner, self.dtype)  # the fused C softmax, if faster here
        step = self.step_inputs(x_t, t)
        kind, candidates = step_candidates(self.kernels, step, self.dense_kernel,
                                           float64_only=self.dtype == torch.float64)
        decision = choose_kernel(self.tuner, self.kernels, kind, candidates, step, self.chunk_size)
        kernel, precision = self.kernels[decision.kernel], candidates[decision.kernel]
        side = kernel.prepare(self.training.count, step, self.chunk_size)
        out = kernel.run(side, step, precision, self.chunk_size)
        self.last_strategy = ("sparse" if kernel.name == "sparse" else "dense", precision.dtype)
        self.last_kernel = kernel.label(precision)
        return out.to(x_t.dtype).reshape(x_t.shape)
