"""Where the baseline UNet checkpoint lives and what baseline.checkpoint means (locality.app.baseline)."""

from __future__ import annotations

from pathlib import Path

import pytest

from locality.app.baseline import default_checkpoint_path, require_checkpoint, resolve_baseline_checkpoint


def test_resolve_baseline_checkpoint(tmp_path: Path) -> None:
    default = default_checkpoint_path(tmp_path / "models", "mnist")
    assert default == tmp_path / "models" / "baseline_unet" / "mnist" / "ckpt_epoch_200.pt"
    for off in (None, "null", False):
        assert resolve_baseline_checkpoint(off, default, "mnist")[0] is None
    path, notice = resolve_baseline_checkpoint("auto", default, "mnist", tmp_path)
    assert path is None and str(default) in notice and "download_baselines.py" in notice
    default.parent.mkdir(parents=True)
    default.write_bytes(b"x")
    assert resolve_baseline_checkpoint("auto", default, "mnist")[0] == default
    with pytest.raises(FileNotFoundError, match="locality.train") as err:
        resolve_baseline_checkpoint(str(tmp_path / "nope.pt"), default, "mnist")
    assert "nope.pt" in str(err.value) and "baseline.checkpoint" in str(err.value)
    with pytest.raises(FileNotFoundError, match="download_baselines.py --datasets mnist"):
        require_checkpoint(tmp_path / "missing.pt", "mnist")
