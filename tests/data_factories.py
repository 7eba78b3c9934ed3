"""Write small datasets in their real on-disk formats, for tests (no network, no real data).

Every writer generates random uint8 content with ``numpy.random.default_rng(seed)`` and returns
exactly what it wrote, so a test can compare a loader's output to it:

- :func:`write_idx_images`: one IDX3 ubyte image file (magic ``0x00000803``), raw or gzipped.
- :func:`write_mnist_like`: torchvision's ``<root>/<MNIST|FashionMNIST>/raw`` train and test files
  (or, with ``raw_subdir=False``, the flat Debian ``dataset-fashion-mnist`` layout).
- :func:`write_cifar10`: torchvision's ``<root>/cifar-10-batches-py`` pickle batches (bytes
  written as Python 2 ``str``, like the real files: they load as bytes with ``encoding="bytes"``
  and as str with torchvision's ``encoding="latin1"``).
- :func:`write_image_folder`: image files for ``<root>/<name>/<split>/...`` (CelebA-HQ / AFHQ).
- :func:`expected_unit_range`: the ``[-1, 1]`` float32 tensor a loader must return for uint8 data.
"""

from __future__ import annotations

import gzip as gzip_module
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IDX_IMAGES_MAGIC = 0x00000803


def expected_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (array or tensor) -> float32 ``(v / 255 - 0.5) / 0.5``."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, copy=True))
    assert x.dtype == torch.uint8, x.dtype
    return (x.float() / 255 - 0.5) / 0.5


def write_idx_images(path: str | Path, images: np.ndarray, gzip: bool = True) -> Path:
    """Write uint8 ``images`` ``[N, H, W]`` as an IDX3 ubyte file at ``path`` (gzipped if ``gzip``).

    The file name is used as given (add ``.gz`` yourself for gzipped files). Returns ``path``.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim != 3:
        raise ValueError(f"expected [N, H, W], got shape {images.shape}")
    return _write_idx(path, struct.pack(">IIII", IDX_IMAGES_MAGIC, *images.shape) + images.tobytes(), gzip)


def write_idx_labels(path: str | Path, labels: np.ndarray, gzip: bool = True) -> Path:
    """Write uint8 ``labels`` ``[N]`` as an IDX1 ubyte file (magic ``0x00000801``)."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    return _write_idx(path, struct.pack(">II", 0x00000801, len(labels)) + labels.tobytes(), gzip)


def _write_idx(path: str | Path, payload: bytes, gzip: bool) -> Path:
    """Write an IDX header + body, gzip-compressed or raw."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gzip:
        with gzip_module.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_mnist_like(
    root: str | Path,
    folder_name: str = "FashionMNIST",
    n_train: int = 12,
    n_test: int = 5,
    seed: int = 0,
    gzip: bool = True,
    size: int = 28,
    raw_subdir: bool = True,
) -> dict[str, np.ndarray]:
    """Write MNIST-like train/test image (and label) IDX files.

    Files go to ``<root>/<folder_name>/raw/`` (torchvision's layout, ``folder_name`` = ``"MNIST"``
    or ``"FashionMNIST"``), or straight into ``root`` with ``raw_subdir=False`` (the Debian
    ``/usr/share/datasets/fashion-mnist`` layout; ``folder_name`` is then ignored). Names are
    ``train-images-idx3-ubyte``/``t10k-images-idx3-ubyte`` (+ labels), with ``.gz`` if ``gzip``.

    Returns:
        ``{"train": uint8 [n_train, size, size], "test": uint8 [n_test, size, size]}``.
    """
    rng = np.random.default_rng(seed)
    directory = Path(root) / folder_name / "raw" if raw_subdir else Path(root)
    suffix = ".gz" if gzip else ""
    written: dict[str, np.ndarray] = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx_images(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, gzip=gzip)
        write_idx_labels(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gzip=gzip)
        written[split] = images
    return written


class _Python2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING opcodes), as the real
    CIFAR-10 batches (written by Python 2) hold their keys, labels and pixel buffers."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def _dump_python2(obj, f) -> None:
    _Python2Pickler(f, protocol=2).dump(obj)


def write_cifar10(
    root: str | Path, n_per_batch: int = 4, seed: int = 0, n_test: int | None = None
) -> dict[str, np.ndarray]:
    """Write ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` like the real pickles.

    Each batch is a pickled dict with ``b"batch_label"``, ``b"data"`` (uint8 ``[n, 3072]``, CHW
    rows), ``b"labels"`` (list of int) and ``b"filenames"``; ``batches.meta`` is written too.

    Returns:
        ``{"train": uint8 [5 * n_per_batch, 3, 32, 32], "test": uint8 [n_test, 3, 32, 32]}``
        in dataset order (``n_test`` defaults to ``n_per_batch``).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    n_test = n_per_batch if n_test is None else n_test

    def _write(name: str, n: int, label: str) -> np.ndarray:
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        batch = {
            b"batch_label": label.encode(),
            b"data": images.reshape(n, 3072),
            b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
            b"filenames": [f"img_{name}_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            _dump_python2(batch, f)
        return images

    train = [_write(f"data_batch_{i}", n_per_batch, f"training batch {i} of 5") for i in range(1, 6)]
    test = _write("test_batch", n_test, "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as f:
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                 b"dog", b"frog", b"horse", b"ship", b"truck"]
        _dump_python2({b"label_names": names, b"num_cases_per_batch": n_per_batch}, f)
    return {"train": np.concatenate(train), "test": test}


def write_image_folder(
    directory: str | Path,
    n: int,
    size: int | tuple[int, int] = (40, 24),
    seed: int = 0,
    ext: str = "png",
    subfolders: tuple[str, ...] = ("",),
    mode: str = "RGB",
) -> list[tuple[Path, np.ndarray]]:
    """Write ``n`` random images into ``directory`` (e.g. ``<root>/afhq/train``).

    Images are spread round-robin over ``subfolders`` (``""`` = ``directory`` itself; e.g.
    ``("cat", "dog", "wild")`` for AFHQ) and named ``img_00000.<ext>``, ... ``size`` is
    ``(width, height)`` or an int for squares. ``mode`` is the PIL mode written (``"RGB"``,
    ``"L"``, ``"RGBA"``). Use ``ext="png"`` for lossless content; ``"jpg"`` is lossy, so compare
    such files with what PIL decodes from them.

    Returns:
        ``[(path, pixels), ...]`` sorted by path relative to ``directory`` (the loaders' order),
        ``pixels`` being the uint8 array given to PIL (``[H, W, 3]``, ``[H, W]`` or ``[H, W, 4]``).
    """
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    width, height = (size, size) if isinstance(size, int) else size
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    written: list[tuple[Path, np.ndarray]] = []
    for i in range(n):
        sub = subfolders[i % len(subfolders)]
        path = directory / sub / f"img_{i:05d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (height, width) if channels == 1 else (height, width, channels)
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(pixels).save(path)  # mode inferred from the shape
        written.append((path, pixels))
    return sorted(written, key=lambda item: item[0].relative_to(directory).as_posix())
