"""The app layer's reading of a composed config into plain values and explicit objects, shared
by the entry points (``locality.run``, ``locality.bench``, ``locality.train``); the math core
never imports it. Every setting is checked here once, with an error that names the key, what is
allowed and how to fix it (:class:`locality.config.ConfigError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from locality.config import ConfigError, get_bool, get_choice, get_int
from locality.devices import default_dtype_for

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SamplerSettings:
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


def kernel_store_dir(cfg: DictConfig) -> Path:
    """Where the measured kernel choices of this machine are kept: paths.cache_dir/kernels."""
    return Path(str(cfg.paths.cache_dir)) / "kernels"


def model_params(node: Any, device: torch.device, kernel_store: Path | None = None) -> tuple[str, dict[str, Any]]:
    """cfg.model -> (name, keyword arguments of the model class); types checked here. A model
    that measures its kernels gets a tuner keeping its decisions in ``kernel_store``."""
    from locality.models import get_model_class
    from locality.models.autotune import KernelTuner
    from locality.models.pca_locality.selection import DENSE_KERNELS

    params = OmegaConf.to_container(node, resolve=True)
    name = params.pop("name")
    cls = get_model_class(name)
    if device.type == "mps" and cls.float64_accumulation:
        raise ConfigError(
            f"model={name} keeps its exact softmax accumulators in float64, which MPS does not "
            "support yet; run it with hardware=cpu (wiener, nearest_dataset and unet run on MPS)"
        )
    if "dtype" in params:
        dtype = DTYPES[get_choice(node, "dtype", "model", tuple(DTYPES))]
        params["dtype"] = default_dtype_for(device, dtype)
    if "dense_kernel" in params:
        get_choice(node, "dense_kernel", "model", DENSE_KERNELS)
    if "chunk_size" in params:
        get_int(node, "chunk_size", "model", minimum=1, optional=True)
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
