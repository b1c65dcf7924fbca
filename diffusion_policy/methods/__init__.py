"""Methods: how a network becomes a generative model of action chunks. A method knows a network
only through ``net(x, t, cond)``: ``loss(net, actions, cond)`` and ``sample(net, cond, shape,
num_steps=None, generator=None, prefix=None, noise=None)``, a plain loop of network calls and the
scheduler's (diffusers) or integrator's step; ``stochastic`` says whether sampling draws noise
after the starting chunk. The iterative methods also export ``sampling_plan(num_steps, device)``,
the same loop as data for fast paths (``methods/sampling.py``, ``diffusion_policy.fast``).

The classes are imported on first use: the regression method and the shared helpers need no
diffusers."""
from __future__ import annotations

import importlib

from diffusion_policy.config import MethodConfig

METHOD_NAMES = ("diffusion", "flow", "regression")
_MODULES = {"DiffusionMethod": "diffusion", "FlowMatching": "flow", "Regression": "regression"}


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(f"diffusion_policy.methods.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_method(method_cfg: MethodConfig):
    """The method named by ``method_cfg.name``."""
    name = method_cfg.name
    if name == "diffusion":
        from diffusion_policy.methods.diffusion import DiffusionMethod

        return DiffusionMethod(
            scheduler=method_cfg.scheduler, num_train_timesteps=method_cfg.num_train_timesteps,
            beta_schedule=method_cfg.beta_schedule, prediction_type=method_cfg.prediction_type,
            clip_sample=method_cfg.clip_sample, num_inference_steps=method_cfg.num_inference_steps,
        )
    if name == "flow":
        from diffusion_policy.methods.flow import FlowMatching

        return FlowMatching(method_cfg.time_dist, method_cfg.integrator, method_cfg.num_inference_steps)
    if name == "regression":
        from diffusion_policy.methods.regression import Regression

        return Regression()
    raise ValueError(f"method.name must be one of {METHOD_NAMES}, got {name!r}")


__all__ = ["DiffusionMethod", "FlowMatching", "Regression", "build_method"]
