"""Flow matching on the linear (rectified) path, written out.

Convention (as in pi0, Black et al. 2024, sec. 4): ``t`` is the noise level, ``t = 1`` is pure
noise and ``t = 0`` the data. With ``x_0`` an action chunk and ``eps ~ N(0, I)``:

    x_t = t * eps + (1 - t) * x_0                  (the conditional path; Lipman et al. 2023, eq. 20
                                                    with sigma_min = 0; Liu et al. 2023, eq. 1)
    u   = d x_t / d t = eps - x_0                  (the conditional velocity, the regression target)

The network learns ``v(x, t) ~ E[eps - x_0 | x_t = x]``; sampling integrates ``dx/dt = v`` from
``t = 1`` (noise) to ``t = 0`` on a uniform grid with Euler, midpoint or Heun steps. The network
sees ``t * 1000`` so that its sinusoidal embedding resolves the time like a diffusion timestep.
:meth:`FlowMatching.sampling_plan` exports the same loop for fast paths: Euler's step as a
``StepUpdate`` row per step (a fast network runs it with its last layer), midpoint and Heun as
their Butcher tableaus.

Training times (``time_dist``): ``uniform``; ``logit_normal`` (sigmoid of N(0, 1), Esser et al.
2024, eq. 19); ``beta`` (pi0: ``t = 0.001 + 0.999 * Beta(1.5, 1)``, which favours noisy times and
never trains at exactly ``t = 0``).

Inpainting (``prefix``): the known leading actions are kept on their own straight path
``t * eps + (1 - t) * prefix`` (with the chunk's initial noise) before every velocity evaluation and
set exactly at the end, the replacement method used for real-time chunking (Black et al. 2025,
"Real-Time Execution of Action Chunking Flow Policies", which adds guidance on top).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion_policy.methods.sampling import (
    SamplingPlan,
    check_prefix,
    check_steps,
    device_times,
    initial_noise,
    put_prefix,
)
from diffusion_policy.step_update import StepUpdate

TIME_DISTS = ("uniform", "logit_normal", "beta")
INTEGRATORS = ("euler", "midpoint", "heun")
TIME_SCALE = 1000.0  # what the network sees: t * TIME_SCALE
# explicit Runge-Kutta tableaus (a, b) of the two-stage integrators: stage j evaluates the velocity
# at x + h sum_l a[j][l] v_l, the step is x + h sum_j b[j] v_j (Butcher 2016, sec. 23)
TABLEAUS = {"midpoint": (((), (0.5,)), (0.0, 1.0)), "heun": (((), (1.0,)), (0.5, 0.5))}


class FlowMatching:
    """``loss(net, actions, cond)`` and ``sample(net, cond, shape, ...)`` for flow matching."""

    stochastic = False  # sampling draws noise only at the start

    def __init__(self, time_dist: str = "beta", integrator: str = "euler", num_inference_steps: int = 10):
        if time_dist not in TIME_DISTS:
            raise ValueError(f"method.time_dist must be one of {TIME_DISTS}, got {time_dist!r}")
        if integrator not in INTEGRATORS:
            raise ValueError(f"method.integrator must be one of {INTEGRATORS}, got {integrator!r}")
        self.time_dist = time_dist
        self.integrator = integrator
        self.num_inference_steps = check_steps(num_inference_steps, "method.num_inference_steps")
        self._time_cache: dict[tuple[int, str], tuple] = {}
        self._update_cache: dict[tuple[int, str], StepUpdate] = {}
        self._plan_cache: dict[tuple[int, str], SamplingPlan] = {}

    # ------------------------------------------------------------------------------- training
    def sample_time(self, batch: int, device: torch.device) -> torch.Tensor:
        """Training noise levels ``t`` of shape ``(batch,)`` from ``time_dist``."""
        if self.time_dist == "uniform":
            return torch.rand(batch, device=device)
        if self.time_dist == "logit_normal":
            return torch.sigmoid(torch.randn(batch, device=device))
        u = torch.distributions.Beta(torch.tensor(1.5, device=device), torch.tensor(1.0, device=device))
        return 0.001 + 0.999 * u.sample((batch,))

    def loss(self, net, actions: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B = actions.shape[0]
        eps = torch.randn_like(actions)
        t = self.sample_time(B, actions.device)
        tt = t[:, None, None]
        x_t = tt * eps + (1.0 - tt) * actions  # (B, H, Da) on the linear path
        pred = net(x_t, t * TIME_SCALE, cond)
        return F.mse_loss(pred.float(), (eps - actions).float())

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, net, cond: torch.Tensor, shape: tuple[int, int, int], num_steps: int | None = None,
               generator: torch.Generator | list | None = None, prefix: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate from noise (t = 1) to actions (t = 0) in ``num_steps`` steps; ``noise``: the
        starting chunk (default: drawn from ``generator``)."""
        n = self._steps(num_steps)
        B = shape[0]
        x = initial_noise(shape, generator, cond.device, noise)
        P = check_prefix(prefix, shape)
        eps_prefix = x[:, :P].clone() if P else None
        h = -1.0 / n  # dt: time runs from 1 down to 0
        _, grid = self._grid(n, cond.device)  # 2n + 1 times: grid points (even j), midpoints (odd j)

        def velocity(x: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
            """``(v, x)`` at grid entry j, ``x`` with the known prefix put on its path first."""
            if P:
                x = put_prefix(x, prefix, eps_prefix, self._prefix_weights(n, j))
            return net(x, grid[j].expand(B), cond).to(x.dtype), x

        for i in range(n):
            j = 2 * i  # grid index of the current time
            v, x = velocity(x, j)
            if self.integrator == "euler":
                x = x + h * v
            elif self.integrator == "midpoint":
                v_mid, _ = velocity(x + 0.5 * h * v, j + 1)
                x = x + h * v_mid
            else:  # heun: trapezoid on the Euler prediction (Karras et al. 2022, Alg. 1)
                v_next, _ = velocity(x + h * v, j + 2)
                x = x + 0.5 * h * (v + v_next)
        if P:
            x = torch.cat([prefix.to(x.dtype), x[:, P:]], dim=1)
        return x

    def sampling_plan(self, num_steps: int | None = None, device: torch.device | str = "cpu") -> SamplingPlan:
        """:meth:`sample`'s loop as a :class:`~diffusion_policy.methods.sampling.SamplingPlan`:
        kind ``"update"`` for Euler (``x + h v`` as a StepUpdate row per step), ``"runge_kutta"``
        for midpoint and Heun. Kept per (steps, device)."""
        n = self._steps(num_steps)
        device = torch.device(device)
        key = (n, str(device))
        if key not in self._plan_cache:
            joined, grid = self._grid(n, device)
            if self.integrator == "euler":
                js = [2 * i for i in range(n)]
            else:  # stage 2 at the midpoint (odd grid entry) or the next grid point
                off = 1 if self.integrator == "midpoint" else 2
                js = [j for i in range(n) for j in (2 * i, 2 * i + off)]
            common = dict(times=joined[js], step_times=tuple(grid[j] for j in js), num_steps=n,
                          prefix_weights=tuple(self._prefix_weights(n, j) for j in js))
            if self.integrator == "euler":
                plan = SamplingPlan("update", update=self._euler_update(n, device), **common)
            else:
                a, b = TABLEAUS[self.integrator]
                plan = SamplingPlan("runge_kutta", h=-1.0 / n, a=a, b=b, **common)
            self._plan_cache[key] = plan
        return self._plan_cache[key]

    def _steps(self, num_steps: int | None) -> int:
        return self.num_inference_steps if num_steps is None else check_steps(num_steps, "num_steps")

    @staticmethod
    def _prefix_weights(n: int, j: int) -> tuple[float, float]:
        """``(1 - t, t)`` at grid entry j (t = 1 - j / (2n)): the prefix's straight path."""
        t = 1.0 - j / (2 * n)
        return 1.0 - t, t

    def _grid(self, n: int, device: torch.device) -> tuple:
        """``2n + 1`` network times ``[1, 1 - h/2, 1 - h, ..., 0] * TIME_SCALE`` on ``device``
        (even entries: grid points, odd: midpoints) as ``device_times``, kept per (n, device)."""
        key = (n, str(device))
        if key not in self._time_cache:
            self._time_cache[key] = device_times(torch.linspace(1.0, 0.0, 2 * n + 1).mul(TIME_SCALE).tolist(), device)
        return self._time_cache[key]

    def _euler_update(self, n: int, device: torch.device) -> StepUpdate:
        """The Euler step ``x + h v`` (h = -1/n) as a :class:`StepUpdate`, one row per step."""
        key = (n, str(device))
        if key not in self._update_cache:
            row = (0.0, 0.0, 1.0, 0.0, -1.0 / n, float("inf"))
            self._update_cache[key] = StepUpdate([row] * n, device)
        return self._update_cache[key]
