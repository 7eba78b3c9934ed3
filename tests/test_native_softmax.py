"""The fused C softmax (locality.models.native): its build, its arguments, and its results
against float64 brute force and the torch path, for every form the models feed it.

It needs a C compiler (``cc``; .ci/run and scripts/setup.sh install gcc where none is found):
without one these tests fail, saying so."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch

from locality.models import build_model
from locality.models.autotune import Decision, KernelTuner
from locality.models.native import (
    MAX_DIGITS, NativeSoftmax, load_native_softmax, measured_softmax, native_unavailable_reason,
)
from locality.models.softmax import LOG2_E, OnlineSoftmaxAverage
from locality.models.memory import Workspace
from synthetic import PreferKernel, eight_bit, local_images, noisy, pca_oracle


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> NativeSoftmax:
    build = tmp_path_factory.mktemp("native")
    lib = load_native_softmax(build)
    assert lib is not None, f"the native softmax does not build here: {native_unavailable_reason(build)}"
    return lib


def softmax_average64(logits: torch.Tensor, values: torch.Tensor, base2: bool) -> torch.Tensor:
    """Σ_k softmax_k(logits[..., k]) values[..., k] in float64, the plain way."""
    l64 = logits.double() * (math.log(2) if base2 else 1.0)
    return (torch.softmax(l64, dim=-1) * values.double()).sum(-1)


def chunked(total: int, size: int):
    return [(s, min(s + size, total)) for s in range(0, total, size)]


@pytest.mark.parametrize("base2", [False, True])
@pytest.mark.parametrize("size", [1, 37, 700, 2000])
def test_pixel_major_matches_float64_and_torch(native, base2, size):
    """Logits spread over ~200 units (so weights reach the e^-60 floor), values in [-1, 1],
    any chunking (1 candidate, uneven, > SUM_BLOCK): within 1e-5 of float64 (the weights'
    float32 rounding), and of the torch path."""
    g = torch.Generator().manual_seed(size)
    n, batch, total = 5, 3, 2000
    logits = torch.randn(n, batch, total, generator=g) * 60
    values = torch.rand(n, total, generator=g) * 2 - 1
    want = softmax_average64(logits, values.unsqueeze(1), base2).T  # [B, n]
    results = {}
    for name, lib in (("native", native), ("torch", None)):
        acc = OnlineSoftmaxAverage(base2=base2, native=lib)
        for s, e in chunked(total, size):
            acc.update_pixel_major(logits[:, :, s:e].contiguous(), values[:, s:e])
        results[name] = acc.result()
    assert (results["native"] - want).abs().max() < 1e-5
    assert (results["native"] - results["torch"]).abs().max() < 1e-5


@pytest.mark.parametrize("ones_column", [False, True])
@pytest.mark.parametrize("columns", [1, 3, 16])
def test_per_image_layout_with_shared_values(native, ones_column, columns):
    """els' form: rows [R, K] of base-2 logits sharing values [K, V] (V ≤ 16; with the ones
    column the result drops it)."""
    g = torch.Generator().manual_seed(columns)
    rows, total = 7, 1500
    logits = torch.randn(rows, total, generator=g) * 30
    values = torch.rand(total, columns, generator=g)
    if ones_column:
        values = torch.cat([values, torch.ones(total, 1)], dim=1)
    acc = OnlineSoftmaxAverage(base2=True, native=native)
    for s, e in chunked(total, 400):
        acc.update(logits[:, s:e].clone(), values[s:e], ones_column=ones_column)
    got = acc.result()
    plain = values[:, :columns]
    want = torch.stack([softmax_average64(logits, plain[:, c].unsqueeze(0), True) for c in range(columns)], dim=1)
    assert got.shape == (rows, columns)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("size", [1, 333, 1500])
def test_more_values_than_the_fused_sums_take(native, size, monkeypatch):
    """pspc averages whole rectangles (V > max_values): the C kernel forms the weights (and
    keeps the maximum and normaliser), torch's GEMMs the sums; logits whose maximum rises from
    chunk to chunk, any chunking: within 1e-5 of float64 and of the torch path."""
    g = torch.Generator().manual_seed(size)
    rows, total, columns = 4, 1500, native.max_values + 36
    logits = torch.randn(rows, total, generator=g) * 30 + torch.linspace(0, 200, total)  # the max keeps rising
    values = torch.rand(total, columns, generator=g) * 2 - 1
    calls = []
    weights_update = native.weights_update
    monkeypatch.setattr(native, "weights_update", lambda *a, **k: (calls.append(1), weights_update(*a, **k))[1])
    results = {}
    for name, lib in (("native", native), ("torch", None)):
        acc = OnlineSoftmaxAverage(base2=True, native=lib)
        for s, e in chunked(total, size):
            acc.update(logits[:, s:e].clone(), values[s:e])
        results[name] = acc.result()
    assert len(calls) == len(chunked(total, size))  # the native path ran every chunk
    want = torch.softmax(logits.double() * math.log(2), dim=1) @ values.double()
    assert (results["native"] - want).abs().max() < 1e-5
    assert (results["native"] - results["torch"]).abs().max() < 1e-5


@pytest.mark.parametrize("digits", range(1, MAX_DIGITS + 1))
def test_digit_sums_match_their_float64_combination(native, digits):
    """int8 kernels' form: quad + Σ_j c_j·sums_j from int32 sums (strided views, as gather
    passes them), natural logits; native and the torch fallback agree with float64."""
    g = torch.Generator().manual_seed(digits)
    n, batch, width, count = 6, 4, 808, 803  # width: count rounded up to 8, as int_mm pads
    sums = torch.randint(-2_000_000, 2_000_000, (n, digits * batch + 3, width), generator=g, dtype=torch.int32)
    view = sums[:, : digits * batch].view(n, digits, batch, width)
    quad = torch.randn(n, count, generator=g) * 20
    coefs = [3e-6 / 256**j for j in range(digits)][::-1]  # high digits weigh most
    values = torch.rand(n, count, generator=g)
    logits64 = quad.double().unsqueeze(1) + sum(coefs[j] * view[:, j, :, :count].double() for j in range(digits))
    want = softmax_average64(logits64, values.unsqueeze(1), False).T
    for lib in (native, None):
        acc = OnlineSoftmaxAverage(native=lib)
        acc.update_pixel_major_sums(quad, view, coefs, values, count, Workspace("cpu"))
        assert (acc.result() - want).abs().max() < 1e-5, lib


def test_native_and_torch_updates_share_one_state(native):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 2, 900, generator=g) * 40
    values = torch.rand(3, 900, generator=g)
    acc = OnlineSoftmaxAverage()
    for i, (s, e) in enumerate(chunked(900, 300)):
        acc.native = native if i % 2 == 0 else None
        acc.update_pixel_major(logits[:, :, s:e].contiguous(), values[:, s:e])
    want = softmax_average64(logits, values.unsqueeze(1), False).T
    assert (acc.result() - want).abs().max() < 1e-5


def test_bad_arguments_are_refused(native):
    with pytest.raises(ValueError, match="max state must be contiguous float64"):
        native.weights_update((torch.zeros(3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)), True,
                              torch.zeros(4, 10), 10, 1.0, 86.0)
    with pytest.raises(ValueError, match="logits must be torch.float32"):
        native.weights_update((torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)), True,
                              torch.zeros(4, 10, dtype=torch.float64), 10, 1.0, 86.0)
    state = tuple(torch.zeros(4, dtype=torch.float64) for _ in range(3))
    values = torch.rand(1, 1, 10)
    with pytest.raises(ValueError, match="logits must be torch.float32"):
        native.update(state, True, 1, 4, 10, values, 1.0, 86.0, logits=torch.zeros(4, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        native.update(state, True, 1, 4, 10, values, 1.0, 86.0, logits=torch.zeros(10, 4).T)
    with pytest.raises(ValueError, match="state sizes"):
        native.update(state, True, 2, 4, 10, values, 1.0, 86.0, logits=torch.zeros(8, 10))
    with pytest.raises(ValueError, match="digits"):
        native.update(state, True, 1, 4, 10, values, 1.0, 86.0, sums=torch.zeros(1, 6, 4, 10, dtype=torch.int32),
                      coefs=[1.0] * 6, quad=torch.zeros(1, 10))


def test_build_is_reused_and_a_damaged_library_is_rebuilt(tmp_path, caplog):
    from locality.models import native as native_module

    first = native_module._build(tmp_path / "a")
    libs = list((tmp_path / "a").glob("*.so"))
    assert len(libs) == 1 and first.path == libs[0]
    assert not list((tmp_path / "a").glob(".build-*")), "no temporary file left behind"
    stamp = libs[0].stat().st_mtime_ns
    assert native_module._build(tmp_path / "a").path == libs[0] and libs[0].stat().st_mtime_ns == stamp  # reused
    # a damaged file (an interrupted copy, a full disk) under the name a build would take: never
    # written over a loaded library, whose mapping it would break
    damaged = tmp_path / "b" / libs[0].name
    damaged.parent.mkdir()
    damaged.write_bytes(b"not a library")
    damaged.with_suffix(".flags").write_text("-fopenmp")
    with caplog.at_level(logging.WARNING, logger="locality.models.native"):
        again = native_module._build(tmp_path / "b")
    assert "cannot be loaded" in caplog.text and again.path == damaged
    state = tuple(torch.zeros(1, dtype=torch.float64) for _ in range(3))
    again.update(state, True, 1, 1, 3, torch.ones(1, 1, 3), 1.0, 86.0, logits=torch.zeros(1, 3))
    assert state[2].item() == pytest.approx(3.0) and state[1].item() == pytest.approx(3.0)


def test_without_a_compiler_the_torch_path_runs_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="locality.models.native"):
        assert load_native_softmax(tmp_path / "build") is None
    reason = native_unavailable_reason(tmp_path / "build")
    assert "no-such-cc" in reason and "torch softmax runs" in caplog.text


class _Decides(KernelTuner):
    def __init__(self, winner: str) -> None:
        super().__init__("cpu")
        self.winner = winner
        self.asked: list[str] = []

    def choose(self, key, candidates, total_images, total_samples, *probe_info):
        self.asked.append(key)
        assert set(candidates) == {"native", "torch"}
        for prepare in candidates.values():  # both probes run
            prepare(8, 2)()
        return Decision(self.winner, {}, 0, 0.0, "measured")


@pytest.mark.parametrize("winner", ["native", "torch"])
def test_the_measurement_decides(native, winner):
    tuner = _Decides(winner)
    got = measured_softmax(tuner, torch.float32)
    assert tuner.asked and (got is not None) == (winner == "native")
    assert measured_softmax(_Decides(winner), torch.float64) is None  # the float64 oracle stays on torch


@pytest.mark.parametrize("kernel", ["float32", "int8_intmm", "int8_gather"])
@pytest.mark.parametrize("t,threshold", [(900, 0.005), (300, 0.02), (100, 0.02)])
def test_pca_locality_kernels_through_native_match_float64(native, kernel, t, threshold):
    from locality.statistics import fit_statistics

    images = eight_bit(local_images(num=300, side=8))
    stats = fit_statistics(images, progress=False)
    x = noisy(images, t, count=3)
    want = pca_oracle(x, t, images, stats, threshold)
    for chunk in (None, 7):
        model = build_model("pca_locality", images, stats, mask_threshold=threshold, dtype=torch.float32,
                            dense_kernel=kernel, chunk_size=chunk, tuner=PreferKernel("native"))
        got = model(x, t).double().reshape(len(x), -1)
        assert model.training.native is not None
        assert (got - want).abs().max() < 1e-4, (kernel, chunk, model.last_kernel)


def test_sparse_step_matches_float64(native):
    """pca_locality's sparse form, fused: direct float64 differences over each output's mask
    ones (CSR, rows of 0 to 9 ones), softmax of the output value's own image values; chunked."""
    g = torch.Generator().manual_seed(11)
    n, batch, total, a, scale = 12, 3, 1300, 0.99, 400.0
    mask = torch.rand(n, n, generator=g) < 0.3
    mask[:, 4] = False  # an output without ones: uniform weights
    with warnings.catch_warnings():  # torch calls its CSR support beta (as plan_mask does)
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = mask.T.double().to_sparse_csr()
    x = torch.randn(batch, n, generator=g, dtype=torch.float64)
    y = torch.rand(n, total, generator=g, dtype=torch.float64) * 2 - 1
    diff = (x.T.unsqueeze(2) - a * y.unsqueeze(1)).square()  # [n_in, B, K]
    logits = -scale * torch.einsum("im,ibk->mbk", mask.double(), diff)
    want = (torch.softmax(logits, dim=2) * y.unsqueeze(1)).sum(2).T  # [B, n]
    for lib in (native, None):
        acc = OnlineSoftmaxAverage(native=lib)
        for s, e in chunked(total, 500):
            part = y[:, s:e].contiguous()
            acc.update_sparse(x, part, csr, a, scale,
                              lambda part=part: -scale * (csr @ (x.T.unsqueeze(2) - a * part.unsqueeze(1)).square()
                                                          .reshape(n, -1)).view(n, batch, -1))
        assert (acc.result() - want).abs().max() < 1e-5, lib


def test_a_direct_bias_of_log2_m_counts_a_candidate_m_times(native):
    """The direct kernel's per-candidate bias (els' merged duplicate windows): a candidate with
    bias log2(m) weighs what m copies of it do, over chunks, against float64."""
    g = torch.Generator().manual_seed(5)
    batch, dim, total, a, scale = 4, 9, 900, 0.98, 300.0
    x = torch.rand(batch, dim, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(dim, total, generator=g, dtype=torch.float64) * 2 - 1
    counts = torch.randint(1, 2000, (total,), generator=g)
    values = torch.rand(2, total, generator=g, dtype=torch.float64)
    logits = -scale * (x.unsqueeze(2) - a * y.unsqueeze(0)).square().sum(1) + counts.double().log()  # [B, K]
    want = (torch.softmax(logits, dim=1).unsqueeze(1) * values.unsqueeze(0)).sum(2)  # [B, 2]
    acc = OnlineSoftmaxAverage(base2=True, native=native)  # base-2 logits and bias, as els' search
    bias = counts.double().log2()
    for s, e in chunked(total, 256):
        acc.update_direct(x.unsqueeze(0), y[:, s:e].contiguous(), values[:, s:e].contiguous().unsqueeze(0), a,
                          scale * LOG2_E, bias=bias[s:e].contiguous())
    assert (acc.result() - want).abs().max() < 1e-5
    without = OnlineSoftmaxAverage(native=native)
    without.update_direct(x.unsqueeze(0), y, values.unsqueeze(0), a, scale)
    assert (without.result() - want).abs().max() > 1e-3  # the bias is not a no-op
    with pytest.raises(ValueError, match="bias"):
        OnlineSoftmaxAverage(native=native).update_direct(x.unsqueeze(0), y, values.unsqueeze(0), a, scale,
                                                          bias=bias[:10].contiguous())


class _Prefers(KernelTuner):
    def __init__(self, names: set[str]) -> None:
        super().__init__("cpu")
        self.names = names

    def choose(self, key, candidates, total_images, total_samples, *probe_info):
        for name in candidates:
            if name in self.names:
                return Decision(name, {}, 0, 0.0, "preferred by the test")
        return super().choose(key, candidates, total_images, total_samples, *probe_info)


def test_pca_locality_sparse_steps_through_native_match_float64(native):
    from locality.statistics import fit_statistics

    images = eight_bit(local_images(num=300, side=8))
    stats = fit_statistics(images, progress=False)
    for t, threshold in ((0, 0.02), (20, 0.05)):
        x = noisy(images, t, count=3)
        want = pca_oracle(x, t, images, stats, threshold)
        model = build_model("pca_locality", images, stats, mask_threshold=threshold, dtype=torch.float32,
                            chunk_size=50, tuner=_Prefers({"native", "sparse"}))
        got = model(x, t).double().reshape(len(x), -1)
        assert model.last_kernel == "sparse" and model.training.native is not None
        assert (got - want).abs().max() < 1e-4, t


@pytest.mark.parametrize("shape,patch,count", [((1, 7, 6), (3, 3), 50), ((3, 5, 5), (2, 2), 40), ((1, 6, 6), (1, 1), 33),
                                               ((2, 4, 5), (4, 4), 20), ((1, 5, 5), (5, 5), 17), ((1, 8, 8), (3, 3), 70),
                                               ((1, 6, 9), (2, 9), 16), ((2, 3, 4), (3, 4), 1)])
@pytest.mark.parametrize("t", [900, 300, 0])
def test_pspc_box_step_matches_the_formula(native, shape, patch, count, t):
    """pspc by box sums: windows of any size up to the image (one window: the optimal model),
    channels, non-square images, image counts that are not multiples of the kernel's blocks of
    16 (and a single image), every noise level: within 1e-6 of the SPEC formula in float64."""
    from locality.models.base import Denoiser
    from locality.models.oracle import pspc_oracle

    g = torch.Generator().manual_seed(count)
    y = torch.randint(0, 256, (count, *shape), generator=g).float() / 127.5 - 1
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    abar = Denoiser.alpha_bar(t)
    got = native.pspc_box_step(x, y, patch, math.sqrt(abar), 1 / (2 * (1 - abar)), 60 * 1.4426950408889634)
    if patch[0] == patch[1]:
        want = pspc_oracle(x, y, t, patch[0], mirror=False)
        assert (got - want).abs().max() < 1e-6
    else:  # the oracle's windows are square: the plain formula for ph × pw here
        a, s2 = math.sqrt(abar), 1 - abar
        h, w = shape[1:]
        total, cover = torch.zeros_like(x), torch.zeros(h, w, dtype=torch.float64)
        for r in range(h - patch[0] + 1):
            for c in range(w - patch[1] + 1):
                xr = x[:, :, r : r + patch[0], c : c + patch[1]].reshape(3, 1, -1)
                yr = y.double()[:, :, r : r + patch[0], c : c + patch[1]].reshape(1, count, -1)
                wts = torch.softmax(-(xr - a * yr).square().sum(-1) / (2 * s2), dim=1)
                total[:, :, r : r + patch[0], c : c + patch[1]] += (wts @ yr[0]).reshape(3, shape[0], *patch)
                cover[r : r + patch[0], c : c + patch[1]] += 1
        assert (got - total / cover).abs().max() < 1e-6


def test_pspc_box_step_refuses_bad_arguments(native):
    x, y = torch.zeros(2, 1, 5, 5, dtype=torch.float64), torch.zeros(4, 1, 5, 5)
    with pytest.raises(ValueError, match="does not fit"):
        native.pspc_box_step(x, y, (6, 5), 1.0, 1.0, 86.0)
    with pytest.raises(ValueError, match="float64"):
        native.pspc_box_step(x.float(), y, (3, 3), 1.0, 1.0, 86.0)
    with pytest.raises(ValueError, match="contiguous"):
        native.pspc_box_step(x, y.transpose(2, 3), (3, 3), 1.0, 1.0, 86.0)
