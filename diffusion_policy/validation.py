"""A job's config checked by dry-running the constructors that own each rule.

Every rule lives in one place, the code that depends on it:

| rule | owner |
| --- | --- |
| ``To >= 1``, ``Ta >= 1``, ``Ta <= H - To + 1`` | :func:`diffusion_policy.config.check_horizons` |
| ``H`` divisible by the UNet's downsampling | the network's builder (``nets.build_net``) |
| sampler steps <= training timesteps, DPM-Solver cannot clip | ``DiffusionMethod`` |
| smoothing modes, ``Ta`` within a chunk | ``RecedingHorizonController`` |

:func:`validate` builds those objects from the config (networks on the ``meta`` device: no memory,
no initialization; a policy-shaped stand-in for the controller) and turns their ``ValueError`` into
a one-line :class:`ConfigError` that starts with the config key, so a typo fails before any data is
read or a worker is started. ``dp-train`` and ``dp-eval`` call it first. It sits above the layers
it imports (methods, nets, control), so ``config.py`` stays below all of them (DESIGN.md, "Layers").
"""
from __future__ import annotations

import re
import types
import warnings
from dataclasses import fields, is_dataclass
from typing import Any

from diffusion_policy.config import (
    DDP_COMMS,
    ConfigError,
    EvalConfig,
    MethodConfig,
    PolicyConfig,
    TaskConfig,
    TrainConfig,
    as_dict,
    check_horizons,
    typed,
)


def _choices() -> dict:
    """Allowed values of enumerated fields, as the nets and methods define them. Checked for every
    field, also those of the families not selected (``method.integrator`` of a diffusion method), so
    a typo never waits for the day that family is used."""
    from diffusion_policy.methods import METHOD_NAMES
    from diffusion_policy.methods.diffusion import BETA_SCHEDULES, PREDICTION_TYPES, SCHEDULERS
    from diffusion_policy.methods.flow import INTEGRATORS, TIME_DISTS
    from diffusion_policy.nets import NET_NAMES

    return {"policy.name": NET_NAMES, "method.name": METHOD_NAMES, "method.scheduler": SCHEDULERS,
            "method.beta_schedule": BETA_SCHEDULES, "method.prediction_type": PREDICTION_TYPES,
            "method.time_dist": TIME_DISTS, "method.integrator": INTEGRATORS}


def _show(value: Any) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    return str(list(value)) if isinstance(value, (list, tuple)) else str(value)


def _keys(prefix: str, cfg: Any, names: dict | None = None) -> dict:
    """``{field: (config key, value)}`` of a config dataclass; ``names`` renames some keys."""
    names = names or {}
    return {f.name: (names.get(f.name, f"{prefix}{f.name}"), getattr(cfg, f.name)) for f in fields(cfg)}


def one_line(err: Exception, keys: dict) -> str:
    """``err`` as one line that starts with the config key it is about.

    ``keys`` maps the field names a constructor was given to ``(config key, value)``. A message
    that already names a key is kept; otherwise the field named first in it is qualified
    (``horizon H=10 must be ...`` -> ``task.horizon=10: horizon H=10 must be ...``).
    """
    msg = " ".join(str(err).split())
    if any(re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", msg) for key, _ in keys.values() if "." in key):
        return msg
    found = []
    for name in keys:
        m = re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", msg)
        if m:
            found.append((m.start(), name))
    if not found:
        return msg
    name = min(found)[1]
    key, value = keys[name]
    if msg.startswith(f"{name}="):
        return key + msg[len(name):]
    return f"{key}={_show(value)}: {msg}"


def _dry_run(build, keys: dict, renames: dict | None = None) -> None:
    """Call ``build()``; its ValueError becomes a ConfigError naming the key. ``renames`` maps
    qualified keys in the message to the names the user wrote (``method.x`` -> ``x``)."""
    try:
        with warnings.catch_warnings():  # warnings are the real build's to give, once
            warnings.simplefilter("ignore")
            build()
    except ValueError as e:
        msg = one_line(e, keys)
        for old, new in (renames or {}).items():
            msg = re.sub(rf"(?<![\w.]){re.escape(old)}(?!\w)", new, msg)
        raise ConfigError(msg) from None


# ------------------------------------------------------------------------------- the owners
def check_task(task: TaskConfig) -> None:
    """``To``, ``H``, ``Ta`` (:func:`check_horizons`) and that image keys are observation keys."""
    _dry_run(lambda: check_horizons(task.horizon, task.n_obs_steps, task.n_action_steps),
             _keys("task.", task))
    unknown = [k for k in task.image_keys if k not in task.obs_keys]
    if unknown:
        raise ConfigError(f"task.image_keys {unknown} must also be listed in task.obs_keys {list(task.obs_keys)}")


def check_method(method: MethodConfig, key_names: dict | None = None) -> None:
    """Build the method: the sampler-steps limit, DPM-Solver's clipping, the schedule's fields.
    ``key_names`` renames keys in the message (dp-eval's ``num_inference_steps`` override)."""
    from diffusion_policy.methods import build_method

    renames = {f"method.{field}": key for field, key in (key_names or {}).items()}
    _dry_run(lambda: build_method(method), _keys("method.", method, key_names), renames)


def check_net(policy: PolicyConfig, task: TaskConfig) -> None:
    """Build the network for the task's chunk on the ``meta`` device (no memory, no init): the
    UNet's horizon divisibility, GroupNorm groups, attention heads."""
    import torch

    from diffusion_policy.nets import build_net

    def build():
        with torch.device("meta"):
            build_net(policy, 1, task.horizon, task.n_obs_steps, 1)

    keys = {**_keys("policy.", policy), **{k: v for k, v in _keys("task.", task).items()
                                           if k in ("horizon", "n_obs_steps")}}
    _dry_run(build, keys)


def check_controller(smoothing: str, ensemble_k: float, task: TaskConfig | None = None) -> None:
    """Build the receding-horizon controller around a stand-in with the task's ``H``, ``To``, ``Ta``
    (or the smallest valid ones): the smoothing mode and the ``Ta`` limit."""
    from diffusion_policy.control import RecedingHorizonController

    h = (task.horizon, task.n_obs_steps, task.n_action_steps) if task is not None else (1, 1, 1)
    stand_in = types.SimpleNamespace(horizon=h[0], n_obs_steps=h[1], n_action_steps=h[2], obs_keys=[])
    keys = {"smoothing": ("smoothing", smoothing), "ensemble_k": ("ensemble_k", ensemble_k)}
    if task is not None:
        keys |= {k: v for k, v in _keys("task.", task).items() if k in ("horizon", "n_obs_steps", "n_action_steps")}
    _dry_run(lambda: RecedingHorizonController(stand_in, 1, smoothing=smoothing, ensemble_k=ensemble_k,
                                               device="cpu"), keys)


# ------------------------------------------------------------------------------- a job config
def validate(cfg: Any) -> Any:
    """Check a composed job config (TrainConfig, EvalConfig, CollectConfig, ...) and return it.
    Raises ConfigError with one line naming the key and what was expected."""
    choices = _choices() if hasattr(cfg, "policy") or hasattr(cfg, "method") else {}  # imports torch
    for dotted, allowed in choices.items():
        group, key = dotted.split(".")
        node = getattr(cfg, group, None)
        if node is None or not hasattr(node, key):
            continue
        value = getattr(node, key)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not allowed; expected one of {', '.join(allowed)}")
    task = getattr(cfg, "task", None)
    if task is not None and not isinstance(task, TaskConfig):  # EvalConfig.task: a plain node
        task = typed(TaskConfig, as_dict(task)) if is_dataclass(task) or hasattr(task, "keys") else None
    if isinstance(task, TaskConfig):
        check_task(task)
    method = getattr(cfg, "method", None)
    if isinstance(method, MethodConfig):
        check_method(method)
    policy = getattr(cfg, "policy", None)
    if isinstance(policy, PolicyConfig) and isinstance(task, TaskConfig):
        check_net(policy, task)
    if isinstance(cfg, EvalConfig):
        check_controller(cfg.smoothing, cfg.ensemble_k)
    if isinstance(cfg, TrainConfig):
        if cfg.ddp_comm not in DDP_COMMS:
            raise ConfigError(f"ddp_comm={cfg.ddp_comm!r} is not allowed; expected one of {', '.join(DDP_COMMS)}")
        if cfg.ddp_bucket_mb < 1:
            raise ConfigError(f"ddp_bucket_mb={cfg.ddp_bucket_mb} must be a positive number of MiB "
                              f"(DDP's bucket_cap_mb; default 25)")
    return cfg

