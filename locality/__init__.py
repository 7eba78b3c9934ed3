"""locality: analytical, training-free diffusion denoisers.

The Python API, without Hydra or MLflow::

    from locality import load_dataset, fit_statistics, build_model, sample
    images = load_dataset("fashion_mnist", root="data/datasets", subset_size=2000)  # [N, 1, 28, 28]
    stats = fit_statistics(images)                       # float64 mean / eigendecomposition
    model = build_model("pca_locality", images, stats, mask_threshold=0.005)
    x0_hat = model(x_t, t=500)                           # the denoiser contract (x_t, t) -> x̂0
    result = sample(model, num_samples=8, image_shape=(1, 28, 28), num_steps=10, seed=42)
    result.samples                                       # [8, 1, 28, 28] in about [-1, 1]

Three layers: the entry points (``python -m locality.run``, ``train``, ``bench``, ``calibrate``,
``compare``), the app layer they share (:mod:`locality.app`: config, settings, MLflow, sweeps),
and the math core (schedule, ddim, sampling, statistics, models, data, unet, …), which imports
only torch, numpy, scipy, pillow and tqdm, never Hydra, MLflow or the app layer.
"""

__version__ = "0.1.0"

_API = {
    "load_dataset": "locality.data",
    "available_datasets": "locality.data",
    "fit_statistics": "locality.statistics",
    "cached_statistics": "locality.statistics",
    "DataStatistics": "locality.statistics",
    "build_model": "locality.models",
    "available_models": "locality.models",
    "Denoiser": "locality.models",
    "sample": "locality.sampling",
    "ddim_sample": "locality.ddim",
    "ddim_timesteps": "locality.schedule",
    "alpha_bar": "locality.schedule",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    """Lazy re-exports, so `import locality` stays cheap."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'locality' has no attribute {name!r}")
