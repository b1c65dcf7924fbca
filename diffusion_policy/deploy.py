"""``dp-deploy``: a policy in the real-time loop on a robot, every cycle logged.

    dp-deploy checkpoint=runs/avoid/<run> robot=sim task=avoid frequency=10
    dp-deploy checkpoint=runs/avoid/<run> clock=sim episodes=50 inference_latency_ms=100 transition=rtc
    dp-deploy checkpoint=runs/pusht/<run> obs_latency_ms=30 act_latency_ms=10 max_delta=0.05
    dp-deploy policy=remote url=ws://gpu-box:8765 token=... task=avoid      # policy served by dp-serve

The loop (diffusion_policy/control/realtime.py) reuses the receding-horizon controller of
``dp-eval``; inference runs while the robot executes (``mode=async``), actions are stamped
``obs_time + i * dt`` and dropped once due, chunks take over by ``transition`` (``rtc``: real-time
chunking), and a safety layer sits between policy and robot (control/safety.py). ``robot=sim`` is
the task's simulated robot with injectable latencies; ``clock=sim`` runs it in virtual time
(exact and fast: benchmarks, tests). A real robot is an adapter of ``control/robot.py``'s protocol
passed to :func:`deploy` (``robot=`` the object).

Output (``out``, default ``rollouts/deploy/<task>/<checkpoint>``): ``episodes.zarr`` in the
demonstration format (observation keys, ``action`` = what was executed, plus ``commanded_action``,
``sent_action``, ``timestamp``, ``inference_ms``, ``held``, ``safety_events``, ``dropped``,
``episode_seed``; written like ``dp-collect``: data first, ``episode_ends`` last, so a killed run
leaves a store with its finished episodes), ``episodes.jsonl`` (one record per episode),
``events.jsonl`` (every safety intervention) and ``summary.json``. ``dp-data validate`` reads the
store and ``dp-train data=<out>/episodes.zarr`` trains on it. Ctrl-C or SIGTERM stops the robot,
logs the interrupted episode and exits with status 130.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np

from diffusion_policy.checkpoint import CheckpointError, load_policy, resolve_checkpoint
from diffusion_policy.config import EVAL_SEED_BASE, SEED_RANGE, ConfigError, DeployConfig, TaskConfig, as_dict, typed
from diffusion_policy.control.clock import make_clock
from diffusion_policy.control.realtime import MODES, TRANSITIONS, RealtimeLoop
from diffusion_policy.control.safety import Safety
from diffusion_policy.control.worker import Latency

INFERENCE = ("auto", "eager", "compile", "fast")


class DeployError(RuntimeError):
    """A bad option, checkpoint or robot; the message says which and what was expected."""


def check(cfg: DeployConfig) -> None:
    """Options checked before anything is loaded (one line naming the key)."""
    choices = {"policy_source": ("local", "remote"), "clock": ("wall", "sim"), "mode": MODES,
               "transition": TRANSITIONS, "inference": INFERENCE}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not allowed; expected one of {', '.join(allowed)}")
    if isinstance(cfg.robot, str) and cfg.robot != "sim":
        raise ConfigError(f"robot={cfg.robot!r}: only robot=sim is built in; a real robot is an adapter of the "
                          f"Robot protocol (diffusion_policy/control/robot.py) passed to deploy(cfg, robot=...)")
    if cfg.policy_source == "local" and not cfg.checkpoint:
        raise ConfigError("checkpoint= is required with policy=local (a run, checkpoint or policy directory)")
    if cfg.episodes < 1 or not 0 <= cfg.seed <= SEED_RANGE - cfg.episodes:
        raise ConfigError(f"episodes={cfg.episodes}, seed={cfg.seed}: need episodes >= 1 and seed + episodes "
                          f"within the evaluation seed range of {SEED_RANGE}")
    if cfg.mode == "sync" and cfg.transition in ("replace", "rtc"):
        raise ConfigError(f"transition={cfg.transition} needs mode=async (the naive loop commits nothing "
                          f"while it predicts)")
    for key in ("obs_jitter_ms", "act_latency_ms", "act_jitter_ms", "inference_jitter_ms", "action_margin_s"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 0")
    if cfg.inference_latency_ms is not None and cfg.inference_latency_ms < 0:
        raise ConfigError(f"inference_latency_ms={cfg.inference_latency_ms} must be >= 0 (or null)")
    if cfg.frequency < 0:
        raise ConfigError(f"frequency={cfg.frequency} must be > 0 Hz, or 0 for the task's fps")


def build_predictor(policy, inference: str):
    """What runs ``predict``: the policy (``eager``), or a FastPredictor (``compile``; ``fast`` =
    bf16 + fused + CUDA graph on CUDA). ``auto``: ``fast`` on CUDA, ``compile`` on a CPU."""
    from diffusion_policy.inference import FastPredictor

    cuda = policy.device.type == "cuda"
    if inference == "auto":
        inference = "fast" if cuda else "compile"
    if inference == "eager":
        return policy
    if inference == "compile":
        return FastPredictor(policy, compile=True)
    if not cuda:
        raise DeployError("inference=fast needs a CUDA device (FastPredictor's fused kernels and CUDA graphs); "
                          "use inference=compile or eager on a CPU")
    return FastPredictor(policy, dtype="bf16", fused=FastPredictor.can_fuse(policy))


def warm_up(predictor, policy, num_steps, device) -> float:
    """One chunk from a zero window before the robot moves: compilation (tens of seconds on a CPU)
    and graph capture happen here, not inside the watchdog's deadline. Returns its seconds."""
    import torch

    t0 = time.perf_counter()
    obs = {k: torch.zeros((1, policy.n_obs_steps, *policy.shapes[k]),
                          dtype=torch.uint8 if k in policy.image_keys else torch.float32, device=device)
           for k in policy.obs_keys}
    with torch.inference_mode():
        predictor.predict(obs, num_steps=num_steps)
    return time.perf_counter() - t0


def _task_named(name: str) -> TaskConfig:
    from diffusion_policy.config import compose

    return compose("deploy", [f"task={name}"]).task


def _load(cfg: DeployConfig, device):
    """(policy object, TaskConfig, label)."""
    if cfg.policy_source == "remote":
        from diffusion_policy.serving.client import RemotePolicy

        token = cfg.token or os.environ.get("DP_SERVE_TOKEN") or None
        policy = RemotePolicy(cfg.url, token=token, timeout_s=cfg.timeout_s, seed=EVAL_SEED_BASE + cfg.seed)
        task = (typed(TaskConfig, as_dict(cfg.task)) if cfg.task is not None
                else _task_named(policy.metadata["task"]))
        return policy, task, f"remote-{policy.metadata['task']}"
    policy_dir = resolve_checkpoint(cfg.checkpoint)
    policy = load_policy(policy_dir, device=device)
    task = typed(TaskConfig, as_dict(cfg.task)) if cfg.task is not None else policy.task_cfg
    parts = policy_dir.resolve().parts
    label = f"{parts[-4]}-{parts[-2]}" if len(parts) >= 4 and parts[-3] == "checkpoints" else policy_dir.name
    return policy, task, label


def _percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    v = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def _ms(x: float | None) -> str:
    """A latency figure for the status line and the summary ("-" before the first chunk)."""
    return "-" if x is None else f"{x:.1f}"


def status_line(ep: int, loop: RealtimeLoop, totals: dict) -> str:
    lat = _percentiles([c["latency_s"] * 1e3 for c in loop.chunks] + totals["inference_ms"])
    ticks = loop.tick_times
    rate = (len(ticks) - 1) / (ticks[-1] - ticks[0]) if len(ticks) > 1 and ticks[-1] > ticks[0] else 0.0
    return (f"dp-deploy ep {ep} tick {loop.ticks} | rate {rate:.1f} Hz | inference p50 "
            f"{_ms(lat['p50'])} ms p99 {_ms(lat['p99'])} ms | dropped {totals['dropped'] + loop.dropped} | safety "
            f"{totals['interventions'] + loop.safety.interventions} | holds {loop.safety.counts['hold']}")


def deploy(cfg: DeployConfig, robot=None, clock=None) -> dict:
    """Run ``cfg.episodes`` episodes; returns the summary (also written to ``summary.json``).
    ``robot``/``clock``: a Robot adapter and its clock instead of ``robot=sim``."""
    import torch

    from diffusion_policy.data.store import EpisodeStore
    from diffusion_policy.distributed import resolve_device

    check(cfg)
    device = resolve_device(cfg.device)
    policy, task, label = _load(cfg, device)
    clock = clock or make_clock(cfg.clock)
    owns_robot = robot is None
    if owns_robot:
        from diffusion_policy.control.sim_robot import SimRobot

        lat = cfg.obs_latency_ms
        lat = {k: float(v) / 1e3 for k, v in as_dict(lat).items()} if not isinstance(lat, (int, float)) else lat / 1e3
        try:
            robot = SimRobot(task, clock, rate_hz=cfg.sim_rate_hz, obs_latency=lat, obs_jitter=cfg.obs_jitter_ms / 1e3,
                             act_latency=cfg.act_latency_ms / 1e3, act_jitter=cfg.act_jitter_ms / 1e3, seed=cfg.seed)
        except ValueError as e:
            raise DeployError(str(e)) from None
    from diffusion_policy.rollout import check_compatible

    check_compatible(label, task, policy.obs_keys, getattr(policy, "shapes", None), robot.observation_space)
    space = robot.action_space
    safety = Safety(space.low, space.high, max_delta=cfg.max_delta, workspace_low=cfg.workspace_low,
                    workspace_high=cfg.workspace_high, obs_deadline=cfg.obs_deadline_s,
                    chunk_deadline=cfg.chunk_deadline_s, max_faults=cfg.max_faults)
    predictor = policy if cfg.policy_source == "remote" else build_predictor(policy, cfg.inference)
    if predictor is not policy:
        warm_up(predictor, policy, cfg.num_inference_steps, device)
    latency = None
    if cfg.inference_latency_ms is not None or cfg.inference_jitter_ms:
        latency = Latency((cfg.inference_latency_ms or 0.0) / 1e3, cfg.inference_jitter_ms / 1e3, seed=cfg.seed)
    out = Path(cfg.out or f"rollouts/deploy/{task.name}/{label}")
    out.mkdir(parents=True, exist_ok=True)
    store = EpisodeStore.create(out / "episodes.zarr", exist_ok=True)
    _record_provenance(out / "episodes.zarr", task, label, cfg)
    max_steps = cfg.max_steps or task.max_episode_steps
    last_status = [-1e9]
    totals = {"dropped": 0, "interventions": 0, "inference_ms": []}
    tty = sys.stderr.isatty()

    def on_tick(lp):
        now = lp.clock.now()
        if cfg.status_every_s > 0 and now - last_status[0] >= cfg.status_every_s:
            last_status[0] = now
            print(("\r" if tty else "") + status_line(ep, lp, totals), end="" if tty else "\n",
                  file=sys.stderr, flush=True)

    try:
        loop = RealtimeLoop(predictor, robot, clock, safety, mode=cfg.mode, transition=cfg.transition,
                            frequency=cfg.frequency or None, replan_every=cfg.replan_every,
                            action_margin=cfg.action_margin_s, ensemble_k=cfg.ensemble_k,
                            num_inference_steps=cfg.num_inference_steps, latency=latency, device=device,
                            max_guidance=cfg.max_guidance, on_tick=on_tick)
    except ValueError as e:
        raise DeployError(str(e)) from None
    records, t_start, ep = [], time.time(), 0
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt  # stops the loop as Ctrl-C does: robot stopped, episode logged

    in_main = hasattr(signal, "SIGTERM") and _main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, on_sigterm)
    interrupted = False
    try:
        with open(out / "episodes.jsonl", "a") as f_ep, open(out / "events.jsonl", "a") as f_ev:
            for ep in range(cfg.episodes):
                seed = EVAL_SEED_BASE + cfg.seed + ep
                gen = None if cfg.policy_source == "remote" else torch.Generator(device=device).manual_seed(seed)
                n_events = len(safety.events)
                try:
                    rec, rows = loop.run_episode(max_steps, seed=seed, generator=gen)
                except KeyboardInterrupt:
                    interrupted = True
                    rec, rows = loop.record(max_steps), loop.rows(max_steps)
                rec.update(episode=ep, seed=seed)
                if rows:
                    rows["episode_seed"] = np.full(len(rows["action"]), seed, np.int64)
                    store.add_episode(rows)  # data first, episode_ends last (crash-safe)
                records.append(rec)
                f_ep.write(json.dumps(rec) + "\n")
                for t, kind, detail, count in safety.events[n_events:]:
                    f_ev.write(json.dumps({"episode": ep, "t": t, "kind": kind, "count": count,
                                           "detail": detail}) + "\n")
                f_ep.flush()
                f_ev.flush()
                totals["dropped"] += rec["dropped_actions"]
                totals["interventions"] = safety.interventions
                totals["inference_ms"] += rec["inference_ms"]
                if interrupted or rec["stop_reason"] == "safety":
                    break
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        robot.stop()
        if owns_robot:
            robot.close()
        if cfg.policy_source == "remote":
            policy.close()
    if tty and cfg.status_every_s > 0:
        print(file=sys.stderr)
    summary = summarize(records, cfg, task, label, out, time.time() - t_start, safety)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(summary_text(summary), flush=True)
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _record_provenance(path: Path, task: TaskConfig, label: str, cfg: DeployConfig) -> None:
    """Root attributes as dp-collect writes them (env id first: dp-train checks it), so a
    deployment log trains like demonstrations; appending to a log of another env is refused."""
    import zarr

    group = zarr.open_group(zarr.storage.LocalStore(path), mode="r+")
    have = group.attrs.get("env_id")
    if have is not None and have != task.env_id:
        raise DeployError(f"{path}: holds episodes of {have}, this run deploys on {task.env_id}; use another out=")
    group.attrs.update({"env_id": task.env_id, "env_kwargs": dict(task.env_kwargs), "task": task.name,
                        "source": "dp-deploy", "checkpoint": label, "mode": cfg.mode, "transition": cfg.transition,
                        "action": "the action executed by the robot (commanded_action: the policy's plan)"})


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def summarize(records, cfg, task, label, out, seconds, safety) -> dict:
    from diffusion_policy.report import wilson_interval

    n = len(records)
    wins = sum(r["success"] for r in records)
    inf = [x for r in records for x in r["inference_ms"]]
    loop = [x for r in records for x in r["loop_latency_ms"]]
    rates = [r["rate_hz"] for r in records if r["rate_hz"]]
    return {"task": task.name, "label": label, "episodes": n, "success_rate": wins / n if n else None,
            "success_ci": list(wilson_interval(wins, n)) if n else None, "mode": cfg.mode,
            "transition": cfg.transition, "clock": cfg.clock, "frequency": cfg.frequency or task.fps,
            "inference_latency_ms": _percentiles(inf), "loop_latency_ms": _percentiles(loop),
            "rate_hz_mean": float(np.mean(rates)) if rates else None,
            "dropped_actions": sum(r["dropped_actions"] for r in records),
            "late_waypoints": sum(r["late_waypoints"] for r in records),
            "held_steps": sum(r["held_steps"] for r in records), "safety": dict(safety.counts),
            "stopped_by_safety": sum(r["stop_reason"] == "safety" for r in records),
            "steps": sum(r["steps"] for r in records), "seconds": seconds, "out": str(out)}


def summary_text(s: dict) -> str:
    lo, hi = s["success_ci"] or (0, 0)
    return (f"dp-deploy: {s['task']} {s['label']} ({s['mode']}, {s['transition']}, clock={s['clock']}): success "
            f"{s['success_rate']:.2f} (95% CI {lo:.2f}-{hi:.2f}) over {s['episodes']} episodes | rate "
            f"{_ms(s['rate_hz_mean'])} Hz | inference p50 {_ms(s['inference_latency_ms']['p50'])} ms p99 "
            f"{_ms(s['inference_latency_ms']['p99'])} ms | obs->command p50 {_ms(s['loop_latency_ms']['p50'])} ms | "
            f"dropped {s['dropped_actions']} | late {s['late_waypoints']} | held steps {s['held_steps']} | safety "
            f"{sum(v for k, v in s['safety'].items() if k not in ('hold', 'stop'))} interventions, "
            f"{s['safety']['hold']} holds, {s['safety']['stop']} stops | log {s['out']}/episodes.zarr")


def overrides(argv) -> list[str]:
    """``policy=local|remote`` -> ``policy_source=...`` (``policy`` is also a config group's name)."""
    return [re.sub(r"^policy=(local|remote)$", r"policy_source=\1", a) for a in argv]


def compose_deploy(argv=()) -> DeployConfig:
    """``configs/deploy.yaml`` with command-line overrides, as ``dp-deploy`` reads them."""
    from diffusion_policy.config import compose

    return compose("deploy", overrides(argv))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``dp-deploy key=value ...`` (hydra overrides on configs/deploy.yaml)."""
    from diffusion_policy.config import run_cli

    argv = overrides(sys.argv[1:] if argv is None else argv)
    from diffusion_policy.data.store import StoreError
    from diffusion_policy.rollout import EvalError

    return run_cli("dp-deploy", "deploy", deploy, argv, __doc__,
                   errors=(DeployError, CheckpointError, StoreError, EvalError),
                   interrupted="the robot was stopped and the episode logged")


if __name__ == "__main__":
    sys.exit(main())
