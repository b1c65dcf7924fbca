"""DDPM-family methods through diffusers' schedulers (DDPM, DDIM, DPM-Solver++).

Training (Ho et al. 2020, Alg. 1): draw ``k ~ U{0..T-1}`` and ``eps ~ N(0, I)``, form
``x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps`` (eq. 4) and regress the network onto the target
of ``prediction_type``: ``epsilon`` (eq. 14), ``sample`` (``x_0`` itself) or ``v_prediction``
(``v = sqrt(abar) eps - sqrt(1 - abar) x_0``, Salimans & Ho 2022, sec. 4). The noise schedule and
the forward process come from one ``DDPMScheduler``; the same betas drive every sampler.

Sampling: the loop is written out (``set_timesteps``, then ``net(x, t, cond)`` and ``step`` per
timestep), as diffusers' pipelines do:
- ``ddpm``: ancestral sampling (Ho et al. Alg. 2), ``fixed_small`` variance as in Chi et al.
- ``ddim``: deterministic (eta = 0) DDIM (Song et al. 2021, eq. 12), few steps.
- ``dpmsolver``: multistep DPM-Solver++ of order 2 (Lu et al. 2022, Alg. 2).

:meth:`DiffusionMethod.sampling_plan` exports the same loop for fast paths
(``diffusion_policy.fast``): the network times, and for DDIM the step in closed form
(:class:`~diffusion_policy.step_update.StepUpdate`, one row per step, checked against
``DDIMScheduler.step`` in the tests) so that a fast network can run it with its last layer; DDPM
and DPM-Solver++ plans step diffusers' scheduler.

Inpainting (``prefix``): before every network call the known leading actions are replaced by
their noised version ``q(x_k | prefix)`` with the same noise the chunk started from, so that their
trajectory is the one an exact sampler would follow for those values; at the end they are set
exactly. This is the replacement method (Song et al. 2021 "Score-Based Generative Modeling through
SDEs", App. I.2; Lugmayr et al. 2022 "RePaint" without resampling).
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from diffusion_policy.methods.sampling import (
    SamplingPlan,
    check_prefix,
    check_steps,
    device_times,
    initial_noise,
    put_prefix,
)
from diffusion_policy.step_update import StepUpdate

SCHEDULERS = ("ddpm", "ddim", "dpmsolver")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class DiffusionMethod:
    """``loss(net, actions, cond)`` and ``sample(net, cond, shape, ...)`` for a DDPM-family model.

    Everything is in normalized action units; the network is only called as ``net(x, t, cond)``
    with ``t`` the integer timestep as a float. The constructor holds the rules of its settings
    (the step-count limit, DPM-Solver's clipping): configuration checks build one to apply them.
    """

    def __init__(self, scheduler: str = "ddpm", num_train_timesteps: int = 100,
                 beta_schedule: str = "squaredcos_cap_v2", prediction_type: str = "epsilon",
                 clip_sample: bool = True, num_inference_steps: int = 100):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"method.scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"method.beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"method.prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
            )
        if num_train_timesteps < 1:
            raise ValueError(f"method.num_train_timesteps={num_train_timesteps} must be >= 1")
        if scheduler == "dpmsolver" and clip_sample:
            raise ValueError("method.clip_sample=true is not supported by method.scheduler=dpmsolver "
                             "(diffusers' DPM-Solver++ cannot clip); set method.clip_sample=false")
        self.scheduler_name = scheduler
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.num_inference_steps = check_steps(num_inference_steps, "method.num_inference_steps",
                                               num_train_timesteps)
        common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                      prediction_type=prediction_type)
        # The forward process (training) and the sampler share betas and alphas_cumprod.
        self.train_scheduler = DDPMScheduler(**common, clip_sample=clip_sample)
        # "trailing" spacing (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
        # Flawed", Table 2) puts the first of n steps at k = T-1, the noisiest step, where the chunk
        # really is pure noise. The default "leading" spacing with T=100 and n=10 starts at k=90:
        # the sampler would then treat N(0, I) as x_90 although training saw x_90 carrying a visible
        # trace of x_0, a mismatch that grows as n shrinks (with n=1 "leading" gives k=0: the one
        # step would read pure noise as an almost clean chunk).
        if scheduler == "ddpm":
            self.scheduler = DDPMScheduler(**common, clip_sample=clip_sample, variance_type="fixed_small",
                                           timestep_spacing="trailing")
        elif scheduler == "ddim":
            self.scheduler = DDIMScheduler(**common, clip_sample=clip_sample, set_alpha_to_one=True,
                                           timestep_spacing="trailing")
        else:
            self.scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++",
                                                         solver_order=2, timestep_spacing="trailing")
        self.alphas_cumprod = self.train_scheduler.alphas_cumprod.clone()  # (T,) float32, CPU
        if float(self.alphas_cumprod[-1]) > 0.01:
            # e.g. "linear" (betas 1e-4..0.02, made for T=1000) with T=100 ends at abar = 0.37:
            # sampling starts from N(0, I) although training never saw x_{T-1} that noisy.
            warnings.warn(
                f"beta_schedule={beta_schedule!r} with num_train_timesteps={num_train_timesteps} ends at "
                f"alphas_cumprod={float(self.alphas_cumprod[-1]):.3f}, far from pure noise; use "
                "squaredcos_cap_v2 or more training timesteps", stacklevel=2,
            )
        self._time_cache: dict[tuple, tuple] = {}
        self._update_cache: dict[tuple, StepUpdate] = {}
        self._plan_cache: dict[tuple, SamplingPlan] = {}

    @property
    def stochastic(self) -> bool:
        """Whether sampling draws fresh noise at every step (ancestral DDPM), not only at the
        start (DDIM with eta = 0, DPM-Solver++)."""
        return self.scheduler_name == "ddpm"

    # ------------------------------------------------------------------------------- training
    def loss(self, net, actions: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B = actions.shape[0]
        noise = torch.randn_like(actions)
        k = torch.randint(0, self.num_train_timesteps, (B,), device=actions.device)
        x_k = self.train_scheduler.add_noise(actions, noise, k)  # eq. 4
        pred = net(x_k, k.float(), cond)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "sample":
            target = actions
        else:
            target = self.train_scheduler.get_velocity(actions, noise, k)
        return F.mse_loss(pred.float(), target.float())

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, net, cond: torch.Tensor, shape: tuple[int, int, int], num_steps: int | None = None,
               generator: torch.Generator | list | None = None, prefix: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``(B, H, Da)`` chunks; ``prefix (B, P, Da)`` = known leading actions (inpainted);
        ``noise``: the starting chunk ``x_T`` (default: drawn from ``generator``)."""
        n = self._steps(num_steps)
        B = shape[0]
        x = initial_noise(shape, generator, cond.device, noise)
        P = check_prefix(prefix, shape)
        noise_prefix = x[:, :P].clone() if P else None
        # a copy per call: set_timesteps and DPM-Solver's history of model outputs are state, and
        # two overlapping predict calls (a server's threads) must not share it
        sched = copy.copy(self.scheduler)
        sched.set_timesteps(n)  # timesteps stay on the CPU: step() indexes CPU tables with them
        _, times = self._network_times(sched.timesteps, cond.device)  # k as floats on the device
        for i, k in enumerate(sched.timesteps):
            if P:
                x = put_prefix(x, prefix, noise_prefix, self._prefix_weights(int(k)))  # q(x_k | prefix)
            out = net(x, times[i].expand(B), cond)
            x = sched.step(out.to(x.dtype), k, x, generator=generator).prev_sample
        if P:
            x = torch.cat([prefix.to(x.dtype), x[:, P:]], dim=1)
        return x

    def sampling_plan(self, num_steps: int | None = None, device: torch.device | str = "cpu") -> SamplingPlan:
        """:meth:`sample`'s loop as a :class:`~diffusion_policy.methods.sampling.SamplingPlan` for
        ``num_steps`` on ``device``: kind ``"update"`` for DDIM (its step in closed form),
        ``"scheduler"`` for DDPM and DPM-Solver++. Kept per (steps, device)."""
        n = self._steps(num_steps)
        device = torch.device(device)
        key = (n, str(device))
        if key not in self._plan_cache:
            sched = copy.copy(self.scheduler)
            sched.set_timesteps(n)
            joined, times = self._network_times(sched.timesteps, device)
            ks = tuple(int(k) for k in sched.timesteps)
            common = dict(times=joined, step_times=tuple(times), num_steps=n, timesteps=ks,
                          prefix_weights=tuple(self._prefix_weights(k) for k in ks))
            if self.scheduler_name == "ddim":
                plan = SamplingPlan("update", update=self._ddim_update(sched, device), **common)
            else:
                plan = SamplingPlan("scheduler", scheduler=self.scheduler, **common)
            self._plan_cache[key] = plan
        return self._plan_cache[key]

    def _steps(self, num_steps: int | None) -> int:
        if num_steps is None:
            return self.num_inference_steps
        return check_steps(num_steps, "num_steps", self.num_train_timesteps)

    def _prefix_weights(self, k: int) -> tuple[float, float]:
        """``(sqrt(abar_k), sqrt(1 - abar_k))``: the known prefix noised to step k (eq. 4)."""
        a = float(self.alphas_cumprod[k])
        return a**0.5, (1.0 - a) ** 0.5

    def _network_times(self, timesteps: torch.Tensor, device: torch.device) -> tuple:
        """The timesteps as the network's float times on ``device`` (``device_times``), kept per
        (timesteps, device): a repeated call copies nothing to the device."""
        key = (tuple(timesteps.tolist()), str(device))
        if key not in self._time_cache:
            self._time_cache[key] = device_times([float(k) for k in timesteps.tolist()], device)
        return self._time_cache[key]

    def _ddim_update(self, sched: DDIMScheduler, device: torch.device) -> StepUpdate:
        """DDIM's step with eta = 0 (Song et al. 2021, eq. 12) for ``sched``'s timesteps as a
        :class:`StepUpdate`, following diffusers' ``DDIMScheduler.step``: the predicted ``x_0``
        (clipped when ``clip_sample``) and the predicted noise from the unclipped prediction, then
        ``x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev) eps``. Kept per timesteps and device."""
        key = (tuple(sched.timesteps.tolist()), str(device))
        if key not in self._update_cache:
            T, n = self.num_train_timesteps, sched.num_inference_steps
            ac = sched.alphas_cumprod.double()
            clip = float(sched.config.clip_sample_range) if sched.config.clip_sample else float("inf")
            rows = []
            for k in sched.timesteps.tolist():
                prev = k - T // n
                a = float(ac[k])
                a_prev = float(ac[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
                r, s, r_prev, s_prev = a**0.5, (1 - a) ** 0.5, a_prev**0.5, (1 - a_prev) ** 0.5
                # x_0 = a0 x + a1 out; eps = e0 x + e1 out; x_prev = r_prev clip(x_0) + s_prev eps
                a0, a1, e0, e1 = {
                    "epsilon": (1 / r, -s / r, 0.0, 1.0),
                    "sample": (0.0, 1.0, 1 / s, -r / s),
                    "v_prediction": (r, -s, s, r),
                }[self.prediction_type]
                rows.append((a0, a1, s_prev * e0, r_prev, s_prev * e1, clip))
            self._update_cache[key] = StepUpdate(rows, device)
        return self._update_cache[key]
