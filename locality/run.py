"""The run app: ``python -m locality.run [model=…] [dataset=…] [sampler.…=…] [hardware=…]``.

Hydra composes conf/config.yaml; this module turns the config into plain values and explicit
objects (device, MLflow run) and hands them to the math core. Outputs go to Hydra's run
directory: config.yaml, samples/, grid.png, nearest.png, intermediates/, comparison/ (vs the baseline UNet),
metrics.json, status.json, run.log.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from locality.comparison import require_checkpoint
from locality.analysis.memorization import record_memorization
from locality.atomic import atomic_torch_save
from locality.config import check_finite_numbers, get_bool, get_int, register_resolvers
from locality.devices import resolve_device
from locality.images import save_grid
from locality.images import save_samples as write_samples
from locality.jobs import USER_ERRORS, run_or_exit, run_tracked_job
from locality.settings import SamplerSettings, kernel_store_dir, load_training_images, model_params
from locality.statistics import cached_statistics

register_resolvers()
log = logging.getLogger("locality.run")

class RunFailed(RuntimeError):
    """Raised by the task function after the failure was logged and recorded."""


def execute(cfg: DictConfig, out: Path, tracked) -> dict[str, Any]:
    """Load data, fit statistics, build the model, sample, write outputs. Returns the metrics."""
    from locality.models import build_model, get_model_class
    from locality.pipeline import sample

    sampler = SamplerSettings.from_config(cfg.sampler)
    save_samples = get_bool(cfg.output, "save_samples", "output")
    grid_columns = get_int(cfg.output, "grid_columns", "output", minimum=1)
    progress = get_bool(cfg, "progress", "")
    check_finite_numbers(cfg.model, "model")
    device = resolve_device(str(cfg.hardware.device))
    if (str(cfg.hardware.device) == "auto" and device.type == "mps"
            and get_model_class(str(cfg.model.name)).float64_accumulation):
        log.warning("hardware=auto: model=%s needs float64, which MPS lacks; running on the CPU",
                    cfg.model.name)
        device = torch.device("cpu")
    name, params = model_params(cfg.model, device, kernel_store_dir(cfg))
    log.info("model=%s dataset=%s device=%s output=%s", name, cfg.dataset.name, device, out)

    metrics: dict[str, float] = {}
    start = time.perf_counter()
    images = load_training_images(cfg)
    metrics["dataset_load_time_s"] = time.perf_counter() - start
    metrics["num_train_images"] = images.shape[0]
    log.info("dataset %s/%s: %d images of shape %s", cfg.dataset.name, cfg.dataset.split,
             images.shape[0], tuple(images.shape[1:]))

    stats = None
    if get_model_class(name).needs_statistics:
        start = time.perf_counter()
        stats, hit = cached_statistics(
            images, cfg.paths.cache_dir, cfg.dataset.name, cfg.dataset.split,
            images.shape[-1], cfg.dataset.subset_size, progress=progress,
        )
        metrics["statistics_time_s"] = time.perf_counter() - start
        tracked.set_tags({"statistics_cache": "hit" if hit else "fitted"})
        log.info("statistics %s in %.2f s (%d dead pixels)", "loaded" if hit else "fitted",
                 metrics["statistics_time_s"], int(stats.dead.sum()))

    if name == "unet":  # a clear error (where it looked, how to get one) before torch.load's
        params["checkpoint"] = str(require_checkpoint(params["checkpoint"], cfg.dataset.name, cfg.paths.data_dir))
    denoiser = build_model(name, images, stats, **params)
    image_shape = tuple(images.shape[1:])

    comparison = setup_comparison(cfg, name, params, image_shape, sampler, device)
    result = sample(
        denoiser, num_samples=sampler.num_samples, image_shape=image_shape,
        num_steps=sampler.num_steps, seed=sampler.seed, batch_size=sampler.batch_size,
        device=device, clip_x0=sampler.clip_x0, keep_trajectory=sampler.save_intermediates,
        progress=progress,
        on_step=comparison.on_step if comparison else None, noise=comparison.noise if comparison else None,
    )
    metrics["sampling_time_total_s"] = result.total_time_s
    metrics["sampling_time_per_step_s"] = result.time_per_step_s
    for i, (t, seconds) in enumerate(zip(result.timesteps, result.step_times_s)):
        tracked.log_metrics({"sampling_time_step_s": seconds}, step=i)
    log.info("sampled %d images in %.2f s (%.3f s per step)", sampler.num_samples,
             result.total_time_s, result.time_per_step_s)

    atomic_torch_save(result.samples, out / "samples.pt")
    if save_samples:
        write_samples(result.samples, out / "samples")
    save_grid(result.samples, out / "grid.png", columns=grid_columns)
    metrics.update(record_memorization(result.samples, images, out, grid_columns, log.info))  # nearest.png
    if sampler.save_intermediates:
        for i, t in enumerate(result.timesteps):
            save_grid(result.x_t[i], out / "intermediates" / "x_t" / f"step_{i:02d}_t{t:04d}.png")
            save_grid(result.x0_pred[i], out / "intermediates" / "x0_pred" / f"step_{i:02d}_t{t:04d}.png")
    if comparison is not None:
        comparison.log_steps(tracked.log_metrics)
        comparison.save_grids(out / "comparison")
        metrics.update(comparison.metrics())
        log.info("vs UNet at the last step: R² %.4f, MSE %.5f (trajectory); R² %.4f, MSE %.5f (single step)",
                 metrics["r2_vs_unet_final"], metrics["mse_vs_unet_final"],
                 metrics["r2_vs_unet_single_final"], metrics["mse_vs_unet_single_final"])
    return metrics


def setup_comparison(cfg: DictConfig, name: str, params: dict[str, Any], image_shape: tuple[int, ...],
                     sampler: SamplerSettings, device: torch.device):
    """The baseline UNet comparison of this run (config ``baseline.*``), or None when disabled."""
    from locality.comparison import UNetComparison, default_checkpoint_path, resolve_baseline_checkpoint
    from locality.models.unet import UNetDenoiser
    from locality.sampler import initial_noise
    from locality.schedule import ddim_timesteps

    node = cfg.get("baseline")
    value = node.get("checkpoint") if node is not None else None
    path, notice = resolve_baseline_checkpoint(
        value, default_checkpoint_path(cfg.paths.model_dir, cfg.dataset.name), cfg.dataset.name, cfg.paths.data_dir)
    if path is None:
        log.info("%s", notice)
        return None
    if name == "unet" and Path(params["checkpoint"]).resolve() == path.resolve():
        log.info("model=unet is the baseline checkpoint %s itself: no comparison with the UNet", path)
        return None
    log.info("%s", notice)
    unet = UNetDenoiser.from_checkpoint(path, image_shape=image_shape, device=device, setting=node.get("setting"),
                                        trust_checkpoint=get_bool(node, "trust_checkpoint", "baseline"))
    noise = initial_noise((sampler.num_samples, *image_shape), torch.Generator().manual_seed(sampler.seed))
    return UNetComparison(unet, noise, ddim_timesteps(sampler.num_steps), clip_x0=sampler.clip_x0,
                          grid_images=get_int(node, "grid_images", "baseline", minimum=0))


def run(cfg: DictConfig, out: Path, parent_run_id: str | None = None) -> dict[str, Any]:
    """One job: MLflow run around :func:`execute` (a child of ``parent_run_id`` in a sweep);
    status.json says how it ended."""
    metrics = run_tracked_job(
        cfg, out, execute, tags={"model": cfg.model.name, "dataset": cfg.dataset.name},
        artifacts=("grid.png", "nearest.png", "metrics.json", "config.yaml", "samples", "intermediates", "comparison"),
        log_file="run.log", parent_run_id=parent_run_id,
    )
    log.info("done: %s (grid.png, samples/, metrics.json, run.log)", out)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # a failed cell is recorded (status.json, MLflow FAILED) and the other cells go on; the
        # sweep's end names the failed cells and exits non-zero
        from locality.sweep import run_cell

        metrics = run_cell(cfg, out, run, USER_ERRORS)
    else:
        metrics = run_or_exit("locality.run", lambda: run(cfg, out), out)
    return metrics.get("sampling_time_total_s") if metrics else None


if __name__ == "__main__":
    main()
