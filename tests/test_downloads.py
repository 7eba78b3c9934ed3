"""dataset.download=true through torchvision's own download code, against a local HTTP server
(127.0.0.1) that serves files generated in the real formats: torchvision fetches them, checks
their md5, extracts them, and the loaders read what it wrote. Only the URLs and checksums of
torchvision's classes are pointed at the local files; no test reaches the network."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import torch
import torchvision.datasets

from data_factories import expected_unit_range, write_cifar10, write_mnist_like
from locality.data import DatasetNotFoundError, load_dataset


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """(folder it serves, its base URL, the paths requested)."""
    www = tmp_path / "www"
    www.mkdir()
    requested: list[str] = []

    class Handler(_QuietHandler):
        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/", requested
    httpd.shutdown()
    httpd.server_close()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name,cls", [("fashion_mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_idx_download_through_torchvision(tmp_path, server, monkeypatch, name, cls):
    www, url, requested = server
    written = write_mnist_like(tmp_path / "stage", cls, n_train=7, n_test=3, seed=31, gzip=True)
    resources = []
    for path in sorted((tmp_path / "stage" / cls / "raw").glob("*.gz")):
        shutil.copy(path, www / path.name)
        resources.append((path.name, _md5(path)))
    dataset_class = getattr(torchvision.datasets, cls)
    monkeypatch.setattr(dataset_class, "mirrors", [url])
    monkeypatch.setattr(dataset_class, "resources", resources)

    root = tmp_path / "data"
    x = load_dataset(name, root, download=True, system_dirs=[], progress=False)
    assert torch.equal(x, expected_unit_range(written["train"][:, None]))
    assert set(requested) == {f"/{file}" for file, _ in resources}  # torchvision may ask twice (redirect check)
    asked = len(requested)
    # torchvision's layout: the archives and the extracted files under <root>/<cls>/raw
    raw = root / cls / "raw"
    assert (raw / "train-images-idx3-ubyte").is_file() and (raw / "train-images-idx3-ubyte.gz").is_file()
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz") as f:
        assert f.read() == (raw / "t10k-images-idx3-ubyte").read_bytes()
    test = load_dataset(name, root, split="test", system_dirs=[], progress=False)  # no second download
    assert torch.equal(test, expected_unit_range(written["test"][:, None]))
    assert len(requested) == asked


def test_idx_download_with_a_bad_checksum_is_a_clear_error(tmp_path, server, monkeypatch):
    www, url, _ = server
    write_mnist_like(tmp_path / "stage", "FashionMNIST", n_train=4, n_test=2, seed=32, gzip=True)
    resources = []
    for path in sorted((tmp_path / "stage" / "FashionMNIST" / "raw").glob("*.gz")):
        shutil.copy(path, www / path.name)
        resources.append((path.name, "0" * 32))  # what a truncated or altered download looks like
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", [url])
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources", resources)
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist", tmp_path / "data", download=True, system_dirs=[], progress=False)
    msg = str(err.value)
    assert "dataset.download=true was set but the download failed" in msg
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "data") in msg


def test_cifar10_download_through_torchvision(tmp_path, server, monkeypatch):
    www, url, requested = server
    written = write_cifar10(tmp_path / "stage", n_per_batch=3, seed=33, n_test=4)
    folder = tmp_path / "stage" / "cifar-10-batches-py"
    archive = www / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "url", url + archive.name)
    monkeypatch.setattr(cifar, "tgz_md5", _md5(archive))
    monkeypatch.setattr(cifar, "train_list", [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")]
                                              for i in range(1, 6)])
    monkeypatch.setattr(cifar, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": _md5(folder / "batches.meta")})

    root = tmp_path / "data"
    x = load_dataset("cifar10", root, download=True, progress=False)
    assert torch.equal(x, expected_unit_range(written["train"]))
    assert set(requested) == {"/cifar-10-python.tar.gz"}
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    asked = len(requested)
    test = load_dataset("cifar10", root, split="test", progress=False)  # extracted already: read, not fetched
    assert torch.equal(test, expected_unit_range(written["test"]))
    assert len(requested) == asked
