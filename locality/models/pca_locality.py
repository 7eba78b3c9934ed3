"""pca_locality, the paper's analytical denoiser (SPEC, steps 1-4).

For each output value m, a softmax over ALL N training images of the masked distance
logit_k(m) = -Σ_n M_t[n, m] (x_t[n] - sqrt(ᾱ_t) y_k[n])² / (2(1-ᾱ_t)τ), and
x̂0[m] = Σ_k softmax_k(logit(m)) y_k[m]. The softmax is exact (online log-sum-exp), so the
output does not depend on the chunk size.
"""

from __future__ import annotations

import torch

from locality.models.analytical import _DatasetDenoiser, _flat
from locality.models.base import register_model
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

    @classmethod
    def from_data(cls, images: torch.Tensor, stats: DataStatistics, **params):
        return cls(images, stats, **params)

    def mask(self, t: int) -> torch.Tensor:
        """M_t [n, n] on the compute device (the same for every sample and chunk: built once)."""
        if t not in self._masks:
            m = locality_mask(self.stats, self.alpha_bar(t), self.mask_threshold)
            self._masks[t] = m.to(self.device, self.dtype)
        return self._masks[t]

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        t = int(t)
        abar = self.alpha_bar(t)
        mask = self.mask(t)
        x = _flat(x_t).to(self.device, self.dtype)
        batch, n = x.shape
        scale = 1.0 / (2.0 * (1.0 - abar) * self.temperature)
        acc = OnlineSoftmaxAverage()
        for ys in self.chunks(batch, 2 * n):
            sq = (x.unsqueeze(1) - abar**0.5 * ys.unsqueeze(0)).square()  # [B, K, n_in]
            logits = (sq.reshape(-1, n) @ mask).reshape(batch, -1, n)  # [B, K, n_out]
            acc.update(logits.mul_(-scale), ys)
        return acc.result().to(x_t.dtype).reshape(x_t.shape)
