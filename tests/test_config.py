"""Every model × dataset composes, with the right per-dataset defaults and paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose

MODELS = ["pca_locality", "optimal", "wiener", "nearest_dataset", "els", "pspc"]
DATASETS = {"mnist": (28, 1, 0.005), "fashion_mnist": (28, 1, 0.005), "cifar10": (32, 3, 0.05),
            "celeba_hq": (64, 3, 0.02), "afhq": (64, 3, 0.02), "gaussian_field": (28, 1, 0.02)}


def test_defaults_are_pca_locality_on_fashion_mnist():
    cfg = compose()
    assert cfg.model.name == "pca_locality" and cfg.dataset.name == "fashion_mnist"
    assert cfg.sampler.num_steps == 10 and cfg.sampler.num_samples == 8
    assert cfg.sampler.batch_size == 8 and cfg.sampler.seed == 42
    assert cfg.sampler.save_intermediates is False and cfg.hardware.device == "auto"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_every_model_and_dataset_compose(model, dataset):
    cfg = compose([f"model={model}", f"dataset={dataset}"])
    resolution, channels, threshold = DATASETS[dataset]
    assert cfg.model.name == model and cfg.dataset.name == dataset
    assert cfg.dataset.resolution == resolution and cfg.dataset.channels == channels
    if model == "pca_locality":
        assert cfg.model.mask_threshold == threshold  # follows the dataset
    if model in ("pca_locality", "optimal"):
        assert cfg.model.temperature == 1.0
    for key in cfg:
        if key != "hydra":  # the hydra node needs a running job (hydra.job.num)
            OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]


def test_explicit_threshold_wins_over_dataset_default():
    cfg = compose(["dataset=cifar10", "model.mask_threshold=0.1"])
    assert cfg.model.mask_threshold == 0.1
    cfg = compose(["model.mask_threshold=0.3", "dataset=afhq"])  # order does not matter
    assert cfg.model.mask_threshold == 0.3


@pytest.mark.parametrize("hardware", ["auto", "cpu", "cuda", "mps"])
def test_hardware_choices(hardware):
    assert compose([f"hardware={hardware}"]).hardware.device == hardware


def test_paths_derive_from_one_root_and_are_absolute():
    cfg = compose()
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    assert Path(paths["root_dir"]) == REPO
    for key, value in paths.items():
        assert Path(value).is_absolute(), key
    assert cfg.tracking.uri == f"sqlite:///{REPO}/outputs/mlflow.db"
    moved = compose(["paths.root_dir=/tmp/elsewhere"])
    assert moved.dataset.root == "/tmp/elsewhere/data/datasets"
    assert moved.tracking.uri == "sqlite:////tmp/elsewhere/outputs/mlflow.db"


def test_run_directory_is_unique_per_process_and_names_the_run():
    cfg = compose(["model=wiener", "dataset=mnist"])
    run_dir = cfg.hydra.run.dir
    assert run_dir.startswith(f"{REPO}/outputs/runs/") and "_wiener_mnist_" in run_dir
    token = run_dir.rsplit("_", 1)[1]
    assert len(token) == 6 and int(token, 16) >= 0
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}_${model.name}_${dataset.name}"


def test_dense_kernel_choice_is_checked():
    import torch

    from locality.config import ConfigError
    from locality.settings import model_params

    name, params = model_params(compose(["model=pca_locality"]).model, torch.device("cpu"))
    assert name == "pca_locality" and params["dense_kernel"] == "auto"
    with pytest.raises(ConfigError, match="model.dense_kernel must be one of auto, float32, bf16x6, bf16x3, int8, int8_onednn, int8_intmm, got 'tf32'"):
        model_params(compose(["model=pca_locality", "model.dense_kernel=tf32"]).model, torch.device("cpu"))
