"""Every threshold of pca_locality's kernels, the probes of what a machine can do exactly, and
the measured choice of a step's kernel.

What a step may use is decided by exactness (a rounding estimate within ``LOGIT_TOLERANCE``, a
binary mask, 8-bit images, integer sums that a probe finds exact) and by what the device
supports; which of those runs is decided by timing them on the real shapes
(:class:`locality.models.autotune.KernelTuner`), never by CPU flags or GPU names. A step is of
one of three kinds, each with its candidates:

* ``dense32``: the logits at float32 accuracy: ``float32``, ``bf16x6``, ``bf16x3``,
  ``int8_onednn``, ``int8_intmm`` and ``int8_gather`` (combined in float32), those whose
  estimate allows it;
* ``dense64`` where none of those is accurate enough (low noise): ``float64`` and the int8
  kernels with 4-5 digits combined in float64 where their estimate allows it;
* ``sparse|…``: a mask whose every column has at most n/16 ones adds the direct-difference
  ``sparse`` kernel to the dense candidates of the step.

``model.dtype=float64`` (the exactness oracle) allows only ``float64`` and ``sparse``;
``model.dense_kernel=NAME`` replaces the dense32/int8 candidates by NAME (``int8``: the three
int8 kernels), falling back to float64 where NAME cannot reach the tolerance.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from locality.models.softmax import LOGIT_TOLERANCE  # noqa: F401  (the tolerance every kernel's estimate meets)

if TYPE_CHECKING:
    from locality.models.autotune import Decision, KernelTuner, Prepare
    from locality.models.pca_locality.kernel import Kernel, Precision, Step

log = logging.getLogger(__name__)
SPARSE_MAX_FRACTION = 1 / 16  # a mask is sparse-eligible when its longest column has ≤ n/16 ones
# rounding of a kernel's logits relative to the float32 GEMM, for the error estimate: on the H100
# the probe of scripts/gpu_check.py put bf16x6 logits 5.2x further from float64 than the float32
# kernel's (2.1e-3 vs 4.1e-4 on logits up to 383: tensor cores sum 6n terms); 8 keeps the margin.
# bf16x3 (exact products, 3n terms, the same float32 accumulation) reuses it: on the H100 its
# Fashion-MNIST steps stayed within 2.9e-5 of float64
KERNEL_ROUNDING_FACTOR = {"float32": 1.0, "float64": 1.0, "bf16x6": 8.0, "bf16x3": 8.0}
ONEDNN_MAX_VALUES = 1024  # n·128·128 < 2^24: oneDNN's float32 output of an int32 sum is exact
MAX_DIGITS = 5  # int8: fixed-point digits of the samples (5 reach float64 accuracy)
# CPU: logits per chunk for the int8 kernels (they write the logits once per digit, so they must
# stay cached: 8 MiB chunks ran 1.5x faster than 24 MiB on the Xeon of the README)
INT8_CPU_CHUNK_CAP_BYTES = 8 << 20
# CPU, int8_gather: images per chunk (their quadratic sums and values [n] in float32, full sums,
# dense operands) and per group of output values (their int32 sums and logits) kept in cache
GATHER_CPU_CHUNK_CAP_BYTES = 48 << 20
# torch._int_mm's row-major operand copies (three more int8 copies of the images, 141 MB on
# Fashion-MNIST) are kept only when they run this much faster than the column-major views: on
# the EPYC of the README the two ran alike, and a 10 % margin still let this VM's drift pick
# the copies in one run of three (1.92 GB against 1.68 for the quick start)
LAYOUT_COPY_MARGIN = 0.25
GATHER_GROUP_CAP_BYTES = 16 << 20
GATHER_OPERAND_CAP_BYTES = 512 << 10  # one output value's gathered codes [|C_m|, K]: in L2 on average

DENSE32_KERNELS = ("float32", "bf16x6", "bf16x3", "int8_onednn", "int8_intmm", "int8_gather")
INT8_KERNELS = ("int8_onednn", "int8_intmm", "int8_gather")
FORCED = {"float32": ("float32",), "bf16x6": ("bf16x6",), "bf16x3": ("bf16x3",), "int8": INT8_KERNELS,
          **{name: (name,) for name in INT8_KERNELS}}
DENSE_KERNELS = ("auto", *FORCED)  # model.dense_kernel's choices
MASK_DEPENDENT = ("int8_gather", "sparse")  # kernels whose work per image depends on the mask
# a kernel measured this many times slower per image than another candidate, at the same shapes
# on this machine, is not timed again at later kinds of step (int8_onednn without oneDNN's fast
# int8 path: ~1000x); differences between kinds of step (digits, masks) are within 10x
SKIP_FACTOR = 50
# int8_gather's win or loss at one gathered class decides the classes beyond it only when it was
# by this factor: on the EPYC of the README a probe's ratio of int8_gather to int8_intmm at one
# class varied from 0.53 to 1.0 between runs (the steps' own ratio: 0.66-0.81), and a tie taken
# as a loss once gave every class to int8_intmm (1.6x slower in total)
INFER_MARGIN = 1.5


def step_candidates(kernels: dict[str, Kernel], step: Step, dense_kernel: str,
                    float64_only: bool) -> tuple[str, dict[str, Precision]]:
    """(kind, {kernel name: precision}) of the kernels that may run ``step`` (module docstring).
    An explicit ``dense_kernel`` that cannot run at all raises ValueError with its reasons."""
    forced = dense_kernel != "auto"
    names = () if float64_only else (FORCED[dense_kernel] if forced else DENSE32_KERNELS)
    usable, reasons = [], []
    for name in names:
        why = kernels[name].unavailable(step.plan, forced)
        if why is None:
            usable.append(name)
        else:
            reasons.append(f"{name}: {why}")
    if forced and not usable and not float64_only:
        raise ValueError(f"model.dense_kernel={dense_kernel} cannot run here ({'; '.join(reasons)}); "
                         "use model.dense_kernel=auto")
    chosen = _within(kernels, usable, step, (torch.float32,))
    kind = "dense32"
    if not chosen:
        kind = "dense64"
        chosen = _within(kernels, [*usable, "float64"], step, (torch.float64,))
    if kernels["sparse"].unavailable(step.plan, forced) is None:
        kind = f"sparse|{kind}"
        chosen["sparse"] = kernels["sparse"].precision(step, (torch.float64,))
    return kind, chosen


def _within(kernels: dict[str, Kernel], names: list[str], step: Step,
            dtypes: tuple[torch.dtype, ...]) -> dict[str, Precision]:
    out = {}
    for name in names:
        precision = kernels[name].precision(step, dtypes)
        if precision is not None:
            out[name] = precision
    return out


def decision_key(kind: str, names: list[str], step: Step, num_images: int, chunk_size: int | None,
                 gathered: bool = True) -> str:
    """What a measured choice is remembered by: the kind of step, its candidates, the shapes
    (:func:`~locality.models.autotune.shape_key`), the sparse mask's density to the nearest
    power of two (the sparse kernel's work is proportional to it), and where ``int8_gather``
    competes, the share of the dense work it does, likewise (8 % at the noisiest Fashion-MNIST
    step, 40 % at t = 300: it wins the first and loses the second to ``int8_intmm``), last
    (``gathered=False`` leaves it out: what keys of every class begin with)."""
    from locality.models.autotune import shape_key

    batch, n = step.x64.shape
    key = f"pca_locality|{kind}|{'+'.join(sorted(names))}|{shape_key(n, batch, num_images, chunk_size)}"
    if "sparse" in names:
        key += f"|density~2^{round(math.log2(max(step.plan.density, 1e-12)))}"
    if gathered and "int8_gather" in names and len(names) > 1:
        key += f"|gathered~2^{round(math.log2(max(step.plan.gathered_fraction, 1e-12)))}"
    return key


def kernel_probes(kernels: dict[str, Kernel], chosen: dict[str, Precision], step: Step,
                  chunk_size: int | None) -> dict[str, Prepare]:
    """The tuner's ``prepare(images, samples) -> run`` of each kernel in ``chosen``: its image
    side for the first images (untimed) and the step on the first samples, at the precision it
    would run the step in."""

    def probe(name: str) -> Prepare:
        kernel, precision = kernels[name], chosen[name]

        def prepare(count: int, samples: int):
            sub = replace(step, x64=step.x64[:samples])
            side = kernel.prepare(count, sub, chunk_size)
            return lambda: kernel.run(side, sub, precision, chunk_size)

        return prepare

    return {name: probe(name) for name in chosen}


def choose_kernel(tuner: KernelTuner, kernels: dict[str, Kernel], kind: str, chosen: dict[str, Precision],
                  step: Step, chunk_size: int | None) -> Decision:
    """The measured fastest of ``chosen`` for ``step`` (:func:`kernel_probes`), timing only
    what earlier decisions of this machine and these shapes left open:

    * a step of a new ``gathered`` class (:func:`decision_key`) whose kind, candidates and
      shapes were measured at another class probes only the kernels whose work depends on the
      mask (``int8_gather``, ``sparse``) against the fastest of the others there: their cost per
      image does not depend on the mask, and every class would otherwise time them again; the
      kernels timed at those classes are not screened again and aim at their floor of images at
      once (their rates there say how many images take ``MIN_TIMED_S``);
    * a class that measured classes decide (:func:`_inferred_from_other_classes`) is not timed;
    * a kernel measured more than ``SKIP_FACTOR`` times slower per image than another candidate
      of this step, in any decision of these shapes, is not timed again (``int8_onednn`` where
      oneDNN has no fast int8 path: ~0.25 s of screening per decision).

    The int8 kernels' shared image preparation (the squares' digits) is done before the probe:
    whichever int8 kernel wins reads it, so it is not measuring."""
    from locality.models.autotune import shape_key

    num = kernels["float64"].images.count
    key = decision_key(kind, list(chosen), step, num, chunk_size)
    classless = decision_key(kind, list(chosen), step, num, chunk_size, gathered=False)
    probed = dict(chosen)
    rates: dict[str, list[float]] = {}
    if tuner.known(key) is None:
        inferred = _inferred_from_other_classes(tuner, key, classless, chosen)
        if inferred is not None:
            return tuner.remember(key, inferred, inferred.source)
        if key != classless:
            for other in tuner.known_with_prefix(classless + "|gathered~").values():
                for name, ms in other.ms_per_1000_images.items():
                    rates.setdefault(name, []).append(ms)
            fixed = {name: min(ms) for name, ms in rates.items() if name in chosen and name not in MASK_DEPENDENT}
            if fixed:
                best = min(fixed, key=fixed.get)
                probed = {name: p for name, p in chosen.items() if name in MASK_DEPENDENT or name == best}
        shapes = "|" + shape_key(step.x64.shape[1], step.x64.shape[0], num, chunk_size) + "|"
        slow = _measured_far_slower(tuner, shapes, chunk_size is None, probed)
        if slow and len(slow) < len(probed):
            log.info("not timed again for %s: %s", key, "; ".join(slow.values()))
            probed = {name: p for name, p in probed.items() if name not in slow}
        if len(probed) > 1 and any(name.startswith("int8") for name in probed):
            kernels["float64"].images.quad_digits()
    return tuner.choose(key, kernel_probes(kernels, probed, step, chunk_size), num, step.x64.shape[0],
                        {name: kernels[name].probe_floor(step, probed[name], chunk_size) for name in probed},
                        {name: kernels[name].fixed_cost_calls(step, probed[name], chunk_size) for name in probed},
                        {name: min(ms) / 1e6 for name, ms in rates.items()})


def _gathered_class(key: str) -> int:
    return int(key.rsplit("|gathered~2^", 1)[1])


def _inferred_from_other_classes(tuner: KernelTuner, key: str, classless: str,
                                 chosen: dict[str, Precision]) -> Decision | None:
    """The decision of a new ``gathered`` class that measured classes imply, or None.
    ``int8_gather`` multiplies the gathered share of the dense work, the other candidates (not
    mask-dependent) the same work at every class: if it lost at a class of a smaller share, it
    loses here to the same kernel, and if it won at a class of a larger share, it wins here —
    where the measured margin was at least ``INFER_MARGIN`` (a near tie is a coin toss of this
    VM's drift and decides nothing beyond its class). A class between a win and a loss, or
    measured both ways, is measured."""
    from locality.models.autotune import Decision

    if key == classless or any(name in MASK_DEPENDENT and name != "int8_gather" for name in chosen):
        return None
    here = _gathered_class(key)
    wins, losses = [], []
    for other_key, other in tuner.known_with_prefix(classless + "|gathered~").items():
        there, rates = _gathered_class(other_key), other.ms_per_1000_images
        gather, rest = rates.get("int8_gather"), [ms for name, ms in rates.items() if name != "int8_gather"]
        if gather is None or not rest:
            continue  # not measured (inferred itself, or a single candidate)
        if other.kernel == "int8_gather" and there > here and min(rest) >= INFER_MARGIN * gather:
            wins.append(other_key)
        elif (other.kernel != "int8_gather" and other.kernel in chosen and there < here
              and gather >= INFER_MARGIN * rates[other.kernel]):
            losses.append((there, other_key, other.kernel))
    if wins and not losses:
        return Decision("int8_gather", {}, 0, 0.0, f"inferred: int8_gather won at {min(wins)}, a larger share")
    if losses and not wins:
        _, other_key, kernel = max(losses)  # the nearest class below
        return Decision(kernel, {}, 0, 0.0, f"inferred: int8_gather lost to {kernel} at {other_key}, a smaller share")
    return None


def _measured_far_slower(tuner: KernelTuner, shapes: str, unchunked: bool, names) -> dict[str, str]:
    """{name: why} of the kernels among ``names`` that a remembered pca_locality decision of
    these ``shapes`` measured more than SKIP_FACTOR times slower per image than another of
    ``names``."""
    slow: dict[str, str] = {}
    for key, other in tuner.known_with_prefix("pca_locality|").items():
        if shapes not in key + "|" or (unchunked and "|chunk=" in key):
            continue
        rates = {name: ms for name, ms in other.ms_per_1000_images.items() if name in names}
        if len(rates) < 2:
            continue
        fastest = min(rates, key=rates.get)
        for name, ms in rates.items():
            if ms > SKIP_FACTOR * rates[fastest] and name not in slow:
                slow[name] = (f"{name} ({ms:.1f} ms per 1000 images against {rates[fastest]:.1f} for {fastest} "
                              f"at {key})")
    return slow


def int8_sums_exact(backend: str, device: torch.device | str) -> bool:
    """Whether ``backend``'s int8 products sum exactly on this machine: a probe with the
    operands that break CPUs without VNNI (their u8·s8 instructions add pairs of products in
    saturating int16: 255·127·2 > 32 767), rows of all 127, all -128 and alternating signs,
    against the int64 products. Integer tensor cores and VNNI/AMX units pass."""
    from locality.models.pca_locality import int8

    n = 64
    even = torch.arange(n) % 2 == 0
    rows = torch.stack([torch.full((n,), 127), torch.full((n,), -128), torch.where(even, 127, -128),
                        torch.where(even, -128, 127)]).to(torch.int8)
    act, weights = rows.repeat(5, 1), rows.repeat(2, 1)  # 20 rows (int_mm wants > 16), 8 images
    exact = act.long() @ weights.long().T  # |sum| ≤ 64·128² = 2^20: exact in float32 as well
    if backend == "onednn":
        packed = torch.ops.onednn.qlinear_prepack(weights.contiguous(), None)
        got = int8._onednn_mm(act, packed, weights.shape[0], 1.0, None).double()
        return torch.equal(got, exact.double())
    got = int8.int_mm_padded(act.to(device), weights.T.contiguous().to(device)).cpu()
    return torch.equal(got.long(), exact)


def bf16_gemm_is_native(device: torch.device) -> bool:
    """Whether ``device`` has a bfloat16 GEMM with a float32 output (``torch.mm(...,
    out_dtype=float32)``); elsewhere the bfloat16 kernels run emulated in float32 GEMMs of 3-6x
    the work, correct (the tests use that) but never worth a probe under ``auto``."""
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True
