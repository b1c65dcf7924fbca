"""dp-eval: checkpoint resolution, clear errors, the Wilson interval, seeds and reproducibility.

A stand-in policy (stateless, seeded through the generator it is given) replaces Policy.load here so
that these tests do not depend on training; tests/test_eval_e2e.py runs a real tiny checkpoint.
"""
import json
import os

import pytest
import torch

from diffusion_policy import evaluate as ev
from diffusion_policy import report
from diffusion_policy.config import EVAL_SEED_BASE, EvalConfig, TaskConfig, compose

os.environ.setdefault("MUJOCO_GL", "egl")

AVOID = dict(name="avoid", env_id="dp/Avoid-v0", env_kwargs={"obs_mode": "state"},
             obs_keys=["state"], image_keys=[], horizon=8, n_obs_steps=2, n_action_steps=4,
             max_episode_steps=30, expert="avoid", fps=10.0)


class NoisyReacher:
    """Stand-in policy: aims at the goal (state[2:4]) plus generator noise; obs (B, To, 6)."""

    horizon, n_obs_steps, n_action_steps, obs_keys = 8, 2, 4, ["state"]

    def predict(self, obs, num_steps=None, generator=None):
        s = obs["state"][:, -1].float()  # (B, 6)
        goal = s[:, None, 2:4].expand(-1, self.horizon, -1)
        noise = torch.randn(s.shape[0], self.horizon, 2, generator=generator) * 0.15
        return goal + noise

    def eval(self):
        return self


def _policy_dir(path, task=AVOID, shapes=None):
    """A policy folder whose config.json is a complete spec (no weights: the stand-in is loaded)."""
    path.mkdir(parents=True)
    cfg = {"format_version": 1, "task": task, "policy": {"name": "mlp"}, "method": {"name": "regression"},
           "shapes": shapes or {"state": [6]}, "action_dim": 2, "normalizer": {}}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setattr(ev, "_load_policy", lambda d, label, device: NoisyReacher())


# ------------------------------------------------------------------------------------ helpers
def test_wilson_interval_known_values():
    # reference values: Wilson (1927) score interval, z = 1.96 (e.g. Brown, Cai & DasGupta 2001)
    assert report.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert report.wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert report.wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert report.wilson_interval(0, 0) == (0.0, 1.0)
    # and scipy's implementation (scipy.stats.binomtest(k, n).proportion_ci(0.95, "wilson"),
    # scipy 1.17.1), recorded here so the suite does not need scipy
    scipy_wilson = {(1, 2): (0.09453120573423074, 0.9054687942657693),
                    (81, 263): (0.2552885198782742, 0.36620957698280004),
                    (37, 50): (0.6044684273515115, 0.8412847250644762)}
    for (k, n), ci in scipy_wilson.items():
        assert report.wilson_interval(k, n) == pytest.approx(ci, abs=1e-9)


def test_resolve_checkpoint_accepts_run_checkpoint_and_policy_dirs(tmp_path):
    run = tmp_path / "run"
    pol = _policy_dir(run / "checkpoints" / "step_0000010" / "policy")
    (run / "checkpoints" / "latest").write_text("step_0000010\n")
    assert ev.resolve_checkpoint(run) == pol
    assert ev.resolve_checkpoint(run / "checkpoints" / "step_0000010") == pol
    assert ev.resolve_checkpoint(pol) == pol
    (run / "checkpoints" / "best").write_text("step_0000010\n")
    assert ev.resolve_checkpoint(run / "checkpoints" / "best") == pol
    assert ev._checkpoint_label(pol) == "run-step_0000010"


def test_resolve_checkpoint_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ev.CheckpointError, match="no such directory"):
        ev.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ev.CheckpointError, match="not a policy dir"):
        ev.resolve_checkpoint(tmp_path / "empty")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_0000099")
    with pytest.raises(ev.CheckpointError, match="names 'step_0000099'"):
        ev.resolve_checkpoint(run)


def _cfg(tmp_path, **kw):
    base = dict(checkpoint=str(tmp_path / "ckpt"), episodes=2, n_envs=1, videos=1,
                out=str(tmp_path / "out"), device="cpu")
    base.update(kw)
    return EvalConfig(**base)


def test_wrong_task_fails_before_anything_runs(tmp_path):
    _policy_dir(tmp_path / "ckpt")
    other = TaskConfig(**{**AVOID, "name": "pusht", "env_id": "dp/PushT-v0"})
    with pytest.raises(ev.EvalError, match="trained for task 'avoid', not task='pusht'"):
        ev.evaluate(_cfg(tmp_path, task=other))


def test_wrong_observation_keys_and_shapes(tmp_path, standin):
    _policy_dir(tmp_path / "ckpt", task={**AVOID, "obs_keys": ["image", "agent_pos"]})
    with pytest.raises(ev.EvalError, match=r"expects observation keys \['image', 'agent_pos'\] .* "
                                           r"provides \['state'\]"):
        ev.evaluate(_cfg(tmp_path))
    _policy_dir(tmp_path / "ckpt2", shapes={"state": [20]})
    with pytest.raises(ev.EvalError, match=r"'state' of shape \(20,\) but env dp/Avoid-v0 provides"):
        ev.evaluate(_cfg(tmp_path, checkpoint=str(tmp_path / "ckpt2")))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert ev.main([f"checkpoint={tmp_path / 'missing'}", "episodes=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such directory" in err
    assert ev.main(["checkpoint=expert", "episodes=1"]) == 2
    assert "needs task=<name>" in capsys.readouterr().err


def test_eval_config_composes_with_task_group():
    cfg = compose("eval", ["checkpoint=expert", "task=avoid", "episodes=3", "smoothing=blend"])
    assert cfg.task.name == "avoid" and cfg.episodes == 3 and cfg.smoothing == "blend"
    assert compose("eval", ["checkpoint=x"]).task is None


# ------------------------------------------------------------------------------------ rollouts
def test_expert_baseline_through_the_same_runner(tmp_path):
    m = ev.evaluate(EvalConfig(checkpoint="expert", task=TaskConfig(**AVOID), episodes=2,
                               videos=1, out=str(tmp_path / "out"), seed=5))
    assert m["episodes"] == 2 and m["seeds"] == [EVAL_SEED_BASE + 5, EVAL_SEED_BASE + 6]
    assert m["expert"] and m["predict_calls"] == 0
    assert (tmp_path / "out" / "videos" / "episode_0000.mp4").is_file()
    assert not (tmp_path / "out" / "videos" / "episode_0001.mp4").exists()


def test_results_do_not_depend_on_n_envs_or_ranks(tmp_path, standin, monkeypatch):
    """Same checkpoint and seed: identical episodes whether run by 1 env, 2 worker processes, or
    two ranks (files merged by rank 0)."""
    _policy_dir(tmp_path / "ckpt")
    one = ev.evaluate(_cfg(tmp_path, episodes=3, n_envs=1, videos=0, out=str(tmp_path / "a")))
    two = ev.evaluate(_cfg(tmp_path, episodes=3, n_envs=2, videos=0, out=str(tmp_path / "b")))
    def read(d):
        return [json.loads(x) for x in (tmp_path / d / "episodes.jsonl").read_text().splitlines()]

    assert read("a") == read("b")
    assert one["success_rate"] == two["success_rate"] and two["n_envs"] == 2
    assert one["predict_calls"] > 0 and one["latency_p50_ms"] > 0

    # two ranks without torch.distributed: rank 1 writes its part, rank 0 merges
    out = tmp_path / "c"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert ev.evaluate(_cfg(tmp_path, episodes=3, videos=0, out=str(out))) == {}
    assert (out / "parts" / "rank001.json").is_file()
    monkeypatch.setenv("RANK", "0")
    merged = ev.evaluate(_cfg(tmp_path, episodes=3, videos=0, out=str(out)))
    assert merged["episodes"] == 3 and merged["world_size"] == 2
    assert read("c") == read("a")
    assert not (out / "parts" / "rank001.json").exists()


def test_run_episodes_for_training_selection(standin):
    task = TaskConfig(**AVOID)
    seeds = [500_000 + i for i in range(2)]
    m = ev.run_episodes(NoisyReacher(), task, seeds, device="cpu", n_envs=1)
    assert m["episodes"] == 2 and m["seeds"] == seeds
    assert 0.0 <= m["success_rate"] <= 1.0 and "mean_max_reward" in m


def test_shared_generator_batches_and_is_reproducible_for_fixed_n_envs(tmp_path, standin):
    _policy_dir(tmp_path / "ckpt")
    runs = [ev.evaluate(_cfg(tmp_path, episodes=2, n_envs=2, videos=0, episode_generators=False,
                             out=str(tmp_path / d))) for d in ("a", "b")]
    def read(d):
        return [json.loads(x) for x in (tmp_path / d / "episodes.jsonl").read_text().splitlines()]

    assert read("a") == read("b") and not runs[0]["episode_generators"]
    per_episode = ev.evaluate(_cfg(tmp_path, episodes=2, n_envs=2, videos=0, out=str(tmp_path / "c")))
    # the stand-in draws with torch.randn (no generator lists): per-episode mode calls once per env
    assert runs[0]["predict_calls"] < per_episode["predict_calls"]


# ------------------------------------------------------------------------------------ the pieces
def test_run_shard_splits_seeds_over_ranks_and_clamps_n_envs(standin):
    """What a deploy benchmark would call: its own actor factory, this rank's share of the seeds."""
    task = TaskConfig(**AVOID)
    seeds = [EVAL_SEED_BASE + 40 + i for i in range(3)]
    made = []

    def make_actor(vec, n_envs):
        made.append((vec.num_envs, n_envs))
        return ev.PolicyActor(NoisyReacher(), n_envs, "cpu")

    whole = ev.run_shard(task, seeds, make_actor, n_envs=8)
    assert made == [(3, 3)] and whole.n_envs == 3 and whole.episodes == [0, 1, 2]
    assert [r["seed"] for r in whole.records] == seeds and whole.frames == {} and whole.finals == {}
    parts = [ev.run_shard(task, seeds, make_actor, rank=r, world=2, n_envs=1).part() for r in range(2)]
    assert [p["rank"] for p in parts] == [0, 1] and [len(p["records"]) for p in parts] == [2, 1]
    records, latencies = ev.merge(parts)
    assert records == whole.records and len(latencies) == sum(len(p["latencies_ms"]) for p in parts)
    empty = ev.run_shard(task, seeds[:1], make_actor, rank=1, world=2)  # a rank with nothing to do
    assert empty.episodes == [] and empty.part() == {"rank": 1, "records": [], "latencies_ms": []}


def test_gather_through_part_files(tmp_path):
    from diffusion_policy.distributed import GatherError, gather

    assert gather({"rank": 0}, 0, 1) == [{"rank": 0}]
    assert gather({"rank": 1, "x": [1]}, 1, 2, part_dir=tmp_path / "parts") is None
    assert gather({"rank": 0, "x": [0]}, 0, 2, part_dir=tmp_path / "parts") == [{"rank": 0, "x": [0]},
                                                                               {"rank": 1, "x": [1]}]
    assert not (tmp_path / "parts").exists()  # read, then removed
    with pytest.raises(GatherError, match="world=2 needs torch.distributed initialized"):
        gather({}, 0, 2)
    with pytest.raises(GatherError, match=r"waited 0 s for parts \['rank001.json'\]"):
        gather({}, 0, 2, part_dir=tmp_path / "p2", wait_s=0.0)


def test_sampler_steps_beyond_the_checkpoints_schedule_name_the_key(tmp_path):
    d = _policy_dir(tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["method"] = {"name": "diffusion", "scheduler": "ddim", "num_train_timesteps": 10}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ev.EvalError, match=r"^checkpoint ckpt: num_inference_steps=50 is more than the 10 "):
        ev.evaluate(_cfg(tmp_path, num_inference_steps=50))


def test_a_config_json_that_is_not_a_spec_is_one_line(tmp_path):
    d = _policy_dir(tmp_path / "ckpt")
    (d / "config.json").write_text(json.dumps({"task": AVOID}))  # no format_version: not Policy.save's
    with pytest.raises(ev.EvalError, match=r"config.json: format_version None, expected 1$"):
        ev.evaluate(_cfg(tmp_path))
