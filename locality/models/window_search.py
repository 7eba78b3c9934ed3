"""els' float64 (low-noise) steps over sliding windows, searched rather than scored in full.

At t = 0 (1/(2σ²) = 5000) a query's softmax over the ~4e7 windows of Fashion-MNIST is carried by
a few of them; the rest weigh less than any rounding. :func:`searched_sliding_average` computes
:func:`~locality.models.patch_kernels.sliding_average` (same arguments and result, float64
direct differences through the native kernel) over the windows that can matter:

* per chunk of images, identical windows are merged into one candidate whose logit gains
  log2(count) (:func:`merged_windows`), and ordered by norm;
* queries, in blocks of similar norms, search outwards from their own norm
  (:class:`BlockSearch`): by the triangle inequality |‖q‖ - a‖c‖| ≤ ‖q - a c‖, a window whose
  norm lies farther than √(d + slack)/a from a query's, d the smallest distance found so far,
  weighs less than 2^-PRUNE_BITS of the nearest window, and is skipped.

All skipped windows together weigh at most (number of windows)·2^-PRUNE_BITS of a softmax sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from locality.models.memory import chunk_rows
from locality.models.patch_kernels import Band
from locality.models.softmax import LOG2_E, OnlineSoftmaxAverage

if TYPE_CHECKING:
    from locality.models.native import NativeSoftmax

# windows whose weight is provably below 2^-PRUNE_BITS of the query's nearest window's are
# skipped: all of them together weigh at most (number of windows)·2^-56 of the sum, below 1e-9
# for up to 7e7 windows
PRUNE_BITS = 56.0
QUERY_BLOCK = 32  # queries of similar norms that share one candidate range
# candidates per side and step of a block's search (the native kernel sums its float32 weights in
# blocks of 512 added in float64: no cap on a call's candidates for accuracy)
SEARCH_SLICE = 8192
MERGE_CHUNK_IMAGES = 4096  # images whose windows are merged and ordered at once
MERGE_CHUNK_BYTES = 2 << 30  # at most this much memory for them (and a quarter of the free memory)


def searched_sliding_average(queries: torch.Tensor, images: torch.Tensor, band: Band, a: float, scale: float,
                             chunk_size: int | None, native: NativeSoftmax) -> torch.Tensor:
    """:func:`~locality.models.patch_kernels.sliding_average` of float64 queries [R, D] over
    ``images`` [N, C, H, W]: logits of float64 direct differences through the native kernel
    (no expanded form to cancel, no logits in memory) over the windows that can matter (the
    module doc). Fashion-MNIST's 3×3 windows are 38 % duplicates (29 % the all-background
    window); at t = 0 the search takes ~15 % of the rest. Returns [R, C] float64."""
    rows, dim = queries.shape
    num, channels = images.shape[:2]
    lh, lw = band.positions
    windows = lh * lw
    device = queries.device
    # images per chunk: the windows with their values, norms and sort keys, and the merge's
    # copies, within the free-memory budget (not the cache cap: merging and pruning gain with
    # the chunk) and at most MERGE_CHUNK_IMAGES
    size = chunk_rows(8 * windows * 4 * (dim + channels + 3), device, chunk_size, total=num,
                      cpu_cap=MERGE_CHUNK_BYTES)
    size = min(size, MERGE_CHUNK_IMAGES)
    scale2 = scale * LOG2_E
    q_norms = queries.square().sum(1).sqrt_()
    order = torch.argsort(q_norms)
    blocks = [order[i : i + QUERY_BLOCK] for i in range(0, rows, QUERY_BLOCK)]
    searches = [BlockSearch(queries[idx].contiguous().unsqueeze(0), q_norms[idx] / a, scale2, a, native)
                for idx in blocks]
    ch, cw = band.centre
    for start in range(0, num, size):
        part = images[start : start + size, :, band.r0 : band.r1, band.c0 : band.c1]
        k = part.shape[0]
        view = part.unfold(2, band.kernel[0], 1).unfold(3, band.kernel[1], 1).permute(0, 2, 3, 1, 4, 5)
        values = part[:, :, ch : ch + lh, cw : cw + lw].reshape(k, channels, windows).transpose(1, 2)
        cands = merged_windows(view.reshape(k * windows, dim).to(torch.float64),
                               values.reshape(k * windows, channels).to(torch.float64))
        for search in searches:
            search.run(cands)
    out = torch.empty(rows, channels, dtype=torch.float64, device=device)
    for idx, search in zip(blocks, searches):
        out[idx] = search.acc.result()
    return out


class BlockSearch:
    """The online softmax of one block of queries (``rows`` [1, b, D], norms/a ``reach`` [b])
    over the windows that can matter (the module doc). Candidates are taken in
    slices of ``SEARCH_SLICE`` outwards from the block's norms; after each, the smallest
    distance of each query is bounded from the running maximum logit (d ≤ (max bias - max)/s:
    the maximum is some window's -s·d + log2 count) and the range still needed shrinks to
    norms within √(d + slack)/a of the query's."""

    def __init__(self, rows: torch.Tensor, reach: torch.Tensor, scale2: float, a: float,
                 native: NativeSoftmax) -> None:
        self.rows, self.reach, self.scale2, self.a = rows, reach, scale2, a
        self.slack = PRUNE_BITS / scale2  # distance units: weights below 2^-PRUNE_BITS of the nearest's
        self.acc = OnlineSoftmaxAverage(base2=True, native=native)
        self.nearest = torch.full_like(reach, math.inf)  # ≥ each query's smallest distance so far
        self.max_bias = 0.0

    def run(self, cands: MergedWindows) -> None:
        norms = cands.norms
        lo = hi = int(torch.searchsorted(norms, self.reach.median()))
        while True:
            need_lo, need_hi = self._needed(norms)
            if lo <= need_lo and hi >= need_hi:
                return
            if hi < need_hi:
                end = min(hi + SEARCH_SLICE, need_hi)
                self._take(cands, hi, end)
                hi = end
            if lo > need_lo:
                begin = max(lo - SEARCH_SLICE, need_lo)
                self._take(cands, begin, lo)
                lo = begin

    def _needed(self, norms: torch.Tensor) -> tuple[int, int]:
        """The candidates [i0, i1) (by ascending norm) that may lie within ``slack`` of a
        query's smallest distance (widened by 1e-9 relative for the norms' rounding)."""
        if not math.isfinite(float(self.nearest.max())):
            return 0, norms.numel()
        radius = (self.nearest + self.slack).sqrt_().mul_(1 + 1e-9).add_(1e-12) / self.a
        bounds = torch.stack([(self.reach - radius).min(), (self.reach + radius).max()])
        return (int(torch.searchsorted(norms, bounds[0])), int(torch.searchsorted(norms, bounds[1], right=True)))

    def _take(self, cands: MergedWindows, i0: int, i1: int) -> None:
        if i1 <= i0:
            return
        self.acc.update_direct(self.rows, cands.windows_t[:, i0:i1], cands.values_t[:, i0:i1].unsqueeze(0),
                               self.a, self.scale2, bias=cands.log2_count[i0:i1])
        self.max_bias = max(self.max_bias, float(cands.log2_count[i0:i1].max()))
        self.nearest = torch.minimum(self.nearest, (self.max_bias - self.acc.max) / self.scale2)


@dataclass(frozen=True)
class MergedWindows:
    """Candidate windows with identical ones merged, by ascending norm: ``windows_t`` [D, M]
    and ``values_t`` [C, M] float64, ``norms`` [M] float64, ``log2_count`` [M] float64 (how
    many windows each stands for, as a logit bias in base 2)."""

    windows_t: torch.Tensor
    values_t: torch.Tensor
    norms: torch.Tensor
    log2_count: torch.Tensor


def merged_windows(windows: torch.Tensor, values: torch.Tensor) -> MergedWindows:
    """Merge identical rows of ``windows`` [K, D] (their ``values`` [K, C] are equal too: the
    value pixel is inside the window) and order them by norm. Rows sort by (‖w‖², w·h) for a
    fixed direction h, so identical rows are neighbours; only rows found equal element by
    element are merged (a tie of keys between different rows merges nothing)."""
    sq = windows.square().sum(1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    direction = torch.randn(windows.shape[1], generator=gen, dtype=torch.float64).to(windows.device)
    order = torch.sort(windows @ direction, stable=True).indices
    order = order[torch.sort(sq[order], stable=True).indices]
    w = windows[order]
    first = torch.ones(len(w), dtype=torch.bool, device=w.device)
    first[1:] = (w[1:] != w[:-1]).any(1)
    starts = first.nonzero().squeeze(1)
    counts = torch.diff(starts, append=torch.tensor([len(w)], device=w.device))
    keep = order[starts]
    return MergedWindows(w[starts].T.contiguous(), values[keep].T.contiguous(), sq[keep].sqrt(),
                         counts.to(torch.float64).log2())
