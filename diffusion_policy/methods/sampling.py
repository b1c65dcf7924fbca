"""What every method's sampler shares: the starting noise, the known prefix, the step-count rule,
and the sampling plan that a method exports for fast paths.

A method's ``sample`` is the specification: a plain loop of ``net(x, t, cond)`` calls and the
scheduler's or integrator's step. Its :meth:`sampling_plan` says the same loop as data (the
network times, the prefix weights, the step's coefficients), so that a fast path
(``diffusion_policy.fast``) can run the loop with a network prepared for those times without
knowing the method; the tests check the two give the same chunk. Plain torch only: the
regression method imports this module without pulling in diffusers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from diffusion_policy.step_update import StepUpdate

PLAN_KINDS = ("update", "scheduler", "runge_kutta")


def check_steps(n: int, key: str, most: int | None = None) -> int:
    """``n`` as an int if it is a valid number of sampler steps: ``>= 1`` and, for a diffusion
    schedule, at most the ``most`` timesteps it was trained with (diffusers refuses more).
    ``key`` names the setting in the error (``method.num_inference_steps``, ``num_steps``)."""
    if int(n) != n or n < 1:
        raise ValueError(f"{key}={n} must be an integer >= 1")
    if most is not None and n > most:
        raise ValueError(f"{key}={n} is more than the {most} timesteps the schedule was trained with "
                         f"(method.num_train_timesteps={most}); use at most {most}")
    return int(n)


def initial_noise(shape: tuple[int, int, int], generator, device: torch.device,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """The sampler's starting chunk ``(B, H, Da)`` float32 on ``device``: ``noise`` when given
    (checked), else ``N(0, I)`` from ``generator``: one generator, or a list of one per row (row
    b's noise then depends on ``generator[b]`` alone, so a batch of episodes samples what each
    would sample on its own). A CPU generator draws on the CPU and the chunk is moved. The same
    draws as diffusers' ``randn_tensor``, which the stochastic schedulers use for their steps."""
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        return noise.to(device=device, dtype=torch.float32)
    device = torch.device(device)
    gens = generator if isinstance(generator, list) else None
    first = gens[0] if gens else generator
    draw_on = device if first is None or first.device.type == device.type else first.device
    if first is not None and first.device.type not in ("cpu", device.type):
        raise ValueError(f"a generator on {first.device} cannot draw noise for {device}")
    if gens is not None and len(gens) > 1:
        if len(gens) != shape[0]:
            raise ValueError(f"generator is a list of {len(gens)}, expected one per row ({shape[0]})")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=draw_on, dtype=torch.float32) for g in gens]
        return torch.cat(rows).to(device)
    return torch.randn(tuple(shape), generator=first, device=draw_on, dtype=torch.float32).to(device)


def check_prefix(prefix: torch.Tensor | None, shape: tuple[int, int, int]) -> int:
    """Length ``P`` of a known prefix ``(B, P, Da)`` (0 when there is none)."""
    if prefix is None:
        return 0
    B, H, Da = shape
    if prefix.ndim != 3 or prefix.shape[0] != B or prefix.shape[2] != Da or prefix.shape[1] > H:
        raise ValueError(f"prefix has shape {tuple(prefix.shape)}, expected ({B}, P <= {H}, {Da})")
    return int(prefix.shape[1])


def put_prefix(x: torch.Tensor, prefix: torch.Tensor, noise: torch.Tensor, weights: tuple[float, float]):
    """``x`` with its first ``P`` actions replaced by ``signal * prefix + noise_scale * noise``
    (the known prefix on the path the sampler is at: the replacement method)."""
    signal, scale = weights
    known = signal * prefix + scale * noise
    return torch.cat([known.to(x.dtype), x[:, prefix.shape[1]:]], dim=1)


def device_times(values: list[float], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Network times on ``device``: ``(joined (S,), one (1,) tensor per call)``. Separate tensors
    rather than views of one, so that every network call sees an input of the same layout (no
    storage offset for a compiler to specialise on). The methods keep these per (steps, device):
    a repeated call copies nothing to the device, as capturing the loop in a CUDA graph needs."""
    joined = torch.tensor(values, dtype=torch.float32).to(device)
    return joined, [joined[i : i + 1].clone() for i in range(len(values))]


@dataclass(frozen=True)
class SamplingPlan:
    """A method's sampling loop as data, for a fast path. Network call ``i`` (``i < S``) sees
    ``times[i]``; before it the first ``P`` actions of its input are set to ``prefix_weights[i]
    = (signal, noise)`` times (the known prefix, the starting noise's first ``P`` rows); after
    the last call they are set to the prefix exactly. ``kind`` says how the chunk advances:

    - ``"update"``: ``x = update.apply(x, out_i, i)`` after every call (DDIM with eta = 0, flow
      Euler): a fixed formula a network can run with its last layer (``StepUpdate``).
    - ``"scheduler"``: ``x = sched.step(out_i, timesteps[i], x, generator).prev_sample`` with
      ``sched = plan.new_scheduler()`` (a fresh copy per chunk: DPM-Solver keeps a history of
      outputs, DDPM draws noise at each step).
    - ``"runge_kutta"``: ``len(b)`` calls per step of size ``h`` (the Butcher tableau ``a``, ``b``
      of an explicit Runge-Kutta method; Butcher 2016, sec. 23): stage ``j``'s input is ``x + h
      sum_l a[j][l] v_l`` (prefix put on it), the step is ``x + h sum_j b[j] v_j``.

    ``step_times`` are ``times`` as one ``(1,)`` tensor per call; both are kept by the method per
    (steps, device), so a fast path may key caches on ``times`` (the same tensor every chunk)."""
    kind: str
    times: torch.Tensor
    step_times: tuple[torch.Tensor, ...]
    prefix_weights: tuple[tuple[float, float], ...]
    update: StepUpdate | None = None
    scheduler: object | None = None
    num_steps: int = 0
    timesteps: tuple[int, ...] = ()
    h: float = 0.0
    a: tuple[tuple[float, ...], ...] = ()
    b: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in PLAN_KINDS:
            raise ValueError(f"SamplingPlan.kind must be one of {PLAN_KINDS}, got {self.kind!r}")
        S = len(self.step_times)
        if self.times.shape != (S,) or len(self.prefix_weights) != S:
            raise ValueError(f"SamplingPlan has {S} step times, times of shape {tuple(self.times.shape)} and "
                             f"{len(self.prefix_weights)} prefix weights; expected one of each per call")
        if self.kind == "update" and (self.update is None or len(self.update.rows) != S):
            raise ValueError(f"an 'update' plan needs one StepUpdate row per call ({S})")
        if self.kind == "runge_kutta" and (len(self.a) != len(self.b) or S != self.num_steps * len(self.b)):
            raise ValueError(f"a 'runge_kutta' plan needs len(a) == len(b) and {S} calls = steps x stages")

    def new_scheduler(self):
        """A ``"scheduler"`` plan's scheduler, copied and set to the plan's steps (state per chunk)."""
        sched = copy.copy(self.scheduler)
        sched.set_timesteps(self.num_steps)
        return sched
