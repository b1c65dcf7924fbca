"""Fault injection: does the test suite catch semantic faults in the core logic?

Each fault is a textual patch (one exact string replaced by another) to one file of a scratch copy
of the repository at HEAD (``git archive HEAD`` into /tmp, never the working tree), followed by a
short, explicit list of the test files that cover that code, run with ``-x`` and a timeout. A fault
is *caught* when pytest fails; *survived* when it passes; a timeout counts as not caught. Results go
to benchmarks/fault_injection.md (and a JSON beside it, so that a partial run can be resumed).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fault_injection.py                 # every fault
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fault_injection.py --only ema_frozen,topk_reversed
    .venv/bin/python benchmarks/fault_injection.py --check     # every patch applies exactly once
    .venv/bin/python benchmarks/fault_injection.py --table     # rewrite the .md from the JSON

Not part of CI: the full run takes tens of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "fault_injection.json"
TABLE = REPO / "benchmarks" / "fault_injection.md"

T = "diffusion_policy/train.py"
C = "diffusion_policy/checkpoint.py"
R = "diffusion_policy/report.py"
RO = "diffusion_policy/rollout.py"
E = "diffusion_policy/evaluate.py"
CFG = "diffusion_policy/config.py"
B = "diffusion_policy/data/batches.py"
W = "diffusion_policy/data/windows.py"
N = "diffusion_policy/data/normalize.py"
S = "diffusion_policy/data/store.py"
D = "diffusion_policy/methods/diffusion.py"
F = "diffusion_policy/methods/flow.py"
CT = "diffusion_policy/control/controller.py"
CO = "diffusion_policy/collect.py"

PT = "tests/test_pins_training.py"
PE = "tests/test_pins_eval.py"
CP = "tests/test_crash_protocols.py"
TR = "tests/test_train.py::test_torchrun_two_ranks_on_cpu"


@dataclass
class Fault:
    name: str
    area: str
    path: str
    old: str
    new: str
    tests: list
    what: str


FAULTS = [
    # ---------------------------------------------------------------- training
    Fault(
        "ema_frozen",
        "training",
        T,
        "            ema_update(ema, policy, ema_decay(step, cfg.ema_power, cfg.ema_max_decay))",
        "            pass",
        [PT],
        "the EMA never updates",
    ),
    Fault(
        "ema_wrong_weight",
        "training",
        T,
        "for p in model.parameters()], 1.0 - decay)",
        "for p in model.parameters()], decay)",
        [PT],
        "EMA averages with the decay and 1 - decay swapped",
    ),
    Fault(
        "ema_decay_power_sign",
        "training",
        T,
        "1.0 - (1.0 + step) ** -power",
        "1.0 - (1.0 + step) ** power",
        [PT, "tests/test_train.py::test_schedules"],
        "EMA warm-up with the wrong exponent sign",
    ),
    Fault(
        "ema_cap_ignored",
        "training",
        T,
        "return min(max_decay, max(0.0,",
        "return min(1.0, max(0.0,",
        [PT, "tests/test_train.py::test_schedules"],
        "the EMA decay cap is ignored",
    ),
    Fault(
        "ckpt_saves_raw_policy",
        "training",
        C,
        '(self.ema if self.ema is not None else self.policy).save(tmp / "policy")',
        'self.policy.save(tmp / "policy")',
        [PT],
        "the checkpoint's policy/ holds the raw weights, not the EMA",
    ),
    Fault(
        "topk_reversed",
        "training",
        C,
        'e["step"]), reverse=True)[:k]',
        'e["step"]))[:k]',
        [PT],
        "top-k sorted the wrong way: best names the worst",
    ),
    Fault(
        "topk_by_step",
        "training",
        C,
        'key=lambda e: (tuple(e["score"]), e["step"])',
        'key=lambda e: (e["step"],)',
        [PT],
        "top-k ranked by recency instead of score",
    ),
    Fault(
        "best_names_last",
        "training",
        C,
        '_write_pointer(root / "best", topk[0]["name"])',
        '_write_pointer(root / "best", topk[-1]["name"])',
        [PT],
        "best names the k-th checkpoint",
    ),
    Fault(
        "latest_before_rename",
        "training",
        C,
        '        tmp.rename(final)\n        _write_pointer(root / "latest", name)',
        '        _write_pointer(root / "latest", name)\n        tmp.rename(final)',
        [CP],
        "latest written before the rename of the checkpoint folder",
    ),
    Fault(
        "latest_before_files",
        "training",
        C,
        "        tmp.mkdir()\n",
        '        tmp.mkdir()\n        _write_pointer(root / "latest", name)\n',
        [CP],
        "latest written before the checkpoint's files",
    ),
    Fault(
        "no_fsync_tree",
        "training",
        C,
        "        _fsync_tree(tmp)\n",
        "",
        [CP],
        "checkpoint files never fsynced before the rename (only a power loss shows it)",
    ),
    Fault(
        "normalizer_all_episodes",
        "training",
        T,
        "rows = [store.episode_slice(int(e)) for e in train_ids]",
        "rows = [store.episode_slice(int(e)) for e in range(store.n_episodes)]",
        [PT],
        "the normalizer fitted on all episodes, validation included",
    ),
    Fault(
        "select_seed_zero",
        "training",
        CFG,
        "SELECT_SEED_BASE = 500_000",
        "SELECT_SEED_BASE = 0",
        [PT],
        "selection rollouts on the demonstration seeds",
    ),
    Fault(
        "ddp_rank0_slice",
        "training",
        T,
        "place = dict(seed=cfg.seed, device=device, rank=rank, world=world)",
        "place = dict(seed=cfg.seed, device=device, rank=0, world=world)",
        [TR],
        "every DDP rank trains on rank 0's slice of the data",
    ),
    Fault(
        "batch_rank_stride",
        "data",
        B,
        "[window][self.rank::self.world])",
        "[window][0::self.world])",
        [TR, "tests/test_data_batches.py"],
        "every rank gathers the first rank's windows",
    ),
    Fault(
        "batch_rank_stride_cached",
        "data",
        B,
        "t = self._perm_device[window][self.rank::self.world]",
        "t = self._perm_device[window][0::self.world]",
        [TR, "tests/test_data_batches.py"],
        "every rank takes the first rank's windows (device-cache path, the one dp-train takes for low-dim data)",
    ),
    Fault(
        "lr_warmup_off_by_one",
        "training",
        T,
        "return (step + 1) / warmup",
        "return step / warmup",
        ["tests/test_train.py::test_schedules"],
        "warm-up starts at lr 0",
    ),
    Fault(
        "no_grad_clip",
        "training",
        T,
        "grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)",
        "grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1e9)",
        ["tests/test_train.py::test_resume_joins_uninterrupted_curve", PT],
        "gradient clipping disabled",
    ),
    Fault(
        "eval_on_raw_weights",
        "training",
        T,
        "metrics = _rollouts(ema or policy,",
        "metrics = _rollouts(policy,",
        [PT],
        "selection rollouts on the raw weights instead of the EMA",
    ),
    # ---------------------------------------------------------------- evaluation
    Fault(
        "success_rate_zero",
        "evaluation",
        R,
        '"success_rate": succ / n if n else 0.0,',
        '"success_rate": 0.0,',
        [PE],
        "compute_metrics reports success rate 0 always",
    ),
    Fault(
        "never_success",
        "evaluation",
        RO,
        'ep.success |= bool(info.get("success", False))',
        "ep.success |= False",
        [PE],
        "rollouts never register a success",
    ),
    Fault(
        "max_reward_is_last",
        "evaluation",
        RO,
        '"max_reward": float(r.max())',
        '"max_reward": float(r[-1])',
        [PE],
        "max reward is the last step's reward",
    ),
    Fault(
        "wilson_z_wrong",
        "evaluation",
        R,
        "Z95 = 1.959963984540054",
        "Z95 = 1.644853626951472",
        [PE, "tests/test_eval.py::test_wilson_interval_known_values"],
        "Wilson interval at 90% instead of 95%",
    ),
    Fault(
        "mean_reward_is_return",
        "evaluation",
        R,
        'np.mean([r["max_reward"] for r in records])',
        'np.mean([r["return"] for r in records])',
        [PE],
        "mean max reward computed from returns",
    ),
    Fault(
        "eval_seed_zero",
        "evaluation",
        CFG,
        "EVAL_SEED_BASE = 1_000_000",
        "EVAL_SEED_BASE = 0",
        [PE],
        "test episodes on the demonstration seeds",
    ),
    Fault(
        "eval_seed_guard_removed",
        "evaluation",
        E,
        "    if not 0 <= cfg.seed <= SEED_RANGE - cfg.episodes:",
        "    if False:",
        [PE],
        "dp-eval's seed-range guard removed",
    ),
    Fault(
        "eval_ignores_bf16",
        "evaluation",
        E,
        "if cfg.bf16 or cfg.compile or cfg.cuda_graph:",
        "if cfg.compile or cfg.cuda_graph:",
        [PE],
        "dp-eval ignores bf16",
    ),
    Fault(
        "eval_ignores_smoothing",
        "evaluation",
        E,
        "cfg.num_inference_steps, cfg.smoothing, cfg.ensemble_k,",
        'cfg.num_inference_steps, "none", cfg.ensemble_k,',
        [PE],
        "dp-eval ignores smoothing",
    ),
    Fault(
        "eval_ignores_steps",
        "evaluation",
        E,
        "return PolicyActor(policy, n_envs, device, cfg.num_inference_steps,",
        "return PolicyActor(policy, n_envs, device, None,",
        [PE],
        "dp-eval ignores num_inference_steps",
    ),
    Fault(
        "rank_episodes_overlap",
        "evaluation",
        RO,
        "return list(range(rank, n_episodes, world))",
        "return list(range(0, n_episodes, world))",
        ["tests/test_eval.py::test_run_shard_splits_seeds_over_ranks_and_clamps_n_envs"],
        "every rank runs rank 0's episodes",
    ),
    # ---------------------------------------------------------------- data
    Fault(
        "window_pad_before",
        "data",
        W,
        "self.pad_before = n_obs_steps - 1 if pad_before",
        "self.pad_before = n_obs_steps if pad_before",
        ["tests/test_data_windows.py"],
        "To steps of padding before an episode instead of To - 1",
    ),
    Fault(
        "window_no_clip",
        "data",
        W,
        "self.sample_indices = np.clip(t, lo[:, None], hi[:, None]).astype(dtype)",
        "self.sample_indices = np.clip(t, 0, None).astype(dtype)",
        ["tests/test_data_windows.py"],
        "windows cross episode boundaries instead of repeating the edge frame",
    ),
    Fault(
        "window_obs_slice",
        "data",
        W,
        "t_obs = np.ascontiguousarray(t[:, : self.n_obs_steps])",
        "t_obs = np.ascontiguousarray(t[:, 1: self.n_obs_steps + 1])",
        ["tests/test_data_windows.py"],
        "observations shifted by one step",
    ),
    Fault(
        "minmax_scale",
        "data",
        N,
        "scale = np.where(flat, 1.0, 2.0 / np.where(flat, 1.0, hi - lo))",
        "scale = np.where(flat, 1.0, 1.0 / np.where(flat, 1.0, hi - lo))",
        ["tests/test_data_normalize.py"],
        "minmax maps to [0, 1] instead of [-1, 1]",
    ),
    Fault(
        "meanstd_no_guard",
        "data",
        N,
        "scale = np.where(flat, 1.0, 1.0 / np.where(flat, 1.0, std))",
        "scale = 1.0 / np.maximum(std, 1e-12)",
        ["tests/test_data_normalize.py", PT + "::test_constant_dimension_gets_unit_scale"],
        "a near-constant dimension divides by ~0 (LeRobot #211)",
    ),
    Fault(
        "store_ends_first",
        "data",
        S,
        "        # 1) data and digests, possibly leaving an uncommitted tail if killed here\n",
        "        self._commit_ends(np.append(self._ends, n + length))\n",
        [CP, "tests/test_data_store.py"],
        "episode_ends committed before the episode's data",
    ),
    Fault(
        "epoch_same_perm",
        "data",
        B,
        "rng = np.random.default_rng([self.seed, epoch])",
        "rng = np.random.default_rng([self.seed, 0])",
        ["tests/test_data_batches.py"],
        "every epoch draws the same permutation",
    ),
    # ---------------------------------------------------------------- methods
    Fault(
        "ddpm_target_actions",
        "methods",
        D,
        "            target = noise\n",
        "            target = actions\n",
        ["tests/test_methods_closed_form.py", "tests/test_methods_overfit.py"],
        "epsilon prediction trained on x0",
    ),
    Fault(
        "ddpm_timestep_range",
        "methods",
        D,
        "k = torch.randint(0, self.num_train_timesteps, (B,), device=actions.device)",
        "k = torch.randint(0, self.num_train_timesteps // 2, (B,), device=actions.device)",
        ["tests/test_methods_closed_form.py", "tests/test_methods_overfit.py"],
        "training never sees the noisiest half",
    ),
    Fault(
        "flow_path_reversed",
        "methods",
        F,
        "x_t = tt * eps + (1.0 - tt) * actions",
        "x_t = tt * actions + (1.0 - tt) * eps",
        ["tests/test_methods_closed_form.py", "tests/test_methods_overfit.py"],
        "flow path runs the wrong way",
    ),
    Fault(
        "flow_target_sign",
        "methods",
        F,
        "F.mse_loss(pred.float(), (eps - actions).float())",
        "F.mse_loss(pred.float(), (actions - eps).float())",
        ["tests/test_methods_closed_form.py", "tests/test_methods_overfit.py"],
        "flow velocity target with the wrong sign",
    ),
    Fault(
        "heun_half",
        "methods",
        F,
        "x = x + 0.5 * h * (v + v_next)",
        "x = x + h * (v + v_next)",
        ["tests/test_methods_closed_form.py"],
        "Heun step twice too long",
    ),
    Fault(
        "midpoint_stage",
        "methods",
        F,
        "v_mid, _ = velocity(x + 0.5 * h * v, j + 1)",
        "v_mid, _ = velocity(x + h * v, j + 1)",
        ["tests/test_methods_closed_form.py"],
        "midpoint stage evaluated at the end point",
    ),
    # ---------------------------------------------------------------- control
    Fault(
        "first_action_index",
        "control",
        CT,
        "chunk[self.n_obs_steps - 1:]",
        "chunk[self.n_obs_steps:]",
        ["tests/test_controller.py"],
        "first executed action is chunk index To instead of To - 1",
    ),
    Fault(
        "ensemble_sign",
        "control",
        CT,
        "w = np.exp(-k * np.arange(n, dtype=np.float64))",
        "w = np.exp(k * np.arange(n, dtype=np.float64))",
        ["tests/test_controller.py"],
        "temporal ensembling trusts the wrong end",
    ),
    Fault(
        "blend_ramp_reversed",
        "control",
        CT,
        "out[:n_overlap] = (1.0 - alpha[:, None]) * old + alpha[:, None] * new[:n_overlap]",
        "out[:n_overlap] = alpha[:, None] * old + (1.0 - alpha[:, None]) * new[:n_overlap]",
        ["tests/test_controller.py"],
        "blend ramp reversed",
    ),
    Fault(
        "collect_seed_guard",
        "data",
        CO,
        "    if stop > COLLECT_SEED_BASE + SEED_RANGE:",
        "    if False:",
        [PT, "tests/test_collect.py"],
        "collection may run into the selection seeds",
    ),
]


def _scratch() -> Path:
    root = Path(tempfile.mkdtemp(prefix="fault-injection-"))
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def check(root: Path) -> list[str]:
    bad = []
    for f in FAULTS:
        n = (root / f.path).read_text().count(f.old)
        if n != 1:
            bad.append(f"{f.name}: {f.path} holds the pattern {n} times (expected 1)")
    return bad


def run_one(root: Path, f: Fault, timeout: int) -> dict:
    path = root / f.path
    original = path.read_text()
    path.write_text(original.replace(f.old, f.new, 1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl", "PYTHONPATH": str(root)}
    env.pop("CI", None)
    t0 = time.time()
    try:
        r = subprocess.run(
            [str(REPO / ".venv" / "bin" / "python"), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *f.tests],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        outcome = "caught" if r.returncode != 0 else "survived"
        tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
        if r.returncode not in (0, 1):
            outcome = f"error rc={r.returncode}"
    except subprocess.TimeoutExpired:
        outcome, tail = "timeout", [""]
    finally:
        path.write_text(original)
    return {
        "name": f.name,
        "area": f.area,
        "what": f.what,
        "tests": f.tests,
        "outcome": outcome,
        "seconds": round(time.time() - t0, 1),
        "last_line": tail[0][:160],
    }


# why a fault survives (kept with the faults so that the table says it next to the result)
WHY = {
}


def write_table(results: dict) -> None:
    done = [results[f.name] for f in FAULTS if f.name in results]
    caught = [r for r in done if r["outcome"] == "caught"]
    lines = [
        "# Fault injection: semantic faults against the tests that cover them",
        "",
        "Produced by `benchmarks/fault_injection.py` (see its docstring). Each fault is one textual patch to a",
        "scratch copy of HEAD, followed by its listed test files (`pytest -x`). Machine: 2-core AMD EPYC, shared.",
        "",
        f"Score: **{len(caught)} of {len(done)} run faults caught** ({len(FAULTS)} defined; "
        f"{len(FAULTS) - len(done)} not run).",
        "",
        "Each row is the fault's latest run. One full pass over all 47 faults (2026-12-04, at 48a8c85; the "
        "faults run after 2f6ef9d landed saw that commit too, which adds only the gradient-clipping pin) caught "
        "46; its one survivor, no_grad_clip, was re-run at 2f6ef9d with that pin and is caught. Earlier passes, "
        "before the pins of the seed literals, the constant dimension's scale, the two-rank data, the fsync "
        "order, both batch paths and a rollout record's max reward, caught 39 of 46.",
        "",
        "| fault | area | what | outcome | s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in done:
        lines.append(f"| {r['name']} | {r['area']} | {r['what']} | {r['outcome']} | {r['seconds']} |")
    not_run = [f.name for f in FAULTS if f.name not in results]
    if not_run:
        lines += ["", "Not run: " + ", ".join(not_run)]
    surv = [r for r in done if r["outcome"] != "caught"]
    lines += ["", "## Survivors", ""]
    lines += [
        f"- {r['name']} ({r['outcome']}): {r['what']}; tests {', '.join(r['tests'])}. {WHY.get(r['name'], '')}"
        for r in surv
    ] or ["none"]
    TABLE.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated fault names")
    ap.add_argument("--check", action="store_true", help="only check that every patch applies")
    ap.add_argument("--table", action="store_true", help="only rewrite the table from the JSON")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--fresh", action="store_true", help="forget earlier results")
    args = ap.parse_args(argv)
    results = {} if args.fresh or not RESULTS.exists() else json.loads(RESULTS.read_text())
    if args.table:
        write_table(results)
        return 0
    root = _scratch()
    try:
        bad = check(root)
        if bad or args.check:
            print("\n".join(bad) or f"all {len(FAULTS)} patches apply", file=sys.stderr if bad else sys.stdout)
            return 1 if bad else 0
        names = set(args.only.split(",")) if args.only else None
        for f in FAULTS:
            if (names and f.name not in names) or (not names and f.name in results):
                continue
            r = run_one(root, f, args.timeout)
            results[f.name] = r
            print(f"{r['name']}: {r['outcome']} ({r['seconds']} s)", flush=True)
            RESULTS.write_text(json.dumps(results, indent=1))
            write_table(results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
