"""The analysis app: ``python -m locality.analyze sensitivity [model=…] [dataset=…] [baseline.checkpoint=…]``.

Hydra composes conf/analyze.yaml (the run app's groups); this module turns the config into plain
values and objects and hands them to :mod:`locality.analysis.sensitivity_study`. Outputs go to
Hydra's run directory: figures/ (heatmap grids, radius plots), fields.pt, sensitivity.json,
metrics.json, config.yaml, status.json, analyze.log; all of it logged to MLflow like a run.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from locality.app.config import ConfigError, get_bool, get_float, get_int, register_resolvers
from locality.app.jobs import USER_ERRORS, run_or_exit, run_tracked_job

register_resolvers()
log = logging.getLogger("locality.analyze")

ANALYSES = ("sensitivity",)


def _int_list(node: Any, key: str, what: str) -> list | None:
    value = node.get(key)
    if value is None:
        return None
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if not isinstance(value, list) or not value:
        raise ConfigError(f"analysis.{key} must be a non-empty list of {what} or null, got {value!r}")
    return value


def analysis_pixels(node: Any, shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """analysis.pixels / analysis.channel -> [(c, i, j)], checked against the image shape."""
    from locality.analysis.sensitivity import default_pixels

    channels, h, w = shape
    channel = get_int(node, "channel", "analysis", minimum=0)
    if channel >= channels:
        raise ConfigError(f"analysis.channel={channel} but the images have {channels} channel(s): use 0…{channels - 1}")
    pairs = _int_list(node, "pixels", "[row, col] pairs")
    if pairs is None:
        pairs = default_pixels(h, w)
    out = []
    for pair in pairs:
        pair = list(pair) if isinstance(pair, tuple) else pair
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise ConfigError(f"analysis.pixels entries must be [row, col] pairs of integers, got {pair!r}")
        if not (0 <= pair[0] < h and 0 <= pair[1] < w):
            raise ConfigError(f"analysis.pixels entry {pair} lies outside the {h}×{w} image: rows 0…{h - 1}, "
                              f"columns 0…{w - 1}")
        out.append((channel, pair[0], pair[1]))
    return out


def analysis_timesteps(node: Any, sampler_timesteps: list[int], sources: list[str]) -> list[int]:
    """analysis.timesteps (null: the sampler's); on the trajectory only the sampler's exist."""
    given = _int_list(node, "timesteps", "timesteps")
    if given is None:
        return sampler_timesteps
    for t in given:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 1000:
            raise ConfigError(f"analysis.timesteps entries must be integers in 0…999, got {t!r}")
    off = [t for t in given if t not in sampler_timesteps]
    if off and "trajectory" in sources:
        raise ConfigError(f"analysis.timesteps {off} are not steps of the sampler ({sampler_timesteps}), so the "
                          f"model's trajectory never visits them: choose among those, change sampler.num_steps, "
                          f"or use analysis.sources=[heldout]")
    return sorted(set(given), reverse=True)


def analysis_sources(node: Any) -> list[str]:
    from locality.analysis.sensitivity_study import SOURCES

    sources = _int_list(node, "sources", "source names")
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        raise ConfigError(f"analysis.sources entries must be among {', '.join(SOURCES)}, got {bad}")
    return list(dict.fromkeys(sources))


def support_threshold(cfg: DictConfig) -> float:
    """analysis.support_threshold, else the pca_locality θ of the model or of the dataset."""
    node = cfg.analysis
    if node.get("support_threshold") is not None:
        return get_float(node, "support_threshold", "analysis", low=0.0, high=1.0)
    if cfg.model.get("mask_threshold") is not None:
        return float(cfg.model.mask_threshold)
    return float(cfg.dataset.get("pca_mask_threshold", 0.02))


def heldout_images(cfg: DictConfig, count: int) -> torch.Tensor:
    """The first ``count`` images of analysis.heldout_split of the dataset."""
    from locality.app.settings import load_training_images

    held = cfg.copy()
    with open_dict(held):
        held.dataset.split = str(cfg.analysis.heldout_split)
        held.dataset.subset_size = count
    return load_training_images(held)


def load_unet(cfg: DictConfig, name: str, params: dict, shape: tuple[int, ...], device: torch.device):
    """The baseline UNet (baseline.checkpoint), or None with a notice."""
    from locality.app.baseline import default_checkpoint_path, resolve_baseline_checkpoint
    from locality.models.unet_denoiser import UNetDenoiser

    node = cfg.baseline
    path, notice = resolve_baseline_checkpoint(node.get("checkpoint"), default_checkpoint_path(
        cfg.paths.model_dir, cfg.dataset.name), cfg.dataset.name, cfg.paths.data_dir)
    log.info("%s", notice)
    if path is None:
        return None
    if name == "unet" and Path(params["checkpoint"]).resolve() == path.resolve():
        log.info("model=unet is the baseline checkpoint itself: its fields are shown once")
        return None
    return UNetDenoiser.from_checkpoint(path, image_shape=shape, device=device, setting=node.get("setting"),
                                        trust_checkpoint=get_bool(node, "trust_checkpoint", "baseline"))


def execute(cfg: DictConfig, out: Path, tracked) -> dict[str, Any]:
    """Build the model (and UNet), draw the x_t of each source, compute and save the study."""
    from locality.analysis.sensitivity import field_method
    from locality.analysis.sensitivity_study import heldout_inputs, study_sensitivity, trajectory_inputs
    from locality.app.baseline import require_checkpoint
    from locality.app.settings import SamplerSettings, kernel_store_dir, load_training_images, model_device, model_params
    from locality.models import build_model, get_model_class
    from locality.models.masks import locality_mask
    from locality.schedule import ddim_timesteps
    from locality.statistics import cached_statistics

    node = cfg.analysis
    if node.kind not in ANALYSES:
        raise ConfigError(f"analysis.kind must be one of {', '.join(ANALYSES)}, got {node.kind!r}")
    sampler = SamplerSettings.from_config(cfg.sampler)
    device = model_device(cfg)  # the MPS rule of every app
    name, params = model_params(cfg.model, device, kernel_store_dir(cfg))
    field_method(name)  # a model without a field method is refused before any work
    sources = analysis_sources(node)
    sampler_steps = [int(t) for t in ddim_timesteps(sampler.num_steps)]
    timesteps = analysis_timesteps(node, sampler_steps, sources)
    count = get_int(node, "num_images", "analysis", minimum=1)
    seed = get_int(node, "seed", "analysis", minimum=0)
    fraction = get_float(node, "mass_fraction", "analysis", low=0.0, high=1.0)
    threshold = support_threshold(cfg)
    progress = get_bool(cfg, "progress", "")

    images = load_training_images(cfg)
    shape = tuple(images.shape[1:])
    pixels = analysis_pixels(node, shape)
    stats = None
    outline = get_bool(node, "outline_mask", "analysis")
    if get_model_class(name).needs_statistics or outline:
        stats, _ = cached_statistics(images, cfg.paths.cache_dir, cfg.dataset.name, cfg.dataset.split, shape[-1],
                                     cfg.dataset.subset_size, progress=progress)
    if name == "unet":
        params["checkpoint"] = str(require_checkpoint(params["checkpoint"], cfg.dataset.name, cfg.paths.data_dir))
    model = build_model(name, images, stats if get_model_class(name).needs_statistics else None, **params)
    unet = load_unet(cfg, name, params, shape, device)
    log.info("sensitivity of %s (%s)%s at t = %s, pixels %s, %d images per source %s", name, field_method(name)[1],
             " and of the UNet (autograd)" if unet is not None else " (no UNet: baseline.checkpoint)",
             timesteps, [p[1:] for p in pixels], count, sources)

    inputs = {}
    for source in sources:
        if source == "heldout":
            inputs[source] = heldout_inputs(heldout_images(cfg, count), timesteps, seed)
        else:
            inputs[source] = trajectory_inputs(model, (count, *shape), ddim_timesteps(sampler.num_steps), seed,
                                               clip_x0=sampler.clip_x0, device=device)
    masks: dict[int, torch.Tensor] = {}

    def mask_column(t: int, pixel: tuple[int, int, int]) -> torch.Tensor:
        """The pca_locality mask column M_t[:, m] [C, H, W] at the support threshold."""
        if t not in masks:
            masks[t] = locality_mask(stats, float(model.alpha_bar(t)), threshold)
        m = (pixel[0] * shape[1] + pixel[1]) * shape[2] + pixel[2]
        return masks[t][:, m].reshape(shape)

    study = study_sensitivity(model, unet, inputs, timesteps, pixels,
                              mask_column if outline and stats is not None else None, threshold, fraction,
                              progress=log.info if progress else None)
    study.save(out)
    for step, values in study.step_metrics().items():
        tracked.log_metrics(values, step=step)
    tracked.set_tags({"analysis": "sensitivity",  # per row (model, unet): how its field was computed
                      **{f"field_method.{row}": study.methods[shown] for row, shown in study.names.items()}})
    metrics = {"num_train_images": images.shape[0], **study.summary()}
    for source in sources:
        keys = [f"{source}_radius_model_mean", f"{source}_radius_unet_mean", f"{source}_radius_mask_mean",
                f"{source}_correlation_vs_unet_mean", f"{source}_iou_vs_unet_mean"]
        log.info("%s: %s", source, ", ".join(f"{k[len(source) + 1:]} {metrics[k]:.3g}" for k in keys if k in metrics))
    return metrics


def run(cfg: DictConfig, out: Path, parent_run_id: str | None = None) -> dict[str, Any]:
    metrics = run_tracked_job(
        cfg, out, execute, tags={"model": cfg.model.name, "dataset": cfg.dataset.name, "analysis": cfg.analysis.kind},
        artifacts=("figures", "fields.pt", "sensitivity.json", "metrics.json", "config.yaml"),
        log_file="analyze.log", parent_run_id=parent_run_id,
    )
    log.info("done: %s (figures/, fields.pt, sensitivity.json, metrics.json)", out)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="analyze")
def hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        from locality.app.sweep import run_cell

        run_cell(cfg, out, run, USER_ERRORS)
    else:
        run_or_exit("locality.analyze", lambda: run(cfg, out), out)


def main() -> None:
    """``python -m locality.analyze ANALYSIS [overrides]``: the analysis name (a bare word, anywhere
    among the overrides) becomes analysis.kind."""
    args = sys.argv[1:]
    named = [a for a in args if a in ANALYSES]  # the one bare word among the overrides
    if named:
        args.remove(named[0])
        sys.argv = [sys.argv[0], *args, f"analysis.kind={named[0]}"]
    elif not any(a.startswith(("--help", "-h", "--cfg", "--info", "--hydra-help", "--shell-completion")) for a in args):
        print(f"usage: python -m locality.analyze {{{','.join(ANALYSES)}}} [key=value …]  (--help for the keys)",
              file=sys.stderr)
        raise SystemExit(2)
    hydra_main()


if __name__ == "__main__":
    main()
