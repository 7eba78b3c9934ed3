"""Full disks and file modes: a cache that cannot be written is a warning whatever the error; an
output that cannot be written fails the run saying the disk is full, with no partial file under
a final name; atomically written files get the same mode as any other output."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess

import numpy as np
import pytest
import torch

import locality.atomic as atomic
from conftest import run_app
from locality.atomic import DiskFullError, atomic_torch_save, write_json_atomic
from locality.images import save_png


def test_atomic_files_get_the_mode_of_any_other_output(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for path in (write_json_atomic({"a": 1}, tmp_path / "status.json"),
                 atomic_torch_save(torch.zeros(3), tmp_path / "cache.pt"),
                 save_png(np.zeros((4, 4, 1), np.uint8), tmp_path / "grid.png")):
        assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777, path
    old = os.umask(0o077)
    try:
        assert write_json_atomic({}, tmp_path / "private.json").stat().st_mode & 0o777 == 0o600  # the umask holds
    finally:
        os.umask(old)


class FillingFile:
    """A file on a disk with ``room`` bytes left: writes beyond them fail with ENOSPC."""

    def __init__(self, f, room: int) -> None:
        self._f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def nearly_full_disk(monkeypatch):
    """Injected ENOSPC for atomic writes: every file written through them has 1000 bytes of room."""
    real = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: FillingFile(real(fd, mode), 1000))


@pytest.mark.parametrize("write", [
    lambda p: atomic_torch_save(torch.zeros(10_000), p),  # torch's writer hides ENOSPC in a RuntimeError
    lambda p: save_png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), p),
    lambda p: write_json_atomic(list(range(1000)), p),
], ids=["torch.save", "png", "json"])
def test_a_full_disk_is_named_and_leaves_no_partial_file(tmp_path, nearly_full_disk, write):
    with pytest.raises(DiskFullError, match="no space left on the device of .*nothing was left under that name"):
        write(tmp_path / "out.file")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_a_cache_that_cannot_be_written_is_a_warning_whatever_the_error(tmp_path, nearly_full_disk, caplog):
    from locality.statistics import cached_statistics, fit_statistics

    images = torch.randn(20, 1, 4, 4)
    with caplog.at_level(logging.WARNING):
        stats, hit = cached_statistics(images, tmp_path, "toy", "train", 4, None, progress=False)
    assert not hit and "could not write the statistics cache" in caplog.text and "no space left" in caplog.text
    assert torch.equal(stats.eigenvalues, fit_statistics(images, progress=False).eigenvalues)
    assert not list((tmp_path / "statistics").iterdir())


def test_a_full_run_directory_fails_the_run_cleanly(tmp_path):
    """A real full filesystem: the run directory on a 160 kB tmpfs, the samples larger than that."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; test_a_full_disk_is_named_and_leaves_no_partial_file "
                    "covers the same path with an injected ENOSPC")
    run_dir = tmp_path / "small_disk"
    run_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(run_dir)], check=True)
    try:
        proc = run_app(["model=wiener", "dataset.subset_size=300", "sampler.num_samples=64", "sampler.num_steps=2",
                        "hardware=cpu", f"hydra.run.dir={run_dir}"], tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "no space left on the device" in proc.stderr and "Traceback" not in proc.stderr
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "failed" and "DiskFullError" in status["error"]
        assert not (run_dir / "samples.pt").exists() and not (run_dir / "metrics.json").exists()
        assert not list(run_dir.rglob("*.tmp")) and not [p for p in run_dir.rglob("*") if p.stat().st_size == 0]
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        (run,) = mlflow.search_runs(experiment_names=["locality"], output_format="list")
        assert run.info.status == "FAILED" and "no space left" in run.data.tags["error"]
    finally:
        subprocess.run(["umount", str(run_dir)], check=True)
