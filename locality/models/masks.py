"""The locality masks of pca_locality (SPEC, steps 1-2) and their conditioning rule."""

from __future__ import annotations

import torch

from locality.statistics import DataStatistics

SMALL_DIAGONAL = 1e-6  # SPEC step 1: |L[n, n]| below this is replaced by 1


def locality_mask(stats: DataStatistics, abar: float, threshold: float) -> torch.Tensor:
    """M_t [n_in, n_out] float64 for timestep ᾱ = ``abar``.

    1. M[n, m] = L_t[n, m] / L_t[n, n], a diagonal with |value| < 1e-6 replaced by 1;
    2. if threshold θ > 0: M = 1 where |M| ≥ θ · max|M| (over the whole matrix), else 0.
    Dead pixels (see :mod:`locality.statistics`) have zero rows and columns in L_t, hence in M.
    """
    filt = stats.wiener_filter(abar)
    diag = torch.diagonal(filt).clone()
    diag[diag.abs() < SMALL_DIAGONAL] = 1.0
    mask = filt / diag.unsqueeze(1)
    if threshold > 0:
        magnitude = mask.abs()
        mask = (magnitude >= threshold * magnitude.max()).to(torch.float64)
    return mask
