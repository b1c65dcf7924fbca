"""Mode agreement of consecutive chunks: no prefix, plain replacement, guided inpainting.

    python benchmarks/rtc_modes.py --setting field                        # closed-form 2-mode field
    MUJOCO_GL=egl python benchmarks/rtc_modes.py --setting avoid \\
        --checkpoint runs/avoid/demo_unet_small_ddim --shift 0            # a trained Avoid policy

A chunk ``prev`` is sampled first (the committed one); a second chunk ``new`` is then sampled with
other noise, and is "in agreement" when its mode is the mode of ``prev``. The two chunks are aligned
by time: ``new``'s chunk index ``n`` is ``prev``'s index ``n + shift``, so the prefix handed to
``new`` is ``prev[:, shift : shift + P]`` (chunk indices ``[0, P)``; the first executed action is
index ``To - 1``). Variants:

- ``none``: no prefix (two independent samples: agreement ``p^2 + (1 - p)^2`` for mode weights ``p``);
- ``replace P``: the method's ``prefix`` (the known actions put on their noised path each step);
- ``guided hard P``: :func:`guided_sample` with ``W = 1`` on ``[0, P)``, 0 elsewhere;
- ``guided soft d``: the paper's mask ``rtc_weights(H, d, shift, start=To-1)`` (1 on ``[0, To-1+d)``,
  decaying up to ``H - shift``), the prefix being the whole overlap ``prev[:, shift:]``.

Settings. ``field``: the exact network of a mixture of two Gaussian trajectory modes (left or right
around an obstacle, Avoid's geometry in normalized units), for flow (Euler) and DDIM; the prefix
comes from the sampled ``prev`` (``shift`` is 0: no observation moves). ``avoid``: a trained
policy on ``dp/Avoid-v0`` reset states (test seeds); with ``--shift s`` the first ``s`` actions of
``prev`` are executed in the env before ``new`` is computed from the new observation window.
The mode of a chunk is the side of the obstacle (x) where its last action lies (the field: the
nearer mode mean); the smallest such |offset| is printed to show that the two modes are apart.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch

from diffusion_policy.methods import DiffusionMethod, FlowMatching
from diffusion_policy.methods.guidance import guided_sample, predict_guided, rtc_weights


# ------------------------------------------------------------------- the closed-form field
class TwoModes:
    """``0.5 N(mu_left, s^2 I) + 0.5 N(mu_right, s^2 I)`` over ``(H, 2)`` chunks: x bulges to
    ``-+amp sin(pi u)`` around the obstacle while y runs from -1 to 1 (``u = (i + 1) / H``)."""

    def __init__(self, H: int, amp: float = 0.6, std: float = 0.1):
        u = torch.arange(1, H + 1, dtype=torch.float64) / H
        y = 2 * u - 1
        self.means = torch.stack([torch.stack([side * amp * torch.sin(math.pi * u), y], -1) for side in (-1, 1)])
        self.std = std

    def posterior(self, x: torch.Tensor, a: float, b: float):
        """E[x0 | x], E[eps | x] for ``x = a x0 + b eps`` (Gaussian components, closed form)."""
        var = a * a * self.std**2 + b * b
        diff = x.double()[:, None] - a * self.means[None]  # (B, 2, H, 2)
        r = torch.softmax(-0.5 * (diff**2).sum((2, 3)) / var, dim=1)[:, :, None, None]
        ex0 = (r * (self.means[None] + a * self.std**2 / var * diff)).sum(1)
        return ex0, (r * b / var * diff).sum(1)


class FieldFlowNet(torch.nn.Module):
    def __init__(self, data: TwoModes):
        super().__init__()
        self.data = data

    def forward(self, x, time, cond):
        t = float(time[0]) / 1000.0
        ex0, eeps = self.data.posterior(x, 1.0 - t, t)
        return (eeps - ex0).float()


class FieldEpsNet(torch.nn.Module):
    def __init__(self, data: TwoModes, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.data, self.abar = data, alphas_cumprod

    def forward(self, x, time, cond):
        abar = float(self.abar[int(time[0])])
        return self.data.posterior(x, abar**0.5, (1 - abar) ** 0.5)[1].float()


def field_modes(data: TwoModes, x: torch.Tensor) -> torch.Tensor:
    return ((x.double()[:, None] - data.means[None]) ** 2).sum((2, 3)).argmin(1)


def run_field(args) -> list[tuple]:
    H, To, B = args.horizon, 2, args.samples
    data = TwoModes(H)
    rows = []
    for name, method, net in [
        ("flow euler-10", FlowMatching("beta", "euler", 10), FieldFlowNet(data)),
        ("ddim-10 epsilon", m := DiffusionMethod("ddim", 100, "squaredcos_cap_v2", "epsilon", False, 10),
         FieldEpsNet(data, m.alphas_cumprod)),
    ]:
        cond = torch.zeros(B, 1, 1)
        prev = method.sample(net, cond, (B, H, 2), generator=torch.Generator().manual_seed(args.seed))
        m_prev = field_modes(data, prev)

        def sample(prefix=None, weights=None, seed=args.seed + 1, method=method, net=net, cond=cond):
            g = torch.Generator().manual_seed(seed)
            if weights is None:
                return method.sample(net, cond, (B, H, 2), generator=g, prefix=prefix)
            return guided_sample(method, net, cond, (B, H, 2), prefix, weights, generator=g,
                                 max_guidance=args.max_guidance)

        for label, new in variants(sample, prev, H, To, 0, args):
            rows.append((name, label, float((field_modes(data, new) == m_prev).float().mean()), B))
    # reference: exact conditioning on the first P actions draws the new chunk's mode with the
    # posterior responsibility r_k(prefix) of the two equal-weight components
    for P in args.prefix:
        d2 = ((prev.double()[:, None, :P] - data.means[None, :, :P]) ** 2).sum((2, 3))  # (B, 2)
        r = torch.softmax(-0.5 * d2 / data.std**2, dim=1)
        rows.append(("exact conditional", f"P={P}", float(r.gather(1, m_prev[:, None]).mean()), B))
    return rows


# ------------------------------------------------------------------- the trained Avoid policy
def run_avoid(args) -> list[tuple]:
    from diffusion_policy.checkpoint import load_policy
    from diffusion_policy.collect import make_env
    from diffusion_policy.config import EVAL_SEED_BASE

    policy = load_policy(args.checkpoint)
    H, To, B, s = policy.horizon, policy.n_obs_steps, args.samples, args.shift
    task = policy.task_cfg
    envs, frames = [], []
    for i in range(B):
        env = make_env(task.env_id, dict(task.env_kwargs), task.max_episode_steps)
        obs, _ = env.reset(seed=EVAL_SEED_BASE + args.seed + i)
        envs.append(env)
        frames.append([obs["state"].copy()] * To)  # the first window repeats the first frame
    obstacle_x = torch.tensor(np.array([f[-1][4] for f in frames]))  # state: agent, goal, obstacle (x, y)

    def window():
        return {"state": torch.tensor(np.array([f[-To:] for f in frames]), dtype=torch.float32)}

    def mode(chunk):  # the side of the obstacle where the chunk's last action lies
        return (chunk[:, -1, 0] - obstacle_x > 0).long()

    obs0 = window()
    prev = policy.predict(obs0, generator=torch.Generator().manual_seed(args.seed))
    for step in range(s):  # execute prev's first s actions (chunk indices To-1 ...)
        for i, env in enumerate(envs):
            o, *_ = env.step(prev[i, To - 1 + step].numpy())
            frames[i].append(o["state"].copy())
    obs = window()
    m_prev = mode(prev)
    offsets = (prev[:, -1, 0] - obstacle_x).abs()
    print(f"avoid: prev chunks ending right of the obstacle: {float(m_prev.float().mean()):.2f}; smallest "
          f"|x_last - x_obstacle| = {float(offsets.min()):.3f} m (median {float(offsets.median()):.3f})")

    def sample(prefix=None, weights=None, seed=args.seed + 1):
        g = torch.Generator().manual_seed(seed)
        if weights is None:
            return policy.predict(obs, generator=g, prefix=prefix)
        return predict_guided(policy, obs, prefix, weights, generator=g, max_guidance=args.max_guidance)

    name = f"avoid {policy.method_cfg.scheduler if policy.method_cfg.name == 'diffusion' else 'flow'}-" \
           f"{policy.method.num_inference_steps} shift {s}"
    rows = [(name, label, float((mode(new) == m_prev).float().mean()), B)
            for label, new in variants(sample, prev, H, To, s, args)]
    for env in envs:
        env.close()
    # cost of one chunk at batch 1 (2 CPU cores shared with other work: indicative only)
    one = {k: v[:1] for k, v in obs.items()}
    for label, fn in [("predict", lambda: policy.predict(one)),
                      ("predict_guided", lambda: predict_guided(policy, one, prev[:1, s:], rtc_weights(
                          H, 1, s, start=To - 1)))]:
        fn()
        t0 = time.perf_counter()
        for _ in range(args.time_reps):
            fn()
        print(f"{label}: {1000 * (time.perf_counter() - t0) / args.time_reps:.1f} ms per chunk at batch 1")
    return rows


def variants(sample, prev, H: int, To: int, shift: int, args):
    """(label, new chunk) for every variant of the module docstring."""
    yield "none", sample()
    for P in args.prefix:
        yield f"replace P={P}", sample(prefix=prev[:, shift : shift + P])
    for P in args.prefix:
        w = torch.zeros(H)
        w[:P] = 1.0
        yield f"guided hard P={P}", sample(prefix=prev[:, shift : shift + P], weights=w)
    for d in args.delay:
        w = rtc_weights(H, d, shift, start=To - 1)
        yield f"guided soft d={d} (W=1 on [0,{To - 1 + d}))", sample(prefix=prev[:, shift:], weights=w)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=("field", "avoid"), default="field")
    p.add_argument("--checkpoint", default="runs/avoid/demo_unet_small_ddim")
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--horizon", type=int, default=16, help="field only (Avoid: the policy's)")
    p.add_argument("--shift", type=int, default=0, help="avoid only: actions of prev executed before new")
    p.add_argument("--prefix", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--delay", type=int, nargs="+", default=[1, 3])
    p.add_argument("--max-guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-reps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.time()
    rows = run_field(args) if args.setting == "field" else run_avoid(args)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {time.time() - t0:.0f} s")
    print("| setting | variant | mode agreement | 95% CI | samples |\n|---|---|---|---|---|")
    for name, label, agree, n in rows:
        lo, hi = wilson(agree, n)
        print(f"| {name} | {label} | {agree:.3f} | {lo:.2f}-{hi:.2f} | {n} |")


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` over ``n`` trials."""
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return c - h, c + h


if __name__ == "__main__":
    main()
