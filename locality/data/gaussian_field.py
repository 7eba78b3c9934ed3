"""``dataset=gaussian_field``: stationary Gaussian random fields generated in code (no download).

Each channel of each image is an independent zero-mean stationary Gaussian field with the
squared-exponential covariance

    Cov(f[p], f[q]) = σ² exp(-‖p - q‖² / (2 ℓ²)),   ℓ = ``correlation_length`` (pixels), σ = 1/3,

drawn exactly by the circulant-embedding (FFT) method on a periodic grid of side
``resolution + ceil(6 ℓ)`` and cropped to ``resolution``: two pixels of the crop are never closer
than 6 ℓ around the torus, so the wrapped-around covariance terms are below exp(-18) and the crop
is stationary with the target covariance. The field (in [-1, 1] units, ±3σ = ±1) is quantised to
8 bits like the real datasets, q = clamp(round(127.5 (f + 1)), 0, 255), and handed on as
(2q - 255)/255, so every kernel of pca_locality (the 8-bit ones included) applies. Clipping at
±3σ touches 0.27 % of values and quantisation adds (1/127.5)²/12 ≈ 5e-6 of variance.

Deterministic by ``seed``: the ``train`` split draws from ``seed``, the ``test`` split (held-out
images, e.g. for ``locality.analyze``) from an independent stream; ``subset_size`` takes the
first images of the same draw.
"""

from __future__ import annotations

import math

import torch

from locality.data.common import LoadRequest, check_subset_size, require_image_memory

#: Marginal standard deviation in [-1, 1] units: ±3σ spans the 8-bit range.
FIELD_STD = 1.0 / 3.0
#: Images drawn per FFT batch (bounds the float64 working memory).
CHUNK = 1024
SPLITS = ("train", "test")
DEFAULTS = {"correlation_length": 3.0, "num_images": 10000, "seed": 0, "channels": 1}


def field_covariance(resolution: int, correlation_length: float, channels: int = 1) -> torch.Tensor:
    """The target covariance [n, n] float64 (n = C·H·W, (C, H, W) order) of one image in [-1, 1]
    units before quantisation: σ² exp(-‖p - q‖²/(2ℓ²)) within a channel, 0 across channels."""
    ii, jj = torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
    pos = torch.stack([ii.flatten(), jj.flatten()], 1).double()
    block = FIELD_STD**2 * torch.exp(-torch.cdist(pos, pos).square() / (2 * correlation_length**2))
    return torch.block_diag(*[block] * channels)


def _spectrum(side: int, correlation_length: float) -> torch.Tensor:
    """√(eigenvalues) [side, side] of the circulant covariance of a side×side torus (σ = 1)."""
    offset = torch.arange(side, dtype=torch.float64)
    offset = torch.minimum(offset, side - offset)  # distance around the torus
    kernel = torch.exp(-(offset[:, None] ** 2 + offset[None, :] ** 2) / (2 * correlation_length**2))
    # real and even: its DFT is real; the Gaussian's periodisation is positive definite, and
    # round-off below zero is clamped
    return torch.fft.fft2(kernel).real.clamp_min(0).sqrt()


def gaussian_fields(num: int, channels: int, resolution: int, correlation_length: float, seed: int = 0,
                    stream: int = 0) -> torch.Tensor:
    """uint8 [num, channels, resolution, resolution]: the quantised fields of the module doc;
    ``stream`` separates independent draws of one seed (0: train, 1: test)."""
    if isinstance(correlation_length, bool) or not isinstance(correlation_length, (int, float)) \
            or not math.isfinite(correlation_length) or correlation_length <= 0:
        raise ValueError(f"dataset.correlation_length must be a positive number of pixels, got {correlation_length!r}")
    for key, value, low in (("num_images", num, 1), ("channels", channels, 1), ("resolution", resolution, 2),
                            ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"dataset.{key} must be an integer ≥ {low}, got {value!r}")
    side = resolution + math.ceil(6 * correlation_length)
    amplitude = _spectrum(side, float(correlation_length))
    gen = torch.Generator().manual_seed(int(seed) * 2 + int(stream))
    out = torch.empty(num, channels, resolution, resolution, dtype=torch.uint8)
    for start in range(0, num, CHUNK):
        k = min(CHUNK, num - start)
        # one draw per image, so that the first images are the same whatever ``num`` is
        white = torch.stack([torch.randn(channels, side, side, generator=gen, dtype=torch.float64)
                             for _ in range(k)])
        fields = torch.fft.ifft2(torch.fft.fft2(white) * amplitude).real[..., :resolution, :resolution]
        out[start : start + k] = (127.5 * (FIELD_STD * fields + 1.0)).round().clamp(0, 255).to(torch.uint8)
    return out


def load_gaussian_field(request: LoadRequest) -> torch.Tensor:
    """The loader of ``dataset=gaussian_field``: options correlation_length, num_images, seed, channels."""
    options = {**DEFAULTS, **request.options}
    num = options["num_images"]
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"dataset.num_images must be a positive integer, got {num!r}")
    count = check_subset_size(request.name, request.split, request.subset_size, num)
    require_image_memory(request.name, count, int(options["channels"]), request.resolution)
    # the subset is the first images of the full draw: the same images whatever subset_size is
    return gaussian_fields(count, options["channels"], request.resolution, options["correlation_length"],
                           options["seed"], stream=SPLITS.index(request.split))
