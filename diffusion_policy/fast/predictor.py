"""Fast inference: the policy's ``predict`` through a fast path, in bf16, replayed from a CUDA graph.

    fast = FastPredictor(policy, dtype="bf16", fused=True)           # cuda_graph on for CUDA
    chunk = fast.predict(obs_window)                                 # same call as Policy.predict
    controller = RecedingHorizonController(fast, ...)                # a drop-in for the policy

``Policy.predict`` is the reference: the method's loop (``method.sample``) calling the network's
``forward``. At batch 1 a 10-step chunk of the default UNet is then a few hundred small kernels;
launched one by one from Python their launch cost, not the arithmetic, sets the latency. What
removes it, each behind this class:
- for a UNet, the method's sampling plan (``method.sampling_plan``: network times, prefix
  weights, the step as coefficients) run by ``fast.runner.UnetSampler`` with the network in the
  tokens layout (``fast.tokens``: FiLM tables once per chunk, each convolution one wide matrix
  product plus fusable elementwise work, DDIM's or Euler's step with the last layer);
- ``torch.compile`` of the tokens layout's per-step trunk (fuses GroupNorm, Mish, FiLM and the
  residual adds), or of the whole network for the other denoisers;
- for batches of 1-2, ``fused=True``: the tokens layout as one Triton kernel per convolution
  (``fast.fused_unet``), the fastest at batch 1 (``benchmarks/sampling.md``);
- one CUDA graph per (batch size, steps, prefix length, observation shapes, noise source) holding
  the whole ``predict``: normalize, encode, every sampler step, unnormalize. A call copies each
  observation straight into the graph's static input (one copy per key, from the host or the
  device), replays the graph and copies the chunk out.

Exactness: with ``dtype="fp32"`` the chunk equals ``Policy.predict``'s up to float rounding (the
tests compare every fast path with it). With a ``generator`` the starting noise is drawn outside
the graph from it exactly as ``predict`` draws it and copied in, so per-row generators keep their
meaning. Without one it is drawn inside the graph from the device's default generator (the
capture registers the generator's offset, so each replay draws fresh noise): such a call launches
nothing before the replay but the observation copies. A stochastic sampler (DDPM) draws fresh
noise at every step; its steps cannot take a generator inside a graph, so a DDPM call with a
generator runs without the graph (same result as ``predict``), and one without runs in the graph
on the device's default generator.

``dtype="bf16"`` keeps a bf16 copy of the denoiser (the matrix products run in bf16; activations,
GroupNorm and the sampler's state stay float32); the policy itself is not modified. With bf16,
compile, fused or a graph the predictor works on its own copy of the denoiser: after the
policy's weights change (training), build a new predictor. Every cache (rearranged weights,
fused plans, graphs) belongs to the predictor's objects, none to the network.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

from diffusion_policy.fast.runner import UnetSampler
from diffusion_policy.methods.sampling import initial_noise
from diffusion_policy.nets.unet1d import ConditionalUnet1D

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
LAYOUTS = ("reference", "tokens", "fused")


class FastPredictor:
    """``predict(obs, num_steps=None, generator=None, prefix=None)`` like :meth:`Policy.predict`.

    ``dtype``: ``"fp32"`` or ``"bf16"`` (the denoiser's weights). ``compile``: ``torch.compile``
    the denoiser (the first call of each shape compiles: seconds to a minute); ``True`` for
    inductor's default mode or a mode name, e.g. ``"max-autotune-no-cudagraphs"`` (autotuned
    matrix-product kernels; minutes to compile). Modes with their own CUDA graphs
    (``reduce-overhead``, ``max-autotune``) would nest graphs in ours: use ``cuda_graph`` instead.
    ``cuda_graph``: capture each (batch, steps, prefix length, noise source) once and replay it
    (default: on for CUDA). ``warmup``: calls run before a capture (compilation and cuDNN/cuBLAS
    autotuning happen there, outside the graph). ``pad_to``: calls with fewer rows are padded to
    this many (copies of the first row) and the padding dropped from the result, so that one
    compiled shape and one graph serve every batch size up to it (e.g. an evaluation whose
    environments finish at different times); rows do not interact, so padding changes no row's
    chunk. ``fused``: run the UNet as one Triton kernel per convolution (``fast.fused_unet``;
    CUDA; the first call compiles the kernels: seconds) for batches up to
    ``UnetSampler.fused_max_batch`` (2): the fastest at batch 1 (a robot's control loop). Larger
    batches take the tokens layout, compiled when ``compile`` is given too, else op by op in the
    graph (far slower: pass ``compile`` alone for batches above 2). Use it with ``dtype="bf16"``:
    in float32 the kernels' products are exact but slow; that mode exists to check them against
    ``Policy.predict``.

    ``layout``: how the network runs the method's loop. Default: for a UNet with ``compile``,
    ``cuda_graph`` or ``fused``, the method's sampling plan through :class:`UnetSampler`
    (``"tokens"``, or ``"fused"`` with ``fused``); otherwise ``"reference"``, the method's own
    loop with the (copied, compiled) network. ``"tokens"`` forces the tokens layout op by op
    (what a graph or compile would run, e.g. to check or time it on a CPU).
    """

    def __init__(self, policy, dtype: str = "fp32", compile: bool | str = False, cuda_graph: bool | None = None,
                 warmup: int = 3, pad_to: int | None = None, fused: bool = False, layout: str | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if isinstance(compile, str) and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, got {compile!r}")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
        if fused and layout not in (None, "fused"):
            raise ValueError(f"fused=True runs the 'fused' layout, got layout={layout!r}")
        self.policy = policy.eval()
        self.device = policy.device
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the policy on a CUDA device, it is on {self.device}")
        is_unet = isinstance(policy.net, ConditionalUnet1D)
        if fused or layout == "fused":
            fused = True
            if not is_unet:
                raise ValueError(f"fused=True needs the UNet; the policy's network is {type(policy.net).__name__}")
            if self.device.type != "cuda":
                raise ValueError(f"fused=True runs Triton kernels on CUDA; the policy is on {self.device}")
        if layout == "tokens" and not is_unet:
            raise ValueError(f"layout='tokens' needs the UNet; the policy's network is {type(policy.net).__name__}")
        if pad_to is not None and pad_to < 1:
            raise ValueError(f"pad_to must be >= 1 or None, got {pad_to}")
        if layout is None:
            layout = ("fused" if fused else "tokens") if is_unet and (compile or cuda_graph or fused) else "reference"
        self.layout = layout
        self.cuda_graph, self.warmup, self.pad_to = cuda_graph, warmup, pad_to
        net = policy.net
        if dtype != "fp32" or compile or cuda_graph or fused:
            net = copy.deepcopy(net).to(DTYPES[dtype]).eval().requires_grad_(False)
        # the UNet's fast path: the method's sampling plan run with the network in the tokens
        # layout or fused (its kernels launched together in a graph, or compiled)
        self.sampler = UnetSampler(net, fused=fused) if layout != "reference" else None
        if compile:
            kw = {"dynamic": False, "mode": None if compile is True else compile}
            if self.sampler is not None:
                self.sampler.compile(**kw)  # only the per-step trunk: the tables run once per chunk
            else:
                net = torch.compile(net, **kw)
        self.net = net
        # a bf16 network other than the UNet's tokens layout receives float32 inputs: autocast
        self._amp = (torch.autocast(self.device.type, dtype=DTYPES[dtype], cache_enabled=False)
                     if dtype != "fp32" else nullcontext())
        self._graphs: dict[tuple, _Graph] = {}

    @staticmethod
    def can_fuse(policy) -> bool:
        """Whether ``fused=True`` applies to ``policy``'s network (the UNet; CUDA is still needed)."""
        return isinstance(policy.net, ConditionalUnet1D)

    def __getattr__(self, name):
        # the controller and the evaluation read the policy's attributes (horizon, obs_keys, ...)
        if name == "policy":
            raise AttributeError(name)
        return getattr(self.policy, name)

    def reset(self) -> None:
        """Forget the captured graphs (e.g. after ``policy.method`` was replaced)."""
        self._graphs.clear()

    def _run(self, obs, num_steps, generator, prefix, noise) -> torch.Tensor:
        policy = self.policy
        with self._amp:
            # a method without a sampling plan (regression: one network call) runs its own sample
            if self.sampler is not None and hasattr(policy.method, "sampling_plan"):
                def sample(cond, shape, **kw):
                    return self.sampler.sample(policy.method, cond, shape, **kw)

                return policy._sample_chunk(sample, obs, num_steps, generator, prefix, noise)
            return policy.sample_with(self.net, obs, num_steps, generator, prefix, noise)

    @torch.no_grad()
    def predict(self, obs: dict, num_steps: int | None = None, generator=None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, H, Da)`` raw action chunks; arguments as :meth:`Policy.predict`."""
        policy = self.policy
        missing = [k for k in policy.obs_keys if k not in obs]
        if missing:
            raise KeyError(f"observation is missing keys {missing} (policy obs_keys: {policy.obs_keys})")
        # not moved yet (as_tensor is free for numpy arrays and tensors): the graph path copies
        # each straight into its static input
        obs = {k: torch.as_tensor(obs[k]) for k in policy.obs_keys}
        B = next(iter(obs.values())).shape[0]
        shape = (B, policy.horizon, policy.action_dim)
        if prefix is not None:
            prefix = torch.as_tensor(prefix).to(self.device, torch.float32)
        # DDPM draws noise at every step from the caller's generators: such a call runs as
        # Policy.predict does (no graph, no padding rows that would draw from them too)
        if policy.method.stochastic and generator is not None:
            obs = {k: v.to(self.device, non_blocking=True) for k, v in obs.items()}
            return self._run(obs, num_steps, generator, prefix, initial_noise(shape, generator, self.device))
        # None: the graph draws it (no launch before the replay)
        noise = None if self.noise_in_graph(generator) else initial_noise(shape, generator, self.device)
        if self.pad_to is not None and B < self.pad_to:
            pad = lambda t: torch.cat([t, t[:1].expand(self.pad_to - B, *t.shape[1:])])  # noqa: E731
            obs = {k: pad(v.to(self.device, non_blocking=True)) for k, v in obs.items()}
            noise, prefix = (None if t is None else pad(t) for t in (noise, prefix))
            return self._predict(obs, num_steps, prefix, noise)[:B]
        return self._predict(obs, num_steps, prefix, noise)

    def noise_in_graph(self, generator) -> bool:
        """Whether a call with ``generator`` draws its starting noise inside the CUDA graph (on
        the device's default generator) rather than outside it from ``generator``."""
        return self.cuda_graph and generator is None

    def _predict(self, obs, num_steps, prefix, noise) -> torch.Tensor:
        if not self.cuda_graph:
            obs = {k: v.to(self.device, non_blocking=True) for k, v in obs.items()}
            return self._run(obs, num_steps, None, prefix, noise)
        key = self.graph_key(obs, num_steps, prefix, noise is None)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(obs, num_steps, prefix, noise)
        return graph.replay(obs, prefix, noise)

    @staticmethod
    def graph_key(obs: dict, num_steps, prefix, noise_in_graph: bool) -> tuple:
        """The graph that serves a call: batch, steps, prefix length, the observations' shapes and
        dtypes (of the caller's arrays, on any device) and where the starting noise comes from (a
        graph that draws it never serves a call that brings it, nor the reverse)."""
        B = next(iter(obs.values())).shape[0]
        P = 0 if prefix is None else int(prefix.shape[1])
        return (B, num_steps, P, noise_in_graph, tuple((k, tuple(v.shape), v.dtype) for k, v in obs.items()))

    def _capture(self, obs, num_steps, prefix, noise) -> "_Graph":
        dev = self.device
        static_obs = {k: torch.empty(v.shape, dtype=v.dtype, device=dev).copy_(v) for k, v in obs.items()}
        static_prefix = None if prefix is None else prefix.clone()
        static_noise = None if noise is None else noise.clone()  # None: drawn in the graph
        graph, out = self._record(lambda: self._run(static_obs, num_steps, None, static_prefix, static_noise))
        return _Graph(graph, static_obs, static_prefix, static_noise, out)

    def _record(self, fn) -> tuple:
        """Capture ``fn()`` in a CUDA graph: the graph and ``fn``'s output buffer."""
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
            for _ in range(max(1, self.warmup)):
                fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # its own memory pool: graphs of other shapes replay in any order
            out = fn()
        return graph, out


class _Graph:
    """One captured ``predict``: static inputs (``noise`` None when the graph draws it), the
    graph, its output buffer."""

    def __init__(self, graph, obs, prefix, noise, out):
        self.graph, self.obs, self.prefix, self.noise, self.out = graph, obs, prefix, noise, out

    def replay(self, obs, prefix, noise) -> torch.Tensor:
        for k, v in obs.items():
            self.obs[k].copy_(v, non_blocking=True)
        if prefix is not None:
            self.prefix.copy_(prefix, non_blocking=True)
        if self.noise is not None:
            self.noise.copy_(noise, non_blocking=True)
        self.graph.replay()
        return self.out.clone()  # the buffer is overwritten by the next replay
