"""dp-deploy end to end on a tiny checkpoint: the function and the console command, the Zarr log
(valid, trainable), a kill mid-episode, SIGTERM, the wall clock, the compiled CPU path and a
policy served by dp-serve on loopback."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffusion_policy.config import compose
from diffusion_policy.data import EpisodeStore, validate_store
from diffusion_policy.deploy import compose_deploy, deploy, main

sys.path.insert(0, str(Path(__file__).parent))
from test_deploy import tiny_policy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as dp-train leaves it, holding the tiny Push-T policy."""
    root = tmp_path_factory.mktemp("runs") / "tiny"
    tiny_policy(["task.max_episode_steps=40"], task="pusht").save(root / "checkpoints" / "step_0000001" / "policy")
    (root / "checkpoints" / "latest").write_text("step_0000001\n")
    return root


def cfg(run_dir, out, *extra):
    return compose("deploy", [f"checkpoint={run_dir}", f"out={out}", "clock=sim", "inference=eager",
                              "status_every_s=0", "max_steps=20", *extra])


def test_deploy_logs_episodes_that_validate_and_train(run_dir, tmp_path):
    out = tmp_path / "d"
    s = deploy(cfg(run_dir, out, "episodes=2", "inference_latency_ms=200", "transition=rtc"))
    # 3 chunks per 20 steps; each drops the actions due before 0.2 s + the 10 ms margin: 3
    assert s["episodes"] == 2 and s["dropped_actions"] == 2 * 3 * 3
    assert s["late_waypoints"] == 0 and s["inference_latency_ms"]["p50"] == pytest.approx(200.0)
    assert s["loop_latency_ms"]["p50"] == pytest.approx(200.0)  # observation -> first command
    store = EpisodeStore.open(out / "episodes.zarr")
    assert store.n_episodes == 2 and list(store.episode_lengths) == [20, 20]
    assert {"keypoint", "agent_pos", "action", "commanded_action", "sent_action", "timestamp", "held",
            "inference_ms", "safety_events", "dropped", "episode_seed"} <= set(store.keys())
    np.testing.assert_allclose(store["timestamp"][:3], [0.0, 0.1, 0.2], atol=1e-9)
    # steps 0-2 execute no waypoint of their own (0, 1 held; 2 on the way to step 3's waypoint)
    assert int(store["dropped"].sum()) == 18 and store["held"][:4].tolist() == [1, 1, 1, 0]
    assert s["held_steps"] == 2 * 2
    errors, _ = validate_store(out / "episodes.zarr")
    assert errors == []
    recs = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in recs] == [1_000_000, 1_000_001] and json.loads((out / "summary.json").read_text())
    # dp-train reads a deployment log like demonstrations
    from diffusion_policy.train import train

    train(compose("train", ["task=pusht", f"data={out / 'episodes.zarr'}", f"run_dir={tmp_path / 'tr'}",
                            "policy=unet_small", "policy.down_dims=[16,32]", "policy.time_embed_dim=16",
                            "steps=2", "batch_size=4", "device=cpu", "val_ratio=0", "checkpoint_every=2",
                            "log_every=1", "val_every=100", "ema=false"]))
    assert (tmp_path / "tr" / "checkpoints" / "latest").is_file()


def test_errors_are_one_line(run_dir, tmp_path, capsys):
    assert main([f"checkpoint={run_dir}", "transition=rtc", "mode=sync"]) == 2
    assert "transition=rtc needs mode=async" in capsys.readouterr().err
    assert main([f"checkpoint={run_dir}", "transition=fancy"]) == 2
    assert "transition='fancy' is not allowed" in capsys.readouterr().err
    assert main(["robot=ur5", f"checkpoint={run_dir}"]) == 2
    assert "only robot=sim is built in" in capsys.readouterr().err
    assert main([f"checkpoint={run_dir}", "inference=fast", "clock=sim", f"out={tmp_path}"]) == 2
    assert "inference=fast needs a CUDA device" in capsys.readouterr().err


def test_wall_clock_few_short_episodes(run_dir, tmp_path):
    """Real threads and real time: the rate holds and no waypoint is executed late."""
    s = deploy(compose("deploy", [f"checkpoint={run_dir}", f"out={tmp_path}", "clock=wall", "inference=eager",
                                  "episodes=2", "max_steps=15", "status_every_s=0", "inference_latency_ms=50"]))
    assert s["episodes"] == 2 and s["late_waypoints"] == 0 and s["stopped_by_safety"] == 0
    assert 9.0 < s["rate_hz_mean"] < 11.0
    assert 50.0 <= s["inference_latency_ms"]["p50"] < 400.0
    errors, _ = validate_store(tmp_path / "episodes.zarr")
    assert errors == []


def test_compiled_cpu_path_runs_the_same_episode(run_dir, tmp_path):
    a = deploy(cfg(run_dir, tmp_path / "a", "inference=eager", "max_steps=10", "inference_latency_ms=0"))
    b = deploy(cfg(run_dir, tmp_path / "b", "inference=compile", "max_steps=10", "inference_latency_ms=0"))
    ea, eb = (EpisodeStore.open(p / "episodes.zarr") for p in (tmp_path / "a", tmp_path / "b"))
    np.testing.assert_allclose(ea["action"], eb["action"], atol=1e-4)
    assert a["steps"] == b["steps"] == 10


def _cli(run_dir, out, *extra):
    exe = Path(sys.executable).with_name("dp-deploy")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "diffusion_policy.deploy"]
    args = [f"checkpoint={run_dir}", f"out={out}", "clock=wall", "inference=eager", "episodes=5",
            "max_steps=20", "status_every_s=0.5", *extra]
    return subprocess.Popen(cmd + args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"})


def _wait_episodes(out, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = out / "episodes.jsonl"
        if f.is_file() and len(f.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"dp-deploy exited early: {proc.communicate()}")
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_kill_mid_episode_leaves_a_valid_store(run_dir, tmp_path):
    proc = _cli(run_dir, tmp_path)
    _wait_episodes(tmp_path, 1, proc)
    time.sleep(0.7)  # well inside episode 2 (2 s long)
    proc.kill()
    proc.wait()
    errors, _ = validate_store(tmp_path / "episodes.zarr")
    assert errors == []
    assert EpisodeStore.open(tmp_path / "episodes.zarr").n_episodes == 1


def test_sigterm_stops_the_robot_and_logs_the_episode(run_dir, tmp_path):
    proc = _cli(run_dir, tmp_path)
    _wait_episodes(tmp_path, 1, proc)
    time.sleep(0.7)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "robot was stopped" in err and "dp-deploy ep" in err  # status lines
    recs = [json.loads(x) for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and recs[-1]["stop_reason"] == "interrupted" and recs[-1]["stopped"]
    store = EpisodeStore.open(tmp_path / "episodes.zarr")
    assert store.n_episodes == 2 and 0 < store.episode_lengths[-1] < 20
    assert validate_store(tmp_path / "episodes.zarr")[0] == []
    assert json.loads((tmp_path / "summary.json").read_text())["episodes"] == 2


def test_remote_policy_through_dp_serve_on_loopback(run_dir, tmp_path):
    """policy=remote against a PolicyServer on 127.0.0.1: the session seed rule makes the served
    chunks those of the local run, so without latency the logs are equal."""
    from diffusion_policy.checkpoint import load_policy
    from diffusion_policy.serving.server import PolicyServer

    local = deploy(cfg(run_dir, tmp_path / "l", "inference_latency_ms=0", "episodes=2"))
    with PolicyServer(load_policy(run_dir), port=0, token="s3cret") as srv:
        url = f"ws://127.0.0.1:{srv.port}"
        remote = deploy(compose_deploy(["policy=remote", f"url={url}", "token=s3cret", "task=pusht",
                                           "task.max_episode_steps=40", f"out={tmp_path / 'r'}", "clock=sim",
                                           "status_every_s=0", "max_steps=20", "inference_latency_ms=0",
                                           "episodes=2"]))
        measured = deploy(compose_deploy(["policy=remote", f"url={url}", "token=s3cret", "task=pusht",
                                             f"out={tmp_path / 'm'}", "clock=sim", "status_every_s=0",
                                             "max_steps=10"]))
    a, b = (EpisodeStore.open(tmp_path / p / "episodes.zarr") for p in ("l", "r"))
    np.testing.assert_allclose(a["action"], b["action"], atol=1e-5)
    assert remote["label"] == "remote-pusht" and local["steps"] == remote["steps"] == 40
    assert measured["inference_latency_ms"]["p50"] > 0  # the measured round trip
