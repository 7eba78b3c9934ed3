"""locality: analytical, training-free diffusion denoisers.

The math core (schedule, sampler, statistics, models, data) imports only torch, numpy, scipy,
pillow and tqdm; Hydra and MLflow are used by the entry points alone (locality.run, …).
"""

__version__ = "0.1.0"
