"""Crash safety, deterministically: a crash is injected at every write of the checkpoint commit
protocol (files into a temporary folder, fsync, rename, the ``latest`` and ``best`` pointers) and of
the store's append protocol (data chunks first, ``meta/episode_ends`` last). After each injection
the run's ``latest`` must load, naming the previous or the new checkpoint, and the store must open
with only complete episodes.

The crash is an exception raised by the n-th write operation (a process killed there leaves the
same files, since every write before it has returned)."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from diffusion_policy import checkpoint as ckpt
from diffusion_policy.data.store import EpisodeStore


class Crash(Exception):
    pass


class Writes:
    """Counts the write operations (file writes, fsync, rename, replace, removal) made while
    active, and raises Crash at the ``crash_at``-th one (1-based; 0: never)."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.n, self.crash_at, self.active, self.log = 0, 0, False, []
        for mod, name in [(os, "fsync"), (os, "replace"), (os, "rename"), (Path, "rename"),
                          (Path, "write_text"), (Path, "mkdir"), (shutil, "rmtree"),
                          (ckpt, "save_file"), (safetensors.torch, "save_file")]:
            self._wrap(mp, mod, name)

    def _wrap(self, mp, mod, name):
        real = getattr(mod, name)

        def hooked(*a, **kw):
            if self.active:
                self.n += 1
                self.log.append(name)
                if self.n == self.crash_at:
                    raise Crash(f"crash at write {self.n} ({name})")
            return real(*a, **kw)

        mp.setattr(mod, name, hooked)


def _state(seed: int):
    from diffusion_policy.config import compose
    from diffusion_policy.data.normalize import Normalizer
    from diffusion_policy.policy import Policy
    from diffusion_policy.train import lr_lambda

    cfg = compose("train", ["policy=unet_small", "policy.down_dims=[8,16]", "policy.time_embed_dim=8"])
    arrays = {"state": np.linspace(-1, 1, 60, dtype=np.float32).reshape(10, 6),
              "action": np.linspace(-1, 1, 20, dtype=np.float32).reshape(10, 2)}
    torch.manual_seed(seed)
    policy = Policy.build(cfg.task, cfg.policy, cfg.method,
                          Normalizer.fit(arrays, {"state": "minmax", "action": "minmax"}), {"state": (6,)}, 2)
    ema = Policy.build(cfg.task, cfg.policy, cfg.method,
                       Normalizer.fit(arrays, {"state": "minmax", "action": "minmax"}), {"state": (6,)}, 2)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    return ckpt.TrainingState(policy, ema, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1, 10)))


def _check_run(run: Path, allowed: dict) -> str:
    """``latest`` names a complete checkpoint among ``allowed`` (name -> EMA weights), every file
    loads, and its weights are the ones saved under that name; so does ``best``."""
    name = ckpt.read_latest(run)
    assert name in allowed, name
    saved = ckpt.load_training(run, "cpu")
    assert saved.path.name == name and saved.step == int(name.split("_")[1])
    loaded = ckpt.load_policy(run).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in allowed[name].items()), name
    best = (run / "checkpoints" / "best").read_text().strip()
    assert best in allowed
    ckpt.load_policy(run / "checkpoints" / "best")
    return name


def test_checkpoint_commit_survives_a_crash_at_every_write(tmp_path, monkeypatch):
    state = _state(0)
    weights = {}
    state.step = 1
    state.save(tmp_path / "ref", {}, score=(0.5, 0.5), k=1)
    writes = Writes(monkeypatch)
    # count the writes of one save on top of an existing checkpoint
    writes.active = True
    state.step = 2
    state.save(tmp_path / "ref", {}, score=(0.9, 0.9), k=1)
    writes.active = False
    total = writes.n
    assert total >= 10 and {"fsync", "replace", "rename"} <= set(writes.log), writes.log
    # every file of the checkpoint reaches the disk before the folder is renamed into place, and the
    # pointer file before it replaces ``latest`` (without it a power loss can leave latest empty)
    n_files = sum(p.is_file() for p in (tmp_path / "ref" / "checkpoints" / "step_0000002").rglob("*"))
    first_rename = writes.log.index("rename")
    assert writes.log[:first_rename].count("fsync") >= n_files, writes.log
    first_replace = writes.log.index("replace")
    assert writes.log[first_replace - 1] == "fsync", writes.log
    names_seen = set()
    for crash_at in range(1, total + 1):
        run = tmp_path / f"run{crash_at}"
        s = _state(0)
        s.step = 1
        s.save(run, {}, score=(0.5, 0.5), k=1)
        weights["step_0000001"] = {k: v.clone() for k, v in s.ema.state_dict().items()}
        with torch.no_grad():  # the second checkpoint holds other weights
            for p in s.ema.parameters():
                p.add_(1.0)
        weights["step_0000002"] = {k: v.clone() for k, v in s.ema.state_dict().items()}
        s.step = 2
        writes.n, writes.crash_at, writes.active = 0, crash_at, True
        try:
            s.save(run, {}, score=(0.9, 0.9), k=1)
            raise AssertionError(f"no crash at write {crash_at}")
        except Crash:
            pass
        finally:
            writes.active, writes.crash_at = False, 0
        names_seen.add(_check_run(run, weights))
        # and the next save after the crash completes and cleans up what the crash left
        s.step = 3
        s.save(run, {}, score=(0.1, 0.1), k=1)
        assert ckpt.read_latest(run) == "step_0000003"
        left = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
        assert all(not n.startswith(".") for n in left), left
    assert names_seen == {"step_0000001", "step_0000002"}  # crashes before and after the commit point


def _episode(i: int, length: int) -> dict:
    rng = np.random.default_rng(i)
    return {"action": rng.normal(size=(length, 2)).astype(np.float32),
            "state": rng.normal(size=(length, 6)).astype(np.float32)}


def test_store_append_survives_a_crash_at_every_write(tmp_path, monkeypatch):
    """Appends to a zarr v3 store: the n-th write to the storage (chunk or metadata) raises; the
    store then opens with the complete episodes only, their values intact."""
    import zarr.storage

    real_set = zarr.storage.LocalStore.set
    state = {"n": 0, "crash_at": 0, "keys": []}

    async def hooked(self, key, value, *a, **kw):
        state["n"] += 1
        state["keys"].append(key)
        if state["n"] == state["crash_at"]:
            raise Crash(f"crash at write {state['n']} ({key})")
        return await real_set(self, key, value, *a, **kw)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", hooked)

    def build(path):
        store = EpisodeStore.create(path)
        for i in range(2):
            store.add_episode(_episode(i, 5 + i))
        return EpisodeStore.open(path, mode="a")

    ref = build(tmp_path / "ref.zarr")
    state["n"], state["keys"] = 0, []
    ref.add_episode(_episode(2, 9))  # an append that grows the arrays past a chunk
    total, keys = state["n"], list(state["keys"])
    assert total >= 3 and any("episode_ends" in k for k in keys), keys
    assert "episode_ends" in keys[-1] or any("episode_ends" in k for k in keys[-2:]), keys  # ends last
    seen = set()
    for crash_at in range(1, total + 1):
        path = tmp_path / f"s{crash_at}.zarr"
        store = build(path)
        state["n"], state["crash_at"] = 0, crash_at
        with pytest.raises(Crash):
            store.add_episode(_episode(2, 9))
        state["crash_at"] = 0
        s = EpisodeStore.open(path)
        n = s.n_episodes
        assert n in (2, 3), n
        seen.add(n)
        for e in range(n):
            want = _episode(e, 5 + e if e < 2 else 9)
            for k, v in want.items():
                np.testing.assert_array_equal(np.asarray(s[k])[s.episode_slice(e)], v, err_msg=f"{crash_at} {e} {k}")
        # the store takes the next append after the crash
        s = EpisodeStore.open(path, mode="a")
        if n == 2:
            s.add_episode(_episode(2, 9))
        assert EpisodeStore.open(path).n_episodes == 3
    assert 2 in seen
