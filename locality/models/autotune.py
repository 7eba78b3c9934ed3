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
2. base: every survivor on all samples and ``SCREEN_IMAGES`` images: the start of the span over
   which its cost per added image is measured (hundreds of times the images, so noise between
   two close timings cannot make a kernel of large fixed cost look free per image);
3. grow, each kernel on its own count: 2x to 16x more images a round (straight to its floor
   where that call is predicted to take at most ``JUMP_MAX_S``) until it is *judged*: its call
   took ``MIN_TIMED_S`` on at least its ``min_images`` (a kernel's floor: below it, its fixed
   cost per call says nothing of its rate) and, without a floor, twice its base time. A kernel
   already judged waits, so a fast one is not timed on the images a slow-starting one needs.
   After each round, one whose cost per image is known and exceeds ``DROP_FACTOR`` times the
   best judged one is dropped;
4. final: ``REPEATS`` alternating timed calls of each survivor within ``FINAL_FACTOR`` of the
   best, each on its own count (A B A B …, so a machine whose speed drifts treats them alike;
   its last round's call is the first of them). Each kernel's cost at the full count is its
   cost per added image times the images plus its fixed cost per call times ``fixed_calls``
   (1, or the chunks of a kernel whose fixed cost is per chunk); the smallest wins.

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
FINAL_FACTOR = 1.5  # only kernels within this factor of the best per image go to the final repeats
JUMP_MAX_S = 0.5  # a kernel below its floor of images goes straight to it if that call is predicted this short
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
    source: str  # "measured", "store", "only candidate" or how it was inferred


def _added_image_rate(seconds: float, images: int, seconds_before: float, images_before: int) -> float:
    """Seconds per image added between two timings (``images_before`` then ``images``)."""
    return max(seconds - seconds_before, 0.0) / max(images - images_before, 1)


def _full_count_rate(seconds: float, images: int, seconds_before: float, images_before: int,
                     total_images: int, fixed_calls: int = 1) -> float:
    """Seconds per image at ``total_images``, from two timings: the cost per added image r
    (:func:`_added_image_rate`), plus the fixed part f = seconds - r·images, paid
    ``fixed_calls`` times over all images (r + calls·f / total). Without a fixed part this is
    seconds / images."""
    rate = _added_image_rate(seconds, images, seconds_before, images_before)
    fixed = max(seconds - rate * images, 0.0)
    return rate + fixed * fixed_calls / max(total_images, images)


@dataclass
class _Track:
    """One candidate's timings at all samples during a probe: the first (the base of its
    rates, on the screen's images) and the latest, on its own count of images; ``floor``: its
    ``min_images``."""

    base_seconds: float
    base_images: int
    seconds: float
    images: int
    floor: int
    fixed_calls: int = 1
    known_rate: float = 0.0  # seconds per image measured at these shapes before (0: none)

    @classmethod
    def first(cls, seconds: float, images: int, floor: int, fixed_calls: int = 1, known_rate: float = 0.0
              ) -> _Track:
        return cls(seconds, images, seconds, images, floor, fixed_calls, known_rate)

    def record(self, images: int, seconds: float) -> None:
        self.images, self.seconds = images, seconds

    def rate(self, total: int) -> float:
        """Seconds per image at ``total`` images (:func:`_full_count_rate` from the base)."""
        return _full_count_rate(self.seconds, self.images, self.base_seconds, self.base_images, total,
                                self.fixed_calls)

    def rate_known(self, total: int) -> bool:
        """Whether the latest timing is the cost per image's: the kernel ran on every image, or
        on its floor with at least twice its base time (its fixed cost no longer dominates)."""
        return self.images >= total or (self.base_images < self.images and self.floor <= self.images
                                        and self.seconds >= 2 * self.base_seconds)

    def judged(self, total: int) -> bool:
        """Whether this kernel needs no more images: it ran on every image, or on its floor for
        at least MIN_TIMED_S, and (without a floor, which says where its timing means something)
        for at least twice its base time, so that its cost per image shows above its fixed cost."""
        if self.images >= total:
            return True
        if self.images < self.floor or self.seconds < MIN_TIMED_S:
            return False
        return self.floor > 0 or self.seconds >= 2 * self.base_seconds

    def next_images(self, total: int) -> int:
        """The next count: toward the one where the kernel is judged, predicted from its cost per
        added image so far, or its known rate before its first round (25 % beyond it), at least
        2x and at most GROWTH² times the last (GROWTH times without a cost per image yet), or
        straight to its floor where that call is predicted to take at most JUMP_MAX_S. A kernel
        that turns out slow costs at most GROWTH² its last call (or JUMP_MAX_S, mispredicted by
        its cost per image) before the drop rule sees it."""
        want = max(MIN_TIMED_S, 0.0 if self.floor else 2 * self.base_seconds)
        slope = (_added_image_rate(self.seconds, self.images, self.base_seconds, self.base_images)
                 if self.images > self.base_images else self.known_rate)
        if slope > 0:
            target = max(self.floor, math.ceil(1.25 * (self.images + (want - self.seconds) / slope)))
            if self.images < self.floor and self.seconds + slope * (self.floor - self.images) <= JUMP_MAX_S:
                return min(total, target)  # straight to its floor (or beyond, for MIN_TIMED_S)
        else:
            target = max(self.floor, GROWTH * self.images)
        return min(total, max(2 * self.images, min(GROWTH**2 * self.images, target)))


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
               min_images: Mapping[str, int] | None = None, fixed_calls: Mapping[str, int] | None = None,
               known_rates: Mapping[str, float] | None = None) -> Decision:
        """The fastest of ``candidates`` (name -> prepare) for ``key``: from memory, the store, or
        measured now (then stored). A single candidate is returned without measuring.
        ``min_images``: per candidate, the fewest images at which its time says anything (a
        kernel of large fixed cost per call): it is not dropped before it ran on that many.
        ``fixed_calls``: per candidate, how often a step over all images pays the fixed cost of
        one call (default 1; a kernel whose fixed cost is per chunk: its chunks).
        ``known_rates``: per candidate, seconds per image measured at these shapes before (a
        decision of a related key): such a candidate was screened then, and its first round
        can aim at its floor at once; with every candidate known, the screen is skipped."""
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
        decision = self.measure(candidates, total_images, total_samples, min_images, fixed_calls, known_rates)
        self._decisions[key] = decision
        self._save()
        rates = ", ".join(f"{name} {ms:.1f} ms" for name, ms in sorted(decision.ms_per_1000_images.items(),
                                                                      key=lambda kv: kv[1]))
        log.info("kernel choice %s: %s (measured per 1000 images: %s; probe %.2f s)", key, decision.kernel,
                 rates, decision.probe_seconds)
        return decision

    def remember(self, key: str, decision: Decision, why: str) -> Decision:
        """Keep (and store) a decision reached without measuring, e.g. inferred from measured
        ones by the model; ``why`` goes to the log."""
        self._load()
        self._decisions[key] = decision
        self._save()
        log.info("kernel choice %s: %s (%s)", key, decision.kernel, why)
        return decision

    def known(self, key: str) -> Decision | None:
        """The decision remembered for ``key`` (in memory or the store), or None."""
        self._load()
        return self._decisions.get(key)

    def known_with_prefix(self, prefix: str) -> dict[str, Decision]:
        """Every remembered decision whose key starts with ``prefix``, by key."""
        self._load()
        return {key: d for key, d in self._decisions.items() if key.startswith(prefix)}

    def measure(self, candidates: Mapping[str, Prepare], total_images: int, total_samples: int,
                min_images: Mapping[str, int] | None = None, fixed_calls: Mapping[str, int] | None = None,
                known_rates: Mapping[str, float] | None = None) -> Decision:
        """The staged probe of the module docstring; returns the decision (not stored)."""
        start = time.perf_counter()
        floor = {name: min((min_images or {}).get(name, 0), total_images) for name in candidates}
        known = {name: rate for name, rate in (known_rates or {}).items() if name in candidates and rate > 0}
        # screen: one sample, a few images, after a warm-up on one image (first calls pay
        # one-off setup: JIT, primitive caches, allocations); the one-image time is the
        # kernel's fixed cost per call, so the screen judges the cost per added image
        images = min(SCREEN_IMAGES, total_images)
        ones = {name: prepare(1, 1) for name, prepare in candidates.items()}
        for run in ones.values():
            self._sync(run())
        per_image: dict[str, float] = {}
        alive = list(candidates)
        if len(known) < len(candidates):  # (every candidate screened before at these shapes: no screen)
            runs = {name: prepare(images, 1) for name, prepare in candidates.items()}
            fixed = {name: self._time(run) for name, run in ones.items()}
            screen = {name: self._time(run) for name, run in runs.items()}
            alive = self._screened(screen, images, fixed, floor)
            per_image = {name: _full_count_rate(s, images, fixed[name], 1, total_images) for name, s in screen.items()}
        tracks: dict[str, _Track] = {}
        if len(alive) > 1:
            # every survivor at all samples on the screen's images: the base of its rates (the
            # rounds' costs per added image are measured from here, over the whole span: between
            # two close timings noise can make a kernel of large fixed cost look free per image)
            tracks = {name: _Track.first(self._time(candidates[name](images, total_samples)), images, floor[name],
                                         (fixed_calls or {}).get(name, 1), known.get(name, 0.0))
                      for name in alive}
            alive = self._grow(candidates, tracks, total_images, total_samples)
            for name, track in tracks.items():
                per_image[name] = track.rate(total_images)
            best = min(per_image[name] for name in alive)
            alive = [name for name in alive if per_image[name] <= FINAL_FACTOR * best]
            if len(alive) > 1:  # final: the close ones, alternating repeats at their own counts, medians
                runs = {name: candidates[name](tracks[name].images, total_samples) for name in alive}
                samples = {name: [tracks[name].seconds] for name in alive}  # the last round's call is the first
                for _ in range(REPEATS - 1):
                    for name, run in runs.items():
                        samples[name].append(self._time(run))
                for name in alive:
                    tracks[name].seconds = statistics.median(samples[name])
                    per_image[name] = tracks[name].rate(total_images)
        winner = min(alive, key=lambda name: per_image[name])
        counted = tracks[winner].images if winner in tracks else images
        seconds = time.perf_counter() - start
        self.probe_seconds_total += seconds
        return Decision(winner, {name: 1e6 * s for name, s in per_image.items()}, counted, seconds, "measured")

    def _grow(self, candidates: Mapping[str, Prepare], tracks: dict[str, _Track], total_images: int,
              total_samples: int) -> list[str]:
        """Rounds on all samples: each candidate not yet judged (:meth:`_Track.judged`) runs on
        more images (:meth:`_Track.next_images`), the others keep their last timing; after each
        round a candidate whose cost per image is known and exceeds DROP_FACTOR times that of
        the best judged one is dropped. Returns the survivors, every one judged."""
        alive = list(tracks)
        while True:
            pending = [name for name in alive if not tracks[name].judged(total_images)]
            if not pending or len(alive) == 1:
                return alive
            for name in pending:
                track = tracks[name]
                count = track.next_images(total_images)
                track.record(count, self._time(candidates[name](count, total_samples)))
            judged = [name for name in alive if tracks[name].judged(total_images)]
            if judged:
                best = min(tracks[name].rate(total_images) for name in judged)
                alive = [name for name in alive if not tracks[name].rate_known(total_images)
                         or tracks[name].rate(total_images) <= DROP_FACTOR * best]

    @staticmethod
    def _screened(seconds: dict[str, float], images: int, one_image: dict[str, float],
                  floor: Mapping[str, int]) -> list[str]:
        """The screen's survivors: a candidate is dropped when it took more than DROP_FACTOR
        times the best (and more than DROP_FLOOR_S) *and* cost more than DROP_FACTOR times the
        best per image added after its one-image call, unless its time grew less than 2x (a
        fixed cost per call still dominates it) or its floor of images lies above the screen's."""
        best = min(seconds.values())
        added = {name: _added_image_rate(s, images, one_image[name], 1) for name, s in seconds.items()}
        best_added = min(added.values())
        return [name for name, s in seconds.items()
                if s <= max(DROP_FACTOR * best, DROP_FLOOR_S) or added[name] <= DROP_FACTOR * best_added
                or s < 2 * one_image[name] or images < floor[name]]

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
