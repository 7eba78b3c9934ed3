"""Kernel choice by measurement: time every eligible kernel on the real shapes, run the fastest,
and remember the decision per machine (cuDNN's benchmark mode, Triton's autotuner, FFTW's wisdom).

A model asks :meth:`KernelTuner.choose` with a decision key (what kind of step, which shapes,
which candidates) and, per candidate kernel, a ``prepare(images, samples) -> run`` pair:
``prepare`` builds what the kernel needs for the first ``images`` training images and the first
``samples`` samples (untimed) and returns a callable that computes the step for them (timed). Which kernels are *eligible* (exact enough,
supported by the device) is the model's business; which eligible one is *fastest* is only ever
measured here, never derived from CPU flags or GPU names.

The probe (:meth:`KernelTuner.measure`) is staged so that a pathologically slow backend (a
quantized GEMM running a scalar fallback at 0.24 GOPS) costs milliseconds, not minutes:

1. screen: every candidate once on one sample and ``SCREEN_IMAGES`` images (after an untimed
   warm-up call on one image, and a timed one that gives its fixed cost per call); one that
   takes more than ``DROP_FACTOR`` times the best (and more than ``DROP_FLOOR_S``) *and* costs
   more than ``DROP_FACTOR`` times the best per added image is dropped (a kernel whose fixed
   cost dominates tiny workloads is not judged by them);
2. grow: the survivors on all samples and 4x more images per round, with the same rule (the
   cost per added image from the previous round), until the fastest takes ``MIN_TIMED_S`` and
   every survivor has run on its ``min_images`` (a kernel's own floor: below it, its fixed cost
   per call says nothing of its rate), or every image is used;
3. final: ``REPEATS`` alternating timed calls of each survivor within ``FINAL_FACTOR`` of the
   best (A B A B …, so a machine whose speed drifts treats them alike; the last round's call is
   the first of them); with the first round's time at all samples (``SCREEN_IMAGES`` images:
   a span of hundreds of times the images, so noise cannot hide the slope) this gives each
   kernel's cost per added image and its fixed cost per call, and the smallest cost per image at the
   full count wins (a kernel of large fixed cost is not judged by a small probe).

Decisions are kept in memory and, with a ``store_dir``, in one JSON file per machine
(:func:`machine_description`: CPU model and flags or GPU name, torch version, thread count),
written atomically; a damaged store is measured again with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SCREEN_IMAGES = 4
GROWTH = 4
MIN_TIMED_S = 0.02
DROP_FACTOR = 4.0
DROP_FLOOR_S = 0.005
FINAL_FACTOR = 2.0  # only kernels within this factor of the best per image go to the final repeats
REPEATS = 3
STORE_VERSION = 1

Prepare = Callable[[int, int], Callable[[], object]]  # (images, samples) -> the timed call


@dataclass(frozen=True)
class Decision:
    """The measured choice for one key: the winning kernel and every candidate's milliseconds
    per 1 000 images, estimated for the full count from the last round it took part in (empty:
    not measured, a single candidate)."""

    kernel: str
    ms_per_1000_images: dict[str, float]
    probe_images: int
    probe_seconds: float
    source: str  # "measured", "store" or "only candidate"


def _added_image_rate(seconds: float, images: int, seconds_before: float, images_before: int) -> float:
    """Seconds per image added between two timings (``images_before`` then ``images``)."""
    return max(seconds - seconds_before, 0.0) / max(images - images_before, 1)


def _full_count_rate(seconds: float, images: int, seconds_before: float, images_before: int,
                     total_images: int) -> float:
    """Seconds per image at ``total_images``, from two timings: the cost per added image r
    (:func:`_added_image_rate`), plus the fixed part f = seconds - r·images spread over all
    images (r + f / total). Without a fixed part this is seconds / images."""
    rate = _added_image_rate(seconds, images, seconds_before, images_before)
    fixed = max(seconds - rate * images, 0.0)
    return rate + fixed / max(total_images, images)


def shape_key(n: int, batch: int, num_images: int, chunk_size: int | None) -> str:
    """The shapes part of a decision key: values per image, samples, images to the nearest
    power of two, and an explicit chunk size."""
    key = f"n={n}|B={batch}|N~2^{round(math.log2(max(num_images, 1)))}"
    return key + (f"|chunk={chunk_size}" if chunk_size is not None else "")


def _cpu_model_and_flags() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.strip()
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def machine_description(device: torch.device) -> dict[str, str]:
    """What a measured decision depends on besides the shapes: the processor (model name and a
    digest of its feature flags) or the GPU, the torch build, and the CPU thread count."""
    model, flags = _cpu_model_and_flags()
    desc = {"device_type": device.type, "cpu": model, "cpu_flags_sha": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "torch": torch.__version__, "threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        desc["gpu"] = torch.cuda.get_device_name(device)
        desc["cuda"] = str(torch.version.cuda)
    return desc


class KernelTuner:
    """Measures and remembers which kernel is fastest for a decision key on this machine.

    ``store_dir``: where the per-machine JSON lives (``paths.cache_dir``/kernels in the apps);
    None keeps decisions for the life of this object only. One tuner may serve several models."""

    def __init__(self, device: torch.device | str, store_dir: str | Path | None = None) -> None:
        self.device = torch.device(device)
        self.machine = machine_description(self.device)
        digest = hashlib.sha256(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()[:16]
        self.store_path = Path(store_dir) / f"{digest}.json" if store_dir is not None else None
        self._decisions: dict[str, Decision] = {}
        self._loaded = False
        self._announced: set[str] = set()  # store decisions already logged
        self.probe_seconds_total = 0.0  # time spent measuring by this tuner (for the logs and the bench)

    def choose(self, key: str, candidates: Mapping[str, Prepare], total_images: int, total_samples: int,
               min_images: Mapping[str, int] | None = None) -> Decision:
        """The fastest of ``candidates`` (name -> prepare) for ``key``: from memory, the store, or
        measured now (then stored). A single candidate is returned without measuring.
        ``min_images``: per candidate, the fewest images at which its time says anything (a
        kernel of large fixed cost per call): it is not dropped before it ran on that many."""
        if not candidates:
            raise ValueError("KernelTuner.choose needs at least one candidate")
        if len(candidates) == 1:
            return Decision(next(iter(candidates)), {}, 0, 0.0, "only candidate")
        self._load()
        known = self._decisions.get(key)
        if known is not None and known.kernel in candidates:
            if known.source == "store" and key not in self._announced:
                self._announced.add(key)
                log.info("kernel choice %s: %s (from the kernel store %s)", key, known.kernel, self.store_path)
            return known
        decision = self.measure(candidates, total_images, total_samples, min_images)
        self._decisions[key] = decision
        self._save()
        rates = ", ".join(f"{name} {ms:.1f} ms" for name, ms in sorted(decision.ms_per_1000_images.items(),
                                                                      key=lambda kv: kv[1]))
        log.info("kernel choice %s: %s (measured per 1000 images: %s; probe %.2f s)", key, decision.kernel,
                 rates, decision.probe_seconds)
        return decision

    def known(self, key: str) -> Decision | None:
        """The decision remembered for ``key`` (in memory or the store), or None."""
        self._load()
        return self._decisions.get(key)

    def known_with_prefix(self, prefix: str) -> list[Decision]:
        """Every remembered decision whose key starts with ``prefix``."""
        self._load()
        return [d for key, d in self._decisions.items() if key.startswith(prefix)]

    def measure(self, candidates: Mapping[str, Prepare], total_images: int, total_samples: int,
                min_images: Mapping[str, int] | None = None) -> Decision:
        """The staged probe of the module docstring; returns the decision (not stored)."""
        start = time.perf_counter()
        floor = {name: min((min_images or {}).get(name, 0), total_images) for name in candidates}
        per_image: dict[str, float] = {}
        # screen: one sample, a few images, after a warm-up on one image (first calls pay
        # one-off setup: JIT, primitive caches, allocations); the one-image time is the
        # kernel's fixed cost per call, so the screen judges the cost per added image
        images = min(SCREEN_IMAGES, total_images)
        runs = {name: prepare(images, 1) for name, prepare in candidates.items()}
        ones = {name: prepare(1, 1) for name, prepare in candidates.items()}
        for run in ones.values():
            self._sync(run())
        fixed = {name: self._time(run) for name, run in ones.items()}
        alive = self._survivors({name: self._time(run) for name, run in runs.items()}, images, per_image,
                                fixed, 1, total_images, floor)
        previous = images
        if len(alive) > 1:  # the cost at all samples, for the first round's cost per added image
            fixed = {name: self._time(candidates[name](previous, total_samples)) for name in alive}
        # the recorded costs per added image are measured from here, over the whole span of the
        # rounds: between two close timings, noise can make it ~0 (a kernel whose fixed cost
        # dominates both would then look free per image)
        base, base_images = dict(fixed), previous
        images = min(SCREEN_IMAGES * GROWTH, total_images)
        while len(alive) > 1:  # grow: all samples, 4x more images a round
            seconds = {name: self._time(candidates[name](images, total_samples)) for name in alive}
            alive = self._survivors(seconds, images, per_image, fixed, previous, total_images, floor,
                                    (base, base_images))
            judged = all(images >= floor[name] for name in alive)
            if (min(seconds.values()) >= MIN_TIMED_S and judged) or images >= total_images:
                break
            fixed, previous = seconds, images
            images = min(total_images, images * GROWTH)
        if len(alive) > 1:  # final: the close ones, alternating repeats, medians, against the previous round
            best = min(per_image[name] for name in alive)
            alive = [name for name in alive if per_image[name] <= FINAL_FACTOR * best]
        if len(alive) > 1:
            runs = {name: candidates[name](images, total_samples) for name in alive}
            # the last round's call is the first of the REPEATS at this count (it ran in the
            # same alternation)
            samples: dict[str, list[float]] = {name: [seconds[name]] for name in alive}
            for _ in range(REPEATS - 1):
                for name, run in runs.items():
                    samples[name].append(self._time(run))
            for name in alive:
                per_image[name] = _full_count_rate(statistics.median(samples[name]), images, base[name],
                                                   base_images, total_images)
        winner = min(alive, key=lambda name: per_image[name])
        seconds = time.perf_counter() - start
        self.probe_seconds_total += seconds
        return Decision(winner, {name: 1e6 * s for name, s in per_image.items()}, images, seconds, "measured")

    @staticmethod
    def _survivors(seconds: dict[str, float], images: int, per_image: dict[str, float],
                   before: dict[str, float], images_before: int, total_images: int,
                   floor: Mapping[str, int], base: tuple[dict[str, float], int] | None = None) -> list[str]:
        """Record each candidate's seconds per image at the full count (:func:`_full_count_rate`,
        from ``base`` = (seconds, images) of an earlier round, default ``before``);
        drop those more than DROP_FACTOR times slower than the best both in total (above
        DROP_FLOOR_S) and per added image (from ``before``, the seconds at ``images_before``),
        unless their time grew less than 2x over 4x the images or they have not yet run on their
        ``floor`` of images: a fixed cost per call (one small GEMM per output value) still
        dominates such a kernel, so this round cannot judge it."""
        best = min(seconds.values())
        added = {name: _added_image_rate(s, images, before.get(name, 0.0), images_before)
                 for name, s in seconds.items()}
        best_added = min(added.values())
        base_seconds, base_images = base if base is not None else (before, images_before)
        for name, s in seconds.items():
            per_image[name] = _full_count_rate(s, images, base_seconds.get(name, 0.0), base_images, total_images)
        return [name for name, s in seconds.items()
                if s <= max(DROP_FACTOR * best, DROP_FLOOR_S) or added[name] <= DROP_FACTOR * best_added
                or s < 2 * before.get(name, 0.0) or images < floor[name]]

    def _time(self, run: Callable[[], object]) -> float:
        start = time.perf_counter()
        self._sync(run())
        return time.perf_counter() - start

    def _sync(self, _result: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _load(self) -> None:
        if self._loaded or self.store_path is None:
            self._loaded = True
            return
        self._loaded = True
        if not self.store_path.exists():
            return
        try:
            data = json.loads(self.store_path.read_text())
            if data.get("version") != STORE_VERSION or data.get("machine") != self.machine:
                raise ValueError("written for another version or machine description")
            for key, entry in data["decisions"].items():
                self._decisions.setdefault(key, Decision(
                    str(entry["kernel"]), {str(k): float(v) for k, v in entry["ms_per_1000_images"].items()},
                    int(entry["probe_images"]), float(entry["probe_seconds"]), "store"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("kernel store %s is unreadable (%s: %s): measuring again, it will be rewritten",
                        self.store_path, type(e).__name__, e)

    def _save(self) -> None:
        if self.store_path is None:
            return
        from locality.atomic import write_cache_or_warn, write_json_atomic

        decisions = {key: {"kernel": d.kernel, "ms_per_1000_images": d.ms_per_1000_images,
                           "probe_images": d.probe_images, "probe_seconds": d.probe_seconds}
                     for key, d in self._decisions.items() if d.source != "only candidate"}
        data = {"version": STORE_VERSION, "machine": self.machine, "decisions": decisions}
        write_cache_or_warn(lambda: write_json_atomic(data, self.store_path), self.store_path, "kernel store",
                            log, "the choice is measured again next run")
