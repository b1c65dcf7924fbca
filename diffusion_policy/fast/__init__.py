"""Fast paths of inference, behind their own door. Nothing here changes what a policy samples:
every path is tested equal to the reference (``Policy.predict``: the method's own loop with the
network's ``forward``) up to rounding.

- ``predictor``: :class:`FastPredictor`, a drop-in for the policy (bf16 copies, compile, CUDA graphs).
- ``runner``: runs a method's sampling plan (``methods/sampling.py``) with a fast network;
  :class:`UnetSampler` picks the UNet's layout and keeps its caches.
- ``tokens``: the UNet's forward arranged for a sampler's loop (FiLM tables, wide products).
- ``fused_unet``, ``fused_kernels``: the tokens layout as one Triton kernel per convolution.
"""
from diffusion_policy.fast.predictor import FastPredictor
from diffusion_policy.fast.runner import UnetSampler, run_plan

__all__ = ["FastPredictor", "UnetSampler", "run_plan"]
