"""Inference latency per action chunk at batch 1: the low-dimensional Push-T policy (20-dim
observation, To=2, H=16, 2-dim action), with random weights (latency does not depend on them).

    python benchmarks/sampling_latency.py --device cpu --preset small --threads 2
    python benchmarks/sampling_latency.py --device cuda                  # default UNet, 65.8M

Samplers: DDIM with 10 steps, flow matching (Euler) with 10 steps and with 1 step. Each timed call
is a whole ``predict``: normalize the observation window, encode it, run the sampling loop,
unnormalize the chunk.

Modes (``--modes``; on CPU only ``direct``, ``eager`` and ``compile`` apply):
- ``direct``: ``Policy.predict``, the reference: the method's loop with the UNet's ``forward`` at
  every step (direct convolutions, FiLM recomputed per step, diffusers' scheduler step).
- ``eager``: :class:`FastPredictor` with ``layout="tokens"``: the method's sampling plan with the
  UNet's tokens layout op by op (FiLM tables once per chunk, each convolution one wide matrix
  product plus elementwise work), uncompiled.
- ``compile``: :class:`FastPredictor` with ``torch.compile`` of the tokens layout's per-step trunk; no graph.
- ``graph``: :class:`FastPredictor` without compile, the whole ``predict`` captured in one CUDA
  graph per shape (static inputs; a call copies the observation and noise in and replays).
- ``compile+graph``: both (what a robot's control loop should use on a GPU).
- ``fused+graph``: :class:`FastPredictor` with ``fused=True`` (the UNet's sampling path as one
  Triton kernel per convolution, the sampler's step in the last one) in a CUDA graph.
- ``autotune+graph``: as ``compile+graph`` with inductor's ``max-autotune-no-cudagraphs`` mode
  (benchmarks candidate matrix-product kernels while compiling).
On CUDA every mode runs in fp32 and in bf16 (a bf16 copy of the denoiser; GroupNorm statistics
and the sampler's state stay float32). Each row: median and p99 over ``--calls`` timed calls after
``--warmup`` calls, the device synchronised around every call. ``--batch`` takes several sizes
(e.g. ``1 50``: a robot, and an evaluation batch). A mode that fails is recorded with its error
and the rest run on.
Writes a JSON file (``--out``) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from diffusion_policy.config import MethodConfig, PolicyConfig, TaskConfig
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.fast.runner import UnetSampler
from diffusion_policy.inference import FastPredictor
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


def get_predictor(policy, cache: dict, mode: str, dtype_name: str):
    """The predictor for a row: ``Policy.predict`` itself (``direct`` in fp32), or a
    :class:`FastPredictor` (``direct`` in bf16: the reference loop with a bf16 copy; ``eager``:
    the tokens layout op by op; compile, CUDA graph, fused), built once per (mode, precision) and
    shared by the samplers (a compiled trunk is reused; graphs are captured per sampler)."""
    key = (mode, dtype_name)
    if key not in cache:
        if mode == "direct" and dtype_name == "fp32":
            cache[key] = policy
        else:
            compiled = ("max-autotune-no-cudagraphs" if "autotune" in mode else "compile" in mode)
            layout = {"direct": "reference", "eager": "tokens"}.get(mode)
            cache[key] = FastPredictor(policy, dtype=dtype_name, compile=compiled, cuda_graph="graph" in mode,
                                       fused="fused" in mode, layout=layout)
    pred = cache[key]
    if isinstance(pred, FastPredictor):
        pred.reset()  # the sampler changed: capture again
    return pred


def bench_one(policy, cache: dict, sampler: str, mode: str, dtype_name: str, obs, args) -> dict:
    device = policy.device
    method_cfg, steps = SAMPLERS[sampler]
    policy.method = build_method(method_cfg)  # the methods are plain objects: swap, keep the net
    row = {"sampler": sampler, "steps": steps, "mode": mode, "dtype": dtype_name,
           "batch": next(iter(obs.values())).shape[0]}
    try:
        t0 = time.perf_counter()
        pred = get_predictor(policy, cache, mode, dtype_name)

        def run(o):
            return pred.predict(o, num_steps=steps)

        run(obs)  # compiles and captures on the first call
        sync(device)
        row["setup_s"] = round(time.perf_counter() - t0, 2)
        times, out = time_calls(run, obs, device, args.warmup, args.calls)
        if out.shape != (row["batch"], H, DA) or not torch.isfinite(out).all():
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
    p.add_argument("--modes", nargs="+", default=None,
                   choices=["direct", "eager", "compile", "graph", "compile+graph", "fused+graph", "autotune+graph"],
                   help="direct eager compile graph compile+graph (default: direct and eager on CPU, all on CUDA)")
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes (chunks per call)")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="default: fp32 on CPU, fp32 and bf16 on CUDA")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--out", default=None,
                   help="JSON path (default: $OUT, else the temp folder, /sampling_<device>_<preset>.json)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing modes")
    p.add_argument("--fused-max-batch", type=int, default=None,
                   help="largest batch the fused mode runs fused (UnetSampler.fused_max_batch; "
                        "above it the compiled layout's path runs); to measure where the two cross")
    p.add_argument("--profile", nargs="*", default=None, metavar="MODE",
                   help="after the table, profile 5 batch-1 DDIM-10 calls of each named mode (first of "
                        "--dtypes) and print the 25 costliest device kernels (where the time goes)")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but CUDA is not available")
        torch.backends.cudnn.benchmark = True
        modes = args.modes or ["direct", "eager", "compile", "graph", "compile+graph"]
        dtypes = args.dtypes or ["fp32", "bf16"]
        machine = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(args.threads)
        modes = args.modes or ["direct", "eager"]
        dtypes = args.dtypes or ["fp32"]
        bad = [m for m in modes if "graph" in m]
        if bad:
            raise SystemExit(f"--modes {bad} need CUDA (graphs are CUDA graphs); use eager/compile on CPU")
        machine = f"{cpu_model()}, {torch.get_num_threads()} torch threads"

    if args.fused_max_batch is not None:
        UnetSampler.fused_max_batch = args.fused_max_batch
    rows = []
    policy = build_policy(args.preset, SAMPLERS[args.samplers[0]][0], device)
    cache: dict = {}
    gen = torch.Generator().manual_seed(0)
    for batch in args.batch:
        obs = {k: (torch.rand(batch, TO, *s, generator=gen) * 512).to(device) for k, s in SHAPES.items()}
        for mode in modes:
            for dtype_name in dtypes:
                for sampler in args.samplers:
                    row = bench_one(policy, cache, sampler, mode, dtype_name, obs, args)
                    rows.append(row)
                    status = row.get("error") or f"median {row['median_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms"
                    print(f"B={batch} {sampler:8s} {mode:14s} {dtype_name}: {status} (setup {row.get('setup_s')} s)",
                          flush=True)
    n_params = sum(p.numel() for p in policy.parameters())
    result = {
        "device": machine, "device_type": device.type, "preset": args.preset,
        "down_dims": list(PRESETS[args.preset].down_dims), "parameters": n_params,
        "torch": torch.__version__, "python": platform.python_version(), "horizon": H,
        "calls": args.calls, "warmup": args.warmup, "rows": rows,
    }
    folder = os.environ.get("OUT") or tempfile.gettempdir()
    out = Path(args.out or Path(folder) / f"sampling_{device.type}_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    print(f"\n{machine}; preset {args.preset} ({n_params / 1e6:.2f}M parameters), "
          f"torch {torch.__version__}; {args.calls} calls after {args.warmup} warm-up\n")
    print("| batch | sampler | steps | mode | dtype | median ms | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['sampler']} | {r['steps']} | {r['mode']} | {r['dtype']} | "
                  f"failed: {r['error'][:80]} | |")
        else:
            print(f"| {r['batch']} | {r['sampler']} | {r['steps']} | {r['mode']} | {r['dtype']} | "
                  f"{r['median_ms']:.3f} | {r['p99_ms']:.3f} |")
    print(f"\nwrote {out}")
    for mode in args.profile or []:
        profile(policy, cache, mode, dtypes[0], args, device)


def profile(policy, cache, mode: str, dtype_name: str, args, device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    policy.method = build_method(SAMPLERS["ddim-10"][0])
    pred = get_predictor(policy, cache, mode, dtype_name)
    obs = {k: (torch.rand(1, TO, *s) * 512).to(device) for k, s in SHAPES.items()}
    for _ in range(3):
        pred.predict(obs, num_steps=10)
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(5):
            pred.predict(obs, num_steps=10)
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: {mode} {dtype_name}, 5 DDIM-10 calls at batch 1")
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
