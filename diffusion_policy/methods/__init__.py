"""Methods: how a network becomes a generative model of action chunks. A method knows a network
only through ``net(x, t, cond)``: ``loss(net, actions, cond)`` and ``sample(net, cond, shape,
num_steps=None, generator=None, prefix=None, noise=None)``; ``stochastic`` says whether sampling
draws noise after the starting chunk."""
from __future__ import annotations

from diffusion_policy.config import MethodConfig
from diffusion_policy.methods.diffusion import DiffusionMethod
from diffusion_policy.methods.flow import FlowMatching
from diffusion_policy.methods.regression import Regression

METHOD_NAMES = ("diffusion", "flow", "regression")


def build_method(method_cfg: MethodConfig):
    """The method named by ``method_cfg.name``."""
    name = method_cfg.name
    if name == "diffusion":
        return DiffusionMethod(
            scheduler=method_cfg.scheduler, num_train_timesteps=method_cfg.num_train_timesteps,
            beta_schedule=method_cfg.beta_schedule, prediction_type=method_cfg.prediction_type,
            clip_sample=method_cfg.clip_sample, num_inference_steps=method_cfg.num_inference_steps,
        )
    if name == "flow":
        return FlowMatching(method_cfg.time_dist, method_cfg.integrator, method_cfg.num_inference_steps)
    if name == "regression":
        return Regression()
    raise ValueError(f"method.name must be one of {METHOD_NAMES}, got {name!r}")


__all__ = ["DiffusionMethod", "FlowMatching", "Regression", "build_method"]
