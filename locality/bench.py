"""The benchmark app: ``python -m locality.bench`` (``--help`` for the options).

Reads the configured dataset, model and sampler settings and hands them to
:func:`locality.benchmarking.benchmark`; prints the report (and with ``bench.kernels`` the
kernel table) and writes it as JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig

from locality.atomic import write_json_atomic
from locality.benchmarking import TABLE_KERNELS, BenchSettings, benchmark
from locality.config import ConfigError, get_bool, get_float, get_int, register_resolvers
from locality.settings import kernel_store_dir, load_training_images, model_params

register_resolvers()
log = logging.getLogger("locality.bench")


def bench_settings(cfg: DictConfig) -> BenchSettings:
    smp, bench = cfg.sampler, cfg.bench
    return BenchSettings(
        num_samples=get_int(smp, "num_samples", "sampler", minimum=1),
        num_steps=get_int(smp, "num_steps", "sampler", minimum=1),
        batch_size=get_int(smp, "batch_size", "sampler", minimum=1),
        seed=get_int(smp, "seed", "sampler"),
        clip_x0=get_bool(smp, "clip_x0", "sampler"),
        repeats=get_int(bench, "repeats", "bench", minimum=1),
        check_subset=get_int(bench, "check_subset", "bench", minimum=2, optional=True),
        check_samples=get_int(bench, "check_samples", "bench", minimum=0),
        kernels=table_kernels(bench, str(cfg.model.name)),
        max_kernel_slowdown=get_float(bench, "max_kernel_slowdown", "bench", low=1.0),
    )


def table_kernels(bench: DictConfig, name: str) -> tuple[str, ...] | str | None:
    """bench.kernels: null, ``all``, or a list of pca_locality kernels to time side by side."""
    value = bench.get("kernels")
    if value is None:
        return None
    if name != "pca_locality":
        raise ConfigError(f"bench.kernels compares the kernels of pca_locality; model={name} measures its own "
                          "choice per step: drop bench.kernels")
    allowed = (*TABLE_KERNELS, "float64")
    if value == "all":
        return "all"
    names = list(value) if isinstance(value, ListConfig) else [value]
    bad = [k for k in names if k not in allowed]
    if bad or not names:
        raise ConfigError(f"bench.kernels must be all or a list of {', '.join(allowed)}, got {value!r}; "
                          "e.g. bench.kernels=all or bench.kernels=[float32,int8_intmm]")
    return tuple(names)


def run_bench(cfg: DictConfig) -> dict:
    from locality.devices import resolve_device

    device = resolve_device(str(cfg.hardware.device))
    name, params = model_params(cfg.model, device, kernel_store_dir(cfg))
    settings = bench_settings(cfg)
    images = load_training_images(cfg)
    return benchmark(name, params, images, str(cfg.dataset.name), settings)


def format_table(report: dict) -> str:
    """The kernel table as text: kernel, median total, per step, deviation, auto's steps."""
    lines = [f"{'kernel':<28} {'total s':>8} {'per step s (t = ' + ', '.join(map(str, report['timesteps'])) + ')':<60}"
             f" {'max |dev|':>9}  auto's steps"]
    for row in report["kernel_table"]:
        if "skipped" in row:
            lines.append(f"{row['kernel']:<28} skipped: {row['skipped']}")
            continue
        steps = " ".join(f"{s:.2f}" for s in row["step_times_s_median"])
        dev = row.get("max_abs_dev_vs_float64", report.get("max_abs_dev_vs_float64"))
        dev_text = f"{dev:.1e}" if dev is not None else "-"
        auto = row.get("auto_steps", "(see per-step kernels)")
        lines.append(f"{row['kernel']:<28} {row['sampling_total_s_median']:>8.2f} {steps:<60} {dev_text:>9}  {auto}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    report = run_bench(cfg)
    print(json.dumps(report, indent=2))
    if "kernel_table" in report:
        print(format_table(report))
    write_json_atomic(report, Path(str(cfg.bench.output)))


if __name__ == "__main__":
    main()
