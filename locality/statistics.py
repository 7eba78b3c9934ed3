"""Data statistics (mean, covariance, eigendecomposition), fitted in float64 and cached by content.

The conditioning rule (SPEC defect 2) lives here and in :mod:`locality.models.masks`:

* **Dead pixels.** A pixel whose variance over the training set is at most
  ``dead_pixel_tol`` times the largest pixel variance is *dead*: its row and column of the
  covariance are set to exactly zero before the eigendecomposition. A dead pixel then has
  L_t[n, :] = L_t[:, n] = 0 at every t, so it neither votes in any softmax nor receives a
  mask; its x̂0 is the softmax average with uniform weights, i.e. its (near-constant) mean.
* **Tiny eigenvalues.** Eigenvalues below ``eigenvalue_tol`` times the largest one (and all
  negative round-off) are set to exactly zero: they are round-off, and a negative one would
  make ᾱλ / ((1-ᾱ) + ᾱλ) meaningless.
* **Precision.** Statistics are accumulated and decomposed in float64 (on MPS, on the CPU),
  and the masks of pca_locality are built from them in float64 on the CPU, whatever the
  compute device: CPU, CUDA and MPS then share bit-identical masks, and a float32 compute path
  sees the same masks as a float64 one. (Fitting in float32, as the reference did with its SVD,
  is kept only to study that defect: at t = 0 the filter resolves eigenvalues down to about
  1e-5, where float32 round-off is of the same size, so no rule can make a float32 fit agree.)

Both tolerances are relative, so they do not depend on the image scale, and both are part of
the cache key. The defaults (1e-6 and 1e-10) leave data whose pixels all vary untouched.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from locality.atomic import atomic_torch_save, write_cache_or_warn
from locality.resources import require_memory

log = logging.getLogger(__name__)

STATISTICS_FORMAT_VERSION = 1
DEFAULT_DEAD_PIXEL_TOL = 1e-6
DEFAULT_EIGENVALUE_TOL = 1e-10


@dataclass(frozen=True)
class DataStatistics:
    """Statistics of N flattened training images (n = C·H·W values each), float64 on the CPU.

    mean [n]; eigenvalues [n] ascending, ≥ 0; eigenvectors [n, n] (columns), so that
    covariance = U diag(λ) Uᵀ; dead [n] bool (see the module docstring).
    """

    mean: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    dead: torch.Tensor
    num_images: int
    image_shape: tuple[int, int, int]
    fingerprint: str

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def covariance(self) -> torch.Tensor:
        """S = U diag(λ) Uᵀ after the conditioning rule, [n, n] float64."""
        u = self.eigenvectors
        return (u * self.eigenvalues) @ u.T

    def wiener_filter(self, abar: float) -> torch.Tensor:
        """L_t = U diag(ᾱλ / ((1 - ᾱ) + ᾱλ)) Uᵀ, [n, n] float64, dead rows/columns exactly 0."""
        lam = self.eigenvalues
        gain = abar * lam / ((1.0 - abar) + abar * lam)
        u = self.eigenvectors
        filt = (u * gain) @ u.T
        filt[self.dead, :] = 0.0
        filt[:, self.dead] = 0.0
        return filt


def content_fingerprint(images: torch.Tensor) -> str:
    """sha256 of the images' exact values, dtype and shape: a cache key that no other data shares."""
    h = hashlib.sha256()
    h.update(f"{tuple(images.shape)}|{images.dtype}".encode())
    data = images.detach().to("cpu").contiguous()
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def fit_statistics(
    images: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    dead_pixel_tol: float = DEFAULT_DEAD_PIXEL_TOL,
    eigenvalue_tol: float = DEFAULT_EIGENVALUE_TOL,
    chunk_size: int = 8192,
    progress: bool = True,
    fingerprint: str | None = None,
) -> DataStatistics:
    """Fit mean, covariance and its eigendecomposition of ``images`` [N, C, H, W].

    The covariance is S = Σ_k (y_k - μ)(y_k - μ)ᵀ / (N - 1) over all n = C·H·W values, cross-
    channel terms included, accumulated in ``dtype`` (float64 by default; float32 exists to
    reproduce the reference implementation's precision in tests). The result is float64 with
    the conditioning rule of the module docstring applied.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    num, c, h, w = images.shape
    if num < 2:
        raise ValueError(f"fitting statistics needs at least 2 images, got {num}")
    n = c * h * w
    flat = images.reshape(num, n)
    device = images.device
    if device.type == "mps" and dtype == torch.float64:
        device = torch.device("cpu")  # MPS has no float64
    # the covariance, its conditioned copy, eigh's eigenvectors and workspace: 4 n×n matrices
    require_memory(4 * n * n * torch.finfo(dtype).bits // 8,
                   f"the statistics of {c}×{h}×{w} images ({n} values each: a {n}×{n} covariance and its "
                   f"eigendecomposition in {str(dtype).removeprefix('torch.')})",
                   "use a smaller dataset.resolution", device)
    starts = range(0, num, chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="fitting statistics", unit="chunk", leave=False)
    total = torch.zeros(n, dtype=dtype, device=device)
    for s in range(0, num, chunk_size):
        total += flat[s : s + chunk_size].to(device=device, dtype=dtype).sum(0)
    mean = total / num
    cov = torch.zeros(n, n, dtype=dtype, device=device)
    for s in starts:
        centred = flat[s : s + chunk_size].to(device=device, dtype=dtype) - mean
        cov.addmm_(centred.T, centred)
    cov /= num - 1
    mean, cov = mean.double().cpu(), cov.cpu()

    variance = torch.diagonal(cov).double()
    dead = variance <= dead_pixel_tol * variance.max().clamp_min(0.0)
    cov = cov.clone()
    cov[dead, :] = 0
    cov[:, dead] = 0
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # in ``dtype``: symmetric, so eigh suffices
    eigenvalues, eigenvectors = eigenvalues.double(), eigenvectors.double()
    floor = eigenvalue_tol * eigenvalues.max().clamp_min(0.0)
    eigenvalues = torch.where(eigenvalues < floor, torch.zeros_like(eigenvalues), eigenvalues)
    if fingerprint is None:
        fingerprint = content_fingerprint(images)
    return DataStatistics(
        mean=mean,
        eigenvalues=eigenvalues,
        eigenvectors=eigenvectors,
        dead=dead,
        num_images=num,
        image_shape=(c, h, w),
        fingerprint=fingerprint,
    )


# ----------------------------------------------------------------------------- disk cache


def statistics_cache_path(
    cache_dir: str | Path,
    dataset: str,
    split: str,
    resolution: int,
    subset_size: int | None,
    fingerprint: str,
    dead_pixel_tol: float = DEFAULT_DEAD_PIXEL_TOL,
    eigenvalue_tol: float = DEFAULT_EIGENVALUE_TOL,
) -> Path:
    """Where the statistics of exactly this data (and rule) live; the content fingerprint is
    part of the name, so a subset's statistics can never be read for the full set."""
    subset = "all" if subset_size is None else str(subset_size)
    rule = hashlib.sha256(f"{dead_pixel_tol!r}|{eigenvalue_tol!r}".encode()).hexdigest()[:8]
    name = (
        f"{dataset}_{split}_{resolution}px_{subset}_{fingerprint[:16]}_r{rule}"
        f"_v{STATISTICS_FORMAT_VERSION}.pt"
    )
    return Path(cache_dir) / "statistics" / name


def _payload_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_statistics(stats: DataStatistics, path: str | Path) -> None:
    """Write atomically (temporary file in the same folder, then rename) with a checksum."""
    tensors = {
        "mean": stats.mean,
        "eigenvalues": stats.eigenvalues,
        "eigenvectors": stats.eigenvectors,
        "dead": stats.dead,
    }
    payload = {
        "format_version": STATISTICS_FORMAT_VERSION,
        "tensors": tensors,
        "num_images": stats.num_images,
        "image_shape": list(stats.image_shape),
        "fingerprint": stats.fingerprint,
        "digest": _payload_digest(tensors),
    }
    atomic_torch_save(payload, path)


class CorruptCacheError(ValueError):
    pass


def load_statistics(path: str | Path, expected_fingerprint: str | None = None) -> DataStatistics:
    """Read a cache file; raise :class:`CorruptCacheError` if it is truncated, altered or for
    other data than ``expected_fingerprint``."""
    path = Path(path)
    try:
        payload = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        tensors = payload["tensors"]
        ok = (
            payload["format_version"] == STATISTICS_FORMAT_VERSION
            and payload["digest"] == _payload_digest(tensors)
        )
    except Exception as exc:  # any unreadable file is a corrupt cache
        raise CorruptCacheError(f"statistics cache {path} is unreadable: {exc}") from exc
    if not ok:
        raise CorruptCacheError(f"statistics cache {path} fails its checksum")
    if expected_fingerprint is not None and payload["fingerprint"] != expected_fingerprint:
        raise CorruptCacheError(f"statistics cache {path} belongs to other data")
    return DataStatistics(
        mean=tensors["mean"],
        eigenvalues=tensors["eigenvalues"],
        eigenvectors=tensors["eigenvectors"],
        dead=tensors["dead"],
        num_images=int(payload["num_images"]),
        image_shape=tuple(payload["image_shape"]),
        fingerprint=payload["fingerprint"],
    )


def cached_statistics(
    images: torch.Tensor,
    cache_dir: str | Path | None,
    dataset: str,
    split: str,
    resolution: int,
    subset_size: int | None,
    dead_pixel_tol: float = DEFAULT_DEAD_PIXEL_TOL,
    eigenvalue_tol: float = DEFAULT_EIGENVALUE_TOL,
    progress: bool = True,
) -> tuple[DataStatistics, bool]:
    """Statistics of ``images``, from the cache when a valid entry exists; returns (stats, hit).

    A corrupt cache file is reported with a warning, recomputed and replaced; a cache that
    cannot be written (read-only folder, full disk) is a warning, not an error.
    """
    fingerprint = content_fingerprint(images)
    path = None
    if cache_dir is not None:
        path = statistics_cache_path(
            cache_dir, dataset, split, resolution, subset_size, fingerprint, dead_pixel_tol, eigenvalue_tol
        )
    if path is not None and path.exists():
        try:
            stats = load_statistics(path, expected_fingerprint=fingerprint)
            log.info("statistics loaded from cache %s", path)
            return stats, True
        except CorruptCacheError as exc:
            log.warning("%s; recomputing it", exc)
    stats = fit_statistics(
        images, dead_pixel_tol=dead_pixel_tol, eigenvalue_tol=eigenvalue_tol,
        progress=progress, fingerprint=fingerprint,
    )
    if path is not None:
        if write_cache_or_warn(lambda: save_statistics(stats, path), path, "statistics cache", log,
                               "set paths.cache_dir to a writable folder"):
            log.info("statistics cached at %s", path)
    return stats, False
