"""Memorization and diversity metrics (locality.analysis.memorization) and the run app's hook."""

from __future__ import annotations

import json
import math

import pytest
import torch

from locality.analysis.memorization import (
    memorization_metrics, nearest_grid_rows, nearest_training_images, record_memorization,
)


def _brute(samples, images):
    s = samples.double().clamp(-1, 1).flatten(1)
    y = images.double().flatten(1)
    d = torch.stack([torch.stack([(a - b).norm() for b in y]) for a in s])  # [S, N], one pair at a time
    order = d.argsort(dim=1, stable=True)
    return d, order


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_nearest_and_second_nearest_match_a_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(53, 1, 5, 5, generator=g) * 2 - 1
    samples = torch.rand(6, 1, 5, 5, generator=g) * 2.4 - 1.2  # some values outside [-1, 1]: clamped
    samples[2] = images[17] + 1e-3  # a near copy
    samples[4] = images[40]  # an exact copy
    d, order = _brute(samples, images)
    near = nearest_training_images(samples.clamp(-1, 1), images, chunk=chunk)
    assert near.index.tolist() == order[:, 0].tolist() and near.second_index.tolist() == order[:, 1].tolist()
    assert torch.allclose(near.distance, d.gather(1, order[:, :1]).squeeze(1), atol=1e-12)
    assert torch.allclose(near.second_distance, d.gather(1, order[:, 1:2]).squeeze(1), atol=1e-12)
    assert near.distance[4] == 0 and near.index[4] == 40 and near.index[2] == 17

    metrics, _ = memorization_metrics(samples, images)
    ratio = d.gather(1, order[:, :1]).squeeze(1) / d.gather(1, order[:, 1:2]).squeeze(1)
    assert metrics["memorization_ratio"] == pytest.approx(ratio.tolist(), abs=1e-12)
    assert metrics["memorization_copy_fraction"] == pytest.approx(float((ratio < 1 / 3).double().mean()))
    assert metrics["memorization_copy_fraction"] == pytest.approx(2 / 6)  # the two copies, no other
    assert metrics["memorization_nn_distance_mean"] == pytest.approx(float(d.min(1).values.mean()))
    s = samples.double().clamp(-1, 1).flatten(1)
    pairs = [float((s[i] - s[j]).norm()) for i in range(6) for j in range(6) if i != j]
    assert metrics["diversity_pairwise_distance_mean"] == pytest.approx(sum(pairs) / len(pairs))
    assert metrics["diversity_unique_nearest_fraction"] == len(set(order[:, 0].tolist())) / 6


def test_ties_take_the_lower_index_and_the_grid_pairs_rows():
    images = torch.zeros(4, 1, 2, 2)
    images[2] = 1.0
    near = nearest_training_images(torch.zeros(1, 1, 2, 2), images, chunk=1)
    assert near.index.tolist() == [0] and near.second_index.tolist() == [1] and near.ratio.tolist() == [0.0]
    samples = torch.full((5, 1, 2, 2), 0.9)
    rows = nearest_grid_rows(samples, images, nearest_training_images(samples, images), columns=3)
    assert rows.shape == (12, 1, 2, 2)  # 2 rows of samples, each followed by their nearest images
    assert torch.equal(rows[3:6], images[[2, 2, 2]]) and torch.equal(rows[6:8], samples[3:5])


def test_record_writes_the_nearest_grid(tmp_path):
    images = torch.rand(10, 1, 4, 4) * 2 - 1
    metrics = record_memorization(images[:3] + 0.01, images, tmp_path, columns=8)
    assert (tmp_path / "nearest.png").exists() and metrics["memorization_copy_fraction"] == 1.0
    assert record_memorization(images[:3], images[:1], tmp_path / "one", columns=8) == {}


@pytest.mark.slow
def test_every_run_reports_memorization(tmp_path):
    from conftest import run_app
    from mlflow.tracking import MlflowClient

    proc = run_app(["model=nearest_dataset", "dataset=gaussian_field", "dataset.num_images=30",
                    "dataset.resolution=6", "sampler.num_samples=3", "sampler.num_steps=2", "hardware=cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "runs").glob("*/*")
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "nearest.png").exists() and len(metrics["memorization_nn_distance"]) == 3
    # nearest_dataset returns training images: every sample is a copy at distance 0
    assert metrics["memorization_copy_fraction"] == 1.0 and metrics["memorization_nn_distance_mean"] == 0.0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (logged,) = client.search_runs([client.get_experiment_by_name("locality").experiment_id])
    assert logged.data.metrics["memorization_copy_fraction"] == 1.0
    assert "nearest.png" in {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert not math.isnan(logged.data.metrics["diversity_pairwise_distance_mean"])
