"""MNIST and Fashion-MNIST from IDX files (torchvision's on-disk layout, or Debian's package).

Layout read (torchvision's, what ``torchvision.datasets.MNIST(root, download=True)`` writes)::

    <root>/MNIST/raw/train-images-idx3-ubyte[.gz]          split "train" (60000 x 28 x 28)
    <root>/MNIST/raw/t10k-images-idx3-ubyte[.gz]           split "test"  (10000 x 28 x 28)
    <root>/FashionMNIST/raw/...                            same names for Fashion-MNIST

Both the raw and the gzipped file are accepted (gzip is detected from the file's bytes; the raw
file wins when both exist). The IDX header is checked: magic ``0x00000803`` (unsigned bytes,
3 dimensions) followed by the big-endian sizes N, H, W.

Lookup order for a split: the torchvision copy; then, with ``download=True``, a download through
``torchvision.datasets.MNIST`` / ``FashionMNIST`` into ``<root>``; then (Fashion-MNIST only) the
system directories, by default ``/usr/share/datasets/fashion-mnist`` from the Debian package
``dataset-fashion-mnist`` (same ``*.gz`` names; its gzip bytes differ from upstream, so they are
never md5-checked, only the decoded IDX header is).

A resolution other than 28 resizes the uint8 images like ``torchvision.transforms.Resize``
(bilinear, antialias), see :func:`locality.data.common.resize_uint8_batch`.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from locality.data.common import LoadRequest, check_subset_size, not_found, resize_uint8_batch

logger = logging.getLogger(__name__)

#: Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
IDX_IMAGES_MAGIC = 0x00000803
#: Image file (without ``.gz``) per split.
IDX_SPLIT_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_GZIP_MAGIC = b"\x1f\x8b"


def _open_maybe_gzip(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading, through gzip when its first bytes are the gzip magic."""
    with open(path, "rb") as f:
        head = f.read(2)
    return gzip.open(path, "rb") if head == _GZIP_MAGIC else open(path, "rb")


def read_idx_images(path: str | Path, max_items: int | None = None) -> tuple[np.ndarray, int]:
    """Read images from an IDX3 ubyte file (raw or gzipped).

    Args:
        path: the ``*-images-idx3-ubyte[.gz]`` file.
        max_items: read only the first ``max_items`` images (``None``: all of them). Reading
            stops early, so a subset of a gzipped file only decompresses what it needs.

    Returns:
        ``(images, n_total)``: ``images`` is a uint8 array ``[n, H, W]`` with
        ``n = min(max_items, n_total)``; ``n_total`` is the count declared in the header.

    Raises:
        ValueError: bad magic number, bad header, truncated data or a corrupt gzip stream; the
            message names the file.
    """
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            header = f.read(16)
            if len(header) < 16:
                raise ValueError(f"IDX file {path} is truncated: header has {len(header)} of 16 bytes")
            magic, n_total, height, width = struct.unpack(">IIII", header)
            if magic != IDX_IMAGES_MAGIC:
                raise ValueError(
                    f"{path} is not an IDX image file: magic number 0x{magic:08x}, "
                    f"expected 0x{IDX_IMAGES_MAGIC:08x} (unsigned bytes, 3 dimensions)"
                )
            if height < 1 or width < 1:
                raise ValueError(f"IDX file {path} has an invalid image size {height}x{width}")
            n = n_total if max_items is None else min(max_items, n_total)
            expected = n * height * width
            data = f.read(expected)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"IDX file {path} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    if len(data) != expected:
        raise ValueError(
            f"IDX file {path} is truncated: expected {expected} bytes of image data for {n} "
            f"images of {height}x{width}, found {len(data)}"
        )
    images = np.frombuffer(data, dtype=np.uint8).reshape(n, height, width)
    return images, n_total


def find_idx_file(directory: Path, base: str) -> Path | None:
    """``directory/base`` if it exists, else ``directory/base.gz`` if it exists, else ``None``."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _torchvision_download(class_name: str, root: Path, split: str) -> None:
    """Fetch the dataset with ``torchvision.datasets.<class_name>(root, train=..., download=True)``."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, class_name)
    root.mkdir(parents=True, exist_ok=True)
    dataset_class(str(root), train=(split == "train"), download=True)


def _load_idx_dataset(req: LoadRequest, folder: str, how: str) -> torch.Tensor:
    """Shared loader of MNIST-like datasets; ``folder`` is torchvision's class / folder name."""
    base = IDX_SPLIT_FILES[req.split]
    raw_dir = req.root / folder / "raw"
    looked_in: list[Path] = [raw_dir / base, raw_dir / f"{base}.gz"]
    path = find_idx_file(raw_dir, base)

    reason = None
    if path is None and req.download:
        logger.info("downloading %s with torchvision into %s", req.name, req.root)
        try:
            _torchvision_download(folder, req.root, req.split)
        except Exception as e:  # noqa: BLE001 - any failure is reported to the user below
            reason = f"dataset.download=true was set but the download failed: {type(e).__name__}: {e}"
        path = find_idx_file(raw_dir, base)
        if path is None and reason is None:
            reason = "dataset.download=true was set but the download did not produce the file."

    if path is None:
        for directory in req.system_dirs:
            looked_in += [directory / base, directory / f"{base}.gz"]
            path = find_idx_file(directory, base)
            if path is not None:
                logger.info("using the system copy of %s in %s", req.name, directory)
                break

    if path is None:
        raise not_found(req.name, f"the {req.split!r} images {base}[.gz]", looked_in, how, reason)

    # The header gives the size, so a subset only reads its own bytes.
    _, n_total = read_idx_images(path, max_items=0)
    n = check_subset_size(req.name, req.split, req.subset_size, n_total)
    images, _ = read_idx_images(path, max_items=n)
    batch = torch.from_numpy(images.copy()).unsqueeze(1)  # [N, 1, H, W]
    return resize_uint8_batch(batch, req.resolution)


def _how_torchvision(root: Path, folder: str) -> str:
    return (
        f"set dataset.download=true (needs network; torchvision writes {root / folder / 'raw'}), "
        f"or copy {IDX_SPLIT_FILES['train']}.gz and {IDX_SPLIT_FILES['test']}.gz "
        f"into {root / folder / 'raw'} (the folder under dataset.root={root})."
    )


def load_mnist(req: LoadRequest) -> torch.Tensor:
    """MNIST split ``req.split`` as uint8 ``[N, 1, r, r]`` (r = ``req.resolution``)."""
    return _load_idx_dataset(req, "MNIST", _how_torchvision(req.root, "MNIST"))


def load_fashion_mnist(req: LoadRequest) -> torch.Tensor:
    """Fashion-MNIST split ``req.split`` as uint8 ``[N, 1, r, r]``; falls back to ``req.system_dirs``."""
    how = (
        "`apt-get install dataset-fashion-mnist` (installs the files in "
        f"{DEBIAN_FASHION_MNIST_DIR}, used automatically), or " + _how_torchvision(req.root, "FashionMNIST")
    )
    return _load_idx_dataset(req, "FashionMNIST", how)
