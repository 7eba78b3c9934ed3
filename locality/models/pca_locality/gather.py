"""The gathered int8 kernel of pca_locality, ``int8_gather``: per output value, an integer GEMM
over only the inputs its mask selects, or over the complement, subtracted from the full sum.

The dense int8 kernel (:mod:`.int8`) multiplies the samples' digit rows, masked by each output
value's mask column, with every input value of every image: B·p·n² products per image, most of
them with a 0 of the mask. Here output value m reads only its column set C_m, the smaller of

* the inputs its mask selects (``M[:, m] = 1``: the low-noise steps, local masks), or
* their complement (``M[:, m] = 0``: the high-noise steps, masks that cover most of the image),
  where the masked sum is the full sum Σ_n X D minus the complement's sum,

both exact in int32, so the logits are the same integers the dense kernel forms and its error
estimate (:func:`.int8.int8_error_estimate`) holds unchanged. Per output value and chunk of K
images that is one GEMM [p·B, |C_m|] @ [|C_m|, K] over the rows C_m of the pixel-major codes
(a row gather, cheap), and the work falls from n² to Σ_m |C_m| (on Fashion-MNIST at θ = 0.005:
8-27 % of it at every dense step). The quadratic term Σ_n M (D² - 8192) is the dense kernel's
(two int8 GEMMs per chunk, shared by all samples), the full sums one GEMM of p·B rows.

Whether this beats the dense kernels on a machine is measured like every other choice
(:mod:`.selection`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from locality.models.memory import Workspace, chunk_rows, memory_budget
from locality.models.pca_locality.int8 import (
    Int8Images, Int8Kernel, fastest_accepted, int_mm_chunk, int_mm_padded, int_mm_width, to_digits,
)
from locality.models.pca_locality.kernel import Precision, Step
from locality.models.pca_locality.plan import MaskPlan
from locality.models.pca_locality.selection import (
    GATHER_CPU_CHUNK_CAP_BYTES, GATHER_GROUP_CAP_BYTES, GATHER_OPERAND_CAP_BYTES,
)
from locality.models.softmax import OnlineSoftmaxAverage

if TYPE_CHECKING:
    from locality.models.native import NativeSoftmax

ROW_GATHER, COLUMN_GATHER = "rows", "columns"  # how a column set's operand is formed (see GatheredImages)


class GatheredImages:
    """The image side of ``int8_gather``: the dense int8 operands (:class:`.int8.Int8Images`,
    for the full and quadratic sums) and the codes in the form the per-output GEMMs gather from:

    * ``rows``: pixel-major codes Dᵀ [n + 1, N] (row n is zeros: the index that pads a column
      set to the GEMM's alignment); gathering the rows C_m of a chunk gives the row-major operand
      [|C_m|, K] (CPUs: contiguous copies of K bytes);
    * ``columns``: the image-major codes [N, n + 1]; gathering columns gives [K, |C_m|], whose
      transpose is the column-major operand cuBLAS's integer GEMM wants.

    ``form`` is whichever ran faster here (:func:`fastest_gather_form`). ``cublas_shapes``: pad
    every GEMM as cuBLAS's integer GEMM needs (more than 16 rows, inner sizes multiples of 8):
    on CUDA, and in the CPU tests of that path."""

    def __init__(self, codes: torch.Tensor, layout: str, form: str, cublas_shapes: bool = False,
                 quad: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.dense = Int8Images(codes, "int_mm", layout, quad)
        self.count = codes.shape[0]
        self.form = form
        self.cublas_shapes = cublas_shapes
        self._codes = codes
        self._blocks: dict[int, list[torch.Tensor]] = {}

    def blocks(self, size: int) -> list[torch.Tensor]:
        """Per chunk of ``size`` images, the codes to gather from, contiguous (a gather from a
        strided view takes torch's element-wise path, ~20x slower than row copies): ``rows``
        Dᵀ [n + 1, width], ``columns`` D [width, n + 1], width = the chunk rounded up to 8."""
        if size not in self._blocks:
            self._blocks = {}  # one chunking at a time: free the last before building the next
            out = []
            for start in range(0, self.count, size):
                part = self._codes[start : start + size]
                # a zero input (the padding index n) and zero images: a chunk of k images is
                # read ceil(k/8)·8 wide, like the dense operands (cuBLAS wants multiples of 8)
                block = torch.nn.functional.pad(part, (0, 1, 0, (-len(part)) % 8))
                out.append(block.T.contiguous() if self.form == ROW_GATHER else block)
            self._blocks = {size: out}
        return self._blocks[size]

    def operand(self, block: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The second GEMM operand [|columns|, width] of one chunk's ``block``."""
        if self.form == ROW_GATHER:
            return block.index_select(0, columns)
        return block.index_select(1, columns).T


def fastest_gather_form(codes: torch.Tensor, layout: str, repeats: int = 5) -> str:
    """The gather form (``rows`` or ``columns``) whose gather + GEMM runs faster here, timed on
    a quarter of the inputs of 512 images and 24 digit rows (a form the build refuses is never
    taken)."""
    n = codes.shape[1]
    count = min(512, codes.shape[0]) // 8 * 8 or 8
    columns = torch.arange(0, n, 4, device=codes.device)
    act = torch.ones(24, len(columns), dtype=torch.int8, device=codes.device)
    sides = {form: GatheredImages(codes[:count], layout, form) for form in (ROW_GATHER, COLUMN_GATHER)}
    blocks = {form: side.blocks(count)[0] for form, side in sides.items()}
    return fastest_accepted({form: (lambda side=side, block=blocks[form]: torch._int_mm(act, side.operand(block, columns)))
                             for form, side in sides.items()}, codes.device, repeats)


def column_sets(mask: torch.Tensor, device: torch.device, align: int) -> list[tuple[torch.Tensor, bool]]:
    """Per output value m of M [n_in, n_out] (binary): (C_m, complement), C_m the inputs with
    M[:, m] = 1 or, when fewer, those with M[:, m] = 0 (``complement``), int64 on ``device``,
    padded with the zero row's index n_in to a multiple of ``align``, and a single input to two
    (an operand of one column has strides (1, 1), which torch._int_mm misreads)."""
    n_in = mask.shape[0]
    ones = mask != 0
    out = []
    for m in range(mask.shape[1]):
        selected = ones[:, m]
        complement = int(selected.sum()) > n_in // 2
        columns = torch.nonzero(~selected if complement else selected).squeeze(1)
        pad = (-len(columns)) % align or (1 if len(columns) == 1 else 0)
        if pad:
            columns = torch.cat([columns, torch.full((pad,), n_in, dtype=columns.dtype)])
        out.append((columns.to(device), complement))
    return out


def output_groups(sets: list[tuple[torch.Tensor, bool]], size: int, device: torch.device
                  ) -> list[tuple[torch.Tensor, list[int], bool]]:
    """The output values in groups of at most ``size``, each all direct or all complement (so a
    group's complement sums are corrected by one broadcast subtraction): (indices on the device,
    the same as a list, complement)."""
    out = []
    for complement in (False, True):
        members = [m for m, (_, comp) in enumerate(sets) if comp == complement]
        for g0 in range(0, len(members), size):
            part = members[g0 : g0 + size]
            out.append((torch.tensor(part, device=device), part, complement))
    return out


def cublas_layout(rows: int, cublas_shapes: bool) -> tuple[int, int]:
    """(alignment of the gathered column sets, rows of the digit activations) for ``rows`` =
    digits·B: cuBLAS's int8 GEMM wants operands in multiples of 8 and more than 16 rows."""
    return (8, max(rows, 17)) if cublas_shapes else (1, rows)


def gather_chunk_images(count: int, sets: list, n: int, n_pad: int, act_rows: int, item: int,
                        device: torch.device, chunk_size: int | None) -> int:
    """Images per chunk of :func:`gather_step` over ``count`` images: what the memory budget
    gives its per-image working set (quadratic sums and values [n] in the combination dtype of
    ``item`` bytes and int32, full sums [act_rows] int32, the dense operands [n_pad]), and on a
    CPU at most what keeps one output value's gathered operand [|C_m|, K] int8 within a core's
    L2 on average (its GEMM reads it right after the gather wrote it), but not below 1 024."""
    per_image = (2 * item + 8) * n + 4 * act_rows + 3 * n_pad
    size = chunk_rows(per_image, device, chunk_size, total=count, cpu_cap=GATHER_CPU_CHUNK_CAP_BYTES)
    if device.type == "cpu" and chunk_size is None:
        mean_columns = max(1.0, sum(len(c) for c, _ in sets) / max(len(sets), 1))
        size = max(min(size, int(GATHER_OPERAND_CAP_BYTES / mean_columns)), min(count, 1024))
    return int_mm_chunk(size, chunk_size)


def gather_step(side: GatheredImages, values: torch.Tensor, plan: MaskPlan, x64: torch.Tensor, a: float,
                scale: float, digits: int, dtype: torch.dtype, chunk_size: int | None,
                native: NativeSoftmax | None = None) -> torch.Tensor:
    """One dense step through per-output gathered GEMMs: x64 [B, n] float64, ``values`` the
    images [N, n] (their stored values are averaged); x'' = x - a/255 in ``digits`` int8 digits,
    exact integer sums, combined in ``dtype``, softmax through ``native`` where given
    (:class:`~locality.models.softmax.OnlineSoftmaxAverage`). Returns x̂0 [B, n] float64."""
    batch, n = x64.shape
    device = x64.device
    count = side.count
    rows = digits * batch
    align, act_rows = cublas_layout(rows, side.cublas_shapes)
    sets = plan.gather_columns(align)
    mask_codes = plan.dense_mask(torch.int8)
    n_pad = side.dense.codes.shape[1]
    if n_pad > n:
        mask_codes = torch.nn.functional.pad(mask_codes, (0, n_pad - n))
    cross_scale = scale * 2 * a * 2 / 255  # s·2a·(2/255), times δ
    quad_scale = scale * a * a * 4 / 255**2  # s·a²·(2/255)²
    xd, delta = to_digits(x64 - a / 255.0, digits)  # [p, B, n] int8
    act = torch.zeros(act_rows, n + 1, dtype=torch.int8, device=device)  # rows (j, b); column n: zeros
    act[:rows, :n] = xd.reshape(rows, n)
    full_act = torch.nn.functional.pad(act[:, :n], (0, n_pad - n)) if n_pad > n else act[:, :n].contiguous()
    acts = [act.index_select(1, columns) for columns, _ in sets]  # [act_rows, |C_m|] per output value
    item = torch.tensor([], dtype=dtype).element_size()
    size = gather_chunk_images(count, sets, n, n_pad, act_rows, item, device, chunk_size)
    # outputs per group: their int32 sums [act_rows, K], logits and converted sums [B, K]
    group_bytes = (4 * act_rows + 2 * item * batch) * size
    group = max(1, min(n, memory_budget(device, cpu_cap=GATHER_GROUP_CAP_BYTES) // group_bytes))
    groups = output_groups(sets, group, device)
    accumulators = [OnlineSoftmaxAverage(native=native) for _ in groups]
    coefs = [cross_scale * delta * 256**j for j in range(digits)]
    ws = Workspace(device)
    for (start, stop, codes_op, high_op, low_op), block in zip(side.dense.chunks(size), side.blocks(size)):
        k = stop - start
        width = codes_op.shape[1]  # k rounded up to a multiple of 8 (int_mm operands)
        full = int_mm_padded(full_act, codes_op, ws.take("full", (act_rows, width), torch.int32))[:rows, :k]
        # Σ_n M (D² - 8192) = 128·(Mᵀ H) + Mᵀ L for every output: exact integers, converted once
        quad_int = int_mm_padded(mask_codes, high_op, ws.take("quad_high", (n, width), torch.int32))
        quad_int.mul_(128).add_(int_mm_padded(mask_codes, low_op, ws.take("quad_low", (n, width), torch.int32)))
        quad = ws.take("quad", (n, k), dtype).copy_(quad_int[:, :k]).mul_(-quad_scale)
        vals = ws.take("values", (n, k), dtype).copy_(values[start:stop].T)
        for (index, members, complement), acc in zip(groups, accumulators):
            size_g = len(members)
            sums = ws.take("sums", (size_g, act_rows, width), torch.int32)
            for i, m in enumerate(members):
                columns = sets[m][0]
                if len(columns):  # (act_rows > 16 for cuBLAS: torch._int_mm directly, into the buffer)
                    torch._int_mm(acts[m], side.operand(block, columns), out=sums[i])
                else:
                    sums[i].zero_()
            if complement:  # Σ over the mask = full sum - Σ over the complement, exact in int32
                torch.sub(full, sums[:, :rows, :k], out=sums[:, :rows, :k])
            # [size_g, p, B, width] view of the sums (rows (j, b)); the logits are
            # quad + Σ_j cross·δ·256^j·sums_j, high digits first, as the dense kernel combines them
            digit_sums = sums[:, :rows].view(size_g, digits, batch, width)
            acc.update_pixel_major_sums(quad.index_select(0, index), digit_sums, coefs, vals.index_select(0, index),
                                        k, ws)
    out = torch.empty(batch, n, dtype=torch.float64, device=device)
    for (index, _, _), acc in zip(groups, accumulators):
        out[:, index] = acc.result()
    return out


class Int8GatherKernel(Int8Kernel):
    """``int8_gather``: :func:`gather_step` through ``torch._int_mm``. Eligible where
    ``int8_intmm`` is (8-bit images, binary masks, a probe finding the integer sums exact), at
    the same digits and combination dtype (its integer sums are the dense kernel's)."""

    def __init__(self, images) -> None:
        super().__init__(images, "int_mm")
        self.name = "int8_gather"
        self._form: str | None = None

    def probe_floor(self, step: Step, precision: Precision, chunk_size: int | None) -> int:
        """One GEMM per output value and chunk: 10-35 ms of fixed cost per chunk on
        Fashion-MNIST, so only a probe of ~1000 images and more shows its rate. (A probe on a
        chunk of the step's own size, 1 700-4 200 images, cost 1 s more per first run and did
        not rank it better against int8_intmm on this VM: see the README.)"""
        return min(1024, self.images.count)

    def fixed_cost_calls(self, step: Step, precision: Precision, chunk_size: int | None) -> int:
        """The step's chunks: the fixed cost of a call is its loop over the output values
        (10-35 ms on Fashion-MNIST), paid per chunk."""
        return -(-self.images.count // self.step_chunk(step, precision, chunk_size))

    def step_chunk(self, step: Step, precision: Precision, chunk_size: int | None) -> int:
        """Images per chunk of :func:`gather_step` over all images."""
        batch, n = step.x64.shape
        # as build() and gather_step() make them: cuBLAS's shapes on CUDA, the int_mm codes' width
        align, act_rows = cublas_layout(precision.digits * batch, self.images.device.type == "cuda")
        item = torch.tensor([], dtype=precision.dtype).element_size()
        return gather_chunk_images(self.images.count, step.plan.gather_columns(align), n, int_mm_width(n), act_rows,
                                   item, self.images.device, chunk_size)

    def build(self, count: int) -> GatheredImages:
        codes = self.images.codes()
        layout = self.int_mm_layout()
        if self._form is None:
            self._form = fastest_gather_form(codes, layout)
        high, low = self.images.quad_digits()
        return GatheredImages(codes[:count], layout, self._form, cublas_shapes=codes.device.type == "cuda",
                              quad=(high[:count], low[:count]))

    def run(self, side: GatheredImages, step: Step, precision: Precision, chunk_size: int | None) -> torch.Tensor:
        return gather_step(side, self.images.values[: side.count], step.plan, step.x64, step.a, step.scale,
                           precision.digits, precision.dtype, chunk_size, self.images.native)
