"""The one interface every pca_locality kernel implements, and what a kernel is handed.

A kernel computes one denoising step, x̂0 [B, n] float64 from x_t [B, n], over the training
images, through the exact streamed softmax (:mod:`locality.models.softmax`). It answers four
questions, so that :mod:`.selection` can build the candidates of a step and measure them:

* :meth:`Kernel.unavailable`: why it cannot run this step at all (data format, mask form,
  device support, memory, inexact hardware sums), or None;
* :meth:`Kernel.precision`: its cheapest configuration whose rounding estimate keeps the logits
  within ``LOGIT_TOLERANCE`` when combined in one of the given dtypes, or None;
* :meth:`Kernel.prepare`: the image side it reads (split, quantised, packed …) for the first
  ``count`` images, built once per model for all of them and on subsets for the timing probe;
* :meth:`Kernel.run`: the step itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from locality.models.pca_locality.plan import MaskPlan

if TYPE_CHECKING:
    from locality.models.native import NativeSoftmax


@dataclass(frozen=True)
class Step:
    """One step's inputs: the timestep, its mask plan, the samples x64 [B, n] float64 on the
    device, ᾱ, a = sqrt(ᾱ) and the logit scale s = 1 / (2(1-ᾱ)τ)."""

    t: int
    plan: MaskPlan
    x64: torch.Tensor
    abar: float
    a: float
    scale: float


@dataclass(frozen=True)
class Precision:
    """How a kernel runs a step: the dtype its logits are formed (or combined) in, and for
    int8 the number of fixed-point digits of the samples."""

    dtype: torch.dtype
    digits: int = 0


class TrainingImages:
    """The training images as every kernel of one model reads them: ``values`` [N, n] in the
    model's dtype on its device, their mean ``mean64`` [n] float64, ``y_abs_max`` = max |y - μ|,
    and the 8-bit codes and their squares' digits (:meth:`codes`, :meth:`quad_digits`, each
    computed once)."""

    def __init__(self, values: torch.Tensor, mean: torch.Tensor) -> None:
        self.values = values
        self.device = values.device
        self.mean64 = mean.to(self.device, torch.float64)
        self.y_abs_max = max((float((ys.double() - self.mean64).abs().max()) for ys in values.split(8192)),
                             default=0.0)
        self._codes: torch.Tensor | None = None
        self._codes_checked = False
        self._quad: tuple[torch.Tensor, torch.Tensor] | None = None
        # the fused C softmax where the model measured it faster (locality.models.native), else None
        self.native: NativeSoftmax | None = None

    @property
    def count(self) -> int:
        return self.values.shape[0]

    def codes(self) -> torch.Tensor | None:
        """D = q - 128 [N, n] int8 when the images are 8-bit values (2q - 255)/255, else None."""
        if not self._codes_checked:
            from locality.models.pca_locality.int8 import eight_bit_codes

            self._codes = eight_bit_codes(self.values)
            self._codes_checked = True
        return self._codes

    def quad_digits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, L) int8 [N, n] with D² - 8192 = 128·H + L (:func:`.int8.quad_digits`), computed
        once for every int8 kernel and probe subset."""
        if self._quad is None:
            from locality.models.pca_locality.int8 import quad_digits

            codes = self.codes()
            if codes is None:
                raise ValueError("quad_digits needs 8-bit images")
            self._quad = quad_digits(codes)
        return self._quad


class Kernel(ABC):
    """One way of computing a step; see the module docstring. ``name`` is what
    ``model.dense_kernel`` and the logs call it."""

    name: str

    def __init__(self, images: TrainingImages) -> None:
        self.images = images
        self._full: object | None = None  # the image side of all images, built on first use

    @abstractmethod
    def unavailable(self, plan: MaskPlan, forced: bool) -> str | None:
        """Why this kernel cannot run a step with ``plan`` (None: it can). ``forced``: the user
        asked for it by name, so checks that only keep ``auto`` from wasting a probe on it (an
        emulated GEMM, a memory margin) do not apply."""

    @abstractmethod
    def precision(self, step: Step, dtypes: tuple[torch.dtype, ...]) -> Precision | None:
        """The cheapest configuration combining in one of ``dtypes`` within the tolerance."""

    def prepare(self, count: int, step: Step, chunk_size: int | None) -> object:
        """The image side of the first ``count`` images, ready for :meth:`run` on ``step``'s
        shapes (all images: built once and kept)."""
        if count != self.images.count:
            return self.build(count)
        if self._full is None:
            self._full = self.build(count)
        return self._full

    def build(self, count: int) -> object:
        """A new image side of the first ``count`` images (default: the images themselves)."""
        return self.images.values[:count]

    def probe_floor(self, step: Step, precision: Precision, chunk_size: int | None) -> int:
        """The fewest images at which a timing of this kernel says what it costs per image in
        ``step`` (the measured choice does not judge it on fewer); 0: any count."""
        return 0

    def fixed_cost_calls(self, step: Step, precision: Precision, chunk_size: int | None) -> int:
        """How often the step over all images pays the fixed cost of one probe call (1: once
        per step; a kernel whose fixed cost is per chunk: its number of chunks)."""
        return 1

    @abstractmethod
    def run(self, side: object, step: Step, precision: Precision, chunk_size: int | None) -> torch.Tensor:
        """x̂0 [B, n] float64 of ``step`` over the images of ``side``."""

    def label(self, precision: Precision) -> str:
        """The name of this kernel at ``precision`` in logs and reports."""
        return self.name
