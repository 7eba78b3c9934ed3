"""Comparison with the baseline UNet: metrics, per-step orchestration, and the run app end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_dirs, run_on_mnist
from data_factories import write_mnist_like
from synthetic import TINY_UNET
from locality.app.baseline import default_checkpoint_path
from locality.unet_comparison import METRIC_NAMES, compare_with_unet
from locality.metrics import StepAverages, mse_per_image, r2_per_image
from locality.models import build_model
from locality.models.unet_denoiser import UNetDenoiser
from locality.sampling import sample
from locality.unet.checkpoint import save_unet_checkpoint
from locality.unet.network import UNet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is fastest, and immune to a busy machine's oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- metrics


def test_metrics_hand_computed() -> None:
    u = torch.tensor([[0.0, 1.0, 2.0], [2.0, 2.0, 2.0]])  # var (unbiased) 1, and 0 -> taken as 1
    a = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    # image 0: Σ(a-u)² = 1 + 0 + 1 = 2, n = 3, var = 1 -> R² = 1 - 2/3; MSE = 2/3
    # image 1: Σ(a-u)² = 2, var = 0 -> 1 -> R² = 1 - 2/3; MSE = 2/3
    assert torch.allclose(r2_per_image(a, u), torch.tensor([1 / 3, 1 / 3], dtype=torch.float64))
    assert torch.allclose(mse_per_image(a, u), torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))
    # var = 4 (unbiased of 0, 2, 4), image-shaped input [B, C, H, W]
    u2 = torch.tensor([0.0, 2.0, 4.0, 2.0]).reshape(1, 1, 2, 2)  # mean 2, Σ(u-2)² = 8, var = 8/3
    a2 = torch.tensor([0.0, 2.0, 4.0, 4.0]).reshape(1, 1, 2, 2)  # Σ(a-u)² = 4, n = 4
    assert r2_per_image(a2, u2).item() == pytest.approx(1 - 4 / (4 * 8 / 3))
    assert mse_per_image(a2, u2).item() == pytest.approx(1.0)
    assert r2_per_image(u2, u2).item() == 1.0
    # not symmetric: the UNet's (second argument's) variance is the denominator
    assert r2_per_image(u2, a2).item() != pytest.approx(r2_per_image(a2, u2).item())
    with pytest.raises(ValueError):
        r2_per_image(a, u[:1])


def test_step_averages_average_over_images_across_batches() -> None:
    acc = StepAverages(2)
    acc.add(0, torch.tensor([1.0, 2.0]))
    acc.add(0, torch.tensor([6.0]))
    acc.add(1, torch.tensor([4.0]))
    assert acc.means() == [3.0, 4.0]
    assert StepAverages(1).means()[0] != StepAverages(1).means()[0]  # nan without data


# --------------------------------------------------------------------------- orchestration


@pytest.fixture(scope="module")
def tiny_unet() -> UNetDenoiser:
    torch.manual_seed(0)
    return UNetDenoiser(UNet(**TINY_UNET).eval())


def test_comparison_matches_separate_runs(tiny_unet: UNetDenoiser, tmp_path: Path) -> None:
    images = torch.rand(10, 1, 8, 8) * 2 - 1
    model = build_model("optimal", images, None, temperature=1.0, dtype=torch.float64, chunk_size=None,
                        device=torch.device("cpu"))
    kw = dict(num_samples=5, image_shape=(1, 8, 8), num_steps=4, seed=3)
    result, cmp = compare_with_unet(model, tiny_unet, batch_size=2, grid_images=3, **kw)
    # The same analytical run as without the hook, and the UNet trajectory from the same noise.
    ref = sample(model, batch_size=5, keep_trajectory=True, **kw)
    unet = sample(tiny_unet, batch_size=5, keep_trajectory=True, **kw)
    assert torch.equal(result.samples, ref.samples)
    per_step = cmp.per_step()
    for i, t in enumerate(ref.timesteps):
        a = ref.x0_pred[i]
        single = tiny_unet(ref.x_t[i], t)
        assert per_step["r2_vs_unet"][i] == pytest.approx(r2_per_image(a, unet.x0_pred[i]).mean().item(), abs=1e-6)
        assert per_step["mse_vs_unet"][i] == pytest.approx(mse_per_image(a, unet.x0_pred[i]).mean().item(), abs=1e-6)
        assert per_step["r2_vs_unet_single"][i] == pytest.approx(r2_per_image(a, single).mean().item(), abs=1e-6)
        assert per_step["mse_vs_unet_single"][i] == pytest.approx(mse_per_image(a, single).mean().item(), abs=1e-6)
    metrics = cmp.metrics()
    for name in METRIC_NAMES:
        assert metrics[f"{name}_final"] == per_step[name][-1]
        assert len(metrics[f"{name}_per_step"]) == 4
    assert metrics["comparison_num_images"] == 5 and metrics["comparison_timesteps"] == ref.timesteps
    assert torch.allclose(torch.cat(cmp.unet_samples), unet.samples, atol=1e-5)
    # grids: rows analytical / UNet single step / UNet trajectory, 3 images each
    assert torch.allclose(cmp.grid_rows(1)[:3], ref.x0_pred[1][:3].float(), atol=1e-6)
    assert torch.allclose(cmp.grid_rows(1)[6:], unet.x0_pred[1][:3], atol=1e-5)
    written = cmp.save_grids(tmp_path / "comparison")
    assert len(written) == 5 and all(p.exists() for p in written)
    w, h = Image.open(written[0]).size
    assert (w, h) == (3 * 10 + 2, 3 * 10 + 2)  # 3 columns, 3 rows of 8 px + 2 px padding
    logged = []
    cmp.log_steps(lambda m, step: logged.append((step, m)))
    assert [s for s, _ in logged] == [0, 1, 2, 3] and set(logged[0][1]) == set(METRIC_NAMES)


def test_unet_against_itself_is_perfect(tiny_unet: UNetDenoiser) -> None:
    _, cmp = compare_with_unet(tiny_unet, tiny_unet, num_samples=3, image_shape=(1, 8, 8), num_steps=3,
                               batch_size=2)
    for name, values in cmp.per_step().items():
        expected = 1.0 if name.startswith("r2") else 0.0
        assert values == pytest.approx([expected] * 3, abs=1e-9)


# --------------------------------------------------------------------------- run app end to end


@pytest.mark.slow
def test_run_app_compares_with_unet(tmp_path: Path) -> None:
    import mlflow

    write_mnist_like(tmp_path / "datasets", folder_name="MNIST", n_train=12, seed=1)
    torch.manual_seed(1)
    # the auto default: the dataset's file under the data root (a tiny custom architecture,
    # rebuilt from the stored unet_config)
    ckpt = save_unet_checkpoint(default_checkpoint_path(tmp_path / "models", "mnist"), UNet(**TINY_UNET).eval())
    steps = 3
    proc = run_on_mnist(["model=optimal", "sampler.num_samples=3", "sampler.batch_size=2",
                     f"sampler.num_steps={steps}", "baseline.grid_images=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = run_dirs(tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    for name in METRIC_NAMES:
        assert -1e6 < metrics[f"{name}_final"] <= 1e6
        assert len(metrics[f"{name}_per_step"]) == steps
        assert metrics[f"{name}_per_step"][-1] == metrics[f"{name}_final"]
    assert len(list((out / "comparison").glob("step_*.png"))) == steps
    assert (out / "comparison" / "unet_samples.png").exists()

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["locality"])
    assert len(runs) == 1 and runs.loc[0, "status"] == "FINISHED"
    for name in METRIC_NAMES:
        assert runs.loc[0, f"metrics.{name}_final"] == pytest.approx(metrics[f"{name}_final"])
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(runs.loc[0, "run_id"], "r2_vs_unet")
    assert sorted(m.step for m in history) == list(range(steps))
    artifacts = [f.path for f in client.list_artifacts(runs.loc[0, "run_id"], "comparison")]
    assert any(p.endswith("unet_samples.png") for p in artifacts)

    # model=unet on the baseline checkpoint itself: samples, and skips comparing with itself
    proc = run_on_mnist(["model=unet", "sampler.num_samples=2", "sampler.num_steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_unet = [d for d in run_dirs(tmp_path) if d != out][0]
    assert "r2_vs_unet_final" not in json.loads((out_unet / "metrics.json").read_text())
    assert "no comparison with the UNet" in (out_unet / "run.log").read_text()
    assert ckpt.exists()


@pytest.mark.slow
def test_run_app_missing_unet_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "datasets", folder_name="MNIST", n_train=12, seed=1)
    proc = run_on_mnist(["model=unet", "sampler.num_samples=2", "sampler.num_steps=2"], tmp_path)
    assert proc.returncode == 2
    where = default_checkpoint_path(tmp_path / "models", "mnist")
    assert str(where) in proc.stderr
    assert "download_baselines.py" in proc.stderr and "python -m locality.train" in proc.stderr
