"""pca_locality's float and sparse kernels, bf16x6, the mask plan, the memory-derived chunks and
the softmax driver, against the float64 oracle of the SPEC formula on small data with masks
forced into each regime (the 8-bit kernels: test_pca_locality_8bit.py). No timing asserts."""

from __future__ import annotations

import pytest
import torch

from locality.models import build_model
from locality.models.pca_locality.plan import plan_mask
from locality.models.masks import locality_mask
from locality.models.memory import available_memory, chunk_rows, memory_budget
from locality.schedule import alpha_bar
from locality.statistics import fit_statistics
from synthetic import PreferKernel, local_images, noisy, pca_oracle



@pytest.fixture(scope="module")
def synth():
    images = local_images()
    return images, fit_statistics(images, progress=False)


@pytest.fixture(scope="module")
def fmnist_crop(fmnist_train):
    """An 8×8 centre crop of the first 120 real Fashion-MNIST images."""
    images = fmnist_train[:120, :, 8:16, 8:16].contiguous()
    return images, fit_statistics(images, progress=False)


# timestep, threshold -> the regime the plan must pick on the synthetic data
REGIMES = [(900, 0.005, "dense"), (500, 0.05, "dense"), (0, 0.3, "sparse"), (0, 0.9, "sparse"),
           (600, 0.0, "dense")]


@pytest.mark.parametrize("t,threshold,strategy", REGIMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 7, 256, None])
@pytest.mark.parametrize("path", ["sparse", "float32", "float64"])
def test_pca_paths_match_brute_force(synth, t, threshold, strategy, dtype, chunk, path):
    """Each kernel the step allows, run on purpose (PreferKernel), against the oracle."""
    images, stats = synth
    tuner = PreferKernel(path)
    model = build_model("pca_locality", images, stats, mask_threshold=threshold, dtype=dtype,
                        chunk_size=chunk, tuner=tuner)
    assert model.plan(t).strategy == strategy
    x = noisy(images, t)
    got = model(x, t).double().reshape(len(x), -1)
    want = pca_oracle(x, t, images, stats, threshold)
    assert (got - want).abs().max() < 1e-4
    assert ("sparse" in tuner.seen) == (strategy == "sparse")
    if dtype == torch.float64:
        assert set(tuner.seen) <= {"float64", "sparse"}  # the oracle dtype allows only float64 kernels
    if path in tuner.seen:
        assert model.last_kernel == path
    used, cdt = model.last_strategy
    assert used == ("sparse" if model.last_kernel == "sparse" else "dense")
    if dtype == torch.float64 or used == "sparse":
        assert cdt == torch.float64


def test_chunk_size_equal_to_n_and_independence(synth):
    images, stats = synth
    x = noisy(images, 300)
    outs = [build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float64,
                        chunk_size=c)(x, 300) for c in (1, 7, len(images))]
    for o in outs[1:]:
        assert (o - outs[0]).abs().max() < 1e-10


def test_low_noise_float32_falls_back_to_float64(synth):
    """t = 0 with a dense mask (θ = 0): the float32 bound fails, the step runs in float64."""
    images, stats = synth
    model = build_model("pca_locality", images, stats, mask_threshold=0.0, dtype=torch.float32)
    x = noisy(images, 0)
    got = model(x, 0).double().reshape(len(x), -1)
    assert model.last_strategy == ("dense", torch.float64)
    assert (got - pca_oracle(x, 0, images, stats, 0.0)).abs().max() < 1e-4


@pytest.mark.parametrize("t", [900, 400, 100, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pca_on_real_fmnist_crop(fmnist_crop, t, dtype):
    images, stats = fmnist_crop
    for threshold in (0.005, 0.05):
        model = build_model("pca_locality", images, stats, mask_threshold=threshold, dtype=dtype,
                            chunk_size=7)
        x = noisy(images, t, count=2)
        got = model(x, t).double().reshape(len(x), -1)
        assert (got - pca_oracle(x, t, images, stats, threshold)).abs().max() < 1e-4


def test_plan_sparse_mask_is_the_mask(synth):
    """The sparse kernel's CSR Mᵀ holds exactly the mask's ones (and dense plans have none)."""
    _, stats = synth
    mask = locality_mask(stats, float(alpha_bar(0)), 0.3)
    plan = plan_mask(mask, torch.device("cpu"))
    assert plan.strategy == "sparse"
    assert plan.sparse_t.layout == torch.sparse_csr
    assert plan.sparse_t.values().numel() == int((mask != 0).sum())
    assert torch.equal(plan.sparse_t.to_dense().T, mask)
    assert plan_mask(locality_mask(stats, float(alpha_bar(900)), 0.005), torch.device("cpu")).sparse_t is None


def test_memory_derived_chunk_sizes(monkeypatch):
    assert available_memory("cpu") > 0
    assert chunk_rows(1000, "cpu", override=5, total=100) == 5
    assert chunk_rows(1000, "cpu", override=500, total=100) == 100
    assert chunk_rows(10**12, "cpu") == 1  # never zero
    budget = memory_budget("cpu")
    assert chunk_rows(1024, "cpu") == budget // 1024
    import locality.models.memory as mem

    monkeypatch.setattr(mem, "_meminfo_available", lambda: None)
    assert mem.available_memory("cpu") == mem.FALLBACK_BUDGET_BYTES
    monkeypatch.setattr(mem, "_meminfo_available", lambda: 64 << 20)
    assert mem.memory_budget("cpu") == max(16 << 20, 1 << 20)
    with pytest.raises(ValueError):
        chunk_rows(10, "cpu", override=0)


def test_default_float32_matches_float64_on_the_full_fashion_mnist(fmnist_train):
    """The shipped default (model.dtype=float32, dense_kernel=auto: the int8 kernel on an
    AVX-512 CPU, else float32) and the float32 GEMM kernel on the benchmark setting: all 60 000
    images, θ = 0.005, every DDIM step, stay within 1e-4 of the float64 computation."""
    from locality.sampling import sample

    stats = fit_statistics(fmnist_train, progress=False)
    m64 = build_model("pca_locality", fmnist_train, stats, mask_threshold=0.005, dtype=torch.float64)
    result = sample(m64, num_samples=2, image_shape=(1, 28, 28), num_steps=10, seed=5, keep_trajectory=True)
    for kernel in ("auto", "float32"):
        m32 = build_model("pca_locality", fmnist_train, stats, mask_threshold=0.005, dtype=torch.float32,
                          dense_kernel=kernel)
        for i, t in enumerate(result.timesteps):
            x = result.x_t[i]
            diff = (m32(x, t) - result.x0_pred[i]).abs().max().item()
            assert diff < 1e-4, f"{kernel} t={t}: {diff} ({m32.last_kernel})"


def test_split_bf16x3_is_exact():
    """hi + mid + lo reproduces every float32 value exactly, across the exponent range."""
    from locality.models.pca_locality.bf16 import split_bf16x3

    g = torch.Generator().manual_seed(0)
    values = torch.randn(4096, generator=g) * torch.logspace(-30, 30, 4096)
    values = torch.cat([values, torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0e38, 1.0 + 2**-23])]).float()
    parts = split_bf16x3(values)
    assert parts.dtype == torch.bfloat16 and parts.shape == (3, len(values))
    assert torch.equal(parts.double().sum(0), values.double())
    with pytest.raises(TypeError):
        split_bf16x3(values.double())


@pytest.mark.parametrize("t,threshold", [(900, 0.005), (500, 0.05), (100, 0.02)])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_bf16x6_kernel_matches_brute_force(synth, t, threshold, chunk):
    """The tensor-core kernel's arithmetic (emulated exactly in float32 on the CPU)."""
    images, stats = synth
    model = build_model("pca_locality", images, stats, mask_threshold=threshold, dtype=torch.float32,
                        chunk_size=chunk, dense_kernel="bf16x6")
    x = noisy(images, t)
    got = model(x, t).double().reshape(len(x), -1)
    assert model.last_kernel in ("bf16x6", "float64")
    if t >= 500:
        assert model.last_kernel == "bf16x6"
    assert (got - pca_oracle(x, t, images, stats, threshold)).abs().max() < 1e-4


def test_bf16x6_kernel_on_real_fmnist_crop(fmnist_crop):
    images, stats = fmnist_crop
    for t in (900, 400, 100):
        model = build_model("pca_locality", images, stats, mask_threshold=0.005, dtype=torch.float32,
                            chunk_size=7, dense_kernel="bf16x6")
        x = noisy(images, t, count=2)
        got = model(x, t).double().reshape(len(x), -1)
        assert (got - pca_oracle(x, t, images, stats, 0.005)).abs().max() < 1e-4


def test_bf16x6_needs_a_binary_mask_and_valid_names(synth):
    images, stats = synth
    model = build_model("pca_locality", images, stats, mask_threshold=0.0, dtype=torch.float32,
                        dense_kernel="bf16x6")
    with pytest.raises(ValueError, match="bf16x6 needs a binary mask"):
        model(noisy(images, 900), 900)
    auto = build_model("pca_locality", images, stats, mask_threshold=0.0, dtype=torch.float32)
    auto(noisy(images, 900), 900)
    assert auto.last_kernel == "float32"  # CPU, not 8-bit data: auto is the float32 GEMM
    with pytest.raises(ValueError, match="dense_kernel must be one of auto, float32, bf16x6, bf16x3, int8, "
                                         "int8_onednn, int8_intmm"):
        build_model("pca_locality", images, stats, dense_kernel="tf32")


def test_bf16x6_sample_groups(synth, monkeypatch):
    """Samples split into groups when the split weights exceed the memory budget: same result."""
    import locality.models.pca_locality.bf16 as bf16

    images, stats = synth
    x = noisy(images, 700, count=5)
    want = pca_oracle(x, 700, images, stats, 0.02)
    monkeypatch.setattr(bf16, "memory_budget", lambda device: 48 * 36 * 36 * 2)  # 2 samples a group
    model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32,
                        dense_kernel="bf16x6", chunk_size=11)
    got = model(x, 700).double().reshape(len(x), -1)
    assert model.last_kernel == "bf16x6"
    assert (got - want).abs().max() < 1e-4


def test_bf16x6_memory_rule():
    """auto takes bf16x6 only where the split images and one sample's weights fit half the free memory."""
    from locality.models.pca_locality.bf16 import bf16x6_fits

    assert bf16x6_fits(784, 60000, 80 << 30)  # Fashion-MNIST on an 80 GB card: 1.0 GB + 16 MB
    assert bf16x6_fits(12288, 30000, 70 << 30)  # CelebA 64 px: 8.1 GB + 3.9 GB
    assert not bf16x6_fits(49152, 30000, 70 << 30)  # 128 px: 32 GB + 63 GB
    n, num = 3072, 50000
    need = 22 * num * n + 26 * n * n
    assert bf16x6_fits(n, num, 2 * need) and not bf16x6_fits(n, num, 2 * need - 2)


def test_max_weighted_column_sum_rounds_up(synth):
    """The int8 estimate's Σ_n M|x''| from the float32 mask: never below the float64 value."""
    _, stats = synth
    plan = plan_mask(locality_mask(stats, float(alpha_bar(500)), 0.02), torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    weights = torch.rand(4, plan.source.shape[0], generator=g, dtype=torch.float64) * 3
    exact = float((weights @ plan.source).max())
    got = plan.max_weighted_column_sum(weights)
    assert exact <= got <= exact * (1 + 1e-4)


@pytest.mark.parametrize("group", [1, 2, 5, 9])
def test_softmax_average_in_groups_is_the_one_chunk_softmax(group):
    """The shared driver of every kernel: samples in groups, images in chunks, one result."""
    from locality.models.softmax import softmax_average_in_groups

    g = torch.Generator().manual_seed(4)
    n, batch, num = 3, 5, 23
    logits = torch.randn(n, batch, num, generator=g, dtype=torch.float64) * 30
    values = torch.randn(n, num, generator=g, dtype=torch.float64)
    want = (torch.softmax(logits, dim=2) * values.unsqueeze(1)).sum(2).T  # [B, n]
    x = torch.arange(batch)  # the samples' indices stand in for the samples

    def chunks_of(xs):
        for start in range(0, num, 7):
            yield logits[:, xs, start : start + 7].clone(), values[:, start : start + 7]

    got = softmax_average_in_groups(x, group, chunks_of)
    assert got.shape == (batch, n)
    assert (got - want).abs().max() < 1e-12
    with pytest.raises(ValueError, match="group must be at least 1"):
        softmax_average_in_groups(x, 0, chunks_of)


def test_share_masks_builds_each_mask_once(synth):
    """The bench's rival kernel reads the first model's masks; other statistics are refused."""
    images, stats = synth
    first = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32)
    rival = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float64)
    rival.share_masks(first)
    assert rival.plan(700) is first.plan(700)
    assert first.planned_strategies() == {700: "dense"}
    other = build_model("pca_locality", images, stats, mask_threshold=0.05)
    with pytest.raises(ValueError, match="same statistics, mask_threshold and device"):
        other.share_masks(first)
