"""Shared pieces of the dataset layer: the load request, errors, subset checks, resizing, scaling.

Every loader returns a ``uint8`` tensor ``[N, C, H, W]`` already at the requested resolution;
:func:`to_unit_range` turns it into the float32 ``[-1, 1]`` tensor handed to the rest of the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from locality.resources import require_memory

#: Images resized per call in :func:`resize_uint8_batch` (bounds the float32 working memory).
RESIZE_CHUNK = 2048


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing (and could not be downloaded or found in a system copy).

    The message says what is missing, every path that was looked at, and how to get the data
    (in terms of the ``dataset=... dataset.root=... dataset.download=...`` config keys).
    """


@dataclass(frozen=True)
class LoadRequest:
    """Validated arguments handed to a dataset loader by :func:`locality.data.load_dataset`.

    ``resolution`` is the final square size (already resolved from the spec's native/default
    resolution); ``subset_size`` is ``None`` (all images) or a positive int; ``cache_dir``
    (optional) holds decoded image folders (:mod:`locality.data.folders`).
    """

    name: str
    root: Path
    split: str
    resolution: int
    subset_size: int | None
    download: bool
    progress: bool
    system_dirs: tuple[Path, ...]
    cache_dir: Path | None = None  # image folders keep their decoded pixels here (None: decode every time)
    options: dict = field(default_factory=dict)  # the spec's extra dataset.* keys (DatasetSpec.options)


def not_found(
    name: str,
    what: str,
    looked_in: Sequence[Path | str],
    how: str,
    reason: str | None = None,
) -> DatasetNotFoundError:
    """Build a :class:`DatasetNotFoundError` with a what / where / how message.

    Args:
        name: dataset name (as used in ``dataset=<name>``).
        what: which files are missing.
        looked_in: every path that was checked, in order.
        how: how to get the data.
        reason: optional extra line (e.g. why a download failed).
    """
    lines = [f"Dataset {name!r} not found: missing {what}.", "Looked in:"]
    lines += [f"  - {p}" for p in looked_in]
    if reason:
        lines.append(reason)
    lines.append(f"How to get it: {how}")
    return DatasetNotFoundError("\n".join(lines))


def check_subset_size(name: str, split: str, subset_size: int | None, n_total: int) -> int:
    """Number of images to take: ``n_total`` for ``None``, else ``subset_size`` if it fits.

    Raises:
        ValueError: ``subset_size`` is < 1 or larger than the dataset (the message gives its size).
    """
    if subset_size is None:
        return n_total
    if subset_size < 1 or subset_size > n_total:
        raise ValueError(
            f"dataset.subset_size={subset_size} is invalid for {name!r} split {split!r}: "
            f"it must be between 1 and the dataset size {n_total} (or null for all images)."
        )
    return subset_size


def require_image_memory(name: str, n: int, channels: int, resolution: int) -> None:
    """Refuse, before allocating, ``n`` images that cannot be held: their uint8 pixels and the
    float32 [-1, 1] copy handed to the rest of the code (5 bytes a value)."""
    require_memory(n * channels * resolution * resolution * 5,
                   f"loading {n} images of {name} at {channels}×{resolution}×{resolution} (uint8 pixels and "
                   f"their float32 copy)", "use a smaller dataset.resolution or dataset.subset_size")


def resize_uint8_batch(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize square ``uint8 [N, C, H, W]`` images to ``uint8 [N, C, r, r]``.

    Same operation as ``torchvision.transforms.Resize(r)`` (bilinear, ``antialias=True``) on each
    image, i.e. ``torchvision.transforms.functional.resize(images, [r, r], BILINEAR,
    antialias=True)``; done in chunks of :data:`RESIZE_CHUNK` images. Returns the input itself
    when it already has the requested size.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a [N, C, H, W] batch, got shape {tuple(images.shape)}")
    if images.shape[-2:] == (resolution, resolution):
        return images
    # torchvision only here (and for downloads): importing it costs ~170 MB of the process's
    # memory, which a run of images at their stored size never needs
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    n, c = images.shape[:2]
    require_image_memory("the dataset", n, c, resolution)
    out = torch.empty((n, c, resolution, resolution), dtype=torch.uint8)
    for start in range(0, n, RESIZE_CHUNK):
        chunk = images[start : start + RESIZE_CHUNK]
        out[start : start + len(chunk)] = TF.resize(
            chunk, [resolution, resolution], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
    return out


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, C, H, W]`` -> float32 ``[N, C, H, W]`` with ``v -> (v / 255 - 0.5) / 0.5``.

    Computed in float32 exactly as ``(images.float() / 255 - 0.5) / 0.5`` (in place on the copy).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    out = images.to(torch.float32)
    return out.div_(255).sub_(0.5).div_(0.5)

