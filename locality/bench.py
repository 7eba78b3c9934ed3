"""The benchmark app: ``python -m locality.bench`` (``--help`` for the options).

Times statistics fitting and sampling of the configured denoiser, reads peak memory, and
measures the largest deviation from a float64 brute force of the SPEC formulas (loops over
timesteps, direct differences, one-chunk softmax) on a subset of the data. Prints and writes JSON.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics as pystats
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from locality.atomic import write_json_atomic
from locality.config import get_int, register_resolvers

register_resolvers()
log = logging.getLogger("locality.bench")


def _vm_hwm_bytes() -> int:
    """Peak resident set of this process (VmHWM; falls back to ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def brute_force(name: str, x: torch.Tensor, t: int, images: torch.Tensor, stats, params: dict) -> torch.Tensor:
    """float64 SPEC formula, one chunk, direct differences: x [B, n], images [N, n] -> [B, n]."""
    from locality.models.base import Denoiser
    from locality.models.masks import locality_mask

    abar = Denoiser.alpha_bar(t)
    s = 1.0 / (2.0 * (1.0 - abar) * float(params.get("temperature", 1.0)))
    y = images.double()
    x = x.double()
    mask = None if name == "optimal" else locality_mask(stats, abar, float(params["mask_threshold"]))
    out = []
    for b in range(x.shape[0]):
        sq = (x[b] - abar**0.5 * y).square()  # [N, n]
        if mask is None:
            w = torch.softmax(-s * sq.sum(1), 0)
            out.append(w @ y)
        else:
            w = torch.softmax(-s * (sq @ mask), 0)  # [N, n]
            out.append((w * y).sum(0))
    return torch.stack(out)


def run_bench(cfg: DictConfig) -> dict:
    from locality.devices import resolve_device
    from locality.models import build_model
    from locality.pipeline import sample
    from locality.run import NEEDS_STATISTICS, load_training_images, model_params
    from locality.statistics import fit_statistics

    device = resolve_device(str(cfg.hardware.device))
    name, params = model_params(cfg.model, device)
    repeats = get_int(cfg.bench, "repeats", "bench", minimum=1)
    check_subset = get_int(cfg.bench, "check_subset", "bench", minimum=2, optional=True)
    check_samples = get_int(cfg.bench, "check_samples", "bench", minimum=0)
    smp = cfg.sampler
    report: dict = {"model": name, "dataset": cfg.dataset.name, "device": str(device),
                    "params": {k: str(v) for k, v in params.items()},
                    "num_samples": int(smp.num_samples), "num_steps": int(smp.num_steps),
                    "batch_size": int(smp.batch_size), "threads": torch.get_num_threads()}
    images = load_training_images(cfg)
    report["num_train_images"] = int(images.shape[0])
    shape = tuple(images.shape[1:])

    stats = None
    if name in NEEDS_STATISTICS:
        start = time.perf_counter()
        stats = fit_statistics(images, progress=False)
        report["statistics_fit_s"] = time.perf_counter() - start

    model = build_model(name, images, stats, **params)
    # the reference figure (2.1 GB) is the process peak; report both the process peak and the
    # growth while sampling (VmHWM reset before sampling where Linux allows it)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = _vm_hwm_bytes()
    hwm_reset = _reset_hwm()
    rss_before = _vm_hwm_bytes() if hwm_reset else base_rss
    totals, per_step = [], []
    result = None
    for _ in range(repeats):
        result = sample(model, num_samples=int(smp.num_samples), image_shape=shape,
                        num_steps=int(smp.num_steps), seed=int(smp.seed),
                        batch_size=int(smp.batch_size), device=device, clip_x0=bool(smp.clip_x0),
                        keep_trajectory=check_samples > 0)
        totals.append(result.total_time_s)
        per_step.append(result.step_times_s)
    report["sampling_total_s_median"] = pystats.median(totals)
    report["sampling_total_s_all"] = totals
    report["time_per_step_s_median"] = pystats.median(totals) / len(result.timesteps)
    report["step_times_s_median"] = [pystats.median(col) for col in zip(*per_step)]
    report["timesteps"] = result.timesteps
    peak = _vm_hwm_bytes()
    report["peak_rss_process_gib"] = peak / 2**30
    report["peak_rss_growth_sampling_gib"] = (peak - rss_before) / 2**30
    if device.type == "cuda":
        report["cuda_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    strategies = getattr(model, "_plans", {})
    if strategies:
        report["strategies"] = {int(t): p.strategy for t, p in strategies.items()}

    if check_samples > 0:
        subset = images[: check_subset or images.shape[0]]
        sub_stats = fit_statistics(subset, progress=False) if stats is not None else None
        sub_model = build_model(name, subset, sub_stats, **params)
        worst, per = 0.0, []
        for i, t in enumerate(result.timesteps):
            x = result.x_t[i][:check_samples]
            got = sub_model(x.to(device), t).double().cpu().reshape(len(x), -1)
            want = brute_force(name, x.reshape(len(x), -1), t, subset.reshape(len(subset), -1), sub_stats, params)
            dev = float((got - want).abs().max())
            per.append(dev)
            worst = max(worst, dev)
        report["check_subset"] = int(subset.shape[0])
        report["max_abs_dev_vs_float64"] = worst
        report["max_abs_dev_per_step"] = per
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    report = run_bench(cfg)
    print(json.dumps(report, indent=2))
    write_json_atomic(report, Path(str(cfg.bench.output)))


if __name__ == "__main__":
    main()
