"""Real-time chunking: the committed actions enforced on the next chunk by guided inpainting.

While a chunk is computed the robot keeps executing the previous one, so the first actions of the
new chunk are already decided. Black, Galliker & Levine 2025, "Real-Time Execution of Action
Chunking Flow Policies" (arXiv 2506.07339, sec. 4), treat this as inpainting: at every denoising
step the denoised estimate is pulled toward the previous chunk ``Y`` by pseudoinverse guidance
(PiGDM, Song et al. 2023, "Pseudoinverse-Guided Diffusion Models for Inverse Problems"), with a
soft mask ``W`` over the chunk (1 on the frozen actions, decaying over the rest of the overlap).

Paper (time ``tau``: 0 noise, 1 data; ``A`` the noisy chunk, ``v`` the network's velocity):

    A1_hat  = A + (1 - tau) v(A, tau)                                         eq. 3
    g       = (dA1_hat / dA)^T diag(W) (Y - A1_hat)      (a vector-Jacobian product)
    v_guided = v + min(beta, (1 - tau) / (tau r^2)) g,  r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)   eq. 2, 4

This package's flow runs the other way (``t = 1 - tau``: 1 noise, 0 data) with the velocity
``u = eps - x0 = -v``, so ``x0_hat = x - t u`` and ``u_guided = u - w g``; the weight is symmetric in
``t <-> tau``. Written with the path ``x = a x0 + b eps`` (flow: ``a = 1 - t``, ``b = t``) it reads

    w = min(beta, (a^2 + b^2) / (a b))

and that form carries over to the DDPM family (``a = sqrt(abar_k)``, ``b = sqrt(1 - abar_k)``): a
deterministic DDIM step is an Euler step of the flow ``x / (a + b)`` at ``t = b / (a + b)``
(the two paths differ by that rescaling), and the flow's guided step, mapped back, shifts the x0
estimate by ``b w g`` at fixed ``x`` (unclipped, ``x0_hat + g / a``: PiGDM's ``g / r^2`` score term
with ``r^2 = 1 - abar``). Each prediction type's output is corrected to match that shift and
handed to the scheduler's own ``step``, so DDPM, DDIM and DPM-Solver++ are guided alike.

The mask (eq. 5) over a chunk's indices: see :func:`rtc_weights`. In this package the first
executed action is chunk index ``To - 1``; a caller aligns the previous chunk with the new one by
time and passes ``prefix`` for indices ``[0, P)`` (past actions, then committed ones, then the
rest of the overlap); ``weights`` must be 0 from ``P`` on.
"""
from __future__ import annotations

import copy
import functools
import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffusion_policy.methods import DiffusionMethod, FlowMatching
from diffusion_policy.methods.flow import TIME_SCALE

SCHEDULES = ("exp", "hard")


def rtc_weights(horizon: int, delay: int, exec_horizon: int, start: int = 0,
                schedule: str = "exp") -> torch.Tensor:
    """The soft mask ``W`` ``(horizon,)`` over chunk indices (Black et al. 2025, eq. 5).

    ``start``: chunk index of the first executed action (``To - 1`` in this package); ``delay`` d:
    actions committed while the chunk is computed (the inference delay, in control steps);
    ``exec_horizon`` s: actions executed from a chunk before the next one is started, so the
    previous chunk, started s steps earlier, covers the new chunk's indices ``[0, horizon - s)``.

        [0, start)             1   past actions (aligned by time; they were executed)
        [start, F)             1   frozen: F = start + d
        [F, E)                 c_i (e^c_i - 1) / (e - 1),  c_i = (E - i) / (E - F + 1)   ("exp")
                               0                                                       ("hard")
        [E, horizon)           0   not covered by the previous chunk: E = horizon - s

    The paper writes eq. 5 with its index 0 at the first executed action: ``i - start`` there.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"rtc_weights: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if horizon < 1 or start < 0 or delay < 0 or exec_horizon < 0:
        raise ValueError(f"rtc_weights: expected horizon >= 1 and start, delay, exec_horizon >= 0, got "
                         f"horizon={horizon}, start={start}, delay={delay}, exec_horizon={exec_horizon}")
    F, E = start + delay, horizon - exec_horizon
    if F > E:
        raise ValueError(f"rtc_weights: the frozen actions [0, start + delay) = [0, {F}) run past the end of "
                         f"the overlap horizon - exec_horizon = {E}; expected start + delay <= {E}")
    w = torch.zeros(horizon, dtype=torch.float64)
    w[:F] = 1.0
    if schedule == "exp":
        i = torch.arange(F, E, dtype=torch.float64)
        c = (E - i) / (E - F + 1)  # from (E - F) / (E - F + 1) just after the frozen part down to 1 / (E - F + 1)
        w[F:E] = c * torch.expm1(c) / (math.e - 1.0)
    return w.float()


def guidance_weight(a: float, b: float, max_guidance: float) -> float:
    """The clipped guidance weight ``min(beta, (a^2 + b^2) / (a b))`` at the point ``x = a x0 + b eps``
    of the path (eq. 2's ``min(beta, (1 - tau) / (tau r^2))`` with ``a = tau``, ``b = 1 - tau``);
    ``beta`` where ``a b = 0`` (pure noise, clean data), where the unclipped weight is infinite."""
    if a * b <= 0.0:
        return float(max_guidance)
    return min(float(max_guidance), (a * a + b * b) / (a * b))


def _check(shape, prefix, weights, max_guidance, device):
    """``(Y (B, H, Da), W (B, H, 1))`` from a prefix ``(B, P, Da)`` and weights ``(H,)`` or ``(B, H)``."""
    B, H, Da = shape
    if prefix.ndim != 3 or prefix.shape[0] != B or prefix.shape[2] != Da or prefix.shape[1] > H:
        raise ValueError(f"prefix has shape {tuple(prefix.shape)}, expected ({B}, P <= {H}, {Da})")
    P = int(prefix.shape[1])
    w = torch.as_tensor(weights, dtype=torch.float32, device=device)
    if w.ndim == 1:
        w = w.expand(B, -1)
    if tuple(w.shape) != (B, H):
        raise ValueError(f"weights has shape {tuple(torch.as_tensor(weights).shape)}, expected ({H},) or ({B}, {H})")
    if not torch.isfinite(w).all() or (w < 0).any() or (w > 1).any():
        raise ValueError(f"weights must lie in [0, 1], got min {w.min().item():.3g}, max {w.max().item():.3g}")
    if (w[:, P:] != 0).any():
        i = int((w[:, P:] != 0).any(0).nonzero()[0]) + P
        raise ValueError(f"weights are nonzero at chunk index {i} but the prefix gives only indices [0, {P}); "
                         f"expected weights 0 from index {P} on")
    if not max_guidance > 0:
        raise ValueError(f"max_guidance must be > 0, got {max_guidance}")
    Y = torch.zeros(shape, dtype=torch.float32, device=device)
    Y[:, :P] = prefix.to(device=device, dtype=torch.float32)
    return Y, w[:, :, None]


def _vjp(x0_of_x, x: torch.Tensor, Y: torch.Tensor, W: torch.Tensor):
    """``(out, x0_hat, g)``: the network's output, the denoised estimate and
    ``g = (d x0_hat / d x)^T (W * (Y - x0_hat))``, by one backward pass through the network.
    Only ``x`` is differentiated: no gradient reaches the parameters' ``.grad``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out, x0_hat = x0_of_x(x)
        (g,) = torch.autograd.grad(x0_hat, x, grad_outputs=(W * (Y - x0_hat)).detach())
    return out.detach(), x0_hat.detach(), g


@torch.no_grad()
def guided_sample(method, net, cond: torch.Tensor, shape: tuple[int, int, int], prefix: torch.Tensor,
                  weights, num_steps: int | None = None, generator: torch.Generator | list | None = None,
                  noise: torch.Tensor | None = None, max_guidance: float = 5.0) -> torch.Tensor:
    """Draw ``(B, H, Da)`` chunks (normalized units) guided toward ``prefix`` ``(B, P, Da)`` under the
    mask ``weights`` (``(H,)`` or ``(B, H)``, 0 from ``P`` on; e.g. :func:`rtc_weights`).

    ``method``: a :class:`FlowMatching` (Euler, midpoint or Heun: each integrates the guided
    velocity) or a :class:`DiffusionMethod` (any of its schedulers, any prediction type).
    ``noise``: the starting chunk (default: drawn from ``generator``, as the methods' ``sample``
    draws it, so that weights all 0 give the unguided sample). ``max_guidance``: beta of eq. 2.
    The frozen actions are not overwritten: the result is what the guided sampler produced.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("guided_sample differentiates through the network: call it outside torch.inference_mode() "
                           "(torch.no_grad() is fine)")
    device = cond.device
    Y, W = _check(shape, prefix, weights, max_guidance, device)
    if noise is None:
        x = randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    else:
        x = noise.to(device=device, dtype=torch.float32)
    n = method.num_inference_steps if num_steps is None else int(num_steps)
    if n < 1:
        raise ValueError(f"num_steps must be >= 1, got {n}")
    if isinstance(method, FlowMatching):
        return _flow(method, net, cond, x, Y, W, n, max_guidance)
    if isinstance(method, DiffusionMethod):
        return _diffusion(method, net, cond, x, Y, W, n, generator, max_guidance)
    raise ValueError(f"guided_sample: method {type(method).__name__} has no denoising loop to guide; "
                     "expected FlowMatching or DiffusionMethod")


def _flow(method, net, cond, x, Y, W, n, max_guidance):
    """Integrate the guided velocity from t = 1 to t = 0 on the grid of ``FlowMatching.sample``."""
    if method.integrator not in ("euler", "midpoint", "heun"):
        raise ValueError(f"guided_sample: flow integrator {method.integrator!r} is not supported; "
                         "expected euler, midpoint or heun")
    B = x.shape[0]
    h = -1.0 / n  # dt: time runs from 1 down to 0
    # the network times of FlowMatching.sample: [1, 1 - h/2, 1 - h, ..., 0] * TIME_SCALE
    grid = torch.linspace(1.0, 0.0, 2 * n + 1).mul(TIME_SCALE).to(cond.device)

    def velocity(x: torch.Tensor, j: int) -> torch.Tensor:
        """The guided velocity at grid entry j (t = 1 - j / (2n))."""
        t = 1.0 - j / (2 * n)

        def x0_of_x(x):
            u = net(x, grid[j : j + 1].expand(B), cond).float()
            return u, x - t * u  # x0_hat = x - t u (eq. 3 with t = 1 - tau)

        u, _, g = _vjp(x0_of_x, x, Y, W)
        return u - guidance_weight(1.0 - t, t, max_guidance) * g  # eq. 2 with u = -v

    for i in range(n):
        j = 2 * i  # grid index of the current time
        if method.integrator == "euler":
            x = x + h * velocity(x, j)
        elif method.integrator == "midpoint":
            v = velocity(x, j)
            x = x + h * velocity(x + 0.5 * h * v, j + 1)
        else:  # heun: trapezoid on the Euler prediction (Karras et al. 2022, Alg. 1)
            v = velocity(x, j)
            v_next = velocity(x + h * v, j + 2)
            x = x + 0.5 * h * (v + v_next)
    return x


def _diffusion(method, net, cond, x, Y, W, n, generator, max_guidance):
    """The scheduler's loop (``set_timesteps`` then ``step``) with each model output corrected so
    that its x0 estimate moves by ``b w g`` at fixed ``x``."""
    T = method.num_train_timesteps
    if n > T:
        raise ValueError(f"num_steps={n} is more than the {T} timesteps the schedule was trained with "
                         f"(num_train_timesteps); use at most {T}")
    B = x.shape[0]
    pt = method.prediction_type
    sched = copy.copy(method.scheduler)  # set_timesteps and DPM-Solver's history are per-call state
    sched.set_timesteps(n)
    clip = float(sched.config.clip_sample_range) if getattr(sched.config, "clip_sample", False) else None
    for k in sched.timesteps:
        abar = float(method.alphas_cumprod[int(k)])
        a, b = abar**0.5, (1.0 - abar) ** 0.5
        t_net = torch.full((B,), float(k), device=x.device)
        out, _, g = _vjp(functools.partial(_x0_hat, net, t_net, cond, a, b, pt, clip), x, Y, W)
        w = guidance_weight(a, b, max_guidance)
        # x0_hat moves by b w g at fixed x = a x0 + b eps (a^2 + b^2 = 1): eps - a w g, x0 + b w g, v - w g
        if pt == "epsilon":
            out = out - a * w * g
        elif pt == "sample":
            out = out + b * w * g
        else:
            out = out - w * g
        x = sched.step(out, k, x, generator=generator).prev_sample
    return x


def _x0_hat(net, t_net, cond, a: float, b: float, prediction_type: str, clip: float | None, x: torch.Tensor):
    """``(out, x0_hat)``: the network's output at ``x = a x0 + b eps`` and its x0 estimate."""
    out = net(x, t_net, cond).float()
    if prediction_type == "epsilon":
        x0 = (x - b * out) / a
    elif prediction_type == "sample":
        x0 = out
    else:  # v = a eps - b x0  =>  x0 = a x - b v
        x0 = a * x - b * out
    # the estimate the scheduler acts on: with clip_sample, entries outside the range carry no
    # guidance (near pure noise an epsilon network's x0 = (x - b eps) / a is unreliable)
    return out, (x0 if clip is None else x0.clamp(-clip, clip))


@torch.no_grad()
def predict_guided(policy, obs: dict[str, torch.Tensor], prefix, weights, num_steps: int | None = None,
                   generator: torch.Generator | list | None = None, noise: torch.Tensor | None = None,
                   max_guidance: float = 5.0) -> torch.Tensor:
    """``(B, H, Da)`` raw-unit chunks for observation windows ``obs`` ``{key: (B, To, ...)}``, guided
    toward ``prefix`` ``(B, P, Da)`` (raw actions for chunk indices ``[0, P)``, aligned by time) under
    ``weights`` (``(H,)`` or ``(B, H)``; e.g. ``rtc_weights(H, d, s, start=To - 1)``). ``noise`` is
    in normalized units, as in ``Policy.predict``. Call ``policy.eval()`` first."""
    cond = policy.encode(obs)
    B = cond.shape[0]
    prefix = torch.as_tensor(prefix, dtype=torch.float32).to(cond.device)
    nprefix = policy.normalizer.normalize(policy.action_key, prefix)
    x = guided_sample(policy.method, policy.net, cond, (B, policy.horizon, policy.action_dim), nprefix, weights,
                      num_steps=num_steps, generator=generator, noise=noise, max_guidance=max_guidance)
    return policy.normalizer.unnormalize(policy.action_key, x)
