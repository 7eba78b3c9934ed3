"""Loading and saving UNet checkpoints.

Published format (``models/baseline_unet/<dataset>/ckpt_epoch_200.pt``): a dict whose
``"model_state_dict"`` holds the EMA weights (possibly stored as float16). Our own training
checkpoints add ``"unet_config"`` (constructor kwargs), ``"net_state_dict"`` (raw weights),
``"optimizer_state_dict"``, ``"epoch"``, ``"step"``, … next to it.

:func:`load_unet_checkpoint` accepts, in this order of preference:

1. a dict with ``"model_state_dict"`` (the published / our format),
2. a dict with ``"ema_model"`` (pytorch-ddpm training checkpoints; the EMA net is what samples),
3. a dict with ``"state_dict"`` or ``"model"`` (common conventions),
4. a dict with ``"net_model"`` (pytorch-ddpm raw, non-EMA weights),
5. a bare state dict (every value a tensor).

Key prefixes ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) are stripped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from locality.atomic import atomic_torch_save  # noqa: F401  (re-exported)
from locality.unet.network import SETTINGS, UNet, get_setting, infer_constructor

#: Keys that may hold the weights inside a checkpoint dict, most preferred first.
STATE_DICT_KEYS: tuple[str, ...] = ("model_state_dict", "ema_model", "state_dict", "model", "net_model")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 10


class CheckpointFormatError(ValueError):
    """The file is not a PyTorch checkpoint, or holds nothing that looks like a state dict."""


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the expected UNet (missing/unexpected keys, wrong shapes)."""

    def __init__(
        self,
        message: str,
        *,
        setting: str = "",
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__(message)
        self.setting = setting
        self.missing = missing or []
        self.unexpected = unexpected or []
        # (key, shape in checkpoint, shape in model)
        self.shape_mismatches = shape_mismatches or []


def _listing(items: list[str]) -> str:
    """First few items, then a count: long key lists would drown the message."""
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


class UntrustedCheckpointError(CheckpointFormatError):
    """The file pickles Python objects besides tensors; unpickling them could run code."""


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", trust_checkpoint: bool = False) -> Any:
    """``torch.load`` with clear errors for a missing path and for files that are no checkpoint.

    Reads with ``weights_only=True`` (tensors and plain containers: loading runs no code). A file
    that needs more is refused with :class:`UntrustedCheckpointError` unless ``trust_checkpoint``
    is True, which unpickles it fully: a pickle's ``__reduce__`` can run any code, so only for a
    file whose origin you trust.
    """
    if not isinstance(trust_checkpoint, bool):
        raise ValueError(f"trust_checkpoint must be true or false, got {trust_checkpoint!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"UNet checkpoint not found: {path} (the published baselines are fetched with "
            f"scripts/download_baselines.py)"
        )
    if not path.is_file():
        raise CheckpointFormatError(f"UNet checkpoint path is not a file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_checkpoint)
    except Exception as e:  # noqa: BLE001 - torch.load fails in many ways (Unpickling/Runtime/Index/EOF…)
        # weights_only refusals say "Weights only load failed": a checkpoint that pickles more
        # than tensors and plain containers.
        if not trust_checkpoint and "weights only load failed" in str(e).lower():
            found = str(e).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0].split(". Please")[0][:200]
            raise UntrustedCheckpointError(
                f"{path} holds pickled Python objects besides tensors ({found}); loading them could run code "
                f"in the file, so it is refused. If you trust where it comes from, allow it with "
                f"baseline.trust_checkpoint=true (model.trust_checkpoint=true for model=unet), or re-save "
                f"only its weights (torch.save({{'model_state_dict': ...}}, path))"
            ) from e
        raise CheckpointFormatError(f"{path} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from e


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The weights inside a loaded checkpoint object (see the module docstring for the order)."""
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{source} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    sd: Any = None
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            sd = obj[key]
            break
    if sd is None:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = obj
        else:
            raise CheckpointFormatError(
                f"{source} has no state dict: expected one of the keys {', '.join(STATE_DICT_KEYS)} or a bare "
                f"state dict; found keys {_listing([str(k) for k in obj])}"
            )
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointFormatError(f"{source}: state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        for prefix in _STRIP_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        # float16/bfloat16-stored weights run in float32 (the reference computes in float32).
        out[k] = v.float() if v.is_floating_point() else v
    return out


def setting_name_for(constructor: Mapping[str, Any]) -> str:
    """Name(s) of the published setting(s) with these constructor kwargs, or "custom"."""
    names = [s.name for s in SETTINGS.values() if s.kwargs() == dict(constructor)]
    return "/".join(names) if names else "custom"


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], setting: str, source: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless names and shapes equal the model's exactly."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [(k, got[k], expected[k]) for k in expected if k in got and got[k] != expected[k]]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{source} does not fit the UNet of setting {setting!r}"]
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if shapes:
        desc = [f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in shapes]
        parts.append(f"{len(shapes)} shape mismatch(es): {_listing(desc)}")
    raise CheckpointMismatchError(
        "; ".join(parts), setting=setting, missing=missing, unexpected=unexpected, shape_mismatches=shapes
    )


def load_unet_checkpoint(
    path: str | os.PathLike,
    setting: str | None = None,
    dataset: str | None = None,
    map_location: Any = "cpu",
    *,
    trust_checkpoint: bool = False,
) -> UNet:
    """Build the UNet a checkpoint was saved from and load its weights (strict), in eval mode.

    The architecture comes from ``setting``/``dataset`` when given (and the checkpoint must then fit
    it exactly), else from the checkpoint's own ``"unet_config"``, else it is inferred from the state
    dict's names and shapes. Weights are cast to float32.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointFormatError: not a PyTorch checkpoint / no state dict inside.
        UntrustedCheckpointError: it pickles more than tensors and ``trust_checkpoint`` is False.
        CheckpointMismatchError: the weights do not fit the expected UNet.
        ValueError: unknown setting or dataset name.
    """
    obj = read_checkpoint(path, map_location=map_location, trust_checkpoint=trust_checkpoint)
    source = f"checkpoint {path}"
    sd = extract_state_dict(obj, source)
    if setting is not None or dataset is not None:
        s = get_setting(setting, dataset)
        constructor, name = s.kwargs(), s.name
    elif isinstance(obj, Mapping) and isinstance(obj.get("unet_config"), Mapping):
        constructor = dict(obj["unet_config"])
        name = setting_name_for(constructor)
    else:
        try:
            constructor = infer_constructor(sd)
        except (KeyError, ValueError, IndexError) as e:
            raise CheckpointMismatchError(
                f"{source}: cannot infer a UNet architecture from its state dict ({type(e).__name__}: {e}); "
                f"pass setting= or dataset= to get a key-by-key comparison",
                setting="unknown",
            ) from e
        name = setting_name_for(constructor)
    model = UNet(**constructor)
    check_state_dict(model, sd, name, source)
    model.load_state_dict(sd, strict=True)
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def save_unet_checkpoint(
    path: str | os.PathLike, model: UNet, *, weights_dtype: torch.dtype | None = None, **extra: Any
) -> Path:
    """Write ``{"model_state_dict": ..., "unet_config": model.config, **extra}`` atomically.

    ``weights_dtype=torch.float16`` stores the weights as the published checkpoints do (half the
    size); ``extra`` carries e.g. ``net_state_dict``, ``optimizer_state_dict``, ``epoch``, ``step``.
    """
    reserved = {"model_state_dict", "unet_config"} & set(extra)
    if reserved:
        raise ValueError(f"extra keys {sorted(reserved)} are written by save_unet_checkpoint itself")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if weights_dtype is not None:
        sd = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return atomic_torch_save({"model_state_dict": sd, "unet_config": dict(model.config), **extra}, path)
