"""Memorization and diversity of samples against the training set (exact, over all N images).

For a sample s (clamped to [-1, 1], as written out) and the training images y_k, all flattened
to n values: d1 = min_k ‖s - y_k‖ and d2 the second smallest (L2 over all values), found exactly
over every training image in float64 chunks. A sample with d1 / d2 < 1/3 is counted as a copy
(the usual criterion: much closer to one training image than to any other). Diversity: the mean
L2 distance between two distinct samples, and the fraction of distinct nearest training images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

COPY_RATIO = 1.0 / 3.0
CHUNK_BYTES = 64 * 2**20  # float64 working set of one chunk of distances


@dataclass(frozen=True)
class Nearest:
    """Per sample [S]: the two smallest distances to the training images and their indices."""

    distance: torch.Tensor  # d1 [S] float64
    second_distance: torch.Tensor  # d2 [S] float64
    index: torch.Tensor  # [S] long
    second_index: torch.Tensor  # [S] long

    @property
    def ratio(self) -> torch.Tensor:
        """d1 / d2 [S] (0 where d2 = 0: two identical training images at distance 0)."""
        return torch.where(self.second_distance > 0, self.distance / self.second_distance,
                           torch.zeros_like(self.distance))


def nearest_training_images(samples: torch.Tensor, images: torch.Tensor, chunk: int | None = None) -> Nearest:
    """samples [S, ...], images [N, ...] (same number of values, N ≥ 2) -> :class:`Nearest`,
    exact over all N: chunked ‖s‖² - 2 s·y + ‖y‖² picks the two nearest, whose distances are then
    recomputed directly (no cancellation). Ties take the lower index."""
    s = samples.detach().to("cpu", torch.float64).reshape(samples.shape[0], -1)
    num = images.shape[0]
    if num < 2:
        raise ValueError(f"memorization metrics need at least 2 training images, got {num}")
    y_all = images.reshape(num, -1)
    if y_all.shape[1] != s.shape[1]:
        raise ValueError(f"samples have {s.shape[1]} values, training images {y_all.shape[1]}")
    chunk = chunk or max(1, CHUNK_BYTES // (8 * max(s.shape[0], y_all.shape[1])))
    best = torch.full((s.shape[0], 2), math.inf, dtype=torch.float64)
    best_idx = torch.zeros((s.shape[0], 2), dtype=torch.long)
    s_sq = s.square().sum(1, keepdim=True)
    for start in range(0, num, chunk):
        y = y_all[start : start + chunk].to(torch.float64)
        d2 = (s_sq - 2 * s @ y.T + y.square().sum(1)).clamp_min(0)  # [S, K]
        vals, idx = torch.cat([best, d2], 1), torch.cat([best_idx, torch.arange(start, start + len(y)).expand_as(d2)], 1)
        order = torch.sort(vals, dim=1, stable=True).indices[:, :2]  # stable: the lower index wins ties
        best, best_idx = vals.gather(1, order), idx.gather(1, order)
    exact = torch.stack([(s - y_all[best_idx[:, j]].to(torch.float64)).norm(dim=1) for j in (0, 1)], 1)
    return Nearest(exact[:, 0], exact[:, 1], best_idx[:, 0], best_idx[:, 1])


def mean_pairwise_distance(samples: torch.Tensor) -> float:
    """Mean L2 distance over pairs of distinct samples [S, ...] (nan for one sample)."""
    s = samples.detach().to("cpu", torch.float64).reshape(samples.shape[0], -1)
    if len(s) < 2:
        return math.nan
    dist = torch.cdist(s, s)
    return float(dist.sum() / (len(s) * (len(s) - 1)))


def memorization_metrics(samples: torch.Tensor, images: torch.Tensor) -> tuple[dict[str, Any], Nearest]:
    """Metrics of samples [S, C, H, W] (clamped to [-1, 1] here) against images [N, C, H, W]:
    means and per-sample lists of d1, d2 and d1/d2, the copy fraction (d1/d2 < 1/3), and the
    diversity numbers; also the :class:`Nearest` found."""
    clamped = samples.detach().to("cpu", torch.float64).clamp(-1.0, 1.0)
    near = nearest_training_images(clamped, images)
    ratio = near.ratio
    metrics: dict[str, Any] = {
        "memorization_nn_distance_mean": float(near.distance.mean()),
        "memorization_nn2_distance_mean": float(near.second_distance.mean()),
        "memorization_ratio_mean": float(ratio.mean()),
        "memorization_copy_fraction": float((ratio < COPY_RATIO).double().mean()),
        "diversity_pairwise_distance_mean": mean_pairwise_distance(clamped),
        "diversity_unique_nearest_fraction": len(set(near.index.tolist())) / len(near.index),
        "memorization_nn_distance": near.distance.tolist(),
        "memorization_nn2_distance": near.second_distance.tolist(),
        "memorization_nn_index": near.index.tolist(),
        "memorization_ratio": ratio.tolist(),
    }
    return metrics, near


def nearest_grid_rows(samples: torch.Tensor, images: torch.Tensor, near: Nearest, columns: int) -> torch.Tensor:
    """[2·S', C, H, W] for a grid of ``columns`` columns: each row of samples followed by the row
    of their nearest training images (the last rows padded with blank, mid-grey images)."""
    s = samples.detach().to("cpu", torch.float32)
    y = images[near.index].to(torch.float32).reshape(s.shape)
    rows = []
    for start in range(0, len(s), columns):
        part, partner = s[start : start + columns], y[start : start + columns]
        pad = columns - len(part)
        if pad and len(s) > columns:
            blank = torch.zeros((pad, *s.shape[1:]))
            part, partner = torch.cat([part, blank]), torch.cat([partner, blank])
        rows += [part, partner]
    return torch.cat(rows)


def record_memorization(samples: torch.Tensor, images: torch.Tensor, out: Path, columns: int,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The run app's hook: the metrics of :func:`memorization_metrics` (for metrics.json and
    MLflow) and ``out``/nearest.png (samples, and below each row their nearest training images)."""
    from locality.images import save_grid

    if images.shape[0] < 2:  # no second-nearest image: nothing to measure, and no reason to fail a run
        if log is not None:
            log(f"memorization metrics skipped: they need at least 2 training images, got {images.shape[0]}")
        return {}
    metrics, near = memorization_metrics(samples, images)
    columns = max(1, min(columns, len(samples)))
    save_grid(nearest_grid_rows(samples, images, near, columns), out / "nearest.png", columns=columns)
    if log is not None:
        log(f"memorization: nearest training image at {metrics['memorization_nn_distance_mean']:.3f} on average "
            f"(L2), ratio to the second {metrics['memorization_ratio_mean']:.3f}, "
            f"{metrics['memorization_copy_fraction']:.1%} copies (ratio < 1/3); nearest.png")
    return metrics
