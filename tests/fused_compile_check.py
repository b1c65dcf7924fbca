"""Compile every kernel launch of the fused sampling path for sm_90 (Hopper) with Triton's own
compiler and ptxas, without a GPU: the default UNet in bf16, and the small float32 UNet of the
GPU tests with 16 input channels per program (tiles small enough to have crashed a compiler
pass once). Run by tests/test_fused_unet.py in a process without Triton's interpreter; prints
how many launches and kernel variants it compiled for each."""
import inspect

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

import diffusion_policy.fast.fused_kernels as kernels
from diffusion_policy.fast.fused_unet import FusedUnet
from diffusion_policy.nets.unet1d import ConditionalUnet1D
from diffusion_policy.step_update import StepUpdate


def main(net: ConditionalUnet1D | None = None) -> list:
    """Compile every launch of ``net`` (default: the default UNet in bf16); returns each variant's
    ``(arguments, compiled kernel)``."""
    kernel = kernels.conv_kernel
    calls = []

    class Recorder:  # stands in for the kernel: records each launch's arguments
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((args, kwargs))

    kernels.conv_kernel = Recorder()
    if net is None:
        net = ConditionalUnet1D(2, 10).to(torch.bfloat16).eval().requires_grad_(False)
    update = StepUpdate([(0.0, 0.0, 1.0, 0.0, -0.5, float("inf"))] * 2, torch.device("cpu"))
    with torch.no_grad():
        FusedUnet(net).prepare(torch.randn(1, 10), torch.tensor([1000.0, 500.0]), update)(torch.randn(1, 16, 2), 1)
    kernels.conv_kernel = kernel
    names = list(inspect.signature(kernel.fn).parameters)
    variants, compiled = {}, []
    for args, kwargs in calls:
        # as on a Hopper GPU: programmatic dependent launch on (on the CPU the planner turns it off)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "launch_pdl")} | {"PDL": True}
        # the launcher's specialization: pointers and integers divisible by 16 get that hint (the
        # loads' vector width depends on it), an integer 1 becomes a constant
        spec = tuple(native_specialize_impl(BaseBackend, v, False, n not in kernel.do_not_specialize, True)
                     for n, v in zip(names, args))
        variants[(spec, tuple(sorted(kwargs.items())))] = (args, spec, kwargs)
    for args, spec, kwargs in variants.values():
        sig, attrs, consts = {}, {}, {(names.index(n),): v for n, v in kwargs.items()}
        for i, (n, (ty, key)) in enumerate(zip(names, spec)):
            sig[n] = ty
            if ty == "constexpr":
                consts[(i,)] = key
            elif key == "D":
                attrs[(i,)] = BaseBackend.parse_attr(key)
        sig.update({n: "constexpr" for n in kwargs})
        src = ASTSource(kernel, sig, constexprs=consts, attrs=attrs)
        compiled.append((dict(zip(names, args)) | kwargs, triton.compile(src, target=GPUTarget("cuda", 90, 32))))
        assert compiled[-1][1].asm["cubin"]
    print(f"{len(calls)} launches, {len(variants)} kernel variants compiled for sm_90")
    return compiled


if __name__ == "__main__":
    main()
    FusedUnet.block_k = 16
    main(ConditionalUnet1D(2, 10, down_dims=[32, 64, 128], n_groups=2, time_embed_dim=32).eval().requires_grad_(False))
