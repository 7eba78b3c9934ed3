"""The GPU benchmark of the README's performance section (no Hydra needed: it calls
locality.timing directly). Usage: ``python scripts/gpu_check.py OUT_DIR --probe|--fmnist|--large [--smoke]``
(scripts/gpu_check.sh runs them). ``--probe``: the bf16x6 logits' exactness and speed (the
calibration of its rounding factor). The others write their reports to
OUT_DIR/bench_<section>.json as they go:
  --fmnist: pca_locality, full Fashion-MNIST (θ = 0.005), 10 steps: the kernel table (every
     kernel that can run on this GPU, in alternation with the default) at 32 samples, then the
     default at 8 samples, then optimal and nearest_dataset at 32 samples;
  --large: pca_locality on a CIFAR-10-shaped proxy (50 000 x 3 x 32 x 32, θ = 0.05), 64 samples,
     with the kernel table, and on a CelebA-HQ-64-shaped proxy (30 000 x 3 x 64 x 64, θ = 0.02),
     8 samples.
The proxies are 1/f² Gaussian fields (locality.data.synthetic): real CIFAR-10 / CelebA-HQ
cannot be downloaded where this was written. ``--smoke`` runs tiny sizes on the CPU (a check
of this script before spending GPU time). Kernel choices are measured afresh (no store).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

from locality.atomic import write_json_atomic
from locality.timing import BenchSettings, benchmark
from locality.data import load_dataset
from locality.data.common import to_unit_range
from locality.data.synthetic import natural_image_proxy


def probe(device: torch.device) -> dict:
    """The bf16x6 logits against float64 on random data (with cuBLAS's reduced-precision
    reductions allowed, torch's default, and forbidden), and the rate of its GEMM."""
    from locality.models.pca_locality.bf16 import SplitImages, dense_logits_bf16x6, split_weights_bf16x6

    g = torch.Generator().manual_seed(0)
    n, num, batch = 784, 8000 if device.type == "cuda" else 300, 32
    mask = (torch.rand(n, n, generator=g) < 0.8).double()
    images = torch.rand(num, n, generator=g) * 2 - 1
    x = torch.randn(batch, n, generator=g).double()
    mean = images.double().mean(0)
    split = SplitImages(images.to(device), mean)
    x_c = (x - mean).float()
    weights6 = split_weights_bf16x6(x_c.to(device), mask.T.float().to(device))
    mask3_t = mask.T.to(device, torch.bfloat16).repeat(1, 3)
    y_c = images.double() - mean
    want = torch.einsum("mbn,kn->mbk", (mask.T.unsqueeze(1) * x_c.double().unsqueeze(0)), y_c) * 2
    want -= (mask.T @ y_c.square().T).unsqueeze(1)
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    report: dict = {"torch": torch.__version__, "allow_bf16_reduced_precision_reduction": flag}
    for allowed in (flag, False):
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = allowed
        try:
            got = dense_logits_bf16x6(split.stacked, split.squares, weights6, mask3_t, batch, 1.0, 1.0)
            report[f"max_abs_err_allowed_{allowed}"] = float((got.double().cpu() - want).abs().max())
        finally:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag
    mask_t32 = mask.T.float().to(device)
    from locality.models.pca_locality.float_gemm import dense_logits

    got32 = dense_logits(x_c.to(device), split.values, mask_t32, 1.0, 1.0)
    report["max_abs_err_float32_kernel"] = float((got32.double().cpu() - want).abs().max())
    report["max_abs_logit"] = float(want.abs().max())

    def seconds(fn):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for _ in range(2):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        sync()
        return (time.perf_counter() - start) / 5

    report["chunk_s_bf16x6"] = seconds(
        lambda: dense_logits_bf16x6(split.stacked, split.squares, weights6, mask3_t, batch, 1.0, 1.0))
    report["chunk_s_float32"] = seconds(lambda: dense_logits(x_c.to(device), split.values, mask_t32, 1.0, 1.0))
    report["chunk_shape"] = [n, batch, num]
    return report


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1].startswith("--"):
        sys.exit("usage: python scripts/gpu_check.py OUT_DIR --probe|--fmnist|--large [--smoke] "
                 "(OUT_DIR first: the reports are written there)")
    out = Path(sys.argv[1])
    smoke = "--smoke" in sys.argv
    device = torch.device("cpu" if smoke else "cuda")
    scale = (lambda n: max(n // 200, 64)) if smoke else (lambda n: n)
    if "--probe" in sys.argv:
        report = probe(device)
        print(json.dumps(report), flush=True)
        write_json_atomic(report, out / "probe.json")
        return
    section = "large" if "--large" in sys.argv else "fmnist"
    reports: list[dict] = []

    def run(label: str, name: str, params: dict, images: torch.Tensor, dataset: str, **settings) -> None:
        if smoke:  # a check of the script, not of the machine: few samples too
            settings.update(num_samples=min(settings["num_samples"], 4), batch_size=min(settings["batch_size"], 4))
        start = time.perf_counter()
        try:
            report = benchmark(name, {**params, "device": device}, images, dataset, BenchSettings(seed=0, **settings))
        except Exception:  # keep the later runs: one failure must not cost the others
            report = {"error": traceback.format_exc()}
        report.update(label=label, wall_s=time.perf_counter() - start)
        reports.append(report)
        print(json.dumps(report), flush=True)
        write_json_atomic(reports, out / f"bench_{section}.json")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    pca = {"mask_threshold": 0.005, "dtype": torch.float32, "temperature": 1.0}
    if section == "fmnist":
        fmnist = load_dataset("fashion_mnist", root="/nonexistent", progress=False)[: scale(60000)]
        run("fmnist_pca_32_kernel_table", "pca_locality", pca, fmnist, "fashion_mnist",
            num_samples=32, batch_size=32, repeats=3, check_subset=1000, check_samples=2, kernels="all")
        run("fmnist_pca_8_auto", "pca_locality", pca, fmnist, "fashion_mnist",
            num_samples=8, batch_size=8, repeats=3, check_samples=0)
        for name, params in (("optimal", {"dtype": torch.float32}), ("nearest_dataset", {"dtype": torch.float32})):
            run(f"fmnist_{name}_32", name, params, fmnist, "fashion_mnist", num_samples=32, batch_size=32,
                repeats=3, check_subset=1000, check_samples=2)
        return
    cifar = to_unit_range(natural_image_proxy(scale(50000), 3, 32, seed=1))
    run("cifar_proxy_pca_64_kernel_table", "pca_locality", {**pca, "mask_threshold": 0.05}, cifar,
        "cifar10_proxy", num_samples=64, batch_size=64, repeats=2, check_subset=500, check_samples=1,
        kernels="all")
    del cifar
    celeba = to_unit_range(natural_image_proxy(scale(30000), 3, 64 if not smoke else 16, seed=2))
    run("celeba64_proxy_pca_8_auto", "pca_locality", {**pca, "mask_threshold": 0.02}, celeba,
        "celeba_hq64_proxy", num_samples=8, batch_size=8, repeats=1, check_samples=0)


if __name__ == "__main__":
    main()
