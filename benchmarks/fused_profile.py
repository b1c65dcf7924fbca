"""The fused sampling path's settings on a GPU. A config is
``block_k:num_warps[:pdl[:block_n_wide[:partials[:wide_channels]]]]`` (``FusedUnet``'s
attributes; omitted ones take its defaults): the most input channels one program reads when its
input needs no GroupNorm; warps per program; programmatic dependent launch ``off``, ``early``
(the next kernel launches as each program starts) or ``late`` (as each program ends); output
channels per program in layers of ``wide_channels`` channels or more; ``fp32`` or ``bf16``
partial sums. For each: the median DDIM-10 ``predict`` at batch 1 (bf16, CUDA graph); then, for
the best (``--all``: for each):
- where a ``predict`` call's time goes: the whole call, the graph's replay alone, the replay's
  device time (CUDA events);
- every kernel's device time in one network call (which convolution costs what), and the
  kernels outside the network calls.

    cd benchmarks && python3 fused_profile.py --configs 128:4 128:4:off 128:4:late:16 128:4:late:64:bf16

``--ncu``: instead, run one network call's kernels outside a graph between
``cudaProfilerStart``/``Stop``, for Nsight Compute:

    ncu --profile-from-start off -k regex:conv_kernel --section SpeedOfLight \\
        python3 fused_profile.py --ncu
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sampling_latency import SAMPLERS, SHAPES, TO, build_policy
from torch.profiler import ProfilerActivity, profile

from diffusion_policy.fast.fused_unet import PDL_MODES, FusedUnet
from diffusion_policy.inference import FastPredictor

DEFAULTS = {k: getattr(FusedUnet, k) for k in ("pdl", "block_n_wide", "wide_channels")}


def predictor(policy, dtype: str, config: str, **kw) -> FastPredictor:
    parts = config.split(":")
    if not 2 <= len(parts) <= 6 or (len(parts) >= 3 and parts[2] not in PDL_MODES):
        raise SystemExit(f"a config is block_k:num_warps[:pdl[:block_n_wide[:partials[:wide_channels]]]] "
                         f"with pdl one of {list(PDL_MODES)} and partials fp32 or bf16, got {config!r}")
    FusedUnet.block_k, FusedUnet.num_warps = int(parts[0]), int(parts[1])
    FusedUnet.pdl = parts[2] if len(parts) >= 3 else DEFAULTS["pdl"]
    FusedUnet.block_n_wide = int(parts[3]) if len(parts) >= 4 else DEFAULTS["block_n_wide"]
    FusedUnet.partials = {"fp32": torch.float32, "bf16": torch.bfloat16}[parts[4]] if len(parts) >= 5 else torch.float32
    FusedUnet.wide_channels = int(parts[5]) if len(parts) >= 6 else DEFAULTS["wide_channels"]
    return FastPredictor(policy, dtype=dtype, fused=True, **kw)  # a fresh copy of the net: plans anew


def timed(fn, calls: int) -> float:
    """Median milliseconds of ``fn()`` with the device synchronised around each call."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def median_ms(fast, obs, calls: int) -> float:
    for _ in range(5):
        fast.predict(obs, num_steps=10)
    return timed(lambda: fast.predict(obs, num_steps=10), calls)


def breakdown(fast, obs, calls: int) -> None:
    """A ``predict`` call against its graph's replay alone and the replay's device time."""
    graph = next(iter(fast._graphs.values())).graph
    whole = timed(lambda: fast.predict(obs, num_steps=10), calls)
    replay = timed(graph.replay, calls)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    device = []
    for _ in range(calls):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        device.append(start.elapsed_time(end))
    print(f"predict {whole:.3f} ms; graph replay alone {replay:.3f} ms (host to host); "
          f"replay on the device {np.median(device):.3f} ms (CUDA events); medians of {calls}")


def kernel_table(fast, obs) -> None:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fast.predict(obs, num_steps=10)
        torch.cuda.synchronize()
    kernels = sorted([e for e in prof.events() if e.device_type.name == "CUDA"], key=lambda e: e.time_range.start)
    conv = [e for e in kernels if "conv_kernel" in e.name]
    launches, _ = fast.sampler.fused_unet()._plan(16)
    n = len(launches)
    step = conv[n : 2 * n]  # the second network call
    t0 = step[0].time_range.start
    for ln, e in zip(launches, step):
        c = ln.consts
        print(f"{e.time_range.start - t0:8.1f} us  {e.time_range.elapsed_us():6.2f} us  "
              f"in {c['CA']}+{c['CB']} out {ln.O} L {ln.a.L}->{ln.L_out} k{c['KT']} BK {c['BK']} "
              f"split {ln.split} tiles {ln.w.shape[0]}{'+skip' if ln.ws is not None else ''}")
    span = step[-1].time_range.end - step[0].time_range.start
    busy = sum(e.time_range.elapsed_us() for e in step)
    print(f"one network call: {span:.1f} us from first start to last end, {busy:.1f} us in kernels")
    others = [e for e in kernels if "conv_kernel" not in e.name]
    total = kernels[-1].time_range.end - kernels[0].time_range.start
    print(f"whole call on the device: {total:.1f} us from first kernel start to last end; "
          f"{len(conv)} fused kernels, {len(others)} others ({sum(e.time_range.elapsed_us() for e in others):.1f} us):")
    for e in others:
        print(f"   {e.time_range.start - kernels[0].time_range.start:8.1f} us  {e.time_range.elapsed_us():6.2f} us  "
              f"{e.name[:90]}")


def ncu_call(policy, dtype: str, config: str) -> None:
    """One network call's kernels, launched one by one, between cudaProfilerStart and Stop."""
    fast = predictor(policy, dtype, config, cuda_graph=False)
    obs = {k: (torch.rand(1, TO, *s) * 512).cuda() for k, s in SHAPES.items()}
    for _ in range(2):
        fast.predict(obs, num_steps=1)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fast.predict(obs, num_steps=1)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    for ln in fast.sampler.fused_unet()._plan(16)[0]:
        c = ln.consts
        print(f"in {c['CA']}+{c['CB']} out {ln.O} L {ln.a.L}->{ln.L_out} k{c['KT']} BK {c['BK']} "
              f"split {ln.split} tiles {ln.w.shape[0]}{'+skip' if ln.ws is not None else ''}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--configs", nargs="+", default=["128:4"],
                   help="block_k:num_warps[:pdl[:block_n_wide[:partials[:wide_channels]]]]")
    p.add_argument("--ncu", action="store_true", help="one network call for Nsight Compute (first config)")
    p.add_argument("--all", action="store_true", help="breakdown and kernel table for every config, not just the best")
    args = p.parse_args()
    policy = build_policy("default", SAMPLERS["ddim-10"][0], torch.device("cuda"))
    print(torch.cuda.get_device_name(), torch.__version__)
    if args.ncu:
        ncu_call(policy, args.dtype, args.configs[0])
        return
    obs = {k: (torch.rand(1, TO, *s) * 512).cuda() for k, s in SHAPES.items()}
    results = {}
    for config in args.configs:
        t0 = time.perf_counter()
        fast = predictor(policy, args.dtype, config)
        results[config] = median_ms(fast, obs, args.calls)
        print(f"{config:>12}: DDIM-10 median {results[config]:.3f} ms ({time.perf_counter() - t0:.0f} s)", flush=True)
    best = min(results, key=results.get)
    print(f"best {best}: {results[best]:.3f} ms")
    for config in args.configs if args.all else [best]:
        print(f"\n{config}:")
        fast = predictor(policy, args.dtype, config)
        median_ms(fast, obs, 3)  # capture the graph: the profiled call replays it
        breakdown(fast, obs, args.calls)
        kernel_table(fast, obs)


if __name__ == "__main__":
    main()
