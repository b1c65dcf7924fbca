"""Training throughput (samples/s) of one optimizer step of the real training loss.

    python benchmarks/train_throughput.py --device cuda --out benchmarks/results/train_h100.json
    python benchmarks/train_throughput.py --device cpu --threads 2 --configs lowdim_small
    python benchmarks/train_throughput.py --configs image --dtypes bf16 --compile compiled --steps 10 --warmup 3

Configurations (synthetic data of the right shapes; the data pipeline is measured separately in
benchmarks/data_windows.py):
  lowdim        Push-T keypoints: 20-dim obs x To=2, 2-dim action, H=16, UNet [256,512,1024]
                (about 65M parameters), DDPM epsilon, batch 256
  image         Push-T image: 96x96 RGB + agent_pos, ResNet-18 GroupNorm encoder, UNet
                [256,512,1024], batch 64
  lowdim_small  the CPU preset (policy=unet_small), batch 256
Each is timed in fp32 and bf16 autocast, eager and torch.compile (on a CPU by default only fp32
eager); ``--dtypes`` and ``--compile`` select rows. AdamW is dp-train's (fused on CUDA, foreach
on a CPU; ``--no-fused-adam``: torch's default choice, foreach on CUDA). ``warmup_s`` is the time
of the warm-up steps, compilation included. Step ms is the median of steps each synchronized
(one step's latency); pipelined ms is the mean of the same number of steps run back to back with
one synchronization at the end, as dp-train runs them (the host queues the next step while the
device finishes the last).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_policy.config import compose
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.policy import Policy
from diffusion_policy.train import adamw_kwargs

CONFIGS = {
    "lowdim": dict(task="pusht", policy="unet", batch=256),
    "image": dict(task="pusht_image", policy="unet", batch=64),
    "lowdim_small": dict(task="pusht", policy="unet_small", batch=256),
}


def build(name: str, device: torch.device):
    spec = CONFIGS[name]
    cfg = compose("train", [f"task={spec['task']}", f"policy={spec['policy']}", "method=ddpm"])
    task = cfg.task
    shapes = {"keypoint": (18,), "agent_pos": (2,), "image": (96, 96, 3), "state": (5,)}
    shapes = {k: shapes[k] for k in task.obs_keys}
    rng = np.random.default_rng(0)
    fit = {k: rng.normal(size=(1000, *shapes[k])).astype(np.float32) for k in task.obs_keys if k not in task.image_keys}
    fit["action"] = rng.normal(size=(1000, 2)).astype(np.float32)
    modes = {k: "minmax" for k in fit} | {k: "image" for k in task.image_keys}
    policy = Policy.build(task, cfg.policy, cfg.method, Normalizer.fit(fit, modes), shapes, 2).to(device)
    B, To, H = spec["batch"], task.n_obs_steps, task.horizon
    batch = {"obs": {}, "action": torch.randn(B, H, 2, device=device)}
    for k, s in shapes.items():
        if k in task.image_keys:
            batch["obs"][k] = torch.randint(0, 255, (B, To, *s), dtype=torch.uint8, device=device)
        else:
            batch["obs"][k] = torch.randn(B, To, *s, device=device)
    return policy, batch, B


def time_config(name, device, bf16, compiled, steps, warmup, fused_adam=True, compile_mode="default") -> dict:
    torch.manual_seed(0)
    policy, batch, B = build(name, device)
    impl = adamw_kwargs(device) if fused_adam else {}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, **impl)
    loss_fn = torch.compile(policy.compute_loss, mode=compile_mode) if compiled else policy.compute_loss
    policy.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    sync()  # the same steps back to back with one sync at the end, as dp-train runs them: the
    t = time.perf_counter()  # host queues the next step while the device finishes this one
    for _ in range(steps):
        step()
    sync()
    pipelined = (time.perf_counter() - t) / steps
    return {"config": name, "batch": B, "dtype": "bf16" if bf16 else "fp32", "compiled": compiled,
            "adamw": next(iter(impl), "default"), "warmup_s": round(warmup_s, 1),
            "params_M": round(sum(p.numel() for p in policy.parameters()) / 1e6, 2),
            "step_ms_median": round(med * 1e3, 2), "samples_per_s": round(B / med, 1),
            "step_ms_pipelined": round(pipelined * 1e3, 2),
            "loss": round(float(loss), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="default: both on CUDA, fp32 on a CPU")
    ap.add_argument("--compile", nargs="+", default=None, choices=["eager", "compiled"],
                    help="default: both on CUDA, eager on a CPU")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (e.g. reduce-overhead)")
    ap.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True,
                    help="AdamW as dp-train makes it (fused on CUDA, foreach on a CPU)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    names = args.configs or (["lowdim", "image"] if device.type == "cuda" else ["lowdim_small"])
    cuda = device.type == "cuda"
    dtypes = args.dtypes or (["fp32", "bf16"] if cuda else ["fp32"])
    modes = args.compile or (["eager", "compiled"] if cuda else ["eager"])
    variants = [(d == "bf16", m == "compiled") for m in modes for d in dtypes]
    rows = []
    for name in names:
        for bf16, compiled in variants:
            try:
                r = time_config(name, device, bf16, compiled, args.steps, args.warmup, args.fused_adam,
                                args.compile_mode)
            except Exception as e:  # a failed variant is reported, not hidden
                r = {"config": name, "dtype": "bf16" if bf16 else "fp32", "compiled": compiled, "error": repr(e)[:200]}
            rows.append(r)
            print(json.dumps(r), flush=True)
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"\n{machine}\n| config | batch | dtype | compiled | AdamW | params (M) | step ms | samples/s | "
          f"pipelined ms | warm-up s |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | | {r['dtype']} | {r['compiled']} | | | error | {r['error']} | | |")
        else:
            print(f"| {r['config']} | {r['batch']} | {r['dtype']} | {r['compiled']} | {r['adamw']} | "
                  f"{r['params_M']} | {r['step_ms_median']} | {r['samples_per_s']} | {r['step_ms_pipelined']} | "
                  f"{r['warmup_s']} |")


if __name__ == "__main__":
    main()
