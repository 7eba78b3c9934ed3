"""Sampling a denoiser in batches, with timings and (optionally) the whole trajectory.

Plain values in, tensors out: this is what the run app, the benchmark and notebooks share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from locality.ddim import DenoiserFn, ddim_sample, initial_noise
from locality.schedule import ddim_timesteps


@dataclass
class SamplingResult:
    """samples [S, C, H, W] (CPU, the last x̂0); x_t / x0_pred: per step [S, C, H, W] when kept."""

    samples: torch.Tensor
    timesteps: list[int]
    step_times_s: list[float]
    total_time_s: float
    x_t: list[torch.Tensor] = field(default_factory=list)
    x0_pred: list[torch.Tensor] = field(default_factory=list)

    @property
    def time_per_step_s(self) -> float:
        return self.total_time_s / max(1, len(self.timesteps))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def sample(
    denoiser: DenoiserFn,
    *,
    num_samples: int,
    image_shape: tuple[int, int, int],
    num_steps: int = 10,
    seed: int = 42,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    clip_x0: bool = True,
    keep_trajectory: bool = False,
    progress: bool = False,
    on_step: Callable[[int, int, torch.Tensor, torch.Tensor, slice], None] | None = None,
    noise: torch.Tensor | None = None,
) -> SamplingResult:
    """Draw ``num_samples`` images with DDIM.

    The initial noise of all samples is drawn at once on the CPU from ``seed`` (or given as
    ``noise`` [S, C, H, W]), so the samples do not depend on ``batch_size`` or the device.
    ``on_step(step, t, x_t, x0_pred, batch_slice)`` sees each batch at each step.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"sampler.num_samples and sampler.batch_size must be ≥ 1, got {num_samples} and {batch_size}"
        )
    device = torch.device(device)
    timesteps = ddim_timesteps(num_steps)
    if noise is None:
        noise = initial_noise((num_samples, *image_shape), torch.Generator().manual_seed(seed))
    step_times = [0.0] * num_steps
    xs: list[list[torch.Tensor]] = [[] for _ in range(num_steps)]
    x0s: list[list[torch.Tensor]] = [[] for _ in range(num_steps)]
    outputs = []
    batches = list(range(0, num_samples, batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * num_steps, desc="sampling", unit="step")
    for start in batches:
        part = slice(start, min(start + batch_size, num_samples))
        clock = [time.perf_counter()]

        def callback(i: int, t: int, x_t: torch.Tensor, x0: torch.Tensor, part=part) -> None:
            _synchronize(device)
            now = time.perf_counter()
            step_times[i] += now - clock[0]
            if keep_trajectory:
                xs[i].append(x_t.detach().cpu())
                x0s[i].append(x0.detach().cpu())
            if on_step is not None:
                on_step(i, t, x_t, x0, part)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(t=t)
            clock[0] = time.perf_counter()  # the hook's own time is not the model's

        x_T = noise[part].to(device)
        outputs.append(ddim_sample(denoiser, x_T, timesteps, clip_x0=clip_x0, callback=callback).cpu())
    _synchronize(device)
    if bar is not None:
        bar.close()
    total = sum(step_times)
    return SamplingResult(
        samples=torch.cat(outputs),
        timesteps=[int(t) for t in timesteps],
        step_times_s=step_times,
        total_time_s=total,
        x_t=[torch.cat(s) for s in xs] if keep_trajectory else [],
        x0_pred=[torch.cat(s) for s in x0s] if keep_trajectory else [],
    )
