"""The float64 oracles: SPEC's formulas computed the plain way (direct differences, one softmax
over all images, no chunks, no expanded distances, no kernels), shared by the tests and the
bench's deviation check. Slow on purpose; shapes x [B, n], images [N, n], outputs [B, n] float64
(els and pspc: images [B, C, H, W]; too slow and large for the bench, which checks those models
against their own float64 version, itself checked against these in tests/test_peers.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def els_oracle(x: torch.Tensor, y: torch.Tensor, t: int, k: int, variant: str) -> torch.Tensor:
    """The SPEC formula pixel by pixel: explicit candidate sets, padded windows, direct
    differences, one softmax per pixel over all candidates of all images. x [B, C, H, W],
    y [N, C, H, W] -> [B, C, H, W] float64 (els' shapes, not the flat ones of the others;
    memory B·N·P·k² for P candidate windows: small data only)."""
    from locality.models.base import Denoiser

    x, y = x.double(), y.double()
    abar = Denoiser.alpha_bar(t)
    a, s2 = math.sqrt(abar), 1.0 - abar
    _, c, h, w = x.shape
    d = k // 2
    mode = "circular" if variant == "circular" else "constant"
    xp = F.pad(x, (d, d, d, d), mode=mode) if d else x
    yp = F.pad(y, (d, d, d, d)) if d else y
    out = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            if variant == "local":
                cands = [(i, j)]
            elif variant == "circular":
                cands = [(u, v) for u in range(d, h - d) for v in range(d, w - d)]
            else:
                rows = [i] if (i < d or i > h - 1 - d) else list(range(d, h - d))
                cols = [j] if (j < d or j > w - 1 - d) else list(range(d, w - d))
                cands = [(u, v) for u in rows for v in cols]
            q = xp[:, :, i : i + k, j : j + k].reshape(x.shape[0], 1, -1)  # [B, 1, D]
            wins = torch.stack([yp[:, :, u : u + k, v : v + k].reshape(y.shape[0], -1) for u, v in cands], 1)
            vals = torch.stack([y[:, :, u, v] for u, v in cands], 1).reshape(-1, c)  # [N·P, C]
            dist = (q.unsqueeze(1) - a * wins.unsqueeze(0)).square().sum(-1).reshape(x.shape[0], -1)
            out[:, :, i, j] = torch.softmax(-dist / (2 * s2), dim=1) @ vals
    return out


def pspc_oracle(x: torch.Tensor, y: torch.Tensor, t: int, p: int, mirror: bool) -> torch.Tensor:
    """The SPEC formula window by window: m_R per p×p window, then the mean over the windows
    containing each pixel (p clipped to the image)."""
    from locality.models.base import Denoiser

    x, y = x.double(), y.double()
    if mirror:
        y = torch.cat([y, y.flip(-1)])
    abar = Denoiser.alpha_bar(t)
    a, s2 = math.sqrt(abar), 1.0 - abar
    b, c, h, w = x.shape
    ph, pw = min(p, h), min(p, w)
    total = torch.zeros_like(x)
    count = torch.zeros(h, w, dtype=torch.float64)
    for r in range(h - ph + 1):
        for q in range(w - pw + 1):
            xr = x[:, :, r : r + ph, q : q + pw].reshape(b, 1, -1)
            yr = y[:, :, r : r + ph, q : q + pw].reshape(1, y.shape[0], -1)
            wts = torch.softmax(-(xr - a * yr).square().sum(-1) / (2 * s2), dim=1)  # [B, N]
            total[:, :, r : r + ph, q : q + pw] += (wts @ yr[0]).reshape(b, c, ph, pw)
            count[r : r + ph, q : q + pw] += 1
    return total / count


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
