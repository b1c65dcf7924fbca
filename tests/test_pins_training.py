"""dp-train behaviours pinned to exact values through the public functions: the EMA recurrence
(hand-computed) and the EMA being what checkpoints and dp-eval load, the top-k order of
checkpoints and the ``best`` pointer, the normalizer fitted on training episodes only, the
selection rollouts on the selection seed range, and gradient clipping at the configured norm.

Tiny budgets throughout (a 2-level UNet of 16/32 channels, 3 steps): each test takes seconds.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import diffusion_policy.rollout as rollout_mod
from diffusion_policy import checkpoint as ckpt
from diffusion_policy.config import COLLECT_SEED_BASE, EVAL_SEED_BASE, SEED_RANGE, SELECT_SEED_BASE, compose
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.data.store import EpisodeStore
from diffusion_policy.data.windows import split_episodes
from diffusion_policy.train import ema_decay, ema_update, train

TINY = ["policy=unet_small", "policy.down_dims=[16,32]", "policy.time_embed_dim=16",
        "batch_size=8", "log_every=1", "val_every=100", "checkpoint_every=1", "warmup_steps=1",
        "device=cpu", "method.num_inference_steps=2"]


def _store(path: Path, episodes: int = 8, length: int = 24) -> Path:
    """Training episode ``i`` holds values in ``[i, i + 1]`` on every key, the validation episodes
    of dp-train's split (val_ratio 0.25, seed 0) values in ``[-50, -49]`` and ``[50, 51]``: the
    normalizer's min and max then say whether it saw a validation episode."""
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(path)
    task = compose("train", []).task
    val = [int(e) for e in split_episodes(episodes, 0.25, 0)[1]]
    for i in range(episodes):
        band = {val[0]: -50, val[-1]: 50}.get(i, i)
        ep = {task.action_key: (band + rng.uniform(0, 1, (length, 2))).astype(np.float32)}
        for k in task.obs_keys:
            ep[k] = (band + rng.uniform(0, 1, (length, 6))).astype(np.float32)
        store.add_episode(ep)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("pins") / "bands.zarr")


@pytest.fixture(scope="module")
def run_with_every_step(store, tmp_path_factory):
    """A 3-step run with a checkpoint after every step; each checkpoint is copied aside right
    after it is written (dp-train keeps only the newest and the top-k). Returns (run, copies)."""
    root = tmp_path_factory.mktemp("ema")
    run, copies = root / "run", root / "copies"
    real = ckpt.TrainingState.save

    def save_and_copy(state, run_dir, *a, **kw):
        name = real(state, run_dir, *a, **kw)
        shutil.copytree(ckpt._dir(run_dir) / name, copies / name)
        return name

    mp = pytest.MonkeyPatch()
    mp.setattr(ckpt.TrainingState, "save", save_and_copy)
    try:
        train(compose("train", TINY + [f"data={store}", f"run_dir={run}", "steps=3", "val_ratio=0.25"]))
    finally:
        mp.undo()
    return run, copies


def _weights(path: Path) -> dict:
    return safetensors.torch.load_file(str(path))


# ------------------------------------------------------------------------------------ EMA
def test_ema_decay_values_by_hand():
    # decay = 1 - (1 + step)^-0.75 (Chi et al.), 0 at step 0, capped at max_decay
    assert ema_decay(1, 0.75, 0.9999) == 1 - 2 ** -0.75
    assert ema_decay(3, 0.75, 0.9999) == 1 - 4 ** -0.75
    assert ema_decay(15, 0.5, 0.9999) == 0.75
    assert ema_decay(15, 0.5, 0.7) == 0.7


def test_ema_update_after_k_steps_matches_hand_computation():
    """Three updates with decays 0.5, 0.25, 0.75 of a 1-parameter EMA, written out by hand:
    e1 = 0.5*0 + 0.5*4 = 2, e2 = 0.25*2 + 0.75*8 = 6.5, e3 = 0.75*6.5 + 0.25*(-2) = 4.375.
    Buffers are copied, not averaged."""
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    model.register_buffer("stat", torch.zeros(1))
    ema.register_buffer("stat", torch.zeros(1))
    ema.weight.data.fill_(0.0)
    for w, d, e in [(4.0, 0.5, 2.0), (8.0, 0.25, 6.5), (-2.0, 0.75, 4.375)]:
        model.weight.data.fill_(w)
        model.stat.fill_(w + 1)
        ema_update(ema, model, d)
        assert float(ema.weight.detach()) == e and float(ema.stat) == w + 1
        assert float(model.weight.detach()) == w  # the model is not touched


def test_checkpointed_policy_is_the_ema_of_the_training_weights(run_with_every_step):
    """policy/ of step k = d_k * policy/ of step k-1 + (1 - d_k) * model of step k, for every
    tensor, with d_k = ema_decay(k, 0.75, 0.9999): the recurrence of dp-train's EMA read back from
    the files it wrote."""
    _, copies = run_with_every_step
    for k in (2, 3):
        prev = _weights(copies / f"step_{k - 1:07d}" / "policy" / "model.safetensors")
        ema = _weights(copies / f"step_{k:07d}" / "policy" / "model.safetensors")
        raw = _weights(copies / f"step_{k:07d}" / "model.safetensors")
        d = ema_decay(k, 0.75, 0.9999)
        params = [n for n in ema if "normalizer" not in n]
        assert params and sorted(ema) == sorted(raw)
        moved = 0
        for n in params:
            expect = d * prev[n] + (1 - d) * raw[n]
            torch.testing.assert_close(ema[n], expect, rtol=1e-6, atol=1e-7, msg=f"step {k} {n}")
            moved += not torch.equal(ema[n], prev[n])
        assert moved > len(params) // 2  # the EMA moved: it is not frozen at the initial weights
        assert any(not torch.allclose(ema[n], raw[n]) for n in params)  # and it is not the raw weights


def test_evaluation_loads_the_ema_weights(run_with_every_step):
    """dp-eval and load_policy on a run directory load policy/ (the EMA), not model.safetensors."""
    run, _ = run_with_every_step
    name = ckpt.read_latest(run)
    assert name == "step_0000003"
    assert ckpt.resolve_checkpoint(run) == run / "checkpoints" / name / "policy"
    loaded = ckpt.load_policy(run).state_dict()
    ema = _weights(run / "checkpoints" / name / "policy" / "model.safetensors")
    raw = _weights(run / "checkpoints" / name / "model.safetensors")
    assert all(torch.equal(loaded[n], ema[n]) for n in ema)
    assert any(not torch.equal(loaded[n], raw[n]) for n in raw)


# ------------------------------------------------------------------------------------ normalizer
def test_normalizer_is_fitted_on_training_episodes_only(run_with_every_step, store):
    """The bands of the store say which episodes the statistics saw: exactly the training split
    of ``split_episodes(8, 0.25, seed=0)``, no validation episode."""
    run, _ = run_with_every_step
    train_ids, val_ids = split_episodes(8, 0.25, 0)
    assert len(val_ids) == 2 and len(train_ids) == 6
    s = EpisodeStore.open(store)
    rows = np.concatenate([np.arange(*s.episode_slice(int(e)).indices(s.n_steps)) for e in train_ids])
    norm = ckpt.load_policy(run).normalizer
    for key in ("action", "state"):
        x = np.asarray(s[key])[rows]
        expected = Normalizer.fit({key: x}, {key: "minmax"})
        for stat in ("min", "max", "scale", "offset", "mean", "std"):
            got = getattr(norm.stats[key], stat)
            assert torch.equal(got, getattr(expected.stats[key], stat)), (key, stat)
        # the validation bands lie outside the training ones: had they been fitted, min and max would move
        lo, hi = norm.stats[key].min.numpy(), norm.stats[key].max.numpy()
        assert np.all(lo >= 0) and np.all(hi <= 8)


def test_constant_dimension_gets_unit_scale():
    """A dimension with (near-)zero spread is shifted, not divided by ~0 (LeRobot #211): scale 1
    in both modes; offset -mean (meanstd) and -(min + max) / 2 (minmax)."""
    x = np.array([[1.0, 3.0], [3.0, 3.0], [5.0, 3.0]], dtype=np.float32)
    cases = [("meanstd", [1 / np.std([1.0, 3.0, 5.0]), 1.0], None), ("minmax", [0.5, 1.0], [-1.5, -3.0])]
    for mode, scale, offset in cases:
        st = Normalizer.fit({"a": x}, {"a": mode}).stats["a"]
        np.testing.assert_allclose(st.scale.numpy(), scale, rtol=1e-6)
        if offset is not None:
            np.testing.assert_allclose(st.offset.numpy(), offset, rtol=1e-6)
        assert float(st.scale[1]) == 1.0, mode


# ------------------------------------------------------------------------------------ top-k
def _tiny_state():
    cfg = compose("train", TINY)
    arrays = {"state": np.linspace(-1, 1, 60, dtype=np.float32).reshape(10, 6),
              "action": np.linspace(-1, 1, 20, dtype=np.float32).reshape(10, 2)}
    from diffusion_policy.policy import Policy
    from diffusion_policy.train import lr_lambda

    torch.manual_seed(0)
    policy = Policy.build(cfg.task, cfg.policy, cfg.method,
                          Normalizer.fit(arrays, {"state": "minmax", "action": "minmax"}), {"state": (6,)}, 2)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    return ckpt.TrainingState(policy, None, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1, 10)))


def test_topk_order_and_best_for_a_known_score_sequence(tmp_path):
    """Scores (success rate, mean max reward) by step; k = 2. Ties in success go to the reward,
    ties in both to the later step. ``best`` names the best, the folders kept are the top-k plus
    the newest."""
    state = _tiny_state()
    scores = {1: (0.2, 0.5), 2: (0.8, 0.1), 3: (0.5, 0.9), 4: (0.8, 0.3), 5: (0.1, 0.1), 6: None}
    expected_best = {1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4}
    expected_topk = {1: [1], 2: [2, 1], 3: [2, 3], 4: [4, 2], 5: [4, 2], 6: [4, 2]}
    for step, score in scores.items():
        state.step = step
        state.save(tmp_path, {}, score=score, k=2)
        assert [e["step"] for e in state.topk] == expected_topk[step], step
        best = (tmp_path / "checkpoints" / "best").read_text().strip()
        assert best == f"step_{expected_best[step]:07d}", step
        assert ckpt.read_latest(tmp_path) == f"step_{step:07d}"
        kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
        assert kept == sorted({f"step_{s:07d}" for s in expected_topk[step]} | {f"step_{step:07d}"}), step
    saved = json.loads((tmp_path / "checkpoints" / "step_0000006" / "trainer.json").read_text())
    assert saved["topk"] == [{"name": "step_0000004", "step": 4, "score": [0.8, 0.3]},
                             {"name": "step_0000002", "step": 2, "score": [0.8, 0.1]}]
    # a tie in both scores: the later step ranks first
    state.step = 7
    state.save(tmp_path, {}, score=(0.8, 0.3), k=2)
    assert [e["step"] for e in state.topk] == [7, 4]
    assert ckpt.resolve_checkpoint(tmp_path / "checkpoints" / "best") == \
        tmp_path / "checkpoints" / "step_0000007" / "policy"


# ------------------------------------------------------------------------------------ seeds
def test_seed_ranges_are_disjoint():
    ranges = sorted([(COLLECT_SEED_BASE, "collect"), (SELECT_SEED_BASE, "select"), (EVAL_SEED_BASE, "eval")])
    assert [r for r, _ in ranges] == [0, 500_000, 1_000_000] and SEED_RANGE == 500_000
    assert [n for _, n in ranges] == ["collect", "select", "eval"]


def test_collection_seeds_are_guarded():
    from diffusion_policy.collect import attempt_seeds

    first, stop = attempt_seeds(7, 10)
    assert first == COLLECT_SEED_BASE + 7 and stop <= SELECT_SEED_BASE
    with pytest.raises(Exception, match="collection range"):
        attempt_seeds(SEED_RANGE - 3, 10)


def test_selection_rollouts_use_the_selection_seeds_and_pick_the_best(store, tmp_path, monkeypatch):
    """dp-train's rollouts (eval_every) run on seeds SELECT_SEED_BASE + i, with the EMA weights,
    and the scores they return decide ``best``. run_episodes is replaced by a recorder that scores
    step 2 highest."""
    calls = []

    def fake_run_episodes(policy, task, seeds, device="cpu", rank=0, world=1, **kw):
        step = len(calls) + 1
        calls.append({"seeds": list(seeds), "training": policy.training,
                      "weights": {k: v.clone() for k, v in policy.state_dict().items()}})
        rate = {1: 0.25, 2: 0.75, 3: 0.5}[step]
        return {"success_rate": rate, "mean_max_reward": rate, "episodes": len(seeds)}

    monkeypatch.setattr(rollout_mod, "run_episodes", fake_run_episodes)
    run = tmp_path / "sel"
    out = train(compose("train", TINY + [f"data={store}", f"run_dir={run}", "steps=3", "eval_every=1",
                                          "eval_episodes=3", "topk=2", "val_ratio=0.25"]))
    assert [c["seeds"] for c in calls] == [[SELECT_SEED_BASE, SELECT_SEED_BASE + 1, SELECT_SEED_BASE + 2]] * 3
    assert not any(c["training"] for c in calls)
    assert (run / "checkpoints" / "best").read_text().strip() == "step_0000002"
    assert out["best"]["name"] == "step_0000002" and out["best"]["score"] == [0.75, 0.75]
    ema = _weights(run / "checkpoints" / "step_0000003" / "policy" / "model.safetensors")
    assert all(torch.equal(calls[2]["weights"][k], ema[k]) for k in ema)  # rolled out: the EMA
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["eval/success_rate"] for x in lines if "eval/success_rate" in x] == [0.25, 0.75, 0.5]


# ------------------------------------------------------------------------------ gradient clipping
def test_each_step_clips_the_gradients_to_the_configured_norm(store, tmp_path, monkeypatch):
    """Every optimizer step clips with ``grad_clip`` from the config: the gradients the optimizer
    sees have total norm min(norm before, grad_clip). Recorded by wrapping torch's clip_grad_norm_."""
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def recording(parameters, max_norm, *args, **kwargs):
        params = [p for p in parameters if p.grad is not None]
        before = real(params, float("inf"))  # the norm alone (an infinite bound scales nothing)
        out = real(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        calls.append((float(max_norm), float(before), float(after), float(out)))
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    train(compose("train", TINY + [f"data={store}", f"run_dir={tmp_path / 'run'}", "steps=2", "grad_clip=0.001"]))
    assert [c[0] for c in calls] == [0.001, 0.001]  # one clip per step, at the configured norm
    for max_norm, before, after, returned in calls:
        assert before > max_norm  # this tiny run's gradients are far larger: clipping really acts
        assert after == pytest.approx(max_norm, rel=1e-5)
        assert returned == pytest.approx(before, rel=1e-6)  # torch returns the norm before clipping
