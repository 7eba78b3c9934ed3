"""The baseline ε-prediction UNet: network, checkpoints and a plain training loop.

The denoiser wrapper (x̂0 from ε̂) is :class:`locality.models.unet_denoiser.UNetDenoiser`.
"""

from locality.unet.checkpoint import (
    CheckpointFormatError,
    CheckpointMismatchError,
    load_unet_checkpoint,
    save_unet_checkpoint,
)
from locality.unet.network import (
    DATASET_SETTINGS,
    SETTINGS,
    UNet,
    UNetSetting,
    build_unet,
    get_setting,
    infer_constructor,
)
from locality.unet.training import TrainResult, TrainSettings, train_unet

__all__ = [
    "DATASET_SETTINGS",
    "SETTINGS",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "TrainResult",
    "TrainSettings",
    "UNet",
    "UNetSetting",
    "build_unet",
    "get_setting",
    "infer_constructor",
    "load_unet_checkpoint",
    "save_unet_checkpoint",
    "train_unet",
]
