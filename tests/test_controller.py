"""Receding-horizon controller: the To-1 convention, Ta actions per chunk, per-env history,
temporal ensembling and chunk blending, checked with stand-in policies whose chunks are known."""
import numpy as np
import pytest
import torch

from diffusion_policy.control import RecedingHorizonController, blend_chunks, ensemble_weights


class IndexPolicy:
    """Stateless stand-in: chunk[b, j] = (j, call number, newest observation of row b).

    Remembers what it was asked (for the tests only; the controller never relies on it)."""

    def __init__(self, horizon=16, n_obs_steps=2, n_action_steps=8):
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.obs_keys = ["state"]
        self.calls = []

    def predict(self, obs, num_steps=None, generator=None):
        x = obs["state"]  # (B, To, 1)
        assert x.shape[1] == self.n_obs_steps
        self.calls.append(x.clone())
        B = x.shape[0]
        out = torch.zeros(B, self.horizon, 3)
        out[:, :, 0] = torch.arange(self.horizon, dtype=torch.float32)
        out[:, :, 1] = len(self.calls) - 1
        out[:, :, 2] = x[:, -1, 0:1]
        return out


class ConstantPolicy(IndexPolicy):
    """Every action of call c equals c (for ensembling and blending arithmetic)."""

    def predict(self, obs, num_steps=None, generator=None):
        self.calls.append(None)
        return torch.full((obs["state"].shape[0], self.horizon, 1), float(len(self.calls) - 1))


def _obs(values):
    return {"state": np.asarray(values, np.float32).reshape(-1, 1)}


@pytest.mark.parametrize("To,Ta,H", [(2, 8, 16), (1, 4, 8), (3, 5, 8)])
def test_first_action_is_index_To_minus_1_and_Ta_are_executed(To, Ta, H):
    pol = IndexPolicy(H, To, Ta)
    ctl = RecedingHorizonController(pol, n_envs=1)
    acts = np.stack([ctl.act(_obs([t]))[0] for t in range(2 * Ta + 1)])
    # chunk index of each executed action: To-1 .. To-2+Ta, then again from To-1
    expected = [To - 1 + (t % Ta) for t in range(2 * Ta + 1)]
    np.testing.assert_array_equal(acts[:, 0], expected)
    # exactly Ta actions per chunk: call number changes every Ta steps
    np.testing.assert_array_equal(acts[:, 1], [t // Ta for t in range(2 * Ta + 1)])
    assert len(pol.calls) == 3 and len(ctl.latencies_ms) == 3
    # each chunk was planned from the observation of the step it starts at
    np.testing.assert_array_equal(acts[:, 2], [Ta * (t // Ta) for t in range(2 * Ta + 1)])


def test_history_repeats_first_observation_then_slides():
    pol = IndexPolicy(horizon=8, n_obs_steps=3, n_action_steps=2)
    ctl = RecedingHorizonController(pol, n_envs=1)
    for t in range(5):
        ctl.act(_obs([10 + t]))
    assert pol.calls[0][0, :, 0].tolist() == [10, 10, 10]  # episode start: first obs x To
    assert pol.calls[1][0, :, 0].tolist() == [10, 11, 12]
    assert pol.calls[2][0, :, 0].tolist() == [12, 13, 14]


def test_vector_reset_of_one_env_keeps_the_other():
    pol = IndexPolicy(horizon=8, n_obs_steps=2, n_action_steps=4)
    ctl = RecedingHorizonController(pol, n_envs=2)
    for t in range(3):
        ctl.act(_obs([t, 100 + t]))
    ctl.reset([1])  # env 1's episode ended; it autoresets to a new first observation
    a = ctl.act(_obs([3, 500]))
    # env 1 replans at once from its new first observation repeated; env 0 keeps its chunk
    assert len(pol.calls) == 2 and pol.calls[1].shape[0] == 1
    assert pol.calls[1][0, :, 0].tolist() == [500, 500]
    assert a[0, 0] == 1 + 3 and a[0, 1] == 0  # env 0: 4th action of call 0
    assert a[1, 0] == 1 and a[1, 1] == 1  # env 1: first action (index To-1) of call 1


def test_inactive_envs_are_not_planned_and_give_nan():
    pol = IndexPolicy(horizon=8, n_obs_steps=2, n_action_steps=4)
    ctl = RecedingHorizonController(pol, n_envs=3)
    a = ctl.act(_obs([0, 1, 2]), active=np.array([True, False, True]))
    assert pol.calls[0].shape[0] == 2 and np.isnan(a[1]).all() and not np.isnan(a[[0, 2]]).any()


def test_missing_observation_key_names_it():
    ctl = RecedingHorizonController(IndexPolicy(), n_envs=1)
    with pytest.raises(KeyError, match="state"):
        ctl.act({"image": np.zeros((1, 4, 4, 3), np.uint8)})


def test_ta_limit_is_checked():
    with pytest.raises(ValueError, match="H - To \\+ 1"):
        RecedingHorizonController(IndexPolicy(horizon=8, n_obs_steps=2, n_action_steps=8))


def test_ensemble_weights_closed_form():
    w = ensemble_weights(3, 0.5)
    e = np.exp(-0.5 * np.arange(3))
    np.testing.assert_allclose(w, e / e.sum())
    np.testing.assert_allclose(ensemble_weights(4, 0.0), 0.25)
    assert w[0] > w[1] > w[2]  # k > 0: the oldest prediction weighs most (ACT)


def test_temporal_ensembling_averages_every_chunk_covering_the_step():
    # H=4, To=1: every chunk covers 4 steps; Ta=1 replans every step (ACT)
    k = 0.3
    pol = ConstantPolicy(horizon=4, n_obs_steps=1, n_action_steps=1)
    ctl = RecedingHorizonController(pol, 1, smoothing="ensemble", ensemble_k=k)
    acts = [ctl.act(_obs([0]))[0, 0] for _ in range(6)]
    for t, a in enumerate(acts):
        calls = np.arange(max(0, t - 3), t + 1)  # chunks predicted at steps t-3 .. t, oldest first
        w = ensemble_weights(len(calls), k)
        assert a == pytest.approx(float((w * calls).sum()), abs=1e-6)


def test_temporal_ensembling_with_Ta_greater_than_one():
    # H=6, To=1, Ta=2: chunks from steps 0, 2, 4 ...; step 4 is covered by chunks 0 (6 long), 1, 2
    pol = ConstantPolicy(horizon=6, n_obs_steps=1, n_action_steps=2)
    ctl = RecedingHorizonController(pol, 1, smoothing="ensemble", ensemble_k=0.1)
    acts = [ctl.act(_obs([0]))[0, 0] for _ in range(5)]
    w = ensemble_weights(3, 0.1)
    assert acts[4] == pytest.approx(float(w @ [0, 1, 2]), abs=1e-6)
    assert acts[0] == 0 and acts[2] == pytest.approx(float(ensemble_weights(2, 0.1) @ [0, 1]))


def test_blend_chunks_linear_ramp():
    old = np.zeros((3, 2))
    new = np.ones((5, 2))
    out = blend_chunks(old, new)
    np.testing.assert_allclose(out[:, 0], [0.25, 0.5, 0.75, 1.0, 1.0])
    np.testing.assert_array_equal(blend_chunks(np.zeros((0, 2)), new), new)
    with pytest.raises(ValueError, match="overlap"):
        blend_chunks(np.zeros((6, 2)), new)


def test_controller_blends_the_overlap_of_consecutive_chunks():
    # H=8, To=1, Ta=4: chunk 0 has 4 unexecuted predictions when chunk 1 arrives
    pol = ConstantPolicy(horizon=8, n_obs_steps=1, n_action_steps=4)
    ctl = RecedingHorizonController(pol, 1, smoothing="blend")
    acts = [ctl.act(_obs([0]))[0, 0] for _ in range(12)]
    np.testing.assert_allclose(acts[:4], 0.0)
    np.testing.assert_allclose(acts[4:8], [0.2, 0.4, 0.6, 0.8])  # old 0 -> new 1
    # chunk 2 blends with what was planned (chunk 1 blended) for its overlap: all 1s there
    np.testing.assert_allclose(acts[8:12], [1.2, 1.4, 1.6, 1.8])


def test_own_generators_make_rows_independent_of_the_batch():
    class NoisePolicy(IndexPolicy):
        def predict(self, obs, num_steps=None, generator=None):
            return torch.randn(obs["state"].shape[0], self.horizon, 2, generator=generator)

    pol = NoisePolicy(horizon=8, n_obs_steps=2, n_action_steps=4)
    alone = RecedingHorizonController(pol, 1)
    alone.reset(generator=torch.Generator().manual_seed(7))
    pair = RecedingHorizonController(pol, 2)
    pair.reset([0], generator=torch.Generator().manual_seed(3))
    pair.reset([1], generator=torch.Generator().manual_seed(7))
    for t in range(9):
        a1 = alone.act(_obs([t]))
        a2 = pair.act(_obs([t, t]))
        np.testing.assert_array_equal(a1[0], a2[1])
    assert alone.latency_stats()["predict_calls"] == 3
    # torch.randn refuses a list of generators: the controller fell back to one call per row
    assert pair._generator_lists is False and set(pair.batch_sizes) == {1}


def test_generator_lists_batch_rows_when_the_policy_takes_them():
    """A policy whose sampler accepts a list of generators (diffusers' randn_tensor) is called
    once for all rows, and each row still equals what its own generator gives alone."""
    from diffusers.utils.torch_utils import randn_tensor

    class ListPolicy(IndexPolicy):
        def predict(self, obs, num_steps=None, generator=None):
            self.calls.append(obs["state"].shape[0])
            return randn_tensor((obs["state"].shape[0], self.horizon, 2), generator=generator)

    pol = ListPolicy(horizon=8, n_obs_steps=2, n_action_steps=4)
    pair = RecedingHorizonController(pol, 2)
    pair.reset([0], generator=torch.Generator().manual_seed(3))
    pair.reset([1], generator=torch.Generator().manual_seed(7))
    alone = RecedingHorizonController(pol, 1)
    alone.reset(generator=torch.Generator().manual_seed(7))
    for t in range(5):
        np.testing.assert_array_equal(pair.act(_obs([t, t]))[1], alone.act(_obs([t]))[0])
    assert pair.batch_sizes == [2, 2] and pair._generator_lists is True
