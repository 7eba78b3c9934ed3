"""DDIM (η = 0) as a pure function of a denoiser, a timestep tensor and a generator.

The sampler knows nothing of models: it calls ``denoiser(x_t, t) -> x̂0`` (see
:class:`locality.models.base.Denoiser`) and does the update of SPEC.md:

    ε̂ = (x_t - sqrt(ᾱ_t) x̂0) / sqrt(1 - ᾱ_t)
    x_{t'} = sqrt(ᾱ_{t'}) clamp(x̂0, -1, 1) + sqrt(1 - ᾱ_{t'}) ε̂,   t' = t - T/S, ᾱ_{t'<0} := 1

The returned sample is the last x̂0 (the prediction at the last timestep), not x after the
last update. Schedule arithmetic is float64; tensors stay in the dtype of ``x_T``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from locality.schedule import NUM_TRAIN_TIMESTEPS, alpha_bar, eps_from_x0


class DenoiserFn(Protocol):
    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor: ...


StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x_T ~ N(0, I) drawn on the CPU from ``generator``, so a seed gives the same noise on
    every device; move it to the compute device afterwards. Shape ``shape`` = [B, C, H, W]."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def ddim_step(
    x_t: torch.Tensor, x0_pred: torch.Tensor, t: int, t_prev: int, clip_x0: bool = True
) -> torch.Tensor:
    """One DDIM η=0 update from timestep t to t_prev (t_prev < 0 means ᾱ = 1)."""
    abar_t = float(alpha_bar(t))
    abar_prev = float(alpha_bar(t_prev))
    eps = eps_from_x0(x_t, x0_pred, abar_t)  # from the unclamped x̂0
    x0_used = x0_pred.clamp(-1.0, 1.0) if clip_x0 else x0_pred
    return abar_prev**0.5 * x0_used + (1.0 - abar_prev) ** 0.5 * eps


def ddim_sample(
    denoiser: DenoiserFn,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    clip_x0: bool = True,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run DDIM from x_T [B, C, H, W] through ``timesteps`` (descending, int64 [S]).

    ``callback(step_index, t, x_t, x0_pred)`` is called after each denoiser call (for
    intermediates, metrics, progress). Returns the last x̂0, [B, C, H, W].
    """
    timesteps = [int(t) for t in timesteps]
    if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {timesteps}")
    if timesteps and not 0 <= timesteps[-1] <= timesteps[0] < num_train_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {timesteps}")
    # The step size r is the gap between timesteps; the last step goes to t - r < 0 (ᾱ = 1).
    ratio = timesteps[0] - timesteps[1] if len(timesteps) > 1 else num_train_timesteps
    iterator = range(len(timesteps))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="sampling", unit="step", leave=False)
    x = x_T
    x0_pred = x_T
    for i in iterator:
        t = timesteps[i]
        x0_pred = denoiser(x, t)
        if callback is not None:
            callback(i, t, x, x0_pred)
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else t - ratio
        x = ddim_step(x, x0_pred, t, t_prev, clip_x0=clip_x0)
    return x0_pred
