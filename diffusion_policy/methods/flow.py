"""Flow matching on the linear (rectified) path, written out.

Convention (as in pi0, Black et al. 2024, sec. 4): ``t`` is the noise level, ``t = 1`` is pure
noise and ``t = 0`` the data. With ``x_0`` an action chunk and ``eps ~ N(0, I)``:

    x_t = t * eps + (1 - t) * x_0                  (the conditional path; Lipman et al. 2023, eq. 20
                                                    with sigma_min = 0; Liu et al. 2023, eq. 1)
    u   = d x_t / d t = eps - x_0                  (the conditional velocity, the regression target)

The network learns ``v(x, t) ~ E[eps - x_0 | x_t = x]``; sampling integrates ``dx/dt = v`` from
``t = 1`` (noise) to ``t = 0`` on a uniform grid with Euler, midpoint or Heun steps. The network
sees ``t * 1000`` so that its sinusoidal embedding resolves the time like a diffusion timestep.

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

from diffusion_policy.methods.diffusion import NetworkTimes, check_prefix, denoiser, initial_noise
from diffusion_policy.step_update import StepUpdate

TIME_DISTS = ("uniform", "logit_normal", "beta")
INTEGRATORS = ("euler", "midpoint", "heun")
TIME_SCALE = 1000.0  # what the network sees: t * TIME_SCALE


class FlowMatching:
    """``loss(net, actions, cond)`` and ``sample(net, cond, shape, ...)`` for flow matching."""

    stochastic = False  # sampling draws noise only at the start

    def __init__(self, time_dist: str = "beta", integrator: str = "euler", num_inference_steps: int = 10):
        if time_dist not in TIME_DISTS:
            raise ValueError(f"method.time_dist must be one of {TIME_DISTS}, got {time_dist!r}")
        if integrator not in INTEGRATORS:
            raise ValueError(f"method.integrator must be one of {INTEGRATORS}, got {integrator!r}")
        if num_inference_steps < 1:
            raise ValueError(f"method.num_inference_steps must be >= 1, got {num_inference_steps}")
        self.time_dist = time_dist
        self.integrator = integrator
        self.num_inference_steps = num_inference_steps
        self._time_cache: dict[tuple[int, str], NetworkTimes] = {}
        self._update_cache: dict[tuple[int, str], StepUpdate] = {}

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
    def _grid(self, n: int, device: torch.device) -> NetworkTimes:
        """``2n + 1`` network times ``[1, 1 - h/2, 1 - h, ..., 0] * TIME_SCALE`` on ``device``
        (even entries: grid points, odd: midpoints), one ``(1,)`` tensor each, cached so that
        repeated calls copy nothing to the device (the sampling loop can then be captured in a
        CUDA graph) and every network call sees an input of the same layout."""
        key = (n, str(device))
        if key not in self._time_cache:
            grid = torch.linspace(1.0, 0.0, 2 * n + 1).mul(TIME_SCALE).to(device)
            self._time_cache[key] = NetworkTimes([grid[j : j + 1].clone() for j in range(2 * n + 1)])
        return self._time_cache[key]

    def _euler_update(self, n: int, device: torch.device) -> StepUpdate:
        """The Euler step ``x + h v`` (h = -1/n) as a :class:`StepUpdate` with a row for every
        grid entry, cached per (n, device)."""
        key = (n, str(device))
        if key not in self._update_cache:
            row = (0.0, 0.0, 1.0, 0.0, -1.0 / n, float("inf"))
            self._update_cache[key] = StepUpdate([row] * (2 * n + 1), device)
        return self._update_cache[key]

    @torch.no_grad()
    def sample(self, net, cond: torch.Tensor, shape: tuple[int, int, int], num_steps: int | None = None,
               generator: torch.Generator | list | None = None, prefix: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate from noise (t = 1) to actions (t = 0) in ``num_steps`` steps; ``noise``: the
        starting chunk (default: drawn from ``generator``)."""
        n = self.num_inference_steps if num_steps is None else int(num_steps)
        if n < 1:
            raise ValueError(f"num_steps must be >= 1, got {n}")
        x = initial_noise(shape, generator, cond.device, noise)
        P = check_prefix(prefix, shape)
        eps_prefix = x[:, :P].clone() if P else None
        h = -1.0 / n  # dt: time runs from 1 down to 0
        grid = self._grid(n, cond.device)

        def put_prefix(x: torch.Tensor, j: int) -> torch.Tensor:
            """``x`` with the known prefix put on its path at grid entry j (t = 1 - j / (2n))."""
            if not P:
                return x
            t = 1.0 - j / (2 * n)
            known = t * eps_prefix + (1.0 - t) * prefix
            return torch.cat([known.to(x.dtype), x[:, P:]], dim=1)

        if self.integrator == "euler":
            # x + h v as a StepUpdate: the network's sampling path runs it after its last layer
            f = denoiser(net, cond, grid, self._euler_update(n, cond.device))
            for i in range(n):
                x = f(put_prefix(x, 2 * i), 2 * i)
        else:
            f = denoiser(net, cond, grid)

            def velocity(x: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
                """``(v, x)`` at grid entry j, ``x`` with the known prefix put on its path first."""
                x = put_prefix(x, j)
                return f(x, j).to(x.dtype), x

            for i in range(n):
                j = 2 * i  # grid index of the current time
                if self.integrator == "midpoint":
                    v, x = velocity(x, j)
                    v_mid, _ = velocity(x + 0.5 * h * v, j + 1)
                    x = x + h * v_mid
                else:  # heun: trapezoid on the Euler prediction (Karras et al. 2022, Alg. 1)
                    v, x = velocity(x, j)
                    x_pred = x + h * v
                    v_next, _ = velocity(x_pred, j + 2)
                    x = x + 0.5 * h * (v + v_next)
        if P:
            x = torch.cat([prefix.to(x.dtype), x[:, P:]], dim=1)
        return x
