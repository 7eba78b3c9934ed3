"""The int8 kernel of pca_locality (locality.models.eight_bit.py): its exact integer pieces,
its error bound, both backends (oneDNN and torch._int_mm, with cuBLAS's padding) against a
float64 brute force of the SPEC formula, and its clear refusals. No timing asserts."""

from __future__ import annotations

import math

import pytest
import torch

from locality.models import build_model
from locality.models.fast_masked import LOGIT_TOLERANCE
from locality.models.eight_bit import (
    MAX_DIGITS, Bf16CodeImages, digit_max, eight_bit_codes, int8_error_estimate, quad_digits, to_digits,
)
from locality.schedule import alpha_bar
from locality.statistics import fit_statistics
from test_fast_paths import _data, _noisy, brute_pca

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
BACKENDS = ["int_mm", pytest.param("onednn", marks=pytest.mark.skipif(
    not ONEDNN, reason="this torch build has no oneDNN quantized linear (x86 builds have it)"))]


def _eight_bit(images: torch.Tensor) -> torch.Tensor:
    """Real-format values: uint8 pixels v -> (v/255 - 0.5)/0.5 in float32, like the loaders."""
    q = torch.round((images.clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    return (q.float() / 255 - 0.5) / 0.5


def _int8(model, plan, x64, a, scale, digits, dtype):
    """The model's int8 step with forced digits and dtype."""
    from locality.models.eight_bit import Int8Images, int8_step

    images8 = Int8Images(model.eight_bit_codes(), model.int8_backend())
    return int8_step(images8, model.images, plan.dense_mask(torch.int8), x64, a, scale, digits, dtype,
                     model.chunk_size)


@pytest.fixture(scope="module")
def synth8():
    images = _eight_bit(_data(num=50, side=5))  # n = 25: not a multiple of 8 (the padding path)
    return images, fit_statistics(images, progress=False)


@pytest.fixture(scope="module")
def fmnist_crop12(fmnist_train):
    images = fmnist_train[:300, :, 8:20, 8:20].contiguous()
    return images, fit_statistics(images, progress=False)


def test_to_digits_is_exact_fixed_point():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 50, generator=g, dtype=torch.float64) * torch.logspace(-6, 2, 6).unsqueeze(1)
    values[0, 0] = 0.0
    for digits in range(1, MAX_DIGITS + 1):
        x, delta = to_digits(values, digits)
        assert x.dtype == torch.int8 and x.shape == (digits, 6, 50)
        whole = sum(x[j].to(torch.int64) * 256**j for j in range(digits))
        assert int(whole.abs().max()) <= digit_max(digits)
        back = whole.double() * delta
        assert delta == float(values.abs().max()) / digit_max(digits)
        assert bool(((back - values).abs() <= delta / 2 * (1 + 1e-9)).all())


def test_quad_digits_cover_every_code():
    codes = torch.arange(-128, 128, dtype=torch.int8).unsqueeze(0)
    high, low = quad_digits(codes)
    assert int(high.min()) >= -64 and int(high.max()) <= 64 and int(low.min()) >= -64 and int(low.max()) <= 63
    assert torch.equal(128 * high.int() + low.int(), codes.int() ** 2 - 8192)


def test_eight_bit_codes_detect_the_loader_format(fmnist_train):
    codes = eight_bit_codes(fmnist_train[:500].reshape(500, -1))
    assert codes is not None
    back = (2 * (codes.double() + 128) - 255) / 255
    assert (back - fmnist_train[:500].reshape(500, -1).double()).abs().max() < 1e-6
    assert eight_bit_codes(_data().reshape(60, -1)) is None  # continuous values
    off = fmnist_train[:10].reshape(10, -1).clone()
    off[3, 7] += 1e-4  # one value off the 8-bit grid
    assert eight_bit_codes(off) is None
    assert eight_bit_codes(torch.full((2, 4), 1.5)) is None  # outside [-1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,threshold", [(900, 0.005), (500, 0.05), (100, 0.02), (0, 0.02)])
@pytest.mark.parametrize("chunk,count", [(1, 3), (7, 1), (None, 3)])
def test_int8_kernel_matches_brute_force(synth8, backend, t, threshold, chunk, count):
    images, stats = synth8
    model = build_model("pca_locality", images, stats, mask_threshold=threshold, dtype=torch.float32,
                        chunk_size=chunk, dense_kernel="int8")
    model.int8_backend = lambda: backend
    x = _noisy(images, t, count=count)
    got = model(x, t).double().reshape(len(x), -1)
    want = brute_pca(x, t, images, stats, threshold)
    assert (got - want).abs().max() < 1e-4
    if model.plan(t).strategy == "dense":
        assert model.last_kernel.startswith("int8x"), model.last_kernel
    # five digits combined in float64 reach float64 accuracy (the exact integer sums)
    abar = float(alpha_bar(t))
    full = _int8(model, model.plan(t), x.reshape(len(x), -1).double(), math.sqrt(abar), 1 / (2 * (1 - abar)),
                 MAX_DIGITS, torch.float64)
    assert (full - want).abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_choice_the_bound_allows_is_within_tolerance(fmnist_crop12, backend):
    """For each step and every (digits, dtype) whose bound is within the tolerance, the step
    stays within 1e-4 of float64; and the bound rules out what it must (1 digit at t = 0)."""
    images, stats = fmnist_crop12
    model = build_model("pca_locality", images, stats, mask_threshold=0.005, dtype=torch.float32,
                        dense_kernel="int8", chunk_size=64)
    model.int8_backend = lambda: backend
    allowed = 0
    for t in (900, 600, 300, 200, 100, 0):
        abar = float(alpha_bar(t))
        a, scale = math.sqrt(abar), 1 / (2 * (1 - abar))
        x = _noisy(images, t, count=2, seed=t)
        want = brute_pca(x, t, images, stats, 0.005)
        x64 = x.reshape(2, -1).double()
        plan = model.plan(t)
        xq = x64 - a / 255
        colsum = float((xq.abs() @ plan.dense_mask(torch.float64).T).max())
        for dtype in (torch.float32, torch.float64):
            for digits in range(1, MAX_DIGITS + 1):
                bound = int8_error_estimate(digits, dtype, a, scale, float(xq.abs().max()), colsum,
                                         plan.max_column_nnz)
                if t == 0 and digits == 1:
                    assert bound > LOGIT_TOLERANCE
                if bound <= LOGIT_TOLERANCE:
                    allowed += 1
                    got = _int8(model, plan, x64, a, scale, digits, dtype)
                    assert (got - want).abs().max() < 1e-4, (t, digits, dtype, bound)
    assert allowed >= 10


def test_int8_on_real_fmnist_crop_every_step_and_chunking(fmnist_crop12):
    images, stats = fmnist_crop12
    outs = {}
    for chunk in (13, None):
        model = build_model("pca_locality", images, stats, mask_threshold=0.005, dtype=torch.float32,
                            chunk_size=chunk, dense_kernel="int8")
        for t in (900, 500, 200, 0):
            x = _noisy(images, t, count=2, seed=3)
            got = model(x, t).double().reshape(2, -1)
            assert (got - brute_pca(x, t, images, stats, 0.005)).abs().max() < 1e-4
            outs.setdefault(t, []).append(got)
    for t, (a, b) in outs.items():  # chunk-size independence (exact integer sums)
        assert (a - b).abs().max() < 1e-5, t


def test_int8_refuses_what_it_cannot_do(synth8):
    images, stats = synth8
    x = _noisy(images, 500)
    for kernel in ("int8", "bf16x3"):
        model = build_model("pca_locality", images, stats, mask_threshold=0.0, dense_kernel=kernel,
                            dtype=torch.float32)
        with pytest.raises(ValueError, match=f"{kernel} needs a binary mask: set model.mask_threshold > 0"):
            model(x, 500)
        smooth = _data()
        model = build_model("pca_locality", smooth, fit_statistics(smooth, progress=False), mask_threshold=0.02,
                            dense_kernel=kernel, dtype=torch.float32)
        with pytest.raises(ValueError, match=rf"{kernel} needs 8-bit images \(values \(2q - 255\)/255"):
            model(_noisy(smooth, 500), 500)


def test_auto_picks_int8_only_where_it_applies(synth8):
    images, stats = synth8
    model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32)
    x = _noisy(images, 500)
    model(x, 500)
    avx512 = ONEDNN and torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert model.last_kernel.startswith("int8x") if avx512 else model.last_kernel == "float32"
    smooth = _data()
    model = build_model("pca_locality", smooth, fit_statistics(smooth, progress=False), mask_threshold=0.02,
                        dtype=torch.float32)
    model(_noisy(smooth, 500), 500)
    assert model.last_kernel == "float32"  # not 8-bit data: the float32 GEMM
    f64 = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float64)
    f64(x, 500)
    assert f64.last_kernel == "float64"  # the oracle never takes the int8 kernel


def test_bf16_code_images_are_exact(fmnist_train):
    images = fmnist_train[:400].reshape(400, -1)
    codes = Bf16CodeImages(eight_bit_codes(images))
    n = images.shape[1]
    d = codes.stacked[:, :n].double()
    assert torch.equal(codes.stacked[:, n : 2 * n], codes.stacked[:, :n])
    assert torch.equal(codes.stacked[:, 2 * n :], codes.stacked[:, :n])
    assert float(d.abs().max()) <= 255 and torch.equal(d, d.round())
    assert (codes.offset + 2 / 255 * d - images.double()).abs().max() < 1e-6  # y = c' + (2/255)·D'
    assert torch.equal(codes.squares[:, :n].double() + codes.squares[:, n:].double(), d.square())
    assert codes.y_abs_max == 2 / 255 * float(d.abs().max())


@pytest.mark.parametrize("t,threshold", [(900, 0.005), (500, 0.05), (300, 0.02)])
@pytest.mark.parametrize("chunk,count", [(1, 3), (7, 1), (None, 3)])
def test_bf16x3_kernel_matches_brute_force(synth8, t, threshold, chunk, count):
    images, stats = synth8
    model = build_model("pca_locality", images, stats, mask_threshold=threshold, dtype=torch.float32,
                        chunk_size=chunk, dense_kernel="bf16x3")
    x = _noisy(images, t, count=count)
    got = model(x, t).double().reshape(len(x), -1)
    assert (got - brute_pca(x, t, images, stats, threshold)).abs().max() < 1e-4
    assert model.last_kernel in ("bf16x3", "float64", "sparse")
    if model.plan(t).strategy == "dense" and t >= 500:
        assert model.last_kernel == "bf16x3"


def test_bf16x3_on_real_fmnist_crop_and_sample_groups(fmnist_crop12, monkeypatch):
    images, stats = fmnist_crop12
    x = _noisy(images, 600, count=3, seed=2)
    want = brute_pca(x, 600, images, stats, 0.005)
    model = build_model("pca_locality", images, stats, mask_threshold=0.005, dtype=torch.float32,
                        dense_kernel="bf16x3", chunk_size=50)
    whole = model(x, 600).double().reshape(3, -1)
    assert model.last_kernel == "bf16x3"
    assert (whole - want).abs().max() < 1e-4
    import locality.models.eight_bit as eight_bit

    monkeypatch.setattr(eight_bit, "memory_budget", lambda device: 28 * 144 * 144)  # one sample a group
    grouped = model(x, 600).double().reshape(3, -1)
    assert (grouped - whole).abs().max() < 1e-6


def test_auto_on_cuda_tries_bf16x3_then_int8(synth8, monkeypatch):
    """The CUDA policy of auto, read without a GPU (the device type and memory rules faked)."""
    images, stats = synth8
    model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32)
    plan = model.plan(500)
    model.device = torch.device("cuda")
    model._auto_fits = {"bf16x3": True, "bf16x6": True}
    model._int8_exact = {"int_mm": True}  # the probe of CUDA's integer tensor cores, faked
    assert model.candidates(plan, 3) == ["bf16x3", "int8"]
    from locality.models.pca_locality import INT8_FIRST_ROWS

    tall = INT8_FIRST_ROWS // 25 + 1  # n·B rows beyond the crossover
    assert model.candidates(plan, tall) == ["int8"]
    model._auto_fits["bf16x3"] = False
    assert model.candidates(plan, 3) == ["int8"]
    # int8 sums that are not exact: never int8
    model._int8_exact = {"int_mm": False}
    assert model.candidates(plan, 3) == ["bf16x6"]
    model._auto_fits["bf16x3"] = True
    assert model.candidates(plan, 3) == model.candidates(plan, tall) == ["bf16x3"]
    smooth = _data()
    other = build_model("pca_locality", smooth, fit_statistics(smooth, progress=False), mask_threshold=0.02,
                        dtype=torch.float32)
    other.device = torch.device("cuda")
    other._auto_fits = {"bf16x3": True, "bf16x6": True}
    assert other.candidates(other.plan(500), 3) == ["bf16x6"]
    other._auto_fits["bf16x6"] = False
    assert other.candidates(other.plan(500), 3) == ["float32"]
    dense = build_model("pca_locality", images, stats, mask_threshold=0.0, dtype=torch.float32)
    dense.device = torch.device("cuda")
    assert dense.candidates(dense.plan(500), 3) == ["float32"]  # θ = 0: not binary


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_sample_groups(fmnist_crop12, monkeypatch, backend):
    """Samples split into groups (each with its own fixed-point δ) when their digit
    activations exceed the memory budget: same result within tolerance."""
    images, stats = fmnist_crop12
    model = build_model("pca_locality", images, stats, mask_threshold=0.005, dtype=torch.float32,
                        dense_kernel="int8", chunk_size=40)
    model.int8_backend = lambda: backend
    x = _noisy(images, 400, count=3, seed=4)
    want = brute_pca(x, 400, images, stats, 0.005)
    whole = model(x, 400).double().reshape(3, -1)
    import locality.models.eight_bit as eight_bit

    calls = []
    real = eight_bit.to_digits
    monkeypatch.setattr(eight_bit, "memory_budget", lambda device, *a, **k: 3 * 144 * 144)  # one sample a group
    monkeypatch.setattr(eight_bit, "to_digits", lambda v, d: calls.append(len(v)) or real(v, d))
    grouped = model(x, 400).double().reshape(3, -1)
    assert calls == [1, 1, 1]
    assert (whole - want).abs().max() < 1e-4 and (grouped - want).abs().max() < 1e-4


def _saturating(exact_mm):
    """A backend like a CPU without VNNI: products summed through int16, saturated."""
    return lambda *args, **kw: exact_mm(*args, **kw).clamp(-32768, 32767)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_probe_passes_here_and_catches_saturating_sums(backend, monkeypatch):
    import locality.models.eight_bit as eight_bit

    assert eight_bit.int8_sums_exact(backend, "cpu")
    name = "_onednn_mm" if backend == "onednn" else "_int_mm"
    monkeypatch.setattr(eight_bit, name, _saturating(getattr(eight_bit, name)))
    assert not eight_bit.int8_sums_exact(backend, "cpu")


def test_inexact_int8_is_refused_or_left_out(synth8, monkeypatch, caplog):
    """Where the probe fails, dense_kernel=int8 is a clear error and auto takes float32."""
    import locality.models.pca_locality as pca

    monkeypatch.setattr(pca, "int8_sums_exact", lambda backend, device: False)
    images, stats = synth8
    x = _noisy(images, 500)
    explicit = build_model("pca_locality", images, stats, mask_threshold=0.02, dense_kernel="int8",
                           dtype=torch.float32)
    with pytest.raises(ValueError, match=r"dense_kernel=int8: the int8 products of the \w+ backend are not exact"):
        explicit(x, 500)
    auto = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32)
    with caplog.at_level("WARNING", logger="locality.models.pca_locality"):
        got = auto(x, 500).double().reshape(len(x), -1)
    assert auto.last_kernel == "float32"
    assert "not exact" in caplog.text or torch.backends.cpu.get_cpu_capability() != "AVX512"
    assert (got - brute_pca(x, 500, images, stats, 0.02)).abs().max() < 1e-4
