"""Dataset layer: load a dataset split as a float32 ``[N, C, H, W]`` tensor in ``[-1, 1]``.

>>> from locality.data import load_dataset
>>> x = load_dataset("fashion_mnist", root="data", split="train", subset_size=1000)
>>> x.shape, x.dtype  # (torch.Size([1000, 1, 28, 28]), torch.float32)

Pixel ``v`` in ``0..255`` maps to ``(v / 255 - 0.5) / 0.5``. Layouts and lookup rules are in
:mod:`locality.data.idx` (MNIST, Fashion-MNIST), :mod:`locality.data.cifar` (CIFAR-10) and
:mod:`locality.data.folders` (CelebA-HQ, AFHQ); the registry is :mod:`locality.data.registry`.
Only torch, torchvision, numpy, pillow and tqdm are imported here (no Hydra, no MLflow).
"""

from locality.data.registry import (
    DATASETS,
    DatasetNotFoundError,
    DatasetSpec,
    available_datasets,
    get_dataset_spec,
    load_dataset,
    register_dataset,
)

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetSpec",
    "available_datasets",
    "get_dataset_spec",
    "load_dataset",
    "register_dataset",
]
