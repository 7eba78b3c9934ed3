"""The benchmark app: ``python -m locality.bench`` (``--help`` for the options).

Loads the configured dataset and model settings and hands them to
:func:`locality.benchmarking.benchmark`; prints the report and writes it as JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from locality.atomic import write_json_atomic
from locality.benchmarking import BenchSettings, benchmark
from locality.config import ConfigError, get_bool, get_choice, get_int, register_resolvers

register_resolvers()
log = logging.getLogger("locality.bench")


def run_bench(cfg: DictConfig) -> dict:
    from locality.devices import resolve_device
    from locality.run import NEEDS_STATISTICS, load_training_images, model_params

    device = resolve_device(str(cfg.hardware.device))
    name, params = model_params(cfg.model, device)
    smp = cfg.sampler
    settings = BenchSettings(
        num_samples=get_int(smp, "num_samples", "sampler", minimum=1),
        num_steps=get_int(smp, "num_steps", "sampler", minimum=1),
        batch_size=get_int(smp, "batch_size", "sampler", minimum=1),
        seed=get_int(smp, "seed", "sampler"),
        clip_x0=get_bool(smp, "clip_x0", "sampler"),
        repeats=get_int(cfg.bench, "repeats", "bench", minimum=1),
        check_subset=get_int(cfg.bench, "check_subset", "bench", minimum=2, optional=True),
        check_samples=get_int(cfg.bench, "check_samples", "bench", minimum=0),
        versus_kernel=versus_kernel(cfg.bench, name),
    )
    images = load_training_images(cfg)
    return benchmark(name, params, images, str(cfg.dataset.name), settings, name in NEEDS_STATISTICS)


def versus_kernel(bench: DictConfig, name: str) -> str | None:
    """bench.versus_kernel: null, or a model.dense_kernel choice timed side by side (pca_locality)."""
    from locality.models.pca_locality.selection import DENSE_KERNELS

    if bench.get("versus_kernel") is None:
        return None
    if name != "pca_locality":
        raise ConfigError(f"bench.versus_kernel compares dense kernels of pca_locality; model={name} has none: "
                          "drop bench.versus_kernel")
    return get_choice(bench, "versus_kernel", "bench", DENSE_KERNELS)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    report = run_bench(cfg)
    print(json.dumps(report, indent=2))
    write_json_atomic(report, Path(str(cfg.bench.output)))


if __name__ == "__main__":
    main()
