"""The peers' patch-posterior denoisers (SPEC, "Models of the peers"): els (Kamb & Ganguli's
equivariant local score machine) and pspc (Niedoba et al.'s position-specific patch posterior).

Notation: a = sqrt(ᾱ_t), s² = 1 - ᾱ_t; images [C, H, W]; an odd patch size k = 2d + 1.

* ``els``, variant ``borders`` (default): output pixel (i, j) takes the softmax over the windows
  (k, u, v), u ∈ U(i), v ∈ V(j), of -‖P_ij(x_t) - a P_uv(y_k)‖² / (2s²) (zero padding), and
  averages their centre pixels y_k[:, u, v]. U(i) = {i} for a row within d of a border, else
  every interior row d … H-1-d (V likewise). ``circular``: x_t padded circularly, every pixel
  sees every fully-inside window. ``local``: the same position (k, i, j) only.
* ``pspc``: for every p×p window R fully inside the image, m_R = Σ_k w_k y_k[R] with
  w = softmax_k(-‖x_t[R] - a y_k[R]‖² / (2s²)); x̂0 at a pixel is the mean of m_R there over the
  windows containing it. ``mirror`` adds every image's horizontal mirror (the authors' default).

Zero padding adds zeros to both windows of a distance, so a window clipped to the image gives
the same distances: windows are clipped, never padded. Every softmax is over ALL candidates of
ALL images (an online log-sum-exp over chunks: :mod:`.patch_kernels`), so, unlike the authors'
circular and local code, the output depends on neither the chunk nor the batch size.

Per-step patch sizes: ``patch_sizes`` is one size or a list over the sampler's ``num_steps``
DDIM steps (t = r·(S-1), …, 0); a timestep off that grid uses the size of the nearest one.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from locality.models.autotune import KernelTuner, shape_key
from locality.models.base import Denoiser, register_model
from locality.models.memory import check_chunk_size
from locality.models.native import NativeSoftmax, measured_softmax
from locality.models.patch_kernels import (
    Band, Tile, masked_tile_average, shifted_band_average, sliding_average, window_logit_error_estimate,
)
from locality.models.softmax import LOG2_E, LOGIT_TOLERANCE, WEIGHT_FLOOR_LOG
from locality.schedule import ddim_timesteps

log = logging.getLogger(__name__)

ELS_VARIANTS = ("borders", "circular", "local")


def patch_schedule(patch_sizes: int | Sequence[int], num_steps: int, key: str = "model.patch_sizes") -> dict[int, int]:
    """{timestep: patch size} over the ``num_steps`` DDIM timesteps (descending). One number
    serves every step; a list must have one entry per step, the noisiest first."""
    timesteps = [int(t) for t in ddim_timesteps(num_steps)]
    sizes = [patch_sizes] * num_steps if isinstance(patch_sizes, int) and not isinstance(patch_sizes, bool) \
        else list(patch_sizes) if isinstance(patch_sizes, (list, tuple)) else None
    if sizes is None:
        raise ValueError(f"{key} must be a positive integer or a list of them (one per sampler step), "
                         f"got {patch_sizes!r}")
    if len(sizes) != num_steps:
        raise ValueError(f"{key} has {len(sizes)} entries but the sampler takes {num_steps} steps "
                         f"(t = {', '.join(map(str, timesteps))}): give {num_steps} sizes, noisiest first, "
                         f"or one number for every step (or set sampler.num_steps={len(sizes)})")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"{key} entries must be positive integers, got {s!r} in {sizes}")
    return dict(zip(timesteps, sizes))


def timestep_groups(x_t: torch.Tensor, t) -> list[tuple[torch.Tensor, int]]:
    """(sample indices, timestep) pairs: ``t`` an int, a 0-d tensor, or one timestep per sample
    [B] (the authors' code crashed on a vector of timesteps)."""
    tt = torch.as_tensor(t)
    if tt.dim() == 0:
        return [(torch.arange(x_t.shape[0]), int(tt))]
    if tt.dim() != 1 or tt.numel() != x_t.shape[0]:
        raise ValueError(f"t must be one timestep or one per sample ({x_t.shape[0]}), got shape {tuple(tt.shape)}")
    return [(torch.nonzero(tt == v).flatten(), int(v)) for v in torch.unique(tt).tolist()]


class PatchDenoiser(Denoiser):
    """What els and pspc share: the training images on the device, the per-step patch sizes,
    the precision choice, and the (x_t [B, C, H, W], t) -> x̂0 [B, C, H, W] entry point."""

    needs_statistics = False
    float64_accumulation = True  # softmax accumulators are float64 (no MPS)
    tunes_kernels = True  # the softmax (native or torch) and pspc's tile layout are measured

    def __init__(self, images: torch.Tensor, patch_sizes: int | Sequence[int], num_steps: int = 10,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
                 chunk_size: int | None = None, tuner: KernelTuner | None = None) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk_size = check_chunk_size(chunk_size)
        self.images = images.to(self.device, torch.float32 if dtype == torch.float32 else torch.float64)
        self._images64: torch.Tensor | None = None
        self.y_abs_max = float(self.images.abs().max()) if self.images.numel() else 0.0
        self.schedule = patch_schedule(patch_sizes, num_steps)
        # dtype=float32: a float64 step (low noise) still takes float32 softmax weights (relative
        # error ≤ 5e-6); dtype=float64 is the exactness oracle, float64 throughout
        self.weights32 = dtype == torch.float32
        self.last_dtype: torch.dtype | None = None
        self.tuner = tuner if tuner is not None else KernelTuner(self.device)
        self._native: NativeSoftmax | None = None  # the fused C softmax, where measured faster

    @classmethod
    def from_data(cls, images: torch.Tensor, stats=None, **params):
        return cls(images, **params)

    def size_at(self, t: int) -> int:
        """The patch size of timestep t (the nearest scheduled timestep's, ties to the noisier)."""
        if t in self.schedule:
            return self.schedule[t]
        nearest = min(self.schedule, key=lambda s: (abs(s - t), -s))
        return self.schedule[nearest]

    def window_values(self, size: int) -> int:
        """Values in the largest window of a step of patch size ``size`` (for the estimate)."""
        c, h, w = self.images.shape[1:]
        return c * min(size, h) * min(size, w)

    def compute_dtype(self, x64: torch.Tensor, t: int, size: int) -> torch.dtype:
        """float32 where :func:`window_logit_error_estimate` allows (``dtype=float32``), else float64."""
        if self.dtype == torch.float64:
            return torch.float64
        abar = self.alpha_bar(t)
        scale = 1.0 / (2.0 * (1.0 - abar))
        estimate = window_logit_error_estimate(self.window_values(size), abar, scale, float(x64.abs().max()),
                                               self.y_abs_max, torch.float32)
        return torch.float32 if estimate <= LOGIT_TOLERANCE else torch.float64

    def images_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The training images in ``dtype`` (a float64 copy is made once, on first use)."""
        if dtype == self.images.dtype:
            return self.images
        if self._images64 is None:
            self._images64 = self.images.to(torch.float64)
        return self._images64

    def __call__(self, x_t: torch.Tensor, t) -> torch.Tensor:
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != tuple(self.images.shape[1:]):
            raise ValueError(f"{self.name}: x_t must be [B, {', '.join(map(str, self.images.shape[1:]))}], "
                             f"got {tuple(x_t.shape)}")
        out = torch.empty(x_t.shape, dtype=torch.float64, device=self.device)
        x64 = x_t.to(self.device, torch.float64)
        for idx, step in timestep_groups(x_t, t):
            idx = idx.to(self.device)
            out[idx] = self.denoise_at(x64[idx], step, self.size_at(step))
        return out.to(x_t.dtype)

    def denoise_at(self, x_t: torch.Tensor, t: int, size: int) -> torch.Tensor:
        """x̂0 [B, C, H, W] float64 at timestep t with patch size ``size`` (whatever the
        schedule says: the calibration compares sizes with this)."""
        self.check_size(size)
        x64 = x_t.to(self.device, torch.float64)
        cdt = self.compute_dtype(x64, t, size)
        self.last_dtype = cdt
        self._native = measured_softmax(self.tuner, self.dtype)
        abar = self.alpha_bar(t)
        return self.step(x64.to(cdt), math.sqrt(abar), 1.0 / (2.0 * (1.0 - abar)), size, self.images_in(cdt))

    def check_size(self, size: int, where: str = "") -> None:
        """ValueError for a patch size the model cannot take (every positive size by default)."""
        if size < 1:
            raise ValueError(f"{self.name}: patch sizes must be positive integers, got {size}{where}")

    @abstractmethod
    def step(self, x: torch.Tensor, a: float, scale: float, size: int, images: torch.Tensor) -> torch.Tensor:
        """x̂0 [B, C, H, W] float64 of samples x [B, C, H, W] (compute dtype) against ``images``
        [N, C, H, W] (compute dtype), a = sqrt(ᾱ), scale = 1/(2(1-ᾱ))."""


def _clip(centre: int, half: int, length: int) -> tuple[int, int]:
    return max(0, centre - half), min(length, centre + half + 1)


def position_tiles(pixels: list[tuple[int, int]], half: int, shape: tuple[int, int], block: int) -> list[Tile]:
    """Tiles of same-position windows (size 2·half + 1, clipped) for ``pixels``, grouped by
    ``block`` × ``block`` squares of the image; a tile's rectangle is its windows' bounding box."""
    h, w = shape
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, j in pixels:
        groups.setdefault((i // block, j // block), []).append((i, j))
    tiles = []
    for members in groups.values():
        windows = tuple((*_clip(i, half, h), *_clip(j, half, w)) for i, j in members)
        tiles.append(Tile(min(r[0] for r in windows), max(r[1] for r in windows),
                          min(r[2] for r in windows), max(r[3] for r in windows), windows, tuple(members)))
    return tiles


@register_model("els")
class ElsDenoiser(PatchDenoiser):
    """Kamb & Ganguli's equivariant local score machine (see the module doc); ``variant`` in
    ``borders`` (default), ``circular``, ``local``."""

    name = "els"

    def __init__(self, images: torch.Tensor, patch_sizes: int | Sequence[int], variant: str = "borders",
                 **kw) -> None:
        if variant not in ELS_VARIANTS:
            raise ValueError(f"model.variant must be one of {', '.join(ELS_VARIANTS)}, got {variant!r}")
        self.variant = variant
        super().__init__(images, patch_sizes, **kw)
        for t, k in self.schedule.items():
            self.check_size(k, f" at t={t} in model.patch_sizes={list(self.schedule.values())}")
        self._plans: dict[int, tuple[list[Band], list[Tile]]] = {}
        self.last_kernel: str | None = None  # the border bands' layout of the last step (tests, bench)

    def check_size(self, k: int, where: str = "") -> None:
        """ValueError unless k is odd (and, for ``circular``, at most the image size)."""
        h, w = self.images.shape[2:]
        if k % 2 == 0 or k < 1:
            raise ValueError(f"model=els needs odd patch sizes (a window centred on its pixel), got {k}{where}: "
                             f"use {max(1, k - 1)} or {k + 1}")
        if self.variant == "circular" and k > min(h, w):
            raise ValueError(f"model.variant=circular needs patch sizes of at most the image size {min(h, w)} "
                             f"(fully-inside training windows), got {k}{where}: use a smaller size, or "
                             "variant=borders, where k ≥ H means the same position")

    def plan(self, k: int) -> tuple[list[Band], list[Tile]]:
        """The sliding bands and same-position tiles that cover every output pixel at size k."""
        if k not in self._plans:
            self._plans[k] = self._build_plan(k)
        return self._plans[k]

    def _build_plan(self, k: int) -> tuple[list[Band], list[Tile]]:
        h, w = self.images.shape[2:]
        d = k // 2
        block = max(k, 4)  # tiles of about k×k windows: the rectangle wastes at most ~4x
        if self.variant == "local":
            return [], position_tiles([(i, j) for i in range(h) for j in range(w)], d, (h, w), block)
        if self.variant == "circular":
            return [Band(0, h, 0, w, (k, k), (d, d))], []
        rows_in = list(range(d, h - d))
        cols_in = list(range(d, w - d))
        rows_border = [i for i in range(h) if i < d or i > h - 1 - d]
        cols_border = [j for j in range(w) if j < d or j > w - 1 - d]
        bands = []
        if rows_in and cols_in:
            bands.append(Band(0, h, 0, w, (k, k), (d, d)))
        if cols_in:
            for i in rows_border:
                r0, r1 = _clip(i, d, h)
                bands.append(Band(r0, r1, 0, w, (r1 - r0, k), (i - r0, d)))
        if rows_in:
            for j in cols_border:
                c0, c1 = _clip(j, d, w)
                bands.append(Band(0, h, c0, c1, (k, c1 - c0), (d, j - c0)))
        corners = [(i, j) for i in rows_border for j in cols_border]
        return bands, position_tiles(corners, d, (h, w), block)

    def step(self, x: torch.Tensor, a: float, scale: float, size: int, images: torch.Tensor) -> torch.Tensor:
        """The sliding bands (:meth:`band_average`) and the same-position tiles of size k. The
        border bands of ``borders`` (one row or column of positions) take the layout the tuner
        measures fastest for this step (``windows`` or ``shifted``, float32 steps)."""
        batch, channels, h, w = x.shape
        out = torch.empty(batch, channels, h, w, dtype=torch.float64, device=x.device)
        bands, tiles = self.plan(size)
        border = [b for b in bands if self.variant == "borders" and 1 in b.positions]
        layout = "windows"
        if border and x.dtype == torch.float32:
            key = (f"els|border_bands|k={size}|{channels}x{h}x{w}|{str(x.dtype)[6:]}|"
                   + shape_key(channels * h * w, batch, images.shape[0], self.chunk_size))

            def probe(name: str):
                return lambda count, samples: (lambda: [self.band_average(x[:samples], b, a, scale, images[:count], name)
                                                        for b in border])

            layout = self.tuner.choose(key, {name: probe(name) for name in ("windows", "shifted")},
                                       images.shape[0], batch).kernel
        self.last_kernel = layout if border else None
        for band in bands:
            rows, cols, res = self.band_average(x, band, a, scale, images, layout if band in border else "windows")
            out[:, :, rows, cols] = res
        for tile in tiles:
            res = masked_tile_average(x, images, tile, a, scale, self.chunk_size, self.weights32,
                                      self._native)  # [S, B, C]
            ii = torch.tensor([c[0] for c in tile.centres], device=x.device)
            jj = torch.tensor([c[1] for c in tile.centres], device=x.device)
            out[:, :, ii, jj] = res.permute(1, 2, 0)
        return out

    def band_average(self, x: torch.Tensor, band: Band, a: float, scale: float, images: torch.Tensor,
                     layout: str = "windows") -> tuple[slice, slice, torch.Tensor]:
        """The output pixels (rows, columns) of one sliding band and their x̂0 [B, C, lh, lw]
        float64: queries are the windows of x over the band (of x padded circularly for
        ``circular``), candidates every window of the band in every image, through
        :func:`sliding_average` (``windows``) or :func:`shifted_band_average` (``shifted``)."""
        batch, channels, h, w = x.shape
        if self.variant == "circular":
            d = band.kernel[0] // 2
            queries = F.unfold(F.pad(x, (d, d, d, d), mode="circular"), band.kernel)  # [B, D, H·W]
            rows, cols = slice(0, h), slice(0, w)
            lh, lw = h, w
        else:
            lh, lw = band.positions
            queries = F.unfold(x[:, :, band.r0 : band.r1, band.c0 : band.c1], band.kernel)  # [B, D, L]
            rows = slice(band.r0 + band.centre[0], band.r0 + band.centre[0] + lh)
            cols = slice(band.c0 + band.centre[1], band.c0 + band.centre[1] + lw)
        q = queries.transpose(1, 2).reshape(-1, queries.shape[1])  # rows (b, position)
        average = shifted_band_average if layout == "shifted" else sliding_average
        res = average(q, images, band, a, scale, self.chunk_size, self.weights32, self._native)  # [B·L, C]
        return rows, cols, res.view(batch, lh, lw, channels).permute(0, 3, 1, 2)


@register_model("pspc")
class PspcDenoiser(PatchDenoiser):
    """Niedoba et al.'s position-specific patch posterior, "square" form (see the module doc).
    Sizes above the image are clipped to it (SPEC); ``mirror`` adds the horizontal mirrors."""

    name = "pspc"

    def __init__(self, images: torch.Tensor, patch_sizes: int | Sequence[int], mirror: bool = True,
                 **kw) -> None:
        if not isinstance(mirror, bool):
            raise ValueError(f"model.mirror must be true or false, got {mirror!r}")
        self.mirror = mirror
        super().__init__(torch.cat([images, images.flip(-1)]) if mirror else images, patch_sizes, **kw)
        self.last_kernel: str | None = None  # the tile layout of the last step (tests, bench)
        h, w = self.images.shape[2:]
        clipped = {t: p for t, p in self.schedule.items() if p > min(h, w)}
        if clipped:
            log.info("pspc: patch sizes %s are larger than the %dx%d images and clipped to them (SPEC)",
                     sorted(set(clipped.values())), h, w)

    def layouts(self, p: int) -> dict[str, int]:
        """The tile layouts of size p, as anchors per tile: ``runs`` of max(8, p) anchors, and
        ``rows`` (every anchor of an anchor row) where that differs. The mask wastes
        (run + p - 1)/p of the products; shorter runs waste less but copy more rectangles per
        image and run smaller GEMMs. Which is faster is measured (:meth:`step`): on Fashion-MNIST
        (6 000 images, 1 thread, a loaded machine) runs of 4 anchors took 6.5 s, of 8 5.2 s,
        rows 5.0-7.2 s, this runs rule 3.6-5.4 s. From p ≥ W/2 a run spans the full width: one
        channel's rows are then contiguous in each image and the GEMMs read them in place."""
        w = self.images.shape[3]
        pw = min(p, w)
        full = w - pw + 1
        return {"runs": min(full, max(8, pw)), **({"rows": full} if max(8, pw) < full else {})}

    def tiles(self, p: int, run: int) -> list[Tile]:
        """Tiles of one anchor row and ``run`` consecutive anchors: rectangles p × (run + p - 1)."""
        h, w = self.images.shape[2:]
        ph, pw = min(p, h), min(p, w)
        tiles = []
        for r in range(h - ph + 1):
            for c0 in range(0, w - pw + 1, run):
                anchors = range(c0, min(c0 + run, w - pw + 1))
                windows = tuple((r, r + ph, c, c + pw) for c in anchors)
                tiles.append(Tile(r, r + ph, c0, anchors[-1] + pw, windows))
        return tiles

    def step(self, x: torch.Tensor, a: float, scale: float, size: int, images: torch.Tensor) -> torch.Tensor:
        """The fastest of the tile layouts (:meth:`layouts`) and, with the native kernel on the
        CPU, ``box`` (:meth:`box_step`), as the tuner measures them (per shape and machine)."""
        layouts = self.layouts(size)
        c, h, w = images.shape[1:]
        box = self._native is not None and x.device.type == "cpu" and self.images.dtype == torch.float32
        key = (f"pspc|p={min(size, h, w)}|{c}x{h}x{w}|{str(x.dtype)[6:]}|"
               + ("box+" if box else "") + shape_key(c * h * w, x.shape[0], images.shape[0], self.chunk_size))

        def run(name: str, xs: torch.Tensor, count: int):
            if name == "box":
                return lambda: self.box_step(xs, a, scale, size, count)
            return lambda: self.tiled_step(xs, a, scale, size, images[:count], layouts[name])

        def probe(name: str):
            return lambda count, samples: run(name, x[:samples], count)

        names = [*layouts, *(("box",) if box else ())]
        decision = self.tuner.choose(key, {name: probe(name) for name in names}, images.shape[0], x.shape[0])
        self.last_kernel = decision.kernel
        return run(decision.kernel, x, images.shape[0])()

    def box_step(self, x: torch.Tensor, a: float, scale: float, size: int, count: int) -> torch.Tensor:
        """x̂0 [B, C, H, W] float64 over the first ``count`` images by the native kernel's box sums
        (float64 distances from the stored float32 images: exact in every step; O(C·H·W) per
        image and sample, against the tiles' GEMMs of p² per window)."""
        h, w = self.images.shape[2:]
        return self._native.pspc_box_step(x.double().contiguous(), self.images[:count], (min(size, h), min(size, w)),
                                          a, scale, WEIGHT_FLOOR_LOG * LOG2_E)

    def tiled_step(self, x: torch.Tensor, a: float, scale: float, size: int, images: torch.Tensor,
                   run: int) -> torch.Tensor:
        """x̂0 [B, C, H, W] float64 from the tiles of ``run`` anchors (:meth:`tiles`)."""
        batch, channels, h, w = x.shape
        total = torch.zeros(batch, channels, h, w, dtype=torch.float64, device=x.device)
        count = torch.zeros(h, w, dtype=torch.float64, device=x.device)
        for tile in self.tiles(size, run):
            res = masked_tile_average(x, images, tile, a, scale, self.chunk_size, self.weights32,
                                      self._native)  # [S, B, C·h·w]
            rect = res.view(len(tile.windows), batch, channels, tile.r1 - tile.r0, tile.c1 - tile.c0)
            for s, (top, bottom, left, right) in enumerate(tile.windows):
                own = rect[s, :, :, top - tile.r0 : bottom - tile.r0, left - tile.c0 : right - tile.c0]
                total[:, :, top:bottom, left:right] += own
                count[top:bottom, left:right] += 1
        return total / count
