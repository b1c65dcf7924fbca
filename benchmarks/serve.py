"""Loop latency through ``dp-serve`` on loopback against a local ``predict``, at batch 1.

    python benchmarks/serve.py --threads 2 --calls 200
    python benchmarks/serve.py --threads 2 --calls 200 --compile        # both sides compiled

The policy is the low-dimensional Push-T one of benchmarks/sampling_latency.py (small UNet, 4.23M
parameters, DDIM-10; random weights: latency does not depend on them), saved to a temporary
folder. First ``predict`` is timed in this process (``Policy.predict``, or a ``FastPredictor``
with ``--compile``); then the real ``dp-serve`` runs it in a child process and this process times
``RemotePolicy.predict`` round trips over loopback: the client's packing and unpacking, the
websocket, the server's checks, queue and inference. Each call is one observation window
``(1, To, ...)`` and one chunk ``(1, H, Da)`` back, as a robot's control loop sends them. The
server reports its own timings, so the round trip splits into inference and the rest
(``overhead`` = round trip - server inference: serialization, transport, checks). The first
remote chunk is compared with the local predictor's for the same seed (max absolute difference:
0 when both run the same eager code).

Prints a markdown table and writes ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sampling_latency import SAMPLERS, SHAPES, TO, build_policy, cpu_model

from diffusion_policy.inference import FastPredictor
from diffusion_policy.serving.client import RemotePolicy

STARTUP_S = 300


def stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "calls": len(a)}


def window(rng: np.random.Generator) -> dict:
    return {k: rng.uniform(0, 512, (1, TO, *s)).astype(np.float32) for k, s in SHAPES.items()}


def time_local(predictor, calls: int, warmup: int) -> list[float]:
    rng, times = np.random.default_rng(0), []
    for i in range(warmup + calls):
        obs = {k: torch.from_numpy(v) for k, v in window(rng).items()}
        t0 = time.perf_counter()
        predictor.predict(obs, generator=torch.Generator().manual_seed(i))
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_remote(client: RemotePolicy, calls: int, warmup: int) -> dict:
    rng, rows = np.random.default_rng(0), {"round_trip": [], "inference": [], "overhead": [], "queue": []}
    for i in range(warmup + calls):
        client.predict(window(rng), seed=i)
        if i >= warmup:
            t = client.last_timings
            rows["round_trip"].append(t["round_trip_ms"])
            rows["inference"].append(t["server_inference_ms"])
            rows["queue"].append(t["server_queue_ms"])
            rows["overhead"].append(t["round_trip_ms"] - t["server_inference_ms"])
    return {k: stats(v) for k, v in rows.items()}


def start_server(policy_dir: Path, port: int, threads: int, compile: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_policy.serve", f"checkpoint={policy_dir}",
                             f"port={port}", "device=cpu", f"compile={str(compile).lower()}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("dp-serve: serving"):
            return proc
    proc.kill()
    raise RuntimeError(f"dp-serve did not start (exit {proc.poll()})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the local predict and the server")
    ap.add_argument("--sampler", default="ddim-10", choices=list(SAMPLERS))
    ap.add_argument("--compile", action="store_true", help="FastPredictor(compile=True) on both sides")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    method_cfg, _ = SAMPLERS[args.sampler]
    policy = build_policy("small", method_cfg, torch.device("cpu"))
    predictor = FastPredictor(policy, compile=True) if args.compile else policy
    local = stats(time_local(predictor, args.calls, args.warmup))

    with tempfile.TemporaryDirectory() as tmp:
        policy_dir = policy.save(Path(tmp) / "policy")
        port = free_port()
        proc = start_server(policy_dir, port, args.threads, args.compile)
        try:
            client = RemotePolicy(f"ws://127.0.0.1:{port}", timeout_s=120)
            obs = window(np.random.default_rng(5))
            # the same predictor here as in the server (compiled code may round differently from eager)
            want = predictor.predict({k: torch.from_numpy(v) for k, v in obs.items()},
                                     generator=torch.Generator().manual_seed(7)).numpy()
            diff = float(np.abs(client.predict(obs, seed=7) - want).max())
            remote = time_remote(client, args.calls, args.warmup)
            client.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    result = {"machine": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
              "threads": args.threads, "sampler": args.sampler, "compile": args.compile,
              "load_average": os.getloadavg(), "first_chunk_max_abs_diff_to_local": diff,
              "local_predict": local, "remote": remote}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{result['machine']}, torch {result['torch']}, {args.threads} threads, {args.sampler}, "
          f"compile={args.compile}, load average {', '.join(f'{x:.1f}' for x in result['load_average'])}, "
          f"first remote chunk - local chunk (same seed): max |diff| {diff:.3g}\n")
    print("| path | p50 ms | p99 ms | mean ms |\n| --- | --- | --- | --- |")
    rows = [("local predict", local), ("dp-serve round trip", remote["round_trip"]),
            ("  server inference", remote["inference"]), ("  server queue", remote["queue"]),
            ("  overhead (round trip - inference)", remote["overhead"])]
    for name, s in rows:
        print(f"| {name} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['mean_ms']:.2f} |")


if __name__ == "__main__":
    main()
