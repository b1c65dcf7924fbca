"""All-reduce bandwidth between the GPUs of one host, at the size of the UNet's gradients.

    torchrun --standalone --nproc_per_node=2 benchmarks/allreduce_bw.py --json $OUT/allreduce.json
    torchrun --standalone --nproc_per_node=2 benchmarks/allreduce_bw.py --device cpu --mb 8   # gloo

Sums a 263 MB fp32 tensor across the ranks (65.78M parameters x 4 bytes: the default UNet's
gradients, what DDP all-reduces every step) and the same number of elements in bf16 (what
``ddp_comm=bf16`` sends), each as one call and as DDP-sized buckets (25 MiB of fp32 gradients per
call, DDP's default ``bucket_cap_mb``); 20 timed iterations after 5 warm-up, slowest rank. Prints
ms per all-reduce, algorithm bandwidth (bytes / time) and bus bandwidth (x 2(n-1)/n, the
nccl-tests convention: what each link carries in a ring all-reduce).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_all_reduce(chunks: list, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per all-reduce of every chunk, the slowest rank's."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for c in chunks:
            dist.all_reduce(c)
    sync()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(iters):
        for c in chunks:
            dist.all_reduce(c)
    sync()
    dt = torch.tensor([(time.perf_counter() - t) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    ap.add_argument("--mb", type=float, default=263.1, help="size of the fp32 tensor in MB (1e6 bytes)")
    ap.add_argument("--bucket-mb", type=float, default=25, help="DDP bucket size in MiB of fp32 (0: only one call)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default="", help="write the results here (rank 0)")
    args = ap.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    numel = int(args.mb * 1e6 / 4)
    bucket_numel = int(args.bucket_mb * 2**20 / 4)  # DDP's buckets hold fp32 gradients
    rows = []
    for name in args.dtypes:
        x = torch.zeros(numel, dtype=DTYPES[name], device=device)  # values do not change the speed
        splits = [("one call", [x])]
        if 0 < bucket_numel < numel:
            splits.append((f"{args.bucket_mb:g} MiB buckets", list(x.split(bucket_numel))))
        for label, chunks in splits:
            sec = time_all_reduce(chunks, args.iters, args.warmup, device)
            nbytes = numel * x.element_size()
            algbw = nbytes / sec / 1e9
            rows.append({"dtype": name, "split": label, "calls": len(chunks), "MB": round(nbytes / 1e6, 1),
                         "ms": round(sec * 1e3, 3), "algbw_GBps": round(algbw, 1),
                         "busbw_GBps": round(algbw * 2 * (world - 1) / world, 1)})
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
        del x, splits
    if rank == 0:
        machine = {"world": world, "backend": dist.get_backend(), "torch": torch.__version__,
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        if device.type == "cuda":
            machine["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        print(f"\n{machine}\n| dtype | split | calls | MB | ms | algbw GB/s | busbw GB/s |\n"
              "|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['dtype']} | {r['split']} | {r['calls']} | {r['MB']} | {r['ms']} | {r['algbw_GBps']} | "
                  f"{r['busbw_GBps']} |", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
