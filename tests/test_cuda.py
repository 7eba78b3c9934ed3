"""The CUDA paths against float64 (CPU brute force or a float64 CUDA run). Marked ``cuda``:
where torch sees no GPU they are skipped with that reason; on a GPU machine run
``pytest -m cuda`` (the README's "GPU checks"; scripts/gpu_check.sh runs them with the bench)."""

from __future__ import annotations

import math

import pytest
import torch

from locality.models import build_model
from locality.models.memory import available_memory, chunk_rows
from locality.statistics import fit_statistics

from synthetic import eight_bit, local_images, noisy, optimal_oracle_of, pca_oracle

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False): run `pytest -m cuda` "
                              "on a GPU machine, see the README's 'GPU checks'"),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def synth():
    images = local_images(num=80, side=8)
    return images, fit_statistics(images, progress=False)


@pytest.mark.parametrize("t,threshold", [(900, 0.005), (500, 0.05), (300, 0.02), (100, 0.02), (0, 0.3), (0, 0.9)])
@pytest.mark.parametrize("kernel", ["auto", "float32", "bf16x6"])
@pytest.mark.parametrize("chunk", [7, None])
def test_cuda_pca_kernels_match_brute_force(synth, t, threshold, kernel, chunk):
    images, stats = synth
    model = build_model("pca_locality", images, stats, mask_threshold=threshold, dtype=torch.float32,
                        chunk_size=chunk, dense_kernel=kernel, device=CUDA)
    x = noisy(images, t)
    got = model(x.to(CUDA), t).double().cpu().reshape(len(x), -1)
    assert (got - pca_oracle(x, t, images, stats, threshold)).abs().max() < 1e-4, model.last_kernel
    if kernel == "auto" and model.last_strategy == ("dense", torch.float32):
        assert model.last_kernel == "bf16x6"


@pytest.mark.parametrize("chunk", [7, None])
def test_cuda_sparse_step_matches_brute_force(synth, chunk):
    """The low-noise step's CSR product on the GPU (cuSPARSE), called directly: under auto the
    model takes it only where it measures faster than the dense kernels."""
    from locality.models.pca_locality.plan import plan_mask
    from locality.models.pca_locality.sparse import sparse_step
    from locality.models.masks import locality_mask
    from locality.schedule import alpha_bar

    images, stats = synth
    abar = float(alpha_bar(0))
    plan = plan_mask(locality_mask(stats, abar, 0.3), CUDA)
    assert plan.strategy == "sparse" and plan.sparse_t.device.type == "cuda"
    x = noisy(images, 0)
    got = sparse_step(images.reshape(len(images), -1).to(CUDA), plan, x.reshape(len(x), -1).double().to(CUDA),
                      math.sqrt(abar), 1.0 / (2.0 * (1.0 - abar)), chunk)
    assert (got.cpu() - pca_oracle(x, 0, images, stats, 0.3)).abs().max() < 1e-7


def test_cuda_float64_matches_brute_force(synth):
    images, stats = synth
    for t in (900, 100, 0):
        model = build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float64, device=CUDA)
        x = noisy(images, t)
        got = model(x.to(CUDA), t).cpu().reshape(len(x), -1)
        assert (got - pca_oracle(x, t, images, stats, 0.02)).abs().max() < 1e-7  # expanded vs direct: 5e-9 seen


def test_cuda_default_matches_float64_on_the_full_fashion_mnist(fmnist_train):
    """The benchmark setting on the GPU: all 60 000 images, θ = 0.005, the default (whatever
    it measures fastest), each tensor-core kernel forced, every DDIM step within 1e-4 of a
    float64 run."""
    from locality.sampling import sample

    stats = fit_statistics(fmnist_train, progress=False)
    m64 = build_model("pca_locality", fmnist_train, stats, mask_threshold=0.005, dtype=torch.float64, device=CUDA)
    result = sample(m64, num_samples=4, image_shape=(1, 28, 28), num_steps=10, seed=5, device=CUDA,
                    keep_trajectory=True)
    for kernel, expected in (("auto", ""), ("int8_intmm", "int8_intmmx"), ("bf16x3", "bf16x3"), ("bf16x6", "bf16x6")):
        fast = build_model("pca_locality", fmnist_train, stats, mask_threshold=0.005, dtype=torch.float32,
                           device=CUDA, dense_kernel=kernel)
        kernels = set()
        for i, t in enumerate(result.timesteps):
            diff = (fast(result.x_t[i].to(CUDA), t).cpu() - result.x0_pred[i]).abs().max().item()
            kernels.add(fast.last_kernel)
            assert diff < 1e-4, f"{kernel} t={t}: {diff} ({fast.last_kernel})"
        assert any(k.startswith(expected) for k in kernels), kernels


@pytest.mark.parametrize("t,threshold", [(900, 0.005), (500, 0.05), (100, 0.02), (0, 0.02)])
@pytest.mark.parametrize("chunk,count", [(7, 1), (None, 3)])
def test_cuda_int8_matches_brute_force_and_the_cpu(t, threshold, chunk, count):
    """8-bit data with n = 25 (cuBLAS's padding of n, rows and image counts): the CUDA int8
    kernel against float64, and against the CPU's torch._int_mm backend (the same exact
    integer sums: the results agree to float32 rounding)."""
    images = eight_bit(local_images(num=50, side=5))
    stats = fit_statistics(images, progress=False)
    x = noisy(images, t, count=count)
    outs = {}
    for device in (CUDA, torch.device("cpu")):
        model = build_model("pca_locality", images, stats, mask_threshold=threshold, dtype=torch.float32,
                            chunk_size=chunk, dense_kernel="int8_intmm", device=device)
        outs[device.type] = model(x.to(device), t).double().cpu().reshape(len(x), -1)
        if model.plan(t).strategy == "dense":
            assert model.last_kernel.startswith("int8_intmmx")
    assert (outs["cuda"] - pca_oracle(x, t, images, stats, threshold)).abs().max() < 1e-4
    assert (outs["cuda"] - outs["cpu"]).abs().max() < 1e-5


@pytest.mark.parametrize("t,threshold", [(900, 0.005), (500, 0.05), (300, 0.02)])
@pytest.mark.parametrize("chunk,count", [(7, 1), (None, 3)])
def test_cuda_bf16x3_matches_brute_force(t, threshold, chunk, count):
    images = eight_bit(local_images(num=50, side=5))
    stats = fit_statistics(images, progress=False)
    x = noisy(images, t, count=count)
    model = build_model("pca_locality", images, stats, mask_threshold=threshold, dtype=torch.float32,
                        chunk_size=chunk, dense_kernel="bf16x3", device=CUDA)
    got = model(x.to(CUDA), t).double().cpu().reshape(len(x), -1)
    assert (got - pca_oracle(x, t, images, stats, threshold)).abs().max() < 1e-4, model.last_kernel


def test_cuda_optimal_wiener_nearest(synth):
    images, stats = synth
    for t in (900, 300, 0):
        x = noisy(images, t)
        for dtype in (torch.float32, torch.float64):
            model = build_model("optimal", images, None, dtype=dtype, device=CUDA)
            got = model(x.to(CUDA), t).double().cpu().reshape(len(x), -1)
            assert (got - optimal_oracle_of(x, t, images)).abs().max() < 1e-4
        for name in ("wiener", "nearest_dataset"):
            on_gpu = build_model(name, images, stats, device=CUDA)(x.to(CUDA), t).cpu()
            on_cpu = build_model(name, images, stats)(x, t)
            assert (on_gpu.double() - on_cpu.double()).abs().max() < 1e-9


def test_cuda_sampling_matches_cpu(synth):
    """The noise is drawn on the CPU, so a CUDA run follows the CPU trajectory."""
    from locality.sampling import sample

    images, stats = synth
    runs = [sample(build_model("pca_locality", images, stats, mask_threshold=0.02, dtype=torch.float64,
                               device=device), num_samples=3, image_shape=tuple(images.shape[1:]),
                   num_steps=10, seed=3, device=device).samples for device in ("cpu", CUDA)]
    assert (runs[0] - runs[1]).abs().max() < 1e-6


def test_cuda_memory_budget_reads_the_device():
    free, _total = torch.cuda.mem_get_info(CUDA)
    assert abs(available_memory(CUDA) - free) < 256 << 20
    rows = chunk_rows(1 << 20, CUDA)
    assert 1 <= rows <= free // (1 << 20)
    assert chunk_rows(1 << 20, CUDA, override=3) == 3


def test_cuda_unet_reference_vector_and_bf16_training(tmp_path):
    from conftest import require_reference
    from locality.unet.network import build_unet
    from locality.unet.training import TrainSettings, train_unet

    ref = torch.load(require_reference("unet28_test_vector.pt"), weights_only=False)
    model = build_unet(dataset="mnist")
    model.load_state_dict({k: v.float() for k, v in ref["model_state_dict"].items()}, strict=True)
    model = model.eval().to(CUDA)
    with torch.no_grad():
        out = model(ref["x"].to(CUDA), ref["t"].to(CUDA)).cpu()
    # cuDNN convolutions use TF32 by default (torch.backends.cudnn.allow_tf32): 3e-3 seen on an H100
    assert (out - ref["expected_output"]).abs().max() < 1e-2
    images = local_images(num=64, side=8)
    tiny = dict(ch=32, ch_mult=[1, 2], attn=[], num_res_blocks=1, dropout=0.0, in_channels=1, out_channels=1)
    result = train_unet(images, tiny, TrainSettings(epochs=1, batch_size=16), device=CUDA, checkpoint_dir=tmp_path,
                        progress=False)
    assert (result.epoch, result.step) == (1, 4)  # 64 images, batches of 16 (bf16 autocast on CUDA)
    assert math.isfinite(result.last_loss) and next(result.model.parameters()).device.type == "cuda"
    assert any(tmp_path.iterdir())
