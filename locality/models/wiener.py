"""The Wiener filter: the linear (Gaussian) denoiser from the data's mean and covariance."""

from __future__ import annotations

import torch

from locality.models.base import Denoiser, register_model
from locality.models.dataset import flatten
from locality.statistics import DataStatistics


@register_model("wiener")
class WienerDenoiser(Denoiser):
    """x̂0 = L_t x_t / sqrt(ᾱ_t) + (I - L_t) μ with L_t = U diag(ᾱλ/((1-ᾱ)+ᾱλ)) Uᵀ."""

    name = "wiener"
    needs_statistics = True

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
        x = flatten(x_t).to(self.dtype)
        return (x @ scaled.T + offset).to(x_t.dtype).reshape(x_t.shape)
