"""One sensitivity study (no Hydra, no MLflow): the fields of an analytical model and of the UNet
at the same x_t, averaged over images, for chosen output pixels and timesteps, from two sources
of x_t, with their numbers per timestep and their figures.

Sources of x_t (each [B, C, H, W] per timestep):

* ``heldout``: the forward process of held-out images, x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε (one ε per
  image, drawn from ``seed``, shared across timesteps);
* ``trajectory``: the analytical model's own DDIM trajectory from x_T ~ N(0, I) (``seed``),
  the x_t it is called with at each timestep (so only the sampler's timesteps).

The field of a row at (source, pixel, t) is the mean over the B images of ∂x̂0[pixel]/∂x_t
(signed); its numbers are computed on that mean. Rows are ``model`` (the analytical model) and
``unet`` (when a UNet is given); the pca_locality mask column M_t[:, m] is kept beside them
(``mask``) and its 90 % radius reported as ``mask_radius``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from locality.analysis.sensitivity import (
    Pixel, field_correlation, field_method, mass_radius, sensitivity_field, support_iou,
)
from locality.atomic import atomic_torch_save, write_json_atomic
from locality.ddim import ddim_sample, initial_noise
from locality.schedule import alpha_bar

log = logging.getLogger(__name__)

SOURCES = ("heldout", "trajectory")
MODEL_ROW, UNET_ROW = "model", "unet"


def heldout_inputs(images: torch.Tensor, timesteps: Sequence[int], seed: int) -> dict[int, torch.Tensor]:
    """{t: x_t [B, C, H, W] float64} of the forward process of held-out images [B, C, H, W]."""
    noise = initial_noise(tuple(images.shape), torch.Generator().manual_seed(seed), torch.float64)
    x0 = images.to(torch.float64)
    return {int(t): float(alpha_bar(t)) ** 0.5 * x0 + (1 - float(alpha_bar(t))) ** 0.5 * noise for t in timesteps}


def trajectory_inputs(model, shape: Sequence[int], sampler_timesteps: torch.Tensor, seed: int,
                      clip_x0: bool = True, device: torch.device | str = "cpu") -> dict[int, torch.Tensor]:
    """{t: x_t [B, C, H, W]} that ``model`` is called with along its DDIM trajectory from the
    noise of ``seed`` (shape [B, C, H, W])."""
    noise = initial_noise(tuple(shape), torch.Generator().manual_seed(seed)).to(device)
    seen: dict[int, torch.Tensor] = {}
    ddim_sample(model, noise, sampler_timesteps, clip_x0=clip_x0,
                callback=lambda i, t, x, x0: seen.__setitem__(int(t), x.detach().to("cpu", torch.float64)))
    return seen


@dataclass
class SensitivityStudy:
    """Fields [P, S, C, H, W] per source and row (mean over images), the mask columns, and the
    settings their numbers need. ``names`` maps a row to its display name (the model's name)."""

    timesteps: list[int]
    pixels: list[Pixel]
    fields: dict[str, dict[str, torch.Tensor]]
    names: dict[str, str]
    methods: dict[str, str]
    masks: torch.Tensor | None = None  # [P, S, C, H, W] the pca_locality mask columns
    threshold: float = 0.02
    fraction: float = 0.9
    num_images: dict[str, int] = field(default_factory=dict)

    @property
    def sources(self) -> list[str]:
        return list(self.fields)

    @staticmethod
    def label(pixel: Pixel) -> str:
        c, i, j = pixel
        return f"px{i}_{j}" + (f"_c{c}" if c else "")

    def numbers(self) -> list[dict[str, Any]]:
        """One record per (source, pixel, timestep): radius of each row and of the mask, and
        correlation / IoU of the model's field against the UNet's."""
        records = []
        for source, rows in self.fields.items():
            for p, pixel in enumerate(self.pixels):
                centre = pixel[1:]
                for s, t in enumerate(self.timesteps):
                    rec: dict[str, Any] = {"source": source, "pixel": list(pixel), "step": s, "t": t}
                    for row, tensor in rows.items():
                        rec[f"radius_{row}"] = mass_radius(tensor[p, s], centre, self.fraction)
                    if self.masks is not None:
                        rec["radius_mask"] = mass_radius(self.masks[p, s], centre, self.fraction)
                    if UNET_ROW in rows:
                        model, unet = rows[MODEL_ROW][p, s], rows[UNET_ROW][p, s]
                        rec["correlation_vs_unet"] = field_correlation(model, unet)
                        rec["iou_vs_unet"] = support_iou(model, unet, self.threshold)
                    records.append(rec)
        return records

    def step_metrics(self) -> dict[int, dict[str, float]]:
        """{step: {name: value}} for MLflow (one series per source, pixel and number)."""
        out: dict[int, dict[str, float]] = {}
        for rec in self.numbers():
            prefix = f"{rec['source']}_{self.label(tuple(rec['pixel']))}"
            for key, value in rec.items():
                if key.startswith(("radius_", "correlation", "iou")):
                    out.setdefault(rec["step"], {})[f"{prefix}_{key}"] = value
        return out

    def summary(self) -> dict[str, float]:
        """Means over pixels, per timestep (``…_t<t>``) and over all timesteps (``…_mean``), of
        every number per source: e.g. heldout_radius_model_mean, heldout_iou_vs_unet_t500."""
        groups: dict[str, list[float]] = {}
        for rec in self.numbers():
            for key, value in rec.items():
                if key.startswith(("radius_", "correlation", "iou")):
                    for name in (f"{rec['source']}_{key}_t{rec['t']}", f"{rec['source']}_{key}_mean"):
                        groups.setdefault(name, []).append(value)
        out = {}
        for name, values in groups.items():
            finite = [v for v in values if not math.isnan(v)]
            out[name] = sum(finite) / len(finite) if finite else math.nan
        return out

    def save(self, out: Path) -> list[Path]:
        """fields.pt, sensitivity.json and the figures (one heatmap grid per source and pixel,
        one radius plot per source) under ``out``; returns the written paths."""
        from locality.analysis.figures import heatmap_grid, line_plot

        written = [atomic_torch_save({
            "timesteps": self.timesteps, "pixels": self.pixels, "names": self.names, "methods": self.methods,
            "fields": self.fields, "masks": self.masks, "num_images": self.num_images,
        }, out / "fields.pt")]
        records = self.numbers()
        written.append(write_json_atomic({
            "timesteps": self.timesteps, "pixels": [list(p) for p in self.pixels], "names": self.names,
            "methods": self.methods, "support_threshold": self.threshold, "mass_fraction": self.fraction,
            "num_images": self.num_images, "numbers": records,
        }, out / "sensitivity.json"))
        for source, rows in self.fields.items():
            for p, pixel in enumerate(self.pixels):
                named = {self.names[row]: tensor[p] for row, tensor in rows.items()}
                title = (f"sensitivity |∂x̂0[{pixel[1]},{pixel[2]}]/∂x_t| ({source}, mean of "
                         f"{self.num_images.get(source, '?')} images); cyan: pca_locality mask")
                written.append(heatmap_grid(named, self.timesteps, pixel[1:], out / "figures" /
                                            f"sensitivity_{source}_{self.label(pixel)}.png", title,
                                            None if self.masks is None else self.masks[p]))
            series = {}
            for rec_key in [f"radius_{row}" for row in rows] + (["radius_mask"] if self.masks is not None else []):
                for p, pixel in enumerate(self.pixels):
                    name = f"{self.names.get(rec_key[7:], rec_key[7:])} {self.label(pixel)}"
                    series[name] = [r[rec_key] for r in records if r["source"] == source and r["pixel"] == list(pixel)]
            written.append(line_plot(series, self.timesteps, out / "figures" / f"radius_{source}.png",
                                     f"radius holding {self.fraction:.0%} of |field| ({source})", "timestep t",
                                     "radius (pixels)"))
        return written


def study_sensitivity(model, unet, inputs: Mapping[str, Mapping[int, torch.Tensor]], timesteps: Sequence[int],
                      pixels: Sequence[Pixel], mask_column: Callable[[int, Pixel], torch.Tensor] | None = None,
                      threshold: float = 0.02, fraction: float = 0.9,
                      progress: Callable[[str], None] | None = None) -> SensitivityStudy:
    """Fields of ``model`` (and ``unet``, or None) at the x_t of every source and timestep.
    ``mask_column(t, pixel)`` -> [C, H, W]: the pca_locality mask column to outline (or None)."""
    rows = {MODEL_ROW: model} | ({UNET_ROW: unet} if unet is not None else {})
    names = {MODEL_ROW: getattr(model, "name", "model")} | ({UNET_ROW: "unet (baseline)"} if unet is not None else {})
    methods = {names[r]: field_method(getattr(m, "name", ""))[1] for r, m in rows.items()}
    fields: dict[str, dict[str, torch.Tensor]] = {}
    counts = {}
    for source, by_t in inputs.items():
        missing = [t for t in timesteps if t not in by_t]
        if missing:
            raise ValueError(f"source {source!r} has no x_t at timesteps {missing} (it has {sorted(by_t)})")
        fields[source] = {}
        for row, denoiser in rows.items():
            per_pixel = []
            for pixel in pixels:
                per_pixel.append(torch.stack([sensitivity_field(denoiser, by_t[t], t, pixel).mean(0)
                                              for t in timesteps]))
            fields[source][row] = torch.stack(per_pixel)
            if progress:
                progress(f"sensitivity: {source} x_t, {names[row]} done ({methods[names[row]]})")
        counts[source] = int(next(iter(by_t.values())).shape[0])
    masks = None
    if mask_column is not None:
        masks = torch.stack([torch.stack([mask_column(t, pixel) for t in timesteps]) for pixel in pixels])
    return SensitivityStudy(list(map(int, timesteps)), [tuple(p) for p in pixels], fields, names, methods,
                            masks, threshold, fraction, counts)
