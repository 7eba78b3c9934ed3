"""The calibration app: ``python -m locality.calibrate model=els|pspc dataset=… baseline.checkpoint=…``.

Picks per sampler step the patch size whose x̂0 is closest to the UNet's on the UNet's own
trajectories (:mod:`locality.calibration`), and writes calibration.json and a preset the run
app takes: ``python -m locality.run --config-dir=<output> experiment=calibrated_<model>_<dataset>``
(or pass the printed ``model.patch_sizes=[…]``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from locality.config import ConfigError, get_bool, get_choice, get_int, register_resolvers
from locality.jobs import USER_ERRORS, exit_for_user_error

register_resolvers()
log = logging.getLogger("locality.calibrate")


def run_calibration(cfg: DictConfig, out: Path) -> dict:
    from locality.calibration import CRITERIA, calibrate_patch_sizes, default_candidates, experiment_yaml
    from locality.comparison import default_checkpoint_path, resolve_baseline_checkpoint
    from locality.devices import resolve_device
    from locality.models import build_model
    from locality.models.unet import UNetDenoiser
    from locality.settings import kernel_store_dir, load_training_images, model_params

    if cfg.model.name not in ("els", "pspc"):
        raise ConfigError(f"locality.calibrate fits the patch sizes of model=els or model=pspc, got model={cfg.model.name}")
    device = resolve_device(str(cfg.hardware.device))
    name, params = model_params(cfg.model, device, kernel_store_dir(cfg))
    node = cfg.calibrate
    images = load_training_images(cfg)
    shape = tuple(images.shape[1:])
    candidates = OmegaConf.to_container(node.candidates) if node.get("candidates") is not None else \
        default_candidates(name, min(shape[1:]))
    if not isinstance(candidates, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in candidates):
        raise ConfigError(f"calibrate.candidates must be a list of integers or null, got {candidates!r}")
    seeds = OmegaConf.to_container(node.seeds)
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"calibrate.seeds must be a list of integers, got {seeds!r}")
    params["patch_sizes"] = candidates[0] if candidates else 1  # the calibration sets the size of every call
    model = build_model(name, images, None, **params)
    del images
    path, notice = resolve_baseline_checkpoint(
        cfg.baseline.checkpoint, default_checkpoint_path(cfg.paths.model_dir, cfg.dataset.name), cfg.dataset.name,
        cfg.paths.data_dir)
    if path is None:
        raise FileNotFoundError(f"locality.calibrate needs the UNet to calibrate against: {notice}")
    log.info("%s", notice)
    unet = UNetDenoiser.from_checkpoint(path, image_shape=shape, device=device, setting=cfg.baseline.get("setting"))
    result = calibrate_patch_sizes(
        model.denoise_at, unet, shape, get_int(cfg.sampler, "num_steps", "sampler", minimum=1), candidates, seeds,
        get_int(node, "num_samples", "calibrate", minimum=1), get_choice(node, "criterion", "calibrate", CRITERIA),
        clip_x0=get_bool(cfg.sampler, "clip_x0", "sampler"), device=device,
        progress=log.info if cfg.progress else None)
    report = {"model": name, "dataset": cfg.dataset.name, "checkpoint": str(path), **result.as_dict()}
    (out / "calibration.json").write_text(json.dumps(report, indent=2))
    keys = {"variant": params["variant"]} if name == "els" else {"mirror": str(params["mirror"]).lower()}
    preset = f"calibrated_{name}_{cfg.dataset.name}"
    note = f"written by python -m locality.calibrate against {path}"
    (out / "experiment").mkdir(exist_ok=True)
    (out / "experiment" / f"{preset}.yaml").write_text(experiment_yaml(name, cfg.dataset.name, keys, result, note))
    sizes = ",".join(map(str, result.chosen))
    log.info("patch sizes per step (t = %s): %s", ", ".join(map(str, result.timesteps)), sizes)
    print(f"model.patch_sizes=[{sizes}]\n"
          f"run with: python -m locality.run --config-dir={out} experiment={preset}\n"
          f"      or: python -m locality.run model={name} dataset={cfg.dataset.name} 'model.patch_sizes=[{sizes}]'")
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_calibration(cfg, out)
    except USER_ERRORS as exc:
        exit_for_user_error("locality.calibrate", exc, out)


if __name__ == "__main__":
    main()
