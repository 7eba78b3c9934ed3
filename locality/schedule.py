"""The DDPM noise schedule and the x̂0 <-> ε conversions, in float64.

Everything here is schedule arithmetic: it is done in float64 and only cast to the
working dtype at the point of use, so that every platform sees the same ᾱ_t.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def linear_betas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """β_1..β_T linear from 1e-4 to 0.02 inclusive, shape [T], float64."""
    return torch.linspace(BETA_START, BETA_END, num_train_timesteps, dtype=torch.float64)


def alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """ᾱ_t = prod_{i<=t} (1 - β_i), shape [T], float64 (index t = 0..T-1)."""
    return torch.cumprod(1.0 - linear_betas(num_train_timesteps), dim=0)


def alpha_bar(t: int | torch.Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """ᾱ at integer timestep(s) t as float64; ᾱ := 1 for t < 0 (the step after the last)."""
    table = alphas_cumprod(num_train_timesteps)
    t = torch.as_tensor(t, dtype=torch.long)
    out = torch.ones(t.shape, dtype=torch.float64)
    valid = t >= 0
    out[valid] = table[t[valid]]
    return out


def ddim_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """DDIM "leading" spacing: r = T // S, timesteps r·(S-1), …, r, 0 (descending), shape [S], int64."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"sampler.num_steps must be between 1 and {num_train_timesteps}, got {num_steps}"
        )
    ratio = num_train_timesteps // num_steps
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.long) * ratio


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar: float) -> torch.Tensor:
    """ε̂ = (x_t - sqrt(ᾱ_t) x̂0) / sqrt(1 - ᾱ_t)  (DDIM, Song et al. 2021, eq. 12)."""
    return (x_t - abar**0.5 * x0) / (1.0 - abar) ** 0.5


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    """x̂0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)  (DDPM, Ho et al. 2020, eq. 4 inverted)."""
    return (x_t - (1.0 - abar) ** 0.5 * eps) / abar**0.5
