"""The training app: ``python -m locality.train [dataset=…] [train=default|quick_cpu] [train.key=value …]``.

Hydra composes conf/train.yaml (the paths, dataset and hardware groups of the run app plus the
``train`` group); this module turns it into plain values and calls
:func:`locality.unet.training.train_unet`. Checkpoints in the published format
(``model_state_dict`` = EMA weights, plus ``unet_config`` and the training state) go to
``train.checkpoint_dir`` (default ``${paths.model_dir}/baseline_unet/<dataset>/``, where the run
app's ``model=unet`` and ``baseline.checkpoint=auto`` look for ``ckpt_epoch_200.pt``).

MLflow (``tracking.*``): the resolved config as params, ``train/loss`` every ``train.log_every``
steps, ``epoch/loss`` per epoch, a sample grid (DDIM, EMA weights) at every checkpoint. The Hydra
run directory holds config.yaml, samples/epoch_<E>.png, metrics.json, status.json and train.log.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from locality.app.config import ConfigError, get_bool, get_float, get_int, register_resolvers
from locality.app.devices import resolve_device
from locality.app.jobs import run_or_exit, run_tracked_job
from locality.app.settings import load_training_images
from locality.unet.training import TrainSettings

register_resolvers()
log = logging.getLogger("locality.train")

WEIGHTS_DTYPES = {"float32": None, "float16": torch.float16}


def unet_architecture(node: Any, dataset: str, channels: int) -> str | dict[str, Any]:
    """``train.unet`` -> a setting name or UNet constructor kwargs.

    ``auto``: the dataset's published setting. A mapping gets ``in_channels``/``out_channels``
    from the dataset when it does not set them.
    """
    from locality.unet.network import DATASET_SETTINGS, SETTINGS

    value = node.get("unet")
    if isinstance(value, DictConfig):
        kwargs = OmegaConf.to_container(value, resolve=True)
        kwargs.setdefault("in_channels", channels)
        kwargs.setdefault("out_channels", channels)
        return kwargs
    if value in (None, "auto"):
        if dataset not in DATASET_SETTINGS:
            raise ConfigError(
                f"no published UNet setting for dataset {dataset!r}; set train.unet to a setting "
                f"({', '.join(SETTINGS)}) or to a mapping of UNet kwargs"
            )
        return DATASET_SETTINGS[dataset]
    if value not in SETTINGS:
        raise ConfigError(f"train.unet must be auto, one of {', '.join(SETTINGS)} or a mapping, got {value!r}")
    return str(value)


def make_sample_fn(out: Path, tracked, node: Any, image_shape: tuple[int, ...], device: torch.device):
    """The checkpoint hook: a DDIM sample grid of the EMA net -> samples/epoch_<E>.png + MLflow."""
    from locality.images import save_grid
    from locality.models.unet_denoiser import UNetDenoiser
    from locality.sampling import sample

    num_samples = get_int(node, "num_samples", "train.samples", minimum=0)
    num_steps = get_int(node, "num_steps", "train.samples", minimum=1)
    seed = get_int(node, "seed", "train.samples", minimum=0)

    def sample_fn(ema, epoch: int, step: int) -> None:
        if num_samples == 0:
            return
        result = sample(UNetDenoiser(ema), num_samples=num_samples, image_shape=image_shape,
                        num_steps=num_steps, seed=seed, batch_size=num_samples, device=device)
        path = save_grid(result.samples, out / "samples" / f"epoch_{epoch:04d}_step_{step}.png",
                         columns=min(8, num_samples))
        tracked.log_artifact(path, "samples")

    return sample_fn


def train_settings(t: DictConfig) -> TrainSettings:
    """``cfg.train`` -> the recipe of :func:`locality.unet.training.train_unet`."""
    weights = str(t.get("weights_dtype"))
    if weights not in WEIGHTS_DTYPES:
        raise ConfigError(f"train.weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights!r}")
    return TrainSettings(
        epochs=get_int(t, "epochs", "train", minimum=1),
        batch_size=get_int(t, "batch_size", "train", minimum=1),
        lr=get_float(t, "lr", "train", low=0.0, low_open=True),
        ema_decay=get_float(t, "ema_decay", "train", low=0.0, high=1.0),
        grad_clip=None if t.get("grad_clip") is None else get_float(t, "grad_clip", "train", low=0.0, low_open=True),
        warmup_steps=get_int(t, "warmup_steps", "train", minimum=0),
        seed=get_int(t, "seed", "train", minimum=0),
        checkpoint_every=get_int(t, "checkpoint_every", "train", minimum=1),
        log_every=get_int(t, "log_every", "train", minimum=1),
        max_steps=get_int(t, "max_steps", "train", minimum=1, optional=True),
        weights_dtype=WEIGHTS_DTYPES[weights],
    )


def execute(cfg: DictConfig, out: Path, tracked) -> dict[str, Any]:
    """Settings, images, :func:`locality.unet.training.train_unet`; returns the metrics."""
    from locality.unet.training import train_unet

    t = cfg.train
    device = resolve_device(str(cfg.hardware.device))
    start = time.perf_counter()
    images = load_training_images(cfg, subset=(t, "train"))
    N, C, H, W = images.shape
    log.info("dataset %s/%s: %d images of shape %s (%.1f s)", cfg.dataset.name, cfg.dataset.split, N,
             (C, H, W), time.perf_counter() - start)
    setting = unet_architecture(t, str(cfg.dataset.name), C)
    settings = train_settings(t)
    ckpt_dir = Path(str(t.checkpoint_dir)).expanduser()
    log.info("training UNet %s on %s for %s epochs (batch %s) -> %s", setting, device, t.epochs, t.batch_size, ckpt_dir)
    tracked.set_tags({"checkpoint_dir": str(ckpt_dir), "unet": str(setting)})

    start = time.perf_counter()
    result = train_unet(
        images, setting, settings, device=device, checkpoint_dir=ckpt_dir, resume=get_bool(t, "resume", "train"),
        log_fn=lambda metrics, step: tracked.log_metrics(metrics, step=step),
        sample_fn=make_sample_fn(out, tracked, t.samples, (C, H, W), device),
        progress=get_bool(cfg, "progress", ""),
    )
    seconds = time.perf_counter() - start
    if result.resumed_from is not None:
        log.info("resumed from %s", result.resumed_from)
    last = ckpt_dir / "last.pt"
    log.info("trained to epoch %d, step %d (loss %.4f) in %.1f s; checkpoints: %s", result.epoch, result.step,
             result.last_loss, seconds, ", ".join(str(p) for p in result.checkpoints) or str(last))
    return {
        "final_loss": result.last_loss, "epochs_completed": result.epoch, "steps": result.step,
        "train_time_s": seconds, "num_train_images": N,
        "checkpoints": [str(p) for p in result.checkpoints],
        "last_checkpoint": str(last) if last.exists() else None,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
    }


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """One training job in an MLflow run; metrics.json and status.json in ``out``."""
    return run_tracked_job(cfg, out, execute, tags={"app": "train", "dataset": cfg.dataset.name},
                           artifacts=("metrics.json", "config.yaml"), log_file="train.log")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    out = Path(HydraConfig.get().runtime.output_dir)
    return run_or_exit("locality.train", lambda: run(cfg, out), out).get("final_loss")


if __name__ == "__main__":
    main()
