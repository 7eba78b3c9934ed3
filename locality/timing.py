"""Timing a denoiser, the benchmark's core (no Hydra): time the statistics fit, the mask building
and the sampling of a denoiser, read peak memory, measure the largest deviation from the float64
oracle (:mod:`locality.models.oracle`) on a subset, and with ``kernels`` time every eligible
kernel of pca_locality side by side (alternating runs over the same noise) in one table.

``python -m locality.bench`` is its Hydra entry point; ``scripts/gpu_check.py`` calls
:func:`benchmark` directly on a machine without Hydra.
"""

from __future__ import annotations

import resource
import statistics as pystats
import time
from dataclasses import dataclass

import torch

TABLE_KERNELS = ("float32", "bf16x6", "bf16x3", "int8_onednn", "int8_intmm", "int8_gather")  # + float64: model.dtype=float64
TABLE_PROBE_STEP = 500  # the dense step on which the table's kernels are screened for speed

MODELS_CHECKED_IN_FLOAT64 = ("els", "pspc")  # the bench's deviation check: against the model in float64


def table_kernels(value, name: str) -> tuple[str, ...] | str | None:
    """``bench.kernels`` checked: None, ``all``, or names of pca_locality's kernels (a name or a
    list) to time side by side; ``name`` is the benchmarked model."""
    if value is None:
        return None
    if name != "pca_locality":
        raise ValueError(f"bench.kernels compares the kernels of pca_locality; model={name} measures its own "
                         "choice per step: drop bench.kernels")
    if value == "all":
        return "all"
    allowed = (*TABLE_KERNELS, "float64")
    names = [value] if isinstance(value, str) else list(value)
    bad = [k for k in names if k not in allowed]
    if bad or not names:
        raise ValueError(f"bench.kernels must be all or a list of {', '.join(allowed)}, got {value!r}; "
                         "e.g. bench.kernels=all or bench.kernels=[float32,int8_intmm]")
    return tuple(names)


@dataclass(frozen=True)
class BenchSettings:
    """What to sample and check: the sampler's settings, repeats, the float64 check
    (``check_samples`` samples along the trajectory, on the first ``check_subset`` images;
    None: all) and the kernel table (``kernels``: None, ``all`` or names of dense kernels;
    a kernel measured more than ``max_kernel_slowdown`` times slower than the fastest on one
    dense step is listed, not run)."""

    num_samples: int = 8
    num_steps: int = 10
    batch_size: int = 8
    seed: int = 0
    clip_x0: bool = True
    repeats: int = 3
    check_subset: int | None = 1000
    check_samples: int = 2
    kernels: tuple[str, ...] | str | None = None
    max_kernel_slowdown: float = 10.0


@dataclass
class Contender:
    """A model timed in the alternation, with what its runs recorded."""

    label: str
    model: object
    params: dict
    totals: list
    steps: list
    step_kernels: dict
    result: object = None
    probe_s: float = 0.0  # kernel measuring during its own runs (its model's tuner)


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


def benchmark(name: str, params: dict, images: torch.Tensor, dataset: str, settings: BenchSettings) -> dict:
    """Time fitting and sampling of model ``name`` (keyword ``params``, ``device`` among them)
    on ``images`` [N, C, H, W]; returns the report (a JSON-able dict)."""
    device = torch.device(params["device"])
    report = describe(name, params, images, dataset, settings, device)
    stats, model = fit_and_build(name, params, images, settings.num_steps, report)
    contenders, skipped = [Contender(name, model, params, [], [], {})], {}
    if settings.kernels is not None:
        rivals, skipped = kernel_contenders(name, params, images, stats, model, settings)
        contenders += rivals
    report.update(measure_sampling(contenders, tuple(images.shape[1:]), settings, device))
    report.update(kernel_choices(model, contenders[0].probe_s))
    if settings.check_samples > 0:
        main = contenders[0]
        report.update(deviation_report(name, main.params, images, stats, main.result, settings, device))
    if settings.kernels is not None:
        report["kernel_table"] = kernel_table(name, images, stats, contenders, skipped, settings, device)
    return report


def fit_and_build(name: str, params: dict, images: torch.Tensor, num_steps: int, report: dict):
    """(statistics or None, model), with ``statistics_fit_s`` and ``mask_build_s`` in ``report``:
    the per-timestep constants (masks), like the statistics, are timed apart from sampling."""
    from locality.models import build_model, get_model_class
    from locality.statistics import fit_statistics

    stats = None
    if get_model_class(name).needs_statistics:
        start = time.perf_counter()
        stats = fit_statistics(images, progress=False)
        report["statistics_fit_s"] = time.perf_counter() - start
    model = build_model(name, images, stats, **params)
    if hasattr(model, "plan"):
        report["mask_build_s"] = build_masks(model, num_steps)
    return stats, model


def measure_sampling(contenders: list[Contender], shape: tuple[int, ...], settings: BenchSettings,
                     device: torch.device) -> dict:
    """The default's sampling times (:func:`timing_report`) and the peak memory while the
    contenders sample in alternation."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = _vm_hwm_bytes()
    rss_before = _vm_hwm_bytes() if _reset_hwm() else base_rss
    sample_alternating(contenders, shape, settings, device)
    report = timing_report(contenders[0])
    peak = _vm_hwm_bytes()
    report["peak_rss_process_gib"] = peak / 2**30
    report["peak_rss_growth_sampling_gib"] = (peak - rss_before) / 2**30
    if device.type == "cuda":
        report["cuda_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return report


def kernel_choices(model, own_probe_s: float) -> dict:
    """What a model that chooses kernels planned and how long it spent measuring them during its
    own runs (``own_probe_s``: its first run's measuring), and its tuner in all (with the
    forced kernels' models and the kernel table's rates, which share it)."""
    report = {}
    if hasattr(model, "planned_strategies"):
        report["strategies"] = model.planned_strategies()
    if hasattr(model, "tuner"):
        report["kernel_probe_s"] = own_probe_s
        report["kernel_probe_s_all"] = model.tuner.probe_seconds_total
    return report


def describe(name: str, params: dict, images: torch.Tensor, dataset: str, settings: BenchSettings,
             device: torch.device) -> dict:
    """The report's header: what ran where."""
    import platform

    from locality.models.autotune import machine_description

    return {"model": name, "dataset": dataset, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu": machine_description(device)["cpu"] or platform.processor(),
            "params": {k: str(v) for k, v in params.items() if k != "tuner"},
            "num_samples": settings.num_samples, "num_steps": settings.num_steps,
            "batch_size": settings.batch_size, "threads": torch.get_num_threads(),
            "num_train_images": int(images.shape[0])}


def build_masks(model, num_steps: int) -> float:
    """Seconds to build and plan the masks of every timestep."""
    from locality.schedule import ddim_timesteps

    start = time.perf_counter()
    for t in ddim_timesteps(num_steps):
        model.plan(int(t))
    return time.perf_counter() - start


def kernel_contenders(name: str, params: dict, images: torch.Tensor, stats, model,
                      settings: BenchSettings) -> tuple[list[Contender], dict[str, str]]:
    """pca_locality models with each eligible dense kernel forced (and ``float64``: model.dtype
    float64), sharing the first model's masks and tuner; kernels that cannot run here, or run
    more than ``max_kernel_slowdown`` times slower than the fastest on one dense step, are
    returned as (name -> why) instead."""
    from locality.models import build_model
    from locality.models.pca_locality.selection import step_candidates

    kernels = table_kernels(settings.kernels, name)
    wanted = TABLE_KERNELS if kernels == "all" else kernels
    g = torch.Generator().manual_seed(settings.seed)
    x = torch.randn((settings.batch_size, *images.shape[1:]), generator=g)
    step = model.step_inputs(x, TABLE_PROBE_STEP)
    skipped, usable = {}, []
    for kernel in wanted:
        if kernel == "float64":
            usable.append(kernel)
            continue
        why = model.kernels[kernel].unavailable(step.plan, forced=False)
        if why is None and kernel not in step_candidates(model.kernels, step, kernel, False)[1]:
            why = f"not accurate enough at t = {TABLE_PROBE_STEP}"
        if why is None:
            usable.append(kernel)
        else:
            skipped[kernel] = why
    rates = screen_kernels(model, step, usable)
    best = min(rates.values())
    contenders = []
    for kernel in usable:
        if rates[kernel] > settings.max_kernel_slowdown * best:
            skipped[kernel] = (f"{rates[kernel] / best:.0f}x slower than the fastest on one dense step "
                               f"(t = {TABLE_PROBE_STEP}: {rates[kernel]:.1f} ms per 1000 images)")
            continue
        forced = {**params, "dtype": torch.float64} if kernel == "float64" else {**params, "dense_kernel": kernel}
        rival = build_model(name, images, stats, **forced)
        rival.share_masks(model)
        contenders.append(Contender(kernel, rival, forced, [], [], {}))
    return contenders, skipped


def screen_kernels(model, step, kernels: list[str]) -> dict[str, float]:
    """Milliseconds per 1000 images of each kernel on ``step`` (the tuner's staged probe)."""
    from locality.models.pca_locality.kernel import Precision
    from locality.models.pca_locality.selection import kernel_probes, step_candidates

    if len(kernels) < 2:
        return {k: 1.0 for k in kernels}
    chosen = {k: Precision(torch.float64) if k == "float64" else step_candidates(model.kernels, step, k, False)[1][k]
              for k in kernels}
    probes = kernel_probes(model.kernels, chosen, step, model.chunk_size)
    return model.tuner.measure(probes, model.training.count, step.x64.shape[0]).ms_per_1000_images


def sample_alternating(contenders: list[Contender], shape: tuple[int, ...], settings: BenchSettings,
                       device: torch.device) -> None:
    """``settings.repeats`` rounds; in each, every contender samples the same noise in turn (A B C
    A B C …), so their medians come from the same minutes of a machine whose speed drifts."""
    from locality.sampling import sample

    for _ in range(settings.repeats):
        for c in contenders:
            model = c.model

            def record(i, t, x_t, x0, part, c=c, model=model):
                if getattr(model, "last_kernel", None) is not None:
                    c.step_kernels[int(t)] = str(model.last_kernel)

            tuner = getattr(model, "tuner", None)
            probed = tuner.probe_seconds_total if tuner is not None else 0.0
            result = sample(model, num_samples=settings.num_samples, image_shape=shape,
                            num_steps=settings.num_steps, seed=settings.seed, batch_size=settings.batch_size,
                            device=device, clip_x0=settings.clip_x0,
                            keep_trajectory=c is contenders[0] and settings.check_samples > 0, on_step=record)
            if tuner is not None:
                c.probe_s += tuner.probe_seconds_total - probed
            c.totals.append(result.total_time_s)
            c.steps.append(result.step_times_s)
            c.result = result if c is contenders[0] else None


def timing_report(c: Contender) -> dict:
    """Medians of a contender's runs: in total, per step, per step index; its kernel per step."""
    out = {"sampling_total_s_median": pystats.median(c.totals), "sampling_total_s_all": c.totals,
           "time_per_step_s_median": pystats.median(c.totals) / len(c.steps[0]),
           "step_times_s_median": [pystats.median(col) for col in zip(*c.steps)]}
    if c.result is not None:
        out["timesteps"] = c.result.timesteps
    if c.step_kernels:
        out["step_kernels"] = c.step_kernels
    return out


def deviation_report(name: str, params: dict, images: torch.Tensor, stats, result, settings: BenchSettings,
                     device: torch.device) -> dict:
    """The model (built on the first ``check_subset`` images) against the float64 oracle on
    ``check_samples`` samples of the sampled trajectory, at every step."""
    from locality.models import build_model
    from locality.models.oracle import model_oracle
    from locality.statistics import fit_statistics

    subset = images[: settings.check_subset or images.shape[0]]
    sub_stats = fit_statistics(subset, progress=False) if stats is not None else None
    sub_model = build_model(name, subset, sub_stats, **params)
    flat = subset.reshape(len(subset), -1)
    # els and pspc: their plain oracles (locality.models.oracle) hold B·N·P·k² values per pixel,
    # beyond a bench; the reference is the model in float64, which tests/test_peers.py checks
    # against those oracles within 1e-10
    reference = build_model(name, subset, sub_stats, **{**params, "dtype": torch.float64}) \
        if name in MODELS_CHECKED_IN_FLOAT64 else None
    per = []
    for i, t in enumerate(result.timesteps):
        x = result.x_t[i][: settings.check_samples]
        got = sub_model(x.to(device), t).double().cpu().reshape(len(x), -1)
        if reference is not None:
            want = reference(x.to(device), t).double().cpu().reshape(len(x), -1)
        else:
            want = model_oracle(name, x.reshape(len(x), -1), t, flat, sub_stats, params)
        per.append(float((got - want).abs().max()))
    return {"check_subset": int(subset.shape[0]), "max_abs_dev_vs_float64": max(per), "max_abs_dev_per_step": per}


def kernel_table(name: str, images: torch.Tensor, stats, contenders: list[Contender], skipped: dict[str, str],
                 settings: BenchSettings, device: torch.device) -> list[dict]:
    """One row per kernel: median total and per-step times, the largest deviation from the oracle
    (on the check subset, along the default's trajectory), and the steps ``auto`` gave it."""
    main = contenders[0]
    rows = []
    for c in contenders:
        row = {"kernel": c.label if c is not main else f"{c.label} (default: auto)",
               "sampling_total_s_median": pystats.median(c.totals),
               "step_times_s_median": [pystats.median(col) for col in zip(*c.steps)],
               "step_kernels": c.step_kernels}
        if c is not main:
            row["ratio_to_default"] = row["sampling_total_s_median"] / pystats.median(main.totals)
            row["auto_steps"] = [t for t, k in main.step_kernels.items() if k.split("x")[0] == c.label
                                 or k == c.label]
            if settings.check_samples > 0 and main.result is not None:
                row["max_abs_dev_vs_float64"] = deviation_report(name, c.params, images, stats, main.result,
                                                                 settings, device)["max_abs_dev_vs_float64"]
        rows.append(row)
    rows += [{"kernel": k, "skipped": why} for k, why in skipped.items()]
    return rows
