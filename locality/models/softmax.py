"""Exact softmax-weighted averages over a dataset streamed in chunks (online log-sum-exp).

SPEC defect 1: the reference normalised each chunk on its own and averaged the chunks, so its
output depended on the chunk size. Here a running maximum, a running normaliser and a running
weighted sum are rescaled whenever the maximum grows, so the result equals the one-chunk
softmax up to rounding, whatever the chunking. The running normaliser and sum are kept in
float64 whatever the compute dtype (they are [B, n]: free), so a float32 chunk only adds its
own rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from locality.models.native import NativeSoftmax

WEIGHT_FLOOR_LOG = 60.0  # log of the smallest relative softmax weight kept apart from it
LOG2_E = 1.4426950408889634  # log2(e): natural logits times this are base-2 logits
# float32 (or another cheaper form) runs where a rounding estimate of the logits stays below this:
# an error e in every logit moves a softmax average by at most e·max|y| ≈ e, so outputs stay within 1e-4
LOGIT_TOLERANCE = 2e-4
# the weighted sums of a chunk are formed in float32 products over at most this many images and
# added in float64: a float32 GEMM's sum over K terms drifts with K (over one chunk of 3000
# Fashion-MNIST images, int8 logits at t = 200, it moved x̂0 by 1.3e-4; blocks of 512 by < 2e-5)
SUM_BLOCK = 512


class OnlineSoftmaxAverage:
    """Accumulates Σ_k softmax_k(logit) · value_k over chunks of k.

    Two layouts, one per accumulator: :meth:`update` takes per-image logits [B, K] with values
    [K, n] (one weight per image, as in the optimal denoiser); :meth:`update_pixel_major` takes
    per-value logits [n, B, K] with values [n, K] (one weight per image and output value, as in
    pca_locality). Both overwrite the logits with the weights. ``result()`` is [B, n] float64.
    :meth:`update_pixel_major_sums` takes int8 kernels' digit sums and forms the logits itself.

    With ``native`` (:mod:`locality.models.native`, where it was measured faster), float32
    updates on the CPU run the fused C kernel: the same arithmetic in two passes over each row
    (the logits are then left as they were); the state is the same, so both paths may serve
    one accumulator. With more values per row than the fused sums take (pspc's rectangles), the
    C kernel forms only the weights, in place, and torch's GEMMs the weighted sums.
    """

    def __init__(self, base2: bool = False, weights_dtype: torch.dtype | None = None,
                 native: NativeSoftmax | None = None) -> None:
        """``base2``: the logits are in base-2 units (log2 e times the natural ones; fold the
        factor into the GEMM that makes them): the weights are exp2(l - max), which torch
        computes ~3x faster than exp on the CPU (0.8 against 2.5 ms for 2.1M float32 values,
        AVX-512). ``weights_dtype`` (:meth:`update` only): float64 logits become weights in this
        dtype after the maximum is subtracted in float64 (float32 weights are relatively exact
        to eps·|l - max| ≤ 5e-6, and float64 exp is ~4x slower than float32 exp2)."""
        self.base2 = base2
        self.weights_dtype = weights_dtype
        self.max: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None
        self.pixel_major = False  # accumulators [n, B] (update_pixel_major) rather than [B, n]
        self._both: torch.Tensor | None = None  # update_pixel_major's [values, ones] buffer
        self.native = native

    def update(self, logits: torch.Tensor, values: torch.Tensor, ones_column: bool = False) -> None:
        """Per-image layout: logits [B, K] (overwritten with the weights), values [K, n].

        ``ones_column``: the last column of ``values`` is all ones, so the normaliser comes out
        of the same product as the weighted sum (one pass less over the weights); the result
        then has n - 1 columns."""
        if self._native_takes(logits) and (self.weights_dtype in (None, logits.dtype)):
            vals = values[:, :-1] if ones_column else values
            if 1 <= vals.shape[1] <= self.native.max_values:
                # [1, V, K]: the candidates contiguous, one set of values for every row
                self._native_update(logits.shape[0], 1, logits.shape[1], vals.T.to(torch.float32).contiguous()
                                    .unsqueeze(0), logits=logits)
                return
            if vals.shape[1] > self.native.max_values:
                self._native_weights_update(logits, vals)
                return
        new_max = logits.amax(dim=1).double()  # [B]
        if self.max is not None:
            new_max = torch.maximum(self.max, new_max)
        weights = logits.sub_(new_max.to(logits.dtype).unsqueeze(1))
        if self.weights_dtype is not None and self.weights_dtype != weights.dtype:
            weights = weights.to(self.weights_dtype)
        weights = self._exp(weights.clamp_(min=-self._floor()))  # ≤ 1: no overflow; no subnormals
        if ones_column:
            vals = values.to(weights.dtype)
            # a few value columns: (valuesᵀ @ weightsᵀ)ᵀ, 9x faster than weights @ values for
            # [517, 4056] @ [4056, 2] (MKL, float32): the wide operand streams once
            sums = blocked_sum(lambda s, e: (torch.mm(vals[s:e].T, weights[:, s:e].T).T if vals.shape[1] <= 16
                                             else weights[:, s:e] @ vals[s:e]), weights.shape[1])  # [B, n]
            chunk_norm, chunk_acc = sums[:, -1], sums[:, :-1]
        else:
            chunk_norm = weights.sum(dim=1, dtype=torch.float64)  # [B]
            vals = values.to(weights.dtype)
            chunk_acc = blocked_sum(lambda s, e: weights[:, s:e] @ vals[s:e], weights.shape[1])  # [B, n]
        self._merge(new_max, chunk_norm, chunk_acc)

    def update_pixel_major(self, logits: torch.Tensor, values: torch.Tensor) -> None:
        """Per-value layout with the images last: logits [n, B, K] (overwritten with the
        weights), values [n, K]. The reductions over k then run along contiguous memory, and
        the weighted sum and the normaliser come out of one batched product
        [n, B, K] @ [n, K, 2] (values and ones). Accumulators are [n, B]; ``result()`` is [B, n]."""
        if self._native_takes(logits) and logits.is_contiguous():
            n, batch, count = logits.shape
            self.pixel_major = True
            self._native_update(batch, n, count, values.to(torch.float32).contiguous().unsqueeze(1),
                                logits=logits.view(n * batch, count))
            return
        chunk_max = logits.amax(dim=2).double()  # [n, B]
        new_max = chunk_max if self.max is None else torch.maximum(self.max, chunk_max)
        # On the CPU weights below e^-60 (1e-26 of the largest) are raised to it: subnormal
        # floats, which the peaked low-noise softmaxes produce in masses, run ~100x slower on
        # x86, and the change to x̂0 is below N·1e-26. GPUs handle them at full speed: there the
        # clamp would only cost a pass over the logits.
        logits.sub_(new_max.to(logits.dtype).unsqueeze(2))
        if logits.device.type == "cpu":
            logits.clamp_(min=-self._floor())
        self._exp(logits)
        both = self._pairs(values, logits.dtype)
        sums = blocked_sum(lambda s, e: torch.bmm(logits[:, :, s:e], both[:, s:e]), logits.shape[2])  # [n, B, 2]
        self._merge(new_max, sums[..., 1], sums[..., 0])
        self.pixel_major = True

    def update_pixel_major_sums(self, quad: torch.Tensor, sums: torch.Tensor, coefs: list[float],
                                values: torch.Tensor, count: int, workspace) -> None:
        """:meth:`update_pixel_major` for the logits quad[m, k] + Σ_j coefs[j]·sums[m, j, b, k]
        (an int8 kernel's exact digit sums, combined in float32 high digits first): ``quad``
        float32 [n, ≥count], ``sums`` int32 [n, p, B, ≥count] (any strides, candidates
        contiguous), ``values`` [n, count]. Without the native kernel the logits are formed in
        the ``workspace``'s buffers."""
        n, digits, batch = sums.shape[:3]
        if self._native_takes(quad):
            self.pixel_major = True
            self._native_update(batch, n, count, values.to(torch.float32).contiguous().unsqueeze(1), sums=sums[..., :count],
                                coefs=coefs, quad=quad)
            return
        logits = workspace.take("logits", (n, batch, count), quad.dtype)
        logits.copy_(quad[:, :count].unsqueeze(1))
        converted = workspace.take("converted", (n, batch, count), quad.dtype)
        for j in reversed(range(digits)):  # high digits first
            converted.copy_(sums[:, j, :, :count])  # int32 -> float: a plain float add below is ~10x faster
            logits.add_(converted, alpha=coefs[j])
        self.update_pixel_major(logits, values)

    def update_sparse(self, x64: torch.Tensor, y64: torch.Tensor, sparse_t: torch.Tensor, a: float, scale: float,
                      logits_of: Callable[[], torch.Tensor]) -> None:
        """:meth:`update_pixel_major` for pca_locality's sparse step: natural logits
        -scale·Mᵀ(x - a·y)² from samples x64 [B, n], the chunk's pixel-major images y64 [n, K]
        (their own values are averaged) and Mᵀ in CSR (float64 throughout). The native kernel
        forms them itself (:meth:`update_direct`); otherwise ``logits_of()`` gives them [n, B, K]."""
        if self.native is not None and x64.device.type == "cpu" and not self.base2:
            n = sparse_t.shape[0]
            self.pixel_major = True
            # values: output value g averages its own row of the images (stride ldy per group)
            values = y64.as_strided((n, 1, y64.shape[1]), (y64.stride(0), 0, 1))
            self.update_direct(x64.contiguous().unsqueeze(0), y64, values, a, scale,
                               (sparse_t.crow_indices().contiguous(), sparse_t.col_indices().contiguous()))
            return
        self.update_pixel_major(logits_of(), y64)

    def update_direct(self, queries: torch.Tensor, candidates: torch.Tensor, values: torch.Tensor, a: float,
                      scale: float, csr: tuple[torch.Tensor, torch.Tensor] | None = None,
                      bias: torch.Tensor | None = None) -> None:
        """One chunk of logits -scale·Σ_i (q_i - a·c_i)² (in the accumulator's units), formed by
        the native kernel from float64 direct differences (no cancellation: the low-noise steps)
        over every input i, or with ``csr`` = (indptr [G + 1], indices) over the inputs of group
        g: queries [1 or G, B, n], candidates [n, K], values [1 or G, V, K] (candidates
        contiguous; a first dimension of 1 serves every group). Rows are (g, b) as in
        :meth:`_native_state`. ``bias`` [≥K] float64 is added to the candidates' logits (in the
        accumulator's units). Native only: the logits differ from the expanded form's by a
        per-row constant, so one accumulator takes one form throughout."""
        if self.native is None:
            raise ValueError("update_direct needs the native kernel")
        groups = csr[0].numel() - 1 if csr is not None else 1
        batch = queries.shape[1]
        first = self._native_state(groups, batch, values.shape[1])
        self.native.direct_update((self.max, self.norm, self.acc), first, groups, batch, candidates.shape[1],
                                  queries, candidates, values, a, scale, self._to_base2(),
                                  WEIGHT_FLOOR_LOG * LOG2_E, csr, bias)

    def _native_weights_update(self, logits: torch.Tensor, values: torch.Tensor) -> None:
        """:meth:`update` for more values than the fused sums take: the C kernel turns the
        logits [B, K] into weights (and keeps the maximum and normaliser), the weighted sums are
        GEMMs over blocks of ``SUM_BLOCK`` candidates added in float64, as on the torch path."""
        first = self._native_state(1, logits.shape[0], values.shape[1])
        rescale = self.native.weights_update((self.max, self.norm), first, logits, logits.shape[1],
                                             self._to_base2(), WEIGHT_FLOOR_LOG * LOG2_E)
        vals = values.to(logits.dtype)
        chunk = blocked_sum(lambda s, e: logits[:, s:e] @ vals[s:e], logits.shape[1])  # [B, V] float64
        if first:
            self.acc.copy_(chunk)
        else:
            self.acc.mul_(rescale.unsqueeze(1)).add_(chunk)

    def _native_takes(self, logits: torch.Tensor) -> bool:
        return self.native is not None and logits.dtype == torch.float32 and logits.device.type == "cpu"

    def _native_update(self, batch: int, groups: int, count: int, values: torch.Tensor, **source) -> None:
        """One chunk of given logits or int8 digit sums through the C kernel."""
        first = self._native_state(groups, batch, values.shape[1])
        self.native.update((self.max, self.norm, self.acc), first, groups, batch, count, values,
                           self._to_base2(), WEIGHT_FLOOR_LOG * LOG2_E, **source)

    def _native_state(self, groups: int, batch: int, values: int) -> bool:
        """Allocate the state before a first native update (True then): the torch path's shapes,
        whose elements are the C kernel's rows r = g·batch + b: pixel-major (one value per row)
        max, norm and acc [groups, batch]; otherwise max and norm [groups·batch], acc
        [groups·batch, values]."""
        if self.max is not None:
            return False
        rows = (groups, batch) if self.pixel_major else (groups * batch,)
        self.max = torch.empty(rows, dtype=torch.float64)
        self.norm = torch.empty(rows, dtype=torch.float64)
        self.acc = torch.empty(rows if self.pixel_major else (*rows, values), dtype=torch.float64)
        return True

    def _to_base2(self) -> float:
        """The factor from the logits' units to base 2 (the C kernel's exp2)."""
        return 1.0 if self.base2 else LOG2_E

    def _floor(self) -> float:
        return WEIGHT_FLOOR_LOG * LOG2_E if self.base2 else WEIGHT_FLOOR_LOG

    def _exp(self, shifted: torch.Tensor) -> torch.Tensor:
        return shifted.exp2_() if self.base2 else shifted.exp_()

    def _pairs(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[values, ones] stacked [n, K, 2] in a buffer kept across updates of one shape: a fresh
        multi-MB tensor per chunk costs the CPU a page-faulted allocation every time."""
        shape = (*values.shape, 2)
        if self._both is None or self._both.shape != shape or self._both.dtype != dtype:
            self._both = torch.empty(shape, dtype=dtype, device=values.device)
            self._both[..., 1] = 1.0
        self._both[..., 0] = values
        return self._both

    def _merge(self, new_max: torch.Tensor, chunk_norm: torch.Tensor, chunk_acc: torch.Tensor) -> None:
        """Fold one chunk's normaliser and weighted sum (both relative to ``new_max``) into the
        running ones, rescaling those from the previous maximum."""
        if self.max is None:
            self.norm, self.acc = chunk_norm, chunk_acc
        else:
            rescale = torch.exp2(self.max - new_max) if self.base2 else torch.exp(self.max - new_max)
            self.norm = self.norm * rescale + chunk_norm
            rescale = rescale.reshape(rescale.shape + (1,) * (chunk_acc.dim() - rescale.dim()))
            self.acc = self.acc * rescale + chunk_acc
        self.max = new_max

    def result(self) -> torch.Tensor:
        if self.acc is None:
            raise RuntimeError("no chunk was accumulated")
        if self.pixel_major:
            return (self.acc / self.norm).T
        return self.acc / self.norm.unsqueeze(1)


def blocked_sum(product: Callable[[int, int], torch.Tensor], count: int) -> torch.Tensor:
    """Σ over blocks [s, e) of ≤ ``SUM_BLOCK`` images of ``product(s, e)`` (a GEMM summing over
    those images in the weights' dtype), added in float64."""
    total = product(0, min(SUM_BLOCK, count)).double()
    for start in range(SUM_BLOCK, count, SUM_BLOCK):
        total += product(start, min(start + SUM_BLOCK, count))
    return total


def softmax_average(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], native: NativeSoftmax | None = None
                    ) -> torch.Tensor:
    """The exact softmax average over a stream of image chunks, each (logits [n, B, K],
    values [n, K]) (pixel-major, :meth:`OnlineSoftmaxAverage.update_pixel_major`; the logits are
    overwritten). Returns [B, n] float64. The stream may reuse one logits buffer: a chunk is
    folded in before the next is asked for. ``native``: as for :class:`OnlineSoftmaxAverage`."""
    acc = OnlineSoftmaxAverage(native=native)
    for logits, values in chunks:
        acc.update_pixel_major(logits, values)
    return acc.result()


def softmax_average_in_groups(x: torch.Tensor, group: int,
                              chunks_of: Callable[[torch.Tensor], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                              native: NativeSoftmax | None = None) -> torch.Tensor:
    """:func:`softmax_average` for samples x [B, ...] in groups of at most ``group`` (what the
    memory budget allows of a kernel's per-sample weights): ``chunks_of(xs)`` streams the
    chunks of one group xs. Returns [B, n] float64, the groups in order."""
    if group < 1:
        raise ValueError(f"group must be at least 1, got {group}")
    return torch.cat([softmax_average(chunks_of(x[b0 : b0 + group]), native) for b0 in range(0, x.shape[0], group)])
