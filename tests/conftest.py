"""Shared fixtures and helpers: composed configs, the real Fashion-MNIST, the reference vectors,
and the entry points run in a subprocess with their outputs read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locality.app.config import config_dir, register_resolvers

REPO = Path(__file__).resolve().parents[1]
#: A run small enough for a sweep cell in a test: 200 images, 2 samples, 2 steps.
TINY_RUN = ["dataset.subset_size=200", "sampler.num_samples=2", "sampler.batch_size=2", "sampler.num_steps=2"]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def reference_dir() -> Path:
    """../shared/reference beside the checkout (or $LOCALITY_REFERENCE_DIR)."""
    env = os.environ.get("LOCALITY_REFERENCE_DIR")
    return Path(env) if env else REPO.parent / "shared" / "reference"


def require_reference(name: str) -> Path:
    path = reference_dir() / name
    if not path.exists():
        pytest.fail(
            f"reference file {path} is missing: the tests need the project's shared/reference folder "
            "beside the checkout, or LOCALITY_REFERENCE_DIR pointing at it"
        )
    return path


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """Compose a config like the app does (Hydra compose API, hydra node included)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=True)


@pytest.fixture(scope="session")
def fmnist_train() -> torch.Tensor:
    """The real Fashion-MNIST training set [60000, 1, 28, 28] from Debian's package."""
    from locality.data import load_dataset

    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"{FMNIST_DIR} is missing: install it with `apt-get install dataset-fashion-mnist`")
    return load_dataset("fashion_mnist", root="/nonexistent", progress=False)


@pytest.fixture(scope="session")
def fmnist_crop16(fmnist_train) -> torch.Tensor:
    """The reference vectors' training set: center 16×16 crop of the first 1000 images."""
    return fmnist_train[:1000, :, 6:22, 6:22].contiguous()


def app_command(args: list[str], tmp: Path, module: str = "locality.run",
                env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment of an entry point with outputs, caches and MLflow under ``tmp``."""
    base = [
        f"paths.output_dir={tmp}/outputs",
        f"paths.data_dir={tmp}/data",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        "progress=false",
    ]
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    flags = [a for a in args if a.startswith("--")]  # Hydra's flags go before the overrides
    overrides = [a for a in args if not a.startswith("--")]
    return [sys.executable, "-m", module, *flags, *base, *overrides], full_env


def run_app(args: list[str], tmp: Path, module: str = "locality.run", timeout: int = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an entry point in a subprocess with outputs, caches and MLflow under ``tmp``."""
    command, full_env = app_command(args, tmp, module, env)
    return subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=timeout, env=full_env)


def run_on_mnist(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """``python -m locality.run`` on dataset=mnist from ``tmp``/datasets (models under ``tmp``/models),
    outputs under ``tmp``/out, one thread."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "locality.run", f"paths.data_dir={tmp}", f"paths.output_dir={tmp / 'out'}",
         f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "dataset=mnist", "hardware=cpu", "progress=false",
         *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def run_dirs(tmp: Path) -> list[Path]:
    """The finished run directories of :func:`run_on_mnist` under ``tmp``."""
    return sorted(p.parent for p in (tmp / "out" / "runs").glob("*/*/status.json"))


def sweep_dir(tmp: Path) -> Path:
    """The one sweep directory under ``tmp``/outputs (:func:`run_app` with --multirun)."""
    (found,) = (tmp / "outputs" / "multiruns").glob("*/*")
    return found


def runs_by_cell(tmp: Path):
    """(client, parent runs, child runs) of the sweeps in ``tmp``/mlflow.db."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("locality")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("locality.sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children
