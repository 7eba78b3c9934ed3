"""The baseline ε-prediction UNet (pytorch-ddpm style) and the table of its published settings.

Module and parameter names follow the reference network exactly, so the published checkpoints
(``models/baseline_unet/<dataset>/ckpt_epoch_200.pt``) load with ``strict=True``. The ground truth
for names and shapes is ``shared/reference/unet_checkpoint_layout.json``; SPEC.md, "The baseline
UNet", describes the computation.

Shapes: x [B, C_in, H, W], t [B] (long, 0..T-1) -> ε̂ [B, C_out, H, W]. H and W must be divisible
by 2**(len(ch_mult) - 1) (28 px with 3 levels: 28 -> 14 -> 7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from locality.schedule import NUM_TRAIN_TIMESTEPS

# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class UNetSetting:
    """One published configuration: constructor kwargs and the image shape it was trained on."""

    name: str
    image_shape: tuple[int, int, int]  # (C, H, W)
    datasets: tuple[str, ...]
    constructor: Mapping[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        """A fresh, mutable copy of the constructor kwargs (lists copied)."""
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.constructor.items()}


def _constructor(ch: int, ch_mult: list[int], channels: int) -> dict[str, Any]:
    return dict(
        T=NUM_TRAIN_TIMESTEPS, ch=ch, ch_mult=ch_mult, attn=[], num_res_blocks=2,
        dropout=0.15, in_channels=channels, out_channels=channels,
    )


#: Setting name -> setting. 32px_3ch and 64px_3ch have the *same* layout (the network is fully
#: convolutional); they differ only in the image size they were trained on.
SETTINGS: dict[str, UNetSetting] = {
    s.name: s
    for s in (
        UNetSetting("28px_1ch", (1, 28, 28), ("mnist", "fashion_mnist"), _constructor(64, [1, 2, 2], 1)),
        UNetSetting("32px_3ch", (3, 32, 32), ("cifar10",), _constructor(128, [1, 2, 3, 4], 3)),
        UNetSetting("64px_3ch", (3, 64, 64), ("celeba_hq", "afhq"), _constructor(128, [1, 2, 3, 4], 3)),
    )
}

#: Dataset name -> setting name.
DATASET_SETTINGS: dict[str, str] = {d: s.name for s in SETTINGS.values() for d in s.datasets}


def get_setting(setting: str | None = None, dataset: str | None = None) -> UNetSetting:
    """Resolve a setting by its name (``"28px_1ch"``) and/or a dataset name (``"mnist"``).

    Raises ``ValueError`` for unknown names or when both are given and disagree.
    """
    if setting is None and dataset is None:
        raise ValueError("give a UNet setting or a dataset name")
    by_dataset = None
    if dataset is not None:
        if dataset not in DATASET_SETTINGS:
            raise ValueError(
                f"no baseline UNet setting for dataset {dataset!r}; known datasets: "
                f"{', '.join(sorted(DATASET_SETTINGS))}"
            )
        by_dataset = DATASET_SETTINGS[dataset]
    if setting is not None:
        if setting not in SETTINGS:
            raise ValueError(f"unknown UNet setting {setting!r}; known settings: {', '.join(SETTINGS)}")
        if by_dataset is not None and by_dataset != setting:
            raise ValueError(f"dataset {dataset!r} uses setting {by_dataset!r}, not {setting!r}")
        return SETTINGS[setting]
    assert by_dataset is not None
    return SETTINGS[by_dataset]


# --------------------------------------------------------------------------- building blocks


class Swish(nn.Module):
    """x · sigmoid(x) (= SiLU); a module of its own so Sequential indices match the reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def sinusoidal_table(T: int, dim: int) -> torch.Tensor:
    """[T, dim] table; row t = sin(f_0 t), cos(f_0 t), sin(f_1 t), … with f_j = exp(-(2j/dim) ln 1e4).

    Computed in float64 and cast to float32. (The reference computes it in float32; the table is
    stored in every checkpoint, so a loaded model uses the stored values either way.)
    """
    if dim % 2:
        raise ValueError(f"time embedding width must be even, got {dim}")
    freqs = torch.exp(-torch.arange(0, dim, 2, dtype=torch.float64) / dim * math.log(10000.0))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]  # [T, dim/2]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(T, dim).float()


class TimeEmbedding(nn.Module):
    """t [B] long -> temb [B, tdim]: fixed sinusoidal table, Linear, Swish, Linear."""

    def __init__(self, T: int, d_model: int, dim: int) -> None:
        super().__init__()
        # nn.Embedding.from_pretrained (freeze=True) keeps the table a non-trainable parameter
        # named timembedding.0.weight, as in the published state dicts.
        self.timembedding = nn.Sequential(
            nn.Embedding.from_pretrained(sinusoidal_table(T, d_model)),
            nn.Linear(d_model, dim),
            Swish(),
            nn.Linear(dim, dim),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init.xavier_uniform_(m.weight)
                init.zeros_(m.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.timembedding(t)


class DownSample(nn.Module):
    """Stride-2 3×3 conv: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.main = nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1)
        init.xavier_uniform_(self.main.weight)
        init.zeros_(self.main.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class UpSample(nn.Module):
    """Nearest ×2 upsampling then a 3×3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.main = nn.Conv2d(in_ch, in_ch, 3, stride=1, padding=1)
        init.xavier_uniform_(self.main.weight)
        init.zeros_(self.main.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, residual: [B, C, H, W] -> same."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(32, in_ch)
        self.proj_q = nn.Conv2d(in_ch, in_ch, 1)
        self.proj_k = nn.Conv2d(in_ch, in_ch, 1)
        self.proj_v = nn.Conv2d(in_ch, in_ch, 1)
        self.proj = nn.Conv2d(in_ch, in_ch, 1)
        for m in (self.proj_q, self.proj_k, self.proj_v, self.proj):
            init.xavier_uniform_(m.weight)
            init.zeros_(m.bias)
        init.xavier_uniform_(self.proj.weight, gain=1e-5)  # start as (almost) the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x)
        q = self.proj_q(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        k = self.proj_k(h).reshape(B, C, H * W)
        v = self.proj_v(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        w = torch.softmax(torch.bmm(q, k) * (C**-0.5), dim=-1)  # [B, HW, HW]
        h = torch.bmm(w, v).permute(0, 2, 1).reshape(B, C, H, W)
        return x + self.proj(h)


class ResBlock(nn.Module):
    """GN-Swish-conv, + Linear(Swish(temb)), GN-Swish-Dropout-conv, + shortcut, optional attention.

    x [B, in_ch, H, W], temb [B, tdim] -> [B, out_ch, H, W].
    """

    def __init__(self, in_ch: int, out_ch: int, tdim: int, dropout: float, attn: bool = False) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(32, in_ch), Swish(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = nn.Sequential(Swish(), nn.Linear(tdim, out_ch))
        self.block2 = nn.Sequential(
            nn.GroupNorm(32, out_ch), Swish(), nn.Dropout(dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        # Identity/no-op modules hold no parameters, so the state dict has shortcut.* / attn.*
        # keys only where the reference has them.
        self.shortcut: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn: nn.Module = AttnBlock(out_ch) if attn else nn.Identity()
        for m in (self.block1[2], self.temb_proj[1], self.block2[3], self.shortcut):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                init.xavier_uniform_(m.weight)
                init.zeros_(m.bias)
        init.xavier_uniform_(self.block2[3].weight, gain=1e-5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h)
        return self.attn(h + self.shortcut(x))


# --------------------------------------------------------------------------- the network


class UNet(nn.Module):
    """ε-prediction UNet. ``forward(x [B, C_in, H, W], t [B] long) -> ε̂ [B, C_out, H, W]``.

    Args:
        T: number of training timesteps (rows of the time table).
        ch: base width; every width must be divisible by 32 (GroupNorm(32)).
        ch_mult: width multiplier per resolution level.
        attn: indices of levels whose ResBlocks get self-attention (the middle always has one).
        num_res_blocks: ResBlocks per level on the down path (the up path has one more).
        dropout: dropout probability inside the ResBlocks (inactive in eval mode).
        in_channels / out_channels: image channels.
    """

    def __init__(
        self,
        T: int = NUM_TRAIN_TIMESTEPS,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 3, 4),
        attn: Sequence[int] = (),
        num_res_blocks: int = 2,
        dropout: float = 0.15,
        in_channels: int = 3,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        if any(not 0 <= i < len(ch_mult) for i in attn):
            raise ValueError(f"attn levels {list(attn)} out of range for ch_mult {list(ch_mult)}")
        if any((ch * m) % 32 for m in ch_mult):
            raise ValueError(f"all widths ch*mult must be divisible by 32 (GroupNorm(32)); ch={ch}, ch_mult={list(ch_mult)}")
        self.config: dict[str, Any] = dict(
            T=int(T), ch=int(ch), ch_mult=[int(m) for m in ch_mult], attn=[int(a) for a in attn],
            num_res_blocks=int(num_res_blocks), dropout=float(dropout),
            in_channels=int(in_channels), out_channels=int(out_channels),
        )
        tdim = ch * 4
        self.time_embedding = TimeEmbedding(T, ch, tdim)
        self.head = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.downblocks = nn.ModuleList()
        chs = [ch]  # widths of every kept skip, the head output included
        now_ch = ch
        for i, mult in enumerate(ch_mult):
            out_ch = ch * mult
            for _ in range(num_res_blocks):
                self.downblocks.append(ResBlock(now_ch, out_ch, tdim, dropout, attn=i in attn))
                now_ch = out_ch
                chs.append(now_ch)
            if i != len(ch_mult) - 1:
                self.downblocks.append(DownSample(now_ch))
                chs.append(now_ch)

        self.middleblocks = nn.ModuleList(
            [ResBlock(now_ch, now_ch, tdim, dropout, attn=True), ResBlock(now_ch, now_ch, tdim, dropout, attn=False)]
        )

        self.upblocks = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            out_ch = ch * mult
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(ResBlock(chs.pop() + now_ch, out_ch, tdim, dropout, attn=i in attn))
                now_ch = out_ch
            if i != 0:
                self.upblocks.append(UpSample(now_ch))
        assert not chs

        self.tail = nn.Sequential(nn.GroupNorm(32, now_ch), Swish(), nn.Conv2d(now_ch, out_channels, 3, padding=1))
        init.xavier_uniform_(self.head.weight)
        init.zeros_(self.head.bias)
        init.xavier_uniform_(self.tail[-1].weight, gain=1e-5)  # start predicting ε̂ ≈ 0
        init.zeros_(self.tail[-1].bias)

    @property
    def downsample_factor(self) -> int:
        """H and W must be divisible by this (2 ** number of DownSamples)."""
        return 2 ** (len(self.config["ch_mult"]) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(t)  # [B, 4ch]
        h = self.head(x)
        hs = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            hs.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = layer(h, temb)
        assert not hs
        return self.tail(h)


def build_unet(setting: str | Mapping[str, Any] | None = None, dataset: str | None = None) -> UNet:
    """A freshly initialised UNet from a setting name, a dataset name or explicit constructor kwargs."""
    if isinstance(setting, Mapping):
        return UNet(**setting)
    return UNet(**get_setting(setting, dataset).kwargs())


def infer_constructor(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Derive UNet constructor kwargs from a state dict's names and shapes.

    Everything but ``dropout`` is recoverable (it has no parameters; 0.15, the published value, is
    assumed — it only matters for training). Raises ``KeyError``/``ValueError`` if the dict does
    not look like this UNet.
    """
    head = state_dict["head.weight"]  # [ch, C_in, 3, 3]
    ch, in_channels = int(head.shape[0]), int(head.shape[1])
    T = int(state_dict["time_embedding.timembedding.0.weight"].shape[0])
    out_channels = int(state_dict["tail.2.weight"].shape[0])

    indices = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("downblocks.")})
    levels: list[list[int]] = [[]]  # per level: output widths of its ResBlocks
    attn: set[int] = set()
    for i in indices:
        if f"downblocks.{i}.main.weight" in state_dict:  # a DownSample closes the level
            levels.append([])
            continue
        levels[-1].append(int(state_dict[f"downblocks.{i}.block1.2.weight"].shape[0]))
        if f"downblocks.{i}.attn.proj.weight" in state_dict:
            attn.add(len(levels) - 1)
    if not levels[0] or any(len(lv) != len(levels[0]) or len(set(lv)) != 1 for lv in levels):
        raise ValueError("down path of the state dict is not a regular UNet layout")
    ch_mult = []
    for lv in levels:
        if lv[0] % ch:
            raise ValueError(f"level width {lv[0]} is not a multiple of ch={ch}")
        ch_mult.append(lv[0] // ch)
    return dict(
        T=T, ch=ch, ch_mult=ch_mult, attn=sorted(attn), num_res_blocks=len(levels[0]),
        dropout=0.15, in_channels=in_channels, out_channels=out_channels,
    )


def num_parameters(model: nn.Module) -> int:
    """All parameters, the frozen time table included (the layout file counts it too)."""
    return sum(p.numel() for p in model.parameters())
