"""The tests' shared factories and oracles: small synthetic inputs for the model tests, a tiny
UNet architecture, a pickle that runs code, and the float64 oracles (locality.models.oracle) in
the tests' argument order: images [N, C, H, W] and samples [B, C, H, W] in, [B, n] out.
(Files in the datasets' real formats: data_factories.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from locality.models.autotune import Decision, KernelTuner
from locality.models.masks import locality_mask
from locality.models.oracle import optimal_oracle, pca_locality_oracle
from locality.schedule import alpha_bar


#: A UNet small enough for CPU tests (1 channel, images divisible by 2), without dropout.
TINY_UNET = dict(ch=32, ch_mult=[1, 2], attn=[], num_res_blocks=1, dropout=0.0, in_channels=1, out_channels=1)


class Payload:
    """Unpickling this creates ``marker``: stands for a pickle whose __reduce__ runs any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def local_images(seed: int = 0, num: int = 60, side: int = 6) -> torch.Tensor:
    """Smooth-ish synthetic images [num, 1, side, side] in [-1, 1] (a local covariance, so masks are local)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num, 1, side + 2, side + 2, generator=g)
    img = (z[..., :-2, :-2] + z[..., 1:-1, 1:-1] + z[..., 2:, 2:]) / 3
    return img.clamp(-1, 1).float()


def eight_bit(images: torch.Tensor) -> torch.Tensor:
    """Real-format values: uint8 pixels v -> (v/255 - 0.5)/0.5 in float32, like the loaders."""
    q = torch.round((images.clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    return (q.float() / 255 - 0.5) / 0.5


def noisy(images: torch.Tensor, t: int, count: int = 3, seed: int = 1) -> torch.Tensor:
    """x_t of the first ``count`` images at timestep t (forward process, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    abar = float(alpha_bar(t))
    x0 = images[:count]
    return (math.sqrt(abar) * x0 + math.sqrt(1 - abar) * torch.randn(x0.shape, generator=g)).float()


def pca_oracle(x: torch.Tensor, t: int, images: torch.Tensor, stats, threshold: float, tau: float = 1.0):
    abar = float(alpha_bar(t))
    return pca_locality_oracle(x.reshape(len(x), -1), images.reshape(len(images), -1),
                               locality_mask(stats, abar, threshold), abar, tau)


def optimal_oracle_of(x: torch.Tensor, t: int, images: torch.Tensor, tau: float = 1.0):
    return optimal_oracle(x.reshape(len(x), -1), images.reshape(len(images), -1), float(alpha_bar(t)), tau)


class PreferKernel(KernelTuner):
    """A tuner that takes kernel ``name`` (or the first of ``names`` that is a candidate) wherever
    it is a candidate and measures otherwise: lets a test run one kernel's path on purpose,
    whatever would be fastest (e.g. ``PreferKernel("native", "runs")``: the fused softmax and
    pspc's tiles of runs)."""

    def __init__(self, name: str, *names: str, device: str = "cpu") -> None:
        super().__init__(device)
        self.name = name
        self.names = (name, *names)
        self.seen: list[str] = []  # the candidates of the last choice

    def choose(self, key, candidates, total_images, total_samples, *probe_info) -> Decision:
        self.seen = list(candidates)
        for name in self.names:
            if name in candidates:
                return Decision(name, {}, 0, 0.0, "preferred by the test")
        return super().choose(key, candidates, total_images, total_samples)


def small_data(seed: int = 0, shape=(2, 7, 6), num: int = 5, batch: int = 3):
    """Random 8-bit images (exact in float32, like every dataset here) and noisy samples (a
    non-square image catches swapped axes)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 256, (num, *shape), generator=g).double() / 127.5 - 1
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    return y, x
