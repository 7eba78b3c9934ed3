"""The composed config read into plain values and explicit objects, once, for every entry point
(``locality.run``, ``bench``, ``train``, ``calibrate``): the sampler's settings, the model's
keyword arguments and device, the training images, the baseline checkpoint. A setting of the
config is checked where it is read here, with an error that names the key, what is allowed and
how to fix it (:class:`locality.app.config.ConfigError`); a model's own parameters (``chunk_size``,
``dense_kernel``, …) are checked by the model itself, so the Python API checks them too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from locality.app.baseline import default_checkpoint_path, resolve_baseline_checkpoint
from locality.app.config import ConfigError, check_finite_numbers, get_bool, get_choice, get_int
from locality.app.devices import resolve_device

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SamplerSettings:
    """``cfg.sampler``: DDIM's steps, samples, batch size, seed, clipping, kept intermediates."""

    num_steps: int
    num_samples: int
    batch_size: int
    seed: int
    clip_x0: bool
    save_intermediates: bool

    @classmethod
    def from_config(cls, node: Any) -> "SamplerSettings":
        if node.get("name") != "ddim":
            raise ConfigError(f"sampler.name must be ddim (the only sampler), got {node.get('name')!r}")
        return cls(
            num_steps=get_int(node, "num_steps", "sampler", minimum=1),
            num_samples=get_int(node, "num_samples", "sampler", minimum=1),
            batch_size=get_int(node, "batch_size", "sampler", minimum=1),
            seed=get_int(node, "seed", "sampler", minimum=0),
            clip_x0=get_bool(node, "clip_x0", "sampler"),
            save_intermediates=get_bool(node, "save_intermediates", "sampler"),
        )


@dataclass(frozen=True)
class OutputSettings:
    """``cfg.output``: one PNG per sample (``save_samples``), images per row of grid.png."""

    save_samples: bool
    grid_columns: int

    @classmethod
    def from_config(cls, node: Any) -> "OutputSettings":
        return cls(save_samples=get_bool(node, "save_samples", "output"),
                   grid_columns=get_int(node, "grid_columns", "output", minimum=1))


def kernel_store_dir(cfg: DictConfig) -> Path:
    """Where the measured kernel choices of this machine are kept: paths.cache_dir/kernels."""
    return Path(str(cfg.paths.cache_dir)) / "kernels"


def place_model(name: str, device: torch.device, auto: bool) -> torch.device:
    """The device model ``name`` runs on: ``device``, except that MPS (no float64) cannot hold
    the float64 accumulators of a ``float64_accumulation`` model: ``hardware=auto`` then runs it
    on the CPU with a warning, an explicit ``hardware=mps`` is refused."""
    from locality.models import get_model_class

    if device.type != "mps" or not get_model_class(name).float64_accumulation:
        return device
    if auto:
        log.warning("hardware=auto: model=%s needs float64, which MPS lacks; running on the CPU", name)
        return torch.device("cpu")
    raise ConfigError(
        f"model={name} keeps its exact softmax accumulators in float64, which MPS does not "
        "support yet; run it with hardware=cpu (wiener, nearest_dataset and unet run on MPS)"
    )


def model_device(cfg: DictConfig) -> torch.device:
    """``hardware.device`` resolved for ``cfg.model`` (:func:`place_model`)."""
    requested = str(cfg.hardware.device)
    return place_model(str(cfg.model.name), resolve_device(requested), requested == "auto")


def model_params(node: Any, device: torch.device, kernel_store: Path | None = None) -> tuple[str, dict[str, Any]]:
    """cfg.model -> (name, keyword arguments of the model class) on ``device`` (from
    :func:`model_device`). ``dtype`` becomes a torch dtype (float32 on MPS, which has no float64);
    a model that measures its kernels gets a tuner keeping its decisions in ``kernel_store``."""
    from locality.models import get_model_class
    from locality.models.autotune import KernelTuner

    check_finite_numbers(node, "model")
    params = OmegaConf.to_container(node, resolve=True)
    name = params.pop("name")
    cls = get_model_class(name)
    if "dtype" in params:
        dtype = DTYPES[get_choice(node, "dtype", "model", tuple(DTYPES))]
        params["dtype"] = torch.float32 if device.type == "mps" else dtype
    if "trust_checkpoint" in params:
        get_bool(node, "trust_checkpoint", "model")
    for key in ("temperature", "mask_threshold"):
        if key in params and (isinstance(params[key], bool) or not isinstance(params[key], (int, float))):
            raise ConfigError(f"model.{key} must be a number, got {params[key]!r}")
    params["device"] = device
    if cls.tunes_kernels:
        params["tuner"] = KernelTuner(device, kernel_store)
    return name, params


def load_training_images(cfg: DictConfig, subset: tuple[Any, str] | None = None) -> torch.Tensor:
    """cfg.dataset -> images [N, C, H, W] in [-1, 1]; ``subset`` = (node, its name) holding
    ``subset_size`` when not cfg.dataset (the train app's train.subset_size)."""
    from locality.data import load_dataset

    ds = cfg.dataset
    node, prefix = subset or (ds, "dataset")
    return load_dataset(
        ds.name,
        root=ds.root,
        split=ds.split,
        resolution=get_int(ds, "resolution", "dataset", minimum=1, optional=True),
        subset_size=get_int(node, "subset_size", prefix, minimum=1, optional=True),
        download=get_bool(ds, "download", "dataset"),
        progress=get_bool(cfg, "progress", ""),
        # image folders: decoded pixels kept under paths.cache_dir (dataset.cache_decoded)
        cache_dir=cfg.paths.cache_dir if "cache_decoded" in ds and get_bool(ds, "cache_decoded", "dataset") else None,
        options=OmegaConf.to_container(ds, resolve=True),  # a generated dataset's keys (DatasetSpec.options)
    )


def baseline_checkpoint(cfg: DictConfig) -> tuple[Path | None, str]:
    """``baseline.checkpoint`` of this dataset -> (checkpoint path or None, a notice for the log);
    see :func:`locality.app.baseline.resolve_baseline_checkpoint`."""
    node = cfg.get("baseline")
    value = node.get("checkpoint") if node is not None else None
    return resolve_baseline_checkpoint(value, default_checkpoint_path(cfg.paths.model_dir, cfg.dataset.name),
                                       cfg.dataset.name, cfg.paths.data_dir)
