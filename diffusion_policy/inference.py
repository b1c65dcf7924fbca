"""Fast inference for a trained policy: :class:`FastPredictor` (``diffusion_policy.fast``),
importable from here.

    from diffusion_policy.inference import FastPredictor
    fast = FastPredictor(policy, dtype="bf16", fused=True)
    chunk = fast.predict(obs_window)  # same call and result as policy.predict
"""
from diffusion_policy.fast.predictor import DTYPES, FastPredictor

__all__ = ["DTYPES", "FastPredictor"]
