"""Before and after for the fused sampling path, in one process on one GPU: the fused kernels of
an earlier commit against the working tree's, alternated, each timed as a whole DDIM-10
``predict`` at batch 1 (bf16, CUDA graph) and as the graph's replay alone.

    python3 benchmarks/fused_compare.py --ref 621cb66          # in a git checkout, on CUDA

The reference's ``fused_unet.py`` and ``fused_kernels.py`` (in ``diffusion_policy/fast/``, or
``diffusion_policy/nets/`` for commits before the fast package) are read with ``git show REF:path``
into two modules in a temporary folder and stand in for the current ones while its predictor is
built; everything else (the policy, the methods, ``FastPredictor``) is the working
tree's, so the difference is the kernels and their plan alone. Separate processes move the same
code's figure by more than the repeats inside one do (``benchmarks/sampling.md``): compare
within one run of this script.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_latency import SAMPLERS, SHAPES, TO, build_policy, time_calls  # noqa: E402

import diffusion_policy.fast.fused_unet as current  # noqa: E402
from diffusion_policy.inference import FastPredictor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("diffusion_policy/fast", "diffusion_policy/nets")  # where the files are, newest first


def git_show(ref: str, path: str) -> str | None:
    done = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def load_ref(ref: str, folder: Path):
    """The fused planner of commit ``ref`` as a module, importing that commit's kernels."""
    name = "fused_ref_" + re.sub(r"\W", "_", ref)
    where = next((f for f in FOLDERS if git_show(ref, f"{f}/fused_unet.py") is not None), None)
    if where is None:
        raise SystemExit(f"--ref {ref}: git show found no fused_unet.py in {' or '.join(FOLDERS)}")
    kernels = where.replace("/", ".") + ".fused_kernels"
    for path, mod in (("fused_kernels.py", f"{name}_kernels"), ("fused_unet.py", name)):
        src = git_show(ref, f"{where}/{path}")
        if src is None:
            raise SystemExit(f"--ref {ref}: git show found no {where}/{path}")
        if path == "fused_unet.py":
            if f"from {kernels} import" not in src:
                raise SystemExit(f"--ref {ref}: its fused_unet.py has no 'from {kernels} import' line, "
                                 "expected one (the planner imports its kernels from there)")
            src = src.replace(f"from {kernels} import", f"from {name}_kernels import")
            # planners from before the fast package asked the UNet for its blocks
            src = src.replace("net._blocks()", "__import__('diffusion_policy.fast.tokens', "
                                               "fromlist=['film_blocks']).film_blocks(net)")
        file = folder / f"{mod}.py"
        file.write_text(src)
        spec = importlib.util.spec_from_file_location(mod, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod] = module  # Triton's decorators look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


def measure(module, policy, obs, calls: int) -> tuple[np.ndarray, np.ndarray]:
    """(predict times, replay times) with ``module`` as the fused planner."""
    sys.modules[current.__name__] = module  # UnetSampler imports FusedUnet from here when it plans
    try:
        fast = FastPredictor(policy, dtype="bf16", fused=True)  # its own copy of the net: plans anew
        dev = torch.device("cuda")
        t, _ = time_calls(lambda o: fast.predict(o, num_steps=10), obs, dev, 20, calls)
        graph = next(iter(fast._graphs.values())).graph
        g, _ = time_calls(lambda o: graph.replay(), obs, dev, 0, calls)
        return np.array(t), np.array(g)
    finally:
        sys.modules[current.__name__] = current


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="the commit whose fused kernels are the 'before'")
    p.add_argument("--rounds", type=int, default=2, help="alternations of before and after")
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the fused kernels run on CUDA; this machine has no CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        ref = load_ref(args.ref, Path(tmp))
        policy = build_policy("default", SAMPLERS["ddim-10"][0], torch.device("cuda"))
        obs = {k: (torch.rand(1, TO, *s) * 512).cuda() for k, s in SHAPES.items()}
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; DDIM-10, batch 1, bf16, "
              f"CUDA graph; {args.calls} calls after 20")
        print("| round | kernels | predict median ms | p99 ms | replay median ms |")
        print("| --- | --- | --- | --- | --- |")
        for r in range(args.rounds):
            for label, module in ((args.ref, ref), ("working tree", current)):
                t, g = measure(module, policy, obs, args.calls)
                print(f"| {r + 1} | {label} | {np.median(t):.3f} | {np.percentile(t, 99):.3f} | "
                      f"{np.median(g):.3f} |", flush=True)


if __name__ == "__main__":
    main()
