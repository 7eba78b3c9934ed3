"""The closed-form baselines: the Wiener filter, the optimal (empirical posterior mean) denoiser
and the nearest training image. Formulas from SPEC.md; shapes [B, C, H, W] in and out."""

from __future__ import annotations

import torch

from locality.models.base import Denoiser, register_model
from locality.models.memory import chunk_rows
from locality.models.softmax import OnlineSoftmaxAverage
from locality.statistics import DataStatistics


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1)


@register_model("wiener")
class WienerDenoiser(Denoiser):
    """x̂0 = L_t x_t / sqrt(ᾱ_t) + (I - L_t) μ with L_t = U diag(ᾱλ/((1-ᾱ)+ᾱλ)) Uᵀ."""

    name = "wiener"

    def __init__(self, stats: DataStatistics, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64) -> None:
        self.stats = stats
        self.device = torch.device(device)
        self.dtype = dtype
        self._filters: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_data(cls, images: torch.Tensor, stats: DataStatistics, **params) -> "WienerDenoiser":
        return cls(stats, **params)

    def _filter(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if t not in self._filters:
            abar = self.alpha_bar(t)
            filt = self.stats.wiener_filter(abar)  # float64, symmetric
            offset = self.stats.mean - filt @ self.stats.mean  # (I - L) μ
            scaled = filt / abar**0.5
            self._filters[t] = (
                scaled.to(self.device, self.dtype),
                offset.to(self.device, self.dtype),
            )
        return self._filters[t]

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        scaled, offset = self._filter(int(t))
        x = _flat(x_t).to(self.dtype)
        return (x @ scaled.T + offset).to(x_t.dtype).reshape(x_t.shape)


class _DatasetDenoiser(Denoiser):
    """Holds the training images flattened [N, n] on the compute device."""

    def __init__(self, images: torch.Tensor, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64, chunk_size: int | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.images = _flat(images).to(self.device, self.dtype)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or null, got {chunk_size}")
        self.chunk_size = chunk_size

    def chunks(self, batch: int, values_per_image: int, itemsize: int | None = None):
        """Yield slices [K, n] of the dataset. K = ``chunk_size`` if given, else sized so that
        the working set (``values_per_image`` elements of ``itemsize`` bytes per image, e.g.
        [batch, K, n] intermediates) fits the device's memory budget (:mod:`.memory`)."""
        num = self.images.shape[0]
        itemsize = itemsize or self.images.element_size()
        size = chunk_rows(values_per_image * itemsize, self.device, self.chunk_size, total=num)
        for start in range(0, num, size):
            yield self.images[start : start + size]


@register_model("optimal")
class OptimalDenoiser(_DatasetDenoiser):
    """Posterior mean under the empirical distribution, exact over all N images:
    w_k ∝ exp(-‖x_t - sqrt(ᾱ) y_k‖² / (2(1-ᾱ)τ)), x̂0 = Σ_k w_k y_k.

    Expanded form: ‖x - a y_k‖² = ‖x‖² - 2a x·y_k + a²‖y_k‖²; ‖x‖² is the same for every k and
    cancels in the softmax, ‖y_k‖² is computed once (float64) at construction, so a step is two
    GEMMs per chunk ([B, n] @ [n, K] for the logits, [B, K] @ [K, n] for the average). The
    GEMMs run in float64 whenever the float32 rounding bound u·s·(2a|x|·|y| + a²|y|²) exceeds
    LOGIT_TOLERANCE (always at t ≈ 0, where s = 1/(2(1-ᾱ)τ) reaches 5000): the expanded form
    cancels there, float64 keeps it ~1e-10 in the logits.
    """

    name = "optimal"

    def __init__(self, images: torch.Tensor, temperature: float = 1.0, **kw) -> None:
        super().__init__(images, **kw)
        if not temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        sq = [ys.double().square().sum(1) for ys in self.images.split(8192)]
        self.sq_norms = torch.cat(sq) if sq else torch.zeros(0, dtype=torch.float64, device=self.device)
        self.y_norm_max = float(self.sq_norms.max().sqrt()) if len(self.sq_norms) else 0.0
        self.last_dtype: torch.dtype | None = None

    @classmethod
    def from_data(cls, images: torch.Tensor, stats: DataStatistics, **params) -> "OptimalDenoiser":
        return cls(images, **params)

    def _compute_dtype(self, x64: torch.Tensor, abar: float, scale: float) -> torch.dtype:
        if self.dtype == torch.float64:
            return torch.float64
        from locality.models.fast_masked import LOGIT_TOLERANCE

        a = abar**0.5
        xn = float(x64.norm(dim=1).max())
        bound = torch.finfo(self.dtype).eps * scale * (2 * a * xn * self.y_norm_max + abar * self.y_norm_max**2)
        return self.dtype if bound * x64.shape[1] ** 0.5 <= LOGIT_TOLERANCE else torch.float64

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        abar = self.alpha_bar(t)
        a = abar**0.5
        x64 = _flat(x_t).to(self.device, torch.float64)
        scale = 1.0 / (2.0 * (1.0 - abar) * self.temperature)
        cdt = self._compute_dtype(x64, abar, scale)
        self.last_dtype = cdt
        x = (x64 * (2.0 * a * scale)).to(cdt)  # [B, n]: the logit's factor folded in
        acc = OnlineSoftmaxAverage()
        start = 0
        item = torch.tensor([], dtype=cdt).element_size()
        for ys in self.chunks(x.shape[0], x.shape[1] + 2 * x.shape[0], item):
            y = ys.to(cdt)
            logits = (x @ y.T).double()  # [B, K]
            logits -= (a * a * scale) * self.sq_norms[start : start + len(ys)]
            acc.update(logits.to(cdt), y, inplace=True)
            start += len(ys)
        return acc.result().to(x_t.dtype).reshape(x_t.shape)


@register_model("nearest_dataset")
class NearestDatasetDenoiser(_DatasetDenoiser):
    """x̂0 = y_k with k = argmin ‖x_t - y_k‖ (x_t unscaled, as in the reference); ties take
    the lowest index."""

    name = "nearest_dataset"

    @classmethod
    def from_data(cls, images: torch.Tensor, stats: DataStatistics, **params):
        return cls(images, **params)

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        x = _flat(x_t).to(self.device, self.dtype)
        best = torch.full((x.shape[0],), float("inf"), dtype=self.dtype, device=self.device)
        best_img = torch.zeros_like(x)
        for ys in self.chunks(x.shape[0], x.shape[1]):
            dist = (x.unsqueeze(1) - ys.unsqueeze(0)).square().sum(-1)  # [B, K]
            d, idx = dist.min(dim=1)  # first minimum within the chunk
            better = d < best  # strict: earlier chunks win ties
            best = torch.where(better, d, best)
            best_img = torch.where(better.unsqueeze(1), ys[idx], best_img)
        return best_img.to(x_t.dtype).reshape(x_t.shape)
