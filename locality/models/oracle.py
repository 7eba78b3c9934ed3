"""The float64 oracles: SPEC's formulas computed the plain way (direct differences, one softmax
over all images, no chunks, no expanded distances, no kernels), shared by the tests and the
bench's deviation check. Slow on purpose; shapes x [B, n], images [N, n], outputs [B, n] float64.
"""

from __future__ import annotations

import math

import torch


def pca_locality_oracle(x: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, abar: float,
                        temperature: float = 1.0) -> torch.Tensor:
    """SPEC steps 3-4: logit_k(m) = -Σ_n M[n, m](x[n] - a y_k[n])² / (2(1-ᾱ)τ) for the mask
    M [n_in, n_out], x̂0[m] = Σ_k softmax_k(logit(m)) y_k[m]; one sample at a time."""
    y = images.double()
    out = []
    for row in x.double():
        sq = (row - math.sqrt(abar) * y).square()  # [N, n]
        weights = torch.softmax(-(sq @ mask.double()) / (2 * (1 - abar) * temperature), dim=0)  # [N, n]
        out.append((weights * y).sum(0))
    return torch.stack(out)


def optimal_oracle(x: torch.Tensor, images: torch.Tensor, abar: float, temperature: float = 1.0) -> torch.Tensor:
    """The empirical posterior mean: w_k ∝ exp(-‖x - a y_k‖² / (2(1-ᾱ)τ)), x̂0 = Σ_k w_k y_k."""
    y = images.double()
    dist = (x.double().unsqueeze(1) - math.sqrt(abar) * y.unsqueeze(0)).square().sum(-1)  # [B, N]
    return torch.softmax(-dist / (2 * (1 - abar) * temperature), dim=1) @ y


def nearest_oracle(x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The training image nearest to x (x unscaled, as in the reference); ties take the lowest
    index (``argmin`` returns the first minimum)."""
    y = images.double()
    dist = (x.double().unsqueeze(1) - y.unsqueeze(0)).square().sum(-1)  # [B, N]
    return y[dist.argmin(dim=1)]


def wiener_oracle(x: torch.Tensor, mean: torch.Tensor, filt: torch.Tensor, abar: float) -> torch.Tensor:
    """x̂0 = L_t x / sqrt(ᾱ) + (I - L_t) μ for the filter L_t [n, n] and the mean μ [n]."""
    eye = torch.eye(len(mean), dtype=torch.float64)
    return x.double() @ filt.double().T / math.sqrt(abar) + ((eye - filt.double()) @ mean.double())


def model_oracle(name: str, x: torch.Tensor, t: int, images: torch.Tensor, stats, params: dict) -> torch.Tensor:
    """The oracle of model ``name`` with its keyword ``params`` at timestep t (statistics from
    ``stats`` where the model has them): x [B, n], images [N, n] -> [B, n] float64."""
    from locality.models.base import Denoiser
    from locality.models.masks import locality_mask

    abar = Denoiser.alpha_bar(t)
    temperature = float(params.get("temperature", 1.0))
    if name == "pca_locality":
        return pca_locality_oracle(x, images, locality_mask(stats, abar, float(params["mask_threshold"])), abar,
                                   temperature)
    if name == "optimal":
        return optimal_oracle(x, images, abar, temperature)
    if name == "nearest_dataset":
        return nearest_oracle(x, images)
    if name == "wiener":
        return wiener_oracle(x, stats.mean, stats.wiener_filter(abar), abar)
    raise ValueError(f"no float64 oracle for model {name!r} (pca_locality, optimal, nearest_dataset, wiener)")
