"""Per-kernel device times of one fused-path network call (diagnostics): which convolution costs
what. ``python3 benchmarks/fused_profile.py`` on a CUDA machine."""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sampling_latency import SAMPLERS, SHAPES, TO, build_policy
from diffusion_policy.inference import FastPredictor
from diffusion_policy.nets.fused_unet import fused_sampler


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    policy = build_policy("default", SAMPLERS["ddim-10"][0], torch.device("cuda"))
    fast = FastPredictor(policy, dtype=args.dtype, fused=True)
    obs = {k: (torch.rand(args.batch, TO, *s) * 512).cuda() for k, s in SHAPES.items()}
    for _ in range(5):
        fast.predict(obs, num_steps=10)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fast.predict(obs, num_steps=10)
        torch.cuda.synchronize()
    kernels = sorted([e for e in prof.events() if e.device_type.name == "CUDA" and "conv_kernel" in e.name],
                     key=lambda e: e.time_range.start)
    launches, _ = fused_sampler(fast.net)._plan(16)
    n = len(launches)
    print(f"{len(kernels)} conv_kernel launches, {n} per network call")
    step = kernels[n : 2 * n]  # the second step
    t0 = step[0].time_range.start
    for ln, e in zip(launches, step):
        c = ln.consts
        print(f"{e.time_range.start - t0:8.1f} us  {e.time_range.elapsed_us():6.2f} us  "
              f"in {c['CA']}+{c['CB']} out {ln.O} L {ln.a.L}->{ln.L_out} k{c['KT']} split {c['SPLIT']} "
              f"BK {c['BK']} tiles {ln.w.shape[0]}{'+skip' if ln.ws is not None else ''}")
    span = step[-1].time_range.end - step[0].time_range.start
    busy = sum(e.time_range.elapsed_us() for e in step)
    print(f"one network call: {span:.1f} us from first start to last end, {busy:.1f} us in kernels")


if __name__ == "__main__":
    main()
