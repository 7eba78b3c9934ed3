"""The paper's analyses as code (no Hydra, no MLflow): sensitivity fields (:mod:`.sensitivity`),
memorization and diversity of samples (:mod:`.memorization`) and their figures (:mod:`.figures`).
The Hydra entry point is :mod:`locality.analyze`; the run app calls :func:`.memorization.record_memorization`."""
