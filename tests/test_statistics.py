"""Statistics against numpy in float64; the content-keyed, atomic, self-checking cache."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from locality.statistics import (
    CorruptCacheError, cached_statistics, content_fingerprint, fit_statistics, load_statistics,
    statistics_cache_path,
)


def images(num=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num, 2, 3, 3, generator=g) * 2 - 1


def test_fit_matches_numpy_covariance():
    y = images()
    stats = fit_statistics(y, chunk_size=7, progress=False)
    flat = y.reshape(50, -1).double().numpy()
    np.testing.assert_allclose(stats.mean.numpy(), flat.mean(0), atol=1e-14)
    np.testing.assert_allclose(stats.covariance().numpy(), np.cov(flat, rowvar=False), atol=1e-12)
    assert stats.eigenvalues.dtype == torch.float64 and (stats.eigenvalues >= 0).all()
    assert stats.image_shape == (2, 3, 3) and stats.num_images == 50 and not stats.dead.any()


def test_dead_pixel_rule_zeroes_rows_and_columns():
    y = images()
    y[:, 0, 0, 0] = -1.0  # a pixel that never changes
    stats = fit_statistics(y, progress=False)
    assert stats.dead.tolist() == [True] + [False] * 17
    filt = stats.wiener_filter(0.5)
    assert filt[0].abs().sum() == 0 and filt[:, 0].abs().sum() == 0


def test_cache_is_keyed_by_content_and_reused(tmp_path):
    y = images()
    stats, hit = cached_statistics(y, tmp_path, "toy", "train", 3, None, progress=False)
    assert not hit
    again, hit = cached_statistics(y, tmp_path, "toy", "train", 3, None, progress=False)
    assert hit and torch.equal(again.eigenvectors, stats.eigenvectors)
    other = y.clone()
    other[0, 0, 0, 0] += 0.5  # same name, split, resolution: different content
    third, hit = cached_statistics(other, tmp_path, "toy", "train", 3, None, progress=False)
    assert not hit and third.fingerprint != stats.fingerprint
    subset, hit = cached_statistics(y[:20], tmp_path, "toy", "train", 3, 20, progress=False)
    assert not hit and subset.num_images == 20
    files = sorted(p.name for p in (tmp_path / "statistics").iterdir())
    assert len(files) == 3 and not any(name.endswith(".tmp") for name in files)


def test_corrupt_cache_is_detected_and_recomputed(tmp_path, caplog):
    y = images()
    stats, _ = cached_statistics(y, tmp_path, "toy", "train", 3, None, progress=False)
    path = statistics_cache_path(tmp_path, "toy", "train", 3, None, content_fingerprint(y))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CorruptCacheError):
        load_statistics(path)
    with caplog.at_level(logging.WARNING):
        again, hit = cached_statistics(y, tmp_path, "toy", "train", 3, None, progress=False)
    assert not hit and "recomputing" in caplog.text
    assert torch.equal(again.eigenvalues, stats.eigenvalues)
    assert load_statistics(path).fingerprint == stats.fingerprint  # rewritten whole


def test_unwritable_cache_is_a_warning_not_an_error(tmp_path, caplog):
    """A cache folder that cannot be written (here: a file in its place) loses nothing."""
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    y = images()
    with caplog.at_level(logging.WARNING):
        stats, hit = cached_statistics(y, blocked, "toy", "train", 3, None, progress=False)
    assert not hit and "could not write the statistics cache" in caplog.text
    assert torch.equal(stats.mean, fit_statistics(y, progress=False).mean)


def test_cache_with_flipped_bytes_fails_its_checksum(tmp_path):
    y = images()
    cached_statistics(y, tmp_path, "toy", "train", 3, None, progress=False)
    path = statistics_cache_path(tmp_path, "toy", "train", 3, None, content_fingerprint(y))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCacheError):
        load_statistics(path)


def test_fit_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        fit_statistics(torch.zeros(4, 9), progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        fit_statistics(torch.zeros(1, 1, 2, 2), progress=False)


def test_statistics_too_large_for_memory_are_refused_before_allocating(monkeypatch):
    """dataset.resolution=400 on Fashion-MNIST wanted a 205 GB covariance: the error names it."""
    import locality.models.memory as memory
    from locality.resources import InsufficientMemoryError

    monkeypatch.setattr(memory, "available_memory", lambda device: 12 * 2**30)
    big = torch.zeros(2, 1, 400, 400)  # 160 000 values: 4 float64 160 000² matrices
    with pytest.raises(InsufficientMemoryError, match=r"1×400×400 images \(160000 values each.* needs about "
                                                      r"762\.9 GiB \(819200000000 bytes\).*12\.0 GiB.*dataset.resolution"):
        fit_statistics(big, progress=False)

