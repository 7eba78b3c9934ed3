"""The run app: ``python -m locality.run [model=…] [dataset=…] [sampler.…=…] [hardware=…]``.

Hydra composes conf/config.yaml; :func:`execute` reads it into settings
(:mod:`locality.app.settings`) and runs the steps below in order: load the images, fit or load
their statistics, build the denoiser (:mod:`locality.models`), set up the comparison with the
baseline UNet, sample with DDIM (:func:`locality.sampling.sample`, which calls the denoiser
through :func:`locality.ddim.ddim_sample`), write the outputs. :func:`run` wraps it in a tracked
job (:mod:`locality.app.jobs`: MLflow run, metrics.json, status.json). Outputs go to Hydra's run
directory: config.yaml, samples/, grid.png, nearest.png (memorization), intermediates/, comparison/ (vs the baseline UNet),
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

from locality.app.baseline import require_checkpoint
from locality.app.config import get_bool, get_int, register_resolvers
from locality.app.jobs import USER_ERRORS, run_or_exit, run_tracked_job
from locality.app.settings import (
    OutputSettings,
    SamplerSettings,
    baseline_checkpoint,
    kernel_store_dir,
    load_training_images,
    model_device,
    model_params,
)
from locality.analysis.memorization import record_memorization
from locality.atomic import atomic_torch_save
from locality.images import save_grid
from locality.images import save_samples as write_samples
from locality.statistics import DataStatistics, cached_statistics

register_resolvers()
log = logging.getLogger("locality.run")


def execute(cfg: DictConfig, out: Path, tracked) -> dict[str, Any]:
    """The run, one named step after another; returns the metrics (metrics.json)."""
    sampler = SamplerSettings.from_config(cfg.sampler)
    output = OutputSettings.from_config(cfg.output)
    progress = get_bool(cfg, "progress", "")
    device = model_device(cfg)
    name, params = model_params(cfg.model, device, kernel_store_dir(cfg))
    log.info("model=%s dataset=%s device=%s output=%s", name, cfg.dataset.name, device, out)
    metrics: dict[str, Any] = {}
    images = load_images(cfg, metrics)
    stats = statistics_for(name, images, cfg, metrics, tracked, progress)
    denoiser = build_denoiser(name, params, images, stats, cfg)
    image_shape = tuple(images.shape[1:])
    comparison = setup_comparison(cfg, name, params, image_shape, sampler, device)
    result = draw_samples(denoiser, image_shape, sampler, device, comparison, progress)
    metrics.update(sampling_metrics(result, tracked))
    write_outputs(result, out, output, sampler)
    # each sample's nearest training images (exact over all N), the copy fraction, nearest.png
    metrics.update(record_memorization(result.samples, images, out, output.grid_columns, log.info))
    if comparison is not None:
        metrics.update(comparison_outputs(comparison, out, tracked))
    return metrics


def load_images(cfg: DictConfig, metrics: dict[str, Any]) -> torch.Tensor:
    """The training images [N, C, H, W] of ``cfg.dataset``, with their load time and count."""
    start = time.perf_counter()
    images = load_training_images(cfg)
    metrics["dataset_load_time_s"] = time.perf_counter() - start
    metrics["num_train_images"] = images.shape[0]
    log.info("dataset %s/%s: %d images of shape %s", cfg.dataset.name, cfg.dataset.split,
             images.shape[0], tuple(images.shape[1:]))
    return images


def statistics_for(name: str, images: torch.Tensor, cfg: DictConfig, metrics: dict[str, Any], tracked,
                   progress: bool) -> DataStatistics | None:
    """The images' statistics from the cache or fitted (None for a model that needs none)."""
    from locality.models import get_model_class

    if not get_model_class(name).needs_statistics:
        return None
    start = time.perf_counter()
    stats, hit = cached_statistics(images, cfg.paths.cache_dir, cfg.dataset.name, cfg.dataset.split,
                                   images.shape[-1], cfg.dataset.subset_size, progress=progress)
    metrics["statistics_time_s"] = time.perf_counter() - start
    tracked.set_tags({"statistics_cache": "hit" if hit else "fitted"})
    log.info("statistics %s in %.2f s (%d dead pixels)", "loaded" if hit else "fitted",
             metrics["statistics_time_s"], int(stats.dead.sum()))
    return stats


def build_denoiser(name: str, params: dict[str, Any], images: torch.Tensor, stats: DataStatistics | None,
                   cfg: DictConfig):
    """The denoiser (x_t, t) -> x̂0 of ``model=name``."""
    from locality.models import build_model

    if name == "unet":  # a clear error (where it looked, how to get one) before torch.load's
        params["checkpoint"] = str(require_checkpoint(params["checkpoint"], cfg.dataset.name, cfg.paths.data_dir))
    return build_model(name, images, stats, **params)


def setup_comparison(cfg: DictConfig, name: str, params: dict[str, Any], image_shape: tuple[int, ...],
                     sampler: SamplerSettings, device: torch.device):
    """The baseline UNet comparison of this run (config ``baseline.*``), or None when disabled."""
    from locality.ddim import initial_noise
    from locality.models.unet_denoiser import UNetDenoiser
    from locality.schedule import ddim_timesteps
    from locality.unet_comparison import UNetComparison

    path, notice = baseline_checkpoint(cfg)
    if path is None:
        log.info("%s", notice)
        return None
    if name == "unet" and Path(params["checkpoint"]).resolve() == path.resolve():
        log.info("model=unet is the baseline checkpoint %s itself: no comparison with the UNet", path)
        return None
    log.info("%s", notice)
    node = cfg.baseline
    unet = UNetDenoiser.from_checkpoint(path, image_shape=image_shape, device=device, setting=node.get("setting"),
                                        trust_checkpoint=get_bool(node, "trust_checkpoint", "baseline"))
    noise = initial_noise((sampler.num_samples, *image_shape), torch.Generator().manual_seed(sampler.seed))
    return UNetComparison(unet, noise, ddim_timesteps(sampler.num_steps), clip_x0=sampler.clip_x0,
                          grid_images=get_int(node, "grid_images", "baseline", minimum=0))


def draw_samples(denoiser, image_shape: tuple[int, ...], sampler: SamplerSettings, device: torch.device,
                 comparison, progress: bool):
    """DDIM with the denoiser (:func:`locality.sampling.sample`), the comparison watching each step."""
    from locality.sampling import sample

    return sample(
        denoiser, num_samples=sampler.num_samples, image_shape=image_shape,
        num_steps=sampler.num_steps, seed=sampler.seed, batch_size=sampler.batch_size,
        device=device, clip_x0=sampler.clip_x0, keep_trajectory=sampler.save_intermediates,
        progress=progress,
        on_step=comparison.on_step if comparison else None, noise=comparison.noise if comparison else None,
    )


def sampling_metrics(result, tracked) -> dict[str, float]:
    """The sampling times: in total and per step (metrics.json), each step's to MLflow."""
    for i, seconds in enumerate(result.step_times_s):
        tracked.log_metrics({"sampling_time_step_s": seconds}, step=i)
    log.info("sampled %d images in %.2f s (%.3f s per step)", result.samples.shape[0],
             result.total_time_s, result.time_per_step_s)
    return {"sampling_time_total_s": result.total_time_s, "sampling_time_per_step_s": result.time_per_step_s}


def write_outputs(result, out: Path, output: OutputSettings, sampler: SamplerSettings) -> None:
    """samples.pt, samples/ (output.save_samples), grid.png and intermediates/ (sampler.save_intermediates)."""
    atomic_torch_save(result.samples, out / "samples.pt")
    if output.save_samples:
        write_samples(result.samples, out / "samples")
    save_grid(result.samples, out / "grid.png", columns=output.grid_columns)
    if sampler.save_intermediates:
        for i, t in enumerate(result.timesteps):
            save_grid(result.x_t[i], out / "intermediates" / "x_t" / f"step_{i:02d}_t{t:04d}.png")
            save_grid(result.x0_pred[i], out / "intermediates" / "x0_pred" / f"step_{i:02d}_t{t:04d}.png")


def comparison_outputs(comparison, out: Path, tracked) -> dict[str, Any]:
    """The comparison's curves to MLflow, its grids to comparison/, its numbers for metrics.json."""
    comparison.log_steps(tracked.log_metrics)
    comparison.save_grids(out / "comparison")
    metrics = comparison.metrics()
    log.info("vs UNet at the last step: R² %.4f, MSE %.5f (trajectory); R² %.4f, MSE %.5f (single step)",
             metrics["r2_vs_unet_final"], metrics["mse_vs_unet_final"],
             metrics["r2_vs_unet_single_final"], metrics["mse_vs_unet_single_final"])
    return metrics


def run(cfg: DictConfig, out: Path, parent_run_id: str | None = None) -> dict[str, Any]:
    """One job: MLflow run around :func:`execute` (a child of ``parent_run_id`` in a sweep);
    status.json says how it ended."""
    metrics = run_tracked_job(
        cfg, out, execute, tags={"model": cfg.model.name, "dataset": cfg.dataset.name},
        artifacts=("grid.png", "nearest.png", "metrics.json", "config.yaml", "samples", "intermediates", "comparison"),
        log_file="run.log", parent_run_id=parent_run_id,
    )
    log.info("done: %s (grid.png, nearest.png, samples/, metrics.json, run.log)", out)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # a failed cell is recorded (status.json, MLflow FAILED) and the other cells go on; the
        # sweep's end names the failed cells and exits non-zero
        from locality.app.sweep import run_cell

        metrics = run_cell(cfg, out, run, USER_ERRORS)
    else:
        metrics = run_or_exit("locality.run", lambda: run(cfg, out), out)
    return metrics.get("sampling_time_total_s") if metrics else None


if __name__ == "__main__":
    main()
