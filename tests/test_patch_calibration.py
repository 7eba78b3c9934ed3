"""Patch-size calibration (locality.patch_calibration, python -m locality.calibrate)."""

from __future__ import annotations

import json

import pytest
import torch

from locality.patch_calibration import calibrate_patch_sizes, criterion_values
from locality.models import build_model


def _images(seed: int = 0, num: int = 6, shape=(1, 8, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, *shape), generator=g).double() / 127.5 - 1


@pytest.mark.parametrize("name,truth", [("els", [7, 5, 3, 1]), ("pspc", [8, 2, 5, 3])])
@pytest.mark.parametrize("criterion", ["mse", "score_cosine"])
def test_calibration_recovers_the_sizes_of_a_known_network(name, truth, criterion):
    """Against a 'network' that is the model itself with known per-step sizes, the calibration
    finds exactly those sizes at their own steps (the authors' code stored step i's size at
    i - 1: that would put 5 where 7 belongs here)."""
    images = _images()
    network = build_model(name, images, None, patch_sizes=truth, num_steps=4)
    model = build_model(name, images, None, patch_sizes=1, num_steps=4)
    candidates = [1, 3, 5, 7] if name == "els" else [1, 2, 3, 5, 8]
    result = calibrate_patch_sizes(model.denoise_at, network, (1, 8, 8), 4, candidates, seeds=[0, 1],
                                   num_samples=3, criterion=criterion)
    assert result.timesteps == [750, 500, 250, 0]
    assert result.chosen == truth
    best = [min(row) if criterion == "mse" else max(row) for row in result.medians()]
    assert best == pytest.approx([0.0] * 4 if criterion == "mse" else [1.0] * 4, abs=1e-9)


def test_criteria_by_hand():
    x_t = torch.tensor([[[[1.0, 0.0]]]])
    ref = torch.tensor([[[[1.0, 1.0]]]])
    x0 = torch.tensor([[[[0.0, 1.0]]]])
    assert criterion_values("mse", x0, ref, x_t, 0.5).item() == pytest.approx(0.5)
    # scores ∝ a·x̂0 - x_t: (-1, a) against (a - 1, a)
    a = 0.5**0.5
    want = (-(a - 1) + a * a) / ((1 + a * a) ** 0.5 * ((a - 1) ** 2 + a * a) ** 0.5)
    assert criterion_values("score_cosine", x0, ref, x_t, 0.5).item() == pytest.approx(want)
    with pytest.raises(ValueError, match="calibrate.criterion must be one of mse, score_cosine"):
        criterion_values("cosine", x0, ref, x_t, 0.5)


@pytest.mark.slow
def test_calibrate_app_writes_a_preset_the_run_app_takes(tmp_path):
    from conftest import run_dirs
    from synthetic import TINY_UNET
    from conftest import REPO
    from data_factories import write_mnist_like
    from locality.app.baseline import default_checkpoint_path
    from locality.unet.checkpoint import save_unet_checkpoint
    from locality.unet.network import UNet
    import os
    import subprocess
    import sys

    write_mnist_like(tmp_path / "datasets", folder_name="MNIST", n_train=12, seed=1)
    torch.manual_seed(1)
    save_unet_checkpoint(default_checkpoint_path(tmp_path / "models", "mnist"), UNet(**TINY_UNET).eval())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    common = [f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}", "dataset=mnist",
              "hardware=cpu"]

    def app(module, *args):
        return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    proc = app("locality.calibrate", *common, "sampler.num_steps=2", "calibrate.seeds=[0,1]",
               "calibrate.num_samples=2", "calibrate.candidates=[1,27]", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = [p.parent for p in (tmp_path / "out" / "calibrate").glob("*/*/calibration.json")]
    report = json.loads((out / "calibration.json").read_text())
    assert report["timesteps"] == [500, 0] and report["candidates"] == [1, 27]
    sizes = report["patch_sizes"]
    assert len(sizes) == 2 and set(sizes) <= {1, 27}
    assert f"model.patch_sizes=[{sizes[0]},{sizes[1]}]" in proc.stdout
    proc = app("locality.run", f"--config-dir={out}", *common, "experiment=calibrated_els_mnist",
               "sampler.num_samples=2", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    config = (run / "config.yaml").read_text()
    assert f"patch_sizes:\n  - {sizes[0]}\n  - {sizes[1]}" in config and "name: els" in config
    # no UNet checkpoint: a clear error, exit status 2
    proc = app("locality.calibrate", *common[:1], f"paths.output_dir={tmp_path / 'out2'}", "dataset=mnist",
               "hardware=cpu", "baseline.checkpoint=auto", f"paths.model_dir={tmp_path / 'none'}")
    assert proc.returncode == 2 and "needs the UNet to calibrate against" in proc.stderr
