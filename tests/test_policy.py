"""The policy object: a bimodal toy that a generative policy solves and a regressor averages,
save/load round trips, and the observation/prediction conventions."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffusion_policy.config import MethodConfig, ObsEncoderConfig, PolicyConfig, TaskConfig
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.policy import Policy

H, TO, TA = 8, 2, 4
AMPLITUDE = 1.0  # lateral distance at which the paths pass the obstacle


def bimodal_toy(n: int, seed: int):
    """Go from the start (around the origin) to y = 2 around an obstacle at (x0, 1): left or right
    with equal probability. obs: the start position twice (To=2); action: (H, 2) waypoints."""
    rng = np.random.default_rng(seed)
    start = rng.normal(0.0, 0.05, (n, 2)).astype(np.float32)
    side = rng.choice([-1.0, 1.0], size=n).astype(np.float32)
    s = (np.arange(1, H + 1, dtype=np.float32) / H)[None, :]  # progress along the path
    x = start[:, :1] + side[:, None] * AMPLITUDE * np.sin(math.pi * s)  # bulge around the obstacle
    y = start[:, 1:] + 2.0 * s
    actions = np.stack([x, y], axis=-1)  # (n, H, 2)
    obs = np.repeat(start[:, None, :], TO, axis=1)  # (n, To, 2)
    return obs, actions


def make_policy(policy_cfg: PolicyConfig, method_cfg: MethodConfig, obs, actions) -> Policy:
    task = TaskConfig(name="toy", env_id="none", obs_keys=["pos"], horizon=H, n_obs_steps=TO,
                      n_action_steps=TA)
    torch.manual_seed(0)  # weights independent of the tests that ran before
    normalizer = Normalizer.fit({"pos": obs.reshape(-1, 2), "action": actions.reshape(-1, 2)},
                                {"pos": "minmax", "action": "minmax"})
    return Policy.build(task, policy_cfg, method_cfg, normalizer, {"pos": (2,)}, action_dim=2)


def fit(policy: Policy, obs, actions, steps: int, batch: int = 128, lr: float = 3e-3) -> float:
    torch.manual_seed(0)
    obs_t, act_t = torch.from_numpy(obs), torch.from_numpy(actions)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    policy.train()
    for _ in range(steps):
        idx = torch.randint(0, len(obs_t), (batch,))
        loss = policy.compute_loss({"obs": {"pos": obs_t[idx]}, "action": act_t[idx]})
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


# the MLP denoiser: the same generative methods, ~10x cheaper per step on a CPU than a small UNet
DENOISER = PolicyConfig(name="mlp", hidden_dims=[256, 256, 256])


@pytest.mark.parametrize("method_cfg", [
    MethodConfig(name="flow", time_dist="beta", integrator="euler", num_inference_steps=10),
    MethodConfig(name="diffusion", scheduler="ddim", num_inference_steps=10),
], ids=["flow", "ddim"])
def test_generative_policy_samples_both_modes_and_regression_averages(method_cfg):
    """Half the demonstrations pass the obstacle on the left, half on the right. A generative
    policy samples both sides, each about half the time, and (almost) never the average path
    through the obstacle: measured 0.5-2% of samples within 0.25 of it after 1000 CPU steps (an
    imperfect learned field near the decision boundary), against 100% for the MSE regressor."""
    obs, actions = bimodal_toy(2048, seed=0)
    policy = make_policy(DENOISER, method_cfg, obs, actions)
    fit(policy, obs, actions, steps=1000)
    policy.eval()
    test_obs, _ = bimodal_toy(1000, seed=1)
    start_x = torch.from_numpy(test_obs[:, -1, 0])
    chunk = policy.predict({"pos": torch.from_numpy(test_obs)}, generator=torch.Generator().manual_seed(0))
    lateral = (chunk[:, H // 2 - 1, 0] - start_x).numpy()  # beside the obstacle: +-AMPLITUDE
    left, right = (lateral < -0.5 * AMPLITUDE).mean(), (lateral > 0.5 * AMPLITUDE).mean()
    assert 0.4 < left < 0.6 and 0.4 < right < 0.6, (left, right)
    assert (np.abs(lateral) < 0.25 * AMPLITUDE).mean() < 0.03, "samples through the obstacle"

    regressor = make_policy(PolicyConfig(name="mlp", hidden_dims=[128, 128]), MethodConfig(name="regression"),
                            obs, actions)
    fit(regressor, obs, actions, steps=300)
    regressor.eval()
    mean_chunk = regressor.predict({"pos": torch.from_numpy(test_obs)})
    lateral_mse = (mean_chunk[:, H // 2 - 1, 0] - start_x).numpy()
    assert np.abs(lateral_mse).max() < 0.25 * AMPLITUDE, "the MSE regressor should average the two modes"
    # ... which is also what the generative samples average to
    assert abs(lateral.mean()) < 0.15


def _image_policy(tmp_method: MethodConfig) -> tuple[Policy, dict]:
    torch.manual_seed(0)
    task = TaskConfig(name="toy_image", env_id="none", obs_keys=["image", "pos"], image_keys=["image"],
                      horizon=H, n_obs_steps=TO, n_action_steps=TA)
    rng = np.random.default_rng(0)
    pos, act = rng.normal(size=(50, 2)).astype(np.float32), rng.normal(size=(50, 2)).astype(np.float32)
    normalizer = Normalizer.fit({"pos": pos, "action": act},
                                {"pos": "minmax", "action": "minmax", "image": "image"})
    cfg = PolicyConfig(name="unet", down_dims=[16, 32], time_embed_dim=16,
                       obs_encoder=ObsEncoderConfig(crop_ratio=0.875, image_feature_dim=8, backbone_width=8))
    policy = Policy.build(task, cfg, tmp_method, normalizer, {"image": (32, 32, 3), "pos": (2,)}, 2)
    obs = {"image": torch.from_numpy(rng.integers(0, 256, (3, TO, 32, 32, 3), dtype=np.uint8)),
           "pos": torch.from_numpy(rng.normal(size=(3, TO, 2)).astype(np.float32))}
    return policy, obs


@pytest.mark.parametrize("method_cfg", [
    MethodConfig(name="diffusion", scheduler="ddpm", num_inference_steps=5),
    MethodConfig(name="diffusion", scheduler="dpmsolver", clip_sample=False, num_inference_steps=4),
    MethodConfig(name="flow", integrator="heun", num_inference_steps=3),
], ids=["ddpm", "dpmsolver", "flow"])
def test_save_load_round_trip_gives_identical_predictions(method_cfg, tmp_path):
    policy, obs = _image_policy(method_cfg)
    batch = {"obs": obs, "action": torch.randn(3, H, 2)}
    policy.compute_loss(batch).backward()  # trains on raw uint8 images
    policy.eval()
    before = policy.predict(obs, generator=torch.Generator().manual_seed(7))
    again = policy.predict(obs, generator=torch.Generator().manual_seed(7))
    assert torch.equal(before, again), "sampling must be deterministic given a generator"
    other = policy.predict(obs, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(before, other)

    policy.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["method"]["name"] == method_cfg.name and cfg["shapes"]["image"] == [32, 32, 3]
    loaded = Policy.load(tmp_path / "p")
    assert not loaded.training
    after = loaded.predict(obs, generator=torch.Generator().manual_seed(7))
    assert torch.equal(before, after)
    for (k, a), (k2, b) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.horizon == H and loaded.n_obs_steps == TO and loaded.n_action_steps == TA
    assert loaded.obs_keys == ["image", "pos"] and loaded.image_keys == ["image"]


def test_ema_copy_and_state_dict():
    """Training keeps an EMA with copy.deepcopy; the normalizer has no parameters to average."""
    import copy

    policy, obs = _image_policy(MethodConfig(name="flow", num_inference_steps=2))
    ema = copy.deepcopy(policy).requires_grad_(False)
    names = [n for n, _ in policy.named_parameters()]
    assert names and all(n.startswith(("encoder.", "net.")) for n in names)
    assert any(k.startswith("normalizer.") for k in policy.state_dict())
    ema.eval()
    assert ema.predict(obs, generator=torch.Generator().manual_seed(0)).shape == (3, H, 2)


def test_predict_checks_observation_shapes_and_inpaints_a_prefix():
    obs, actions = bimodal_toy(64, seed=0)
    policy = make_policy(PolicyConfig(name="mlp", hidden_dims=[32]),
                         MethodConfig(name="flow", num_inference_steps=3), obs, actions).eval()
    with pytest.raises(ValueError, match="expected \\(B, To=2, 2\\)"):
        policy.predict({"pos": torch.zeros(1, 3, 2)})
    with pytest.raises(KeyError, match="missing key 'pos'"):
        policy.predict({"state": torch.zeros(1, 2, 2)})
    prefix = torch.from_numpy(actions[:4, :3])  # raw units
    chunk = policy.predict({"pos": torch.from_numpy(obs[:4])}, prefix=prefix,
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(chunk[:, :3], prefix, atol=1e-5, rtol=1e-5)  # exact up to float rounding


def test_policy_builds_from_every_config_file():
    from diffusion_policy.config import compose

    for policy_name in ("unet", "unet_small", "unet_image", "transformer", "mlp"):
        for method_name in ("ddpm", "ddim", "dpmsolver", "flow", "regression"):
            cfg = compose("train", [f"policy={policy_name}", f"method={method_name}", "task=pusht"])
            assert cfg.policy.name == ("unet" if policy_name.startswith("unet") else policy_name)
    cfg = compose("train", ["policy=unet_small", "method=ddim", "task=pusht"])
    assert cfg.method.num_inference_steps == 10 and cfg.method.num_train_timesteps == 100
    normalizer = Normalizer.fit({"keypoint": np.zeros((4, 18)), "agent_pos": np.zeros((4, 2)),
                                 "action": np.zeros((4, 2))},
                                {"keypoint": "minmax", "agent_pos": "minmax", "action": "minmax"})
    policy = Policy.build(cfg.task, cfg.policy, cfg.method, normalizer,
                          {"keypoint": (18,), "agent_pos": (2,)}, 2)
    assert policy.encoder.out_dim == 20
