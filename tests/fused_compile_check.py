"""Compile every kernel launch of the default UNet's fused sampling path for sm_90 (Hopper) with
Triton's own compiler and ptxas, without a GPU. Run by tests/test_fused_unet.py in a process
without Triton's interpreter; prints how many launches and kernel variants it compiled."""
import inspect

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import diffusion_policy.nets.fused_kernels as kernels
from diffusion_policy.step_update import StepUpdate
from diffusion_policy.nets.fused_unet import FusedUnet
from diffusion_policy.nets.unet1d import ConditionalUnet1D

TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.int32: "*i32"}


def main() -> None:
    kernel = kernels.conv_kernel
    calls = []

    class Recorder:  # stands in for the kernel: records each launch's arguments
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((args, kwargs))

    kernels.conv_kernel = Recorder()
    net = ConditionalUnet1D(2, 10).to(torch.bfloat16).eval().requires_grad_(False)
    update = StepUpdate([(0.0, 0.0, 1.0, 0.0, -0.5, float("inf"))] * 2, torch.device("cpu"))
    with torch.no_grad():
        FusedUnet(net).prepare(torch.randn(1, 10), torch.tensor([1000.0, 500.0]), update)(torch.randn(1, 16, 2), 1)
    kernels.conv_kernel = kernel
    names = list(inspect.signature(kernel.fn).parameters)
    variants = {}
    for args, kwargs in calls:
        kwargs = {k: v for k, v in kwargs.items() if k != "num_warps"}
        variants[tuple(sorted(kwargs.items()))] = (args, kwargs)
    for args, kwargs in variants.values():
        sig = {n: TYPES[v.dtype] if isinstance(v, torch.Tensor) else "fp32" if isinstance(v, float) else "i32"
               for n, v in zip(names, args)}
        sig.update({n: "constexpr" for n in kwargs})
        src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in kwargs.items()})
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
    print(f"{len(calls)} launches, {len(variants)} kernel variants compiled for sm_90")


if __name__ == "__main__":
    main()
