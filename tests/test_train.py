"""dp-train end to end with tiny budgets: the real entry point, resume that joins the
uninterrupted curve, checkpoints that survive SIGKILL, and config errors that name the key."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from diffusion_policy import checkpoint as ckpt
from diffusion_policy.config import ConfigError, compose
from diffusion_policy.data.store import EpisodeStore
from diffusion_policy.train import adamw_kwargs, ema_decay, lr_lambda, main, train
from diffusion_policy.validation import validate

REPO = Path(__file__).resolve().parents[1]
TINY = ["policy=unet_small", "policy.down_dims=[16,32]", "policy.time_embed_dim=16",
        "batch_size=16", "log_every=1", "val_every=5", "checkpoint_every=5", "warmup_steps=2",
        "device=cpu", "method.num_inference_steps=4"]


def _make_store(path: Path, episodes=6, length=30, seed=0) -> Path:
    """A store with the default task's keys: a 2-D point drifting about, action = next position.
    Training reads shapes from the store, so no environment is needed here."""
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(path)
    task = compose("train", []).task
    for _ in range(episodes):
        pos = np.cumsum(rng.normal(0, 0.05, (length, 2)), axis=0).astype(np.float32)
        ep = {task.action_key: np.roll(pos, -1, axis=0)}
        for k in task.obs_keys:  # the env's state: agent, goal and obstacle xy
            ep[k] = np.concatenate([pos, rng.normal(0, 0.1, (length, 4)).astype(np.float32)], axis=1)
        store.add_episode(ep)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _make_store(tmp_path_factory.mktemp("data") / "toy.zarr")


def test_schedules():
    f = lr_lambda(warmup=10, total=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert ema_decay(0, 0.75, 0.9999) == 0.0
    assert ema_decay(100, 0.75, 0.9999) == pytest.approx(1 - 101 ** -0.75)
    assert ema_decay(10**9, 0.75, 0.9999) == 0.9999


def test_train_writes_run_and_checkpoint_loads(store, tmp_path):
    run = tmp_path / "run"
    cfg = compose("train", TINY + [f"data={store}", f"run_dir={run}", "steps=10"])
    out = train(cfg)
    assert out["step"] == 10 and np.isfinite(out["train_loss"]) and np.isfinite(out["val_loss"])
    assert json.loads((run / "config.json").read_text())["steps"] == 10
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "train/loss" in l] == list(range(1, 11))
    assert any("val/loss" in l for l in lines)
    for l in (l for l in lines if "train/loss" in l):  # host phases lie inside the wall time
        phases = [l[f"train/{k}_ms"] for k in ("data", "fwd_bwd", "opt")]
        assert min(phases) >= 0 and sum(phases) <= l["train/step_ms"] * (1 + 1e-6)
    assert list((run / "tb").iterdir()), "no TensorBoard event file"
    assert ckpt.read_latest(run) == "step_0000010"
    policy = ckpt.load_policy(run)  # one call, no training config tree
    obs = {k: torch.zeros(3, cfg.task.n_obs_steps, *policy.shapes[k]) for k in cfg.task.obs_keys}
    chunk = policy.predict(obs, generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (3, cfg.task.horizon, 2) and torch.isfinite(chunk).all()


def test_resume_joins_uninterrupted_curve(store, tmp_path):
    common = TINY + [f"data={store}", "steps=10"]
    train(compose("train", common + [f"run_dir={tmp_path / 'full'}"]))
    part = tmp_path / "part"
    first = compose("train", common + [f"run_dir={part}"])
    _train_until(first, stop=5)  # the same run, killed right after its step-5 checkpoint
    resumed = train(compose("train", common + [f"run_dir={part}", "resume=true"]))
    assert resumed["step"] == 10
    a = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (part / "metrics.jsonl").read_text().splitlines()]
    la = [l["train/loss"] for l in a if "train/loss" in l]
    lb = [l["train/loss"] for l in b if "train/loss" in l]
    assert len(lb) == 10
    # same data order, same noise, same optimizer, scheduler and EMA state: the same curve, to the bit
    assert lb == la
    assert [l["train/lr"] for l in b if "train/lr" in l] == [l["train/lr"] for l in a if "train/lr" in l]
    va = [l["val/loss"] for l in a if "val/loss" in l]
    vb = [l["val/loss"] for l in b if "val/loss" in l]
    assert vb == va  # EMA weights joined too
    for name in ("model.safetensors", "policy/model.safetensors", "optimizer.safetensors"):
        full, resumed = (safetensors.torch.load_file(str(d / "checkpoints" / "step_0000010" / name))
                         for d in (tmp_path / "full", part))
        assert all(torch.equal(full[k], resumed[k]) for k in full), name


def _train_until(cfg, stop: int) -> None:
    """Run ``train`` and interrupt it right after the checkpoint of step ``stop``, as a crash would."""
    import diffusion_policy.train as T

    real = T.ckpt.TrainingState.save

    def save_then_stop(state, *a, **kw):
        out = real(state, *a, **kw)
        if state.step == stop:
            raise KeyboardInterrupt
        return out

    T.ckpt.TrainingState.save = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            T.train(cfg)
    finally:
        T.ckpt.TrainingState.save = real


def test_optimizer_state_moves_between_fused_and_foreach():
    """CUDA runs use fused AdamW, CPU runs foreach: a checkpoint of either resumes into the
    other with the same moments and step count, keeping the resuming run's implementation."""
    assert adamw_kwargs(torch.device("cuda", 0)) == {"fused": True}
    assert adamw_kwargs(torch.device("cpu")) == {"foreach": True}

    def trained(**impl):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2, **impl)
        x = torch.randn(16, 4)
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        return net, opt, x

    for saved_impl, resumed_impl in [({"fused": True}, {"foreach": True}), ({"foreach": True}, {"fused": True})]:
        net_a, a, x = trained(**saved_impl)
        tensors, meta = ckpt._optimizer_tensors(a)
        tensors = safetensors.torch.load(safetensors.torch.save(tensors))  # as the files hold them
        meta = json.loads(json.dumps(meta))
        net_b = copy.deepcopy(net_a)
        b = torch.optim.AdamW(net_b.parameters(), lr=1.0, **resumed_impl)
        ckpt._load_optimizer(b, tensors, meta)
        group = b.param_groups[0]
        assert group["lr"] == 1e-2 and bool(group["fused"]) == ("fused" in resumed_impl)
        assert bool(group["foreach"]) == ("foreach" in resumed_impl)
        assert all(float(b.state[p]["step"]) == 3 for p in net_b.parameters())
        for net, opt in ((net_a, a), (net_b, b)):  # one more step: the same update either way
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


def test_training_state_saves_and_restores_as_a_whole(tmp_path):
    """Policy, EMA, optimizer, schedule, step, top-k and the RNG states come back together: the
    restored state's next step is the saved state's next step, to the bit."""
    cfg = compose("train", TINY)
    arrays = {"state": np.linspace(-1, 1, 60, dtype=np.float32).reshape(10, 6),
              "action": np.linspace(-1, 1, 20, dtype=np.float32).reshape(10, 2)}
    from diffusion_policy.data.normalize import Normalizer
    from diffusion_policy.policy import Policy

    def fresh():
        torch.manual_seed(0)
        policy = Policy.build(cfg.task, cfg.policy, cfg.method, Normalizer.fit(arrays, {"state": "minmax",
                              "action": "minmax"}), {"state": (6,)}, 2)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(2, 10))
        return ckpt.TrainingState(policy, copy.deepcopy(policy), opt, sched)

    batch = {"obs": {"state": torch.rand(4, 2, 6)}, "action": torch.rand(4, 16, 2)}

    def step(state):  # one training step, drawing noise from the torch RNG
        state.optimizer.zero_grad()
        state.policy.compute_loss(batch).backward()
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        state.ema.load_state_dict(state.policy.state_dict())
        return float(np.random.rand())

    a = fresh()
    step(a), step(a)
    assert a.save(tmp_path, {"note": "config"}, score=(0.5, 0.7), k=2) == "step_0000002"
    assert ckpt.read_latest(tmp_path) == "step_0000002" and a.topk == [{"name": "step_0000002", "step": 2,
                                                                         "score": [0.5, 0.7]}]
    draw_a = step(a)  # the step after the checkpoint, then the same step from the restored state
    b = fresh()
    saved = ckpt.load_training(tmp_path, "cpu")
    assert saved.config == {"note": "config"}
    b.policy = saved.policy  # the training weights come with the checkpoint (dp-train builds from them)
    b.optimizer = torch.optim.AdamW(b.policy.parameters(), lr=1e-3)
    b.scheduler = torch.optim.lr_scheduler.LambdaLR(b.optimizer, lr_lambda(2, 10))
    b.restore(saved)
    assert b.step == 2 and b.topk == a.topk and b.scheduler.get_last_lr() == [1e-3]  # warm-up over
    assert step(b) == draw_a  # numpy stream
    for pa, pb in zip(a.policy.state_dict().values(), b.policy.state_dict().values()):
        assert torch.equal(pa, pb)  # same noise (torch RNG), same moments: the same update


def test_sigkill_never_leaves_latest_unloadable(store, tmp_path):
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "diffusion_policy.train", *TINY, f"data={store}", f"run_dir={run}",
            "steps=100000", "checkpoint_every=1", "val_every=100000"]
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for attempt in range(3):
        p = subprocess.Popen(args + (["resume=true"] if attempt else []), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 60
        while not ckpt.has_latest(run) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 1.0))  # die mid-write at a random moment
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert ckpt.has_latest(run)
        saved = ckpt.load_training(run, "cpu")  # every file of the checkpoint named by latest loads
        assert saved.step >= 1 and saved.path.name == f"step_{saved.step:07d}"
        ckpt.load_policy(run)


def test_config_errors_name_the_key(store, tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="method.scheduler='ddpn' is not allowed; expected one of ddpm, ddim"):
        validate(compose("train", ["method.scheduler=ddpn"]))
    with pytest.raises(ConfigError, match="ddim|flow"):  # hydra lists the group's options
        compose("train", ["method=nope"])
    with pytest.raises(ConfigError, match="no_such_key"):
        compose("train", ["no_such_key=1"])
    with pytest.raises(ConfigError, match=r"^task.n_action_steps=20 \(Ta\) must be <= .* at most 15"):
        validate(compose("train", ["task.n_action_steps=20"]))
    for bad, key in [(["task.horizon=10"], r"^task.horizon=10\b.*divisible by 4"),
                     (["method.num_inference_steps=500"], r"^method.num_inference_steps=500 .* at most 100"),
                     (["method=dpmsolver", "method.clip_sample=true"], r"^method.clip_sample=true .*false")]:
        with pytest.raises(ConfigError, match=key):
            validate(compose("train", bad))
    assert main(["batch_size=0", f"data={store}", f"run_dir={tmp_path / 'b0'}"]) == 2
    assert "batch_size=0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ddp_comm='fp16'.*fp32, bf16"):
        validate(compose("train", ["ddp_comm=fp16"]))
    with pytest.raises(ConfigError, match="ddp_bucket_mb=0"):
        validate(compose("train", ["ddp_bucket_mb=0"]))
    assert main(["task.horizon=10", f"data={store}", f"run_dir={tmp_path / 'h'}"]) == 2  # train() validates
    err = capsys.readouterr().err
    assert err.startswith("dp-train: task.horizon=10") and err.count("\n") == 1
    with monkeypatch.context() as m:  # checked before the process group would start
        m.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="ddp_comm=bf16 needs CUDA"):
            train(compose("train", TINY + [f"data={store}", f"run_dir={tmp_path / 'bf'}", "ddp_comm=bf16"]))
    assert main(["method.integrator=rk4"]) == 2
    assert "method.integrator" in capsys.readouterr().err
    assert main([f"data={tmp_path / 'missing.zarr'}", f"run_dir={tmp_path / 'r'}", "device=cpu"]) == 2
    assert "missing.zarr" in capsys.readouterr().err


def test_resume_refuses_other_model_overrides(store, tmp_path, capsys):
    run = tmp_path / "r"
    train(compose("train", TINY + [f"data={store}", f"run_dir={run}", "steps=2"]))
    assert main(TINY + [f"data={store}", f"run_dir={run}", "steps=4", "resume=true",
                        "policy.down_dims=[8,16]"]) == 2
    assert "policy.down_dims" in capsys.readouterr().err
    assert main(TINY + [f"data={store}", f"run_dir={run}", "steps=4"]) == 2  # resume not asked
    assert "already holds a run" in capsys.readouterr().err


def test_cli_runs_real_entry_point(store, tmp_path):
    run = tmp_path / "cli"
    exe = Path(sys.executable).with_name("dp-train")  # the venv's console script, venv not activated
    r = subprocess.run([str(exe), *TINY, f"data={store}", f"run_dir={run}", "steps=3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ckpt.read_latest(run) == "step_0000003"


def test_image_task_through_the_same_loop(tmp_path):
    """Images (uint8 HWC in the store) and low-dimensional keys train in the same loop."""
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(tmp_path / "img.zarr")
    for _ in range(3):
        n = 20
        store.add_episode({"image": rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
                           "agent_pos": rng.normal(size=(n, 2)).astype(np.float32),
                           "action": rng.normal(size=(n, 2)).astype(np.float32)})
    run = tmp_path / "run"
    out = train(compose("train", TINY + ["task=avoid_image", f"data={tmp_path / 'img.zarr'}",
                                          f"run_dir={run}", "steps=2", "batch_size=4",
                                          "policy.obs_encoder.backbone_width=8", "val_ratio=0.34"]))
    assert out["step"] == 2 and np.isfinite(out["train_loss"])
    policy = ckpt.load_policy(run)
    obs = {"image": torch.randint(0, 255, (1, 2, 32, 32, 3), dtype=torch.uint8),
           "agent_pos": torch.zeros(1, 2, 2)}
    assert policy.predict(obs).shape == (1, 16, 2)


def test_rollout_selection_keeps_best_checkpoint(store, tmp_path):
    """eval_every runs the policy in the real env on the selection seeds and keeps top-k."""
    run = tmp_path / "sel"
    train(compose("train", TINY + [f"data={store}", f"run_dir={run}", "steps=4", "eval_every=2",
                                    "eval_episodes=1", "topk=1", "task.max_episode_steps=10"]))
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "eval/success_rate" in l] == [2, 4]
    best = (run / "checkpoints" / "best").read_text().strip()
    assert best in ("step_0000002", "step_0000004")
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert kept == sorted({best, "step_0000004"})  # top-1 plus the newest, nothing else
    ckpt.load_policy(run / "checkpoints" / "best")


def test_torchrun_two_ranks_on_cpu(store, tmp_path):
    """The same dp-train under torchrun (gloo on CPU): rank 0 alone writes, losses all-reduced;
    each step the two ranks train on disjoint windows and hold equal weights after it (recorded by
    tests/ddp_probe.py, which wraps dp-train's main)."""
    run, probe = tmp_path / "ddp", tmp_path / "probe"
    probe.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DP_PROBE_DIR": str(probe)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(REPO / "tests" / "ddp_probe.py"), *TINY, f"data={store}",
                        f"run_dir={run}", "steps=4", "ddp_bucket_mb=1"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 rank(s), global batch 16, DDP fp32 all-reduce in 1 MiB buckets" in r.stdout
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "train/loss" in l] == [1, 2, 3, 4]  # one writer
    assert ckpt.read_latest(run) == "step_0000004"
    for step in range(1, 5):
        a, b = (safetensors.torch.load_file(str(probe / f"rank{k}_step{step}.safetensors")) for k in (0, 1))
        rows = [tuple(x.flatten().tolist()) for x in torch.cat([a["action"], b["action"]])]
        assert len(a["action"]) == len(b["action"]) == 8 and len(set(rows)) == 16, step  # disjoint halves
        params = [k for k in a if k.startswith("param.")]
        assert params and all(torch.equal(a[k], b[k]) for k in params), step  # gradients all-reduced
