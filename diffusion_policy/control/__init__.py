"""Control: the receding-horizon controller shared by evaluation and deployment."""
from diffusion_policy.control.controller import (
    SMOOTHING,
    RecedingHorizonController,
    blend_chunks,
    ensemble_weights,
)

__all__ = ["SMOOTHING", "RecedingHorizonController", "blend_chunks", "ensemble_weights"]
