"""The benchmark app: ``python -m locality.bench`` (``--help`` for the options).

Reads the configured dataset, model and sampler settings and hands them to
:func:`locality.timing.benchmark`; prints the report (and with ``bench.kernels`` the
kernel table) and writes it as JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from locality.app.config import get_float, get_int, register_resolvers
from locality.app.settings import SamplerSettings, kernel_store_dir, load_training_images, model_device, model_params
from locality.atomic import write_json_atomic
from locality.timing import BenchSettings, benchmark, table_kernels

register_resolvers()
log = logging.getLogger("locality.bench")


def bench_settings(cfg: DictConfig) -> BenchSettings:
    """``cfg.sampler`` and ``cfg.bench`` -> what to sample, how often, what to check."""
    smp, bench = SamplerSettings.from_config(cfg.sampler), cfg.bench
    return BenchSettings(
        num_samples=smp.num_samples, num_steps=smp.num_steps, batch_size=smp.batch_size, seed=smp.seed,
        clip_x0=smp.clip_x0,
        repeats=get_int(bench, "repeats", "bench", minimum=1),
        check_subset=get_int(bench, "check_subset", "bench", minimum=2, optional=True),
        check_samples=get_int(bench, "check_samples", "bench", minimum=0),
        kernels=table_kernels(bench.get("kernels"), str(cfg.model.name)),
        max_kernel_slowdown=get_float(bench, "max_kernel_slowdown", "bench", low=1.0),
    )


def run_bench(cfg: DictConfig) -> dict:
    """Settings, images, then :func:`locality.timing.benchmark`."""
    settings = bench_settings(cfg)
    name, params = model_params(cfg.model, model_device(cfg), kernel_store_dir(cfg))
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
