"""Sensitivity fields: rows of the Jacobian ∂x̂0[m]/∂x_t of a denoiser, and the numbers that
summarise them (no Hydra, no MLflow).

For an output value m = (c, i, j) the field of a denoiser at x_t is F[n] = ∂x̂0[m]/∂x_t[n],
[C, H, W] like the image. How each model's field is computed (all float64, all exact):

* ``wiener``: the closed form, row m of L_t / √ᾱ_t (independent of x_t).
* ``pca_locality``, ``optimal``, ``els``, ``pspc``: each is a softmax average
  x̂0[m] = Σ_c w_c v_c of candidate values v_c (a training pixel) with logits
  l_c = -Σ_d M_d (q_d - a k_{c,d})² / D over a query window q of x_t and the candidate's window
  k_c (a = √ᾱ; D = 2(1 - ᾱ)τ; M the mask column of pca_locality, 1 for the others). Its gradient
  is a weighted covariance,

      ∂x̂0[m]/∂q_d = (2a M_d / D) (E_w[v k_d] - E_w[v] E_w[k_d]),

  streamed over chunks of candidates with an online log-sum-exp (the same exact softmax as
  the models, over ALL N training images; no subset): the candidates are every training image
  (pca_locality on the mask's support, optimal on all values), the windows of els' candidate
  set S(i, j) (variants borders, circular, local), and for pspc one softmax per p×p window
  containing (i, j), their fields averaged as the model averages their outputs.
* ``nearest_dataset``: piecewise constant in x_t, so the field is zero (almost everywhere).
* ``unet`` (and any :class:`~locality.models.unet_denoiser.UNetDenoiser`): autograd through the network,
  x̂0 = (x_t - √(1-ᾱ) ε̂(x_t, t)) / √ᾱ, in the network's dtype.

Numbers of a field F with output pixel (i, j): the radius holding ``fraction`` (90 %) of
Σ|F| (summed over channels, Euclidean distance from (i, j)); the Pearson correlation of two
fields over all values; the IoU of their supports {|F| ≥ θ max|F|} at a threshold θ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from locality.schedule import alpha_bar, x0_from_eps

#: Output value (channel, row, column).
Pixel = tuple[int, int, int]
CHUNK_BYTES = 32 * 2**20  # float64 candidate windows streamed at once

__all__ = [
    "FIELD_METHODS", "Pixel", "default_pixels", "field_correlation", "mass_radius", "sensitivity_field",
    "softmax_covariance", "support_iou",
]


def softmax_covariance(queries: torch.Tensor, candidates: Iterable[tuple[torch.Tensor, torch.Tensor]], a: float,
                       denom: float, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of a softmax average (module doc) for queries [B, D] float64 and chunks of
    candidates (values [K] float64, windows [K, D] float64); ``mask`` [D] (None: ones).
    Returns (field [B, D], x̂0 [B] = the softmax average of the values, a by-product to check)."""
    b, dim = queries.shape
    weights = torch.ones(dim, dtype=torch.float64, device=queries.device) if mask is None else mask.double()
    qm = queries * weights
    q_sq = (queries.square() * weights).sum(1, keepdim=True)  # [B, 1]
    run_max = torch.full((b,), -math.inf, dtype=torch.float64, device=queries.device)
    s0 = torch.zeros(b, dtype=torch.float64, device=queries.device)
    sv = torch.zeros_like(s0)
    sk = torch.zeros(b, dim, dtype=torch.float64, device=queries.device)
    svk = torch.zeros_like(sk)
    for values, windows in candidates:
        # -Σ_d M_d (q_d - a k_d)² / D, expanded into products (float64: no cancellation to fear here)
        logits = -(q_sq - 2 * a * qm @ windows.T + a * a * (windows.square() @ weights)) / denom  # [B, K]
        new_max = torch.maximum(run_max, logits.max(1).values)
        keep = torch.exp(run_max - new_max)  # rescales what was summed under the old maximum
        e = torch.exp(logits - new_max[:, None])
        s0 = s0 * keep + e.sum(1)
        sv = sv * keep + e @ values
        sk = sk * keep[:, None] + e @ windows
        svk = svk * keep[:, None] + (e * values) @ windows
        run_max = new_max
    ev, ek = sv / s0, sk / s0[:, None]
    field = (2 * a / denom) * weights * (svk / s0[:, None] - ev[:, None] * ek)
    return field, ev


def _chunk_rows(per_row_values: int) -> int:
    return max(1, CHUNK_BYTES // (8 * max(1, per_row_values)))


def _image_chunks(images: torch.Tensor, per_image_values: int) -> Iterator[torch.Tensor]:
    """float64 CPU chunks of images [N, ...] sized so that a chunk's windows fit CHUNK_BYTES."""
    rows = _chunk_rows(per_image_values)
    for start in range(0, images.shape[0], rows):
        yield images[start : start + rows].to("cpu", torch.float64)


def _abar(t: int) -> float:
    return float(alpha_bar(int(t)))


def _flat_index(pixel: Pixel, shape: Sequence[int]) -> int:
    c, i, j = pixel
    return (c * shape[1] + i) * shape[2] + j


def wiener_field(model, x_t: torch.Tensor, t: int, pixel: Pixel) -> torch.Tensor:
    """Row m of L_t / √ᾱ_t (the Wiener filter is linear: the same field for every x_t)."""
    abar = _abar(t)
    row = model.stats.wiener_filter(abar)[_flat_index(pixel, x_t.shape[1:])] / math.sqrt(abar)
    return row.to("cpu", torch.float64).reshape(x_t.shape[1:]).expand(x_t.shape).clone()


def _dataset_field(images: torch.Tensor, x_t: torch.Tensor, t: int, pixel: Pixel, temperature: float,
                   mask_column: torch.Tensor | None) -> torch.Tensor:
    """pca_locality (mask column [n]) and optimal (None): training images [N, n] as candidates."""
    shape = x_t.shape
    x = x_t.detach().to("cpu", torch.float64).reshape(shape[0], -1)
    m = _flat_index(pixel, shape[1:])
    support = torch.arange(x.shape[1]) if mask_column is None else torch.nonzero(mask_column).flatten()
    out = torch.zeros_like(x)
    if len(support) == 0:  # a dead pixel: x̂0[m] is its constant mean
        return out.reshape(shape)
    abar = _abar(t)
    flat = images.reshape(images.shape[0], -1)
    chunks = ((y[:, m], y[:, support]) for y in _image_chunks(flat, len(support)))
    weights = None if mask_column is None else mask_column[support].double()
    field, _ = softmax_covariance(x[:, support], chunks, math.sqrt(abar), 2 * (1 - abar) * temperature, weights)
    out[:, support] = field
    return out.reshape(shape)


def pca_locality_field(model, x_t: torch.Tensor, t: int, pixel: Pixel) -> torch.Tensor:
    """Streamed covariance over all N images on the support of the mask column M_t[:, m]."""
    column = model.mask(int(t))[:, _flat_index(pixel, x_t.shape[1:])].to("cpu", torch.float64)
    return _dataset_field(model.images, x_t, t, pixel, model.temperature, column)


def optimal_field(model, x_t: torch.Tensor, t: int, pixel: Pixel) -> torch.Tensor:
    """Streamed covariance over all N images and all values."""
    return _dataset_field(model.images, x_t, t, pixel, model.temperature, None)


def els_candidates(variant: str, k: int, i: int, j: int, h: int, w: int):
    """(row offsets, col offsets, query rows, query cols, candidate rows U, candidate cols V) of
    els' candidate set S(i, j) at patch size k (SPEC; windows clipped where zero padding is)."""
    d = k // 2

    def axis(p: int, length: int):
        if variant == "circular":
            off = torch.arange(-d, d + 1)
            return off, (p + off) % length, torch.arange(d, length - d)
        off = torch.arange(max(-d, -p), min(d, length - 1 - p) + 1)
        border = variant == "local" or p < d or p > length - 1 - d
        return off, p + off, torch.tensor([p]) if border else torch.arange(d, length - d)

    dr, rows, us = axis(i, h)
    dc, cols, vs = axis(j, w)
    return dr, dc, rows, cols, us, vs


def els_field(model, x_t: torch.Tensor, t: int, pixel: Pixel) -> torch.Tensor:
    """Streamed covariance over every window of S(i, j) of every training image."""
    c0, i, j = pixel
    bsz, ch, h, w = x_t.shape
    dr, dc, rows, cols, us, vs = els_candidates(model.variant, model.size_at(int(t)), i, j, h, w)
    x = x_t.detach().to("cpu", torch.float64)
    queries = x[:, :, rows][:, :, :, cols].reshape(bsz, -1)
    win_rows, win_cols = us[:, None] + dr[None, :], vs[:, None] + dc[None, :]  # [|U|, |dr|], [|V|, |dc|]
    per_image = len(us) * len(vs) * queries.shape[1]

    def chunks():
        for y in _image_chunks(model.images, per_image):
            win = y[:, :, win_rows][:, :, :, :, win_cols]  # [K, C, |U|, |dr|, |V|, |dc|]
            win = win.permute(0, 2, 4, 1, 3, 5).reshape(-1, queries.shape[1])
            vals = y[:, c0][:, us][:, :, vs].reshape(-1)
            yield vals, win

    abar = _abar(t)
    field, _ = softmax_covariance(queries, chunks(), math.sqrt(abar), 2 * (1 - abar))
    out = torch.zeros_like(x)
    out[:, :, rows[:, None], cols[None, :]] += field.reshape(bsz, ch, len(dr), len(dc))
    return out


def pspc_field(model, x_t: torch.Tensor, t: int, pixel: Pixel) -> torch.Tensor:
    """One streamed covariance per p×p window containing (i, j) (over all training images and
    their mirrors when ``mirror``), averaged over the windows as the model averages outputs."""
    c0, i, j = pixel
    bsz, ch, h, w = x_t.shape
    ph, pw = min(model.size_at(int(t)), h), min(model.size_at(int(t)), w)  # sizes above the image: clipped
    x = x_t.detach().to("cpu", torch.float64)
    abar = _abar(t)
    out = torch.zeros_like(x)
    anchors = [(r, c) for r in range(max(0, i - ph + 1), min(i, h - ph) + 1)
               for c in range(max(0, j - pw + 1), min(j, w - pw) + 1)]
    for r, c in anchors:
        queries = x[:, :, r : r + ph, c : c + pw].reshape(bsz, -1)
        chunks = ((y[:, c0, i, j], y[:, :, r : r + ph, c : c + pw].reshape(len(y), -1))
                  for y in _image_chunks(model.images, queries.shape[1]))
        field, _ = softmax_covariance(queries, chunks, math.sqrt(abar), 2 * (1 - abar))
        out[:, :, r : r + ph, c : c + pw] += field.reshape(bsz, ch, ph, pw)
    return out / len(anchors)


def zero_field(model, x_t: torch.Tensor, t: int, pixel: Pixel) -> torch.Tensor:
    """nearest_dataset: a training image, constant between the cells of its Voronoi diagram."""
    return torch.zeros(x_t.shape, dtype=torch.float64)


def unet_field(model, x_t: torch.Tensor, t: int, pixel: Pixel) -> torch.Tensor:
    """Autograd through the network (eval mode) in its dtype; one backward pass for the batch
    (the images of a batch do not interact in eval mode)."""
    c, i, j = pixel
    x = x_t.detach().to(model.device, model.dtype).requires_grad_(True)
    tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=model.device)
    model.net.eval()
    with torch.inference_mode(False), torch.enable_grad():
        x0 = x0_from_eps(x, model.net(x, tt), _abar(t))
        (grad,) = torch.autograd.grad(x0[:, c, i, j].sum(), x)
    return grad.detach().to("cpu", torch.float64)


FieldFn = Callable[[object, torch.Tensor, int, Pixel], torch.Tensor]
#: model name -> (field function, how it is computed: logged and written beside the numbers)
FIELD_METHODS: dict[str, tuple[FieldFn, str]] = {
    "wiener": (wiener_field, "closed form: row of L_t/sqrt(abar_t)"),
    "pca_locality": (pca_locality_field, "exact: streamed softmax covariance over all N images on the mask support"),
    "optimal": (optimal_field, "exact: streamed softmax covariance over all N images"),
    "els": (els_field, "exact: streamed softmax covariance over every candidate window of every image"),
    "pspc": (pspc_field, "exact: streamed softmax covariance per window, averaged over the windows"),
    "nearest_dataset": (zero_field, "zero: piecewise constant in x_t"),
    "unet": (unet_field, "autograd through the network"),
}


def field_method(name: str) -> tuple[FieldFn, str]:
    try:
        return FIELD_METHODS[name]
    except KeyError:
        raise ValueError(f"no sensitivity field for model {name!r}; fields exist for "
                         f"{', '.join(sorted(FIELD_METHODS))}") from None


def sensitivity_field(model, x_t: torch.Tensor, t: int, pixel: Pixel) -> torch.Tensor:
    """∂x̂0[pixel]/∂x_t of ``model`` (a built denoiser; its ``name`` picks the method) at
    x_t [B, C, H, W] and timestep t -> [B, C, H, W] float64 on the CPU."""
    c, i, j = pixel
    _, ch, h, w = x_t.shape
    if not (0 <= c < ch and 0 <= i < h and 0 <= j < w):
        raise ValueError(f"output pixel (channel, row, col) = {pixel} lies outside the {ch}×{h}×{w} image")
    fn, _ = field_method(getattr(model, "name", type(model).__name__))
    return fn(model, x_t, int(t), pixel)


def default_pixels(height: int, width: int) -> list[tuple[int, int]]:
    """The centre, and one near a border (2 pixels in from the left edge, on the centre row)."""
    return [(height // 2, width // 2), (height // 2, min(2, width - 1))]


def _distances(shape: Sequence[int], centre: tuple[int, int]) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(shape[-2]), torch.arange(shape[-1]), indexing="ij")
    return ((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2).double().sqrt()


def mass_radius(field: torch.Tensor, centre: tuple[int, int], fraction: float = 0.9) -> float:
    """The smallest distance r from ``centre`` such that the pixels within r hold ``fraction`` of
    Σ|field| (field [C, H, W] or [H, W], summed over channels); nan for a zero field."""
    mass = field.double().abs()
    mass = mass.sum(0) if mass.dim() == 3 else mass
    total = float(mass.sum())
    if total == 0:
        return math.nan
    dist = _distances(mass.shape, centre).flatten()
    order = torch.argsort(dist, stable=True)
    held = torch.cumsum(mass.flatten()[order], 0)
    first = int(torch.searchsorted(held, torch.tensor(fraction * total, dtype=torch.float64) * (1 - 1e-12)))
    return float(dist[order][min(first, len(order) - 1)])


def field_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two fields over all their values (nan if either is constant)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else math.nan


def support(field: torch.Tensor, threshold: float) -> torch.Tensor:
    """{|F| ≥ θ max|F|} as a bool tensor (empty for a zero field)."""
    mag = field.double().abs()
    top = float(mag.max()) if mag.numel() else 0.0
    return mag >= threshold * top if top > 0 else torch.zeros(mag.shape, dtype=torch.bool)


def support_iou(a: torch.Tensor, b: torch.Tensor, threshold: float) -> float:
    """IoU of the supports of two fields at θ = ``threshold`` (nan if both are empty)."""
    sa, sb = support(a, threshold), support(b, threshold)
    union = int((sa | sb).sum())
    return int((sa & sb).sum()) / union if union else math.nan
