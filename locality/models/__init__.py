"""Denoisers by name. Importing this package registers every built-in model."""

from locality.models.base import Denoiser, available_models, get_model_class, register_model
from locality.models.nearest import NearestDatasetDenoiser
from locality.models.optimal import OptimalDenoiser
from locality.models.pca_locality import PcaLocalityDenoiser
from locality.models.wiener import WienerDenoiser
from locality.models.peers import ElsDenoiser, PspcDenoiser
from locality.models.unet_denoiser import UNetDenoiser


def build_model(name: str, images, stats, **params) -> Denoiser:
    """Build a registered denoiser from training images [N, C, H, W] and their statistics."""
    return get_model_class(name).from_data(images, stats, **params)


__all__ = [
    "Denoiser", "ElsDenoiser", "NearestDatasetDenoiser", "OptimalDenoiser", "PcaLocalityDenoiser", "PspcDenoiser",
    "UNetDenoiser", "WienerDenoiser", "available_models", "build_model", "get_model_class", "register_model",
]
