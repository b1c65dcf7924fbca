"""dp-eval and its metrics pinned to exact values: known metrics of hand-made episode records, the
scripted expert succeeding on every seed, the evaluation seed range and its guard, and each option
of dp-eval (num_inference_steps, smoothing, bf16) changing what the episodes record, and a rollout
record's max reward on an env whose reward peaks mid-episode."""
import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from diffusion_policy import evaluate as ev
from diffusion_policy import report
from diffusion_policy.config import EVAL_SEED_BASE, SEED_RANGE, EvalConfig, TaskConfig, compose
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.policy import Policy
from diffusion_policy.rollout import rollout

AVOID = dict(name="avoid", env_id="dp/Avoid-v0", env_kwargs={"obs_mode": "state"},
             obs_keys=["state"], image_keys=[], horizon=8, n_obs_steps=2, n_action_steps=4,
             max_episode_steps=30, expert="avoid", fps=10.0)
TINY = ["task=avoid", "policy=unet_small", "policy.down_dims=[16,32]", "policy.time_embed_dim=16",
        "method=ddim", "task.max_episode_steps=10"]


def test_metrics_of_hand_made_records():
    """3 successes of 4; max rewards 1, 0.5, 1, 0.25 (mean 0.6875); Wilson (1927) 95% interval of
    3/4: centre (0.75 + z^2/8) / (1 + z^2/4), half-width z / (1 + z^2/4) sqrt(3/64 + z^2/64)."""
    records = [dict(seed=10 + i, success=s, max_reward=m, length=n, **{"return": r})
               for i, (s, m, n, r) in enumerate([(True, 1.0, 5, 2.0), (False, 0.5, 30, 3.0),
                                                 (True, 1.0, 7, 1.0), (True, 0.25, 9, 0.5)])]
    m = report.compute_metrics(records, [1.0, 2.0, 3.0, 10.0], {"task": "t"})
    z = report.Z95
    centre, half = (0.75 + z * z / 8) / (1 + z * z / 4), z / (1 + z * z / 4) * np.sqrt(3 / 64 + z * z / 64)
    assert m["success_rate"] == 0.75 and m["successes"] == 3 and m["episodes"] == 4
    assert m["success_ci"] == pytest.approx([centre - half, centre + half], abs=1e-12)
    assert m["success_ci"] == pytest.approx([0.30064, 0.95441], abs=1e-5)
    assert m["mean_max_reward"] == 0.6875 and m["mean_return"] == 1.625 and m["mean_episode_length"] == 12.75
    assert m["latency_p50_ms"] == 2.5 and m["latency_mean_ms"] == 4.0 and m["predict_calls"] == 4
    assert m["seeds"] == [10, 11, 12, 13] and m["task"] == "t"


def test_expert_succeeds_on_every_seed(tmp_path):
    """The scripted expert solves Avoid: success rate exactly 1.0 on three evaluation seeds, and
    the seeds are the evaluation range's."""
    m = ev.evaluate(EvalConfig(checkpoint="expert", task=TaskConfig(**{**AVOID, "max_episode_steps": 60}),
                               episodes=3, videos=0, out=str(tmp_path / "x"), seed=0))
    assert m["success_rate"] == 1.0 and m["successes"] == 3
    assert m["seeds"] == [1_000_000, 1_000_001, 1_000_002] and m["seed_base"] == EVAL_SEED_BASE == 1_000_000
    eps = [json.loads(x) for x in (tmp_path / "x" / "episodes.jsonl").read_text().splitlines()]
    assert [e["success"] for e in eps] == [True, True, True] and all(e["length"] < 60 for e in eps)
    assert [e["max_reward"] for e in eps] == [max(e["rewards"]) for e in eps]


def test_evaluation_seed_guard(tmp_path):
    """seed + episodes must stay inside the evaluation range [EVAL_SEED_BASE, + SEED_RANGE)."""
    task = TaskConfig(**AVOID)
    for seed, episodes in [(-1, 1), (SEED_RANGE - 1, 2), (SEED_RANGE, 1)]:
        with pytest.raises(ev.EvalError, match=f"seed={seed}: seed \\+ episodes must stay within"):
            ev.evaluate(EvalConfig(checkpoint="expert", task=task, episodes=episodes, videos=0, seed=seed,
                                   out=str(tmp_path / "g")))
            pytest.fail(f"seed={seed} episodes={episodes} accepted")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalpins")
    for name, steps in (("r3", 3), ("r2", 2)):  # the same weights, saved with 3 and with 2 sampler steps
        cfg = compose("train", TINY + [f"method.num_inference_steps={steps}"])
        rng = np.random.default_rng(0)
        arrays = {"state": rng.uniform(-0.4, 0.4, (64, 6)).astype(np.float32),
                  "action": rng.uniform(-0.4, 0.4, (64, 2)).astype(np.float32)}
        import torch

        torch.manual_seed(0)
        policy = Policy.build(cfg.task, cfg.policy, cfg.method, Normalizer.fit(arrays, {"state": "minmax",
                              "action": "minmax"}), {"state": (6,)}, 2)
        policy.save(root / name / "checkpoints" / "step_0000001" / "policy")
        (root / name / "checkpoints" / "latest").write_text("step_0000001\n")
    return root


def _run(run_dir, tmp_path, name, *extra, ckpt="r3"):
    out = tmp_path / name
    m = ev.evaluate(compose("eval", [f"checkpoint={run_dir / ckpt}", "episodes=2", "videos=0", "n_envs=1",
                                     "device=cpu", f"out={out}", "seed=4", *extra]))
    eps = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    return m, [e["mean_action"] for e in eps]


def test_each_eval_option_changes_the_episodes(run_dir, tmp_path):
    m0, base = _run(run_dir, tmp_path, "base")
    # num_inference_steps=2 on the 3-step checkpoint: exactly the 2-step checkpoint's episodes
    m2, two = _run(run_dir, tmp_path, "n2", "num_inference_steps=2")
    _, saved_two = _run(run_dir, tmp_path, "s2", ckpt="r2")
    assert m2["num_inference_steps"] == 2 and two == saved_two and two != base
    for option in ("smoothing=ensemble", "smoothing=blend", "bf16=true"):
        m, acts = _run(run_dir, tmp_path, option.replace("=", "_"), option)
        key, value = option.split("=")
        assert str(m[key]).lower() == value
        assert not np.allclose(acts, base, atol=1e-6, rtol=0), option  # the option took effect
    assert m0["smoothing"] == "none" and m0["bf16"] is False



class _PeakEnv(gym.Env):
    """A one-dimensional env whose reward rises to 0.9 at step 2 and falls (0.2, 0.9, 0.5, 0.1),
    ending after 4 steps: the episode's highest reward is neither its last nor its mean."""

    REWARDS = (0.2, 0.9, 0.5, 0.1)
    observation_space = gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (1,), np.float32)})
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return {"state": np.zeros(1, np.float32)}, {}

    def step(self, action):
        r = self.REWARDS[self.t]
        self.t += 1
        return {"state": np.zeros(1, np.float32)}, r, self.t == len(self.REWARDS), False, {"success": False}


class _ZeroActor:
    """An actor that always commands 0 (the rollout's actor protocol)."""

    def begin(self, i, seed, env=None):
        pass

    def act(self, obs, active, vec_env=None):
        return np.zeros((len(active), 1), np.float32)

    def latencies(self):
        return []


def test_rollout_record_keeps_the_episodes_highest_reward():
    vec = SyncVectorEnv([_PeakEnv], autoreset_mode=AutoresetMode.DISABLED)
    try:
        records, _, _ = rollout(_ZeroActor(), vec, [0], [7], videos=0, final_frames=False)
    finally:
        vec.close()
    (rec,) = records
    assert rec["max_reward"] == pytest.approx(0.9)  # step 2's, not the last (0.1)
    assert rec["return"] == pytest.approx(1.7) and rec["length"] == 4 and rec["seed"] == 7
    assert rec["rewards"] == [0.2, 0.9, 0.5, 0.1] and rec["success"] is False
