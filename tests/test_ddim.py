"""The schedule, the DDIM timesteps and update, and the sampling pipeline against SPEC."""

from __future__ import annotations

import math

import pytest
import torch

from locality.sampling import sample
from locality.ddim import ddim_sample, ddim_step
from locality.schedule import alpha_bar, alphas_cumprod, ddim_timesteps, eps_from_x0, x0_from_eps


def test_schedule_matches_spec():
    abar = alphas_cumprod()
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert math.isclose(1 - abar[0].item(), 1e-4, rel_tol=1e-12)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert math.isclose(abar[900].item(), torch.prod(1 - betas[:901]).item(), rel_tol=1e-12)
    assert abs((1 - abar[900].item()) - 0.9997) < 1e-4
    assert alpha_bar(-100).item() == 1.0


def test_leading_timesteps():
    assert ddim_timesteps(10).tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert ddim_timesteps(3).tolist() == [666, 333, 0]
    assert ddim_timesteps(1).tolist() == [0]
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(0)


def test_conversions_invert_each_other():
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    a = float(alpha_bar(300))
    eps = eps_from_x0(x, x0, a)
    torch.testing.assert_close(x0_from_eps(x, eps, a), x0)
    torch.testing.assert_close(eps, (x - math.sqrt(a) * x0) / math.sqrt(1 - a))


def test_ddim_step_clamps_only_inside_the_update():
    x = torch.tensor([0.3, -2.0], dtype=torch.float64)
    x0 = torch.tensor([1.7, -0.2], dtype=torch.float64)  # 1.7 is outside [-1, 1]
    a, ap = float(alpha_bar(500)), float(alpha_bar(400))
    eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)  # from the unclamped x̂0
    expected = math.sqrt(ap) * x0.clamp(-1, 1) + math.sqrt(1 - ap) * eps
    torch.testing.assert_close(ddim_step(x, x0, 500, 400), expected)
    unclipped = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps
    torch.testing.assert_close(ddim_step(x, x0, 500, 400, clip_x0=False), unclipped)


def test_ddim_sample_follows_the_spec_loop_and_returns_the_last_prediction():
    calls = []

    def denoiser(x_t, t):  # any deterministic function of (x_t, t)
        calls.append(t)
        return torch.tanh(1.5 * x_t) * (1.5 + t / 1000)

    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    steps = ddim_timesteps(4)  # 750, 500, 250, 0
    out = ddim_sample(denoiser, x_T, steps)
    assert calls == [750, 500, 250, 0]
    x = x_T
    for i, t in enumerate(steps.tolist()):
        x0 = torch.tanh(1.5 * x) * (1.5 + t / 1000)
        a = float(alpha_bar(t))
        ap = float(alpha_bar(t - 250)) if t - 250 >= 0 else 1.0
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        x = math.sqrt(ap) * x0.clamp(-1, 1) + math.sqrt(1 - ap) * eps
    torch.testing.assert_close(out, x0)  # the last x̂0, not x after the last update
    assert (out.abs() > 1).any()  # not clamped: images are clamped only when written


def test_pipeline_noise_is_independent_of_batch_size():
    def denoiser(x_t, t):
        return 0.5 * x_t

    a = sample(denoiser, num_samples=5, image_shape=(1, 2, 2), num_steps=3, seed=7, batch_size=5)
    b = sample(denoiser, num_samples=5, image_shape=(1, 2, 2), num_steps=3, seed=7, batch_size=2,
               keep_trajectory=True)
    torch.testing.assert_close(a.samples, b.samples)
    assert b.timesteps == [666, 333, 0] and len(b.x_t) == 3 and b.x_t[0].shape == (5, 1, 2, 2)
    g = torch.Generator().manual_seed(7)
    torch.testing.assert_close(b.x_t[0], torch.randn((5, 1, 2, 2), generator=g, dtype=torch.float64).float())
    assert a.total_time_s >= 0 and len(a.step_times_s) == 3
