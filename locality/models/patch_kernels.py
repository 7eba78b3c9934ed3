"""GEMM kernels of the patch-posterior denoisers (els, pspc): exact softmax averages over
training windows, streamed over image chunks through the one online softmax
(:class:`~locality.models.softmax.OnlineSoftmaxAverage`).

Both models need, for query windows q of the noisy batch and candidate windows c of the
training images, logits -‖q - a c‖² s (a = sqrt(ᾱ), s = 1/(2(1-ᾱ))) and a softmax-weighted
average of pixel values. The distance expands into products (as in pca_locality and optimal):
-‖q - a c‖² s = -‖q‖² s + 2as q·c - a²s ‖c‖², and -‖q‖² s is the same for every candidate of a
query, so it cancels in the softmax. Every logit is then ONE product of an augmented query
row [2as q, -a²s] with an augmented candidate column [c, ‖c‖²]: a GEMM with the norm folded in
(no separate pass over the logits). Two kernels:

* :func:`sliding_average`: every query sees every window of a band of every image (els'
  interior, border rows and columns, and its circular variant). The candidate windows of a
  chunk are unfolded (``F.unfold``) once and serve all query rows: logits [R, K·L] =
  queries [R, D+1] @ windows [K·L, D+1]ᵀ; values are the windows' centre pixels.
* :func:`shifted_band_average`: the same sum for bands of few positions (els' border rows and
  columns): each query is placed at every window position of the band's rectangle, and one GEMM
  multiplies these with the rectangles read in place (no copy of the windows; the tuner picks
  it or the copies per step).
* float64 steps of :func:`sliding_average` (low noise: t = 0) search instead of scoring every
  window (:mod:`locality.models.window_search`): identical windows merged, the rest ordered by norm, and a
  window skipped only where the triangle inequality proves its weight below 2^-PRUNE_BITS of
  the nearest window's.
* :func:`masked_tile_average`: each query sees the window at its OWN position in every image
  (els' corners and its local variant; pspc). The windows of a tile of neighbouring positions
  lie in one rectangle of the image; the rectangle of each image is copied once per chunk and
  every query is masked to its own window over the rectangle: logits [S·B, K] =
  masked queries [S·B, D_r] @ rectangles [K, D_r]ᵀ, minus the window norms a²s‖y_k[window]‖². The mask wastes the
  zeros outside each window (the tile's ``waste``), but needs no per-window copy of the images:
  a copy per window would move as many values as the GEMM multiplies (each used only B times).

Precision: :func:`window_logit_error_estimate` bounds the rounding of a float32 GEMM's logits;
the models run float32 where it is within ``LOGIT_TOLERANCE``, else float64 (low noise, where
s reaches 5000). Softmax accumulators are float64 either way.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from locality.models.memory import Workspace, chunk_rows, memory_budget
from locality.models.softmax import LOG2_E, OnlineSoftmaxAverage

if TYPE_CHECKING:
    from locality.models.native import NativeSoftmax

LOGITS_CPU_CAP_BYTES = 8 << 20  # CPU: logits blocks that stay in the last-level cache
# candidates per softmax update: the weighted sums of one update are float32 GEMM sums (float64
# across updates); over 135 000 nearly equal weights (t = 900, 200 images) one sum missed the
# float64 result by 3.9e-4, within 4096 terms the rounding stays near eps·√4096 ≈ 4e-6
MAX_UPDATE_COLUMNS = 4096


def window_logit_error_estimate(values: int, abar: float, scale: float, x_abs_max: float,
                                y_abs_max: float, dtype: torch.dtype) -> float:
    """Rounding estimate of the expanded logits of windows of ``values`` values in ``dtype``,
    errors of the D terms adding like a random walk:
    u · s · (2a|x|max|y|max + a²|y|max²) · √D (the form of pca_locality's dense estimate, with
    a mask column of D ones)."""
    unit = torch.finfo(dtype).eps
    a = math.sqrt(abar)
    return unit * scale * (2 * a * x_abs_max * y_abs_max + abar * y_abs_max**2) * math.sqrt(max(values, 1))


def _chunk_images(bytes_per_image: int, device: torch.device, chunk_size: int | None, total: int) -> int:
    return chunk_rows(bytes_per_image, device, chunk_size, total=total)


def _logit_budget(device: torch.device) -> int:
    """Bytes one block of logits may take (the CPU's cap keeps it cache-resident)."""
    return memory_budget(device, cpu_cap=LOGITS_CPU_CAP_BYTES)


def _accumulator(weights32: bool, native: NativeSoftmax | None) -> OnlineSoftmaxAverage:
    """The online softmax of base-2 logits (float32 weights from float64 logits if asked; the
    fused C kernel for float32 logits where ``native`` is given)."""
    return OnlineSoftmaxAverage(base2=True, weights_dtype=torch.float32 if weights32 else None, native=native)


@dataclass(frozen=True)
class Band:
    """A rectangle of the training images, rows [r0, r1) × columns [c0, c1), whose windows of
    ``kernel`` (kh, kw) at every position are the candidates; ``centre`` (ch, cw) is the offset
    of a window's value pixel within the window."""

    r0: int
    r1: int
    c0: int
    c1: int
    kernel: tuple[int, int]
    centre: tuple[int, int]

    @property
    def positions(self) -> tuple[int, int]:
        return self.r1 - self.r0 - self.kernel[0] + 1, self.c1 - self.c0 - self.kernel[1] + 1


def sliding_average(queries: torch.Tensor, images: torch.Tensor, band: Band, a: float, scale: float,
                    chunk_size: int | None, weights32: bool = False, native: NativeSoftmax | None = None
                    ) -> torch.Tensor:
    """Softmax average over every window of ``band`` of every image, per query.

    queries [R, D] (windows of the noisy batch in ``F.unfold`` order (C, kh, kw), in the compute
    dtype), images [N, C, H, W] in the compute dtype. Each query's logits are
    2as q·c - a²s‖c‖² over all N·L candidate windows c (L = the band's positions), its result
    the softmax average of their value pixels. ``weights32``: float64 logits give float32
    weights (:class:`OnlineSoftmaxAverage`). Returns [R, C] float64."""
    rows, dim = queries.shape
    num, channels = images.shape[:2]
    lh, lw = band.positions
    windows = lh * lw
    dtype, device = queries.dtype, queries.device
    item = queries.element_size()
    if native is not None and dtype == torch.float64 and device.type == "cpu" and channels <= native.max_values:
        from locality.models.window_search import searched_sliding_average  # (it imports Band from here)

        return searched_sliding_average(queries, images, band, a, scale, chunk_size, native)
    aug = torch.empty(rows, dim + 1, dtype=dtype, device=device)
    aug[:, :dim] = queries * (2.0 * a * scale * LOG2_E)  # base-2 logits: exp2 is the fast one
    aug[:, dim] = -a * a * scale * LOG2_E
    # images per chunk: the unfolded windows with their norms and values (K·L·(2D + C + 2))
    size = _chunk_images(item * windows * (2 * dim + channels + 2), device, chunk_size, num)
    size = min(size, max(1, MAX_UPDATE_COLUMNS // windows))
    # query rows per block: a block of logits [rows, K·L] within the logits budget
    block = max(1, min(rows, _logit_budget(device) // max(1, item * size * windows)))
    accs = [_accumulator(weights32, native) for _ in range(0, rows, block)]
    ws = Workspace(device)
    ch, cw = band.centre
    for start in range(0, num, size):
        part = images[start : start + size, :, band.r0 : band.r1, band.c0 : band.c1]
        k = part.shape[0]
        # the windows [K, Lh, Lw, (C, kh, kw)] as a strided view, copied once into the GEMM operand
        # (F.unfold and a transposed copy took twice as long: im2col ran at ~2 ns a value)
        view = part.unfold(2, band.kernel[0], 1).unfold(3, band.kernel[1], 1).permute(0, 2, 3, 1, 4, 5)
        cand = ws.take("cand", (k, windows, dim + 1), dtype)
        cand[..., :dim] = view.reshape(k, windows, dim)
        cand[..., dim] = cand[..., :dim].square().sum(dim=2)  # ‖c‖²
        cand = cand.view(k * windows, dim + 1)
        values = ws.take("values", (k, windows, channels + 1), dtype)
        values[..., :channels] = part[:, :, ch : ch + lh, cw : cw + lw].reshape(k, channels, windows).transpose(1, 2)
        values[..., channels] = 1.0  # the normaliser comes out of the same product
        values = values.view(k * windows, channels + 1)
        for acc, r0 in zip(accs, range(0, rows, block)):
            q = aug[r0 : r0 + block]
            logits = torch.mm(q, cand.T, out=ws.take("logits", (len(q), k * windows), dtype))
            acc.update(logits, values, ones_column=True)
    return torch.cat([acc.result() for acc in accs])


def shifted_band_average(queries: torch.Tensor, images: torch.Tensor, band: Band, a: float, scale: float,
                         chunk_size: int | None, weights32: bool = False, native: NativeSoftmax | None = None
                         ) -> torch.Tensor:
    """:func:`sliding_average` (same arguments and result) without copying windows: every
    query window is placed at each of the band's L window positions in a rectangle of zeros,
    and one GEMM per chunk multiplies these [R·L, C·h·w] with the images' rectangles, read in
    place where contiguous: logits [R, L·K] (query r, position p, image k) minus the window
    norms a²s‖y_k[p]‖² (a GEMM of the positions' masks with the squared rectangles). It
    multiplies (h·w)/(kh·kw) times the products of the copied windows but reads each
    rectangle once instead of writing L windows of it: the border bands of large windows (els'
    k ≥ 21 on 28 × 28: 1-4 positions of up to 25 × 28) hold few queries, and there the copy
    costs more than the GEMM."""
    rows, dim = queries.shape
    num, channels = images.shape[:2]
    dtype, device = queries.dtype, queries.device
    kh, kw = band.kernel
    lh, lw = band.positions
    (ch, cw), top, left = band.centre, band.r0, band.c0
    # the band's windows as a tile of the rectangle: its masks [L, C·h·w] and value pixels
    tile = Tile(band.r0, band.r1, band.c0, band.c1,
                tuple((top + i, top + i + kh, left + j, left + j + kw) for i in range(lh) for j in range(lw)),
                tuple((top + i + ch, left + j + cw) for i in range(lh) for j in range(lw)))
    masks = tile.masks(channels, dtype, device)
    count, rect = masks.shape
    centres = tile.centre_index(channels, device)
    # each query at every position: a window's ones in the flattened rectangle run in the
    # query's own (C, kh, kw) order
    placed = torch.zeros(rows, count * rect, dtype=dtype, device=device)
    placed[:, masks.reshape(-1) != 0] = (queries * (2.0 * a * scale * LOG2_E)).repeat(1, count)  # base-2 logits
    placed = placed.view(rows * count, rect)
    norm_factor = a * a * scale * LOG2_E
    item = queries.element_size()
    # images per chunk: the rectangle and its squares, norms, values and logits per image
    size = _chunk_images(item * (2 * rect + count * (channels + 2 + rows)), device, chunk_size, num)
    size = min(size, max(1, MAX_UPDATE_COLUMNS // count))
    acc = _accumulator(weights32, native)
    ws = Workspace(device)
    for start in range(0, num, size):
        part = images[start : start + size, :, band.r0 : band.r1, band.c0 : band.c1]
        k = part.shape[0]
        if part[0].is_contiguous():  # full-width rows: the rectangles are read in place
            cand = part.reshape(k, rect)
        else:
            cand = ws.take("cand", (k, rect), dtype)
            cand.copy_(part.reshape(k, rect))
        norms = torch.mm(masks, cand.square().T).mul_(norm_factor)  # [L, K]
        logits = torch.mm(placed, cand.T, out=ws.take("logits", (rows * count, k), dtype))
        logits.view(rows, count, k).sub_(norms.unsqueeze(0))
        values = ws.take("values", (count, k, channels + 1), dtype)
        values[..., :channels] = cand[:, centres].view(k, count, channels).transpose(0, 1)
        values[..., channels] = 1.0  # the normaliser comes out of the same product
        acc.update(logits.view(rows, count * k), values.view(count * k, channels + 1), ones_column=True)
    return acc.result()


@dataclass(frozen=True)
class Tile:
    """Windows at their own positions, all inside the rectangle rows [r0, r1) × columns
    [c0, c1) of the image: ``windows`` [S, 4] as (top, bottom, left, right) in image
    coordinates (half-open), and for els the value pixel of each window ``centres`` [S, 2]
    (None: the values are the whole rectangle, pspc)."""

    r0: int
    r1: int
    c0: int
    c1: int
    windows: tuple[tuple[int, int, int, int], ...]
    centres: tuple[tuple[int, int], ...] | None = None

    @functools.lru_cache(maxsize=4096)  # a tile is planned once per patch size: build its masks once
    def masks(self, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[S, C·h·w] binary: window s over the rectangle (all channels)."""
        h, w = self.r1 - self.r0, self.c1 - self.c0
        m = torch.zeros(len(self.windows), channels, h, w, dtype=dtype, device=device)
        for s, (t, b, l, r) in enumerate(self.windows):
            m[s, :, t - self.r0 : b - self.r0, l - self.c0 : r - self.c0] = 1.0
        return m.reshape(len(self.windows), -1)

    @functools.lru_cache(maxsize=4096)
    def window_inputs(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`masks` as CSR on the CPU, (indptr [S + 1], indices) int64: window s's values
        in the flattened (C, h, w) rectangle (the native kernel's direct differences)."""
        ones = self.masks(channels, torch.float64, torch.device("cpu")) != 0
        indptr = torch.zeros(len(self.windows) + 1, dtype=torch.int64)
        indptr[1:] = ones.sum(1).cumsum(0)
        return indptr, ones.nonzero()[:, 1].contiguous()

    @functools.lru_cache(maxsize=4096)
    def centre_index(self, channels: int, device: torch.device) -> torch.Tensor:
        """[S·C] indices of the windows' value pixels in the flattened (C, h, w) rectangle,
        ordered (window, channel)."""
        h, w = self.r1 - self.r0, self.c1 - self.c0
        idx = [c * h * w + (i - self.r0) * w + (j - self.c0) for i, j in self.centres for c in range(channels)]
        return torch.tensor(idx, dtype=torch.long, device=device)


def masked_tile_average(x: torch.Tensor, images: torch.Tensor, tile: Tile, a: float, scale: float,
                        chunk_size: int | None, weights32: bool = False, native: NativeSoftmax | None = None
                        ) -> torch.Tensor:
    """Softmax average over the N images of each window of ``tile``, at its own position.

    x [B, C, H, W] and images [N, C, H, W] in the compute dtype. For window s and sample b,
    logits 2as x[b]·y_k - a²s‖y_k‖² over the window, one per image k. Returns [S, B, V]
    float64: V = C (the window's value pixel, ``tile.centres``) or the whole rectangle
    C·h·w (``centres`` None; the caller keeps each window's own part). ``weights32`` as for
    :func:`sliding_average`."""
    batch, channels = x.shape[:2]
    num = images.shape[0]
    dtype, device = x.dtype, x.device
    item = x.element_size()
    s_count = len(tile.windows)
    if native is not None and dtype == torch.float64 and device.type == "cpu":
        width = channels if tile.centres is not None else channels * (tile.r1 - tile.r0) * (tile.c1 - tile.c0)
        if width <= native.max_values:
            return _tile_direct(x, images, tile, a, scale, chunk_size, native)
    masks = tile.masks(channels, dtype, device)  # [S, D_r]
    dim = masks.shape[1]
    region = x[:, :, tile.r0 : tile.r1, tile.c0 : tile.c1].reshape(batch, dim)
    # base-2 logits (exp2 is the fast one); the window norms are subtracted after the GEMM: as
    # one-hot columns of the GEMM they cost S multiply-adds per logit (els' corner tiles: 441)
    queries = (masks.unsqueeze(1) * region.unsqueeze(0) * (2.0 * a * scale * LOG2_E)).view(s_count * batch, dim)
    norm_factor = a * a * scale * LOG2_E
    centres = tile.centre_index(channels, device) if tile.centres is not None else None
    width = dim if centres is None else len(centres)
    # images per chunk: rectangle, its squares, norms, values, logits column (S·B)
    size = _chunk_images(item * (2 * dim + s_count + width + 1 + s_count * batch), device, chunk_size, num)
    size = min(size, MAX_UPDATE_COLUMNS)
    acc = _accumulator(weights32, native)
    ws = Workspace(device)
    for start in range(0, num, size):
        part = images[start : start + size, :, tile.r0 : tile.r1, tile.c0 : tile.c1]
        k = part.shape[0]
        if part[0].is_contiguous():  # full-width rows of one channel, or whole images: a strided view
            cand = part.reshape(k, dim)  # the GEMMs read it in place (a copy cost as much as they did)
        else:
            cand = ws.take("cand", (k, dim), dtype)
            cand.copy_(part.reshape(k, dim))
        norms = torch.mm(masks, cand.square().T).mul_(norm_factor)  # [S, K]: ‖window s of y_k‖², scaled
        logits = torch.mm(queries, cand.T, out=ws.take("logits", (s_count * batch, k), dtype))
        logits.view(s_count, batch, k).sub_(norms.unsqueeze(1))
        if centres is None:
            acc.update(logits, cand)
            continue
        values = ws.take("values", (k, width + 1), dtype)
        values[:, :width] = cand[:, centres]
        values[:, width] = 1.0
        acc.update(logits, values, ones_column=True)
    res = acc.result().view(s_count, batch, width)
    if centres is None:
        return res
    own = torch.arange(s_count, device=device)
    return res.view(s_count, batch, s_count, channels)[own, :, own]  # window s's own value pixel


def _tile_direct(x: torch.Tensor, images: torch.Tensor, tile: Tile, a: float, scale: float,
                 chunk_size: int | None, native: NativeSoftmax) -> torch.Tensor:
    """:func:`masked_tile_average` for float64 steps through the native kernel: each window's
    logits from float64 direct differences over its own pixels of the rectangle (the CSR of
    the tile's masks), no GEMM and no logits in memory. Returns what the GEMM path does:
    [S, B, C·h·w] (pspc) or [S, B, C] (the windows' value pixels, els)."""
    batch, channels = x.shape[:2]
    num = images.shape[0]
    s_count = len(tile.windows)
    csr = tile.window_inputs(channels)
    dim = channels * (tile.r1 - tile.r0) * (tile.c1 - tile.c0)
    region = x[:, :, tile.r0 : tile.r1, tile.c0 : tile.c1].reshape(1, batch, dim).contiguous()
    centres = tile.centre_index(channels, x.device) if tile.centres is not None else None
    width = dim if centres is None else channels
    size = _chunk_images(8 * 2 * dim, x.device, chunk_size, num)
    size = min(size, MAX_UPDATE_COLUMNS)
    acc = OnlineSoftmaxAverage(base2=True, native=native)
    ws = Workspace(x.device)
    for start in range(0, num, size):
        part = images[start : start + size, :, tile.r0 : tile.r1, tile.c0 : tile.c1]
        k = part.shape[0]
        cand = ws.take("cand_t", (dim, k), torch.float64)
        cand.copy_(part.reshape(k, dim).T)
        # pspc: every window averages the whole rectangle; els: window s its own value pixel
        values = cand.unsqueeze(0) if centres is None else cand[centres].view(s_count, channels, k)
        acc.update_direct(region, cand, values, a, scale * LOG2_E, csr)
    return acc.result().view(s_count, batch, width)
