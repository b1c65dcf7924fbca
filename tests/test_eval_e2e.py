"""dp-eval end to end on a real (untrained, tiny) checkpoint saved by Policy.save in the layout
dp-train writes: the function and the console command, every output file, reproducibility."""
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from diffusion_policy import evaluate as ev
from diffusion_policy.config import EVAL_SEED_BASE, compose
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.policy import Policy

os.environ.setdefault("MUJOCO_GL", "egl")
REPO = Path(__file__).resolve().parents[1]
TINY = ["task=avoid", "policy=unet_small", "policy.down_dims=[16,32]", "policy.time_embed_dim=16",
        "method=ddim", "method.num_inference_steps=3", "task.max_episode_steps=12"]


def _save_run(root: Path, overrides=()) -> Path:
    """A run dir as dp-train leaves it: checkpoints/<name>/policy + checkpoints/latest."""
    cfg = compose("train", TINY + list(overrides))
    rng = np.random.default_rng(0)
    arrays = {"state": rng.uniform(-0.4, 0.4, (64, 6)).astype(np.float32),
              "action": rng.uniform(-0.4, 0.4, (64, 2)).astype(np.float32)}
    norm = Normalizer.fit(arrays, {"state": "minmax", "action": "minmax"})
    policy = Policy.build(cfg.task, cfg.policy, cfg.method, norm, {"state": (6,)}, 2)
    policy.save(root / "checkpoints" / "step_0000001" / "policy")
    (root / "checkpoints" / "latest").write_text("step_0000001\n")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _save_run(tmp_path_factory.mktemp("runs") / "tiny")


def _episodes(out: Path) -> list:
    return [json.loads(l) for l in (out / "episodes.jsonl").read_text().splitlines()]


def test_spec_is_what_policy_save_wrote(run_dir):
    """One reader of config.json: the spec rebuilds the policy Policy.load returns."""
    from diffusion_policy.config import as_dict
    from diffusion_policy.policy import PolicySpec

    pdir = run_dir / "checkpoints" / "step_0000001" / "policy"
    spec = PolicySpec.read(pdir)
    policy = Policy.load(pdir)
    written = policy.config_dict()
    assert as_dict(spec.task) == written["task"] and as_dict(spec.policy) == written["policy"]
    assert as_dict(spec.method) == written["method"] and spec.normalizer == written["normalizer"]
    assert spec.shapes == {"state": (6,)} and spec.action_dim == 2


def test_evaluate_writes_every_output(run_dir, tmp_path):
    out = tmp_path / "out"
    cfg = compose("eval", [f"checkpoint={run_dir}", "episodes=2", "videos=1", "n_envs=1",
                           "device=cpu", f"out={out}", "seed=3"])
    m = ev.evaluate(cfg)

    saved = json.loads((out / "metrics.json").read_text())
    for key in ("success_rate", "success_ci", "mean_max_reward", "mean_episode_length", "episodes",
                "latency_p50_ms", "latency_p99_ms", "checkpoint", "seeds"):
        assert key in saved, key
    assert saved["episodes"] == 2 and saved["seeds"] == [EVAL_SEED_BASE + 3, EVAL_SEED_BASE + 4]
    assert saved["checkpoint"].endswith("checkpoints/step_0000001/policy")
    assert saved["label"] == "tiny-step_0000001" and saved["max_episode_steps"] == 12
    lo, hi = saved["success_ci"]
    assert 0.0 <= lo <= saved["success_rate"] <= hi <= 1.0
    assert saved["latency_p50_ms"] > 0 and saved["latency_p99_ms"] >= saved["latency_p50_ms"]
    # 12 steps, Ta = 8: two predict calls per episode that runs to the time limit
    assert saved["predict_calls"] >= 2 and m["success_rate"] == saved["success_rate"]

    eps = _episodes(out)
    assert [e["seed"] for e in eps] == saved["seeds"]
    for e in eps:
        assert set(e) >= {"seed", "success", "max_reward", "length", "final_info"}
        assert 1 <= e["length"] <= 12 and len(e["rewards"]) == e["length"]
        assert "success" in e["final_info"]

    frames = imageio.mimread(out / "videos" / "episode_0000.mp4")
    assert len(frames) == eps[0]["length"] + 1  # the reset frame and one per step
    assert not (out / "videos" / "episode_0001.mp4").exists()  # videos=1
    for name in ("contact_sheet.png", "rewards.png", "success_blocks.png",
                 "frames/episode_0000.png", "frames/episode_0001.png"):
        img = Image.open(out / name)
        assert img.size[0] > 32 and img.size[1] > 32, name
    md = (out / "report.md").read_text()
    assert "success rate" in md and "contact_sheet.png" in md and "rewards.png" in md
    assert "videos/episode_0000.mp4" in md


def test_reproducible_for_a_checkpoint_and_seed(run_dir, tmp_path):
    """Same checkpoint and seed: the same episodes, with 1 env in-process or 2 worker processes."""
    common = [f"checkpoint={run_dir}/checkpoints/step_0000001", "episodes=3", "videos=0",
              "device=cpu", "seed=11"]
    ev.evaluate(compose("eval", common + ["n_envs=1", f"out={tmp_path / 'a'}"]))
    ev.evaluate(compose("eval", common + ["n_envs=2", f"out={tmp_path / 'b'}"]))
    a, b = _episodes(tmp_path / "a"), _episodes(tmp_path / "b")
    # the actions agree up to float rounding (a batch of two runs other kernels than two of one)
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra.pop("mean_action"), rb.pop("mean_action"), atol=1e-4)
    assert a == b


def test_fast_inference_options(run_dir, tmp_path):
    """compile=true evaluates the same episodes as plain predict (padded to n_envs rows, so one
    compiled shape serves the batches of 2 and 1 left as episodes finish); bf16 runs and is
    recorded; cuda_graph on a CPU is a clear error."""
    common = [f"checkpoint={run_dir}", "episodes=3", "videos=0", "device=cpu", "n_envs=2"]
    ev.evaluate(compose("eval", common + [f"out={tmp_path / 'a'}"]))
    m = ev.evaluate(compose("eval", common + ["compile=true", f"out={tmp_path / 'b'}"]))
    a, b = _episodes(tmp_path / "a"), _episodes(tmp_path / "b")
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra.pop("mean_action"), rb.pop("mean_action"), atol=1e-4)
    assert a == b and m["compile"] is True
    m = ev.evaluate(compose("eval", common + ["bf16=true", f"out={tmp_path / 'c'}"]))
    assert m["bf16"] is True and m["episodes"] == 3
    with pytest.raises(ev.EvalError, match="cuda_graph=true needs a CUDA device"):
        ev.evaluate(compose("eval", common + ["cuda_graph=true", f"out={tmp_path / 'd'}"]))


def test_console_command_and_task_mismatch(run_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    exe = Path(sys.executable).with_name("dp-eval")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else
                                                           ["-m", "diffusion_policy.evaluate"])]
    env = {**os.environ, "MUJOCO_GL": "egl"}
    r = subprocess.run(cmd + [f"checkpoint={run_dir}", "episodes=2", "videos=1", "n_envs=1",
                              "device=cpu", f"out={out}"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "success" in r.stdout and (out / "metrics.json").is_file()
    assert (out / "videos" / "episode_0000.mp4").is_file() and (out / "report.md").is_file()
    # the same checkpoint asked to run another task: one line naming both (in-process main)
    assert ev.main([f"checkpoint={run_dir}", "task=pusht", "episodes=1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "trained for task 'avoid', not task='pusht'" in err


def test_mlp_regression_checkpoint_evaluates_like_any_policy(tmp_path):
    run = _save_run(tmp_path / "bc", ["policy=mlp", "policy.hidden_dims=[32]", "method=regression"])
    m = ev.evaluate(compose("eval", [f"checkpoint={run}", "episodes=1", "videos=0", "n_envs=1",
                                     "device=cpu", f"out={tmp_path / 'out'}"]))
    assert m["episodes"] == 1 and m["predict_calls"] >= 1
