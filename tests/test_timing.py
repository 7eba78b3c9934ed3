"""The benchmark app and its core: a small real run (JSON written, deviation measured, the
kernel table), the report's fields, and the synthetic natural-image proxy used for the GPU
figures. No timing asserts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from locality.timing import BenchSettings, benchmark
from locality.data.synthetic import natural_image_proxy


@pytest.mark.slow
def test_bench_app_writes_its_report(tmp_path, fmnist_train):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "locality.bench", "hardware=cpu", "dataset.subset_size=300",
         "sampler.num_samples=2", "sampler.batch_size=2", "sampler.num_steps=4", "bench.repeats=2",
         "bench.check_subset=100", "bench.check_samples=1", "bench.kernels=[float32,int8_intmm,bf16x6]",
         "bench.max_kernel_slowdown=1000", f"bench.output={out}",
         f"paths.output_dir={tmp_path}/outputs", f"paths.data_dir={tmp_path}/data"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"] == "pca_locality" and report["num_train_images"] == 300
    assert len(report["sampling_total_s_all"]) == 2 and report["sampling_total_s_median"] > 0
    assert len(report["step_times_s_median"]) == 4 and report["timesteps"][-1] == 0
    assert report["statistics_fit_s"] > 0 and report["mask_build_s"] >= 0
    int8 = {f"int8_{b}x{d}" for d in range(1, 6) for b in ("intmm", "onednn", "gather")}
    assert set(report["step_kernels"].values()) <= {"float32", "float64", "sparse"} | int8
    # a fresh kernel store: the default measured in its first run; the forced kernels' models too
    assert 0 < report["kernel_probe_s"] <= report["kernel_probe_s_all"] and report["cpu"]
    assert len(report["max_abs_dev_per_step"]) == 4
    assert report["max_abs_dev_vs_float64"] < 1e-4
    rows = {row["kernel"]: row for row in report["kernel_table"]}
    assert set(rows) == {"pca_locality (default: auto)", "float32", "int8_intmm", "bf16x6"}
    assert "no bfloat16 GEMM with a float32 output" in rows["bf16x6"]["skipped"]  # emulated on a CPU: not run
    for kernel in ("float32", "int8_intmm"):  # timed in alternation with the default, checked against float64
        assert len(rows[kernel]["step_times_s_median"]) == 4 and rows[kernel]["ratio_to_default"] > 0
        assert rows[kernel]["max_abs_dev_vs_float64"] < 1e-4
        assert set(rows[kernel]["step_kernels"].values()) - {"sparse", "float64"} <= {kernel} | int8
    assert "kernel" in proc.stdout and "auto's steps" in proc.stdout  # the printed table


@pytest.mark.parametrize("args,message", [
    (["model=optimal", "bench.kernels=all"], "bench.kernels compares the kernels of pca_locality; model=optimal"),
    (["bench.kernels=[float32,tf32]"], "bench.kernels must be all or a list of float32, bf16x6, bf16x3"),
])
def test_bench_kernels_is_checked(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "locality.bench", *args, f"paths.output_dir={tmp_path}/outputs"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_bench_help_explains_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "locality.bench", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "time an analytical denoiser and check it against float64" in proc.stdout


def test_benchmark_core_measures_a_real_deviation(monkeypatch):
    """The check compares with the float64 oracle: a model that is off is caught."""
    from locality.models.pca_locality import PcaLocalityDenoiser

    images = natural_image_proxy(80, 1, 6, seed=3).float() / 127.5 - 1
    settings = BenchSettings(num_samples=2, batch_size=2, num_steps=3, repeats=1, check_subset=40,
                             check_samples=2)
    params = {"mask_threshold": 0.02, "dtype": torch.float64, "device": torch.device("cpu")}
    report = benchmark("pca_locality", params, images, "proxy", settings)
    assert report["max_abs_dev_vs_float64"] < 1e-6
    call = PcaLocalityDenoiser.__call__
    monkeypatch.setattr(PcaLocalityDenoiser, "__call__", lambda self, x_t, t: call(self, x_t, t) + 1e-3)
    off = benchmark("pca_locality", params, images, "proxy", settings)
    assert off["max_abs_dev_vs_float64"] > 9e-4


@pytest.mark.parametrize("name,params", [("els", {"patch_sizes": [5, 3, 3]}), ("pspc", {"patch_sizes": 3})])
def test_benchmark_checks_the_peers_against_their_float64_model(name, params):
    """els and pspc have no cheap plain oracle at bench sizes: the check runs the model in
    float64 (tested against the oracles in test_peers.py), and reports the float32 run's distance."""
    images = natural_image_proxy(30, 1, 6, seed=4).float() / 127.5 - 1
    settings = BenchSettings(num_samples=2, batch_size=2, num_steps=3, repeats=1, check_subset=20,
                             check_samples=2)
    report = benchmark(name, {**params, "num_steps": 3, "dtype": torch.float32, "device": torch.device("cpu")},
                       images, "proxy", settings)
    assert 0 < report["max_abs_dev_vs_float64"] < 1e-4
    assert len(report["max_abs_dev_per_step"]) == 3


def test_natural_image_proxy_shapes_and_spectrum():
    a = natural_image_proxy(50, 3, 16, seed=0)
    assert a.dtype == torch.uint8 and a.shape == (50, 3, 16, 16)
    assert torch.equal(a, natural_image_proxy(50, 3, 16, seed=0))
    assert not torch.equal(a, natural_image_proxy(50, 3, 16, seed=1))
    assert torch.equal(natural_image_proxy(50, 1, 16, seed=0, chunk=7), natural_image_proxy(50, 1, 16, seed=0))
    z = natural_image_proxy(400, 1, 32, seed=0)[:, 0].double()
    power = torch.fft.fft2(z - z.mean(0)).abs().square().mean(0)
    assert power[1, 0] > 10 * power[8, 0] > 10 * power[16, 16]  # falls like 1/f²: neighbours correlate
    with pytest.raises(ValueError, match="1 or 3 channels"):
        natural_image_proxy(2, 2, 8)
