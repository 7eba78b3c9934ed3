"""pca_locality's kernels for 8-bit images (locality.models.pca_locality.int8 and .bf16): the
int8 kernels' exact integer pieces, their error estimate, both backends (oneDNN and
torch._int_mm, with cuBLAS's padding) and bf16x3 against the float64 oracle of the SPEC
formula, the exactness probe, and their clear refusals. No timing asserts."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from locality.models import build_model
from locality.models.pca_locality.bf16 import Bf16CodeImages
from locality.models.pca_locality.int8 import digit_max, eight_bit_codes, int8_error_estimate, quad_digits, to_digits
from locality.models.pca_locality.kernel import Precision
from locality.models.pca_locality.selection import LOGIT_TOLERANCE, MAX_DIGITS
from locality.schedule import alpha_bar
from locality.statistics import fit_statistics
from locality.models.autotune import KernelTuner
from synthetic import PreferKernel, eight_bit, local_images, noisy, pca_oracle

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
BACKENDS = ["int8_intmm", "int8_gather", pytest.param("int8_onednn", marks=pytest.mark.skipif(
    not ONEDNN, reason="this torch build has no oneDNN quantized linear (x86 builds have it)"))]


def _int8(model, kernel, x, t, digits, dtype):
    """The model's int8 kernel ``kernel`` on x_t at t with forced digits and dtype."""
    int8 = model.kernels[kernel]
    step = model.step_inputs(x, t)
    side = int8.prepare(int8.images.count, step, model.chunk_size)
    return int8.run(side, step, Precision(dtype, digits), model.chunk_size)


@pytest.fixture(scope="module")
def synth8():
    images = eight_bit(local_images(num=50, side=5))  # n = 25: not a multiple of 8 (the padding path)
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


def test_quad_digits_in_blocks_equal_all_at_once():
    codes = torch.randint(-128, 128, (1000, 7), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    high, low = quad_digits(codes, rows=77)  # a last block of 76
    assert torch.equal(128 * high.int() + low.int(), codes.int() ** 2 - 8192)
    assert torch.equal(high, quad_digits(codes)[0]) and torch.equal(low, quad_digits(codes)[1])


def test_memory_derived_int_mm_chunks_read_the_codes_in_place():
    """torch._int_mm pads its image operand to multiples of 8: a chunk size the memory budget
    gives is rounded down to one, so every chunk but the last is a view of the codes, not a
    padded copy (138 MB of copies per kernel on Fashion-MNIST before); an explicit
    model.chunk_size is kept."""
    from locality.models.pca_locality.int8 import Int8Images, int_mm_chunk

    assert int_mm_chunk(158, None) == 152 and int_mm_chunk(158, 158) == 158 and int_mm_chunk(5, None) == 5
    assert int_mm_chunk(158, None, "onednn") == 158
    codes = torch.randint(-128, 128, (1000, 16), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    side = Int8Images(codes, "int_mm", "view")
    chunks = side.chunks(int_mm_chunk(158, None))
    base = side.codes.untyped_storage().data_ptr()
    assert all(op.untyped_storage().data_ptr() == base for _, _, op, _, _ in chunks[:-1])
    assert chunks[-1][1] - chunks[-1][0] == 1000 % 152  # the last, short chunk is padded (a copy)


def test_fastest_accepted_keeps_the_cheaper_form_unless_another_is_clearly_faster():
    import time

    from locality.models.pca_locality.int8 import fastest_accepted

    def sleeper(seconds):
        return lambda: time.sleep(seconds)

    cpu = torch.device("cpu")
    # within the margin: the first (the form that keeps no copies) stays
    assert fastest_accepted({"view": sleeper(0.010), "copy": sleeper(0.0098)}, cpu, margin=0.5) == "view"
    assert fastest_accepted({"view": sleeper(0.010), "copy": sleeper(0.002)}, cpu, margin=0.5) == "copy"
    assert fastest_accepted({"view": sleeper(0.002), "copy": sleeper(0.010)}, cpu, margin=0.0) == "view"


def test_eight_bit_codes_detect_the_loader_format(fmnist_train):
    codes = eight_bit_codes(fmnist_train[:500].reshape(500, -1))
    assert codes is not None
    back = (2 * (codes.double() + 128) - 255) / 255
    assert (back - fmnist_train[:500].reshape(500, -1).double()).abs().max() < 1e-6
    assert eight_bit_codes(local_images().reshape(60, -1)) is None  # continuous values
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
                        chunk_size=chunk, dense_kernel=backend)
    x = noisy(images, t, count=count)
    got = model(x, t).double().reshape(len(x), -1)
    want = pca_oracle(x, t, images, stats, threshold)
    assert (got - want).abs().max() < 1e-4
    if model.plan(t).strategy == "dense":
        assert model.last_kernel.startswith(f"{backend}x"), model.last_kernel
    # five digits combined in float64 reach float64 accuracy (the exact integer sums)
    full = _int8(model, backend, x, t, MAX_DIGITS, torch.float64)
    assert (full - want).abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_choice_the_bound_allows_is_within_tolerance(fmnist_crop12, backend):
    """For each step and every (digits, dtype) whose bound is within the tolerance, the step
    stays within 1e-4 of float64; and the bound rules out what it must (1 digit at t = 0)."""
    images, stats = fmnist_crop12
    model = build_model("pca_locality", images, stats, mask_threshold=0.005, dtype=torch.float32,
                        dense_kernel=backend, chunk_size=64)
    allowed = 0
    for t in (900, 600, 300, 200, 100, 0):
        abar = float(alpha_bar(t))
        a, scale = math.sqrt(abar), 1 / (2 * (1 - abar))
        x = noisy(images, t, count=2, seed=t)
        want = pca_oracle(x, t, images, stats, 0.005)
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
                    got = _int8(model, backend, x, t, digits, dtype)
                    assert (got - want).abs().max() < 1e-4, (t, digits, dtype, bound)
    assert allowed >= 10


@pytest.mark.parametrize("t,threshold", [(900, 0.005), (300, 0.005), (100, 0.02)])
def test_gather_with_cublas_shapes_on_the_cpu(synth8, t, threshold):
    """int8_gather with cuBLAS's padding (column sets to multiples of 8 through a zero input,
    more than 16 rows) gives the same x̂0 as without: CUDA's path, run here."""
    images, stats = synth8
    model = build_model("pca_locality", images, stats, mask_threshold=threshold, dtype=torch.float32,
                        chunk_size=13, dense_kernel="int8_gather")
    x = noisy(images, t, count=1)
    plain = model(x, t).double().reshape(1, -1)
    step = model.step_inputs(x, t)
    kernel = model.kernels["int8_gather"]
    side = kernel.prepare(kernel.images.count, step, model.chunk_size)
    side.cublas_shapes = True
    padded = kernel.run(side, step, Precision(torch.float64, MAX_DIGITS), model.chunk_size)
    assert {len(c) % 8 for c, _ in step.plan.gather_columns(8)} == {0}
    want = pca_oracle(x, t, images, stats, threshold)
    assert (plain - want).abs().max() < 1e-4 and (padded - want).abs().max() < 1e-4


def test_gather_column_sets_are_the_mask_or_its_complement():
    from locality.models.pca_locality.gather import column_sets

    mask = torch.zeros(6, 3, dtype=torch.float64)
    mask[:2, 0] = 1  # 2 of 6 ones: the ones themselves
    mask[:5, 1] = 1  # 5 of 6: the complement, input 5
    mask[:, 2] = 0  # none: an empty set
    sets = column_sets(mask, torch.device("cpu"), 1)
    # a single input is padded to two with the zero input 6
    assert [c.tolist() for c, _ in sets] == [[0, 1], [5, 6], []] and [comp for _, comp in sets] == [False, True, False]
    padded = column_sets(mask, torch.device("cpu"), 4)
    assert [c.tolist() for c, _ in padded] == [[0, 1, 6, 6], [5, 6, 6, 6], []]


@pytest.mark.parametrize("form", ["rows", "columns"])
def test_gather_operands_give_exact_sums(form):
    """Both gather forms, small column counts (from two: :func:`column_sets` pads a single
    input, whose operands torch._int_mm misreads) and a last chunk short of 8 images."""
    from locality.models.pca_locality.gather import GatheredImages

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (13, 25), dtype=torch.int8, generator=g)
    side = GatheredImages(codes, "view", form)
    padded = torch.nn.functional.pad(codes, (0, 1, 0, 8)).long()
    for (start, stop, *_), block in zip(side.dense.chunks(10), side.blocks(10)):
        width = block.shape[1] if form == "rows" else block.shape[0]
        for count in (2, 3, 5, 26):
            columns = torch.randperm(26, generator=g)[:count]
            act = torch.randint(-128, 128, (5, count), dtype=torch.int8, generator=g)
            out = torch.empty(5, width, dtype=torch.int32)
            torch._int_mm(act, side.operand(block, columns), out=out)
            k = stop - start  # the chunk's own images, then zero images up to the width
            assert width == -(-k // 8) * 8
            assert torch.equal(out[:, :k].long(), act.long() @ padded[start:stop, columns].T)
            assert not out[:, k:].any()


def test_int8_on_real_fmnist_crop_every_step_and_chunking(fmnist_crop12):
    images, stats = fmnist_crop12
    outs = {}
    for chunk in (13, None):
        model = build_model("pca_locality", images, stats, mask_threshold=0.005, dtype=torch.float32,
                            chunk_size=chunk, dense_kernel="int8")
        for t in (900, 500, 200, 0):
            x = noisy(images, t, count=2, seed=3)
            got = model(x, t).double().reshape(2, -1)
            assert (got - pca_oracle(x, t, images, stats, 0.005)).abs().max() < 1e-4
            outs.setdefault(t, []).append(got)
    for t, (a, b) in outs.items():  # chunk-size independence (exact integer sums)
        assert (a - b).abs().max() < 1e-5, t


def test_int8_refuses_what_it_cannot_do(synth8):
    images, stats = synth8
    x = noisy(images, 500)
    for kernel in ("int8", "int8_intmm", "bf16x3"):
        model = build_model("pca_locality", images, stats, mask_threshold=0.0, dense_kernel=kernel,
                            dtype=torch.float32)
        with pytest.raises(ValueError, match=rf"dense_kernel={kernel} cannot run here \(.*needs a binary mask: set "
                                             r"model.mask_threshold > 0"):
            model(x, 500)
        smooth = local_images()
        model = build_model("pca_locality", smooth, fit_statistics(smooth, progress=False), mask_threshold=0.02,
                            dense_kernel=kernel, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"needs 8-bit images \(values \(2q - 255\)/255"):
            model(noisy(smooth, 500), 500)


def test_auto_measures_the_kernels_that_apply(synth8):
    """auto's candidates: the int8 kernels for 8-bit images and binary masks (bf16 ones only with a
    native bfloat16 GEMM), float32 always; float64 models only the float64 kernels."""
    images, stats = synth8
    tuner = PreferKernel("none")
    model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32, tuner=tuner)
    x = noisy(images, 500)
    model(x, 500)
    int8 = {"int8_intmm", "int8_gather", "int8_onednn"} if ONEDNN else {"int8_intmm", "int8_gather"}
    assert set(tuner.seen) == {"float32"} | int8
    assert model.last_kernel.split("x")[0] in tuner.seen
    smooth = local_images()
    other = build_model("pca_locality", smooth, fit_statistics(smooth, progress=False), mask_threshold=0.02,
                        dtype=torch.float32, tuner=tuner)
    other(noisy(smooth, 500), 500)
    assert tuner.seen == ["float32"] and other.last_kernel == "float32"  # not 8-bit data: the float32 GEMM
    f64 = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float64, tuner=tuner)
    f64(x, 500)
    assert tuner.seen == ["float64"] and f64.last_kernel == "float64"  # the oracle never takes int8


def test_auto_candidates_with_tensor_cores(synth8):
    """Where a native bfloat16 GEMM exists (faked here) auto also measures bf16x3 (8-bit images)
    or bf16x6, unless their image side would not fit; θ = 0 (not binary) leaves float32."""
    from locality.models.pca_locality.selection import step_candidates

    images, stats = synth8
    model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32)
    for name in ("bf16x6", "bf16x3"):
        model.kernels[name]._native, model.kernels[name]._fits = True, True
    step = model.step_inputs(noisy(images, 500), 500)
    kind, chosen = step_candidates(model.kernels, step, "auto", float64_only=False)
    assert kind == "dense32" and {"float32", "bf16x6", "bf16x3", "int8_intmm"} <= set(chosen)
    model.kernels["bf16x3"]._fits = False
    assert "bf16x3" not in step_candidates(model.kernels, step, "auto", float64_only=False)[1]
    model.kernels["bf16x3"]._fits = True
    # a forced kernel is the only dense candidate
    assert set(step_candidates(model.kernels, step, "bf16x3", float64_only=False)[1]) == {"bf16x3"}
    dense = build_model("pca_locality", images, stats, mask_threshold=0.0, dtype=torch.float32)
    for name in ("bf16x6", "bf16x3"):
        dense.kernels[name]._native, dense.kernels[name]._fits = True, True
    step = dense.step_inputs(noisy(images, 500), 500)
    assert set(step_candidates(dense.kernels, step, "auto", float64_only=False)[1]) == {"float32"}


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
    x = noisy(images, t, count=count)
    got = model(x, t).double().reshape(len(x), -1)
    assert (got - pca_oracle(x, t, images, stats, threshold)).abs().max() < 1e-4
    assert model.last_kernel in ("bf16x3", "float64", "sparse")
    if model.plan(t).strategy == "dense" and t >= 500:
        assert model.last_kernel == "bf16x3"


def test_bf16x3_on_real_fmnist_crop_and_sample_groups(fmnist_crop12, monkeypatch):
    images, stats = fmnist_crop12
    x = noisy(images, 600, count=3, seed=2)
    want = pca_oracle(x, 600, images, stats, 0.005)
    model = build_model("pca_locality", images, stats, mask_threshold=0.005, dtype=torch.float32,
                        dense_kernel="bf16x3", chunk_size=50)
    whole = model(x, 600).double().reshape(3, -1)
    assert model.last_kernel == "bf16x3"
    assert (whole - want).abs().max() < 1e-4
    import locality.models.pca_locality.bf16 as bf16

    monkeypatch.setattr(bf16, "memory_budget", lambda device: 28 * 144 * 144)  # one sample a group
    grouped = model(x, 600).double().reshape(3, -1)
    assert (grouped - whole).abs().max() < 1e-6


@pytest.mark.parametrize("backend", ["int8_intmm", BACKENDS[2]])
def test_int8_sample_groups(fmnist_crop12, monkeypatch, backend):
    """Samples split into groups (each with its own fixed-point δ) when their digit
    activations exceed the memory budget: same result within tolerance."""
    images, stats = fmnist_crop12
    model = build_model("pca_locality", images, stats, mask_threshold=0.005, dtype=torch.float32,
                        dense_kernel=backend, chunk_size=40)
    x = noisy(images, 400, count=3, seed=4)
    want = pca_oracle(x, 400, images, stats, 0.005)
    whole = model(x, 400).double().reshape(3, -1)
    import locality.models.pca_locality.int8 as int8

    calls = []
    real = int8.to_digits
    monkeypatch.setattr(int8, "memory_budget", lambda device, *a, **k: 3 * 144 * 144)  # one sample a group
    monkeypatch.setattr(int8, "to_digits", lambda v, d: calls.append(len(v)) or real(v, d))
    grouped = model(x, 400).double().reshape(3, -1)
    assert calls == [1, 1, 1]
    assert (whole - want).abs().max() < 1e-4 and (grouped - want).abs().max() < 1e-4


def _saturating(exact_mm):
    """A backend like a CPU without VNNI: products summed through int16, saturated."""
    return lambda *args, **kw: exact_mm(*args, **kw).clamp(-32768, 32767)


@pytest.mark.parametrize("backend", ["int_mm", pytest.param("onednn", marks=BACKENDS[2].marks)])
def test_int8_probe_passes_here_and_catches_saturating_sums(backend, monkeypatch):
    import locality.models.pca_locality.int8 as int8
    from locality.models.pca_locality.selection import int8_sums_exact

    assert int8_sums_exact(backend, "cpu")
    name = "_onednn_mm" if backend == "onednn" else "int_mm_padded"
    monkeypatch.setattr(int8, name, _saturating(getattr(int8, name)))
    assert not int8_sums_exact(backend, "cpu")


def test_inexact_int8_is_refused_or_left_out(synth8, monkeypatch, caplog):
    """Where the probe fails, dense_kernel=int8 is a clear error and auto leaves int8 out."""
    import locality.models.pca_locality.int8 as int8

    monkeypatch.setattr(int8, "int8_sums_exact", lambda backend, device: False)
    images, stats = synth8
    x = noisy(images, 500)
    explicit = build_model("pca_locality", images, stats, mask_threshold=0.02, dense_kernel="int8",
                           dtype=torch.float32)
    with pytest.raises(ValueError, match=r"dense_kernel=int8 cannot run here \(.*int8_intmm: the int8 products of "
                                         r"the int_mm backend are not exact"):
        explicit(x, 500)
    tuner = PreferKernel("none")
    auto = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32, tuner=tuner)
    with caplog.at_level("WARNING", logger="locality.models.pca_locality"):
        got = auto(x, 500).double().reshape(len(x), -1)
    assert tuner.seen == ["float32"] and auto.last_kernel == "float32"
    assert "not exact" in caplog.text
    assert (got - pca_oracle(x, 500, images, stats, 0.02)).abs().max() < 1e-4


class _Recording(KernelTuner):
    """Measures for real and records (key, candidates) of every choice."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.calls: list[tuple[str, list[str]]] = []

    def choose(self, key, candidates, total_images, total_samples, *probe_info):
        self.calls.append((key, list(candidates)))
        return super().choose(key, candidates, total_images, total_samples, *probe_info)


def test_a_new_gathered_class_times_only_the_mask_dependent_kernels_again(synth8):
    """Steps whose masks leave int8_gather different shares of the work are separate decisions
    (it wins the local masks and loses the half-covered ones); at the second such class, the
    kernels whose cost does not depend on the mask are not timed again: only the fastest of them
    at the first class competes with int8_gather. (The first class is recorded as won by
    int8_gather, whatever this machine measured: a win at a smaller share says nothing of the
    larger one, which is then measured; a loss would decide it.)"""
    from dataclasses import replace

    images, stats = synth8
    tuner = _Recording()
    model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32, tuner=tuner)
    classes = _gathered_classes(model)
    assert len(classes) >= 2, classes
    first_t, second_t = (classes[c] for c in sorted(classes)[:2])
    x = noisy(images, first_t)
    model(x, first_t)
    key1, names1 = [c for c in tuner.calls if c[0].startswith("pca_locality")][-1]
    assert "|gathered~2^" in key1 and {"float32", "int8_intmm", "int8_gather"} <= set(names1)
    tuner.remember(key1, replace(tuner.known(key1), kernel="int8_gather"), "test")
    rates = tuner.known(key1).ms_per_1000_images
    fastest_fixed = min((n for n in rates if n != "int8_gather"), key=rates.get)
    model(noisy(images, second_t), second_t)
    key2, names2 = [c for c in tuner.calls if c[0].startswith("pca_locality")][-1]
    assert key2 != key1 and key2.split("|gathered")[0] == key1.split("|gathered")[0]
    assert sorted(names2) == sorted({"int8_gather", fastest_fixed})
    # the same class again: remembered, nothing measured
    before, probed = len(tuner.calls), tuner.probe_seconds_total
    model(x, first_t)
    assert tuner.known(key1).source == "measured" and tuner.probe_seconds_total == probed
    assert [key for key, _ in tuner.calls[before:] if key.startswith("pca_locality")] == [key1]


def test_a_gathered_class_learns_only_from_its_own_shapes(synth8):
    """The rates of another chunk size (a key that merely begins like this one's) do not prune
    this one's probe: its first class times every candidate."""
    images, stats = synth8
    tuner = _Recording()
    plain = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32, tuner=tuner)
    chunked = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32, tuner=tuner,
                          chunk_size=7)
    classes: dict[int, int] = {}
    for t in range(900, 0, -50):
        plan = plain.plan(t)
        if plan.strategy == "dense":
            classes.setdefault(round(math.log2(plan.gathered_fraction)), t)
    first_t, second_t = list(classes.values())[:2]
    chunked(noisy(images, first_t), first_t)  # its keys begin with the plain model's prefix
    plain(noisy(images, second_t), second_t)
    key, names = [c for c in tuner.calls if c[0].startswith("pca_locality")][-1]
    assert "|chunk=" not in key and {"float32", "int8_intmm", "int8_gather"} <= set(names)


def _gathered_classes(model) -> dict[int, int]:
    """{gathered class: its first t} over the dense steps of a schedule."""
    classes: dict[int, int] = {}
    for t in range(900, 0, -50):
        plan = model.plan(t)
        if plan.strategy == "dense":
            classes.setdefault(round(math.log2(plan.gathered_fraction)), t)
    return classes


def _key_at(model, images, t):
    from locality.models.pca_locality.selection import decision_key, step_candidates

    step = model.step_inputs(noisy(images, t), t)
    kind, chosen = step_candidates(model.kernels, step, "auto", float64_only=False)
    return decision_key(kind, list(chosen), step, len(images), None), kind


@pytest.mark.parametrize("known", ["lost below", "won above"])
def test_a_gathered_class_that_measured_classes_decide_is_not_measured(synth8, known, caplog):
    """int8_gather's work grows with its share of the dense work, the other kernels' does not:
    where it lost at a smaller share, it loses here (to the same kernel); where it won at a
    larger share, it wins here. Such a class is decided without a probe, logged as inferred,
    and the step is still exact; the other direction (won below, lost above) and a margin
    below INFER_MARGIN are measured."""
    from locality.models.autotune import Decision
    from locality.models.pca_locality.selection import INFER_MARGIN

    images, stats = synth8
    tuner = _Recording()
    model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32, tuner=tuner)
    classes = _gathered_classes(model)
    assert len(classes) >= 2, classes
    low, high = min(classes), max(classes)
    measured_t, asked_t = (classes[low], classes[high]) if known == "lost below" else (classes[high], classes[low])
    measured_key, kind = _key_at(model, images, measured_t)
    assert kind == "dense32" and "int8_gather" in measured_key
    winner = "int8_intmm" if known == "lost below" else "int8_gather"
    loser = "int8_gather" if winner == "int8_intmm" else "int8_intmm"
    clear = {winner: 1.0, loser: INFER_MARGIN}
    tuner.remember(measured_key, Decision(winner, clear, 8, 0.1, "measured"), "test")
    x = noisy(images, asked_t)
    with caplog.at_level(logging.INFO, logger="locality.models.autotune"):
        got = model(x, asked_t).double().reshape(len(x), -1)
    assert model.last_kernel.startswith(winner + "x")
    assert not [key for key, _ in tuner.calls if key.startswith("pca_locality")]  # nothing measured
    asked_key, _ = _key_at(model, images, asked_t)
    assert tuner.known(asked_key).kernel == winner and "inferred: int8_gather" in caplog.text
    assert (got - pca_oracle(x, asked_t, images, stats, 0.02)).abs().max() < 1e-4
    # the other direction says nothing, nor does a near tie: measured
    near_tie = {winner: 1.0, loser: 0.9 * INFER_MARGIN}
    for kernel, rates in ((loser, {loser: 1.0, winner: INFER_MARGIN}), (winner, near_tie)):
        other = _Recording()
        model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32, tuner=other)
        other.remember(measured_key, Decision(kernel, rates, 8, 0.1, "measured"), "test")
        model(x, asked_t)
        assert [key for key, _ in other.calls if key.startswith("pca_locality")] == [asked_key]


def test_a_kernel_measured_far_slower_at_these_shapes_is_not_timed_again(synth8, caplog):
    """A kernel that an earlier decision of the same shapes measured more than SKIP_FACTOR
    times slower per image than another candidate (int8_onednn without oneDNN's fast int8 path:
    ~1000x) is left out of a new decision's probe, with a log line; a decision of other shapes
    (another number of samples) does not count."""
    from locality.models.autotune import Decision, shape_key
    from locality.models.pca_locality.selection import SKIP_FACTOR

    images, stats = synth8
    x = noisy(images, 500)
    for batch, skipped in ((len(x), True), (len(x) + 1, False)):
        tuner = _Recording()
        model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32, tuner=tuner)
        shapes = shape_key(images[0].numel(), batch, len(images), None)
        tuner.remember(f"pca_locality|dense64|float64+float32+int8_intmm|{shapes}",
                       Decision("int8_intmm", {"int8_intmm": 1.0, "float32": 2.0 * SKIP_FACTOR}, 8, 0.1, "measured"),
                       "test")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="locality.models.pca_locality.selection"):
            got = model(x, 500).double().reshape(len(x), -1)
        names = [c for c in tuner.calls if c[0].startswith("pca_locality")][-1][1]
        assert ("float32" not in names) == skipped and "int8_intmm" in names
        assert ("not timed again" in caplog.text and "float32 (" in caplog.text) == skipped
        assert (got - pca_oracle(x, 500, images, stats, 0.02)).abs().max() < 1e-4
