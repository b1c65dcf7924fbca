"""The fused sampling path (one Triton kernel per convolution) computes the UNet's forward, and
the method's sampling plan run with it gives the reference loop's chunk.

On the CPU the kernels run in Triton's interpreter (slow: seconds per network call, so the
networks are small and the calls few) with float32 weights (the interpreter has no bfloat16):
the plain output at both tilings, and DDIM with its step in the last kernel and a prefix. The
other plan kinds differ from these only in the shared loop (``fast.runner.run_plan``, checked
for every sampler with the tokens layout in tests/test_inference.py). With CUDA every sampler
runs fused against the reference, and bf16 within bf16 tolerance.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from diffusion_policy.fast.runner import UnetSampler  # noqa: E402
from diffusion_policy.inference import FastPredictor  # noqa: E402
from diffusion_policy.methods import DiffusionMethod, FlowMatching  # noqa: E402
from diffusion_policy.nets.unet1d import ConditionalUnet1D  # noqa: E402

DA, TO, F = 2, 2, 5


@pytest.fixture(scope="module")
def device():
    """CUDA when there is one (compiled kernels), else the CPU through Triton's interpreter
    (conftest.py turns it on before triton is imported)."""
    if torch.cuda.is_available():
        torch.backends.cudnn.allow_tf32 = False  # the float32 reference: no TF32 convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and Triton's interpreter is off (TRITON_INTERPRET)")
    return torch.device("cpu")


def small_unet(device, down_dims=(32, 64, 128), n_groups=2) -> ConditionalUnet1D:
    torch.manual_seed(0)
    net = ConditionalUnet1D(DA, TO * F, down_dims=list(down_dims), n_groups=n_groups, time_embed_dim=32)
    for m in net.modules():  # GroupNorm's affine away from (1, 0), so that it is checked
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.to(device).eval().requires_grad_(False)


@pytest.mark.parametrize("block_k", [128, 16])
def test_fused_path_equals_forward(device, monkeypatch, block_k):
    """Few and many programs per output tile (the input channels split between them)."""
    from diffusion_policy.fast.fused_unet import FusedUnet

    monkeypatch.setattr(FusedUnet, "block_k", block_k)
    net = small_unet(device)
    B, H = 2, 16
    cond, x = torch.randn(B, TO, F, device=device), torch.randn(B, H, DA, device=device)
    times = torch.tensor([999.0, 37.0], device=device)
    f = FusedUnet(net).prepare(cond, times)
    for i in range(2):  # the FiLM row of each step
        want = net(x, times[i : i + 1].expand(B), cond)
        torch.testing.assert_close(f(x, i), want, rtol=1e-4, atol=1e-4)


def test_fused_path_runs_the_sampler_step_and_a_prefix(device):
    """DDIM's plan fused (the update in the last kernel, a known prefix inpainted) against the
    method's own loop (diffusers' DDIMScheduler.step) with the plain forward."""
    net = small_unet(device, down_dims=(32, 64), n_groups=2)
    B, H = 1, 8
    method = DiffusionMethod("ddim", clip_sample=True)
    cond = torch.randn(B, TO, F, device=device)
    noise = torch.randn(B, H, DA, device=device)
    prefix = torch.randn(B, 3, DA, device=device)
    want = method.sample(net, cond, (B, H, DA), num_steps=2, noise=noise, prefix=prefix)
    sampler = UnetSampler(net, fused=True)
    assert sampler.layout(B) == "fused"
    got = sampler.sample(method, cond, (B, H, DA), num_steps=2, noise=noise, prefix=prefix)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[:, :3], prefix)


def test_batches_above_fused_max_batch_take_the_tokens_path(device):
    net = small_unet(device, down_dims=(32, 64))
    sampler = UnetSampler(net, fused=True)
    sampler.fused_max_batch = 1
    method = FlowMatching(integrator="euler")
    cond, noise = torch.randn(2, TO, F, device=device), torch.randn(2, 8, DA, device=device)
    got = sampler.sample(method, cond, (2, 8, DA), num_steps=1, noise=noise)
    want = method.sample(net, cond, (2, 8, DA), num_steps=1, noise=noise)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sampler.layout(2) == "tokens" and sampler._fused is None  # no fused kernels were planned


def test_time_table_is_kept_for_a_samplers_times(device):
    """The FiLM time table is made once per sampler times tensor (the plan's times, which the
    method keeps) and reused by later chunks; other times get their own table."""
    net = small_unet(device, down_dims=(32, 64))
    sampler = UnetSampler(net, fused=True)
    method = DiffusionMethod("ddim")
    cond, noise = torch.randn(1, TO, F, device=device), torch.randn(1, 8, DA, device=device)
    first = sampler.sample(method, cond, (1, 8, DA), num_steps=2, noise=noise)
    fused = sampler.fused_unet()
    ((times, table),) = fused._time_tables.values()
    assert times is method.sampling_plan(2, device).times
    again = sampler.sample(method, cond, (1, 8, DA), num_steps=2, noise=noise)
    assert sampler.fused_unet() is fused  # kept while the weights stay
    assert list(fused._time_tables.values()) == [(times, table)]  # the same table object, reused
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    other = times.clone()  # equal values, another tensor: computed anew, equal
    torch.testing.assert_close(fused._time_table(other), table)
    assert fused._time_table(other) is not table and len(fused._time_tables) == 2
    for _ in range(20):  # bounded
        fused._time_table(torch.rand(2, device=device))
    assert len(fused._time_tables) == 16


def test_fused_path_rejects_what_it_cannot_run(device):
    for dims, groups, cg in [((32, 64), 4, 8), ((96, 192), 2, 48)]:  # too few; not a power of two
        sampler = UnetSampler(small_unet(device, down_dims=dims, n_groups=groups), fused=True)
        with pytest.raises(ValueError, match=f"power of two >= 16 channels; this UNet has groups of {cg} "):
            sampler.fused_unet()
    net = small_unet(device, down_dims=(32, 64))
    f = UnetSampler(net, fused=True).fused_unet().prepare(torch.randn(1, TO, F, device=device),
                                                           torch.zeros(1, device=device))
    with pytest.raises(ValueError, match="expected \\(1, H, 2\\)"):
        f(torch.randn(2, 8, DA, device=device), 0)
    with pytest.raises(ValueError, match="task.horizon=7 must be divisible by 2"):
        f(torch.randn(1, 7, DA, device=device), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FastPredictor's fused path needs CUDA")
def test_fast_predictor_fused_equals_predict():
    """fp32 kernels in a CUDA graph give Policy.predict's chunk (DDIM, batch 1 and 2)."""
    from test_inference import METHODS, make_policy

    from diffusion_policy.config import PolicyConfig

    torch.backends.cudnn.allow_tf32 = False  # Policy.predict's convolutions in float32
    policy_cfg = PolicyConfig(name="unet", down_dims=[128, 256], time_embed_dim=32)  # groups of 16, 32
    policy = make_policy(METHODS["ddim"], policy_cfg).cuda()
    fast = FastPredictor(policy, dtype="fp32", fused=True)
    for B in (1, 2):
        obs = {"state": torch.randn(B, TO, 5, device="cuda")}
        want = policy.predict(obs, generator=torch.Generator("cuda").manual_seed(B))
        got = fast.predict(obs, generator=torch.Generator("cuda").manual_seed(B))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FastPredictor's fused path needs CUDA")
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver", "flow_euler", "flow_midpoint", "flow_heun"])
def test_fused_equals_the_reference_loop_for_every_sampler(sampler):
    """fp32 kernels in a CUDA graph against Policy.predict for every sampler, batch 1 and 2, with
    and without a prefix (DDPM with per-row generators: that call runs outside the graph)."""
    from test_inference import SAMPLERS, make_policy

    from diffusion_policy.config import PolicyConfig

    torch.backends.cudnn.allow_tf32 = False
    policy = make_policy(SAMPLERS[sampler], PolicyConfig(name="unet", down_dims=[128, 256], time_embed_dim=32)).cuda()
    fast = FastPredictor(policy, dtype="fp32", fused=True)
    for B, P in [(1, 0), (1, 3), (2, 2)]:
        obs = {"state": torch.randn(B, TO, 5, device="cuda")}
        prefix = torch.rand(B, P, DA, device="cuda") if P else None
        gen = [torch.Generator("cuda").manual_seed(B + b) for b in range(B)]
        want = policy.predict(obs, generator=gen, prefix=prefix)
        gen = [torch.Generator("cuda").manual_seed(B + b) for b in range(B)]
        got = fast.predict(obs, generator=gen, prefix=prefix)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need CUDA")
@pytest.mark.parametrize("B", [1, 8])
def test_fused_bf16_matches_the_bf16_tokens_path(B):
    """The default UNet in bf16: fused and the compiled layout's arithmetic agree to bf16 rounding."""
    torch.manual_seed(0)
    net = ConditionalUnet1D(DA, TO * F).cuda().eval().requires_grad_(False)
    flow = FlowMatching(integrator="euler")
    cond = torch.randn(B, TO, F, device="cuda")
    noise = torch.randn(B, 16, DA, device="cuda")
    want = flow.sample(net, cond, (B, 16, DA), num_steps=10, noise=noise)  # float32, direct
    sampler = UnetSampler(copy.deepcopy(net).to(torch.bfloat16), fused=True)
    got = sampler.sample(flow, cond, (B, 16, DA), num_steps=10, noise=noise)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_every_kernel_compiles_for_hopper():
    """Triton's compiler (with the ptxas it ships) builds each launch's kernel for sm_90 without a
    GPU: the interpreter above checks the arithmetic, this checks that the real compiler accepts
    the code (it is stricter: e.g. a name must keep one type across the branches of an if). In a
    fresh process: the interpreter, once on, wraps every kernel of this one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("fused_compile_check.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("30 launches") == 2  # the default UNet in bf16, the small one in float32
