"""Training checkpoints: directories of safetensors and JSON, written atomically.

    <run>/checkpoints/
      step_0001000/
        policy/                 the weights used for evaluation (EMA if on) as Policy.save writes
                                them: safetensors + config.json (task, policy, method, normalizer)
        model.safetensors       the raw training weights
        optimizer.safetensors   AdamW moments and steps; optimizer.json its param groups
        rng.safetensors         torch CPU (and CUDA) generator states
        trainer.json            step, scheduler, EMA step count, top-k list, numpy RNG, config
      latest                    the name of the newest complete checkpoint, replaced last
      best                      the name of the best checkpoint by rollout success (if any)

A checkpoint is written under a temporary name, every file flushed to disk, then renamed into
place; only then is ``latest`` replaced (write, fsync, rename). A process killed at any moment
leaves ``latest`` naming a complete checkpoint. No pickle anywhere: loading needs no import paths.
(DESIGN.md, "Checkpoints and their commit protocol".)

What is saved is a :class:`TrainingState` (policy, EMA, optimizer, schedule, step, top-k), and it is
restored as a whole from the :class:`SavedTraining` that :func:`load_training` reads.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffusion_policy.policy import Policy


def _dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def has_latest(run_dir) -> bool:
    return (_dir(run_dir) / "latest").is_file()


def read_latest(run_dir) -> str:
    return (_dir(run_dir) / "latest").read_text().strip()


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_pointer(path: Path, name: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


_IMPL_FLAGS = ("fused", "foreach", "capturable")


def _load_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    # the implementation (fused on CUDA, foreach on CPU) is the resuming run's, not the saved
    # one's: a run saved on a GPU may resume on a CPU and the other way round. torch places each
    # "step" by these flags: on the parameter's device for fused, on the host otherwise (a step on
    # the GPU would cost a host sync per parameter in the unfused AdamW).
    groups = [{**saved, **{k: now[k] for k in _IMPL_FLAGS if k in now}}
              for saved, now in zip(meta["param_groups"], optimizer.param_groups)]
    on_host = {pid for g in groups if not (g.get("fused") or g.get("capturable")) for pid in g["params"]}
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        if name == "step" and int(pid) in on_host and torch.is_tensor(v):
            v = v.cpu()
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@dataclass
class SavedTraining:
    """The newest complete checkpoint of a run, as read by :func:`load_training`: the raw model
    (a Policy) plus the states that :meth:`TrainingState.restore` puts back."""

    path: Path
    policy: Policy
    trainer: dict  # trainer.json: step, scheduler, EMA flag, top-k, numpy RNG, config
    ema: dict | None  # the EMA's state dict
    optimizer: tuple  # (tensors, meta) as _optimizer_tensors made them
    rng: dict

    @property
    def step(self) -> int:
        return int(self.trainer["step"])

    @property
    def config(self) -> dict:
        """The resolved TrainConfig of the run that wrote it, as a dict."""
        return self.trainer["config"]


@dataclass
class TrainingState:
    """Everything a run continues from: the training weights, their EMA, the optimizer, the
    learning-rate schedule, the step and the top-k checkpoints by rollout score. Saved and
    restored as a whole, so a resumed run takes the same steps as one never interrupted (with the
    torch and numpy RNG states, which :meth:`save` writes too).

        state = TrainingState(policy, ema, optimizer, scheduler)
        state.restore(load_training(run_dir, device))   # resume
        state.save(run_dir, as_dict(cfg), score=(success, reward), k=3)
    """

    policy: Policy
    ema: Policy | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    topk: list = field(default_factory=list)
    """``[{"name", "step", "score": [success rate, mean max reward]}]``, best first."""

    def save(self, run_dir, config: dict, score=None, k: int = 3) -> str:
        """Write checkpoint ``step_<step>`` (module docstring: temporary folder, fsync, rename,
        then ``latest`` and ``best``); keep the newest and the top ``k`` by ``score`` =
        (success rate, mean max reward). Returns the checkpoint's name."""
        root = _dir(run_dir)
        root.mkdir(parents=True, exist_ok=True)
        step = self.step
        name = f"step_{step:07d}"
        topk = [e for e in self.topk if e["name"] != name]
        if score is not None:
            topk.append({"name": name, "step": step, "score": list(score)})
            topk = sorted(topk, key=lambda e: (tuple(e["score"]), e["step"]), reverse=True)[:k]

        tmp = root / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        (self.ema if self.ema is not None else self.policy).save(tmp / "policy")
        save_file({k_: v.detach().contiguous().cpu() for k_, v in self.policy.state_dict().items()},
                  str(tmp / "model.safetensors"))
        tensors, meta = _optimizer_tensors(self.optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        np_state = np.random.get_state()
        trainer = {
            "step": step,
            "scheduler": {k_: v for k_, v in self.scheduler.state_dict().items() if k_ != "lr_lambdas"},
            "has_ema": self.ema is not None,
            "topk": topk,
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "config": config,
        }
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        _fsync_tree(tmp)

        final = root / name
        if final.exists():  # e.g. a resumed run saving the step it resumed from
            trash = root / f".old-{name}-{os.getpid()}"
            final.rename(trash)
            shutil.rmtree(trash)
        tmp.rename(final)
        _write_pointer(root / "latest", name)
        if topk:
            _write_pointer(root / "best", topk[0]["name"])
        self.topk = topk

        keep = {name} | {e["name"] for e in topk}
        for old in root.iterdir():
            if old.is_dir() and (old.name not in keep):  # includes .tmp/.old leftovers of killed runs
                shutil.rmtree(old, ignore_errors=True)
        return name

    def restore(self, saved: SavedTraining) -> None:
        """Put back the optimizer, schedule, EMA, step, top-k and the torch and numpy RNG states
        of ``saved`` (the training weights are ``saved.policy``, which this state trains)."""
        trainer = saved.trainer
        _load_optimizer(self.optimizer, *saved.optimizer)
        sched = dict(trainer["scheduler"])
        sched["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(sched)
        if self.ema is not None and saved.ema is not None:
            self.ema.load_state_dict(saved.ema)
        torch.set_rng_state(saved.rng["torch_cpu"])
        cuda = [saved.rng[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count())
                if f"torch_cuda_{i}" in saved.rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        s = trainer["numpy_rng"]
        np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))
        self.step, self.topk = saved.step, list(trainer["topk"])


def load_training(run_dir, device) -> SavedTraining:
    """The checkpoint that ``latest`` names, everything needed to resume."""
    path = _dir(run_dir) / read_latest(run_dir)
    policy = Policy.load(path / "policy", device=device)
    policy.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    trainer = json.loads((path / "trainer.json").read_text())
    return SavedTraining(
        path=path, policy=policy, trainer=trainer,
        ema=load_file(str(path / "policy" / "model.safetensors"), device=str(device))
        if trainer["has_ema"] else None,
        optimizer=(load_file(str(path / "optimizer.safetensors"), device=str(device)),
                   json.loads((path / "optimizer.json").read_text())),
        rng=load_file(str(path / "rng.safetensors")),
    )


class CheckpointError(RuntimeError):
    """A path that holds no usable checkpoint; the message says what was expected."""


def _is_policy_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def resolve_checkpoint(path) -> Path:
    """The policy directory (safetensors + config.json) that ``path`` designates.

    Accepts a policy directory, a checkpoint directory ``<run>/checkpoints/<name>/`` holding
    ``policy/``, a run directory whose ``checkpoints/latest`` (or ``latest``) names a checkpoint,
    or such a pointer file itself (``<run>/checkpoints/best``: the best by selection rollouts).
    """
    p = Path(path).expanduser()
    pointers = [p / "checkpoints" / "latest", p / "latest"]
    if p.is_file():  # a pointer file itself, e.g. <run>/checkpoints/best
        pointers, p = [p], p.parent
    elif not p.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r}: no such directory")
    elif _is_policy_dir(p):
        return p
    elif _is_policy_dir(p / "policy"):
        return p / "policy"
    for pointer in pointers:
        if pointer.is_file():
            name = pointer.read_text().strip()
            ckpt = (pointer.parent / name) if not Path(name).is_absolute() else Path(name)
            for cand in (ckpt, ckpt / "policy"):
                if _is_policy_dir(cand):
                    return cand
            raise CheckpointError(f"checkpoint {str(path)!r}: {pointer} names {name!r}, but {ckpt} holds "
                            f"no policy (expected config.json + *.safetensors in it or in policy/)")
    raise CheckpointError(f"checkpoint {str(path)!r} is not a policy dir (config.json + *.safetensors), a "
                    f"checkpoint dir (with policy/) or a run dir (with checkpoints/latest)")


def load_policy(path, device="cpu") -> Policy:
    """One call from a run directory, a checkpoint directory, a policy directory or a pointer
    file (``checkpoints/best``) to a policy ready for ``predict`` (EMA weights when training kept
    them), on CPU or GPU, without the training config tree."""
    return Policy.load(resolve_checkpoint(path), device=device).eval()
