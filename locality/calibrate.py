"""The calibration app: ``python -m locality.calibrate model=els|pspc dataset=… baseline.checkpoint=…``.

Picks per sampler step the patch size whose x̂0 is closest to the UNet's on the UNet's own
trajectories (:mod:`locality.patch_calibration`), and writes calibration.json and a preset the run
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

from locality.app.config import ConfigError, get_choice, get_int, register_resolvers
from locality.app.jobs import USER_ERRORS, exit_for_user_error
from locality.app.settings import SamplerSettings, baseline_checkpoint, kernel_store_dir, load_training_images
from locality.app.settings import model_device, model_params

register_resolvers()
log = logging.getLogger("locality.calibrate")


def int_list(node: DictConfig, key: str, default: list[int] | None = None) -> list[int]:
    """``calibrate.<key>``: a list of integers (``default`` where the key is null)."""
    value = OmegaConf.to_container(node[key]) if node.get(key) is not None else default
    if not isinstance(value, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in value):
        raise ConfigError(f"calibrate.{key} must be a list of integers{' or null' if default is not None else ''}, "
                          f"got {value!r}")
    return value


def run_calibration(cfg: DictConfig, out: Path) -> dict:
    """Settings, the model and the UNet, :func:`locality.patch_calibration.calibrate_patch_sizes`,
    then calibration.json and the experiment preset."""
    from locality.models import build_model
    from locality.models.unet_denoiser import UNetDenoiser
    from locality.patch_calibration import CRITERIA, calibrate_patch_sizes, default_candidates

    if cfg.model.name not in ("els", "pspc"):
        raise ConfigError(f"locality.calibrate fits the patch sizes of model=els or model=pspc, got model={cfg.model.name}")
    sampler = SamplerSettings.from_config(cfg.sampler)
    device = model_device(cfg)
    name, params = model_params(cfg.model, device, kernel_store_dir(cfg))
    node = cfg.calibrate
    images = load_training_images(cfg)
    shape = tuple(images.shape[1:])
    candidates = int_list(node, "candidates", default_candidates(name, min(shape[1:])))
    seeds = int_list(node, "seeds")
    params["patch_sizes"] = candidates[0] if candidates else 1  # the calibration sets the size of every call
    model = build_model(name, images, None, **params)
    del images
    path, notice = baseline_checkpoint(cfg)
    if path is None:
        raise FileNotFoundError(f"locality.calibrate needs the UNet to calibrate against: {notice}")
    log.info("%s", notice)
    unet = UNetDenoiser.from_checkpoint(path, image_shape=shape, device=device, setting=cfg.baseline.get("setting"))
    result = calibrate_patch_sizes(
        model.denoise_at, unet, shape, sampler.num_steps, candidates, seeds,
        get_int(node, "num_samples", "calibrate", minimum=1), get_choice(node, "criterion", "calibrate", CRITERIA),
        clip_x0=sampler.clip_x0, device=device, progress=log.info if cfg.progress else None)
    report = {"model": name, "dataset": cfg.dataset.name, "checkpoint": str(path), **result.as_dict()}
    write_results(report, result, name, params, cfg.dataset.name, path, out)
    return report


def write_results(report: dict, result, name: str, params: dict, dataset: str, checkpoint: Path, out: Path) -> None:
    """calibration.json, the preset experiment/calibrated_<model>_<dataset>.yaml, and how to run it."""
    from locality.patch_calibration import experiment_yaml

    (out / "calibration.json").write_text(json.dumps(report, indent=2))
    keys = {"variant": params["variant"]} if name == "els" else {"mirror": str(params["mirror"]).lower()}
    preset = f"calibrated_{name}_{dataset}"
    note = f"written by python -m locality.calibrate against {checkpoint}"
    (out / "experiment").mkdir(exist_ok=True)
    (out / "experiment" / f"{preset}.yaml").write_text(experiment_yaml(name, dataset, keys, result, note))
    sizes = ",".join(map(str, result.chosen))
    log.info("patch sizes per step (t = %s): %s", ", ".join(map(str, result.timesteps)), sizes)
    print(f"model.patch_sizes=[{sizes}]\n"
          f"run with: python -m locality.run --config-dir={out} experiment={preset}\n"
          f"      or: python -m locality.run model={name} dataset={dataset} 'model.patch_sizes=[{sizes}]'")


@hydra.main(version_base="1.3", config_path="../conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_calibration(cfg, out)
    except USER_ERRORS as exc:
        exit_for_user_error("locality.calibrate", exc, out)


if __name__ == "__main__":
    main()
