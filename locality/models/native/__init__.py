"""The fused online softmax in C (``online_softmax.c``), compiled on first use by the machine's
own C compiler and loaded with ctypes. Entry points: :meth:`NativeSoftmax.update` folds
given float32 logits, or int8 kernels' digit sums, into an online softmax state;
:meth:`NativeSoftmax.direct_update` forms float64 logits of direct differences itself (the
low-noise steps: pca_locality's sparse step, els' and pspc's float64 steps), so no logits are
ever written to memory; :meth:`NativeSoftmax.weights_update` only turns logits into weights (rows
with more values than the fused sums take: torch's GEMMs sum them); :meth:`NativeSoftmax.pspc_box_step`
is a whole pspc step by box sums (see its C comment).

Why: with the GEMMs of pca_locality's int8 kernels down to their hardware rate, most of a step
was torch's element-wise passes over the [n, B, K] logits: combine the digits' int32 sums
(convert, scale, add, per digit), then max, subtract, clamp, exp and the weighted sums, each a
pass through memory (~4.8 ns a logit on a 2-core EPYC). The C kernel does it per row in two
passes over a cache-resident row (~1.3 ns a logit there), with the same arithmetic: the same
float32 combination of exact integer sums, weights relative to a running maximum, float32 sums
over blocks of ``SUM_BLOCK`` candidates added in float64.

Whether it runs is decided like every kernel choice: it must compile here (a C compiler, ``cc``
or ``$CC``; OpenMP and ``-march=native`` when the compiler takes them), and
:func:`faster_softmax` measures it against the torch path on this machine (the tuner's store
keeps the answer). The library is built once per source, compiler and machine into the kernel
store's directory (``paths.cache_dir``/kernels/native in the apps; a temporary directory per
process without one), written atomically.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("online_softmax.c")
# compiler flag sets tried in order: the machine's vector instructions and OpenMP threads
# first; Apple's clang has no -fopenmp, some compilers no -march=native
FLAG_SETS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())
# -fno-trapping-math lets the compiler vectorise floorf and the clamps (8x faster here); the
# arithmetic stays IEEE (no -ffast-math: no reassociation outside the omp simd reductions)
BASE_FLAGS = ("-O3", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC", "-std=c11")
MAX_DIGITS = 5

_libraries: dict[str, "NativeSoftmax | str"] = {}  # build directory -> library, or why none


class NativeSoftmax:
    """The loaded library: :meth:`update` folds one chunk into an online softmax state."""

    def __init__(self, path: Path, flags: tuple[str, ...]) -> None:
        self.path = path
        self.flags = flags
        self._lib = ctypes.CDLL(str(path))
        fn = self._lib.online_softmax_update
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [i64, i64, i64, ptr, i64, i64, i64, ctypes.c_int, ptr, ptr, i64, ptr, i64,
                       ptr, i64, i64, i64, ptr, ptr, ptr, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._fn = fn
        direct = self._lib.direct_softmax_update
        f64, f32 = ctypes.c_double, ctypes.c_float
        direct.argtypes = [i64, i64, i64, ptr, i64, i64, ptr, i64, ptr, ptr, i64, f64, f64, ptr, ptr, i64, i64, i64,
                           ptr, ptr, ptr, f32, f32, ctypes.c_int, ctypes.c_int]
        direct.restype = ctypes.c_int
        self._direct = direct
        weights = self._lib.softmax_weights_update
        weights.argtypes = [i64, i64, ptr, i64, ptr, ptr, ptr, f32, f32, ctypes.c_int, ctypes.c_int]
        weights.restype = ctypes.c_int
        self._weights = weights
        box = self._lib.pspc_box_step
        box.argtypes = [i64, i64, i64, i64, i64, ptr, ptr, i64, i64, f64, f64, ptr, f32, ctypes.c_int]
        box.restype = ctypes.c_int
        self._box = box
        self.max_values = int(self._lib.online_softmax_max_values())

    def update(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], first: bool, groups: int, batch: int,
               count: int, values: torch.Tensor, to_base2: float, floor_log2: float, *,
               logits: torch.Tensor | None = None, sums: torch.Tensor | None = None,
               coefs: list[float] | None = None, quad: torch.Tensor | None = None) -> None:
        """Fold a chunk of ``count`` candidates into ``state`` = (max [R], norm [R], acc [R, V])
        float64 contiguous, R = groups·batch rows (row g·batch + b), in place.

        Logits either given, ``logits`` float32 [R, ≥count] (rows at any stride, candidates
        contiguous), or formed from int8 digit sums: ``quad`` float32 [groups, ≥count] plus
        Σ_j coefs[j]·``sums``[g, j, b, k] (int32 [groups, digits, batch, ≥count], candidates
        contiguous; any strides over g, j, b). ``values`` float32 [groups or 1, V, ≥count]
        (candidates contiguous; a first dimension of 1 serves every group). Weights are
        2^((l - max)·to_base2), at least 2^-floor_log2."""
        mx, norm, acc = state
        rows, v = groups * batch, values.shape[1]
        self._check_state(state, rows, v, "native softmax")
        _check_rows(values, torch.float32, count, "values")
        if values.shape[0] not in (1, groups):
            raise ValueError(f"native softmax: values has {values.shape[0]} groups, expected 1 or {groups}")
        value_group_stride = 0 if values.shape[0] == 1 else values.stride(0)
        null = None
        if logits is not None:
            _check_rows(logits, torch.float32, count, "logits")
            if logits.shape[0] != rows:
                raise ValueError(f"native softmax: logits has {logits.shape[0]} rows, expected {rows}")
            digits, coef = 0, null
            sums_args = (null, 0, 0, 0)
            quad_args = (null, 0)
            logit_args = (logits.data_ptr(), logits.stride(0))
        else:
            if sums is None or quad is None or coefs is None:
                raise ValueError("native softmax: give logits, or sums, coefs and quad")
            digits = sums.shape[1]
            if not 1 <= digits <= MAX_DIGITS or len(coefs) != digits or sums.shape[0] != groups \
                    or sums.shape[2] != batch:
                raise ValueError(f"native softmax: sums of shape {tuple(sums.shape)} with {len(coefs)} coefficients "
                                 f"do not fit {groups} groups of {batch} rows (1-{MAX_DIGITS} digits)")
            _check_rows(sums, torch.int32, count, "sums")
            _check_rows(quad, torch.float32, count, "quad")
            coef = (ctypes.c_float * digits)(*coefs)
            sums_args = (sums.data_ptr(), sums.stride(0), sums.stride(1), sums.stride(2))
            quad_args = (quad.data_ptr(), quad.stride(0))
            logit_args = (null, 0)
        status = self._fn(groups, batch, count, *sums_args, digits, coef, *quad_args, *logit_args,
                          values.data_ptr(), value_group_stride, values.stride(1), v,
                          mx.data_ptr(), norm.data_ptr(), acc.data_ptr(), to_base2, floor_log2, int(first),
                          torch.get_num_threads())
        _raise_on(status, "native softmax")


    def weights_update(self, max_norm: tuple[torch.Tensor, torch.Tensor], first: bool, logits: torch.Tensor,
                       count: int, to_base2: float, floor_log2: float) -> torch.Tensor:
        """The weights of one chunk, for rows with more values than the fused sums take:
        ``logits`` float32 [R, ≥count] (rows at any stride, candidates contiguous) become the
        weights 2^((l - max)·to_base2) (at least 2^-floor_log2) relative to the new running max;
        ``max_norm`` = (max [R], norm [R]) float64 contiguous are updated in place. Returns
        rescale [R] float64: the factor for the caller's running weighted sums before it adds
        the chunk's (0 on the first chunk)."""
        mx, norm = max_norm
        rows = logits.shape[0]
        for name, t in (("max", mx), ("norm", norm)):
            if t.dtype != torch.float64 or not t.is_contiguous() or t.device.type != "cpu" or t.numel() != rows:
                raise ValueError(f"native softmax weights: the {name} state must be contiguous float64 [{rows}] "
                                 "on the CPU")
        _check_rows(logits, torch.float32, count, "logits")
        rescale = torch.empty(rows, dtype=torch.float64)
        status = self._weights(rows, count, logits.data_ptr(), logits.stride(0), mx.data_ptr(), norm.data_ptr(),
                               rescale.data_ptr(), to_base2, floor_log2, int(first), torch.get_num_threads())
        _raise_on(status, "native softmax weights")
        return rescale

    def pspc_box_step(self, x: torch.Tensor, images: torch.Tensor, patch: tuple[int, int], a: float, scale: float,
                      floor_log2: float) -> torch.Tensor:
        """pspc's x̂0 [B, C, H, W] float64 by box sums (the C kernel's comment): ``x`` float64
        [B, C, H, W], ``images`` float32 [N, C, H, W] (both contiguous on the CPU), windows of
        ``patch`` = (ph, pw) ≤ (H, W), logits -scale·‖x[R] - a·y[R]‖² in natural units."""
        if x.dtype != torch.float64 or images.dtype != torch.float32 or x.device.type != "cpu" \
                or images.device.type != "cpu" or x.dim() != 4 or images.dim() != 4 \
                or x.shape[1:] != images.shape[1:] or not x.is_contiguous() or not images.is_contiguous():
            raise ValueError(f"native pspc step: x must be float64 [B, C, H, W] and images float32 [N, C, H, W], "
                             f"contiguous on the CPU, got {x.dtype} {tuple(x.shape)} and {images.dtype} "
                             f"{tuple(images.shape)}")
        batch, channels, h, w = x.shape
        ph, pw = patch
        if not (1 <= ph <= h and 1 <= pw <= w) or images.shape[0] < 1:
            raise ValueError(f"native pspc step: a {ph}x{pw} window does not fit {h}x{w} images, or no images")
        out = torch.empty(x.shape, dtype=torch.float64)
        status = self._box(batch, channels, h, w, images.shape[0], x.data_ptr(), images.data_ptr(), ph, pw, a,
                           scale / math.log(2), out.data_ptr(), floor_log2, torch.get_num_threads())
        _raise_on(status, "native pspc step")
        return out

    def direct_update(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], first: bool, groups: int,
                      batch: int, count: int, queries: torch.Tensor, candidates: torch.Tensor, values: torch.Tensor,
                      a: float, scale: float, to_base2: float, floor_log2: float,
                      csr: tuple[torch.Tensor, torch.Tensor] | None = None, bias: torch.Tensor | None = None) -> None:
        """Fold one chunk of ``count`` candidates into ``state`` = (max [R], norm [R], acc [R, V])
        float64 contiguous, R = groups·batch, with logits of direct differences in float64:
        -scale·Σ_i (queries[g, b, i] - a·candidates[i, k])² over every i, or with ``csr`` =
        (indptr [groups + 1], indices) int64 over the inputs of row g. ``queries`` float64
        [groups or 1, batch, n] (last dimension contiguous), ``candidates`` float64 [n, ≥count]
        (candidates contiguous), ``values`` float64 [groups or 1, V, ≥count]; ``bias`` float64
        [≥count] (contiguous) is added to the candidates' logits. Weights are
        2^((l - max)·to_base2), at least 2^-floor_log2."""
        mx, norm, acc = state
        rows, v = groups * batch, values.shape[1]
        self._check_state(state, rows, v, "native direct softmax")
        n = candidates.shape[0]
        if queries.dtype != torch.float64 or queries.dim() != 3 or queries.shape[1:] != (batch, n) \
                or queries.shape[0] not in (1, groups) or (queries.stride(2) != 1 and n > 1):
            raise ValueError(f"native direct softmax: queries must be float64 [1 or {groups}, {batch}, {n}] with the "
                             f"last dimension contiguous, got {queries.dtype} {tuple(queries.shape)}")
        _check_rows(candidates, torch.float64, count, "candidates")
        _check_rows(values, torch.float64, count, "values")
        if values.shape[0] not in (1, groups):
            raise ValueError(f"native direct softmax: values has {values.shape[0]} groups, expected 1 or {groups}")
        if bias is not None:
            if bias.dim() != 1:
                raise ValueError(f"native direct softmax: bias must be float64 [≥{count}], got {tuple(bias.shape)}")
            _check_rows(bias, torch.float64, count, "bias")
        indptr = indices = None
        if csr is not None:
            indptr, indices = csr
            for name, t in (("indptr", indptr), ("indices", indices)):
                if t.dtype != torch.int64 or not t.is_contiguous() or t.device.type != "cpu":
                    raise ValueError(f"native direct softmax: {name} must be contiguous int64 on the CPU")
            if indptr.numel() != groups + 1 or (indices.numel() and int(indices.max()) >= n):
                raise ValueError("native direct softmax: the CSR does not fit the groups and inputs")
        status = self._direct(groups, batch, count, queries.data_ptr(),
                              queries.stride(0) if queries.shape[0] > 1 else 0, queries.stride(1),
                              candidates.data_ptr(), candidates.stride(0),
                              indptr.data_ptr() if indptr is not None else None,
                              indices.data_ptr() if indices is not None else None, n, a, scale,
                              bias.data_ptr() if bias is not None else None, values.data_ptr(),
                              values.stride(0) if values.shape[0] > 1 else 0, values.stride(1), v,
                              mx.data_ptr(), norm.data_ptr(), acc.data_ptr(), to_base2, floor_log2, int(first),
                              torch.get_num_threads())
        _raise_on(status, "native direct softmax")

    def _check_state(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows: int, v: int,
                     what: str) -> None:
        """ValueError unless (max, norm, acc) are contiguous float64 CPU tensors of rows, rows
        and rows·v values, v within the kernel's maximum."""
        for name, t in zip(("max", "norm", "acc"), state):
            if t.dtype != torch.float64 or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"{what}: the {name} state must be contiguous float64 on the CPU")
        sizes = tuple(t.numel() for t in state)
        if sizes != (rows, rows, rows * v) or not 1 <= v <= self.max_values:
            raise ValueError(f"{what}: state sizes {', '.join(map(str, sizes))} do not fit {rows} rows of {v} "
                             f"values (at most {self.max_values})")


def _raise_on(status: int, what: str) -> None:
    if status == -1:
        raise MemoryError(f"{what}: no memory for a row buffer")
    if status != 0:
        raise ValueError(f"{what}: arguments refused (status {status})")


def _check_rows(t: torch.Tensor, dtype: torch.dtype, count: int, name: str) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or (t.stride(-1) != 1 and t.shape[-1] > 1) or t.shape[-1] < count:
        raise ValueError(f"native softmax: {name} must be {dtype} on the CPU with at least {count} contiguous "
                         f"candidates in its last dimension, got {t.dtype} {tuple(t.shape)} strides {t.stride()} "
                         f"on {t.device}")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _library_name(compiler: str) -> str:
    """The library's file name: a digest of the source, the compiler and the machine (a build
    with -march=native must not run on another processor of a shared cache)."""
    from locality.models.autotune import machine_description

    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    machine = machine_description(torch.device("cpu"))
    parts = [SOURCE.read_bytes(), compiler.encode(), version.encode(), repr((BASE_FLAGS, FLAG_SETS)).encode(),
             machine["cpu"].encode(), machine["cpu_flags_sha"].encode(), platform.machine().encode()]
    return "online_softmax-" + hashlib.sha256(b"\0".join(parts)).hexdigest()[:16] + ".so"


def _build(build_dir: Path) -> NativeSoftmax:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang, or $CC): install one (Debian: apt-get "
                           "install gcc) for the fused softmax")
    build_dir.mkdir(parents=True, exist_ok=True)
    target = build_dir / _library_name(compiler)
    flags_file = target.with_suffix(".flags")
    if target.exists() and flags_file.exists():
        try:
            return NativeSoftmax(target, tuple(flags_file.read_text().split()))
        except (OSError, AttributeError) as e:  # a damaged file: built again below
            log.warning("native softmax: %s cannot be loaded (%s): building it again", target, e)
    errors = []
    for flags in FLAG_SETS:
        # written under a temporary name in the same directory, then renamed: a concurrent or
        # interrupted build never leaves a half-written library behind
        fd, tmp = tempfile.mkstemp(dir=build_dir, prefix=".build-", suffix=".so")
        os.close(fd)
        try:
            done = subprocess.run([compiler, *BASE_FLAGS, *flags, "-o", tmp, str(SOURCE), "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                errors.append(f"{' '.join(flags) or 'no extra flags'}: {done.stderr.strip()[-300:]}")
                continue
            flags_tmp = build_dir / f".build-{os.getpid()}.flags"
            flags_tmp.write_text(" ".join(flags))
            os.replace(tmp, target)
            os.replace(flags_tmp, flags_file)
            log.info("native softmax: built %s with %s %s", target, compiler, " ".join(flags))
            return NativeSoftmax(target, flags)
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(flags) or 'no extra flags'}: {type(e).__name__}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{compiler} could not build {SOURCE.name}: " + "; ".join(errors))


def load_native_softmax(build_dir: str | Path | None) -> NativeSoftmax | None:
    """The compiled library (built into ``build_dir`` if not there yet; None: a temporary
    directory of this process), or None when it cannot be built or loaded here (logged once
    with the reason, and the torch path runs)."""
    key = str(build_dir) if build_dir is not None else ""
    if key not in _libraries:
        if build_dir is not None:
            directory = Path(build_dir)
        else:  # removed when the process ends (the loaded library stays mapped until then)
            directory = Path(tempfile.mkdtemp(prefix="locality-native-"))
            atexit.register(shutil.rmtree, directory, True)
        try:
            _libraries[key] = _build(directory)
        except (RuntimeError, OSError) as e:
            _libraries[key] = str(e)
            log.warning("native softmax unavailable (%s): the torch softmax runs", e)
    found = _libraries[key]
    return found if isinstance(found, NativeSoftmax) else None


def native_unavailable_reason(build_dir: str | Path | None) -> str | None:
    """Why :func:`load_native_softmax` returns None for ``build_dir`` (None: it loads)."""
    load_native_softmax(build_dir)
    found = _libraries[str(build_dir) if build_dir is not None else ""]
    return None if isinstance(found, NativeSoftmax) else found


def measured_softmax(tuner, dtype: torch.dtype) -> NativeSoftmax | None:
    """The native softmax for a model of ``dtype`` where it builds here and ``tuner`` (a
    :class:`~locality.models.autotune.KernelTuner` on the CPU) measures it faster than the torch
    path, else None (and for float64 models, the exactness oracles, which stay on torch's
    float64 path). Both are timed on pixel-major float32 logits of 16 output values (the tuner's
    staged probe over a growing number of candidates), once: the tuner and this module remember
    the answer and the library, so a model may ask at every step. The library lives beside the
    tuner's store (``native/``) or, without a store, in a temporary directory of this process."""
    from locality.models.softmax import OnlineSoftmaxAverage

    if tuner.device.type != "cpu" or dtype == torch.float64:
        return None
    build_dir = tuner.store_path.parent / "native" if tuner.store_path is not None else None
    native = load_native_softmax(build_dir)
    if native is None:
        return None
    groups = 16

    def probe(use_native: bool):
        def prepare(count: int, samples: int):
            gen = torch.Generator().manual_seed(0)
            logits = torch.rand(groups, samples, count, generator=gen).mul_(-40.0)
            values = torch.rand(groups, count, generator=gen)
            return lambda: OnlineSoftmaxAverage(native=native if use_native else None).update_pixel_major(logits, values)

        return prepare

    decision = tuner.choose(f"online_softmax|pixel_major|groups={groups}",
                            {"native": probe(True), "torch": probe(False)}, total_images=4096, total_samples=8)
    return native if decision.kernel == "native" else None
