"""Per-step patch-size calibration of els / pspc against a trained network (no Hydra).

For each seed the UNet samples its own DDIM trajectory; at every step i (timestep t_i) each
candidate size k denoises the UNet's x_t, and a criterion compares that x̂0 with the UNet's:

* ``mse``: mean squared difference of x̂0 (what the comparison tables report; lower is better);
* ``score_cosine``: cosine similarity of the scores (a x̂0 - x_t)/(1 - ᾱ), the authors' criterion
  (higher is better).

Each seed's value is the mean over its samples; the chosen size of step i is the best median
over the seeds (ties: the smaller size). The size found at step i is stored at index i and read
at t_i: the authors' code stored it at index i - 1, so their sampler used it one step noisier.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from locality.ddim import DenoiserFn, ddim_sample, initial_noise
from locality.schedule import alpha_bar, ddim_timesteps

CRITERIA = ("mse", "score_cosine")


def criterion_values(name: str, x0: torch.Tensor, reference: torch.Tensor, x_t: torch.Tensor,
                     abar: float) -> torch.Tensor:
    """Per image [B] for predictions x0 and the network's reference [B, C, H, W] at x_t."""
    if name == "mse":
        return (x0.double() - reference.double()).square().flatten(1).mean(1)
    if name == "score_cosine":
        a, s2 = abar**0.5, 1.0 - abar
        ours = ((a * x0.double() - x_t.double()) / s2).flatten(1)
        theirs = ((a * reference.double() - x_t.double()) / s2).flatten(1)
        return torch.nn.functional.cosine_similarity(ours, theirs, dim=1)
    raise ValueError(f"calibrate.criterion must be one of {', '.join(CRITERIA)}, got {name!r}")


@dataclass
class Calibration:
    """``scores[s][i][j]``: seed s, step i, candidate j (mean over the seed's samples);
    ``chosen[i]``: the size for step i (timestep ``timesteps[i]``)."""

    criterion: str
    timesteps: list[int]
    candidates: list[int]
    seeds: list[int]
    scores: list[list[list[float]]]
    chosen: list[int]

    def medians(self) -> list[list[float]]:
        """[step][candidate]: the median over seeds."""
        return [[statistics.median(self.scores[s][i][j] for s in range(len(self.seeds)))
                 for j in range(len(self.candidates))] for i in range(len(self.timesteps))]

    def as_dict(self) -> dict:
        return {"criterion": self.criterion, "timesteps": self.timesteps, "candidates": self.candidates,
                "seeds": self.seeds, "patch_sizes": self.chosen, "median_scores": self.medians(),
                "scores_per_seed": self.scores}


def calibrate_patch_sizes(denoise_at: Callable[[torch.Tensor, int, int], torch.Tensor], network: DenoiserFn,
                          image_shape: Sequence[int], num_steps: int, candidates: Sequence[int],
                          seeds: Sequence[int], num_samples: int, criterion: str = "mse",
                          clip_x0: bool = True, device: torch.device | str = "cpu",
                          progress: Callable[[str], None] | None = None) -> Calibration:
    """Pick per step the candidate size whose x̂0 is closest to ``network``'s on the network's
    own trajectory. ``denoise_at(x_t, t, size)`` -> x̂0 (e.g. :meth:`PatchDenoiser.denoise_at`)."""
    if criterion not in CRITERIA:
        raise ValueError(f"calibrate.criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if not candidates:
        raise ValueError("calibrate.candidates is empty: give at least one patch size")
    if not seeds:
        raise ValueError("calibrate.seeds is empty: give at least one seed")
    timesteps = ddim_timesteps(num_steps)
    cands = sorted(set(int(k) for k in candidates))
    scores = []
    for seed in seeds:
        noise = initial_noise((num_samples, *image_shape), torch.Generator().manual_seed(int(seed))).to(device)
        steps: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        ddim_sample(network, noise, timesteps, clip_x0=clip_x0,
                    callback=lambda i, t, x, x0: steps.append((t, x.detach(), x0.detach())))
        per_step = []
        for t, x_t, ref in steps:
            abar = float(alpha_bar(t))
            per_step.append([float(criterion_values(criterion, denoise_at(x_t, t, k), ref, x_t, abar).mean())
                             for k in cands])
            if progress:
                progress(f"seed {seed}, t={t}: {criterion} " + ", ".join(
                    f"{k}: {v:.4g}" for k, v in zip(cands, per_step[-1])))
        scores.append(per_step)
    result = Calibration(criterion, [int(t) for t in timesteps], cands, [int(s) for s in seeds], scores, [])
    better = min if criterion == "mse" else max
    for row in result.medians():
        best = better(row)
        result.chosen.append(cands[row.index(best)])  # the first (smallest) of tied sizes
    return result


def default_candidates(model_name: str, size: int) -> list[int]:
    """Odd sizes 1 … ``size`` (the image side); pspc also the whole image when it is even."""
    odd = list(range(1, size + 1, 2))
    if model_name == "pspc" and size % 2 == 0:
        odd.append(size)
    return odd


def experiment_yaml(model_name: str, dataset: str, model_keys: dict, result: Calibration, note: str) -> str:
    """A Hydra experiment preset that runs the model with the calibrated sizes:
    ``python -m locality.run --config-dir=<folder> experiment=<its name>``."""
    keys = "".join(f"  {k}: {v}\n" for k, v in model_keys.items())
    return (f"# @package _global_\n# {note}\n# criterion {result.criterion}, median over seeds {result.seeds}, "
            f"timesteps {result.timesteps}\ndefaults:\n  - override /model: {model_name}\n"
            f"  - override /dataset: {dataset}\n\nmodel:\n{keys}  patch_sizes: {result.chosen}\n"
            f"\nsampler:\n  num_steps: {len(result.timesteps)}\n")
