"""Image-folder datasets: CelebA-HQ and AFHQ (placed by hand; no automatic download).

Layouts read (any subfolders are accepted, searched recursively; extensions ``.jpg``, ``.jpeg``,
``.png`` in any case)::

    <root>/celeba_hq/<split>/**/*.{jpg,jpeg,png}   e.g. the StarGAN-v2 release:
                                                   celeba_hq/train/{female,male}/*.jpg
    <root>/afhq/<split>/{cat,dog,wild}/*.png       the AFHQv2 layout (split "train" or "test")

Splits: ``train``, ``val``, ``test`` (whichever folders exist). If ``<root>/<name>/<split>`` does
not exist, ``split == "train"`` and ``<root>/<name>`` holds images but no split folder at all,
the images of ``<root>/<name>`` (recursively) are used as the training split.

Order: files sorted by their path relative to the split folder (POSIX form), so the order, and
the first ``subset_size`` images, are deterministic across machines.

Each image is converted to RGB, resized like ``torchvision.transforms.Resize(r)`` (shorter side
to ``r``, bilinear, antialias) then ``CenterCrop(r)``, and kept as uint8; loading runs in a thread
pool with a tqdm progress bar.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

from locality.data.common import LoadRequest, check_subset_size, not_found

#: File extensions taken as images (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
#: Split folder names recognised for image-folder datasets.
FOLDER_SPLITS = ("train", "val", "test")


def list_images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursive), sorted by relative POSIX path."""
    found = [
        p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ]
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """One image file -> uint8 ``[3, r, r]``: RGB, ``Resize(r)`` (bilinear, antialias), ``CenterCrop(r)``.

    Raises:
        ValueError: the file cannot be decoded (the message names it).
    """
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image {path} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    rgb = TF.resize(rgb, resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
    rgb = TF.center_crop(rgb, [resolution, resolution])
    return TF.pil_to_tensor(rgb)


def _layout_text(req: LoadRequest) -> str:
    example = "{cat,dog,wild}/*.png" if req.name == "afhq" else "**/*.jpg"
    return f"{req.root / req.name / req.split}/{example}"


def _how(req: LoadRequest) -> str:
    source = {
        "afhq": "AFHQv2 (https://github.com/clovaai/stargan-v2)",
        "celeba_hq": "CelebA-HQ (e.g. the StarGAN-v2 release, https://github.com/clovaai/stargan-v2)",
    }.get(req.name, req.name)
    return (
        f"there is no automatic download for {req.name!r} (dataset.download is ignored). Get "
        f"{source} and place the images as {_layout_text(req)} "
        f"(any subfolders, .jpg/.jpeg/.png), then run with dataset={req.name} "
        f"dataset.root={req.root}."
    )


def _resolve_split_dir(req: LoadRequest) -> tuple[Path | None, list[Path]]:
    """The folder holding the split's images (or ``None``) and the folders looked at."""
    base = req.root / req.name
    split_dir = base / req.split
    looked_in = [split_dir]
    if split_dir.is_dir():
        return split_dir, looked_in
    if req.split == "train" and base.is_dir():
        looked_in.append(base)
        has_split_dirs = any((base / s).is_dir() for s in FOLDER_SPLITS)
        if not has_split_dirs:
            return base, looked_in
    return None, looked_in


def load_image_folder(req: LoadRequest) -> torch.Tensor:
    """Images of ``<root>/<name>/<split>`` as uint8 ``[N, 3, r, r]`` (see the module docstring)."""
    directory, looked_in = _resolve_split_dir(req)
    files = list_images(directory) if directory is not None else []
    if not files:
        what = f"image files (.jpg/.jpeg/.png) for split {req.split!r}"
        if directory is not None:
            what += f" (the folder {directory} exists but holds none)"
        raise not_found(req.name, what, looked_in, _how(req))

    n = check_subset_size(req.name, req.split, req.subset_size, len(files))
    files = files[:n]
    out = torch.empty((n, 3, req.resolution, req.resolution), dtype=torch.uint8)

    def _load(i: int) -> None:
        out[i] = load_image(files[i], req.resolution)

    workers = min(8, (os.cpu_count() or 1) + 2, n)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=n, desc=f"loading {req.name}/{req.split}", unit="img", disable=not req.progress
    ) as bar:
        for _ in pool.map(_load, range(n)):
            bar.update(1)
    return out


def load_celeba_hq(req: LoadRequest) -> torch.Tensor:
    """CelebA-HQ split ``req.split`` as uint8 ``[N, 3, r, r]``."""
    return load_image_folder(req)


def load_afhq(req: LoadRequest) -> torch.Tensor:
    """AFHQ (v2 layout) split ``req.split`` as uint8 ``[N, 3, r, r]``."""
    return load_image_folder(req)
