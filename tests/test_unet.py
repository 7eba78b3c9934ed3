"""The baseline UNet: layout, reference test vector, checkpoints, denoiser, training, downloads."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from locality.models.unet_denoiser import UNetDenoiser
from locality.schedule import alphas_cumprod
from locality.unet.checkpoint import (
    CheckpointFormatError,
    CheckpointMismatchError,
    UntrustedCheckpointError,
    load_unet_checkpoint,
    read_checkpoint,
    save_unet_checkpoint,
)
from conftest import reference_dir, require_reference
from synthetic import Payload
from locality.unet.network import DATASET_SETTINGS, SETTINGS, UNet, build_unet, infer_constructor, num_parameters
from locality.unet.training import LAST_CHECKPOINT, TrainSettings, train_unet

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = reference_dir()
LAYOUT = REFERENCE / "unet_checkpoint_layout.json"
VECTOR = REFERENCE / "unet28_test_vector.pt"
TINY = dict(ch=32, ch_mult=[1, 2], attn=[], num_res_blocks=1, dropout=0.1, in_channels=1, out_channels=1)
# Dropout draws from torch's global RNG, which resume does not replay: off for the exactness check.
TINY_TRAIN = {**TINY, "dropout": 0.0}

needs_reference = pytest.mark.usefixtures("reference_files")


@pytest.fixture
def reference_files() -> None:
    """Fail (never skip) with how to get them when the reference files are absent."""
    require_reference(LAYOUT.name)
    require_reference(VECTOR.name)


@pytest.fixture(scope="module")
def small_net() -> UNet:
    torch.manual_seed(0)
    return UNet(**TINY).eval()


# --------------------------------------------------------------------------- network


@needs_reference
@pytest.mark.parametrize("layout_name", json.loads(LAYOUT.read_text()) if LAYOUT.exists() else [])
def test_state_dict_layout_matches_reference(layout_name: str) -> None:
    ref = json.loads(LAYOUT.read_text())[layout_name]
    setting = SETTINGS[layout_name.split(" ")[0]]
    assert setting.kwargs() == ref["constructor"]
    for dataset in layout_name.split("(")[1].rstrip(")").split(", "):
        assert DATASET_SETTINGS[dataset] == setting.name
    model = build_unet(setting.name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(ref["state_dict"])  # same names, same order
    assert got == ref["state_dict"]
    assert num_parameters(model) == ref["num_parameters"]
    assert infer_constructor(model.state_dict()) == ref["constructor"]
    # The time table is frozen: stored in the state dict but never trained.
    assert not model.time_embedding.timembedding[0].weight.requires_grad


@needs_reference
def test_reference_test_vector() -> None:
    ref = torch.load(VECTOR, weights_only=False)
    model = build_unet(dataset="mnist")
    table = model.state_dict()["time_embedding.timembedding.0.weight"]
    stored = ref["model_state_dict"]["time_embedding.timembedding.0.weight"].float()
    assert torch.allclose(table, stored, atol=1e-3)  # our sinusoid table agrees up to float16
    model.load_state_dict({k: v.float() for k, v in ref["model_state_dict"].items()}, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(ref["x"], ref["t"])
    assert out.shape == ref["expected_output"].shape
    assert (out - ref["expected_output"]).abs().max() < 1e-4


def test_forward_shapes_and_validation(small_net: UNet) -> None:
    x = torch.randn(2, 1, 12, 12)
    assert small_net(x, torch.tensor([0, 999])).shape == x.shape
    with pytest.raises(ValueError, match="divisible by 32"):
        UNet(ch=16, ch_mult=[1], in_channels=1, out_channels=1)
    with pytest.raises(ValueError, match="attn"):
        UNet(**{**TINY, "attn": [5]})
    with pytest.raises(ValueError, match="dataset"):
        build_unet(dataset="imagenet")
    with pytest.raises(ValueError, match="uses setting"):
        build_unet("32px_3ch", dataset="mnist")


# --------------------------------------------------------------------------- checkpoints


@needs_reference
def test_load_published_forms_and_float16(tmp_path: Path) -> None:
    ref = torch.load(VECTOR, weights_only=False)
    sd16 = ref["model_state_dict"]
    wrapped, bare, ddpm = tmp_path / "wrapped.pt", tmp_path / "bare.pt", tmp_path / "ddpm.pt"
    torch.save({"model_state_dict": sd16, "epoch": 200}, wrapped)
    torch.save(sd16, bare)
    # pytorch-ddpm's own format: EMA weights under "ema_model" win over the raw "net_model".
    torch.save({"net_model": {k: torch.zeros_like(v) for k, v in sd16.items()}, "ema_model": sd16, "step": 1}, ddpm)
    for path, kwargs in ((wrapped, {"dataset": "mnist"}), (bare, {"setting": "28px_1ch"}), (ddpm, {})):
        model = load_unet_checkpoint(path, **kwargs)
        assert not model.training
        assert all(v.dtype == torch.float32 for v in model.state_dict().values())
        with torch.no_grad():
            out = model(ref["x"], ref["t"])
        assert (out - ref["expected_output"]).abs().max() < 1e-4


def test_save_load_round_trip_float16(tmp_path: Path, small_net: UNet) -> None:
    path = save_unet_checkpoint(tmp_path / "sub" / "c.pt", small_net, weights_dtype=torch.float16, epoch=3)
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and raw["unet_config"] == small_net.config
    assert all(v.dtype == torch.float16 for v in raw["model_state_dict"].values())
    assert not [p for p in path.parent.iterdir() if p.name != "c.pt"]  # no temp file left
    loaded = load_unet_checkpoint(path)  # architecture from the stored unet_config
    for k, v in small_net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    # Without unet_config the architecture is inferred from names and shapes.
    torch.save({"model_state_dict": small_net.state_dict()}, tmp_path / "noconf.pt")
    again = load_unet_checkpoint(tmp_path / "noconf.pt")
    assert again.config == {**small_net.config, "dropout": 0.15}
    assert all(torch.equal(again.state_dict()[k], v) for k, v in small_net.state_dict().items())
    with pytest.raises(ValueError, match="written by save_unet_checkpoint"):
        save_unet_checkpoint(tmp_path / "x.pt", small_net, model_state_dict={})


@needs_reference
def test_mismatch_error_names_everything(tmp_path: Path) -> None:
    sd = {k: v.float() for k, v in torch.load(VECTOR, weights_only=False)["model_state_dict"].items()}
    del sd["tail.2.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save({"model_state_dict": sd}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_unet_checkpoint(path, dataset="mnist")
    err = info.value
    msg = str(err)
    assert isinstance(err, ValueError)
    assert "'28px_1ch'" in msg and str(path) in msg
    assert "1 missing key(s): tail.2.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "head.weight (checkpoint [64, 3, 3, 3] vs model [64, 1, 3, 3])" in msg
    assert err.missing == ["tail.2.bias"] and err.unexpected == ["extra.weight"]
    # A 28px checkpoint asked to be CIFAR: long key lists are truncated with a count.
    torch.save(torch.load(VECTOR, weights_only=False)["model_state_dict"], path)
    with pytest.raises(CheckpointMismatchError, match=r"'32px_3ch'.*… and \d+ more") as info:
        load_unet_checkpoint(path, dataset="cifar10")
    assert len(info.value.missing) > 10


def test_missing_and_non_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download_baselines"):
        load_unet_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="not a readable PyTorch checkpoint"):
        load_unet_checkpoint(junk)
    torch.save({"hello": 1}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointFormatError, match="no state dict"):
        load_unet_checkpoint(tmp_path / "nostate.pt")
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatchError, match="cannot infer"):
        load_unet_checkpoint(tmp_path / "other.pt")


# --------------------------------------------------------------------------- denoiser


def test_denoiser_matches_hand_computation(tmp_path: Path, small_net: UNet) -> None:
    den = UNetDenoiser(small_net)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in (0, 437, 999):
        with torch.no_grad():
            eps = small_net(x, torch.full((3,), t, dtype=torch.long))
        abar = alphas_cumprod()[t].item()
        expected = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
        got = den(x, t)
        assert got.dtype == x.dtype and not got.requires_grad
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    small_net.train()
    torch.testing.assert_close(den(x, 10), den(x, 10))  # eval mode enforced: no dropout noise
    with pytest.raises(ValueError, match="timestep"):
        den(x, 1000)
    path = save_unet_checkpoint(tmp_path / "c.pt", small_net)
    loaded = UNetDenoiser.from_checkpoint(path, image_shape=(1, 8, 8))
    torch.testing.assert_close(loaded(x, 500), den(x, 500))
    with pytest.raises(ValueError, match="does not fit"):
        UNetDenoiser.from_checkpoint(path, image_shape=(3, 8, 8))
    from locality.models import build_model  # the registry route

    built = build_model("unet", torch.zeros(2, 1, 8, 8), None, checkpoint=path)
    assert isinstance(built, UNetDenoiser) and built.image_shape == (1, 8, 8)
    torch.testing.assert_close(built(x, 500), den(x, 500))


# --------------------------------------------------------------------------- training


def test_train_checkpoint_resume_load(tmp_path: Path) -> None:
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    logged: list[tuple[dict, int]] = []
    sampled: list[tuple[int, int]] = []
    recipe = TrainSettings(epochs=2, batch_size=4, lr=1e-3, ema_decay=0.9, grad_clip=1.0, seed=0,
                           checkpoint_every=1, log_every=1)
    common = dict(device="cpu", checkpoint_dir=tmp_path, progress=False)
    # 3 batches per epoch; stop after 4 steps, i.e. one batch into epoch 2.
    first = train_unet(images, TINY_TRAIN, replace(recipe, max_steps=4), log_fn=lambda m, s: logged.append((m, s)),
                       sample_fn=lambda m, e, s: sampled.append((e, s)), **common)
    assert (first.epoch, first.step) == (1, 4)
    assert (tmp_path / "ckpt_epoch_1.pt").exists() and (tmp_path / LAST_CHECKPOINT).exists()
    assert sampled == [(1, 3), (1, 4)]
    assert [s for _, s in logged if "train/loss" in _] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m, _ in logged if "train/loss" in m)
    state = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (1, 4, 1)

    second = train_unet(images, TINY_TRAIN, recipe, resume=True, **common)
    assert second.resumed_from == tmp_path / LAST_CHECKPOINT
    assert (second.epoch, second.step) == (2, 6)  # continues the count: 4 + the 2 batches left
    assert torch.isfinite(torch.tensor(second.last_loss))
    final = torch.load(tmp_path / "ckpt_epoch_2.pt", weights_only=True)
    assert final["step"] == 6 and final["epoch"] == 2
    assert set(final) >= {"model_state_dict", "net_state_dict", "optimizer_state_dict", "unet_config"}

    loaded = load_unet_checkpoint(tmp_path / "ckpt_epoch_2.pt")
    for k, v in second.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
        assert torch.equal(final["model_state_dict"][k], v), k
    # The EMA is not the raw network (decay 0.9 over 6 steps).
    assert any(not torch.equal(second.net.state_dict()[k], v) for k, v in second.model.state_dict().items())

    # Same run without interruption: resume replays data order and noise exactly.
    straight = train_unet(images, TINY_TRAIN, recipe, **{**common, "checkpoint_dir": tmp_path / "straight"})
    assert straight.step == 6
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)

    with pytest.raises(CheckpointMismatchError, match="cannot resume"):
        train_unet(images, {**TINY_TRAIN, "ch_mult": [1, 1]}, replace(recipe, epochs=3), resume=True, **common)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train_unet(images * 3, TINY_TRAIN, TrainSettings(epochs=1), progress=False)


# --------------------------------------------------------------------------- downloads


def _download_script():
    spec = importlib.util.spec_from_file_location("download_baselines", ROOT / "scripts" / "download_baselines.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_download_failure_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = _download_script()
    rc = script.main(["--data-root", str(tmp_path), "--datasets", "mnist", "cifar10",
                      "--base-url", "http://127.0.0.1:9/", "--timeout", "5", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    for ds in ("mnist", "cifar10"):
        assert f"http://127.0.0.1:9/models/baseline_unet/{ds}/ckpt_epoch_200.pt" in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-written


@needs_reference
def test_download_success_via_file_url(tmp_path: Path) -> None:
    # A local "mirror" served through file:// exercises the streaming, atomic rename and verify.
    script = _download_script()
    mirror = tmp_path / "mirror"
    src = script.checkpoint_path(mirror, "mnist")
    src.parent.mkdir(parents=True)
    torch.save({"model_state_dict": torch.load(VECTOR, weights_only=False)["model_state_dict"]}, src)
    root = tmp_path / "data"
    argv = ["--data-root", str(root), "--datasets", "mnist", "--base-url", mirror.as_uri(), "--no-progress"]
    assert script.main(argv) == 0
    dest = script.checkpoint_path(root, "mnist")
    assert dest.read_bytes() == src.read_bytes()
    assert UNetDenoiser.from_checkpoint(dest, dataset="mnist").image_shape == (1, 28, 28)
    assert script.main(argv) == 0  # already present: skipped
    # A file that is not the dataset's UNet is rejected and set aside.
    bad = script.checkpoint_path(mirror, "fashion_mnist")
    bad.parent.mkdir(parents=True)
    save_unet_checkpoint(bad, UNet(**TINY))
    argv[argv.index("mnist")] = "fashion_mnist"
    assert script.main(argv) == 1
    assert not script.checkpoint_path(root, "fashion_mnist").exists()
    assert script.checkpoint_path(root, "fashion_mnist").with_suffix(".pt.invalid").exists()


def test_a_checkpoint_that_pickles_code_is_refused_unless_trusted(tmp_path: Path, small_net: UNet) -> None:
    marker = tmp_path / "payload_ran"
    path = tmp_path / "pickled.pt"
    torch.save({"model_state_dict": small_net.state_dict(), "args": Payload(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match="could run code.*trust_checkpoint=true"):
        load_unet_checkpoint(path)
    with pytest.raises(UntrustedCheckpointError):
        read_checkpoint(path)
    assert not marker.exists()  # refused before any of it ran
    model = load_unet_checkpoint(path, trust_checkpoint=True)  # the explicit opt-in unpickles it all
    assert marker.exists()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in small_net.state_dict().items())
    with pytest.raises(ValueError, match="trust_checkpoint must be true or false"):
        read_checkpoint(path, trust_checkpoint="yes")
