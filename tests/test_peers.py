"""els and pspc (SPEC, "Models of the peers") against a float64 brute force of their formulas,
against the authors' own outputs, and for chunk- and batch-size independence."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import require_reference
from synthetic import small_data
from locality.models import build_model
from locality.models.oracle import els_oracle, pspc_oracle
from locality.schedule import alpha_bar

def noised(x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    abar = float(alpha_bar(t))
    return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise


# ------------------------------------------------------------------ against the brute force


# k = 1, odd, and ≥ H (7 × 6 images: 7 and 9 are the same-position rule for borders); circular
# needs k ≤ the image (larger is an error, tested below)
ELS_CASES = [(v, k) for v in ("borders", "circular", "local") for k in (1, 3, 5, 7, 9) if v != "circular" or k <= 5]


@pytest.mark.parametrize("variant,k", ELS_CASES)
@pytest.mark.parametrize("t", [900, 300, 0])
def test_els_matches_brute_force(variant, k, t):
    y, noise = small_data()
    x = noised(y[:3].flip(0), noise, t)  # near the data at low noise: peaked softmaxes
    want = els_oracle(x, y, t, k, variant)
    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        model = build_model("els", y, None, patch_sizes=k, variant=variant, dtype=dtype)
        torch.testing.assert_close(model(x, t).double(), want, atol=atol, rtol=0)


@pytest.mark.parametrize("variant,k", [("borders", 1), ("borders", 3), ("borders", 5), ("circular", 3), ("local", 5)])
@pytest.mark.parametrize("t", [300, 20, 0])
def test_els_through_the_native_softmax_matches_brute_force(variant, k, t):
    """float32 els with the fused C softmax taken on purpose (where the tuner would measure it):
    float32 logits through the fused softmax, float64 steps (t = 0, 20) through its direct
    differences, without any GEMM."""
    from synthetic import PreferKernel

    y, noise = small_data()
    x = noised(y[:3].flip(0), noise, t)
    want = els_oracle(x, y, t, k, variant)
    model = build_model("els", y, None, patch_sizes=k, variant=variant, dtype=torch.float32,
                        tuner=PreferKernel("native"))
    got = model(x, t).double()
    assert model._native is not None
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    if t == 0:
        assert model.last_dtype == torch.float64  # the direct-difference path ran


def background_data(num: int = 40, shape=(1, 10, 9), seed: int = 3):
    """8-bit images of a flat background (-1) with one random 3×3 blob each: most windows are
    exact duplicates (the background), as in Fashion-MNIST."""
    g = torch.Generator().manual_seed(seed)
    y = torch.full((num, *shape), -1.0, dtype=torch.float64)
    for n in range(num):
        i, j = (int(torch.randint(0, s - 2, (1,), generator=g)) for s in shape[1:])
        y[n, :, i : i + 3, j : j + 3] = torch.randint(0, 256, (shape[0], 3, 3), generator=g).double() / 127.5 - 1
    return y, torch.randn(4, *shape, generator=g, dtype=torch.float64)


def test_merged_windows_merges_identical_windows_only_and_orders_by_norm():
    from locality.models.window_search import merged_windows

    g = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (6, 4), generator=g).double()
    base[1] = base[0].flip(0)  # same norm, different window: never merged
    reps = torch.tensor([1, 5, 2, 1, 7, 3])
    windows = base.repeat_interleave(reps, dim=0)
    values = windows[:, :1] * 10
    perm = torch.randperm(len(windows), generator=g)
    merged = merged_windows(windows[perm], values[perm])
    assert merged.norms.numel() == len(torch.unique(base, dim=0))
    assert bool((merged.norms[1:] >= merged.norms[:-1]).all())
    for w, v, c in zip(merged.windows_t.T, merged.values_t.T, merged.log2_count):
        same = (windows == w).all(1)
        assert float(2 ** c) == pytest.approx(float(same.sum()))
        assert torch.equal(v, values[same][0])
        assert torch.equal(w.square().sum().sqrt(), merged.norms[(merged.windows_t.T == w).all(1)][0])


@pytest.mark.parametrize("variant", ["borders", "circular"])
@pytest.mark.parametrize("t", [0, 5])
def test_els_low_noise_search_merges_and_skips_windows_and_matches_brute_force(variant, t, monkeypatch):
    """float64 steps of els' sliding windows merge identical windows and skip those the norm
    bound excludes (locality.models.window_search): the result stays the brute force's, and
    chunks of images (merged and searched apart) change nothing beyond rounding."""
    from locality.models import window_search
    from synthetic import PreferKernel

    y, noise = background_data()
    blend = 0.5 * (y[:2] + y[2:4])  # samples between images: the nearest window is not exact
    x = torch.cat([noised(y[:2], noise[:2], t), noised(blend, noise[2:], t)])
    want = els_oracle(x, y, t, 3, variant)
    pairs = {"taken": 0, "offered": 0, "merged": 0, "windows": 0}
    merge, take, run = window_search.merged_windows, window_search.BlockSearch._take, window_search.BlockSearch.run

    def counting_merge(w, v):
        out = merge(w, v)
        pairs["merged"] += out.norms.numel()
        pairs["windows"] += len(w)
        return out

    def counting_take(self, cands, i0, i1):
        pairs["taken"] += max(0, i1 - i0) * self.rows.shape[1]
        return take(self, cands, i0, i1)

    def counting_run(self, cands):
        pairs["offered"] += cands.norms.numel() * self.rows.shape[1]
        return run(self, cands)

    monkeypatch.setattr(window_search, "merged_windows", counting_merge)
    monkeypatch.setattr(window_search.BlockSearch, "_take", counting_take)
    monkeypatch.setattr(window_search.BlockSearch, "run", counting_run)
    monkeypatch.setattr(window_search, "SEARCH_SLICE", 16)  # small steps: the bound can act on small data
    outs = []
    for chunk in (None, 7):
        model = build_model("els", y, None, patch_sizes=3, variant=variant, dtype=torch.float32, chunk_size=chunk,
                            tuner=PreferKernel("native"))
        outs.append(model(x, t).double())
        assert model.last_dtype == torch.float64
        torch.testing.assert_close(outs[-1], want, atol=2e-5, rtol=0)
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=0)
    assert pairs["merged"] < pairs["windows"] / 2  # the background windows were merged
    assert pairs["taken"] < 0.9 * pairs["offered"]  # pairs were skipped (54-70 % taken on this small data)


@pytest.mark.parametrize("scale", [5000.0, 50.0, 2.0])
def test_the_window_search_keeps_every_window_that_weighs(scale, monkeypatch):
    """sliding_average's float64 path (merged windows, norm-bounded search in slices of 16)
    against the plain float64 softmax over every window of a band, from peaked (1/(2σ²) = 5000)
    to flat weights (2), where a search that skipped too much would be far off."""
    import torch.nn.functional as F

    from locality.models import patch_kernels, window_search
    from locality.models.native import load_native_softmax

    monkeypatch.setattr(window_search, "SEARCH_SLICE", 16)
    y, noise = background_data()
    a = 0.9
    band = patch_kernels.Band(0, 10, 0, 9, (3, 3), (1, 1))
    x = a * 0.5 * (y[:3] + y[3:6]) + 0.05 * noise[:3]
    queries = F.unfold(x, 3).transpose(1, 2).reshape(-1, 9).contiguous()  # [B·L, 9]
    cands = F.unfold(y, 3).transpose(1, 2).reshape(-1, 9)  # [N·L, 9]
    centres = y[:, :, 1:-1, 1:-1].reshape(-1, 1)
    logits = -scale * (queries.unsqueeze(1) - a * cands.unsqueeze(0)).square().sum(2)
    want = torch.softmax(logits, dim=1) @ centres
    native = load_native_softmax(None)
    assert native is not None
    got = patch_kernels.sliding_average(queries, y, band, a, scale, None, native=native)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [3, 5, 7, 9])
@pytest.mark.parametrize("layout", ["shifted", "windows"])
def test_els_border_band_layouts_match_brute_force(k, layout):
    """The border bands' two layouts (copied windows; queries shifted over the rectangle read in
    place), each taken on purpose, with and without the fused softmax, against the brute force
    (7 × 6 images with two channels: row bands read in place, column bands copied)."""
    from synthetic import PreferKernel

    y, noise = small_data()
    x = noised(y[:3].flip(0), noise, 300)
    want = els_oracle(x, y, 300, k, "borders")
    for names in ((layout, "native"), (layout, "torch")):
        model = build_model("els", y, None, patch_sizes=k, dtype=torch.float32, tuner=PreferKernel(*names))
        torch.testing.assert_close(model(x, 300).double(), want, atol=1e-4, rtol=0)
        assert model.last_dtype == torch.float32
        assert model.last_kernel == (layout if model.plan(k)[0] else None)  # k = 9 ≥ H: same positions only


def test_shifted_band_average_equals_the_copied_windows():
    """shifted_band_average against sliding_average in float64 over every band of a plan
    (channels, rectangles read in place and copied, one to several positions)."""
    import torch.nn.functional as F

    from locality.models import patch_kernels

    y, noise = small_data()
    model = build_model("els", y, None, patch_sizes=5, dtype=torch.float64)
    x = noised(y[:3], noise, 500)
    bands, _ = model.plan(5)
    assert any(1 in b.positions for b in bands) and any(b.positions[0] > 1 and b.positions[1] > 1 for b in bands)
    for band in bands:
        q = F.unfold(x[:, :, band.r0 : band.r1, band.c0 : band.c1], band.kernel).transpose(1, 2)
        q = q.reshape(-1, q.shape[2]).contiguous()
        want = patch_kernels.sliding_average(q, y, band, 0.8, 3.0, None)
        got = patch_kernels.shifted_band_average(q, y, band, 0.8, 3.0, 2)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


# (on 13 columns p = 7 has only runs, which span the width)
@pytest.mark.parametrize("mirror", [True, False])
@pytest.mark.parametrize("p,path", [(p, path) for p in (1, 3, 4, 7) for path in ("runs", "rows", "box")
                                    if (p, path) != (7, "rows")])
@pytest.mark.parametrize("t", [300, 20, 0])
def test_pspc_through_the_native_kernels_matches_brute_force(mirror, p, path, t):
    """float32 pspc with the C kernels taken on purpose: tiles with the fused softmax
    (rectangles of ≤ 64 values through its weighted sums, larger ones through its weights and
    torch's GEMMs, float64 steps through its direct differences), and ``box`` (box sums of float64
    direct differences, every step)."""
    from synthetic import PreferKernel

    y, noise = small_data(shape=(1, 7, 13), num=40)  # 80 images with the mirrors: five blocks of 16
    x = noised(y[:3].flip(0), noise, t)
    want = pspc_oracle(x, y, t, p, mirror)
    model = build_model("pspc", y, None, patch_sizes=p, mirror=mirror, dtype=torch.float32,
                        tuner=PreferKernel("native", path))
    torch.testing.assert_close(model(x, t).double(), want, atol=1e-4, rtol=0)
    assert model._native is not None and model.last_kernel == path


@pytest.mark.parametrize("mirror", [True, False])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 6, 7, 40])
@pytest.mark.parametrize("t", [900, 300, 0])
def test_pspc_matches_brute_force(mirror, p, t):
    """Every tile layout (forced through the tuner) on 7 × 13 images: both layouts exist for p < 6."""
    from synthetic import PreferKernel

    y, noise = small_data(1, shape=(2, 7, 13))
    x = noised(y[:3], noise, t)
    want = pspc_oracle(x, y, t, p, mirror)
    layouts = build_model("pspc", y, None, patch_sizes=p).layouts(p)
    assert ("rows" in layouts) == (p < 6)
    for layout in layouts:
        for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            model = build_model("pspc", y, None, patch_sizes=p, mirror=mirror, dtype=dtype,
                                tuner=PreferKernel(layout))
            torch.testing.assert_close(model(x, t).double(), want, atol=atol, rtol=0)
            assert model.last_kernel == layout


def test_pspc_of_the_whole_image_is_the_optimal_denoiser():
    y, noise = small_data(2, shape=(1, 6, 6))
    x = noised(y[:3], noise, 500)
    pspc = build_model("pspc", y, None, patch_sizes=6, mirror=False)(x, 500)
    optimal = build_model("optimal", y, None, temperature=1.0)(x, 500)
    torch.testing.assert_close(pspc, optimal, atol=1e-12, rtol=0)


def test_els_brute_force_is_not_trivially_local():
    """The candidate sets matter: borders, circular and local give different outputs (so the
    tests above can tell the variants apart)."""
    y, noise = small_data(3)
    x = noised(y[:3], noise, 300)
    outs = [els_oracle(x, y, 300, 3, v) for v in ("borders", "circular", "local")]
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[0] - outs[2]).abs().max() > 1e-3


# ------------------------------------------------------------------ chunks, batches, timesteps


@pytest.mark.parametrize("name,params", [("els", {"variant": "borders", "patch_sizes": 3}),
                                         ("els", {"variant": "circular", "patch_sizes": 3}),
                                         ("els", {"variant": "local", "patch_sizes": 5}),
                                         ("pspc", {"patch_sizes": 3})])
def test_output_does_not_depend_on_chunk_or_batch_size(name, params):
    """The authors' circular and local code averaged per-batch softmaxes; here neither the
    image chunks nor the sample batch change x̂0."""
    y, noise = small_data(4, num=9, batch=4)
    for t in (900, 0):
        x = noised(y[:4], noise, t)
        outs = [build_model(name, y, None, chunk_size=c, **params)(x, t) for c in (1, 4, None)]
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], atol=1e-12, rtol=0)
        model = build_model(name, y, None, **params)
        one_by_one = torch.cat([model(x[b : b + 1], t) for b in range(len(x))])
        torch.testing.assert_close(one_by_one, outs[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["els", "pspc"])
def test_a_vector_of_timesteps_and_per_step_sizes(name):
    """One timestep per sample (the authors' code crashed), each at its own step's size."""
    y, noise = small_data(5)
    sizes = [5, 5, 3, 3, 1]  # num_steps=5: t = 800, 600, 400, 200, 0
    model = build_model(name, y, None, patch_sizes=sizes, num_steps=5)
    assert [model.size_at(t) for t in (800, 600, 400, 200, 0)] == sizes
    assert model.size_at(650) == 5 and model.size_at(300) == 3  # off the grid: the nearest step (ties: noisier)
    ts = torch.tensor([800, 200, 0])
    x = noised(y[:3], noise, 400)
    got = model(x, ts)
    for b, t in enumerate(ts.tolist()):
        torch.testing.assert_close(got[b : b + 1], model(x[b : b + 1], t), atol=1e-12, rtol=0)


def test_bad_patch_sizes_are_clear_errors():
    y, _ = small_data()
    with pytest.raises(ValueError, match="odd patch sizes.*got 4 at t=0.*use 3 or 5"):
        build_model("els", y, None, patch_sizes=[5, 4], num_steps=2)
    with pytest.raises(ValueError, match="variant=circular needs patch sizes of at most the image size 6"):
        build_model("els", y, None, patch_sizes=7, variant="circular")
    with pytest.raises(ValueError, match="has 3 entries but the sampler takes 10 steps"):
        build_model("pspc", y, None, patch_sizes=[3, 3, 3])
    with pytest.raises(ValueError, match="positive integers, got 0"):
        build_model("pspc", y, None, patch_sizes=[3, 0], num_steps=2)
    with pytest.raises(ValueError, match="model.variant must be one of borders, circular, local"):
        build_model("els", y, None, patch_sizes=3, variant="reflect")
    with pytest.raises(ValueError, match=r"x_t must be \[B, 2, 7, 6\]"):
        build_model("els", y, None, patch_sizes=3)(torch.zeros(1, 2, 6, 7), 0)


# ------------------------------------------------------------------ the authors' own outputs


def _load(name: str):
    return torch.load(require_reference(name), weights_only=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_els_matches_the_authors_vectors(dtype):
    ref = _load("els_borders_vectors_fmnist200.pt")
    assert ref["meta"]["module"] == "LocalEquivBordersScoreModule"
    for rec in ref["records"]:
        model = build_model("els", ref["Y"], None, patch_sizes=rec["k"], dtype=dtype)
        got = model(rec["x_t"], rec["t"]).double()
        torch.testing.assert_close(got, rec["x0_hat"].double(), atol=1e-4, rtol=0)
        torch.testing.assert_close(got, rec["x0_hat_ref"].double(), atol=1e-4 if dtype == torch.float32 else 1e-9,
                                   rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pspc_matches_the_authors_vectors(dtype):
    ref = _load("pspc_vectors_fmnist200.pt")
    for key, mirror in (("xflip_True", True), ("xflip_False", False)):
        for rec in ref["records"][key]:
            # the authors' schedule gives 32 at high noise, clipped to 28 here as in their run
            model = build_model("pspc", ref["Y"], None, patch_sizes=rec["patch_size"], mirror=mirror, dtype=dtype)
            got = model(rec["x_t"], rec["t"]).double()
            torch.testing.assert_close(got, rec["x0_hat"].double(), atol=1e-4, rtol=0)
            torch.testing.assert_close(got, rec["x0_hat_ref"].double(),
                                       atol=1e-4 if dtype == torch.float32 else 1e-9, rtol=0)


# ------------------------------------------------------------------ the run app with the UNet comparison


@pytest.mark.slow
@pytest.mark.parametrize("name,args,steps", [("els", [], 10),
                                             ("pspc", ["model.patch_sizes=[28,5,3]", "sampler.num_steps=3"], 3)])
def test_run_app_samples_and_compares_with_the_unet(tmp_path, name, args, steps):
    """A tiny end-to-end run (12 MNIST-like images, a tiny UNet as the baseline): samples,
    the per-step comparison metrics, MLflow."""
    import json

    from conftest import run_dirs, run_on_mnist
    from synthetic import TINY_UNET
    from data_factories import write_mnist_like
    from locality.app.baseline import default_checkpoint_path
    from locality.unet_comparison import METRIC_NAMES
    from locality.unet.checkpoint import save_unet_checkpoint
    from locality.unet.network import UNet

    write_mnist_like(tmp_path / "datasets", folder_name="MNIST", n_train=12, seed=1)
    torch.manual_seed(1)
    save_unet_checkpoint(default_checkpoint_path(tmp_path / "models", "mnist"), UNet(**TINY_UNET).eval())
    proc = run_on_mnist([f"model={name}", "sampler.num_samples=3", "sampler.batch_size=2", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = run_dirs(tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    for metric in METRIC_NAMES:
        assert len(metrics[f"{metric}_per_step"]) == steps
        assert math.isfinite(metrics[f"{metric}_final"])
    samples = torch.load(out / "samples.pt")
    assert samples.shape == (3, 1, 28, 28) and torch.isfinite(samples).all()
    # a schedule of the wrong length is refused in one line, naming the fix
    proc = run_on_mnist([f"model={name}", "sampler.num_steps=4", "model.patch_sizes=[5,3]"], tmp_path)
    assert proc.returncode == 2 and "has 2 entries but the sampler takes 4 steps" in proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (torch.cuda.is_available() is False): run `pytest -m cuda` on a GPU machine")
@pytest.mark.parametrize("name", ["els", "pspc"])
def test_cuda_matches_the_authors_vectors_and_the_cpu(name):
    """On CUDA: float32 within 1e-4 of the authors' outputs, float64 equal to the CPU's float64,
    every els variant against the brute force."""
    if name == "els":
        ref = _load("els_borders_vectors_fmnist200.pt")
        cases = [(rec, {"patch_sizes": rec["k"]}) for rec in ref["records"]]
    else:
        ref = _load("pspc_vectors_fmnist200.pt")
        cases = [(rec, {"patch_sizes": rec["patch_size"], "mirror": key == "xflip_True"})
                 for key in ("xflip_True", "xflip_False") for rec in ref["records"][key]]
    for rec, params in cases:
        cuda32 = build_model(name, ref["Y"], None, dtype=torch.float32, device="cuda", **params)
        torch.testing.assert_close(cuda32(rec["x_t"].cuda(), rec["t"]).double().cpu(), rec["x0_hat"].double(),
                                   atol=1e-4, rtol=0)
        cpu64 = build_model(name, ref["Y"], None, dtype=torch.float64, **params)(rec["x_t"], rec["t"])
        cuda64 = build_model(name, ref["Y"], None, dtype=torch.float64, device="cuda", chunk_size=7, **params)
        torch.testing.assert_close(cuda64(rec["x_t"].cuda(), rec["t"]).cpu(), cpu64, atol=1e-9, rtol=0)
    if name == "els":
        y, noise = small_data(6)
        x = noised(y[:3], noise, 100)
        for variant in ("borders", "circular", "local"):
            model = build_model("els", y, None, patch_sizes=5, variant=variant, dtype=torch.float32, device="cuda")
            torch.testing.assert_close(model(x.cuda(), 100).double().cpu(), els_oracle(x, y, 100, 5, variant),
                                       atol=1e-4, rtol=0)
