"""A method's sampling plan run with a fast network: the loop of ``method.sample``, from data.

A method's ``sample`` is the specification; its ``sampling_plan(num_steps, device)``
(``diffusion_policy.methods.sampling.SamplingPlan``) says the same loop as data: the network
times, the prefix weights, and how the chunk advances. :func:`run_plan` runs that loop with any
per-call network function ``f(x, i)``; :class:`UnetSampler` prepares that function for a UNet in
the tokens layout (``fast.tokens``, compiled or op by op) or as fused Triton kernels
(``fast.fused_unet``), and holds their caches. The tests check ``UnetSampler.sample`` against
``method.sample`` with the plain network for every sampler, prefix and batch size.
"""
from __future__ import annotations

import torch

from diffusion_policy.fast.tokens import TokensUnet, parameter_key
from diffusion_policy.methods.sampling import SamplingPlan, check_prefix, initial_noise, put_prefix
from diffusion_policy.nets.unet1d import ConditionalUnet1D


@torch.no_grad()
def run_plan(plan: SamplingPlan, f, shape: tuple[int, int, int], device: torch.device, generator=None,
             prefix: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk ``(B, H, Da)`` that ``plan``'s method samples, with ``f(x, i)`` the network's
    output at call ``i`` (``plan.times[i]``), or for an ``"update"`` plan the next chunk
    ``plan.update.apply(x, out, i)``. Arguments as ``method.sample``."""
    x = initial_noise(shape, generator, device, noise)
    P = check_prefix(prefix, shape)
    noise_prefix = x[:, :P].clone() if P else None

    def at(x: torch.Tensor, i: int) -> torch.Tensor:
        """The input of call ``i``: ``x`` with the known prefix on its path."""
        return put_prefix(x, prefix, noise_prefix, plan.prefix_weights[i]) if P else x

    if plan.kind == "update":
        for i in range(len(plan.step_times)):
            x = f(at(x, i), i)
    elif plan.kind == "scheduler":
        sched = plan.new_scheduler()
        for i, k in enumerate(sched.timesteps):
            x = at(x, i)
            x = sched.step(f(x, i).to(x.dtype), k, x, generator=generator).prev_sample
    else:  # runge_kutta: stage j at x + h sum_l a[j][l] v_l, then x + h sum_j b[j] v_j
        stages = len(plan.b)
        for step in range(plan.num_steps):
            c = step * stages  # the step's first call
            x = at(x, c)
            vs = [f(x, c).to(x.dtype)]
            for j in range(1, stages):
                vs.append(f(at(x + plan.h * combine(plan.a[j], vs), c + j), c + j).to(x.dtype))
            x = x + plan.h * combine(plan.b, vs)
    if P:
        x = torch.cat([prefix.to(x.dtype), x[:, P:]], dim=1)
    return x


def combine(coefs: tuple[float, ...], vs: list[torch.Tensor]) -> torch.Tensor:
    """``sum_l coefs[l] vs[l]`` over the nonzero coefficients."""
    terms = [c * v for c, v in zip(coefs, vs) if c != 0.0]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


class UnetSampler:
    """``sample(method, cond, shape, ...)`` as ``method.sample(net, cond, shape, ...)`` with the
    UNet ``net`` arranged for the loop: the tokens layout (compiled after :meth:`compile`), or with
    ``fused`` the fused Triton kernels for batches up to ``fused_max_batch`` rows (above it every
    row streams all the weights again and the tokens layout is faster; ``benchmarks/sampling.md``).
    The fused planner is rebuilt when a parameter of ``net`` changed."""

    fused_max_batch = 2

    def __init__(self, net: ConditionalUnet1D, fused: bool = False):
        self.net = net
        self.tokens = TokensUnet(net)
        self.fused = fused
        self._fused = None  # (parameter_key, FusedUnet)

    def compile(self, **kwargs) -> None:
        """``torch.compile`` the tokens layout's per-step trunk."""
        self.tokens.compile(**kwargs)

    def layout(self, batch: int) -> str:
        """``"fused"`` or ``"tokens"``: what a call with ``batch`` rows runs."""
        return "fused" if self.fused and batch <= self.fused_max_batch else "tokens"

    def fused_unet(self):
        """The fused planner of ``net`` (``fast.fused_unet.FusedUnet``), kept until a parameter changes."""
        from diffusion_policy.fast.fused_unet import FusedUnet  # Triton: imported when used

        key = parameter_key(self.net)
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, FusedUnet(self.net))
        return self._fused[1]

    def prepare(self, cond: torch.Tensor, plan: SamplingPlan):
        """``f(x, i)`` for :func:`run_plan`: the network at ``plan.times[i]`` with condition
        ``cond``, with ``plan.update`` run after the last layer for an ``"update"`` plan."""
        update = plan.update if plan.kind == "update" else None
        if self.layout(cond.shape[0]) == "fused":
            return self.fused_unet().prepare(cond, plan.times, update)
        return self.tokens.prepare(cond, plan.times, update)

    @torch.no_grad()
    def sample(self, method, cond: torch.Tensor, shape: tuple[int, int, int], num_steps: int | None = None,
               generator=None, prefix: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """``method.sample(net, cond, shape, ...)`` through ``method.sampling_plan``."""
        plan = method.sampling_plan(num_steps, cond.device)
        return run_plan(plan, self.prepare(cond, plan), shape, cond.device, generator, prefix, noise)
