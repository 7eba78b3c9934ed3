"""Exact softmax-weighted averages over a dataset streamed in chunks (online log-sum-exp).

SPEC defect 1: the reference normalised each chunk on its own and averaged the chunks, so its
output depended on the chunk size. Here a running maximum, a running normaliser and a running
weighted sum are rescaled whenever the maximum grows, so the result equals the one-chunk
softmax up to rounding, whatever the chunking. The running normaliser and sum are kept in
float64 whatever the compute dtype (they are [B, n]: free), so a float32 chunk only adds its
own rounding.
"""

from __future__ import annotations

import torch

WEIGHT_FLOOR_LOG = 60.0  # log of the smallest relative softmax weight kept apart from it


class OnlineSoftmaxAverage:
    """Accumulates Σ_k softmax_k(logit) · value_k over chunks of k.

    Two layouts: per-image logits [B, K] with values [K, n] (one weight per image, as in the
    optimal denoiser), or per-value logits [B, K, n] with values [K, n] (one weight per image
    and output value, as in pca_locality). ``result()`` is [B, n] float64.

    ``update(..., inplace=True)`` overwrites the logits with the weights (saves two passes and
    a buffer the size of the chunk: the per-value layout is memory-bound).
    """

    def __init__(self) -> None:
        self.max: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, values: torch.Tensor, inplace: bool = False) -> None:
        per_value = logits.dim() == 3
        chunk_max = logits.amax(dim=1).double()  # [B] or [B, n]
        new_max = chunk_max if self.max is None else torch.maximum(self.max, chunk_max)
        shift = new_max.to(logits.dtype).unsqueeze(1)
        weights = logits.sub_(shift) if inplace else logits - shift
        weights = weights.clamp_(min=-WEIGHT_FLOOR_LOG).exp_()  # ≤ 1: no overflow; no subnormals
        if per_value:
            chunk_norm = weights.sum(dim=1, dtype=torch.float64)  # [B, n]
            chunk_acc = weights.mul_(values.to(weights.dtype)).sum(dim=1, dtype=torch.float64)
        else:
            chunk_norm = weights.sum(dim=1, dtype=torch.float64)  # [B]
            chunk_acc = (weights @ values.to(weights.dtype)).double()  # [B, n]
        if self.max is None:
            self.norm, self.acc = chunk_norm, chunk_acc
        else:
            rescale = torch.exp(self.max - new_max)
            self.norm = self.norm * rescale + chunk_norm
            if not per_value:
                rescale = rescale.unsqueeze(1)
            self.acc = self.acc * rescale + chunk_acc
        self.max = new_max

    def update_pixel_major(self, logits: torch.Tensor, values: torch.Tensor) -> None:
        """Per-value layout with the images last: logits [n, B, K] (overwritten with the
        weights), values [n, K]. The reductions over k then run along contiguous memory, and
        the weighted sum and the normaliser come out of one batched product
        [n, B, K] @ [n, K, 2] (values and ones). Accumulators are [n, B]; ``result()`` is [B, n]."""
        chunk_max = logits.amax(dim=2).double()  # [n, B]
        new_max = chunk_max if self.max is None else torch.maximum(self.max, chunk_max)
        # Weights below e^-60 (1e-26 of the largest) are raised to it: subnormal floats, which
        # the peaked low-noise softmaxes produce in masses, run ~100x slower on x86, and the
        # change to x̂0 is below N·1e-26.
        logits.sub_(new_max.to(logits.dtype).unsqueeze(2)).clamp_(min=-WEIGHT_FLOOR_LOG).exp_()
        both = torch.stack((values.to(logits.dtype), torch.ones_like(values, dtype=logits.dtype)), dim=2)
        sums = torch.bmm(logits, both).double()  # [n, B, 2]
        chunk_acc, chunk_norm = sums[..., 0], sums[..., 1]
        if self.max is None:
            self.norm, self.acc = chunk_norm, chunk_acc
        else:
            rescale = torch.exp(self.max - new_max)
            self.norm = self.norm * rescale + chunk_norm
            self.acc = self.acc * rescale + chunk_acc
        self.max = new_max
        self.pixel_major = True

    def result(self) -> torch.Tensor:
        if getattr(self, "pixel_major", False):
            return (self.acc / self.norm).T

        if self.acc is None:
            raise RuntimeError("no chunk was accumulated")
        norm = self.norm if self.norm.dim() == 2 else self.norm.unsqueeze(1)
        return self.acc / norm
