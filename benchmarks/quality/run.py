"""Policy quality table: collect, train, select, evaluate; one row or all, resumable across calls.

    python benchmarks/quality/run.py --list                       # the rows and what each tests
    python benchmarks/quality/run.py pusht_kp_ddim10              # one row, training seed 0
    python benchmarks/quality/run.py pusht_kp_ddim10 --seeds 0 1 2 --budget-min 9
    python benchmarks/quality/run.py all --budget-min 9           # every row, in table order
    python benchmarks/quality/run.py pusht_kp_ddim10 --background # detached; log under runs/quality/
    python benchmarks/quality/run.py --table                      # the results table from the JSONs

A row is a task, a demonstration set, a policy, a method and a training budget. Its stages, each
skipped when already done, so that the next call continues where the last one stopped:

1. collect: ``dp-collect`` (``--workers`` processes) into ``data/quality/<data>.zarr``; rows with
   the same task, demo count and DART settings share a store. ``dp-collect`` appends up to the count.
2. train: ``dp-train`` into ``runs/quality/<row>/seed<k>``, ``resume=true`` once a checkpoint
   exists. Every ``eval_every`` steps dp-train rolls the EMA policy out on ``eval_episodes`` seeds of
   the *selection* range (``SELECT_SEED_BASE``) and keeps the best checkpoint by (success, mean max
   coverage) as ``checkpoints/best``: the checkpoint rule; the test seeds are never seen. With
   ``--budget-min`` the training process is interrupted (SIGINT) when the call's budget is spent;
   the next call resumes from the last checkpoint (``checkpoint_every`` steps). Training minutes are
   the wall clock of the training processes summed over calls (selection rollouts included).
3. eval: ``dp-eval`` of ``checkpoints/best`` on ``--episodes`` (100) seeds of the *test* range
   (``EVAL_SEED_BASE``), with the row's sampler; success = coverage >= 0.95 for Push-T, with its
   95% Wilson interval (diffusion_policy/report.py).
4. result: ``benchmarks/quality/results/<row>_seed<k>.json`` with the commit, env id (task
   version), demo count, steps, batch, minutes, checkpoint rule and the test metrics.

Nothing here changes a default of the package: a row is the command lines it prints.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "quality" / "results"
DATA, RUNS, ROLLOUTS = REPO / "data" / "quality", REPO / "runs" / "quality", REPO / "rollouts" / "quality"
SMOKE = dict(demos=3, steps=20, batch_size=16, eval_every=10, eval_episodes=1)  # --smoke: the plumbing only


@dataclass
class Row:
    name: str
    task: str
    """configs/task/<task>.yaml (its env_id is the task version recorded in the result)."""
    hypothesis: str
    """What the row measures, in a few words."""
    demos: int = 200
    policy: str = "unet"
    method: str = "ddim"
    steps: int = 30_000
    batch_size: int = 256
    lr: float = 1e-4
    eval_every: int = 2500
    """Selection rollouts (and a checkpoint) every this many steps."""
    eval_episodes: int = 50
    """Selection seeds per selection rollout."""
    num_inference_steps: int | None = None
    """dp-eval's sampler steps (None: the method config's)."""
    dart_noise: float = 0.0
    dart_episodes: float = 1.0
    expert_only: bool = False
    """Evaluate the task's scripted expert (no collect or train)."""
    train_overrides: list = field(default_factory=list)

    @property
    def data_name(self) -> str:
        dart = f"_dart{self.dart_noise:g}x{self.dart_episodes:g}" if self.dart_noise > 0 else ""
        return f"{self.task}_{self.demos}{dart}"


ROWS = [
    Row("pusht_expert", "pusht", "the scripted expert on dp/PushT-v1 (the ceiling)", expert_only=True),
    Row("pusht_kp_ddim10", "pusht", "headline: keypoints, UNet, DDIM 10 steps, 200 clean demos, walls"),
    Row("pusht_kp_ddim10_v0", "pusht_v0", "walls vs no walls: the same row on dp/PushT-v0"),
    Row("pusht_kp_ddim10_dart", "pusht", "recovery data: DART noise 0.02 on half of 200 demos",
        dart_noise=0.02, dart_episodes=0.5),
    Row("pusht_kp_ddim10_500", "pusht", "more data: 500 clean demos", demos=500),
    Row("pusht_kp_ddpm100", "pusht", "sampler: DDPM 100 steps (Chi et al.'s simulation setting)", method="ddpm"),
    Row("pusht_kp_flow10", "pusht", "sampler: flow matching, 10 Euler steps", method="flow"),
    Row("pusht_kp_dpmsolver10", "pusht", "sampler: DPM-Solver++ 10 steps", method="dpmsolver"),
    Row("pusht_mlp", "pusht", "baseline: MLP regression (behaviour cloning)", policy="mlp", method="regression"),
    Row("pusht_image_ddim10", "pusht_image", "headline: 96x96 image, ResNet-18 + UNet, DDIM 10",
        policy="unet_image", batch_size=64, steps=15_000),
    Row("pusht_image_ddim10_dart", "pusht_image", "image with DART noise 0.02 on half of 200 demos",
        policy="unet_image", batch_size=64, steps=15_000, dart_noise=0.02, dart_episodes=0.5),
    Row("avoid_ddim10", "avoid", "bimodal routes: both used in 35-65% of episodes", steps=5000),
    Row("avoid_mlp", "avoid", "baseline: the MLP averages the two routes", policy="mlp", method="regression",
        steps=5000),
    Row("pickplace_ddim10", "pickplace", "PickPlace, state", steps=20_000),
    Row("pickplace_image_ddim10", "pickplace_image", "PickPlace, two cameras", policy="unet_image",
        batch_size=64, steps=15_000),
] + [Row(f"{t}_ddim10", t, f"MetaWorld {t[10:].replace('_', '-')}, state, 50 demos", demos=50, steps=20_000)
     for t in ("metaworld_push", "metaworld_pick_place", "metaworld_door_open", "metaworld_drawer_open",
               "metaworld_button_press")]
BY_NAME = {r.name: r for r in ROWS}


# ------------------------------------------------------------------------------------ helpers
def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "HEAD")
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def run(cmd: list[str], log: Path, budget_s: float | None = None) -> tuple[int, float]:
    """Run ``cmd`` (its output appended to ``log`` and echoed); SIGINT it when ``budget_s`` is
    spent. Returns (exit code, seconds)."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # dp-train stops; the last checkpoint stays
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return proc.returncode, time.perf_counter() - t0


def entry(module: str) -> list[str]:
    return [sys.executable, "-m", f"diffusion_policy.{module}"]


def read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.exists() else default


def env_id_of(task: str) -> str:
    from diffusion_policy.config import compose

    return compose("collect", [f"task={task}", "out=unused"]).task.env_id


# ------------------------------------------------------------------------------------- stages
def collect(row: Row, workers: int, log: Path) -> Path:
    out = DATA / f"{row.data_name}.zarr"
    cmd = entry("collect") + [f"task={row.task}", f"episodes={row.demos}", f"out={out}", f"workers={workers}"]
    if row.dart_noise > 0:
        cmd += [f"dart_noise={row.dart_noise}", f"dart_episodes={row.dart_episodes}"]
    code, _ = run(cmd, log)
    if code != 0:
        raise SystemExit(f"{row.name}: dp-collect failed (exit {code}); see {log}")
    return out


def train(row: Row, seed: int, data: Path, state: dict, budget_s: float | None, log: Path) -> bool:
    """Train (or resume) until ``row.steps``; True when finished."""
    from diffusion_policy import checkpoint as ckpt

    run_dir = RUNS / row.name / f"seed{seed}"
    if state.get("trained"):
        return True
    cmd = entry("train") + [
        f"task={row.task}", f"policy={row.policy}", f"method={row.method}", f"data={data}",
        f"run_dir={run_dir}", f"seed={seed}", f"steps={row.steps}", f"batch_size={row.batch_size}",
        f"lr={row.lr}", f"eval_every={row.eval_every}", f"eval_episodes={row.eval_episodes}",
        f"checkpoint_every={min(1000, row.eval_every)}", *row.train_overrides]
    if ckpt.has_latest(run_dir):
        cmd.append("resume=true")
    code, seconds = run(cmd, log, budget_s)
    state["train_seconds"] = state.get("train_seconds", 0.0) + seconds
    state["train_calls"] = state.get("train_calls", 0) + 1
    if code == 0:
        state["trained"] = True
    elif code not in (130, -signal.SIGINT, -signal.SIGKILL):
        raise SystemExit(f"{row.name}: dp-train failed (exit {code}); see {log}")
    return code == 0


def evaluate(row: Row, seed: int, episodes: int, log: Path) -> dict:
    out = ROLLOUTS / row.name / f"seed{seed}"
    if row.expert_only:
        cmd = entry("evaluate") + ["checkpoint=expert", f"task={row.task}"]
    else:
        cmd = entry("evaluate") + [f"checkpoint={RUNS / row.name / f'seed{seed}' / 'checkpoints' / 'best'}"]
    cmd += [f"episodes={episodes}", "seed=0", f"out={out}"]
    if row.num_inference_steps is not None:
        cmd.append(f"num_inference_steps={row.num_inference_steps}")
    code, _ = run(cmd, log)
    if code != 0:
        raise SystemExit(f"{row.name}: dp-eval failed (exit {code}); see {log}")
    return read_json(out / "metrics.json")


def run_row(row: Row, seed: int, args) -> dict | None:
    """All stages of one (row, training seed); the result dict once evaluated, else None."""
    from diffusion_policy.config import EVAL_SEED_BASE, SELECT_SEED_BASE

    result_path = RESULTS / f"{row.name}_seed{seed}.json"
    if result_path.exists() and not args.redo_eval:
        print(f"{row.name} seed {seed}: done ({result_path})")
        return read_json(result_path)
    work = RUNS / row.name / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    log, state_path = work / "quality.log", work / "quality_state.json"
    state = read_json(state_path, {})
    data, n_demos = None, None
    if not row.expert_only:
        DATA.mkdir(parents=True, exist_ok=True)
        data = collect(row, args.workers, log)
        from diffusion_policy.data.store import EpisodeStore

        n_demos = EpisodeStore.open(data).n_episodes
        budget = args.budget_min * 60 - (time.perf_counter() - args.t0) if args.budget_min else None
        if budget is not None and budget < 60:
            print(f"{row.name} seed {seed}: budget spent before training; run again to continue")
            return None
        finished = train(row, seed, data, state, budget, log)
        state_path.write_text(json.dumps(state, indent=1))
        if not finished:
            print(f"{row.name} seed {seed}: training interrupted at the budget after "
                  f"{state['train_seconds'] / 60:.1f} min in all; run again to resume")
            return None
    metrics = evaluate(row, seed, args.episodes, log)
    best = None if row.expert_only else (work / "checkpoints" / "best").read_text().strip()
    result = {
        "row": row.name, "hypothesis": row.hypothesis, "training_seed": seed, "commit": commit(),
        "task": row.task, "env_id": env_id_of(row.task), "demos": n_demos, "data": str(data) if data else None,
        "dart_noise": row.dart_noise, "dart_episodes": row.dart_episodes if row.dart_noise else None,
        "policy": row.policy, "method": row.method, "steps": None if row.expert_only else row.steps,
        "batch_size": row.batch_size, "lr": row.lr,
        "train_minutes": round(state.get("train_seconds", 0.0) / 60, 2) if not row.expert_only else None,
        "train_calls": state.get("train_calls"),
        "checkpoint_rule": None if row.expert_only else (
            f"best of the EMA checkpoints every {row.eval_every} steps by (success, mean max reward) on "
            f"{row.eval_episodes} selection seeds from {SELECT_SEED_BASE}"),
        "checkpoint": best,
        "test_seeds": [EVAL_SEED_BASE, EVAL_SEED_BASE + args.episodes - 1],
        "sampler_steps": row.num_inference_steps,
        "success": metrics["success_rate"], "success_ci95": metrics["success_ci"],
        "successes": metrics["successes"], "episodes": metrics["episodes"],
        "mean_max_reward": metrics["mean_max_reward"], "mean_episode_length": metrics["mean_episode_length"],
        "latency_p50_ms": metrics.get("latency_p50_ms"), "device": device_name(),
        "selection_curve": None if row.expert_only else selection_curve(work),
        "row_config": asdict(row),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    print(f"{row.name} seed {seed}: success {result['success']:.2f} "
          f"[{result['success_ci95'][0]:.2f}, {result['success_ci95'][1]:.2f}] -> {result_path}")
    return result


def selection_curve(run_dir: Path) -> list:
    """[(step, success, mean max reward)] of dp-train's selection rollouts (its metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    return [[r["step"], r["eval/success_rate"], r["eval/mean_max_reward"]] for r in rows
            if "eval/success_rate" in r]


def plot(path: Path) -> None:
    """Selection success against training steps, one line per result (PNG, PIL only)."""
    from PIL import Image, ImageDraw

    from diffusion_policy.report import _font, _plot

    results = [json.loads(f.read_text()) for f in sorted(RESULTS.glob("*.json"))]
    results = [r for r in results if r.get("selection_curve")]
    if not results:
        print(f"no selection curves in {RESULTS}")
        return
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    every = results[0]["row_config"]["eval_every"]
    series = [[c[1] for c in r["selection_curve"]] for r in results]
    colors = [palette[i % len(palette)] for i in range(len(results))]
    seeds = results[0]["row_config"]["eval_episodes"]
    img = Image.fromarray(_plot(series, f"selection success ({seeds} seeds) vs training step / {every}",
                                xlabel=f"selection rollout (every {every} steps)", size=(800, 420),
                                colors=colors))
    d = ImageDraw.Draw(img)
    for i, r in enumerate(results):  # legend
        d.text((560, 40 + 12 * i), f"{r['row']} s{r['training_seed']}", fill=colors[i], font=_font())
    img.save(path)
    print(f"wrote {path}")


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


def table() -> str:
    """The results table (markdown) from results/*.json: one line per row, seeds pooled as mean
    and spread when a row has several."""
    by_row: dict[str, list] = {}
    for f in sorted(RESULTS.glob("*.json")):
        r = json.loads(f.read_text())
        by_row.setdefault(r["row"], []).append(r)
    lines = ["| row | env | demos | policy / method | steps | train min | success (95% Wilson) "
             "| mean max reward | seeds |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in ROWS:
        rs = by_row.get(row.name)
        if not rs:
            continue
        s = [r["success"] for r in rs]
        if len(rs) == 1:
            succ = f"{s[0]:.2f} ({rs[0]['success_ci95'][0]:.2f}-{rs[0]['success_ci95'][1]:.2f})"
        else:
            mean, spread = sum(s) / len(s), (max(s) - min(s)) / 2
            succ = f"{mean:.2f} +- {spread:.2f} (per seed: {', '.join(f'{v:.2f}' for v in s)})"
        r0 = rs[0]
        lines.append(f"| {row.name} | {r0['env_id']} | {r0['demos'] or '-'} | {r0['policy']} / {r0['method']} "
                     f"| {r0['steps'] or '-'} | {r0['train_minutes'] or '-'} | {succ} "
                     f"| {sum(r['mean_max_reward'] for r in rs) / len(rs):.3f} | {len(rs)} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="*", help="row names, or 'all'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--episodes", type=int, default=100, help="test episodes (seeds of the evaluation range)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="dp-collect workers")
    p.add_argument("--budget-min", type=float, default=0.0,
                   help="stop training after this many minutes of this call (0 = no limit); run again to resume")
    p.add_argument("--redo-eval", action="store_true", help="evaluate again although a result exists")
    p.add_argument("--background", action="store_true", help="run detached; output to runs/quality/background.log")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny budgets ({SMOKE}, --episodes 2) under */quality_smoke/: checks the plumbing, "
                        f"measures nothing")
    p.add_argument("--list", action="store_true", help="list the rows")
    p.add_argument("--table", action="store_true", help="print the results table")
    p.add_argument("--plot", action="store_true", help="write success_vs_steps.png from the results")
    args = p.parse_args()
    args.t0 = time.perf_counter()
    if args.smoke:
        global RESULTS, DATA, RUNS, ROLLOUTS
        RESULTS, DATA = REPO / "runs" / "quality_smoke" / "results", REPO / "data" / "quality_smoke"
        RUNS, ROLLOUTS = REPO / "runs" / "quality_smoke", REPO / "rollouts" / "quality_smoke"
        args.episodes = 2
        for r in ROWS:
            for k, v in SMOKE.items():
                setattr(r, k, min(getattr(r, k), v))
    if args.list:
        for r in ROWS:
            print(f"{r.name:28s} task={r.task:22s} {r.policy}/{r.method} demos={r.demos} steps={r.steps}: "
                  f"{r.hypothesis}")
        return 0
    if args.table:
        print(table())
        return 0
    if args.plot:
        plot((RUNS if args.smoke else Path(__file__).parent) / "success_vs_steps.png")
        return 0
    names = [r.name for r in ROWS] if args.rows == ["all"] else args.rows
    unknown = [n for n in names if n not in BY_NAME]
    if not names or unknown:
        p.error(f"unknown rows {unknown}; --list shows them" if unknown else "name a row, or 'all'")
    if args.background:
        RUNS.mkdir(parents=True, exist_ok=True)
        argv = [a for a in sys.argv[1:] if a != "--background"]
        with open(RUNS / "background.log", "a") as f:
            proc = subprocess.Popen([sys.executable, __file__, *argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        print(f"running in the background: pid {proc.pid}, log {RUNS / 'background.log'}")
        return 0
    for name in names:
        for seed in ([0] if BY_NAME[name].expert_only else args.seeds):
            if run_row(BY_NAME[name], seed, args) is None:
                return 3  # budget spent: the next call resumes here
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
