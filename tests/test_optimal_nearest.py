"""optimal and nearest_dataset: every kernel (run on purpose with PreferKernel) against the
float64 oracle, the measured choice among them, and the full Fashion-MNIST default. No timing
asserts."""

from __future__ import annotations

import pytest
import torch

from locality.models import build_model
from locality.models.oracle import nearest_oracle
from synthetic import PreferKernel, local_images, noisy, optimal_oracle_of


@pytest.fixture(scope="module")
def images():
    return local_images()


@pytest.mark.parametrize("t", [900, 300, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 7, 256, None])
@pytest.mark.parametrize("kernel", ["float64", "screened"])
def test_optimal_kernels_match_the_oracle(images, t, dtype, chunk, kernel):
    tuner = PreferKernel(kernel)
    model = build_model("optimal", images, None, dtype=dtype, chunk_size=chunk, tuner=tuner)
    x = noisy(images, t)
    got = model(x, t).double().reshape(len(x), -1)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    assert (got - optimal_oracle_of(x, t, images)).abs().max() < tol
    if dtype == torch.float64:
        assert tuner.seen == ["float64"] and model.last_kernel == "float64"  # the oracle dtype: one kernel
    elif t == 900:
        assert tuner.seen == ["float32"] and model.last_kernel == "float32"  # accurate enough: the only one
    elif t == 0:  # float32 is not: float64 and screened are both exact, the choice is measured
        assert tuner.seen == ["float64", "screened"] and model.last_kernel == kernel


def test_optimal_screening_falls_back_when_many_images_matter():
    """Nearly identical images all survive the float32 screen: the step runs in float64."""
    g = torch.Generator().manual_seed(4)
    base = torch.rand(1, 1, 4, 4, generator=g) * 2 - 1
    images = (base + 1e-3 * torch.randn(40, 1, 4, 4, generator=g)).float()
    model = build_model("optimal", images, None, dtype=torch.float32, tuner=PreferKernel("screened"))
    x = noisy(images, 0)
    got = model(x, 0).double().reshape(len(x), -1)
    assert model.last_kernel == "float64"
    assert (got - optimal_oracle_of(x, 0, images)).abs().max() < 1e-6


def test_optimal_rejects_a_temperature_that_is_not_a_positive_number(images):
    for tau in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="model.temperature must be a finite number > 0"):
            build_model("optimal", images, None, temperature=tau)


@pytest.mark.parametrize("kernel", ["expanded", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_nearest_kernels_return_the_oracles_winner(images, kernel, dtype, chunk):
    tuner = PreferKernel(kernel)
    model = build_model("nearest_dataset", images, None, dtype=dtype, chunk_size=chunk, tuner=tuner)
    for t in (900, 300, 0):
        x = noisy(images, t, count=4, seed=t)
        got = model(x, t)
        assert model.last_kernel == kernel and set(tuner.seen) == {"expanded", "direct"}
        want = nearest_oracle(x.reshape(4, -1), images.reshape(len(images), -1))
        assert torch.equal(got.double().reshape(4, -1), want)


@pytest.mark.parametrize("kernel", ["expanded", "direct"])
def test_nearest_ties_take_the_lowest_index(kernel):
    """Duplicated training images and a sample at equal distance from two different images."""
    a = torch.zeros(1, 1, 2, 2)
    b = torch.zeros(1, 1, 2, 2)
    a[..., 0, 0], b[..., 0, 0] = 1.0, -1.0
    images = torch.cat([b, a, a, b, torch.full((1, 1, 2, 2), 0.9)])  # 0 and 3 equal, 1 and 2 equal
    model = build_model("nearest_dataset", images, None, dtype=torch.float32, chunk_size=2,
                        tuner=PreferKernel(kernel))
    x = torch.cat([a, b, torch.zeros(1, 1, 2, 2)])  # the last is equally far from a and b
    got = model(x, 0)
    assert torch.equal(got[0], a[0]) and torch.equal(got[1], b[0])
    assert torch.equal(got[2], b[0])  # index 0 (b) before index 1 (a)
    want = nearest_oracle(x.reshape(3, -1), images.reshape(5, -1)).reshape(got.shape)
    assert torch.equal(got.double(), want)


def test_optimal_and_nearest_on_the_full_fashion_mnist(fmnist_train):
    """The app defaults on the benchmark setting: optimal within 1e-4 of float64 at every step
    (its float32 and low-noise kernels both exercised), nearest exactly the oracle's winner."""
    from locality.sampling import sample

    m64 = build_model("optimal", fmnist_train, None, dtype=torch.float64)
    m32 = build_model("optimal", fmnist_train, None, dtype=torch.float32)
    nearest = build_model("nearest_dataset", fmnist_train, None, dtype=torch.float32)
    result = sample(m64, num_samples=4, image_shape=(1, 28, 28), num_steps=10, seed=3, keep_trajectory=True)
    used = set()
    flat = fmnist_train.reshape(len(fmnist_train), -1)
    for i, t in enumerate(result.timesteps):
        diff = (m32(result.x_t[i], t) - result.x0_pred[i]).abs().max().item()
        used.add(m32.last_kernel)
        assert diff < 1e-4, f"t={t}: {diff} ({m32.last_kernel})"
        if i % 3 == 0:
            want = nearest_oracle(result.x_t[i].reshape(4, -1), flat)
            assert torch.equal(nearest(result.x_t[i], t).double().reshape(4, -1), want)
    assert "float32" in used and used & {"float64", "screened"}
