"""The one denoiser contract and the registry of models by name.

A denoiser maps a noisy batch x_t [B, C, H, W] at integer training timestep t (0..T-1) to a
prediction of the clean batch x̂0 [B, C, H, W]. It knows nothing of samplers: DDIM, metrics
and the run app only ever call ``denoiser(x_t, t)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, TypeVar

import torch

from locality.schedule import alpha_bar


class Denoiser(ABC):
    """(x_t [B, C, H, W], t) -> x̂0 [B, C, H, W], on the device and dtype of the model."""

    name: str = "denoiser"
    needs_statistics: bool = False  # built from the data's DataStatistics (the apps fit or load them)
    float64_accumulation: bool = False  # keeps float64 accumulators (so it cannot run on MPS)
    tunes_kernels: bool = False  # takes a ``tuner`` (locality.models.autotune.KernelTuner) keyword

    @abstractmethod
    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor: ...

    @staticmethod
    def alpha_bar(t: int) -> float:
        """ᾱ_t as a Python float (computed in float64)."""
        return float(alpha_bar(int(t)))


_MODELS: dict[str, Callable[..., Denoiser]] = {}
D = TypeVar("D", bound=Callable[..., Denoiser])


def register_model(name: str) -> Callable[[D], D]:
    """Class decorator: make a denoiser buildable by name with :func:`build_model`."""

    def wrap(cls: D) -> D:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = cls
        return cls

    return wrap


def available_models() -> list[str]:
    return sorted(_MODELS)


def get_model_class(name: str) -> Callable[..., Denoiser]:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        ) from None
