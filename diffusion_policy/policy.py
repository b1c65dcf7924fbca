"""The policy: normalizer + observation encoder + denoising network + method, and nothing else.

    policy = Policy.build(task_cfg, policy_cfg, method_cfg, normalizer, shapes, action_dim)
    loss = policy.compute_loss(batch)            # batch in raw units, as WindowDataset gives it
    chunk = policy.predict(obs_window)           # (B, H, Da) raw units; obs {key: (B, To, ...)}
    policy.save("ckpt/policy"); Policy.load("ckpt/policy", device="cuda")

Stateless by design (DESIGN.md): ``predict`` maps one observation window to one action chunk; the
history of observations and the queue of actions live in the controller. The first action of the
chunk meant for execution is index ``To - 1`` (it belongs to the current observation).

It is an ``nn.Module``: ``copy.deepcopy(policy)`` is an EMA copy (all parameters are in ``encoder``
and ``net``; the normalizer holds buffers only) and ``state_dict()`` holds everything. A saved
policy is a folder with ``model.safetensors`` (no pickle) and ``config.json`` (the resolved task,
policy and method configs, observation shapes, action size and the normalizer), so loading needs
no training config tree and no import paths.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, is_dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion_policy.config import MethodConfig, PolicyConfig, TaskConfig, as_dict, check_horizons, typed
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.methods import build_method
from diffusion_policy.nets import ObsEncoder, build_net

FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


@dataclass
class PolicySpec:
    """A saved policy's ``config.json``, the format :meth:`Policy.config_dict` writes: everything
    needed to rebuild the policy except its weights. The one reader of that format (Policy.load,
    dp-eval's checks before any weights are loaded, servers that describe the policy they serve)."""

    task: TaskConfig
    policy: PolicyConfig
    method: MethodConfig
    shapes: dict
    """``{obs key: shape without the time axis}``, e.g. ``{"state": (6,)}``."""
    action_dim: int
    normalizer: dict
    """The normalizer's statistics as :meth:`Normalizer.to_json` writes them."""

    @classmethod
    def read(cls, path) -> "PolicySpec":
        """The spec of the policy folder ``path``; ValueError naming the file if it is not one."""
        file = Path(path) / CONFIG
        try:
            cfg = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{file}: not a readable policy config ({type(e).__name__}: {e})") from None
        version = cfg.get("format_version") if isinstance(cfg, dict) else None
        if version != FORMAT_VERSION:
            raise ValueError(f"{file}: format_version {version}, expected {FORMAT_VERSION}")
        try:
            return cls(typed(TaskConfig, cfg["task"]), typed(PolicyConfig, cfg["policy"]),
                       typed(MethodConfig, cfg["method"]), {k: tuple(v) for k, v in cfg["shapes"].items()},
                       int(cfg["action_dim"]), dict(cfg["normalizer"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{file}: {type(e).__name__}: {' '.join(str(e).split())}") from None


class Policy(nn.Module):
    def __init__(self, task_cfg: TaskConfig, policy_cfg: PolicyConfig, method_cfg: MethodConfig,
                 normalizer: Normalizer, shapes: dict[str, tuple], action_dim: int):
        super().__init__()
        self.task_cfg, self.policy_cfg, self.method_cfg = task_cfg, policy_cfg, method_cfg
        self.horizon = int(task_cfg.horizon)
        self.n_obs_steps = int(task_cfg.n_obs_steps)
        self.n_action_steps = int(task_cfg.n_action_steps)
        check_horizons(self.horizon, self.n_obs_steps, self.n_action_steps)
        self.obs_keys = list(task_cfg.obs_keys)
        self.image_keys = list(task_cfg.image_keys)
        self.action_key = task_cfg.action_key
        self.action_dim = int(action_dim)
        missing = [k for k in self.obs_keys if k not in shapes]
        if missing:
            raise ValueError(f"shapes has no entry for obs_keys {missing} (shapes: {list(shapes)})")
        self.shapes = {k: tuple(int(s) for s in shapes[k]) for k in self.obs_keys}
        absent = [k for k in self.obs_keys + [self.action_key] if k not in normalizer.keys()]
        if absent:
            raise ValueError(f"the normalizer has no keys {absent} (it has {normalizer.keys()})")

        self.normalizer = normalizer
        self.encoder = ObsEncoder(self.shapes, self.image_keys, policy_cfg.obs_encoder)
        self.net = build_net(policy_cfg, self.action_dim, self.horizon, self.n_obs_steps,
                             self.encoder.out_dim)
        self.method = build_method(method_cfg)  # plain object: no parameters

    @classmethod
    def build(cls, task_cfg, policy_cfg, method_cfg, normalizer, shapes, action_dim) -> "Policy":
        """Build from typed configs (dataclasses or DictConfigs with the same fields)."""
        task_cfg, policy_cfg, method_cfg = (
            c if is_dataclass(c) else typed(s, as_dict(c))
            for c, s in ((task_cfg, TaskConfig), (policy_cfg, PolicyConfig), (method_cfg, MethodConfig))
        )
        return cls(task_cfg, policy_cfg, method_cfg, normalizer, shapes, action_dim)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # ------------------------------------------------------------------------------- helpers
    def encode(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw observations ``{key: (B, To, ...)}`` -> condition ``(B, To, F)``."""
        device = self.device
        nobs = {}
        for k in self.obs_keys:
            if k not in obs:
                raise KeyError(f"observation is missing key {k!r} (policy obs_keys: {self.obs_keys})")
            x = torch.as_tensor(obs[k])
            if tuple(x.shape[1:]) != (self.n_obs_steps, *self.shapes[k]):
                raise ValueError(f"obs[{k!r}] has shape {tuple(x.shape)}, expected "
                                 f"(B, To={self.n_obs_steps}, "
                                 f"{', '.join(map(str, self.shapes[k]))})")
            nobs[k] = self.normalizer.normalize(k, x.to(device, non_blocking=True))
        return self.encoder(nobs)

    # ------------------------------------------------------------------------------- training
    def compute_loss(self, batch: dict) -> torch.Tensor:
        """Training loss of one batch ``{"obs": {key: (B, To, ...)}, "action": (B, H, Da)}`` in raw
        units (images uint8 HWC)."""
        actions = torch.as_tensor(batch["action"]).to(self.device)
        if tuple(actions.shape[1:]) != (self.horizon, self.action_dim):
            raise ValueError(f"batch['action'] has shape {tuple(actions.shape)}, expected "
                             f"(B, H={self.horizon}, Da={self.action_dim})")
        cond = self.encode(batch["obs"])
        nactions = self.normalizer.normalize(self.action_key, actions)
        return self.method.loss(self.net, nactions, cond)

    # ------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, obs: dict[str, torch.Tensor], num_steps: int | None = None,
                generator: torch.Generator | list | None = None, prefix: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``(B, H, Da)`` action chunks in raw units for a batch of observation windows.

        ``obs``: ``{key: (B, To, ...)}`` raw units (images uint8 ``(H, W, 3)``) on any device.
        ``num_steps``: sampler steps (default: the method config's ``num_inference_steps``).
        ``generator``: a ``torch.Generator`` on the policy's device, or a list of one per row, for
        reproducible samples (row ``b`` then depends on ``generator[b]`` only).
        ``prefix``: ``(B, P, Da)`` raw actions the chunk must start with (inpainted), e.g. the part
        of the previous chunk still to be executed while this one is computed (real-time chunking).
        ``noise``: ``(B, H, Da)`` starting chunk of the sampler (normalized units; default: drawn
        from ``generator``).
        Call ``eval()`` first: in training mode images are randomly cropped.
        This is the reference: the method's plain loop with the network's ``forward``. For a
        robot's control loop, :class:`diffusion_policy.inference.FastPredictor` runs the same
        function through a fast path (compiled, fused kernels, bf16, CUDA graphs).
        """
        return self.sample_with(self.net, obs, num_steps, generator, prefix, noise)

    def sample_with(self, net, obs, num_steps=None, generator=None, prefix=None, noise=None) -> torch.Tensor:
        """:meth:`predict`'s body with ``net`` as the denoiser (the policy's own, or an inference
        copy of it: compiled, in bf16), sampled by the method's own loop."""
        def sample(cond, shape, **kw):
            return self.method.sample(net, cond, shape, **kw)

        return self._sample_chunk(sample, obs, num_steps, generator, prefix, noise)

    def _sample_chunk(self, sample, obs, num_steps=None, generator=None, prefix=None, noise=None) -> torch.Tensor:
        """Normalize and encode ``obs``, draw the chunk with ``sample(cond, shape, num_steps=,
        generator=, prefix=, noise=)`` (in normalized units; the method's loop, or a fast path's
        run of its plan) and unnormalize it."""
        cond = self.encode(obs)
        B = cond.shape[0]
        nprefix = None
        if prefix is not None:
            nprefix = self.normalizer.normalize(self.action_key, torch.as_tensor(prefix).to(cond.device))
        x = sample(cond, (B, self.horizon, self.action_dim), num_steps=num_steps, generator=generator,
                   prefix=nprefix, noise=noise)
        return self.normalizer.unnormalize(self.action_key, x)

    # ------------------------------------------------------------------------------- saving
    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "task": as_dict(self.task_cfg),
            "policy": as_dict(self.policy_cfg),
            "method": as_dict(self.method_cfg),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "action_dim": self.action_dim,
            "normalizer": json.loads(self.normalizer.to_json()),
        }

    def save(self, path) -> Path:
        """Write ``path/model.safetensors`` and ``path/config.json``; returns ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS), metadata={"format_version": str(FORMAT_VERSION)})
        (path / CONFIG).write_text(json.dumps(self.config_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path, device="cpu") -> "Policy":
        """Rebuild from a folder written by :meth:`save`, in ``eval()`` mode on ``device``."""
        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"{path}: expected {CONFIG} and {WEIGHTS} written by Policy.save")
        spec = PolicySpec.read(path)
        policy = cls(spec.task, spec.policy, spec.method, Normalizer.from_json(json.dumps(spec.normalizer)),
                     spec.shapes, spec.action_dim)
        policy.load_state_dict(load_file(str(path / WEIGHTS)))
        return policy.to(device).eval()
