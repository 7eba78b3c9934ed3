"""Sensitivity fields (locality.analysis.sensitivity) against autograd through float64 brute
forces of the formulas, the UNet's against finite differences, and the numbers of a field."""

from __future__ import annotations

import math

import pytest
import torch

from locality.analysis import sensitivity as sens
from locality.models import build_model
from locality.models.oracle import optimal_oracle, pca_locality_oracle, wiener_oracle
from locality.models.masks import locality_mask
from locality.schedule import alpha_bar
from locality.statistics import fit_statistics
from synthetic import eight_bit, local_images, noisy

PIXELS = [(0, 3, 3), (0, 0, 2), (0, 5, 0)]


def autograd_row(fn, x: torch.Tensor, pixel) -> torch.Tensor:
    """∂fn(x)[pixel]/∂x [B, C, H, W] by autograd; fn maps x [B, C, H, W] float64 to the same shape."""
    x = x.detach().double().requires_grad_(True)
    c, i, j = pixel
    (grad,) = torch.autograd.grad(fn(x)[:, c, i, j].sum(), x)
    return grad


@pytest.fixture(scope="module")
def data():
    images = eight_bit(local_images(seed=3, num=40, side=6))
    return images, fit_statistics(images)


@pytest.mark.parametrize("t", [900, 500, 100, 0])
@pytest.mark.parametrize("pixel", PIXELS)
def test_wiener_closed_form_is_the_gradient_of_the_oracle(data, t, pixel):
    images, stats = data
    x = noisy(images, t, count=2)
    abar = float(alpha_bar(t))
    model = build_model("wiener", images, stats)
    want = autograd_row(lambda z: wiener_oracle(z.flatten(1), stats.mean, stats.wiener_filter(abar), abar)
                        .reshape(z.shape), x, pixel)
    assert torch.allclose(sens.sensitivity_field(model, x, t, pixel), want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("t", [900, 100, 0])
@pytest.mark.parametrize("pixel", PIXELS)
def test_pca_locality_streamed_gradient_matches_autograd_through_the_oracle(data, threshold, t, pixel, monkeypatch):
    images, stats = data
    monkeypatch.setattr(sens, "CHUNK_BYTES", 8 * 36 * 7)  # chunks of 7 images: the online softmax is exercised
    x = noisy(images, t, count=3)
    abar = float(alpha_bar(t))
    mask = locality_mask(stats, abar, threshold)
    model = build_model("pca_locality", images, stats, mask_threshold=threshold, temperature=0.7)
    want = autograd_row(lambda z: pca_locality_oracle(z.flatten(1), images.flatten(1), mask, abar, 0.7)
                        .reshape(z.shape), x, pixel)
    got = sens.sensitivity_field(model, x, t, pixel)
    scale = float(want.abs().max())
    assert scale > 0
    assert (got - want).abs().max() <= 1e-9 * max(1.0, scale)
    if threshold > 0:  # the field lives on the mask column's support
        m = (pixel[1] * 6 + pixel[2])
        assert torch.all(got.flatten(1)[:, mask[:, m] == 0] == 0)


@pytest.mark.parametrize("t", [900, 300, 0])
@pytest.mark.parametrize("pixel", PIXELS)
def test_optimal_streamed_gradient_matches_autograd_through_the_oracle(data, t, pixel, monkeypatch):
    images, _ = data
    monkeypatch.setattr(sens, "CHUNK_BYTES", 8 * 36 * 5)
    x = noisy(images, t, count=3)
    abar = float(alpha_bar(t))
    model = build_model("optimal", images, None, temperature=1.3)
    want = autograd_row(lambda z: optimal_oracle(z.flatten(1), images.flatten(1), abar, 1.3).reshape(z.shape),
                        x, pixel)
    got = sens.sensitivity_field(model, x, t, pixel)
    assert float(want.abs().max()) > 0 or t == 0
    assert (got - want).abs().max() <= 1e-9 * max(1.0, float(want.abs().max()))


def test_the_streamed_gradient_is_not_trivially_right(data):
    """A wrong sign or scale in the covariance would be caught: fields of different pixels and
    steps differ, and the by-product x̂0 equals the model's output."""
    images, stats = data
    x = noisy(images, 500, count=2)
    model = build_model("optimal", images, None)
    flat = images.flatten(1).double()
    _, x0 = sens.softmax_covariance(x.flatten(1).double(), [(flat[:, 7], flat)], math.sqrt(float(alpha_bar(500))),
                                    2 * (1 - float(alpha_bar(500))))
    assert torch.allclose(x0, model(x.double(), 500).flatten(1)[:, 7].double(), atol=1e-6)
    a = sens.sensitivity_field(model, x, 500, (0, 3, 3))
    b = sens.sensitivity_field(model, x, 500, (0, 0, 2))
    assert (a - b).abs().max() > 1e-3


ELS = [("borders", 3), ("borders", 5), ("borders", 9), ("circular", 3), ("circular", 5), ("local", 3)]


@pytest.mark.parametrize("variant,k", ELS)
@pytest.mark.parametrize("t", [700, 100])
def test_els_streamed_gradient_matches_autograd_through_the_brute_force(variant, k, t, monkeypatch):
    from locality.models.oracle import els_oracle
    from synthetic import small_data

    monkeypatch.setattr(sens, "CHUNK_BYTES", 8 * 400)  # a few images per chunk
    y, x = small_data(seed=2, shape=(2, 7, 6), num=4, batch=2)
    model = build_model("els", y, None, patch_sizes=k, num_steps=10, variant=variant, dtype=torch.float64)
    for pixel in [(0, 3, 2), (1, 0, 0), (0, 6, 4), (1, 1, 5)]:
        want = autograd_row(lambda z: els_oracle(z, y, t, k, variant), x, pixel)
        got = sens.sensitivity_field(model, x, t, pixel)
        assert (got - want).abs().max() <= 1e-9 * max(1.0, float(want.abs().max())), (pixel, variant, k)


@pytest.mark.parametrize("p,mirror", [(3, True), (4, False), (9, True)])
@pytest.mark.parametrize("t", [600, 100])
def test_pspc_streamed_gradient_matches_autograd_through_the_brute_force(p, mirror, t):
    from locality.models.oracle import pspc_oracle
    from synthetic import small_data

    y, x = small_data(seed=4, shape=(2, 7, 6), num=4, batch=2)
    model = build_model("pspc", y, None, patch_sizes=p, num_steps=10, mirror=mirror, dtype=torch.float64)
    for pixel in [(0, 3, 2), (1, 0, 0), (0, 6, 5)]:
        want = autograd_row(lambda z: pspc_oracle(z, y, t, p, mirror), x, pixel)
        got = sens.sensitivity_field(model, x, t, pixel)
        assert (got - want).abs().max() <= 1e-9 * max(1.0, float(want.abs().max())), (pixel, p, mirror)


def test_unet_field_matches_finite_differences():
    from locality.models.unet_denoiser import UNetDenoiser
    from locality.unet.network import UNet
    from synthetic import TINY_UNET as TINY

    torch.manual_seed(0)
    unet = UNetDenoiser(UNet(**TINY).double().eval())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    pixel = (0, 4, 3)
    got = sens.sensitivity_field(unet, x, 300, pixel)
    eps = 1e-6
    want = torch.zeros_like(x)
    for n in range(64):  # central differences, one input value at a time
        e = torch.zeros(64, dtype=torch.float64)
        e[n] = eps
        e = e.reshape(1, 1, 8, 8)
        want.view(2, -1)[:, n] = (unet(x + e, 300)[:, 0, 4, 3] - unet(x - e, 300)[:, 0, 4, 3]) / (2 * eps)
    assert float(want.abs().max()) > 1e-3
    assert torch.allclose(got, want, atol=1e-6 * float(want.abs().max()), rtol=1e-5)


def test_numbers_of_a_field():
    field = torch.zeros(1, 9, 9)
    field[0, 4, 4] = 5.0
    field[0, 4, 6] = 4.0  # distance 2
    field[0, 0, 4] = 1.0  # distance 4: 10 % of the mass
    assert sens.mass_radius(field, (4, 4)) == 2.0
    assert sens.mass_radius(field, (4, 4), fraction=0.95) == 4.0
    assert math.isnan(sens.mass_radius(torch.zeros(1, 3, 3), (1, 1)))
    assert sens.field_correlation(field, 2 * field + 1) == pytest.approx(1.0)
    assert sens.field_correlation(field, -field) == pytest.approx(-1.0)
    other = torch.zeros(1, 9, 9)
    other[0, 4, 4], other[0, 2, 2] = 1.0, 1.0
    assert sens.support_iou(field, other, 0.1) == pytest.approx(1 / 4)  # {44}, of {44, 46, 04, 22}
    assert sens.support_iou(field, other, 0.5) == pytest.approx(1 / 3)  # {44, 46} vs {44, 22}
    assert sens.default_pixels(28, 28) == [(14, 14), (14, 2)]


def test_unknown_model_and_bad_pixel_are_clear_errors(data):
    images, stats = data
    model = build_model("wiener", images, stats)
    with pytest.raises(ValueError, match="lies outside the 1×6×6 image"):
        sens.sensitivity_field(model, images[:1], 10, (0, 6, 0))

    class Other:
        name = "mystery"

    with pytest.raises(ValueError, match="no sensitivity field for model 'mystery'; fields exist for"):
        sens.sensitivity_field(Other(), images[:1], 10, (0, 1, 1))
