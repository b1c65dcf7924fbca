"""The real-time loop on the simulated robot in virtual time: dp-eval's actions without latency,
exact counts of dropped actions with injected latency, the naive loop, real-time chunking, and
faults (policy exception, stall, NaN observations, out-of-bounds actions)."""
import math

import numpy as np
import pytest
import torch

from diffusion_policy.config import EVAL_SEED_BASE, compose
from diffusion_policy.control.clock import SimClock
from diffusion_policy.control.realtime import RealtimeLoop
from diffusion_policy.control.safety import Safety
from diffusion_policy.control.sim_robot import SimRobot
from diffusion_policy.control.worker import Latency
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.policy import Policy

TINY = ["task=avoid", "policy=unet_small", "policy.down_dims=[16,32]", "policy.time_embed_dim=16",
        "method=ddim", "method.num_inference_steps=3", "task.max_episode_steps=40"]
SEEDS = [EVAL_SEED_BASE + i for i in range(2)]


def tiny_policy(overrides=(), task="avoid") -> Policy:
    """An untrained tiny policy (its actions are arbitrary but deterministic per seed). Avoid by
    default; Push-T (episodes that run to the time limit) for the chunk-transition tests."""
    cfg = compose("train", TINY + [f"task={task}"] + list(overrides))
    rng = np.random.default_rng(0)
    shapes = {"state": (6,)} if task == "avoid" else {"keypoint": (18,), "agent_pos": (2,)}
    arrays = {k: rng.uniform(-0.2, 0.2, (64, *v)).astype(np.float32) for k, v in shapes.items()}
    arrays["action"] = rng.uniform(-0.2, 0.2, (64, 2)).astype(np.float32)
    norm = Normalizer.fit(arrays, {k: "minmax" for k in arrays})
    torch.manual_seed(0)
    return Policy.build(cfg.task, cfg.policy, cfg.method, norm, shapes, 2).eval()


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


@pytest.fixture(scope="module")
def pusht_policy():
    return tiny_policy(["task.max_episode_steps=40"], task="pusht")


def make_loop(policy, latency=0.0, mode="async", transition="none", margin=0.0, safety=None, **robot_kw):
    clock = SimClock()
    robot = SimRobot(policy.task_cfg, clock, **robot_kw)
    safety = safety or Safety(robot.action_space.low, robot.action_space.high)
    lat = latency if isinstance(latency, Latency) else Latency(latency)
    return RealtimeLoop(policy, robot, clock, safety, mode=mode, transition=transition, action_margin=margin,
                        latency=lat)


def run(loop, seed, max_steps=40):
    return loop.run_episode(max_steps, seed=seed, generator=torch.Generator().manual_seed(seed))


def eval_episodes(policy, seeds, steps=40):
    import diffusion_policy.rollout as ro

    vec = ro.make_vector_env(policy.task_cfg, 1, steps, render=False)
    try:
        records, _, _ = ro.rollout(ro.PolicyActor(policy, 1, "cpu"), vec, list(range(len(seeds))), seeds,
                                   videos=0, final_frames=False)
    finally:
        vec.close()
    return records


@pytest.mark.parametrize("task", ["avoid", "pusht"])
def test_without_latency_the_loop_executes_dp_evals_actions(policy, pusht_policy, task):
    """Same checkpoint, seeds and generators: the same episodes as dp-eval's rollout, action for
    action (both run the one controller; the simulated robot steps the env with the waypoint)."""
    policy = policy if task == "avoid" else pusht_policy
    records = eval_episodes(policy, SEEDS)
    loop = make_loop(policy)
    for rec_eval, seed in zip(records, SEEDS):
        rec, rows = run(loop, seed)
        assert rec["success"] == rec_eval["success"] and rec["steps"] == rec_eval["length"]
        np.testing.assert_allclose(rows["action"].mean(0), rec_eval["mean_action"], atol=1e-6)
        assert rec["dropped_actions"] == 0 and rec["late_waypoints"] == 0 and rec["held_steps"] == 0
        # one chunk per Ta=8 steps, the first executed action is chunk index To-1 at the obs step
        assert rec["chunks"] == math.ceil(rec["steps"] / 8)
        np.testing.assert_array_equal(rows["held"], 0)


@pytest.mark.parametrize("latency_ms,jitter_ms", [(50, 0), (100, 0), (200, 0), (120, 60)])
def test_injected_latency_drops_exactly_the_passed_actions(pusht_policy, latency_ms, jitter_ms):
    """A chunk from the observation at T_j arrives at T_j + L: its actions for steps before that
    are dropped (ceil(L / dt) of them), the old plan covers the gap, and no waypoint ever reaches
    the robot after its stamp. The loop keeps its 10 Hz."""
    lat = Latency(latency_ms / 1e3, jitter_ms / 1e3, seed=3)
    loop = make_loop(pusht_policy, latency=lat)
    rec, rows = run(loop, SEEDS[0])
    assert rec["steps"] == 40 and rec["chunks"] == 5
    dt = 0.1
    expected = [math.ceil((c["latency_s"]) / dt - 1e-9) for c in loop.chunks]
    assert [c["dropped"] for c in loop.chunks] == expected
    assert rec["dropped_actions"] == sum(expected) == int(rows["dropped"].sum())
    if not jitter_ms:
        assert expected == [math.ceil(latency_ms / 100 - 1e-9)] * rec["chunks"]
    assert rec["late_waypoints"] == 0
    # nothing the robot executed came from a waypoint that arrived after its time
    for t, _, stamp, arrival in loop.robot.executed:
        assert math.isnan(stamp) or (abs(stamp - t) < 1e-9 and arrival <= t + 1e-9)
    # only the start waits for the first chunk (ceil(L/dt) steps held); later chunks arrive in time
    assert rec["held_steps"] == expected[0]
    assert rec["rate_hz"] == pytest.approx(10.0)
    # the executed action of a step is the one the loop sent for it
    sent = rows["commanded"] == 1
    np.testing.assert_allclose(rows["action"][sent], rows["sent_action"][sent], atol=1e-6)


def test_naive_loop_holds_while_predicting(pusht_policy):
    """mode=sync: observe, predict (the robot holds for ceil(L/dt) steps), execute Ta actions."""
    loop = make_loop(pusht_policy, latency=0.15, mode="sync")
    rec, rows = run(loop, SEEDS[0])
    # cycles of 10 steps: 2 held (0.15 s -> the first action at the second step after the
    # observation), then Ta = 8 executed; observations at steps 0, 10, 20, 30
    assert rec["chunks"] == 4 and rec["dropped_actions"] == 0 and rec["held_steps"] == 8
    assert [(c["obs_step"], c["start"]) for c in loop.chunks] == [(0, 2), (10, 12), (20, 22), (30, 32)]
    np.testing.assert_array_equal(rows["held"][:12], [1, 1] + [0] * 8 + [1, 1])


def test_sync_without_latency_equals_async(pusht_policy):
    a, ra = run(make_loop(pusht_policy, mode="sync"), SEEDS[1])
    b, rb = run(make_loop(pusht_policy, mode="async"), SEEDS[1])
    assert a["chunks"] == b["chunks"] == 5
    np.testing.assert_array_equal(ra["action"], rb["action"])


def test_rtc_guides_toward_the_committed_actions(pusht_policy, monkeypatch):
    """transition=rtc: the prefix is the previous plan over the whole overlap, aligned by time, the
    weights Black et al.'s soft mask with d = ceil(L / dt)."""
    from diffusion_policy.methods import guidance

    calls = []
    real = guidance.predict_guided

    def spy(pol, obs, prefix, weights, **kw):
        calls.append((prefix.clone(), np.asarray(weights)))
        return real(pol, obs, prefix, weights, **kw)

    monkeypatch.setattr(guidance, "predict_guided", spy)
    loop = make_loop(pusht_policy, latency=0.2, transition="rtc")
    rec, rows = run(loop, SEEDS[0], max_steps=30)
    assert rec["steps"] == 30 and len(calls) == rec["chunks"] - 1 == 3  # the first chunk has no previous plan
    H, To = 16, 2
    prefix, w = calls[0]
    # the second chunk is predicted at obs step 8; the first plan (start 0) covers steps 0..14,
    # i.e. the new chunk's indices [0, 8) (index 0 = step 7); d = 2 steps
    assert prefix.shape == (1, 8, 2)
    np.testing.assert_allclose(w, guidance.rtc_weights(H, 2, exec_horizon=8, start=To - 1).numpy())
    np.testing.assert_array_equal(w[:3], 1.0)
    assert 0 < w[3] < 1 and w[8] == 0
    # index 0 is step 7, index 1..2 steps 8..9: what was sent for them
    np.testing.assert_allclose(prefix[0, :3].numpy(), rows["sent_action"][7:10], atol=1e-6)
    assert rec["late_waypoints"] == 0


def test_replace_imposes_the_committed_prefix(pusht_policy, monkeypatch):
    """transition=replace: plain inpainting of the committed actions (past To-1 and the d=2 steps
    executed while the chunk is computed), through policy.predict(prefix=...)."""
    prefixes = []
    real = pusht_policy.predict

    def spy(obs, num_steps=None, generator=None, prefix=None):
        prefixes.append(None if prefix is None else prefix.clone())
        return real(obs, num_steps=num_steps, generator=generator, prefix=prefix)

    monkeypatch.setattr(pusht_policy, "predict", spy)
    loop = make_loop(pusht_policy, latency=0.2, transition="replace")
    rec, rows = run(loop, SEEDS[0], max_steps=30)
    assert rec["chunks"] == 4 and rec["late_waypoints"] == 0 and prefixes[0] is None
    for p, c in zip(prefixes[1:], loop.chunks[1:]):
        j = c["obs_step"]
        assert p.shape == (1, 3, 2) and c["dropped"] == 2  # steps j-1, j, j+1
        np.testing.assert_allclose(p[0].numpy(), rows["sent_action"][j - 1:j + 2], atol=1e-6)


# --------------------------------------------------------------------------------- faults
class Faulty:
    """A policy stand-in wrapper: raises, returns NaN or out-of-bounds chunks at given calls."""

    def __init__(self, policy, raise_at=(), nan_at=(), scale_at=(), scale=10.0):
        self.p, self.raise_at, self.nan_at, self.scale_at, self.scale = policy, raise_at, nan_at, scale_at, scale
        for k in ("horizon", "n_obs_steps", "n_action_steps", "obs_keys", "action_dim", "shapes"):
            setattr(self, k, getattr(policy, k))
        self.calls = 0

    def parameters(self):
        return self.p.parameters()

    def predict(self, obs, num_steps=None, generator=None, prefix=None):
        i, self.calls = self.calls, self.calls + 1
        if i in self.raise_at or "all" in self.raise_at:
            raise RuntimeError(f"injected failure at call {i}")
        out = self.p.predict(obs, num_steps=num_steps, generator=generator)
        if i in self.nan_at:
            out[:, 3] = float("nan")
        if i in self.scale_at:
            out = out * self.scale
        return out


def _bounded(loop):
    low, high = loop.robot.action_space.low, loop.robot.action_space.high
    for _, target, _, _ in loop.robot.executed:
        assert np.all(target >= low - 1e-6) and np.all(target <= high + 1e-6)


def test_policy_exceptions_hold_then_stop(pusht_policy, tmp_path):
    loop = make_loop(pusht_policy, latency=0.05)
    loop.policy = loop.controller.policy = Faulty(pusht_policy, raise_at=("all",))
    rec, rows = run(loop, SEEDS[0])
    # each retry fails: hold at the first failure, stop at the 10th (max_faults) without a good chunk
    assert rec["stop_reason"] == "safety" and rec["safety"]["policy_error"] == 10
    assert rec["safety"]["hold"] == 1 and rec["safety"]["stop"] == 1 and loop.robot.stopped
    assert rec["chunks"] == 0 and loop.robot.held_steps == len(loop.robot.executed)
    _store_valid(tmp_path, rows)


def test_stall_past_the_deadline_holds_and_recovers(pusht_policy):
    """Call 1 takes 1.5 s: 0.5 s after the 1.0 s deadline the robot holds; the chunk then arrives
    and the loop resumes. Call 1 taking 3 s instead stops the robot (10 faulty ticks)."""
    stall = Latency(fn=lambda i: 1.5 if i == 1 else 0.0)
    loop = make_loop(pusht_policy, latency=stall)
    rec, _ = run(loop, SEEDS[0])
    # requested at t=0.8; faulty ticks at 1.9, 2.0, 2.1, 2.2 (deadline 1.0 s; arrives at 2.3)
    assert rec["safety"]["stall"] == 4 and rec["safety"]["hold"] == 1 and rec["safety"]["stop"] == 0
    assert not rec["stopped"] and rec["chunks"] >= 3
    stop = make_loop(pusht_policy, latency=Latency(fn=lambda i: 3.0 if i == 1 else 0.0))
    rec, _ = run(stop, SEEDS[0])
    assert rec["stop_reason"] == "safety" and rec["safety"]["stall"] == 10 and stop.robot.stopped
    _bounded(stop)


class NanObsRobot(SimRobot):
    """Observations hold NaN at steps in ``bad``."""

    bad = set()

    def observe(self):
        obs, t = super().observe()
        if obs is not None and round((t - self.t0) / self.dt) in self.bad:
            obs = {k: np.full_like(v, np.nan) for k, v in obs.items()}
        return obs, t


def test_nan_observations_hold_and_are_never_planned_from(pusht_policy, tmp_path):
    clock = SimClock()
    robot = NanObsRobot(pusht_policy.task_cfg, clock)
    robot.bad = {8, 9, 10}
    safety = Safety(robot.action_space.low, robot.action_space.high)
    loop = RealtimeLoop(pusht_policy, robot, clock, safety, action_margin=0.0, latency=Latency(0.0))
    rec, rows = run(loop, SEEDS[0])
    assert rec["safety"]["bad_obs"] == 3 and rec["safety"]["hold"] == 1 and not rec["stopped"]
    # the replan due at step 8 waits for the first good observation (step 11)
    assert [c["obs_step"] for c in loop.chunks][:3] == [0, 11, 19]
    assert rows["obs_missing"][7:12].tolist() == [0, 1, 1, 1, 0] and np.all(np.isfinite(rows["keypoint"]))
    _store_valid(tmp_path, rows)


def test_out_of_bounds_actions_are_clipped_and_counted(pusht_policy, tmp_path):
    clock = SimClock()
    robot = SimRobot(pusht_policy.task_cfg, clock)
    safety = Safety(robot.action_space.low, robot.action_space.high, max_delta=0.05,
                    workspace_low=[-0.2, -0.24], workspace_high=[0.2, 0.24])
    loop = RealtimeLoop(Faulty(pusht_policy, scale_at=(0, 1, 2, 3, 4), nan_at=(2,)), robot, clock, safety,
                        action_margin=0.0, latency=Latency(0.0))
    rec, rows = run(loop, SEEDS[0])
    assert rec["safety"]["reject_chunk"] == 1 and rec["safety"]["clip_bounds"] > 0
    assert rec["safety"]["clip_rate"] > 0
    _bounded(loop)
    ws = np.array([0.2, 0.24])
    for _, target, _, _ in robot.executed:
        assert np.all(np.abs(target) <= ws + 1e-9)
    sent = rows["sent_action"][rows["commanded"] == 1]
    assert np.all(np.abs(np.diff(sent, axis=0)) <= 0.05 + 1e-6)
    _store_valid(tmp_path, rows)


def _store_valid(tmp_path, rows):
    from diffusion_policy.data import EpisodeStore, validate_store

    path = tmp_path / "log.zarr"
    store = EpisodeStore.create(path)
    rows = dict(rows, episode_seed=np.zeros(len(rows["action"]), np.int64))
    store.add_episode(rows)
    errors, _ = validate_store(path)
    assert errors == []
    back = EpisodeStore.open(path)
    assert back.n_episodes == 1 and np.all(np.isfinite(back["action"]))


def test_rtc_after_a_stall_that_outlasts_the_plan_samples_unguided():
    """To = 3 and a 1.5 s stall: when the next chunk is requested the previous plan ended before the
    observation's step, so there is nothing committed to guide toward; the loop samples unguided
    (it used to raise in the soft mask) and finishes the episode."""
    pol = tiny_policy(["task.max_episode_steps=40", "task.n_obs_steps=3"], task="pusht")
    loop = make_loop(pol, latency=Latency(fn=lambda i: 1.5 if i == 1 else 0.0), transition="rtc")
    rec, _ = run(loop, SEEDS[0])
    assert rec["steps"] == 40 and rec["chunks"] == 5 and not rec["stopped"]
    assert rec["safety"]["stall"] == 4 and rec["safety"]["hold"] == 1 and rec["late_waypoints"] == 0
