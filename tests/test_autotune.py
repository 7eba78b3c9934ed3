"""The measured kernel choice: the tuner's staged probe with injected slow and fast kernels, its
per-machine store (key, atomic write, recovery from a damaged file), and pca_locality choosing
by measurement with a backend made slow on purpose. No timing asserts: the injected kernels
differ by orders of magnitude, so every machine ranks them alike."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

import locality.models.autotune as autotune
from locality.models import build_model
from locality.models.autotune import KernelTuner, machine_description
from locality.statistics import fit_statistics
from synthetic import eight_bit, local_images, noisy, pca_oracle


def sleeper(seconds_per_image: float, calls: list, fixed_seconds: float = 0.0):
    """A fake kernel: prepare(images, samples) -> a call that sleeps ``fixed_seconds`` plus a
    time in proportion to the images."""
    def prepare(images: int, samples: int):
        def run():
            calls.append(images)
            time.sleep(fixed_seconds + seconds_per_image * images)
        return run
    return prepare


def test_the_fast_kernel_wins_and_the_slow_one_is_dropped_early():
    fast_calls, slow_calls = [], []
    tuner = KernelTuner("cpu")
    decision = tuner.measure({"slow": sleeper(0.01, slow_calls), "fast": sleeper(1e-5, fast_calls)}, 10_000, 8)
    assert decision.kernel == "fast" and decision.source == "measured"
    assert decision.ms_per_1000_images["slow"] > 10 * decision.ms_per_1000_images["fast"]
    # the slow one only ran the warm-up and the fixed-cost call (1 image) and the screen
    # (SCREEN_IMAGES): a bounded cost
    assert slow_calls == [1, 1, autotune.SCREEN_IMAGES]
    assert fast_calls == [1, 1, autotune.SCREEN_IMAGES]  # a lone survivor needs no further rounds
    assert tuner.probe_seconds_total > 0


def test_a_kernel_with_a_large_fixed_cost_is_judged_per_image():
    """One GEMM per output value costs a fixed 30 ms a call but little per image: tiny rounds,
    where it is 100x slower than a kernel of no fixed cost, must not drop it, and at the size
    where the per-image costs dominate it wins."""
    fixed_calls, plain_calls = [], []
    decision = KernelTuner("cpu").measure({"plain": sleeper(1e-4, plain_calls),
                                           "fixed": sleeper(1e-6, fixed_calls, fixed_seconds=0.03)}, 60_000, 8)
    assert decision.kernel == "fixed"
    assert max(fixed_calls) > autotune.SCREEN_IMAGES * autotune.GROWTH  # it went on past the tiny rounds
    assert decision.ms_per_1000_images["plain"] > decision.ms_per_1000_images["fixed"]


def test_a_kernel_is_not_dropped_below_its_own_floor_of_images():
    """A kernel whose timing says nothing below 1 024 images (``min_images``) runs at least that
    many, however slow it looks on fewer; the probe stops there once the fastest took long enough."""
    floor_calls, plain_calls = [], []
    decision = KernelTuner("cpu").measure({"plain": sleeper(1e-5, plain_calls),
                                           "floored": sleeper(2e-3, floor_calls)}, 60_000, 8,
                                          min_images={"floored": 1024})
    assert 1024 in floor_calls and max(floor_calls) == 1024
    assert decision.kernel == "plain"  # still 200x slower per image at 1 024: it loses, measured


def test_close_kernels_go_to_the_final_alternating_round():
    """Each runs its last REPEATS calls on its own count of images (where its call took
    MIN_TIMED_S), in alternation; the faster per image wins."""
    order: list[str] = []
    a_calls, b_calls = [], []

    def logged(name, prepare):
        def wrapped(images, samples):
            run = prepare(images, samples)
            return lambda: (order.append(name), run())
        return wrapped

    decision = KernelTuner("cpu").measure({"a": logged("a", sleeper(1.4e-4, a_calls)),
                                           "b": logged("b", sleeper(1e-4, b_calls))}, 4096, 8)
    assert decision.kernel == "b" and decision.probe_images == b_calls[-1]
    for calls in (a_calls, b_calls):
        assert calls[-autotune.REPEATS:] == [calls[-1]] * autotune.REPEATS
        assert 1.4e-4 * calls[-1] >= autotune.MIN_TIMED_S or 1e-4 * calls[-1] >= autotune.MIN_TIMED_S
    assert order[-2 * (autotune.REPEATS - 1):] == ["a", "b"] * (autotune.REPEATS - 1)  # alternating


def test_a_single_candidate_is_not_measured():
    calls = []
    decision = KernelTuner("cpu").choose("k", {"only": sleeper(1e-4, calls)}, 100, 2)
    assert decision.kernel == "only" and decision.source == "only candidate" and calls == []


def test_decisions_are_stored_per_machine_and_reused(tmp_path, caplog):
    calls = []
    first = KernelTuner("cpu", tmp_path)
    candidates = {"slow": sleeper(1e-3, calls), "fast": sleeper(1e-6, calls)}
    with caplog.at_level(logging.INFO, logger="locality.models.autotune"):
        assert first.choose("step kind A", candidates, 1000, 4).kernel == "fast"
    assert "kernel choice step kind A: fast (measured per 1000 images: fast" in caplog.text
    files = list(tmp_path.iterdir())
    assert files == [first.store_path]  # atomic write: no temporary file left beside it
    data = json.loads(first.store_path.read_text())
    assert data["machine"] == machine_description(torch.device("cpu"))
    assert data["machine"]["threads"] == str(torch.get_num_threads()) and data["machine"]["torch"] == torch.__version__
    assert data["decisions"]["step kind A"]["kernel"] == "fast"
    calls.clear()
    second = KernelTuner("cpu", tmp_path)  # a later run: no probe
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="locality.models.autotune"):
        decision = second.choose("step kind A", candidates, 1000, 4)
    assert decision.kernel == "fast" and decision.source == "store" and calls == []
    assert "from the kernel store" in caplog.text
    # another key (other shapes or candidates) is measured and added to the same file
    assert second.choose("step kind B", candidates, 1000, 4).kernel == "fast" and calls
    assert set(json.loads(second.store_path.read_text())["decisions"]) == {"step kind A", "step kind B"}


@pytest.mark.parametrize("damage", ["{not json", '{"version": 1, "machine": {}, "decisions": {}}', "[]",
                                    '{"version": 1, "machine": MACHINE, "decisions": {"k": {"kernel": "fast"}}}'])
def test_a_damaged_store_is_measured_again_with_a_warning(tmp_path, caplog, damage):
    tuner = KernelTuner("cpu", tmp_path)
    tuner.store_path.write_text(damage.replace("MACHINE", json.dumps(tuner.machine)))
    calls = []
    with caplog.at_level(logging.WARNING, logger="locality.models.autotune"):
        decision = tuner.choose("k", {"slow": sleeper(1e-3, calls), "fast": sleeper(1e-6, calls)}, 1000, 4)
    assert decision.kernel == "fast" and decision.source == "measured" and calls
    assert "is unreadable" in caplog.text and "measuring again" in caplog.text
    assert json.loads(tuner.store_path.read_text())["decisions"]["k"]["kernel"] == "fast"  # rewritten


def test_an_unwritable_store_is_a_warning(tmp_path, caplog):
    blocker = tmp_path / "kernels"
    blocker.write_text("a file where the folder should be")
    tuner = KernelTuner("cpu", blocker)
    with caplog.at_level(logging.WARNING):
        decision = tuner.choose("k", {"a": sleeper(1e-3, []), "b": sleeper(1e-6, [])}, 1000, 4)
    assert decision.kernel == "b" and "could not write the kernel store" in caplog.text


@pytest.fixture(scope="module")
def synth8():
    images = eight_bit(local_images(num=200, side=6))
    return images, fit_statistics(images, progress=False)


def test_pca_locality_never_picks_a_slow_backend(synth8, monkeypatch):
    """torch._int_mm made slow on purpose: auto runs float32; float32 made slow: auto runs an
    int8 kernel (int8_intmm or int8_gather, whichever is faster here)."""
    import locality.models.pca_locality.float_gemm as float_gemm
    import locality.models.pca_locality.int8 as int8

    images, stats = synth8
    x = noisy(images, 500)
    want = pca_oracle(x, 500, images, stats, 0.02)
    real_int_mm, real_float_step = torch._int_mm, float_gemm.float_step

    def slow_int_mm(*args, **kwargs):
        time.sleep(0.02)
        return real_int_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_int_mm", slow_int_mm)
    monkeypatch.setattr(int8, "int8_sums_exact", lambda backend, device: backend == "int_mm")  # no oneDNN rival
    model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32)
    got = model(x, 500).double().reshape(len(x), -1)
    assert model.last_kernel == "float32" and (got - want).abs().max() < 1e-4
    monkeypatch.setattr(torch, "_int_mm", real_int_mm)

    def slow_float_step(*args):
        time.sleep(0.05)
        return real_float_step(*args)

    monkeypatch.setattr(float_gemm, "float_step", slow_float_step)
    model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float32)
    got = model(x, 500).double().reshape(len(x), -1)
    assert model.last_kernel.startswith(("int8_intmmx", "int8_gatherx")) and (got - want).abs().max() < 1e-4


def test_a_slow_round_before_the_last_does_not_make_a_kernel_look_free_per_image(monkeypatch):
    """A kernel of large fixed cost whose round before the last was slowed by the machine (a
    spike of 40 ms, at 64 images): measured against that round, its cost per added image would
    come out ~0 and its rate at the full count absurdly low. Measured over the whole span of the
    rounds it stays near its true 10 ms per 1000 images."""
    monkeypatch.setattr(autotune, "MIN_TIMED_S", 0.02)  # the probe stops at 1 024 images (plain: 20 ms)
    spiky_calls, plain_calls = [], []

    def spiky(images: int, samples: int):
        def run():
            spiky_calls.append(images)
            time.sleep(0.02 + 1e-5 * images + (0.04 if images == 64 else 0.0))
        return run

    decision = KernelTuner("cpu").measure({"plain": sleeper(2e-5, plain_calls), "spiky": spiky}, 60_000, 8,
                                          min_images={"spiky": 1024})
    assert 64 in spiky_calls and max(spiky_calls) == 1024
    assert decision.ms_per_1000_images["spiky"] > 5.0  # true: 10 + 20 ms / 60 = 10.3
    assert decision.kernel == "spiky"


def test_a_fixed_cost_paid_per_chunk_counts_that_often():
    """A kernel whose fixed cost (10 ms a call) is paid per chunk of the step (``fixed_calls``,
    here 60 chunks of 60 000 images) costs 10 µs per image more than its cost per added image
    says: it loses to a plain kernel of 5 µs per image, which it beats when its fixed cost is
    paid once."""
    for fixed_calls, winner in (({"chunky": 60}, "plain"), (None, "chunky")):
        decision = KernelTuner("cpu").measure({"plain": sleeper(5e-6, []), "chunky": sleeper(1e-6, [], 0.01)},
                                              60_000, 8, fixed_calls=fixed_calls)
        assert decision.kernel == winner, decision
        rate = decision.ms_per_1000_images["chunky"]
        assert (rate > 9.0) if fixed_calls else (rate < 3.0), decision


def test_kernels_measured_before_skip_the_screen_and_aim_at_their_floor():
    """Candidates whose rates an earlier decision of these shapes measured (``known_rates``)
    were screened then: after a warm-up they start at the base round, and a floored one goes
    from it straight to its floor (or the count its known rate says takes MIN_TIMED_S). One unknown candidate brings the screen back for all."""
    floor_calls, plain_calls = [], []
    tuner = KernelTuner("cpu")
    decision = tuner.measure({"plain": sleeper(2e-5, plain_calls), "floored": sleeper(1e-5, floor_calls, 0.005)},
                             60_000, 8, min_images={"floored": 1024},
                             known_rates={"plain": 2e-5, "floored": 1e-5})
    # warm-up, base, then at once its floor (here beyond it: 20 ms), where it stays
    assert floor_calls[:2] == [1, autotune.SCREEN_IMAGES] and floor_calls[2] >= 1024
    assert set(floor_calls[2:]) == {floor_calls[2]}
    # (a kernel without a floor grows by at most GROWTH² a round, here the most at once)
    assert plain_calls[:3] == [1, autotune.SCREEN_IMAGES, autotune.GROWTH**2 * autotune.SCREEN_IMAGES]
    assert decision.kernel == "floored"
    floor_calls.clear()
    tuner.measure({"plain": sleeper(2e-5, []), "floored": sleeper(1e-5, floor_calls, 0.005)}, 60_000, 8,
                  min_images={"floored": 1024}, known_rates={"floored": 1e-5})
    assert floor_calls[:4] == [1, 1, autotune.SCREEN_IMAGES, autotune.SCREEN_IMAGES]  # screened again
