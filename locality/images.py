"""Writing tensors in [-1, 1] as PNG files and grids (clamped only here, when written out).

PNGs are written atomically: a full disk leaves no truncated picture under a final name."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from locality.atomic import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] (values clamped to [-1, 1] first)."""
    x = images.detach().to("cpu", torch.float64).clamp(-1.0, 1.0)
    x = torch.round((x + 1.0) * 127.5).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, columns: int = 8, padding: int = 2) -> np.ndarray:
    """Tile [B, C, H, W] into one uint8 image [rows·(H+p)+p, cols·(W+p)+p, C]."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    cols = max(1, min(columns, b))
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255, np.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 8) -> Path:
    return save_png(make_grid(images, columns), path)


def save_samples(images: torch.Tensor, folder: str | Path, start_index: int = 0) -> list[Path]:
    """One PNG per image: sample_0000.png, …"""
    return [
        save_png(a, Path(folder) / f"sample_{start_index + i:04d}.png")
        for i, a in enumerate(to_uint8(images))
    ]
