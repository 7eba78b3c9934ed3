"""CIFAR-10 from the python pickle batches (torchvision's on-disk layout).

Layout read (what ``torchvision.datasets.CIFAR10(root, download=True)`` extracts)::

    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5   split "train" (5 x 10000 images)
    <root>/cifar-10-batches-py/test_batch                      split "test"  (10000 images)

Each batch is a pickle (python 2, read with ``encoding="bytes"``) of a dict whose ``b"data"`` is a
uint8 array ``[n, 3072]`` holding each 32x32 RGB image in CHW order, and ``b"labels"`` its labels.
The batches are read here directly (torchvision's class is used only for ``download=True``,
because its md5 check rejects anything but the upstream files). Only the batches needed for a
subset are read. A resolution other than 32 resizes the uint8 images like
``torchvision.transforms.Resize`` (bilinear, antialias).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch

from locality.data.common import LoadRequest, check_subset_size, not_found, resize_uint8_batch

logger = logging.getLogger(__name__)

#: Folder created by torchvision under ``root``.
CIFAR10_FOLDER = "cifar-10-batches-py"
#: Batch files per split, in dataset order.
CIFAR10_SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


def _how(root: Path) -> str:
    return (
        "set dataset.download=true (needs network; torchvision extracts cifar-10-python.tar.gz into "
        f"{root / CIFAR10_FOLDER}), or extract cifar-10-python.tar.gz yourself into "
        f"dataset.root={root} (from https://www.cs.toronto.edu/~kriz/cifar.html)."
    )


def read_cifar_batch(path: str | Path) -> np.ndarray:
    """Read one CIFAR-10 pickle batch -> uint8 array ``[n, 3, 32, 32]`` (CHW).

    Raises:
        ValueError: the file is not a readable CIFAR-10 batch (the message names the file).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError) as e:
        raise ValueError(f"CIFAR-10 batch {path} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch:
        raise ValueError(f"CIFAR-10 batch {path} is not a dict with a b'data' entry")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"CIFAR-10 batch {path} has b'data' of dtype {data.dtype} and shape {data.shape}, "
            "expected uint8 [n, 3072]"
        )
    return data.reshape(-1, 3, 32, 32)


def _download(root: Path, split: str) -> None:
    """Fetch CIFAR-10 with ``torchvision.datasets.CIFAR10(root, train=..., download=True)``."""
    import torchvision.datasets

    root.mkdir(parents=True, exist_ok=True)
    torchvision.datasets.CIFAR10(str(root), train=(split == "train"), download=True)


def load_cifar10(req: LoadRequest) -> torch.Tensor:
    """CIFAR-10 split ``req.split`` as uint8 ``[N, 3, r, r]`` (r = ``req.resolution``)."""
    folder = req.root / CIFAR10_FOLDER
    names = CIFAR10_SPLIT_FILES[req.split]
    paths = [folder / name for name in names]
    missing = [p for p in paths if not p.is_file()]

    reason = None
    if missing and req.download:
        logger.info("downloading cifar10 with torchvision into %s", req.root)
        try:
            _download(req.root, req.split)
        except Exception as e:  # noqa: BLE001 - any failure is reported to the user below
            reason = f"dataset.download=true was set but the download failed: {type(e).__name__}: {e}"
        missing = [p for p in paths if not p.is_file()]
        if missing and reason is None:
            reason = "dataset.download=true was set but the download did not produce the files."
    if missing:
        what = f"the {req.split!r} batches " + ", ".join(p.name for p in missing)
        raise not_found(req.name, what, paths, _how(req.root), reason)

    # Read batches until the subset is covered (an invalid subset reads all, to report the size).
    limit = req.subset_size if req.subset_size is not None and req.subset_size >= 1 else None
    chunks: list[np.ndarray] = []
    n_read = 0
    for path in paths:
        if limit is not None and n_read >= limit:
            break
        chunk = read_cifar_batch(path)
        chunks.append(chunk)
        n_read += len(chunk)
    # Only when every batch was read is n_read the dataset size; then the check is exact.
    n = check_subset_size(req.name, req.split, req.subset_size, n_read)
    images = np.concatenate(chunks)[:n]
    return resize_uint8_batch(torch.from_numpy(np.ascontiguousarray(images)), req.resolution)
