"""The GPU benchmark of the README's performance section (no Hydra needed: it calls
locality.benchmarking directly). Usage: ``python scripts/gpu_check.py OUT_DIR --probe|--fmnist|--large|--kernels [--smoke]``
(scripts/gpu_check.sh runs all three). ``--probe``: the bf16x6 logits' exactness and speed; ``--kernels``: one dense step of bf16x3
and int8 at three image sizes (auto's crossover), then one low-noise step of the sparse kernel
against the dense float64 and int8 ones at four mask densities (the sparse crossover).
The others write their reports to OUT_DIR/bench_<section>.json as they go:
  --fmnist: 1. pca_locality, full Fashion-MNIST (θ = 0.005), 32 samples, 10 steps: the default
     (bf16x3 and int8 dense steps) in alternation with dense_kernel=bf16x6, then with int8, then 8 samples;
  --large: 2. pca_locality on a CIFAR-10-shaped proxy (50 000 x 3 x 32 x 32, θ = 0.05), 64 samples,
     the default in alternation with int8;
  3. pca_locality on a CelebA-HQ-64-shaped proxy (30 000 x 3 x 64 x 64, θ = 0.02), 8 samples.
The proxies are 1/f² Gaussian fields (locality.data.synthetic): real CIFAR-10 / CelebA-HQ
cannot be downloaded where this was written. ``--smoke`` runs tiny sizes on the CPU (a check
of this script before spending GPU time).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

from locality.atomic import write_json_atomic
from locality.benchmarking import BenchSettings, benchmark
from locality.data import load_dataset
from locality.data.common import to_unit_range
from locality.data.synthetic import natural_image_proxy


def probe(device: torch.device) -> dict:
    """The bf16x6 logits against float64 on random data (with cuBLAS's reduced-precision
    reductions allowed, torch's default, and forbidden), and the rate of its GEMM."""
    from locality.models.fast_masked import SplitImages, dense_logits_bf16x6, split_weights_bf16x6

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
    from locality.models.fast_masked import dense_logits

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


def random_eight_bit_images(num: int, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """[num, n] random 8-bit pixels in the loaders' format, (v/255 - 0.5)/0.5, on ``device``."""
    return ((torch.randint(0, 256, (num, n), generator=g).float() / 255 - 0.5) / 0.5).to(device)


def alternating_medians(runs: dict, device: torch.device) -> dict:
    """Seconds of each callable in ``runs``: 4 rounds in alternation (A B A B …), the first a
    warm-up, the median of the other 3 (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict = {k: [] for k in runs}
    for rep in range(4):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if rep:
                times[name].append(time.perf_counter() - start)
    return {k: sorted(v)[1] for k, v in times.items()}


def kernel_steps(device: torch.device, smoke: bool) -> list[dict]:
    """One dense step (t = 500, float32 accuracy) of bf16x3 and of int8 (3 digits) on random
    8-bit images with a random binary mask of density 0.5, at the Fashion-MNIST, CIFAR-10 and
    CelebA-HQ-64 shapes: medians of 3 after a warm-up, in alternation (auto's crossover)."""
    from locality.models.eight_bit import Bf16CodeImages, Int8Images, bf16x3_step, eight_bit_codes, int8_step
    from locality.models.fast_masked import plan_mask

    shapes = [(784, 32, 60000), (3072, 64, 50000), (12288, 8, 30000)]
    if smoke:
        shapes = [(64, 4, 300), (192, 4, 200)]
    out = []
    for n, batch, num in shapes:
        g = torch.Generator().manual_seed(n)
        images = random_eight_bit_images(num, n, g, device)
        plan = plan_mask((torch.rand(n, n, generator=g, dtype=torch.float64) < 0.5).double(), device)
        x64 = torch.randn(batch, n, generator=g, dtype=torch.float64).to(device)
        codes = eight_bit_codes(images)
        bf16, int8 = Bf16CodeImages(codes), Int8Images(codes, "int_mm")
        mask8 = plan.dense_mask(torch.int8)
        runs = {"bf16x3": lambda: bf16x3_step(bf16, images, plan, x64, 0.6, 0.8, None),
                "int8x3": lambda: int8_step(int8, images, mask8, x64, 0.6, 0.8, 3, torch.float32, None)}
        row = {"n": n, "samples": batch, "images": num, **alternating_medians(runs, device)}
        print(json.dumps(row), flush=True)
        out.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def low_noise_steps(device: torch.device, smoke: bool) -> list[dict]:
    """One low-noise step (float64 accuracy: t = 0, 1 - ᾱ = 1e-4) at the Fashion-MNIST shape,
    32 samples, on random 8-bit images and random binary masks with J ones in every column
    (density J/n, all sparse-eligible): the sparse CSR kernel against the dense float64 GEMM and
    int8 with 4 digits and a float64 combination. Medians of 3 after a warm-up, in alternation:
    where CUDA_SPARSE_MAX_DENSITY (measured with an earlier sparse kernel) should lie."""
    from locality.models.eight_bit import Int8Images, eight_bit_codes, int8_step
    from locality.models.fast_masked import float_step, plan_mask, sparse_step

    n, batch, num = (64, 4, 300) if smoke else (784, 32, 60000)
    g = torch.Generator().manual_seed(7)
    images = random_eight_bit_images(num, n, g, device)
    mean64 = images.double().mean(0)
    x64 = torch.randn(batch, n, generator=g, dtype=torch.float64).to(device)
    int8 = Int8Images(eight_bit_codes(images), "int_mm")
    a, scale = 0.99995, 5000.0
    out = []
    for ones in sorted({max(1, n // 256), n // 64, n // 32, n // 16}):
        picks = torch.rand(n, n, generator=g).argsort(dim=0)[:ones]  # J input rows per output column
        mask = torch.zeros(n, n, dtype=torch.float64).scatter_(0, picks, 1.0)
        plan = plan_mask(mask, device)
        runs = {"sparse": lambda: sparse_step(images, plan, x64, a, scale, None),
                "float64": lambda: float_step(images, mean64, plan, x64, a, scale, torch.float64, None),
                "int8x4_float64": lambda: int8_step(int8, images, plan.dense_mask(torch.int8), x64, a, scale, 4,
                                                    torch.float64, None)}
        row = {"n": n, "samples": batch, "images": num, "ones_per_column": ones, "density": ones / n,
               **alternating_medians(runs, device)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1].startswith("--"):
        sys.exit("usage: python scripts/gpu_check.py OUT_DIR --probe|--fmnist|--large|--kernels [--smoke] "
                 "(OUT_DIR first: the reports are written there)")
    out = Path(sys.argv[1])
    smoke = "--smoke" in sys.argv
    device = torch.device("cpu" if smoke else "cuda")
    scale = (lambda n: max(n // 200, 64)) if smoke else (lambda n: n)
    if "--kernels" in sys.argv:
        write_json_atomic(kernel_steps(device, smoke), out / "kernel_steps.json")
        write_json_atomic(low_noise_steps(device, smoke), out / "low_noise_steps.json")
        return
    if "--probe" in sys.argv:
        report = probe(device)
        print(json.dumps(report), flush=True)
        write_json_atomic(report, out / "probe.json")
        return
    section = "large" if "--large" in sys.argv else "fmnist"
    reports: list[dict] = []

    def run(label: str, name: str, params: dict, images: torch.Tensor, dataset: str, **settings) -> None:
        start = time.perf_counter()
        try:
            report = benchmark(name, {**params, "device": device}, images, dataset,
                               BenchSettings(seed=0, **settings), name != "optimal")
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
        # the default (auto: bf16x3, int8 where its estimate fails) timed in alternation with
        # bf16x6 (the default before the 8-bit kernels) and with int8 alone
        run("fmnist_pca_32_auto_vs_bf16x6", "pca_locality", pca, fmnist, "fashion_mnist",
            num_samples=32, batch_size=32, repeats=5, check_subset=1000, check_samples=2,
            versus_kernel="bf16x6")
        run("fmnist_pca_32_auto_vs_int8", "pca_locality", pca, fmnist, "fashion_mnist",
            num_samples=32, batch_size=32, repeats=3, check_samples=0, versus_kernel="int8")
        run("fmnist_pca_8_auto", "pca_locality", pca, fmnist, "fashion_mnist",
            num_samples=8, batch_size=8, repeats=3, check_samples=0)
        return
    cifar = to_unit_range(natural_image_proxy(scale(50000), 3, 32, seed=1))
    run("cifar_proxy_pca_64_auto_vs_int8", "pca_locality", {**pca, "mask_threshold": 0.05}, cifar,
        "cifar10_proxy", num_samples=64, batch_size=64, repeats=2, check_subset=500, check_samples=1,
        versus_kernel="int8")
    del cifar
    celeba = to_unit_range(natural_image_proxy(scale(30000), 3, 64 if not smoke else 16, seed=2))
    run("celeba64_proxy_pca_8_auto", "pca_locality", {**pca, "mask_threshold": 0.02}, celeba,
        "celeba_hq64_proxy", num_samples=8, batch_size=8, repeats=1, check_samples=0)


if __name__ == "__main__":
    main()
