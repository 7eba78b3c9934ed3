"""Figures of the analyses (matplotlib, Agg backend; written atomically): heatmap grids of
sensitivity fields and line plots of their numbers. No Hydra, no MLflow."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from locality.atomic import atomic_write


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display: clusters, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically, and close it."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def heatmap_grid(fields: Mapping[str, torch.Tensor], timesteps: Sequence[int], pixel: tuple[int, int],
                 path: Path, title: str, mask: torch.Tensor | None = None) -> Path:
    """One row per entry of ``fields`` (name -> [S, C, H, W]), one column per timestep: |field|
    summed over channels, each tile scaled to its own maximum (magnitudes differ by orders
    across t); the output pixel marked by a cross; ``mask`` [S, C, H, W] (the pca_locality mask
    column at each t) outlined in every tile of its column."""
    plt = pyplot()
    names = list(fields)
    cols = len(timesteps)
    fig, axes = plt.subplots(len(names), cols, figsize=(1.5 * cols + 1.2, 1.55 * len(names) + 0.6), squeeze=False)
    for r, name in enumerate(names):
        for s, t in enumerate(timesteps):
            ax = axes[r][s]
            tile = fields[name][s].double().abs().sum(0)
            top = float(tile.max())
            ax.imshow((tile / top if top > 0 else tile).numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            if mask is not None:
                support = (mask[s] != 0).any(0).double().numpy()
                if 0 < support.sum() < support.size:
                    ax.contour(support, levels=[0.5], colors="cyan", linewidths=0.8)
            ax.plot([pixel[1]], [pixel[0]], marker="+", color="lime", markersize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={t}", fontsize=8)
            if s == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def line_plot(series: Mapping[str, Sequence[float]], xs: Sequence[float], path: Path, title: str, xlabel: str,
              ylabel: str, log_x: bool = False) -> Path:
    """One line per entry of ``series`` (name -> values at ``xs``; nan values are gaps)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, ys in series.items():
        ax.plot(list(xs), [math.nan if y is None else y for y in ys], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
