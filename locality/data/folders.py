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

Decoded cache: with a ``cache_dir`` the decoded pixels [N, 3, r, r] uint8 are kept in
``<cache_dir>/decoded/<name>-<split>-<r>px-<N>img-<key>.pt``, the key a hash of the decoding
recipe, the resolution and every file's relative path and bytes. A later run hashes the files
(a fraction of decoding them: JPEG decoding and resizing dominate) and reads the pixels back; any
change to a file, the subset or the resolution gives another key. The file is written
atomically; an unreadable or mismatching one is decoded again and replaced (with a warning); a
cache that cannot be written is a warning too.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from locality.atomic import atomic_torch_save, write_cache_or_warn
from locality.data.common import LoadRequest, check_subset_size, not_found, require_image_memory

log = logging.getLogger(__name__)

#: File extensions taken as images (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
#: Split folder names recognised for image-folder datasets.
FOLDER_SPLITS = ("train", "val", "test")
#: The decoding recipe, part of the decoded cache's key: change it when :func:`load_image`
#: changes, so that caches of the old recipe stop matching.
DECODE_RECIPE = "rgb/resize-bilinear-antialias/center-crop/uint8/v1"


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
    import torchvision.transforms.functional as TF  # here, not at import: see common.resize_uint8_batch
    from torchvision.transforms import InterpolationMode

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
    layout = f"{req.root / req.name / req.split}/{example}"
    if req.split == "train":  # the flat layout: no split folders, the images right in <name>/
        layout += f", or directly in {req.root / req.name}/ (any subfolders; used as the train split)"
    return layout


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


def file_digest(path: Path) -> str:
    """blake2b (128 bits) of a file's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decoded_cache_key(directory: Path, files: list[Path], digests: list[str], resolution: int) -> str:
    """The decoded cache's key: the recipe, the resolution and, in dataset order, every file's
    relative path and :func:`file_digest`."""
    key = hashlib.blake2b(digest_size=16)
    key.update(f"{DECODE_RECIPE}\nresolution={resolution}\n".encode())
    for path, digest in zip(files, digests):
        key.update(f"{path.relative_to(directory).as_posix()}\t{digest}\n".encode())
    return key.hexdigest()


def _in_threads(work: Callable[[int], None], count: int, desc: str, progress: bool) -> None:
    """``work(i)`` for i < count in a thread pool (PIL and hashlib release the GIL), with a bar."""
    workers = min(8, (os.cpu_count() or 1) + 2, count)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=count, desc=desc, unit="img", disable=not progress
    ) as bar:
        for _ in pool.map(work, range(count)):
            bar.update(1)


def _read_decoded(path: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached pixels at ``path`` if it holds ``key``'s uint8 ``shape``; else None (warned)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        images = saved["images"]
        if saved.get("key") != key or images.dtype != torch.uint8 or tuple(images.shape) != shape:
            raise ValueError(f"holds {images.dtype} {tuple(images.shape)} under another key, expected uint8 {shape}")
    except Exception as e:  # a truncated, foreign or stale file: decode again and replace it
        log.warning("decoded cache %s is unusable (%s: %s): decoding the images again", path, type(e).__name__, e)
        return None
    return images


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
    require_image_memory(req.name, n, 3, req.resolution)
    files = files[:n]
    shape = (n, 3, req.resolution, req.resolution)
    cache = None
    if req.cache_dir is not None:
        digests = [""] * n

        def _hash(i: int) -> None:
            digests[i] = file_digest(files[i])

        _in_threads(_hash, n, f"hashing {req.name}/{req.split}", req.progress)
        key = decoded_cache_key(directory, files, digests, req.resolution)
        cache = req.cache_dir / "decoded" / f"{req.name}-{req.split}-{req.resolution}px-{n}img-{key[:20]}.pt"
        if cache.is_file():
            images = _read_decoded(cache, key, shape)
            if images is not None:
                log.info("read %d decoded images of %s/%s from %s", n, req.name, req.split, cache)
                return images

    out = torch.empty(shape, dtype=torch.uint8)

    def _load(i: int) -> None:
        out[i] = load_image(files[i], req.resolution)

    _in_threads(_load, n, f"loading {req.name}/{req.split}", req.progress)
    if cache is not None:
        saved = {"images": out, "key": key, "recipe": DECODE_RECIPE}
        if write_cache_or_warn(lambda: atomic_torch_save(saved, cache), cache, "decoded cache", log,
                               "set paths.cache_dir to a writable folder, or dataset.cache_decoded=false"):
            log.info("kept the decoded images of %s/%s in %s", req.name, req.split, cache)
    return out


def load_celeba_hq(req: LoadRequest) -> torch.Tensor:
    """CelebA-HQ split ``req.split`` as uint8 ``[N, 3, r, r]``."""
    return load_image_folder(req)


def load_afhq(req: LoadRequest) -> torch.Tensor:
    """AFHQ (v2 layout) split ``req.split`` as uint8 ``[N, 3, r, r]``."""
    return load_image_folder(req)
