"""Multi-GPU training through torchrun: same loss curve as one GPU, throughput scaling, and where
the time of a step goes.

    python benchmarks/ddp_scaling.py --gpus 1 2 --steps 200 --out $OUT
    python benchmarks/ddp_scaling.py --gpus 1 2 --per-gpu-batch 256 1024 --variants base bf16comm
    python benchmarks/ddp_scaling.py --device cpu --policy unet_small --steps 20 --gpus 1 2   # gloo smoke test

Makes a synthetic Push-T-shaped store (keypoint 18 + agent_pos 2, action 2; smooth random
trajectories), measures the all-reduce bandwidth between the GPUs (benchmarks/allreduce_bw.py, at
the size of the UNet's gradients), then runs the real ``dp-train`` (default UNet, about 65M
parameters, DDPM) under torchrun:
  weak:   for each per-GPU batch B and each variant, 1 GPU at batch B and N GPUs at batch B x N
  strong: (first variant, first B) N GPUs at global batch B: the loss curve must match 1 GPU's
A variant is a named set of extra dp-train overrides: ``base`` (none), ``bf16comm``
(ddp_comm=bf16), ``bucket100`` (ddp_bucket_mb=100), or ``NAME:key=value[:key=value...]``.
Variants that only set ``ddp_*`` keys share the 1-GPU run of the same batch (one rank uses no DDP).

Reports samples/s (median of dp-train's logged figure, first three logs dropped), scaling against
the 1-GPU run of the same per-GPU batch and variant, dp-train's per-step timing (wall ms per step,
and host ms in the data, forward+backward and optimizer phases), and the mean absolute difference
between smoothed loss curves of runs with the same global batch, against the 1-GPU run's
step-to-step loss noise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from diffusion_policy.data.store import EpisodeStore

# NVLink multicast (NVLS) off for every torchrun: see the device notes on these machines
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
VARIANTS = {"base": [], "bf16comm": ["ddp_comm=bf16"], "bucket100": ["ddp_bucket_mb=100"]}
TIMING = ("step_ms", "data_ms", "fwd_bwd_ms", "opt_ms")


def make_store(path: Path, episodes=200, length=150, seed=0) -> None:
    if (path / "meta").exists():
        return
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(path)
    for _ in range(episodes):
        t = np.linspace(0, 1, length)[:, None]
        a, b = rng.uniform(-1, 1, (2, 1, 2))
        agent = (a + (b - a) * t + 0.05 * np.sin(6 * t + rng.uniform(0, 6, (1, 2)))).astype(np.float32)
        kp = (np.repeat(agent, 9, axis=1) + rng.normal(0, 0.01, (length, 18))).astype(np.float32)
        store.add_episode({"keypoint": kp, "agent_pos": agent, "action": np.roll(agent, -1, 0)})


def parse_variant(spec: str) -> tuple[str, list]:
    if spec in VARIANTS:
        return spec, VARIANTS[spec]
    name, *overrides = spec.split(":")
    if not overrides or not all("=" in o for o in overrides):
        raise SystemExit(f"--variants {spec!r}: expected one of {', '.join(VARIANTS)} or NAME:key=value[:key=value...]")
    return name, overrides


def error_line(stderr: str) -> str:
    """The line that says what went wrong: dp-train's own one-line message, else the last
    exception line of a traceback, else the end of stderr."""
    lines = [l.strip() for l in stderr.splitlines() if l.strip()]
    for pick in (lambda l: l.startswith("dp-train:"), lambda l: "Error" in l.split(":")[0]):
        found = [l for l in lines if pick(l)]
        if found:
            return found[-1]
    return " ".join(lines[-5:])


def torchrun(gpus: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]


def call(cmd: list, timeout: int):
    """Run ``cmd`` with the NVLS-off environment in its own process group; (returncode, stdout,
    stderr), or None when it timed out (the whole group is killed: no rank is left on a GPU)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **ENV}, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return None
    return p.returncode, stdout, stderr


def allreduce_probe(out: Path, gpus: int, device: str, mb: float, timeout: int) -> dict:
    path = out / "allreduce.json"
    cmd = torchrun(gpus) + [str(Path(__file__).with_name("allreduce_bw.py")), "--device", device,
                            "--mb", str(mb), "--json", str(path)]
    r = call(cmd, timeout)
    if r is None:
        return {"error": f"timed out after {timeout} s"}
    rc, stdout, stderr = r
    (out / "log_allreduce.txt").write_text(stdout[-20000:] + "\n" + stderr[-20000:])
    if rc or not path.exists():
        return {"error": error_line(stderr)}
    return json.loads(path.read_text())


def run(store, out, gpus, batch, steps, tag, overrides, device, policy, timeout, keep=False) -> dict:
    run_dir = out / f"run_{tag}"
    cmd = torchrun(gpus) + [
        "-m", "diffusion_policy.train", "task=pusht", f"policy={policy}", "method=ddpm", f"data={store}",
        f"run_dir={run_dir}", f"batch_size={batch}", f"steps={steps}", "log_every=10",
        "val_every=100000", f"checkpoint_every={steps}", f"device={device}", "warmup_steps=50", *overrides]
    info = {"tag": tag, "gpus": gpus, "batch": batch, "overrides": overrides}
    t = time.perf_counter()
    r = call(cmd, timeout)
    if r is None:
        return {**info, "error": f"timed out after {timeout} s"}
    rc, stdout, stderr = r
    info["wall_s"] = round(time.perf_counter() - t, 1)
    (out / f"log_{tag}.txt").write_text(" ".join(cmd) + "\n" + stdout[-20000:] + "\n" + stderr[-20000:])
    if rc:
        return {**info, "error": error_line(stderr)}
    if not keep:  # the last checkpoint of the 65M UNet is about 1 GB (weights, EMA, AdamW moments)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r_ for r_ in rows if "train/loss" in r_]
    late = rows[3:] or rows  # the first logs include start-up
    info["loss"] = [r_["train/loss"] for r_ in rows]
    info["samples_per_s"] = statistics.median(r_["train/samples_per_s"] for r_ in late)
    for k in TIMING:
        info[k] = statistics.median(r_[f"train/{k}"] for r_ in late)
    return info


def smooth(x, k=5):
    return np.convolve(x, np.ones(k) / k, mode="valid")


def loss_diff(a: dict, b: dict) -> float:
    n = min(len(a["loss"]), len(b["loss"]))
    return float(np.mean(np.abs(smooth(a["loss"][:n]) - smooth(b["loss"][:n]))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--per-gpu-batch", nargs="+", type=int, default=[256])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help=f"{', '.join(VARIANTS)} or NAME:key=value[:key=value...]")
    ap.add_argument("--no-strong", dest="strong", action="store_false", help="skip the strong-scaling run")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="ddp_out")
    ap.add_argument("--store", default="", help="synthetic store path (default <out>/synthetic_pusht.zarr)")
    ap.add_argument("--extra", nargs="*", default=[], help="dp-train overrides for every run")
    ap.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo, a smoke test)")
    ap.add_argument("--policy", default="unet", help="policy config (unet = about 65M parameters)")
    ap.add_argument("--allreduce-mb", type=float, default=None,
                    help="all-reduce probe size in MB of fp32 (default 263.1 on cuda, 8 on cpu; 0: skip)")
    ap.add_argument("--run-timeout", type=int, default=300, help="seconds before a run is given up")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(args.store) if args.store else out / "synthetic_pusht.zarr"
    make_store(store)
    variants = [parse_variant(v) for v in args.variants]
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    allreduce = None
    if args.allreduce_mb is None:
        args.allreduce_mb = 263.1 if args.device == "cuda" else 8.0  # the UNet's fp32 gradients
    if args.allreduce_mb > 0 and max(args.gpus) > 1:
        progress(f"all-reduce probe on {max(args.gpus)} ranks, {args.allreduce_mb:g} MB")
        allreduce = allreduce_probe(out, max(args.gpus), args.device, args.allreduce_mb, args.run_timeout)
        for r in allreduce.get("rows", []):
            progress(f"  {r['dtype']} {r['split']}: {r['ms']} ms, bus bandwidth {r['busbw_GBps']} GB/s")
        if "error" in allreduce:
            progress(f"  error: {allreduce['error'][-300:]}")

    # the plan: (variant, kind, GPUs, per-GPU batch, overrides); runs with the same effective
    # overrides, GPUs and global batch are done once (ddp_* keys do nothing on one rank)
    plan = []
    for b in args.per_gpu_batch:
        for name, overrides in variants:
            for g in args.gpus:
                plan.append((name, "weak", g, b, overrides))
    if args.strong:
        name, overrides = variants[0]
        b = args.per_gpu_batch[0]
        plan += [(name, "strong", g, b // g, overrides) for g in args.gpus if g > 1 and b % g == 0]

    def effective(overrides, g):
        return tuple(o for o in args.extra + overrides if g > 1 or not o.startswith("ddp_"))

    done: dict = {}
    todo = len({(effective(o, g), g, b * g) for _, _, g, b, o in plan})
    results = []
    for name, kind, g, b, overrides in plan:
        key = (effective(overrides, g), g, b * g)
        shared = key in done
        if not shared:
            own = [o for o in overrides if o in key[0]]  # a ddp-only variant's 1-GPU run is base's
            tag = f"{name if own or not overrides else 'base'}_{g}gpu_b{b}"
            progress(f"run {len(done) + 1}/{todo}: {tag} ({' '.join(key[0]) or 'no overrides'})")
            done[key] = run(store, out, g, b * g, args.steps, tag, list(key[0]), args.device, args.policy,
                            args.run_timeout, args.keep_checkpoints)
            r = done[key]
            progress(f"  {r['error'][-300:]}" if "error" in r else
                     f"  {r['samples_per_s']:.0f} samples/s, {r['step_ms']:.1f} ms/step, run {r['wall_s']} s")
        results.append({"variant": name, "kind": kind, "per_gpu_batch": b, "shared": shared, **done[key]})

    # scaling against the 1-GPU run of the same variant and per-GPU batch (strong: same global
    # batch); loss curves compared between runs of the same global batch, against the run with
    # the fewest GPUs and no variant overrides
    ok = [r for r in results if "error" not in r]
    for r in ok:
        per_gpu = r["batch"] if r["kind"] == "strong" else r["per_gpu_batch"]
        one = next((o for o in ok if o["gpus"] == 1 and o["variant"] == r["variant"] and o["batch"] == per_gpu), None)
        r["scaling"] = r["samples_per_s"] / one["samples_per_s"] if one and r["gpus"] > 1 else None
        refs = sorted((o for o in ok if o["batch"] == r["batch"] and o["tag"] != r["tag"]),
                      key=lambda o: (len(o["overrides"]) > len(args.extra), o["gpus"]))
        if refs and (refs[0]["gpus"], len(refs[0]["overrides"])) <= (r["gpus"], len(r["overrides"])):
            r["loss_diff"], r["loss_ref"] = loss_diff(r, refs[0]), refs[0]["tag"]
    base = next((o for o in ok if o["gpus"] == 1), None)
    noise = float(np.mean(np.abs(np.diff(base["loss"])))) if base and len(base["loss"]) > 1 else float("nan")

    lines = []
    if allreduce and "rows" in allreduce:
        lines += [f"All-reduce between {allreduce['machine']['world']} ranks ({allreduce['machine']}):", "",
                  "| dtype | split | calls | MB | ms | algbw GB/s | busbw GB/s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['split']} | {r['calls']} | {r['MB']} | {r['ms']} | {r['algbw_GBps']} | "
                  f"{r['busbw_GBps']} |" for r in allreduce["rows"]]
        lines.append("")
    elif allreduce:
        lines += [f"All-reduce probe failed: {allreduce['error'][-300:]}", ""]
    lines += ["| variant | kind | GPUs | per-GPU batch | global batch | samples/s | scaling | step ms | "
              "data ms | fwd+bwd ms | opt ms | loss diff (vs) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        variant = f"{r['variant']} (= {r['tag']})" if r["shared"] else r["variant"]
        head = f"| {variant} | {r['kind']} | {r['gpus']} | {r['per_gpu_batch']} | {r['batch']} |"
        if "error" in r:
            lines.append(f"{head} error | | | | | | {' '.join(r['error'].split())[-200:]} |")
            continue
        scaling = f"{r['scaling']:.2f}x" if r.get("scaling") else "1.00x" if r["gpus"] == 1 else "-"
        diff = f"{r['loss_diff']:.4f} ({r['loss_ref']})" if "loss_diff" in r else "-"
        lines.append(f"{head} {r['samples_per_s']:.0f} | {scaling} | " +
                     " | ".join(f"{r[k]:.1f}" for k in TIMING) + f" | {diff} |")
    lines.append(f"\n1-GPU step-to-step loss noise (mean |diff|): {noise:.4f}; {args.steps} steps per run, "
                 f"total {time.perf_counter() - t0:.0f} s")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    (out / "ddp_scaling.md").write_text(text + "\n")
    (out / "ddp_scaling.json").write_text(json.dumps(
        {"args": vars(args), "allreduce": allreduce, "results": results, "noise": noise}, indent=1))


if __name__ == "__main__":
    main()
