"""Exact softmax-weighted averages over a dataset streamed in chunks (online log-sum-exp).

SPEC defect 1: the reference normalised each chunk on its own and averaged the chunks, so its
output depended on the chunk size. Here a running maximum, a running normaliser and a running
weighted sum are rescaled whenever the maximum grows, so the result equals the one-chunk
softmax up to rounding, whatever the chunking.
"""

from __future__ import annotations

import torch


class OnlineSoftmaxAverage:
    """Accumulates Σ_k softmax_k(logit) · value_k over chunks of k.

    Two layouts: per-image logits [B, K] with values [K, n] (one weight per image, as in the
    optimal denoiser), or per-value logits [B, K, n] with values [K, n] (one weight per image
    and output value, as in pca_locality). ``result()`` is [B, n].
    """

    def __init__(self) -> None:
        self.max: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, values: torch.Tensor) -> None:
        per_value = logits.dim() == 3
        chunk_max = logits.amax(dim=1)  # [B] or [B, n]
        if self.max is None:
            new_max = chunk_max
        else:
            new_max = torch.maximum(self.max, chunk_max)
        shift = new_max.unsqueeze(1)
        weights = torch.exp(logits - shift)  # ≤ 1, no overflow
        if per_value:
            chunk_norm = weights.sum(dim=1)  # [B, n]
            chunk_acc = torch.einsum("bkn,kn->bn", weights, values)
        else:
            chunk_norm = weights.sum(dim=1)  # [B]
            chunk_acc = weights @ values  # [B, n]
        if self.max is None:
            self.norm, self.acc = chunk_norm, chunk_acc
        else:
            rescale = torch.exp(self.max - new_max)
            self.norm = self.norm * rescale + chunk_norm
            if not per_value:
                rescale = rescale.unsqueeze(1)
            self.acc = self.acc * rescale + chunk_acc
        self.max = new_max

    def result(self) -> torch.Tensor:
        if self.acc is None:
            raise RuntimeError("no chunk was accumulated")
        norm = self.norm if self.norm.dim() == 2 else self.norm.unsqueeze(1)
        return self.acc / norm
