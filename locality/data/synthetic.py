"""A synthetic stand-in for natural images, for benchmarks where the real data cannot be had.

Natural images have a power spectrum close to 1/f² (amplitude 1/f), and that second-order
structure is all that the masks of pca_locality and the Wiener filter see. The proxy draws
Gaussian random fields with that spectrum (one luminance field and two weaker colour-opponent
fields for three channels), scales ±3σ to the 8-bit range and quantises it like a real image.
Its softmax weights are not those of a real dataset, so timings on it are a proxy, and the
README says so wherever it quotes one.
"""

from __future__ import annotations

import torch

# RGB from (luminance, red-green, blue-yellow): chroma fields weaker than luminance, as in photos
_OPPONENT_TO_RGB = torch.tensor([[1.0, 0.35, -0.2], [1.0, -0.35, -0.2], [1.0, 0.0, 0.4]], dtype=torch.float64)


def natural_image_proxy(num: int, channels: int, resolution: int, seed: int = 0,
                        chunk: int = 2048) -> torch.Tensor:
    """uint8 [num, channels, resolution, resolution] (channels 1 or 3), 1/f² Gaussian fields."""
    if channels not in (1, 3):
        raise ValueError(f"natural_image_proxy makes 1 or 3 channels, got {channels}")
    if num < 1 or resolution < 2:
        raise ValueError(f"need num ≥ 1 and resolution ≥ 2, got {num} and {resolution}")
    freq = torch.fft.fftfreq(resolution, dtype=torch.float64) * resolution
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2).clamp_min(1.0)  # DC as the lowest ring
    amplitude = 1.0 / radius  # power 1/f²
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(num, channels, resolution, resolution, dtype=torch.uint8)
    sigma = float(amplitude.square().sum().sqrt()) / resolution  # std of one field value
    for start in range(0, num, chunk):
        k = min(chunk, num - start)
        white = torch.randn(k, channels, resolution, resolution, generator=gen, dtype=torch.float64)
        fields = torch.fft.ifft2(torch.fft.fft2(white) * amplitude).real
        if channels == 3:
            fields = torch.einsum("rc,kchw->krhw", _OPPONENT_TO_RGB, fields) / 1.1
        scaled = 127.5 + 127.5 * fields / (3.0 * sigma)
        out[start : start + k] = scaled.round().clamp(0, 255).to(torch.uint8)
    return out
