"""Deploy-loop benchmark: success against injected inference latency for the naive loop, the
asynchronous loop with timestamps, and asynchronous + real-time chunking; and the loop's latency
(observation to first command) and rate with measured inference. Results: benchmarks/deploy.md.

    python benchmarks/deploy.py success --task avoid --checkpoint runs/avoid/<run> --episodes 50
    python benchmarks/deploy.py success --task pusht_v0 --checkpoint runs/pusht/<run> --episodes 50
    python benchmarks/deploy.py loop --checkpoint runs/avoid/<run> [--url ws://127.0.0.1:8765]
    python benchmarks/deploy.py plot benchmarks/deploy_avoid.json benchmarks/deploy_pusht_v0.json

``success`` runs every (latency, loop) point on the simulated clock: the robot's virtual time
advances only with the loop, the inference latency is exact (``Latency(L)``; the computation takes
no virtual time), so a point's episodes are a function of the checkpoint, the seeds and ``L``.
Episode ``i`` of every point uses env seed ``EVAL_SEED_BASE + i`` and a sampler generator seeded
with it (dp-eval's seeds). Observation and actuation latency are 0 and so is the margin (it
covers actuation latency), so at 0 ms all three loops run dp-eval's episodes exactly except RTC,
whose guidance also acts at d = 0. ``--jobs 2`` runs the points in two processes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

LOOPS = {"naive": ("sync", "none"), "async": ("async", "none"), "async+rtc": ("async", "rtc")}


def run_point(checkpoint: str, task: str, latency_ms: float, loop_name: str, episodes: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from diffusion_policy.checkpoint import load_policy
    from diffusion_policy.config import EVAL_SEED_BASE
    from diffusion_policy.control.clock import SimClock
    from diffusion_policy.control.realtime import RealtimeLoop
    from diffusion_policy.control.safety import Safety
    from diffusion_policy.control.sim_robot import SimRobot
    from diffusion_policy.control.worker import Latency
    from diffusion_policy.deploy import _task_named

    policy = load_policy(checkpoint)
    task_cfg = _task_named(task) if task != policy.task_cfg.name else policy.task_cfg
    clock = SimClock()
    robot = SimRobot(task_cfg, clock)
    safety = Safety(robot.action_space.low, robot.action_space.high)
    mode, transition = LOOPS[loop_name]
    loop = RealtimeLoop(policy, robot, clock, safety, mode=mode, transition=transition, action_margin=0.0,
                        latency=Latency(latency_ms / 1e3))
    recs, t0 = [], time.time()
    for i in range(episodes):
        seed = EVAL_SEED_BASE + i
        rec, _ = loop.run_episode(task_cfg.max_episode_steps, seed=seed,
                                  generator=torch.Generator().manual_seed(seed))
        recs.append({k: rec[k] for k in ("success", "max_reward", "steps", "chunks", "dropped_actions",
                                         "held_steps", "late_waypoints")})
    robot.close()
    return {"task": task, "latency_ms": latency_ms, "loop": loop_name, "episodes": episodes,
            "successes": int(sum(r["success"] for r in recs)),
            "mean_max_reward": float(np.mean([r["max_reward"] for r in recs])),
            "dropped_per_episode": float(np.mean([r["dropped_actions"] for r in recs])),
            "held_per_episode": float(np.mean([r["held_steps"] for r in recs])),
            "late_waypoints": int(sum(r["late_waypoints"] for r in recs)),
            "mean_steps": float(np.mean([r["steps"] for r in recs])), "seconds": time.time() - t0,
            "compute_ms_p50": float(np.median(loop.controller.latencies_ms)) if loop.controller.latencies_ms else None}


def success(args) -> None:
    from diffusion_policy.report import wilson_interval

    points = [(lat, name) for lat in args.latencies for name in args.loops]
    out = Path(args.out or f"benchmarks/deploy_{args.task}.json")
    done = json.loads(out.read_text()) if out.exists() else []
    have = {(p["latency_ms"], p["loop"]) for p in done if p["episodes"] == args.episodes}
    todo = [p for p in points if p not in have]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_point, args.checkpoint, args.task, lat, name, args.episodes) for lat, name in todo]
        for f in futures:
            r = f.result()
            r["success_ci"] = list(wilson_interval(r["successes"], r["episodes"]))
            done = [p for p in done if (p["latency_ms"], p["loop"]) != (r["latency_ms"], r["loop"])] + [r]
            out.write_text(json.dumps(sorted(done, key=lambda p: (p["latency_ms"], p["loop"])), indent=1))
            print(f"{r['task']} {r['latency_ms']:.0f} ms {r['loop']}: {r['successes']}/{r['episodes']} "
                  f"reward {r['mean_max_reward']:.3f} dropped/ep {r['dropped_per_episode']:.1f} "
                  f"({r['seconds']:.0f} s)", flush=True)


def loop_latency(args) -> None:
    """Wall clock, measured inference: observation -> first command, and the achieved rate."""
    from diffusion_policy.deploy import compose_deploy, deploy

    rows = []
    configs = [("local eager", ["inference=eager"]), ("local compiled", ["inference=compile"])]
    if args.only:
        configs = [c for c in configs if c[0] in args.only.split(",")]
    if args.url:
        configs.append(("dp-serve loopback", ["policy=remote", f"url={args.url}", f"task={args.task}"]))
    for name, extra in configs:
        ck = [] if "policy=remote" in extra else [f"checkpoint={args.checkpoint}"]
        s = deploy(compose_deploy(ck + extra + ["clock=wall", f"episodes={args.episodes}", "status_every_s=0",
                                                f"max_steps={args.max_steps}", f"out=/tmp/deploy_bench/{len(rows)}"]))
        rows.append({"config": name, "episodes": s["episodes"], "steps": s["steps"], "rate_hz": s["rate_hz_mean"],
                     "inference_ms": s["inference_latency_ms"], "loop_latency_ms": s["loop_latency_ms"],
                     "late_waypoints": s["late_waypoints"], "dropped": s["dropped_actions"]})
        print(rows[-1], flush=True)
    out = Path(args.out or "benchmarks/deploy_loop.json")
    out.write_text(json.dumps(rows, indent=1))


def plot(args) -> None:
    """Success against latency, one panel per file, 95% Wilson intervals as bars (PIL: no
    plotting library needed)."""
    from PIL import Image, ImageDraw

    colors = {"naive": (200, 80, 60), "async": (60, 110, 200), "async+rtc": (40, 150, 80)}
    files = [json.loads(Path(f).read_text()) for f in args.files]
    W, H, L, R, T, B = 520, 360, 52, 14, 30, 46
    img = Image.new("RGB", (W * len(files), H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for panel, pts in enumerate(files):
        ox = panel * W
        lats = sorted({q["latency_ms"] for q in pts})
        pw, ph = W - L - R, H - T - B
        n = len(lats)

        def xy(i, v, k=0, ox=ox, pw=pw, ph=ph, n=n):
            return ox + L + pw * (i + 0.5) / n + 6 * (k - 1), T + ph * (1 - v)

        for frac in (0, 0.25, 0.5, 0.75, 1.0):
            y = T + ph * (1 - frac)
            d.line((ox + L, y, ox + L + pw, y), fill=(225, 225, 225))
            d.text((ox + 8, y - 6), f"{frac:.2f}", fill=(60, 60, 60))
        d.rectangle((ox + L, T, ox + L + pw, T + ph), outline=(0, 0, 0))
        d.text((ox + L, 8), f"{pts[0]['task']}: success ({pts[0]['episodes']} episodes a point, 95% CI)",
               fill=(0, 0, 0))
        for i, lat in enumerate(lats):
            x, _ = xy(i, 0)
            d.text((x - 14, T + ph + 6), f"{lat:.0f} ms", fill=(60, 60, 60))
        d.text((ox + L + pw / 2 - 80, H - 18), "injected inference latency", fill=(60, 60, 60))
        for k, name in enumerate(LOOPS):
            p = {q["latency_ms"]: q for q in pts if q["loop"] == name}
            line = []
            for i, lat in enumerate(lats):
                if lat not in p:
                    continue
                q = p[lat]
                x, y = xy(i, q["successes"] / q["episodes"], k)
                lo, hi = q["success_ci"]
                d.line((x, xy(i, lo)[1], x, xy(i, hi)[1]), fill=colors[name], width=1)
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colors[name])
                line.append((x, y))
            if len(line) > 1:
                d.line(line, fill=colors[name], width=2)
            d.text((ox + L + 8, T + ph - 16 - 14 * (2 - k)), name, fill=colors[name])
    img.save(args.out or "benchmarks/deploy.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("success")
    s.add_argument("--task", required=True)
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--episodes", type=int, default=50)
    s.add_argument("--latencies", type=lambda v: [float(x) for x in v.split(",")], default=[0, 50, 100, 200])
    s.add_argument("--loops", type=lambda v: v.split(","), default=list(LOOPS))
    s.add_argument("--jobs", type=int, default=1)
    s.add_argument("--out", default="")
    lo = sub.add_parser("loop")
    lo.add_argument("--checkpoint", required=True)
    lo.add_argument("--task", default="avoid")
    lo.add_argument("--url", default="")
    lo.add_argument("--episodes", type=int, default=3)
    lo.add_argument("--max-steps", type=int, default=60)
    lo.add_argument("--only", default="", help="comma-separated configs: local eager, local compiled")
    lo.add_argument("--out", default="")
    p = sub.add_parser("plot")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default="")
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    {"success": success, "loop": loop_latency, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
