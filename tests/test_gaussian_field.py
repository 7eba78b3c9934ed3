"""dataset=gaussian_field: generated stationary Gaussian fields (locality.data.gaussian_field)."""

from __future__ import annotations

import math

import pytest
import torch

from locality.data import load_dataset
from locality.data.gaussian_field import FIELD_STD, field_covariance, gaussian_fields


def _load(**options):
    split = options.pop("split", "train")
    subset = options.pop("subset_size", None)
    resolution = options.pop("resolution", 8)
    return load_dataset("gaussian_field", root="/nonexistent", split=split, resolution=resolution,
                        subset_size=subset, options=options)


def test_empirical_covariance_matches_the_target_within_sampling_error():
    """Fixed seed: every entry of the empirical covariance of 4000 8×8 fields is within 5 standard
    errors of σ² exp(-d²/2ℓ²) (the standard error of a sample covariance is √((S_pp S_qq + S_pq²)/N));
    a field of another correlation length is far off (the test can fail)."""
    n_img, ell = 4000, 2.0
    images = _load(correlation_length=ell, num_images=n_img, seed=3).double().reshape(n_img, -1)
    target = field_covariance(8, ell)
    emp = torch.cov(images.T)
    var = torch.diagonal(target)
    stderr = ((var[:, None] * var[None, :] + target.square()) / n_img).sqrt()
    # quantisation (+5e-6 variance) and clipping at ±3σ (-0.3 % of variance) are far inside this
    assert ((emp - target).abs() / stderr).max() < 5.0
    assert images.mean(0).abs().max() < 5 * FIELD_STD / math.sqrt(n_img)
    other = field_covariance(8, 3.0)
    assert ((emp - other).abs() / stderr).max() > 10.0


def test_eight_bit_values_deterministic_splits_and_subsets():
    a = _load(correlation_length=1.5, num_images=50, seed=7)
    q = torch.round((a.double() + 1) * 127.5)
    assert torch.allclose(a.double(), (2 * q - 255) / 255, atol=1e-6)  # (2q - 255)/255, like the real datasets
    assert torch.equal(a, _load(correlation_length=1.5, num_images=50, seed=7))
    assert torch.equal(a[:20], _load(correlation_length=1.5, num_images=50, seed=7, subset_size=20))
    assert not torch.equal(a, _load(correlation_length=1.5, num_images=50, seed=8))
    test = _load(correlation_length=1.5, num_images=50, seed=7, split="test")
    assert test.shape == a.shape and not torch.equal(test, a)
    rgb = _load(correlation_length=1.5, num_images=5, channels=3, resolution=6)
    assert rgb.shape == (5, 3, 6, 6)


@pytest.mark.parametrize("options,match", [
    ({"correlation_length": 0}, "dataset.correlation_length must be a positive number"),
    ({"num_images": 0}, "dataset.num_images must be a positive integer"),
    ({"num_images": 5, "subset_size": 6}, "dataset.subset_size=6 is invalid"),
])
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        _load(**options)


def test_run_app_config_composes_and_loads(tmp_path):
    from conftest import compose
    from locality.app.settings import load_training_images

    cfg = compose(["dataset=gaussian_field", "dataset.num_images=12", "dataset.resolution=6",
                   "dataset.correlation_length=1.0", "dataset.channels=3"])
    images = load_training_images(cfg)
    assert images.shape == (12, 3, 6, 6)
    assert torch.equal(images, (gaussian_fields(12, 3, 6, 1.0).float() / 255 - 0.5) / 0.5)
    assert cfg.model.mask_threshold == 0.02
