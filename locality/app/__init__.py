"""The app layer: what the entry points (``locality.run``, ``train``, ``bench``, ``calibrate``,
``compare``) share and the math core never imports.

* :mod:`~locality.app.config`: Hydra resolvers, :class:`~locality.app.config.ConfigError` and
  the typed getters every config value is read through;
* :mod:`~locality.app.settings`: the composed config read once into settings objects (sampler,
  model parameters, device, training images);
* :mod:`~locality.app.devices`: ``hardware.device`` resolved to a torch device, never silently;
* :mod:`~locality.app.baseline`: where a dataset's baseline UNet checkpoint lives, and what
  ``baseline.checkpoint`` / ``model.checkpoint`` mean;
* :mod:`~locality.app.jobs`: one tracked job (config.yaml, MLflow run, metrics.json,
  status.json, signals, one-line errors);
* :mod:`~locality.app.tracking`: the MLflow store and runs;
* :mod:`~locality.app.sweep`: the Hydra callbacks of a multirun (parent run, failed cells).
"""
