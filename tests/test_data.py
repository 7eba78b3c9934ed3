"""Tests of locality.data on generated files in the real formats, and on the Debian Fashion-MNIST."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from data_factories import (
    expected_unit_range,
    write_cifar10,
    write_idx_images,
    write_image_folder,
    write_mnist_like,
)
from locality.data import (
    DATASETS,
    DatasetNotFoundError,
    DatasetSpec,
    available_datasets,
    load_dataset,
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class _NoNetwork:
    """Stand-in for torchvision's dataset classes: fails like a download without network."""

    calls: list[tuple] = []

    def __init__(self, root, train=True, download=False, **kwargs):
        _NoNetwork.calls.append((root, train, download))
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network (test stub)")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test may reach the network: torchvision's downloading classes always fail here."""
    _NoNetwork.calls = []
    for name in ("MNIST", "FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(torchvision.datasets, name, _NoNetwork)
    return _NoNetwork


def _resized(images_nchw: np.ndarray, r: int) -> torch.Tensor:
    return TF.resize(torch.from_numpy(images_nchw), [r, r], interpolation=T.InterpolationMode.BILINEAR,
                     antialias=True)


# --------------------------------------------------------------------------------------------
# registry


def test_registry_specs():
    assert available_datasets() == sorted(["mnist", "fashion_mnist", "cifar10", "celeba_hq", "afhq", "gaussian_field"])
    assert isinstance(DATASETS["mnist"], DatasetSpec)
    assert (DATASETS["mnist"].channels, DATASETS["mnist"].native_resolution) == (1, 28)
    assert (DATASETS["fashion_mnist"].channels, DATASETS["fashion_mnist"].native_resolution) == (1, 28)
    assert (DATASETS["cifar10"].channels, DATASETS["cifar10"].native_resolution) == (3, 32)
    for name in ("celeba_hq", "afhq"):
        assert DATASETS[name].native_resolution is None
        assert DATASETS[name].default_resolution == 64
        assert DATASETS[name].channels == 3
    assert DATASETS["fashion_mnist"].system_dirs == (DEBIAN_DIR,)
    for spec in DATASETS.values():
        assert "train" in spec.splits and spec.how_to_get


def test_unknown_dataset_lists_available(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet", tmp_path)
    for name in available_datasets():
        assert name in str(info.value)


def test_bad_split_lists_allowed(tmp_path):
    with pytest.raises(ValueError, match="allowed splits: train, test"):
        load_dataset("mnist", tmp_path, split="validation")


@pytest.mark.parametrize("resolution", [0, -3, 2.5])
def test_bad_resolution(tmp_path, resolution):
    write_mnist_like(tmp_path, "MNIST")
    with pytest.raises(ValueError, match="resolution"):
        load_dataset("mnist", tmp_path, resolution=resolution)


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_exact(tmp_path, name, folder, gz):
    written = write_mnist_like(tmp_path, folder, n_train=9, n_test=4, seed=1, gzip=gz)
    for split in ("train", "test"):
        x = load_dataset(name, tmp_path, split=split, system_dirs=[])
        expected = expected_unit_range(written[split][:, None])
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        assert x.shape == expected.shape == (len(written[split]), 1, 28, 28)
        assert torch.equal(x, expected)
        assert x.min() >= -1 and x.max() <= 1


def test_idx_raw_preferred_over_gz(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    a = np.full((2, 28, 28), 7, dtype=np.uint8)
    b = np.full((3, 28, 28), 9, dtype=np.uint8)
    write_idx_images(raw / "train-images-idx3-ubyte", a, gzip=False)
    write_idx_images(raw / "train-images-idx3-ubyte.gz", b, gzip=True)
    assert torch.equal(load_dataset("mnist", tmp_path), expected_unit_range(a[:, None]))


def test_idx_subset_is_prefix(tmp_path):
    written = write_mnist_like(tmp_path, "MNIST", n_train=10, seed=2)
    x = load_dataset("mnist", tmp_path, subset_size=3)
    assert torch.equal(x, expected_unit_range(written["train"][:3, None]))
    x = load_dataset("mnist", tmp_path, subset_size=10)
    assert torch.equal(x, expected_unit_range(written["train"][:, None]))


@pytest.mark.parametrize("r", [14, 32, 64])
def test_idx_resolution_matches_torchvision(tmp_path, r):
    written = write_mnist_like(tmp_path, "FashionMNIST", n_train=6, seed=3)
    x = load_dataset("fashion_mnist", tmp_path, resolution=r, system_dirs=[])
    expected = expected_unit_range(_resized(written["train"][:, None], r))
    assert x.shape == (6, 1, r, r)
    assert torch.equal(x, expected)


def test_idx_native_resolution_is_no_op(tmp_path):
    written = write_mnist_like(tmp_path, "MNIST", n_train=3)
    assert torch.equal(load_dataset("mnist", tmp_path, resolution=28), expected_unit_range(written["train"][:, None]))


def test_fashion_debian_fallback_via_system_dirs(tmp_path):
    system = tmp_path / "usr_share_datasets_fashion_mnist"
    written = write_mnist_like(system, n_train=7, n_test=3, seed=4, raw_subdir=False)
    dirs = [tmp_path / "does_not_exist", system]
    for split in ("train", "test"):
        x = load_dataset("fashion_mnist", tmp_path / "data", split=split, system_dirs=dirs)
        assert torch.equal(x, expected_unit_range(written[split][:, None]))


def test_fashion_torchvision_copy_wins_over_system(tmp_path):
    system = tmp_path / "system"
    write_mnist_like(system, n_train=7, seed=5, raw_subdir=False)
    mine = write_mnist_like(tmp_path / "data", "FashionMNIST", n_train=4, seed=6)
    x = load_dataset("fashion_mnist", tmp_path / "data", system_dirs=[system])
    assert torch.equal(x, expected_unit_range(mine["train"][:, None]))


def test_mnist_missing_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "train-images-idx3-ubyte" in msg
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz") in msg
    assert "dataset.download=true" in msg
    assert not _NoNetwork.calls  # download is off: torchvision is not called


def test_fashion_missing_message_lists_every_path(tmp_path):
    system = tmp_path / "empty_system_dir"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", tmp_path, split="test", system_dirs=[system])
    msg = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte") in msg
    assert str(system / "t10k-images-idx3-ubyte.gz") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "dataset.download=true" in msg


@pytest.mark.parametrize("name,cls", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_download_failure(tmp_path, name, cls):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, tmp_path, split="test", download=True, system_dirs=[])
    msg = str(info.value)
    assert "download failed" in msg and "no network (test stub)" in msg
    assert str(tmp_path) in msg
    assert _NoNetwork.calls == [(str(tmp_path), False, True)]


def test_fashion_download_failure_falls_back_to_system(tmp_path):
    system = tmp_path / "system"
    written = write_mnist_like(system, n_train=5, seed=7, raw_subdir=False)
    x = load_dataset("fashion_mnist", tmp_path / "data", download=True, system_dirs=[system])
    assert len(_NoNetwork.calls) == 1
    assert torch.equal(x, expected_unit_range(written["train"][:, None]))


def test_idx_download_success_path(tmp_path, monkeypatch):
    """download=True calls torchvision's class, then reads what it wrote."""
    written = {}

    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            assert download and train
            written.update(write_mnist_like(root, "MNIST", n_train=5, seed=8))

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    x = load_dataset("mnist", tmp_path / "new_root", download=True)
    assert torch.equal(x, expected_unit_range(written["train"][:, None]))


def test_corrupt_idx_bad_magic(tmp_path):
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 12 + b"\x00" * 100)  # labels magic
    with pytest.raises(ValueError, match="magic number 0x00000801") as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_corrupt_idx_truncated(tmp_path, gz):
    raw = tmp_path / "MNIST" / "raw"
    path = write_idx_images(raw / ("train-images-idx3-ubyte" + (".gz" if gz else "")),
                            np.zeros((5, 28, 28), np.uint8), gzip=gz)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40] if not gz else gzip.compress(gzip.decompress(data)[:-40]))
    with pytest.raises(ValueError, match="truncated") as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value)
    # the first images are intact, so a subset that does not need the missing bytes still loads
    assert load_dataset("mnist", tmp_path, subset_size=4).shape == (4, 1, 28, 28)


def test_corrupt_gzip_stream(tmp_path):
    path = write_idx_images(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz",
                            np.ones((50, 28, 28), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt") as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("subset", [0, -1, 11])
def test_bad_subset_size_mentions_size(tmp_path, subset):
    write_mnist_like(tmp_path, "MNIST", n_train=10)
    with pytest.raises(ValueError, match="dataset size 10"):
        load_dataset("mnist", tmp_path, subset_size=subset)


# --------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_exact(tmp_path):
    written = write_cifar10(tmp_path, n_per_batch=4, seed=9, n_test=3)
    for split, n in (("train", 20), ("test", 3)):
        x = load_dataset("cifar10", tmp_path, split=split)
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
        assert torch.equal(x, expected_unit_range(written[split]))


def test_cifar10_subset_across_batches(tmp_path):
    written = write_cifar10(tmp_path, n_per_batch=4, seed=10)
    x = load_dataset("cifar10", tmp_path, subset_size=6)
    assert torch.equal(x, expected_unit_range(written["train"][:6]))


def test_cifar10_subset_reads_only_needed_batches(tmp_path):
    written = write_cifar10(tmp_path, n_per_batch=4, seed=11)
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").write_bytes(b"garbage")
    x = load_dataset("cifar10", tmp_path, subset_size=4)
    assert torch.equal(x, expected_unit_range(written["train"][:4]))


@pytest.mark.parametrize("subset", [0, 21])
def test_cifar10_bad_subset(tmp_path, subset):
    write_cifar10(tmp_path, n_per_batch=4)
    with pytest.raises(ValueError, match="dataset size 20"):
        load_dataset("cifar10", tmp_path, subset_size=subset)


def test_cifar10_resolution_matches_torchvision(tmp_path):
    written = write_cifar10(tmp_path, n_per_batch=2, seed=12)
    x = load_dataset("cifar10", tmp_path, split="test", resolution=16)
    assert x.shape == (2, 3, 16, 16)
    assert torch.equal(x, expected_unit_range(_resized(written["test"], 16)))


def test_cifar10_missing_batch(tmp_path):
    write_cifar10(tmp_path, n_per_batch=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", tmp_path)
    msg = str(info.value)
    assert "data_batch_3" in msg and "data_batch_2," not in msg.split("Looked in")[0]
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_3") in msg
    assert "dataset.download=true" in msg


def test_cifar10_download_failure(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="download failed.*no network"):
        load_dataset("cifar10", tmp_path, download=True)
    assert _NoNetwork.calls == [(str(tmp_path), True, True)]


def test_cifar10_corrupt_batch(tmp_path):
    write_cifar10(tmp_path, n_per_batch=2)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt") as info:
        load_dataset("cifar10", tmp_path, split="test")
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------------------------
# image folders (CelebA-HQ, AFHQ)


def _torchvision_pipeline(path: Path, r: int) -> torch.Tensor:
    img = Image.open(path).convert("RGB")
    return TF.pil_to_tensor(T.Compose([T.Resize(r), T.CenterCrop(r)])(img))


def test_folder_exact_pixels_at_native_size(tmp_path):
    written = write_image_folder(tmp_path / "afhq" / "train", n=6, size=16, seed=13,
                                 subfolders=("cat", "dog", "wild"))
    x = load_dataset("afhq", tmp_path, resolution=16, progress=False)
    expected = expected_unit_range(np.stack([p.transpose(2, 0, 1) for _, p in written]))
    assert x.shape == (6, 3, 16, 16)
    assert torch.equal(x, expected)
    # order = sorted relative paths: cat/..., dog/..., wild/...
    assert [p.parent.name for p, _ in written] == ["cat", "cat", "dog", "dog", "wild", "wild"]


@pytest.mark.parametrize("size", [(40, 24), (24, 40)], ids=["wide", "tall"])
def test_folder_resize_center_crop_matches_torchvision(tmp_path, size):
    written = write_image_folder(tmp_path / "celeba_hq" / "val", n=3, size=size, seed=14)
    x = load_dataset("celeba_hq", tmp_path, split="val", resolution=16, progress=False)
    expected = expected_unit_range(torch.stack([_torchvision_pipeline(p, 16) for p, _ in written]))
    assert torch.equal(x, expected)


def test_folder_default_resolution_modes_and_jpeg(tmp_path):
    split = tmp_path / "celeba_hq" / "train"
    files = [p for p, _ in write_image_folder(split / "a", n=2, size=(70, 50), ext="jpg", seed=15)]
    files += [p for p, _ in write_image_folder(split / "b", n=1, size=30, mode="L", seed=16)]
    files += [p for p, _ in write_image_folder(split / "c", n=1, size=30, mode="RGBA", ext="PNG", seed=17)]
    (split / "notes.txt").write_text("not an image")
    x = load_dataset("celeba_hq", tmp_path, progress=False)
    assert x.shape == (4, 3, 64, 64)
    expected = expected_unit_range(torch.stack([_torchvision_pipeline(p, 64) for p in sorted(files)]))
    assert torch.equal(x, expected)


def test_folder_subset_is_prefix(tmp_path):
    written = write_image_folder(tmp_path / "afhq" / "test", n=5, size=8, seed=18)
    x = load_dataset("afhq", tmp_path, split="test", resolution=8, subset_size=2, progress=False)
    assert torch.equal(x, expected_unit_range(np.stack([p.transpose(2, 0, 1) for _, p in written[:2]])))
    with pytest.raises(ValueError, match="dataset size 5"):
        load_dataset("afhq", tmp_path, split="test", resolution=8, subset_size=6)


def test_folder_flat_root_used_as_train(tmp_path):
    written = write_image_folder(tmp_path / "celeba_hq", n=3, size=8, seed=19)
    x = load_dataset("celeba_hq", tmp_path, resolution=8, progress=False)
    assert torch.equal(x, expected_unit_range(np.stack([p.transpose(2, 0, 1) for _, p in written])))
    with pytest.raises(DatasetNotFoundError):
        load_dataset("celeba_hq", tmp_path, split="val", resolution=8)


def test_folder_with_other_split_not_used_as_train(tmp_path):
    write_image_folder(tmp_path / "afhq" / "test", n=2, size=8)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("afhq", tmp_path, progress=False)
    assert str(tmp_path / "afhq" / "train") in str(info.value)


@pytest.mark.parametrize("name", ["celeba_hq", "afhq"])
def test_folder_missing_message(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, tmp_path, download=True)
    msg = str(info.value)
    assert str(tmp_path / name / "train") in msg
    assert "no automatic download" in msg and f"dataset={name}" in msg and "dataset.root=" in msg
    assert f"or directly in {tmp_path / name}/" in msg  # the flat layout the README allows
    assert not _NoNetwork.calls


def test_folder_empty_split_dir(tmp_path):
    (tmp_path / "afhq" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="holds none"):
        load_dataset("afhq", tmp_path)


def test_folder_corrupt_image(tmp_path):
    written = write_image_folder(tmp_path / "afhq" / "train", n=2, size=8)
    bad = written[1][0]
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="corrupt") as info:
        load_dataset("afhq", tmp_path, resolution=8, progress=False)
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------------------------
# the real Fashion-MNIST of the Debian package dataset-fashion-mnist


def _decode_gz_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    assert int.from_bytes(raw[:4], "big") == 0x00000803
    n, h, w = (int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w)


@pytest.mark.parametrize("split,n,fname", [("train", 60000, "train-images-idx3-ubyte.gz"),
                                            ("test", 10000, "t10k-images-idx3-ubyte.gz")])
def test_real_debian_fashion_mnist(tmp_path, split, n, fname):
    path = DEBIAN_DIR / fname
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `apt-get install dataset-fashion-mnist` "
                    "(this test needs the real Fashion-MNIST of that Debian package)")
    # default system_dirs: the Debian directory, since tmp_path holds no torchvision copy
    x = load_dataset("fashion_mnist", tmp_path, split=split, progress=False)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    raw = _decode_gz_idx(path)
    assert raw.shape == (n, 28, 28)
    assert torch.equal(x, expected_unit_range(raw[:, None]))
    # exact facts from the raw bytes: the pixel sum and the first image round-trip to uint8
    back = torch.round((x * 0.5 + 0.5) * 255).to(torch.uint8)
    assert int(back.sum(dtype=torch.int64)) == int(raw.sum(dtype=np.int64))
    assert np.array_equal(back[0, 0].numpy(), raw[0])
    head = load_dataset("fashion_mnist", tmp_path, split=split, subset_size=5, resolution=14)
    assert torch.equal(head, expected_unit_range(_resized(raw[:5, None].copy(), 14)))


# the decoded cache of image folders


def _decoded_files(cache: Path) -> list[Path]:
    return sorted((cache / "decoded").glob("*.pt"))


def test_folder_decoded_cache_is_read_back_without_decoding(tmp_path, monkeypatch):
    import locality.data.folders as folders

    written = write_image_folder(tmp_path / "celeba_hq" / "train", n=4, size=(40, 24), seed=21)
    cache = tmp_path / "cache"
    first = load_dataset("celeba_hq", tmp_path, resolution=16, progress=False, cache_dir=cache)
    expected = expected_unit_range(torch.stack([_torchvision_pipeline(p, 16) for p, _ in written]))
    assert torch.equal(first, expected)
    [kept] = _decoded_files(cache)
    assert kept.name.startswith("celeba_hq-train-16px-4img-")

    def no_decoding(path, resolution):
        raise AssertionError(f"decoded {path} although the cache holds it")

    monkeypatch.setattr(folders, "load_image", no_decoding)
    again = load_dataset("celeba_hq", tmp_path, resolution=16, progress=False, cache_dir=cache)
    assert torch.equal(again, expected)
    # without a cache_dir nothing is read or written: the files are decoded
    with pytest.raises(AssertionError, match="although the cache holds it"):
        load_dataset("celeba_hq", tmp_path, resolution=16, progress=False)


def test_folder_decoded_cache_key_follows_bytes_resolution_and_subset(tmp_path):
    written = write_image_folder(tmp_path / "afhq" / "train", n=3, size=8, seed=22)
    cache = tmp_path / "cache"
    load_dataset("afhq", tmp_path, resolution=8, progress=False, cache_dir=cache)
    # one file's bytes change: a new key, the new pixels
    path, _ = written[1]
    changed = np.full((8, 8, 3), 200, dtype=np.uint8)
    Image.fromarray(changed).save(path)
    x = load_dataset("afhq", tmp_path, resolution=8, progress=False, cache_dir=cache)
    assert torch.equal(x[1], expected_unit_range(changed.transpose(2, 0, 1)))
    assert len(_decoded_files(cache)) == 2
    load_dataset("afhq", tmp_path, resolution=4, progress=False, cache_dir=cache)
    load_dataset("afhq", tmp_path, resolution=8, subset_size=2, progress=False, cache_dir=cache)
    assert len(_decoded_files(cache)) == 4


def test_folder_decoded_cache_damaged_is_decoded_again(tmp_path, caplog):
    written = write_image_folder(tmp_path / "afhq" / "train", n=2, size=8, seed=23)
    cache = tmp_path / "cache"
    want = load_dataset("afhq", tmp_path, resolution=8, progress=False, cache_dir=cache)
    [kept] = _decoded_files(cache)
    kept.write_bytes(kept.read_bytes()[:50])  # truncated
    with caplog.at_level("WARNING", logger="locality.data.folders"):
        got = load_dataset("afhq", tmp_path, resolution=8, progress=False, cache_dir=cache)
    assert torch.equal(got, want)
    assert "is unusable" in caplog.text and "decoding the images again" in caplog.text
    # replaced by a good copy: the next load reads it silently
    caplog.clear()
    with caplog.at_level("WARNING", logger="locality.data.folders"):
        assert torch.equal(load_dataset("afhq", tmp_path, resolution=8, progress=False, cache_dir=cache), want)
    assert "unusable" not in caplog.text
    assert len(written) == 2


def test_folder_decoded_cache_unwritable_is_a_warning(tmp_path, caplog):
    written = write_image_folder(tmp_path / "afhq" / "train", n=2, size=8, seed=24)
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level("WARNING", logger="locality.data.folders"):
        x = load_dataset("afhq", tmp_path, resolution=8, progress=False, cache_dir=blocked)
    assert torch.equal(x, expected_unit_range(np.stack([p.transpose(2, 0, 1) for _, p in written])))
    assert "could not write the decoded cache" in caplog.text


def test_a_resolution_too_large_for_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    """The bytes needed and available are named, with the fix, instead of a failure inside torch."""
    import locality.models.memory as memory
    from locality.data.common import resize_uint8_batch
    from locality.resources import InsufficientMemoryError

    write_image_folder(tmp_path / "celeba_hq" / "train", n=3, size=8)
    monkeypatch.setattr(memory, "available_memory", lambda device: 100_000)
    with pytest.raises(InsufficientMemoryError, match=r"loading 3 images of celeba_hq at 3×400×400 .* needs about "
                                                      r".* \(7200000 bytes\) .* \(100000 bytes\) are available.*"
                                                      r"dataset.resolution"):
        load_dataset("celeba_hq", tmp_path, resolution=400)
    idx = torch.zeros(10, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(InsufficientMemoryError, match=r"10 images .* 1×400×400"):
        resize_uint8_batch(idx, 400)

