"""The benchmark's measuring core (no Hydra): time statistics fitting and sampling of a
denoiser, read peak memory, and measure the largest deviation from a float64 brute force of the
SPEC formulas (loops over timesteps, direct differences, one-chunk softmax) on a subset.

``python -m locality.bench`` is its Hydra entry point; ``scripts/gpu_check.py`` calls
:func:`benchmark` directly on a machine without Hydra.
"""

from __future__ import annotations

import resource
import statistics as pystats
import time
from dataclasses import dataclass

import torch


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


@dataclass(frozen=True)
class BenchSettings:
    """What to sample and check: the sampler's settings, repeats, and the float64 check
    (``check_samples`` samples along the trajectory, on the first ``check_subset`` images;
    None: all)."""

    num_samples: int = 8
    num_steps: int = 10
    batch_size: int = 8
    seed: int = 0
    clip_x0: bool = True
    repeats: int = 3
    check_subset: int | None = 1000
    check_samples: int = 2
    versus_kernel: str | None = None  # a second model.dense_kernel, timed in alternation


def benchmark(name: str, params: dict, images: torch.Tensor, dataset: str, settings: BenchSettings,
              needs_statistics: bool) -> dict:
    """Time fitting and sampling of model ``name`` (keyword ``params``, ``device`` among them)
    on ``images`` [N, C, H, W]; returns the report (a JSON-able dict).

    With ``settings.versus_kernel`` a second model with that ``dense_kernel`` samples the same
    noise after each run of the first (A B A B …), so both medians come from the same minutes of
    the machine; the report's ``versus`` holds its figures and the ratio of the medians."""
    from locality.models import build_model
    from locality.pipeline import sample
    from locality.statistics import fit_statistics

    device = torch.device(params["device"])
    smp = settings
    check_subset, check_samples = smp.check_subset, smp.check_samples
    report: dict = {"model": name, "dataset": dataset, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "params": {k: str(v) for k, v in params.items()},
                    "num_samples": smp.num_samples, "num_steps": smp.num_steps,
                    "batch_size": smp.batch_size, "threads": torch.get_num_threads(),
                    "num_train_images": int(images.shape[0])}
    shape = tuple(images.shape[1:])

    stats = None
    if needs_statistics:
        start = time.perf_counter()
        stats = fit_statistics(images, progress=False)
        report["statistics_fit_s"] = time.perf_counter() - start

    model = build_model(name, images, stats, **params)
    if hasattr(model, "plan"):  # per-timestep constants (masks), like the statistics: timed apart
        from locality.schedule import ddim_timesteps

        start = time.perf_counter()
        for t in ddim_timesteps(smp.num_steps):
            model.plan(int(t))
        report["mask_build_s"] = time.perf_counter() - start
    rival = None
    if smp.versus_kernel is not None:
        rival = build_model(name, images, stats, **{**params, "dense_kernel": smp.versus_kernel})
        rival.share_masks(model)  # the same masks, built once
    # the reference figure (2.1 GB) is the process peak; report both the process peak and the
    # growth while sampling (VmHWM reset before sampling where Linux allows it)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = _vm_hwm_bytes()
    hwm_reset = _reset_hwm()
    rss_before = _vm_hwm_bytes() if hwm_reset else base_rss
    totals, per_step = [], []
    result = None
    kernels: dict[int, str] = {}
    rival_totals, rival_steps, rival_kernels = [], [], {}

    def run(which, record: dict, trajectory: bool):
        return sample(which, num_samples=smp.num_samples, image_shape=shape, num_steps=smp.num_steps,
                      seed=smp.seed, batch_size=smp.batch_size, device=device, clip_x0=smp.clip_x0,
                      keep_trajectory=trajectory,
                      on_step=lambda i, t, x_t, x0, part: record.__setitem__(int(t), str(which.last_kernel))
                      if hasattr(which, "last_kernel") else None)

    for _ in range(smp.repeats):
        result = run(model, kernels, check_samples > 0)
        totals.append(result.total_time_s)
        per_step.append(result.step_times_s)
        if rival is not None:
            other = run(rival, rival_kernels, False)
            rival_totals.append(other.total_time_s)
            rival_steps.append(other.step_times_s)
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
    if hasattr(model, "planned_strategies"):
        report["strategies"] = model.planned_strategies()
    if getattr(model, "last_kernel", None) is not None:  # kernels of the last sampled run, per step
        report["kernels"] = kernels
    if rival is not None:
        report["versus"] = {"dense_kernel": smp.versus_kernel,
                            "sampling_total_s_median": pystats.median(rival_totals),
                            "sampling_total_s_all": rival_totals,
                            "step_times_s_median": [pystats.median(col) for col in zip(*rival_steps)],
                            "kernels": rival_kernels,
                            "speedup_of_model": pystats.median(rival_totals) / pystats.median(totals)}

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
