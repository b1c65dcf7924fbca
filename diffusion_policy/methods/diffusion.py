"""DDPM-family methods through diffusers' schedulers (DDPM, DDIM, DPM-Solver++).

Training (Ho et al. 2020, Alg. 1): draw ``k ~ U{0..T-1}`` and ``eps ~ N(0, I)``, form
``x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps`` (eq. 4) and regress the network onto the target
of ``prediction_type``: ``epsilon`` (eq. 14), ``sample`` (``x_0`` itself) or ``v_prediction``
(``v = sqrt(abar) eps - sqrt(1 - abar) x_0``, Salimans & Ho 2022, sec. 4). The noise schedule and
the forward process come from one ``DDPMScheduler``; the same betas drive every sampler.

Sampling: the loop is written out (``set_timesteps`` then ``step``), as diffusers' pipelines do:
- ``ddpm``: ancestral sampling (Ho et al. Alg. 2), ``fixed_small`` variance as in Chi et al.
- ``ddim``: deterministic (eta = 0) DDIM (Song et al. 2021, eq. 12), few steps.
- ``dpmsolver``: multistep DPM-Solver++ of order 2 (Lu et al. 2022, Alg. 2).

DDIM's step (eta = 0) is written out in closed form (:class:`StepUpdate`, checked against
diffusers' ``DDIMScheduler.step`` in the tests) so that a network's sampling path can run it in
the same kernel as its last layer; the other schedulers call diffusers' ``step``.

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
from diffusers.utils.torch_utils import randn_tensor

from diffusion_policy.step_update import StepUpdate

SCHEDULERS = ("ddpm", "ddim", "dpmsolver")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class DiffusionMethod:
    """``loss(net, actions, cond)`` and ``sample(net, cond, shape, ...)`` for a DDPM-family model.

    Everything is in normalized action units; the network is only called as ``net(x, t, cond)``
    with ``t`` the integer timestep as a float.
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
            raise ValueError(f"method.num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if scheduler == "dpmsolver" and clip_sample:
            raise ValueError(
                "method.clip_sample=true is not supported by the dpmsolver scheduler (diffusers' "
                "DPMSolverMultistepScheduler has no clipping); set clip_sample: false"
            )
        self.scheduler_name = scheduler
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self._check_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
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
        self._time_cache: dict[tuple, NetworkTimes] = {}
        self._update_cache: dict[tuple, StepUpdate] = {}

    @property
    def stochastic(self) -> bool:
        """Whether sampling draws fresh noise at every step (ancestral DDPM), not only at the
        start (DDIM with eta = 0, DPM-Solver++)."""
        return self.scheduler_name == "ddpm"

    def _check_steps(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        if n > self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={n} is more than the {self.num_train_timesteps} timesteps the "
                f"schedule was trained with (num_train_timesteps); use at most {self.num_train_timesteps}"
            )

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
    def _device_timesteps(self, timesteps: torch.Tensor, device: torch.device) -> NetworkTimes:
        """The sampler's timesteps as floats on ``device``, one ``(1,)`` tensor per step, cached so
        that a repeated call makes no host-to-device copy (required to capture the sampling loop in
        a CUDA graph). Separate tensors rather than views of one: every network call then sees an
        input of the same layout (no storage offsets for a compiler to specialise on)."""
        key = (tuple(timesteps.tolist()), str(device))
        if key not in self._time_cache:
            ts = timesteps.to(device=device, dtype=torch.float32)
            self._time_cache[key] = NetworkTimes([ts[i : i + 1].clone() for i in range(len(ts))])
        return self._time_cache[key]

    def _ddim_update(self, sched: DDIMScheduler, device: torch.device) -> StepUpdate:
        """DDIM's step with eta = 0 (Song et al. 2021, eq. 12) for ``sched``'s timesteps as a
        :class:`StepUpdate`, following diffusers' ``DDIMScheduler.step``: the predicted ``x_0``
        (clipped when ``clip_sample``) and the predicted noise from the unclipped prediction, then
        ``x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev) eps``. Cached per timesteps and
        device (no host-to-device copy on a repeated call: a CUDA graph can capture it)."""
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

    @torch.no_grad()
    def sample(self, net, cond: torch.Tensor, shape: tuple[int, int, int], num_steps: int | None = None,
               generator: torch.Generator | list | None = None, prefix: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``(B, H, Da)`` chunks; ``prefix (B, P, Da)`` = known leading actions (inpainted);
        ``noise``: the starting chunk ``x_T`` (default: drawn from ``generator``)."""
        n = self.num_inference_steps if num_steps is None else int(num_steps)
        self._check_steps(n)
        device = cond.device
        x = initial_noise(shape, generator, device, noise)
        P = check_prefix(prefix, shape)
        noise_prefix = x[:, :P].clone() if P else None
        # a copy per call: set_timesteps and DPM-Solver's history of model outputs are state, and
        # two overlapping predict calls (a server's threads) must not share it
        sched = copy.copy(self.scheduler)
        sched.set_timesteps(n)  # timesteps stay on the CPU: step() indexes CPU tables with them
        t_dev = self._device_timesteps(sched.timesteps, device)
        update = self._ddim_update(sched, device) if self.scheduler_name == "ddim" else None
        f = denoiser(net, cond, t_dev, update)  # with an update, f returns the next x
        for i, k in enumerate(sched.timesteps):
            if P:
                a = float(self.alphas_cumprod[int(k)])
                known = a**0.5 * prefix + (1.0 - a) ** 0.5 * noise_prefix  # q(x_k | prefix), eq. 4
                x = torch.cat([known.to(x.dtype), x[:, P:]], dim=1)
            if update is not None:
                x = f(x, i)
            else:
                x = sched.step(f(x, i).to(x.dtype), k, x, generator=generator).prev_sample
        if P:
            x = torch.cat([prefix.to(x.dtype), x[:, P:]], dim=1)
        return x


class NetworkTimes(list):
    """A sampler's network times: a list of ``(1,)`` device tensors (one per network call) and
    ``joined``, the same times as one ``(S,)`` tensor, made once with the list. The methods keep
    these per (steps, device), so a network that prepares tables from the times (the UNet's fused
    sampling path) meets the same ``joined`` tensor every chunk and can keep its tables."""

    def __init__(self, times: list[torch.Tensor]):
        super().__init__(times)
        self.joined = torch.cat(times)


def initial_noise(shape: tuple[int, int, int], generator, device: torch.device,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """The sampler's starting chunk: ``noise`` when given (checked, as float32 on ``device``),
    else ``N(0, I)`` from ``generator``. randn_tensor takes one generator or a list of one per
    row: row b's noise then depends on generator[b] alone, so a batch of episodes samples what
    each would sample on its own."""
    if noise is None:
        return randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    return noise.to(device=device, dtype=torch.float32)


def denoiser(net, cond: torch.Tensor, times: list[torch.Tensor], update: StepUpdate | None = None):
    """The network as ``f(x, i) = net(x, times[i], cond)`` for a sampling loop whose network times
    are ``times`` (one ``(1,)`` device tensor each) and whose condition is fixed; with ``update``,
    ``f`` returns the next chunk ``update.apply(x, net(...), i)`` instead. A network with
    ``prepare_sampling(cond, times (S,), update)`` (the UNet) precomputes what depends on the
    condition and the times alone and runs the update with its last layer; any other is called
    as is."""
    prepare = getattr(net, "prepare_sampling", None)
    if prepare is not None:
        return prepare(cond, times.joined if isinstance(times, NetworkTimes) else torch.cat(times), update)
    B = cond.shape[0]
    if update is None:
        return lambda x, i: net(x, times[i].expand(B), cond)
    return lambda x, i: update.apply(x, net(x, times[i].expand(B), cond), i)


def check_prefix(prefix: torch.Tensor | None, shape: tuple[int, int, int]) -> int:
    """Length ``P`` of a known prefix ``(B, P, Da)`` (0 when there is none)."""
    if prefix is None:
        return 0
    B, H, Da = shape
    if prefix.ndim != 3 or prefix.shape[0] != B or prefix.shape[2] != Da or prefix.shape[1] > H:
        raise ValueError(f"prefix has shape {tuple(prefix.shape)}, expected ({B}, P <= {H}, {Da})")
    return int(prefix.shape[1])
