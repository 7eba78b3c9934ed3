"""pca_locality, the paper's analytical denoiser, and its kernels.

* :mod:`.model`: :class:`PcaLocalityDenoiser` (masks and plans per timestep, dispatch);
* :mod:`.plan`: the per-timestep mask plan the kernels read;
* :mod:`.kernel`: the interface every kernel implements;
* :mod:`.float_gemm` (float32, float64), :mod:`.bf16` (bf16x6, bf16x3), :mod:`.int8`
  (int8_onednn, int8_intmm), :mod:`.gather` (int8_gather), :mod:`.sparse` (sparse): one
  module per kernel family;
* :mod:`.selection`: every threshold and probe, and the measured choice of a step's kernel.
"""

from locality.models.pca_locality.model import PcaLocalityDenoiser

__all__ = ["PcaLocalityDenoiser"]
