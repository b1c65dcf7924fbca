"""Inference latency per action chunk at batch 1: the low-dimensional Push-T policy (20-dim
observation, To=2, H=16, 2-dim action), with random weights (latency does not depend on them).

    python benchmarks/sampling_latency.py --device cpu --preset small --threads 2
    python benchmarks/sampling_latency.py --device cuda                  # default UNet, 65.8M

Samplers: DDIM with 10 steps, flow matching (Euler) with 10 steps and with 1 step. Each timed call
is a whole ``predict``: normalize the observation window, encode it, run the sampling loop,
unnormalize the chunk (the body of :meth:`Policy.predict`, with the network swappable).

Modes (``--modes``; on CPU only ``eager`` and ``compile`` apply):
- ``eager``: plain PyTorch.
- ``compile``: the network through ``torch.compile`` (inductor, default mode); the loop stays in
  Python.
- ``graph``: the whole sampling loop (and the normalizer and encoder) captured once in a CUDA graph
  (``torch.cuda.graph``) with static input and output buffers; a call copies the observation in,
  replays the graph and reads the chunk out. Valid because the loop has a fixed shape and
  schedule, does no host-device synchronisation and makes no host-to-device copies (the methods
  cache their time grids on the device), and the graph advances the CUDA RNG on every replay.
- ``compile+graph``: the compiled network inside the captured loop.
On CUDA every mode runs in fp32 and in bf16 (a bf16 copy of the weights, autocast around the
network so that GroupNorm runs in fp32; the sampler state stays fp32). Each row: median and p99 over ``--calls`` timed calls after ``--warmup`` calls, the device
synchronised around every call. A mode that fails is recorded with its error and the rest run on.
Writes a JSON file (``--out``) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from diffusion_policy.config import MethodConfig, PolicyConfig, TaskConfig
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.methods import build_method
from diffusion_policy.policy import Policy

H, TO, TA, DA = 16, 2, 8, 2
SHAPES = {"keypoint": (18,), "agent_pos": (2,)}
PRESETS = {
    # configs/policy/unet.yaml and unet_small.yaml
    "default": PolicyConfig(name="unet", down_dims=[256, 512, 1024], time_embed_dim=256),
    "small": PolicyConfig(name="unet", down_dims=[64, 128, 256], time_embed_dim=64),
}
SAMPLERS = {
    "ddim-10": (MethodConfig(name="diffusion", scheduler="ddim", num_inference_steps=10), 10),
    "flow-10": (MethodConfig(name="flow", integrator="euler", num_inference_steps=10), 10),
    "flow-1": (MethodConfig(name="flow", integrator="euler", num_inference_steps=1), 1),
}


def build_policy(preset: str, method_cfg: MethodConfig, device: torch.device) -> Policy:
    torch.manual_seed(0)
    task = TaskConfig(name="pusht", env_id="dp/PushT-v0", obs_keys=list(SHAPES), horizon=H,
                      n_obs_steps=TO, n_action_steps=TA)
    rng = np.random.default_rng(0)
    arrays = {k: rng.uniform(0, 512, (100, s[0])) for k, s in SHAPES.items()}
    arrays["action"] = rng.uniform(0, 512, (100, DA))
    normalizer = Normalizer.fit(arrays, {k: "minmax" for k in arrays})
    return Policy.build(task, PRESETS[preset], method_cfg, normalizer, SHAPES, DA).to(device).eval()


def chunk_fn(policy: Policy, net, num_steps: int, dtype: torch.dtype | None):
    """``obs -> (1, H, Da)`` raw chunk: Policy.predict's body with ``net`` in place of policy.net."""
    device = policy.device
    amp = (torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None
           else nullcontext())

    @torch.no_grad()
    def fn(obs):
        cond = policy.encode(obs)
        with amp:  # autocast reaches the network's ops; the sampler's own arithmetic is fp32
            x = policy.method.sample(net, cond, (cond.shape[0], H, DA), num_steps=num_steps)
        return policy.normalizer.unnormalize(policy.action_key, x.float())

    return fn


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture(fn, obs: dict, device: torch.device, warmup: int):
    """Capture ``fn(static_obs)`` in a CUDA graph; returns ``run(obs) -> chunk``."""
    static_obs = {k: v.clone() for k, v in obs.items()}
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
        for _ in range(max(3, warmup // 10)):
            fn(static_obs)
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_obs)

    def run(new_obs):
        for k, v in new_obs.items():
            static_obs[k].copy_(v, non_blocking=True)
        graph.replay()
        return static_out

    return run


def time_calls(run, obs, device, warmup: int, calls: int) -> tuple[list[float], torch.Tensor]:
    for _ in range(warmup):
        out = run(obs)
    sync(device)
    times = []
    for _ in range(calls):
        sync(device)
        t0 = time.perf_counter()
        out = run(obs)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, out


def get_net(nets: dict, compiled: bool, dtype_name: str):
    """The network for a row, built once and shared by the rows that need it: fp32 or a bf16
    copy (bf16 weights, so autocast has no weight casts to redo on every call), eager or through
    ``torch.compile`` (one compiled module per precision, reused by every sampler)."""
    key = (compiled, dtype_name)
    if key not in nets:
        if compiled:
            nets[key] = torch.compile(get_net(nets, False, dtype_name), dynamic=False)
        elif dtype_name == "bf16":
            nets[key] = copy.deepcopy(nets[(False, "fp32")]).to(torch.bfloat16)
        else:
            raise KeyError(key)
    return nets[key]


def bench_one(policy, nets: dict, sampler: str, mode: str, dtype_name: str, obs, args) -> dict:
    device = policy.device
    method_cfg, steps = SAMPLERS[sampler]
    policy.method = build_method(method_cfg)  # the methods are plain objects: swap, keep the net
    dtype = {"fp32": None, "bf16": torch.bfloat16}[dtype_name]
    row = {"sampler": sampler, "steps": steps, "mode": mode, "dtype": dtype_name}
    try:
        t0 = time.perf_counter()
        net = get_net(nets, "compile" in mode, dtype_name)
        fn = chunk_fn(policy, net, steps, dtype)
        if "graph" in mode:
            run = capture(fn, obs, device, args.warmup)
        else:
            run = fn
        run(obs)  # compiles on the first call
        sync(device)
        row["setup_s"] = round(time.perf_counter() - t0, 2)
        times, out = time_calls(run, obs, device, args.warmup, args.calls)
        if out.shape != (1, H, DA) or not torch.isfinite(out).all():
            raise RuntimeError(f"bad output: shape {tuple(out.shape)}, "
                               f"finite {bool(torch.isfinite(out).all())}")
        row.update(median_ms=float(np.median(times)), p99_ms=float(np.percentile(times, 99)),
                   mean_ms=float(np.mean(times)), calls=len(times))
    except Exception as e:  # record and go on: one failing mode must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if args.verbose:
            traceback.print_exc()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=list(PRESETS), default="default")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    p.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=list(SAMPLERS))
    p.add_argument("--modes", nargs="+", default=None, choices=["eager", "compile", "graph", "compile+graph"],
                   help="eager compile graph compile+graph (default: eager on CPU, all on CUDA)")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="default: fp32 on CPU, fp32 and bf16 on CUDA")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--out", default=None,
                   help="JSON path (default: $OUT, else the temp folder, /sampling_<device>_<preset>.json)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing modes")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but CUDA is not available")
        torch.backends.cudnn.benchmark = True
        modes = args.modes or ["eager", "compile", "graph", "compile+graph"]
        dtypes = args.dtypes or ["fp32", "bf16"]
        machine = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(args.threads)
        modes = args.modes or ["eager"]
        dtypes = args.dtypes or ["fp32"]
        bad = [m for m in modes if "graph" in m]
        if bad:
            raise SystemExit(f"--modes {bad} need CUDA (graphs are CUDA graphs); use eager/compile on CPU")
        machine = f"{cpu_model()}, {torch.get_num_threads()} torch threads"

    rows = []
    policy = build_policy(args.preset, SAMPLERS[args.samplers[0]][0], device)
    nets = {(False, "fp32"): policy.net}
    gen = torch.Generator().manual_seed(0)
    obs = {k: (torch.rand(1, TO, *s, generator=gen) * 512).to(device) for k, s in SHAPES.items()}
    for mode in modes:
        for dtype_name in dtypes:
            for sampler in args.samplers:
                row = bench_one(policy, nets, sampler, mode, dtype_name, obs, args)
                rows.append(row)
                status = row.get("error") or f"median {row['median_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms"
                print(f"{sampler:8s} {mode:14s} {dtype_name}: {status} (setup {row.get('setup_s')} s)",
                      flush=True)
    n_params = sum(p.numel() for p in policy.parameters())
    result = {
        "device": machine, "device_type": device.type, "preset": args.preset,
        "down_dims": list(PRESETS[args.preset].down_dims), "parameters": n_params,
        "torch": torch.__version__, "python": platform.python_version(), "batch": 1, "horizon": H,
        "calls": args.calls, "warmup": args.warmup, "rows": rows,
    }
    folder = os.environ.get("OUT") or tempfile.gettempdir()
    out = Path(args.out or Path(folder) / f"sampling_{device.type}_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    print(f"\n{machine}; preset {args.preset} ({n_params / 1e6:.2f}M parameters), batch 1, "
          f"torch {torch.__version__}; {args.calls} calls after {args.warmup} warm-up\n")
    print("| sampler | steps | mode | dtype | median ms | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['sampler']} | {r['steps']} | {r['mode']} | {r['dtype']} | "
                  f"failed: {r['error'][:80]} | |")
        else:
            print(f"| {r['sampler']} | {r['steps']} | {r['mode']} | {r['dtype']} | {r['median_ms']:.3f} | "
                  f"{r['p99_ms']:.3f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
