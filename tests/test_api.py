"""The Python API works without Hydra or MLflow (notebooks, the GPU machine)."""

from __future__ import annotations

import subprocess
import sys


def run_ok(code: str) -> None:
    """Run ``code`` in a fresh interpreter; it must print ok."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_math_core_imports_without_hydra_mlflow_or_the_app_layer():
    code = (
        "import sys, locality\n"
        "ENTRY_POINTS = ('locality.run', 'locality.train', 'locality.bench', 'locality.calibrate', 'locality.compare')\n"
        "from locality import load_dataset, fit_statistics, build_model, sample, alpha_bar\n"
        "import torch\n"
        "y = torch.rand(30, 1, 4, 4) * 2 - 1\n"
        "m = build_model('pca_locality', y, fit_statistics(y, progress=False), mask_threshold=0.02)\n"
        "r = sample(m, num_samples=2, image_shape=(1, 4, 4), num_steps=2)\n"
        "assert r.samples.shape == (2, 1, 4, 4)\n"
        "import locality.timing, locality.unet_comparison, locality.patch_calibration, locality.unet\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('hydra', 'omegaconf', 'mlflow')\n"
        "             or k.startswith('locality.app') or k in ENTRY_POINTS)\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    run_ok(code)


def test_api_lists_registries():
    import locality

    assert set(locality.available_models()) >= {"pca_locality", "optimal", "wiener", "nearest_dataset", "unet"}
    assert set(locality.available_datasets()) == {"mnist", "fashion_mnist", "cifar10", "celeba_hq", "afhq", "gaussian_field"}


def test_a_run_at_the_stored_resolution_never_imports_torchvision():
    """torchvision adds ~170 MB to the process (its import alone); the run app, the models and
    the loaders import it only to resize or download."""
    code = (
        "import sys, torch\n"
        "import locality.run, locality.data, locality.models, locality.images, locality.analysis.memorization\n"
        "from locality.data.common import resize_uint8_batch\n"
        "x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)\n"
        "assert resize_uint8_batch(x, 8) is x\n"
        "assert 'torchvision' not in sys.modules, 'imported torchvision'\n"
        "assert resize_uint8_batch(x, 4).shape == (2, 1, 4, 4)\n"
        "assert 'torchvision' in sys.modules\n"
        "print('ok')\n"
    )
    run_ok(code)
