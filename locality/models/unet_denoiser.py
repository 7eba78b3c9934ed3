"""The trained baseline UNet as a denoiser: x̂0 = (x_t - √(1-ᾱ_t) ε̂(x_t, t)) / √ᾱ_t."""

from __future__ import annotations

import os
from typing import Any

import torch

from locality.models.base import Denoiser, register_model
from locality.schedule import NUM_TRAIN_TIMESTEPS, alphas_cumprod, x0_from_eps
from locality.unet.checkpoint import load_unet_checkpoint
from locality.unet.network import UNet, get_setting


@register_model("unet")
class UNetDenoiser(Denoiser):
    """Wraps an ε-predicting network ``net(x [B, C, H, W], t [B] long) -> ε̂ [B, C, H, W]``.

    ``__call__(x_t [B, C, H, W], t: int) -> x̂0 [B, C, H, W]`` runs the network in eval mode without
    autograd on the network's device; x̂0 comes back in x_t's dtype and on x_t's device.
    """

    name = "unet"

    def __init__(self, net: torch.nn.Module, image_shape: tuple[int, int, int] | None = None) -> None:
        self.net = net.eval()
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        # ᾱ in float64, read per call as a Python float: the same schedule every model uses.
        self._abar = alphas_cumprod(getattr(net, "config", {}).get("T", NUM_TRAIN_TIMESTEPS))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """ε̂(x_t, t) [B, C, H, W] on the network's device and dtype."""
        if not 0 <= int(t) < self._abar.shape[0]:
            raise ValueError(f"timestep {t} outside 0..{self._abar.shape[0] - 1}")
        self.net.eval()  # cheap, and guards against a caller having flipped it to train mode
        x = x_t.to(self.device, self.dtype)
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return self.net(x, tt)

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        eps = self.eps(x_t, t).to(x_t.device, x_t.dtype)
        return x0_from_eps(x_t, eps, float(self._abar[int(t)]))

    @classmethod
    def from_data(
        cls,
        images: torch.Tensor,
        stats: Any = None,
        *,
        checkpoint: str | os.PathLike,
        dataset: str | None = None,
        device: str | torch.device = "cpu",
        **load_kwargs: Any,
    ) -> "UNetDenoiser":
        """Registry adapter (``build_model("unet", images, stats, checkpoint=...)``).

        The UNet is trained, not built from data: ``images`` [N, C, H, W] only fixes the expected
        image shape; ``stats`` is ignored.
        """
        return cls.from_checkpoint(checkpoint, dataset=dataset, image_shape=tuple(images.shape[1:]),
                                   device=device, **load_kwargs)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        dataset: str | None = None,
        image_shape: tuple[int, int, int] | None = None,
        device: str | torch.device = "cpu",
        **load_kwargs: Any,
    ) -> "UNetDenoiser":
        """Load a UNet checkpoint (see :func:`locality.unet.checkpoint.load_unet_checkpoint`).

        With ``dataset`` the checkpoint must fit that dataset's published setting and
        ``image_shape`` defaults to the setting's (C, H, W); a given ``image_shape`` is checked
        against the network (channels, divisibility of H and W by the down-sampling factor).
        """
        net = load_unet_checkpoint(path, dataset=dataset, map_location="cpu", **load_kwargs)
        if dataset is not None:
            expected = get_setting(dataset=dataset).image_shape
            if image_shape is not None and tuple(image_shape) != expected:
                raise ValueError(f"dataset {dataset!r} has images of shape {expected}, not {tuple(image_shape)}")
            image_shape = expected
        if image_shape is not None:
            _check_image_shape(net, tuple(image_shape))
        return cls(net.to(device), image_shape=image_shape)


def _check_image_shape(net: UNet, image_shape: tuple[int, ...]) -> None:
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
    c, h, w = image_shape
    f = net.downsample_factor
    if c != net.config["in_channels"] or h % f or w % f:
        raise ValueError(
            f"image shape {image_shape} does not fit the UNet (in_channels={net.config['in_channels']}, "
            f"H and W divisible by {f})"
        )
