"""optimal: the posterior mean under the empirical distribution of the training images, exact
over all N of them (SPEC), with its kernels measured like pca_locality's.

w_k ∝ exp(-‖x_t - sqrt(ᾱ) y_k‖² / (2(1-ᾱ)τ)), x̂0 = Σ_k w_k y_k. Expanded form:
‖x - a y_k‖² = ‖x‖² - 2a x·y_k + a²‖y_k‖²; ‖x‖² is the same for every k and cancels in the
softmax, ‖y_k‖² is computed once (float64) at construction, so a step is two GEMMs per chunk
([B, n] @ [n, K] for the logits, [B, K] @ [K, n] for the average) through the exact online
softmax. Chunks are kept small on the CPU (``CPU_CHUNK_CAP_BYTES``) so that both products read
a chunk while it is still in cache: the step is bound by reading the images once.

Kernels (``last_kernel``):

* ``float32``: the cross term 2as·x·y_k in float32, where the random-walk estimate of its
  rounding, u·s·2a·‖x‖·max‖y‖, is at most LOGIT_TOLERANCE (calibrated on the full
  Fashion-MNIST with every step forced to float32: ~10x above the measured deviation);
* ``float64``: everything in float64 (chunks converted as they are read); the only kernel of
  ``dtype=float64`` (the exactness oracle);
* ``screened`` (``dtype=float32``, where float32 is not accurate enough: low noise): float32
  logits of every image with a rigorous bound on their rounding, then the exact float64 softmax
  over the images that can matter (:meth:`OptimalDenoiser.screened`).

Where float32 is not accurate enough, float64 and screened are both exact: which runs is
measured (:class:`~locality.models.autotune.KernelTuner`).
"""

from __future__ import annotations

import math

import torch

from locality.models.base import register_model
from locality.models.dataset import DatasetDenoiser, flatten
from locality.models.softmax import LOGIT_TOLERANCE, OnlineSoftmaxAverage
from locality.statistics import DataStatistics

SCREEN_TAIL = 40.0  # images this far below the best logit are dropped: weight < e^-40 each
SCREEN_MAX_FRACTION = 0.25  # screened falls back to float64 when more of the images survive
CPU_CHUNK_CAP_BYTES = 4 << 20  # ~1 300 images of 784 values: both products read a chunk from cache


@register_model("optimal")
class OptimalDenoiser(DatasetDenoiser):
    """See the module docstring. ``temperature`` τ > 0 scales the softmax."""

    name = "optimal"
    float64_accumulation = True

    def __init__(self, images: torch.Tensor, temperature: float = 1.0, **kw) -> None:
        super().__init__(images, **kw)
        if not 0 < temperature < float("inf"):
            raise ValueError(f"model.temperature must be a finite number > 0, got {temperature}")
        self.temperature = float(temperature)
        self.sq_norms, self.y_norm_max = self.image_norms()
        self.last_kernel: str | None = None  # float32, float64 or screened (tests, bench)

    @classmethod
    def from_data(cls, images: torch.Tensor, stats: DataStatistics, **params) -> "OptimalDenoiser":
        return cls(images, **params)

    def candidates(self, x64: torch.Tensor, abar: float, scale: float) -> tuple[str, list[str]]:
        """(kind, kernels) that are exact enough for samples x64 [B, n] at ᾱ (module docstring)."""
        if self.dtype == torch.float64:
            return "float64", ["float64"]
        xn = float(x64.norm(dim=1).max())
        estimate = torch.finfo(self.dtype).eps * scale * 2 * math.sqrt(abar) * xn * self.y_norm_max
        if estimate <= LOGIT_TOLERANCE:
            return "float32", ["float32"]
        return "low_noise", ["float64", "screened"]

    def run(self, kernel: str, x64: torch.Tensor, a: float, scale: float, count: int) -> tuple[torch.Tensor, str]:
        """(x̂0 [B, n] float64 over the first ``count`` images, the kernel that ran it):
        ``screened`` runs float64 where too many images survive its screen."""
        if kernel == "screened":
            out = self.screened(x64, a, scale, count)
            if out is not None:
                return out, "screened"
            kernel = "float64"
        dtype = torch.float32 if kernel == "float32" else torch.float64
        return self.streamed(x64, a, scale, dtype, count), kernel

    def streamed(self, x64: torch.Tensor, a: float, scale: float, dtype: torch.dtype, count: int) -> torch.Tensor:
        """The exact softmax average over the first ``count`` images with the cross term in
        ``dtype`` (images converted chunk by chunk). [B, n] float64."""
        batch, n = x64.shape
        x = (x64 * (2.0 * a * scale)).to(dtype)  # [B, n]: the logit's factor folded in
        acc = OnlineSoftmaxAverage()
        item = torch.finfo(dtype).bits // 8
        for start, y in self.chunks((n + 2 * batch) * item, count, CPU_CHUNK_CAP_BYTES):
            y = y.to(dtype)
            logits = (x @ y.T).double()  # [B, K]
            logits -= (a * a * scale) * self.sq_norms[start : start + len(y)]
            acc.update(logits.to(dtype), y)
        return acc.result()

    def screened(self, x64: torch.Tensor, a: float, scale: float, count: int) -> torch.Tensor | None:
        """The low-noise kernel over the first ``count`` images: float32 logits of every image,
        a rigorous bound on their rounding, then the exact float64 softmax over the images that
        can matter.

        Pass 1 computes l_k = 2as·x·y_k - a²s‖y_k‖² with a float32 cross term; its error is at
        most (n+1)·u·2as·‖x‖·‖y_k‖ (u = 2^-24; a dot product of n terms plus the rounding of x).
        Images whose l_k lies more than 2·bound + SCREEN_TAIL below the largest have exact
        weights below e^-SCREEN_TAIL of the largest one; they are dropped (their total weight
        is under N·e^-40 ≈ 1e-13 for N = 60 000). Pass 2 recomputes the survivors' distances
        ‖x - a y_k‖² directly in float64 (the float32 images are exact in float64). Returns None
        when more than SCREEN_MAX_FRACTION of the images survive. Result [B, n] float64."""
        batch, n = x64.shape
        x32 = (x64 * (2.0 * a * scale)).to(torch.float32)
        logits = torch.empty(batch, count, dtype=torch.float64, device=self.device)
        for start, y in self.chunks((n + batch) * 4, count, CPU_CHUNK_CAP_BYTES):
            stop = start + len(y)
            logits[:, start:stop] = (x32 @ y.T).double() - (a * a * scale) * self.sq_norms[start:stop]
        bound = (n + 1) * 2.0**-24 * (2.0 * a * scale) * x64.norm(dim=1) * self.y_norm_max  # [B]
        cutoff = logits.amax(dim=1) - 2.0 * bound - SCREEN_TAIL
        keep = logits >= cutoff.unsqueeze(1)
        if int(keep.sum(dim=1).max()) > count * SCREEN_MAX_FRACTION:
            return None
        out = torch.empty(batch, n, dtype=torch.float64, device=self.device)
        images = self.images[:count]
        for b in range(batch):
            ys = images[keep[b]].to(torch.float64)  # [C, n]
            dist = (x64[b] - a * ys).square().sum(dim=1)
            out[b] = torch.softmax(-dist * scale, dim=0) @ ys
        return out

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        abar = self.alpha_bar(t)
        a = math.sqrt(abar)
        x64 = flatten(x_t).to(self.device, torch.float64)
        scale = 1.0 / (2.0 * (1.0 - abar) * self.temperature)
        kind, names = self.candidates(x64, abar, scale)
        runs = {name: (lambda xs, count, name=name: self.run(name, xs, a, scale, count)) for name in names}
        chosen = self.measured_kernel(kind, runs, x64)
        out, self.last_kernel = self.run(chosen, x64, a, scale, self.images.shape[0])
        return out.to(x_t.dtype).reshape(x_t.shape)
