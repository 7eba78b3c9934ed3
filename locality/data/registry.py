"""Dataset registry and the single entry point :func:`load_dataset`.

Datasets (``dataset=<name>``; channels, native resolution, layout under ``dataset.root``):

- ``mnist``: 1, 28, ``MNIST/raw/{train,t10k}-images-idx3-ubyte[.gz]`` (torchvision layout)
- ``fashion_mnist``: 1, 28, ``FashionMNIST/raw/...``, else the Debian ``dataset-fashion-mnist``
- ``cifar10``: 3, 32, ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (torchvision layout)
- ``celeba_hq``: 3, none (default 64), ``celeba_hq/<split>/**/*.{jpg,jpeg,png}``
- ``afhq``: 3, none (default 64), ``afhq/<split>/{cat,dog,wild}/*.png`` (AFHQv2)
- ``gaussian_field``: ``dataset.channels`` (1), none (default 28), generated in code
  (:mod:`locality.data.gaussian_field`; options correlation_length, num_images, seed, channels)

A new dataset is added with :func:`register_dataset` and a loader ``LoadRequest -> uint8 tensor
[N, C, r, r]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from locality.data.cifar import load_cifar10
from locality.data.common import DatasetNotFoundError, LoadRequest, to_unit_range  # noqa: F401 (re-exported)
from locality.data.folders import FOLDER_SPLITS, load_afhq, load_celeba_hq
from locality.data.gaussian_field import DEFAULTS as GAUSSIAN_FIELD_DEFAULTS
from locality.data.gaussian_field import SPLITS as GAUSSIAN_FIELD_SPLITS
from locality.data.gaussian_field import load_gaussian_field
from locality.data.idx import DEBIAN_FASHION_MNIST_DIR, load_fashion_mnist, load_mnist

Loader = Callable[[LoadRequest], torch.Tensor]


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a dataset.

    Attributes:
        name: registry key (``dataset=<name>``).
        channels: C of the loaded ``[N, C, H, W]`` tensor.
        native_resolution: H = W of the stored images, or ``None`` for image folders of
            arbitrary sizes (a resolution must then be given; ``default_resolution`` is used).
        splits: allowed values of ``split``.
        how_to_get: short human text on obtaining the data.
        loader: ``LoadRequest -> uint8 [N, C, r, r]`` at the requested resolution.
        default_resolution: resolution used when none is requested; defaults to the native one.
        system_dirs: read-only fallback directories (e.g. a distribution package's copy).
        options: further ``dataset.*`` keys the loader reads (``LoadRequest.options``), e.g. the
            generated datasets' parameters; a key named ``channels`` sets C instead of ``channels``.
    """

    name: str
    channels: int
    native_resolution: int | None
    splits: tuple[str, ...]
    how_to_get: str
    loader: Loader = field(repr=False, compare=False)
    default_resolution: int | None = None
    system_dirs: tuple[Path, ...] = ()
    options: tuple[str, ...] = ()

    def resolve_resolution(self, resolution: int | None) -> int:
        """The square output size for a requested ``resolution`` (``None``: default / native)."""
        if resolution is None:
            resolution = self.default_resolution or self.native_resolution
            if resolution is None:
                raise ValueError(f"dataset {self.name!r} needs dataset.resolution to be set")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"dataset.resolution must be a positive integer, got {resolution!r}")
        return resolution


#: All registered datasets by name.
DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` (a name can be registered once)."""
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def available_datasets() -> list[str]:
    """Sorted names of the registered datasets."""
    return sorted(DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec of ``name``; ``ValueError`` listing the available names if unknown."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dataset {name!r}; available datasets: {', '.join(available_datasets())}"
        ) from None


def load_dataset(
    name: str,
    root: str | Path,
    split: str = "train",
    resolution: int | None = None,
    subset_size: int | None = None,
    download: bool = False,
    progress: bool = True,
    system_dirs: Sequence[Path] | None = None,
    cache_dir: str | Path | None = None,
    options: dict | None = None,
) -> torch.Tensor:
    """Load a dataset split as a float32 CPU tensor ``[N, C, H, W]`` with values in ``[-1, 1]``.

    Pixel ``v`` in ``0..255`` maps to ``(v / 255 - 0.5) / 0.5``, computed in float32 from uint8.

    Args:
        name: registered dataset (see :func:`available_datasets`).
        root: ``dataset.root``, the folder holding the dataset (layouts in the loader modules).
        split: one of the spec's ``splits``.
        resolution: output H = W; ``None`` for the native (or default) resolution. A different
            resolution resizes like ``torchvision.transforms.Resize`` (bilinear, antialias);
            image folders are resized on the shorter side and center-cropped.
        subset_size: keep the first ``subset_size`` images in dataset order (``None``: all).
        download: let torchvision fetch the files if absent (mnist, fashion_mnist, cifar10).
        progress: show a tqdm progress bar while decoding image folders.
        system_dirs: fallback directories instead of the spec's (Fashion-MNIST: the Debian
            package's ``/usr/share/datasets/fashion-mnist``).
        cache_dir: image folders (celeba_hq, afhq) keep their decoded, resized pixels in
            ``<cache_dir>/decoded``, keyed by the files' bytes and the resolution, so a second
            run reads them instead of decoding every file (``None``: decode every time).
        options: values of the spec's ``options`` keys (others are ignored; absent ones take the
            loader's defaults).

    Raises:
        ValueError: unknown dataset, split not allowed, bad resolution or subset size, or a
            corrupt file (named in the message).
        DatasetNotFoundError: the files are missing (the message says which, where it looked,
            and how to get them).
    """
    spec = get_dataset_spec(name)
    if split not in spec.splits:
        raise ValueError(
            f"split {split!r} is not available for dataset {name!r}; allowed splits: "
            f"{', '.join(spec.splits)}"
        )
    if subset_size is not None and (isinstance(subset_size, bool) or not isinstance(subset_size, int)):
        raise ValueError(f"dataset.subset_size must be an integer or null, got {subset_size!r}")
    request = LoadRequest(
        name=name,
        root=Path(root).expanduser(),
        split=split,
        resolution=spec.resolve_resolution(resolution),
        subset_size=subset_size,
        download=bool(download),
        progress=bool(progress),
        system_dirs=tuple(Path(d) for d in (spec.system_dirs if system_dirs is None else system_dirs)),
        cache_dir=None if cache_dir is None else Path(cache_dir).expanduser(),
        options={k: v for k, v in (options or {}).items() if k in spec.options},
    )
    images = spec.loader(request)
    expected = (int(request.options.get("channels", spec.channels)), request.resolution, request.resolution)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != expected:
        raise RuntimeError(
            f"loader of {name!r} returned {images.dtype} {tuple(images.shape)}, expected uint8 [N, *{expected}]"
        )
    return to_unit_range(images)


register_dataset(DatasetSpec(
    name="mnist", channels=1, native_resolution=28, splits=("train", "test"), loader=load_mnist,
    how_to_get="dataset.download=true (torchvision) into <dataset.root>/MNIST/raw",
))
register_dataset(DatasetSpec(
    name="fashion_mnist", channels=1, native_resolution=28, splits=("train", "test"),
    loader=load_fashion_mnist, system_dirs=(DEBIAN_FASHION_MNIST_DIR,),
    how_to_get="`apt-get install dataset-fashion-mnist` (used automatically), or "
    "dataset.download=true (torchvision) into <dataset.root>/FashionMNIST/raw",
))
register_dataset(DatasetSpec(
    name="cifar10", channels=3, native_resolution=32, splits=("train", "test"), loader=load_cifar10,
    how_to_get="dataset.download=true (torchvision) into <dataset.root>/cifar-10-batches-py",
))
register_dataset(DatasetSpec(
    name="celeba_hq", channels=3, native_resolution=None, default_resolution=64,
    splits=FOLDER_SPLITS, loader=load_celeba_hq,
    how_to_get="manual: place images as <dataset.root>/celeba_hq/<split>/**/*.jpg",
))
register_dataset(DatasetSpec(
    name="afhq", channels=3, native_resolution=None, default_resolution=64,
    splits=FOLDER_SPLITS, loader=load_afhq,
    how_to_get="manual: place AFHQv2 as <dataset.root>/afhq/<split>/{cat,dog,wild}/*.png",
))
register_dataset(DatasetSpec(
    name="gaussian_field", channels=1, native_resolution=None, default_resolution=28, splits=GAUSSIAN_FIELD_SPLITS,
    loader=load_gaussian_field, options=tuple(GAUSSIAN_FIELD_DEFAULTS),
    how_to_get="nothing to get: generated in code from dataset.seed (locality.data.gaussian_field)",
))
