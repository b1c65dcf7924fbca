"""Every fast path computes what the reference computes: the UNet's tokens layout equals its
forward, and FastPredictor's chunks equal Policy.predict's (the method's own loop with the plain
network) for every sampler, dtype, batch size, with and without a prefix (on random weights and
inputs); FastPredictor is a drop-in for the controller."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_policy.config import MethodConfig, PolicyConfig, TaskConfig
from diffusion_policy.control import RecedingHorizonController
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.fast.tokens import TokensUnet, conv_tokens, upsample_tap_weight, upsample_taps
from diffusion_policy.inference import FastPredictor
from diffusion_policy.methods import build_method
from diffusion_policy.nets import MLPDenoiser
from diffusion_policy.nets.unet1d import ConditionalUnet1D
from diffusion_policy.policy import Policy

H, TO, TA, DA = 16, 2, 8, 2
SHAPES = {"state": (5,)}


def perturbed(module: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Random weights everywhere (GroupNorm affine and biases too): nothing trivial left."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_conv_tokens_matches_conv1d_same_and_strided():
    torch.manual_seed(0)
    x = torch.randn(3, 17, 12)  # (B, C, L)
    for conv in (nn.Conv1d(17, 24, 5, padding=2), nn.Conv1d(17, 17, 3, stride=2, padding=1),
                 nn.Conv1d(17, 9, 1), nn.Conv1d(17, 8, 3, stride=2, padding=0), nn.Conv1d(17, 5, 7, padding=3)):
        ref = conv(x).transpose(1, 2)
        out = conv_tokens(x.transpose(1, 2), conv)
        assert out.shape == ref.shape and rel(out, ref) < 1e-6


def test_upsample_tokens_matches_conv_transpose():
    torch.manual_seed(0)
    up = nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1)
    x = torch.randn(2, 16, 6)
    ref = up(x).transpose(1, 2)  # (B, 12, 8)
    out = upsample_taps(x.transpose(1, 2) @ upsample_tap_weight(up), up.bias)
    assert out.shape == ref.shape and rel(out, ref) < 1e-6
    with pytest.raises(ValueError, match="kernel 4, stride 2"):
        upsample_tap_weight(nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1))


@pytest.mark.parametrize("down_dims,B,horizon", [([32, 64, 128], 1, 16), ([32, 64], 3, 8), ([32], 2, 4)])
def test_tokens_layout_equals_forward(down_dims, B, horizon):
    net = perturbed(ConditionalUnet1D(DA, 2 * 7, down_dims, 5, 8, 32))
    cond = torch.randn(B, 2, 7)
    times = torch.tensor([99.0, 41.0, 0.0])
    f = TokensUnet(net).prepare(cond, times)
    with torch.no_grad():
        for i in range(3):
            x = torch.randn(B, horizon, DA)
            assert rel(f(x, i), net(x, times[i].expand(B), cond)) < 1e-5


def test_tokens_layout_bf16_is_close_and_checks_inputs():
    net = perturbed(ConditionalUnet1D(DA, 14, [32, 64], 5, 8, 32))
    cond, x, times = torch.randn(2, 2, 7), torch.randn(2, 8, DA), torch.tensor([50.0])
    with torch.no_grad():
        ref = net(x, times.expand(2), cond)
        tokens = TokensUnet(net.to(torch.bfloat16))
        out = tokens.prepare(cond, times)(x, 0)
    assert out.dtype == torch.float32 and rel(out, ref) < 3e-2
    with pytest.raises(ValueError, match="cond flattens to 10 features, expected 14"):
        tokens.prepare(torch.randn(2, 2, 5), times)
    with pytest.raises(ValueError, match="batch 3"):
        tokens.prepare(cond, times)(torch.randn(3, 8, DA), 0)
    with pytest.raises(ValueError, match="task.horizon=7 must be divisible by 2"):
        tokens.prepare(cond, times)(torch.randn(2, 7, DA), 0)
    with pytest.raises(TypeError, match="arranges a ConditionalUnet1D, got MLPDenoiser"):
        TokensUnet(MLPDenoiser(DA, 8, 14, [16]))
    # the tokens layout keeps its caches itself: nothing is written into the network
    assert not {"_sampling_cache", "_index", "_fused_cache", "sampling_layout"} & set(vars(net))


def make_policy(method_cfg: MethodConfig, policy_cfg: PolicyConfig | None = None) -> Policy:
    torch.manual_seed(0)
    task = TaskConfig(name="toy", env_id="none", obs_keys=list(SHAPES), horizon=H, n_obs_steps=TO,
                      n_action_steps=TA)
    rng = np.random.default_rng(0)
    arrays = {"state": rng.uniform(-3, 3, (200, 5)), "action": rng.uniform(-1, 2, (200, DA))}
    normalizer = Normalizer.fit(arrays, {k: "minmax" for k in arrays})
    policy_cfg = policy_cfg or PolicyConfig(name="unet", down_dims=[32, 64, 128], time_embed_dim=32)
    policy = Policy.build(task, policy_cfg, method_cfg, normalizer, SHAPES, DA)
    return perturbed(policy)


def obs_batch(B: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"state": torch.rand(B, TO, 5, generator=g) * 6 - 3}


def gens(B: int, seed: int = 7) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + b) for b in range(B)]


METHODS = {
    "ddim": MethodConfig(name="diffusion", scheduler="ddim", num_inference_steps=5),
    "ddpm": MethodConfig(name="diffusion", scheduler="ddpm", num_inference_steps=8),
    "dpmsolver": MethodConfig(name="diffusion", scheduler="dpmsolver", clip_sample=False, num_inference_steps=4),
    "flow_heun": MethodConfig(name="flow", integrator="heun", num_inference_steps=3),
}


def test_noise_argument_replaces_the_draw():
    policy = make_policy(METHODS["ddim"])
    obs = obs_batch(2)
    noise = torch.randn(2, H, DA, generator=torch.Generator().manual_seed(3))
    a = policy.predict(obs, noise=noise)
    b = policy.predict(obs, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 4, 2\), expected \(2, 16, 2\)"):
        policy.predict(obs, noise=torch.randn(2, 4, DA))


# every sampler a method has, each with few steps; DDIM with clip_sample on (the default)
SAMPLERS = {
    "ddpm": MethodConfig(name="diffusion", scheduler="ddpm", num_inference_steps=4),
    "ddim": MethodConfig(name="diffusion", scheduler="ddim", num_inference_steps=3),
    "dpmsolver": MethodConfig(name="diffusion", scheduler="dpmsolver", clip_sample=False, num_inference_steps=3),
    "flow_euler": MethodConfig(name="flow", integrator="euler", num_inference_steps=3),
    "flow_midpoint": MethodConfig(name="flow", integrator="midpoint", num_inference_steps=2),
    "flow_heun": MethodConfig(name="flow", integrator="heun", num_inference_steps=2),
}
SMALL_UNET = PolicyConfig(name="unet", down_dims=[16, 32], time_embed_dim=16)
# bf16 weights against the float32 reference: measured 0.3-1.7% relative (DDIM's clipping of
# x_0 on random weights amplifies rounding most); a wrong layout or plan is off by O(1)
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_tokens_layout_equals_the_reference_loop(sampler, dtype):
    """FastPredictor's tokens layout (the method's sampling plan run with the UNet arranged for
    the loop, op by op: what compile and CUDA graphs run) against Policy.predict (the method's own
    loop with the UNet's forward), per-row generators (DDPM's every step draws from them), batch
    sizes 1 to 3, with and without a known prefix."""
    policy = make_policy(SAMPLERS[sampler], SMALL_UNET)
    fast = FastPredictor(policy, dtype=dtype, layout="tokens")
    assert fast.sampler is not None and not fast.cuda_graph  # CPU: no graph
    assert (fast.net is policy.net) == (dtype == "fp32")  # float32 eager: no copy
    for B, P in [(1, 0), (1, 3), (2, 0), (3, 2)]:
        obs = obs_batch(B)
        prefix = torch.rand(B, P, DA, generator=torch.Generator().manual_seed(P)) * 3 - 1 if P else None
        want = policy.predict(obs, generator=gens(B), prefix=prefix)
        got = fast.predict(obs, generator=gens(B), prefix=prefix)
        assert got.shape == (B, H, DA) and rel(got, want) < TOLERANCE[dtype], (B, P, rel(got, want))
        if P:
            torch.testing.assert_close(got[:, :P], prefix, atol=1e-5, rtol=1e-5)


def test_fast_predictor_layouts():
    """A plain FastPredictor on the CPU runs the reference loop; compile, graphs and fused take
    the UNet's fast path; methods without a sampling plan (regression) run their own sample."""
    policy = make_policy(SAMPLERS["ddim"], SMALL_UNET)
    assert FastPredictor(policy).layout == "reference" and FastPredictor(policy).sampler is None
    assert FastPredictor.can_fuse(policy)
    compiled = FastPredictor(policy, compile=True)  # torch.compile compiles at the first call
    assert compiled.layout == "tokens" and compiled.sampler.tokens.compiled is not None
    cfg = PolicyConfig(name="mlp", hidden_dims=[32])
    mlp = make_policy(SAMPLERS["ddim"], cfg)
    assert FastPredictor(mlp, dtype="bf16").layout == "reference" and not FastPredictor.can_fuse(mlp)
    policy.method = build_method(MethodConfig(name="regression"))
    fast = FastPredictor(policy, layout="tokens")
    torch.testing.assert_close(fast.predict(obs_batch(2)), policy.predict(obs_batch(2)))


def test_fast_predictor_bf16_leaves_the_policy_alone():
    # flow: a sampler that does not amplify small differences (DDIM with clip_sample on random
    # weights turns bf16 rounding into 10-20% chunk differences, with either layout alike)
    policy = make_policy(MethodConfig(name="flow", num_inference_steps=5))
    fast = FastPredictor(policy, dtype="bf16")
    assert policy.net.final[1].weight.dtype == torch.float32
    assert fast.net.final[1].weight.dtype == torch.bfloat16
    obs = obs_batch(2)
    ref = policy.predict(obs, generator=gens(2))
    out = fast.predict(obs, generator=gens(2))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel(out, ref) < 0.01


def test_fast_predictor_transformer_bf16_under_autocast():
    cfg = PolicyConfig(name="transformer", n_layer=2, n_head=2, n_emb=32)
    policy = make_policy(MethodConfig(name="flow", num_inference_steps=5), cfg)
    obs = obs_batch(2)
    ref = policy.predict(obs, generator=gens(2))
    out = FastPredictor(policy, dtype="bf16").predict(obs, generator=gens(2))
    assert rel(out, ref) < 0.02


def test_fast_predictor_errors():
    policy = make_policy(METHODS["ddim"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        FastPredictor(policy, dtype="fp16")
    with pytest.raises(ValueError, match="needs the policy on a CUDA device"):
        FastPredictor(policy, cuda_graph=True)
    with pytest.raises(ValueError, match="compile must be True, False or one of"):
        FastPredictor(policy, compile="reduce-overhead")
    with pytest.raises(KeyError, match="missing keys"):
        FastPredictor(policy).predict({"other": torch.zeros(1, TO, 5)})
    with pytest.raises(ValueError, match="fused=True runs Triton kernels on CUDA"):
        FastPredictor(policy, fused=True)
    with pytest.raises(ValueError, match="layout must be one of"):
        FastPredictor(policy, layout="direct")
    with pytest.raises(ValueError, match="fused=True runs the 'fused' layout, got layout='tokens'"):
        FastPredictor(policy, fused=True, layout="tokens")
    mlp = make_policy(METHODS["ddim"], PolicyConfig(name="mlp", hidden_dims=[16]))
    with pytest.raises(ValueError, match="layout='tokens' needs the UNet; the policy's network is MLPDenoiser"):
        FastPredictor(mlp, layout="tokens")


def test_controller_runs_a_fast_predictor():
    policy = make_policy(METHODS["ddim"])
    fast = FastPredictor(policy, dtype="fp32")
    runs = []
    for pol in (policy, fast):
        ctl = RecedingHorizonController(pol, n_envs=2, generator=torch.Generator().manual_seed(0))
        acts = [ctl.act({"state": np.full((2, 5), 0.1 * t, np.float32)}) for t in range(TA + 1)]
        runs.append(np.stack(acts))
    assert runs[0].shape == (TA + 1, 2, DA)
    np.testing.assert_allclose(runs[1], runs[0], atol=1e-4)


def test_sampling_weights_follow_weight_updates():
    """The rearranged weights are kept between chunks and remade after any weight change."""
    policy = make_policy(METHODS["ddim"])
    fast = FastPredictor(policy, layout="tokens")  # float32 eager: the policy's own network
    obs = obs_batch(1)
    first = fast.predict(obs, generator=gens(1))
    with torch.no_grad():  # (under autograd they are made afresh, uncached)
        kept = fast.sampler.tokens.weights()
        assert fast.sampler.tokens.weights() is kept
    with torch.no_grad():
        for p in policy.net.parameters():  # an in-place update, as an optimizer step makes
            p.mul_(1.1)
    after = fast.predict(obs, generator=gens(1))
    with torch.no_grad():
        assert fast.sampler.tokens.weights() is not kept
    assert rel(after, policy.predict(obs, generator=gens(1))) < 1e-5
    assert rel(after, first) > 1e-3


def test_compiled_predictor_equals_predict():
    """The compiled tokens layout (inductor; C++ kernels on the CPU, ~20 s) computes the same
    chunk as the plain predict: flow Euler, then DDIM with a prefix on the same compiled trunk
    (both plans have 2 calls with the step in the last layer: no second compilation)."""
    cfg = PolicyConfig(name="unet", down_dims=[16, 32], time_embed_dim=16)
    policy = make_policy(MethodConfig(name="flow", num_inference_steps=2), cfg)
    fast = FastPredictor(policy, compile=True)
    assert fast.net is not policy.net and fast.layout == "tokens"
    obs = obs_batch(2)
    out = fast.predict(obs, generator=gens(2))
    assert rel(out, policy.predict(obs, generator=gens(2))) < 1e-5
    policy.method = build_method(MethodConfig(name="diffusion", scheduler="ddim", num_inference_steps=2))
    fast.reset()
    prefix = torch.rand(2, 3, DA)
    out = fast.predict(obs, generator=gens(2), prefix=prefix)
    assert rel(out, policy.predict(obs, generator=gens(2), prefix=prefix)) < 1e-5
    assert fast.sampler.tokens.compiled is not None and not hasattr(policy.net, "sampling_layout")


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_padding_changes_no_row(method):
    policy = make_policy(METHODS[method])
    obs, prefix = obs_batch(2), torch.rand(2, 2, DA)
    plain = FastPredictor(policy).predict(obs, generator=gens(2), prefix=prefix)
    padded = FastPredictor(policy, pad_to=5).predict(obs, generator=gens(2), prefix=prefix)
    assert padded.shape == (2, H, DA) and rel(padded, plain) < 1e-5
    with pytest.raises(ValueError, match="pad_to must be >= 1"):
        FastPredictor(policy, pad_to=0)


def test_methods_say_whether_sampling_draws_noise_after_the_start():
    assert {name: build_method(cfg).stochastic for name, cfg in METHODS.items()} == {
        "ddim": False, "ddpm": True, "dpmsolver": False, "flow_heun": False}
    assert build_method(MethodConfig(name="regression")).stochastic is False


class EagerGraph:
    """A CUDA graph's stand-in on the CPU: a replay runs the captured function again (reading the
    same static inputs, drawing fresh noise from the default generator) into the output buffer."""

    def __init__(self, fn):
        self.fn, self.out = fn, fn()

    def replay(self):
        self.out.copy_(self.fn())


def graphed(policy: Policy, **kw) -> FastPredictor:
    """A CPU FastPredictor that takes the graph path (keys, static inputs, noise source) with
    EagerGraph in place of the CUDA capture, the UNet in the tokens layout as a graph runs it."""
    fast = FastPredictor(policy, layout="tokens", **kw)
    fast.cuda_graph = True

    def record(fn):
        graph = EagerGraph(fn)
        return graph, graph.out

    fast._record = record
    return fast


@pytest.mark.parametrize("method", ["ddim", "flow_heun"])
def test_graph_draws_the_noise_without_a_generator_and_copies_it_in_with_one(method):
    policy = make_policy(METHODS[method])
    fast = graphed(policy)
    assert fast.noise_in_graph(None) and not fast.noise_in_graph(gens(2))
    fast.predict(obs_batch(2, seed=1))  # captures
    (graph,) = fast._graphs.values()
    assert graph.noise is None
    # a numpy window of the same shape and dtype replays the same graph, copied into its input
    obs = {"state": obs_batch(2, seed=2)["state"].numpy()}
    torch.manual_seed(5)
    out = fast.predict(obs)
    torch.manual_seed(5)
    assert rel(out, policy.predict(obs)) < 1e-5
    assert len(fast._graphs) == 1
    assert rel(fast.predict(obs), out) > 1e-3  # each replay draws fresh noise
    # with generators the noise comes from them: another graph, which gets it copied in
    for seed in (1, 3):
        obs = obs_batch(2, seed=seed)
        assert rel(fast.predict(obs, generator=gens(2)), policy.predict(obs, generator=gens(2))) < 1e-5
    assert sorted(key[3] for key in fast._graphs) == [False, True]
    assert [g.noise is None for g in fast._graphs.values()] == [True, False]


def test_graph_key_follows_the_callers_arrays_not_their_device():
    obs = obs_batch(2)
    key = FastPredictor.graph_key(obs, 5, None, True)
    assert FastPredictor.graph_key({"state": obs["state"].to("meta")}, 5, None, True) == key
    assert FastPredictor.graph_key({"state": obs["state"].double()}, 5, None, True) != key
    assert FastPredictor.graph_key(obs, 5, None, False) != key
    assert FastPredictor.graph_key(obs, 5, torch.zeros(2, 3, DA), True) != key


def test_ddpm_with_generators_skips_the_graph_and_without_draws_in_it():
    policy = make_policy(METHODS["ddpm"])
    fast = graphed(policy)
    obs = obs_batch(2)
    assert rel(fast.predict(obs, generator=gens(2)), policy.predict(obs, generator=gens(2))) < 1e-5
    assert not fast._graphs
    fast.predict(obs)
    torch.manual_seed(5)
    out = fast.predict(obs)
    torch.manual_seed(5)
    assert rel(out, policy.predict(obs)) < 1e-5
    assert [g.noise is None for g in fast._graphs.values()] == [True]


def test_padded_graph_draws_every_rows_noise():
    policy = make_policy(METHODS["ddim"])
    fast = graphed(policy, pad_to=4)
    obs = obs_batch(2)
    fast.predict(obs)
    torch.manual_seed(5)
    out = fast.predict(obs)
    torch.manual_seed(5)
    noise = torch.randn(4, H, DA)  # the graph's draw: the padded batch
    assert out.shape == (2, H, DA) and rel(out, policy.predict(obs, noise=noise[:2])) < 1e-5
    assert [key[0] for key in fast._graphs] == [4]
