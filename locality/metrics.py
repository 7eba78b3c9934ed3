"""Agreement between two batches of images (SPEC, "Comparison with the UNet"). No Hydra, no MLflow.

For an analytical prediction ``a`` and the UNet's ``u`` of one image, each flattened to n values:

- R² = 1 - Σ(a - u)² / (n · var(u)), var the *unbiased* variance of u's n values; a UNet image of
  constant value (var = 0) — or of a single value, whose unbiased variance is undefined — uses
  var = 1, so that R² is then 1 - MSE.
- MSE = mean over the n values of (a - u)².

Both are computed per image in float64 and averaged over images (:class:`StepAverages` keeps the
running mean per sampling step across batches).
"""

from __future__ import annotations

import torch

__all__ = ["StepAverages", "mse_per_image", "r2_per_image"]


def _flat_pair(a: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != u.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(u.shape)}")
    if a.ndim < 2:
        raise ValueError(f"expected a batch [B, ...] of images, got shape {tuple(a.shape)}")
    a = a.detach().to("cpu", torch.float64).reshape(a.shape[0], -1)
    u = u.detach().to("cpu", torch.float64).reshape(u.shape[0], -1)
    return a, u


def mse_per_image(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """a, u [B, ...] -> [B] float64: the mean of (a - u)² over each image's values."""
    a, u = _flat_pair(a, u)
    return (a - u).square().mean(dim=1)


def r2_per_image(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """a (prediction), u (reference, the UNet) [B, ...] -> [B] float64 R² of a against u.

    R² = 1 - Σ(a - u)² / (n · var(u)), var unbiased over u's n values; var := 1 where it is 0
    (or undefined, n = 1). Not symmetric in a and u.
    """
    a, u = _flat_pair(a, u)
    n = a.shape[1]
    if n > 1:
        var = u.var(dim=1, unbiased=True)
        var = torch.where(var > 0, var, torch.ones_like(var))
    else:
        var = torch.ones(u.shape[0], dtype=torch.float64)
    return 1.0 - (a - u).square().sum(dim=1) / (n * var)


class StepAverages:
    """Running per-step means of per-image values over batches.

    ``add(step, values [B])`` accumulates; ``mean(step)`` is the mean over every image added at
    that step (nan if none); ``means()`` the list over steps 0..num_steps-1.
    """

    def __init__(self, num_steps: int) -> None:
        self.sums = [0.0] * num_steps
        self.counts = [0] * num_steps

    def add(self, step: int, values: torch.Tensor) -> None:
        values = values.detach().to("cpu", torch.float64).reshape(-1)
        self.sums[step] += float(values.sum())
        self.counts[step] += int(values.numel())

    def mean(self, step: int) -> float:
        return self.sums[step] / self.counts[step] if self.counts[step] else float("nan")

    def means(self) -> list[float]:
        return [self.mean(i) for i in range(len(self.sums))]
