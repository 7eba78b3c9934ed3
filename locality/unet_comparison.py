"""Per-step comparison of a denoiser's sampling run with the baseline UNet (SPEC, "Comparison with
the UNet"). Plain values in, numbers and PNGs out: no Hydra, no MLflow (pass ``log_fn``).

Both models start from the SAME initial noise and use the same DDIM sampler. At step i:

- trajectory: R² / MSE between the analytical x̂0 (on the analytical trajectory) and the UNet's
  x̂0 on the UNet's own trajectory;
- single step: the UNet applied to the analytical model's own x_t, against the analytical x̂0.

R² is of the analytical x̂0 against the UNet's (the UNet image's variance in the denominator), both
averaged over images (:mod:`locality.metrics`).

Usage with :func:`locality.sampling.sample` (what the run app does)::

    cmp = UNetComparison(unet, noise, timesteps, clip_x0=True)
    result = sample(model, ..., noise=noise, on_step=cmp.on_step)
    metrics = cmp.metrics()

The UNet trajectory of each batch is sampled lazily when the analytical run reaches that batch's
first step, so memory holds one batch's trajectory, never the whole run's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from locality.metrics import StepAverages, mse_per_image, r2_per_image
from locality.ddim import DenoiserFn, ddim_sample

#: The metric names, per step (MLflow ``step=i``) and with ``_final`` for the last step.
METRIC_NAMES = ("r2_vs_unet", "mse_vs_unet", "r2_vs_unet_single", "mse_vs_unet_single")

LogFn = Callable[[dict[str, float], int], None]


class UNetComparison:
    """Accumulates the per-step comparison while an analytical model samples (see module doc).

    Args:
        unet: the baseline denoiser (x_t, t) -> x̂0 (e.g. :class:`locality.models.unet_denoiser.UNetDenoiser`).
        noise: the initial noise [N, C, H, W] the analytical run starts from (same tensor!).
        timesteps: the sampler's timesteps (descending), as used by the analytical run.
        clip_x0: the sampler's clip option (the UNet trajectory uses the same sampler).
        grid_images: how many of the first images to keep per step for the comparison grids.
    """

    def __init__(self, unet: DenoiserFn, noise: torch.Tensor, timesteps, *, clip_x0: bool = True,
                 grid_images: int = 8) -> None:
        self.unet = unet
        self.noise = noise
        self.timesteps = [int(t) for t in timesteps]
        self.clip_x0 = clip_x0
        S = len(self.timesteps)
        self.acc = {name: StepAverages(S) for name in METRIC_NAMES}
        self.grid_images = max(0, min(int(grid_images), noise.shape[0]))
        # Per step: the first grid_images of analytical x̂0, UNet single-step x̂0, UNet trajectory x̂0.
        self.grid: list[dict[str, list[torch.Tensor]]] = [
            {"analytical": [], "unet_single": [], "unet_trajectory": []} for _ in range(S)
        ]
        self.unet_samples: list[torch.Tensor] = []
        self.unet_time_s = 0.0
        self.single_step_time_s = 0.0
        self._part: tuple[int, int] | None = None
        self._traj: list[torch.Tensor] = []  # UNet x̂0 per step of the current batch (CPU)

    # ------------------------------------------------------------------ sampling hooks

    def _sample_unet(self, part: slice, device: torch.device) -> None:
        """The UNet's own DDIM trajectory from noise[part]; keeps its x̂0 per step."""
        traj: list[torch.Tensor] = []
        start = time.perf_counter()
        final = ddim_sample(
            self.unet, self.noise[part].to(device), torch.tensor(self.timesteps), clip_x0=self.clip_x0,
            callback=lambda i, t, x, x0: traj.append(x0.detach().cpu()),
        )
        self.unet_time_s += time.perf_counter() - start
        self.unet_samples.append(final.detach().cpu())
        self._traj = traj
        self._part = (part.start, part.stop)

    def on_step(self, i: int, t: int, x_t: torch.Tensor, x0: torch.Tensor, part: slice) -> None:
        """The ``on_step`` hook of :func:`locality.sampling.sample` (batch ``part`` at step i)."""
        if t != self.timesteps[i]:
            raise ValueError(f"step {i} runs at t={t}, but the comparison was set up for t={self.timesteps[i]}")
        if self._part != (part.start, part.stop):
            self._sample_unet(part, x_t.device)
        a = x0.detach().cpu()
        u_traj = self._traj[i]
        start = time.perf_counter()
        u_single = self.unet(x_t, t).detach().cpu()
        self.single_step_time_s += time.perf_counter() - start
        self.acc["r2_vs_unet"].add(i, r2_per_image(a, u_traj))
        self.acc["mse_vs_unet"].add(i, mse_per_image(a, u_traj))
        self.acc["r2_vs_unet_single"].add(i, r2_per_image(a, u_single))
        self.acc["mse_vs_unet_single"].add(i, mse_per_image(a, u_single))
        keep = self.grid_images - part.start
        if keep > 0:
            g = self.grid[i]
            g["analytical"].append(a[:keep].float())
            g["unet_single"].append(u_single[:keep].float())
            g["unet_trajectory"].append(u_traj[:keep].float())

    # ------------------------------------------------------------------ results

    def per_step(self) -> dict[str, list[float]]:
        """{metric name: [value at step 0, 1, …]} (averaged over images)."""
        return {name: acc.means() for name, acc in self.acc.items()}

    def metrics(self) -> dict[str, float | list]:
        """The run's metrics.json entries: ``<name>_final`` (last step), ``<name>_per_step`` lists,
        ``comparison_timesteps``, ``comparison_num_images`` and the UNet's timings."""
        out: dict[str, float | list] = {"comparison_timesteps": list(self.timesteps)}
        for name, values in self.per_step().items():
            out[f"{name}_final"] = values[-1]
            out[f"{name}_per_step"] = values
        out["comparison_num_images"] = self.acc["r2_vs_unet"].counts[-1]
        out["unet_sampling_time_total_s"] = self.unet_time_s
        out["unet_single_step_time_total_s"] = self.single_step_time_s
        return out

    def log_steps(self, log_fn: LogFn) -> None:
        """``log_fn({name: value}, step=i)`` for every step (MLflow: one curve per metric)."""
        per_step = self.per_step()
        for i in range(len(self.timesteps)):
            log_fn({name: values[i] for name, values in per_step.items()}, i)

    def grid_rows(self, i: int) -> torch.Tensor:
        """[3·K, C, H, W]: analytical x̂0, UNet single-step x̂0, UNet trajectory x̂0 (K images each)."""
        g = self.grid[i]
        return torch.cat([torch.cat(g[key]) for key in ("analytical", "unet_single", "unet_trajectory")])

    def save_grids(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``step_{i:02d}_t{t:04d}.png`` (rows: analytical, UNet single step, UNet trajectory)
        per step and ``unet_samples.png`` (the UNet's final samples) into ``folder``."""
        from locality.images import save_grid

        folder = Path(folder)
        written = []
        if self.grid_images > 0 and self.grid[0]["analytical"]:
            for i, t in enumerate(self.timesteps):
                written.append(save_grid(self.grid_rows(i), folder / f"step_{i:02d}_t{t:04d}.png",
                                         columns=self.grid_images))
        if self.unet_samples:
            written.append(save_grid(torch.cat(self.unet_samples), folder / "unet_samples.png",
                                     columns=max(1, self.grid_images)))
        return written


def compare_with_unet(
    model: DenoiserFn, unet: DenoiserFn, *, num_samples: int, image_shape: tuple[int, int, int],
    num_steps: int = 10, seed: int = 42, batch_size: int = 8, device: torch.device | str = "cpu",
    clip_x0: bool = True, noise: torch.Tensor | None = None, grid_images: int = 8,
    progress: bool = False,
):
    """Sample ``model`` and compare it with ``unet`` step by step. Returns (SamplingResult of the
    model, :class:`UNetComparison`). The noise is drawn as :func:`locality.sampling.sample` does."""
    from locality.sampling import sample
    from locality.ddim import initial_noise
    from locality.schedule import ddim_timesteps

    if noise is None:
        noise = initial_noise((num_samples, *image_shape), torch.Generator().manual_seed(seed))
    cmp = UNetComparison(unet, noise, ddim_timesteps(num_steps), clip_x0=clip_x0, grid_images=grid_images)
    result = sample(model, num_samples=num_samples, image_shape=image_shape, num_steps=num_steps,
                    seed=seed, batch_size=batch_size, device=device, clip_x0=clip_x0, noise=noise,
                    on_step=cmp.on_step, progress=progress)
    return result, cmp
