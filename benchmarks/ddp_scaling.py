"""Multi-GPU training through torchrun: same loss curve as one GPU, and throughput scaling.

    python benchmarks/ddp_scaling.py --gpus 1 2 --steps 300 --out $OUT

Makes a synthetic Push-T-shaped store (keypoint 18 + agent_pos 2, action 2; smooth random
trajectories), then runs the real ``dp-train`` (default UNet, about 65M parameters, DDPM):
  strong: global batch 256 on 1 and N GPUs (the loss curves must agree within noise)
  weak:   256 windows per GPU (global 256 x N): throughput scaling
Reports samples/s from each run's metrics.jsonl (median after the first logs) and the mean
absolute difference between loss curves (smoothed) against the 1-GPU run's step-to-step noise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from diffusion_policy.data.store import EpisodeStore


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


def run(store, out, gpus, batch, steps, tag, extra, device="cuda", policy="unet") -> dict:
    run_dir = out / f"run_{tag}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "diffusion_policy.train", "task=pusht", f"policy={policy}", "method=ddpm", f"data={store}",
           f"run_dir={run_dir}", f"batch_size={batch}", f"steps={steps}", "log_every=10",
           "val_every=100000", f"checkpoint_every={steps}", f"device={device}", "warmup_steps=50", *extra]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out / f"log_{tag}.txt").write_text(r.stdout[-20000:] + "\n" + r.stderr[-20000:])
    if r.returncode:
        return {"tag": tag, "error": r.stderr[-2000:]}
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = [r_["train/loss"] for r_ in rows if "train/loss" in r_]
    sps = [r_["train/samples_per_s"] for r_ in rows if "train/samples_per_s" in r_]
    sps = sps[3:] or sps  # the first logs include start-up
    return {"tag": tag, "gpus": gpus, "batch": batch, "samples_per_s": statistics.median(sps), "loss": loss}


def smooth(x, k=5):
    return np.convolve(x, np.ones(k) / k, mode="valid")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="ddp_out")
    ap.add_argument("--extra", nargs="*", default=[])
    ap.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo, a smoke test)")
    ap.add_argument("--policy", default="unet", help="policy config (unet = about 65M parameters)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "synthetic_pusht.zarr"
    make_store(store)
    results = []
    for g in args.gpus:
        results.append(run(store, out, g, 256, args.steps, f"strong{g}", args.extra, args.device, args.policy))
        if g > 1:
            results.append(run(store, out, g, 256 * g, args.steps, f"weak{g}", args.extra, args.device, args.policy))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "loss"}), flush=True)
    base = next(r for r in results if r.get("tag") == "strong1")
    noise = float(np.mean(np.abs(np.diff(base["loss"]))))
    print("\n| run | GPUs | global batch | samples/s | scaling | mean abs loss diff vs 1 GPU (smoothed) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['tag']} | error | | | | {r['error'][-200:]} |")
            continue
        diff = float(np.mean(np.abs(smooth(r["loss"]) - smooth(base["loss"])))) if r["batch"] == 256 else float("nan")
        print(f"| {r['tag']} | {r['gpus']} | {r['batch']} | {r['samples_per_s']:.0f} | "
              f"{r['samples_per_s'] / base['samples_per_s']:.2f}x | {diff:.4f} |")
    print(f"1-GPU step-to-step loss noise (mean |diff|): {noise:.4f}")
    (out / "ddp_scaling.json").write_text(json.dumps({"results": results, "noise": noise}, indent=1))


if __name__ == "__main__":
    main()
