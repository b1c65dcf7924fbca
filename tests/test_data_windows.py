"""Windows: padding, episode boundaries, the To-1 convention, splits, batched gathering."""
import numpy as np
import pytest
import torch

from diffusion_policy.data.store import EpisodeStore
from diffusion_policy.data.windows import WindowDataset, WindowSampler, make_datasets, make_loader, split_episodes

LENGTHS = [6, 10, 4, 1]
ENDS = np.cumsum(LENGTHS)
N = int(ENDS[-1])


def arrays():
    """Step t of the concatenated data holds t, so a gathered window shows its time indices."""
    t = np.arange(N)
    return {"action": np.stack([t, -t], 1).astype(np.float32),
            "state": t[:, None].astype(np.float32).repeat(3, 1),
            "image": (t % 256).astype(np.uint8)[:, None, None, None]
            * np.ones((1, 4, 4, 3), np.uint8)}


def reference_windows(lengths, H, pad_before, pad_after):
    """Per-sample loop: every window's time indices, edges repeated."""
    out, start = [], 0
    for n in lengths:
        for s in range(-pad_before, n - H + pad_after + 1):
            out.append([start + min(max(s + k, 0), n - 1) for k in range(H)])
        start += n
    return np.array(out, dtype=np.int64).reshape(-1, H)


@pytest.mark.parametrize("H,To,Ta", [(8, 2, 4), (16, 2, 8), (4, 1, 4), (5, 3, 3)])
def test_windows_match_reference_and_stay_in_episode(H, To, Ta):
    s = WindowSampler(ENDS, H, To, Ta)
    ref = reference_windows(LENGTHS, H, To - 1, Ta - 1)
    np.testing.assert_array_equal(s.sample_indices, ref)
    episode = np.searchsorted(ENDS, s.sample_indices, side="right")
    assert (episode == episode[:, :1]).all(), "a window crosses episodes"
    np.testing.assert_array_equal(episode[:, 0], s.episode_of_window)


def test_custom_padding_and_short_episodes():
    s = WindowSampler(ENDS, 5, 2, 3, pad_before=0, pad_after=0)
    np.testing.assert_array_equal(s.sample_indices, reference_windows(LENGTHS, 5, 0, 0))
    assert s.n_skipped_episodes == 2  # lengths 4 and 1 hold no 5-step window without padding
    with pytest.raises(ValueError, match="pad_after must be in"):
        WindowSampler(ENDS, 5, 2, 3, pad_after=5)


def test_edge_padding_repeats_edge_frames():
    H, To, Ta = 8, 2, 4
    s = WindowSampler(ENDS, H, To, Ta)
    a = arrays()
    first = s.gather(a, [0], ["state"])
    # the first window starts To-1 steps before the episode: frame 0 repeated
    np.testing.assert_array_equal(first["action"][0, :, 0], [0, 0, 1, 2, 3, 4, 5, 5])
    np.testing.assert_array_equal(first["obs"]["state"][0, :, 0], [0, 0])
    last = s.gather(a, [int(np.flatnonzero(s.episode_of_window == 0)[-1])], ["state"])
    # the last window of episode 0 (steps 0..5) runs Ta-1 = 3 steps past its end
    np.testing.assert_array_equal(last["action"][0, :, 0], [1, 2, 3, 4, 5, 5, 5, 5])


def test_first_executed_action_is_index_To_minus_1():
    """Chunk index To-1 of the action is recorded at the same step as the last observation."""
    for To in (1, 2, 3):
        H, Ta = 8, 8 - To + 1
        s = WindowSampler(ENDS, H, To, Ta)
        b = s.gather(arrays(), np.arange(len(s)), ["state"])
        now = b["obs"]["state"][:, To - 1, 0]  # time of the current observation
        np.testing.assert_array_equal(b["action"][:, To - 1, 0], now)
        # every step of every episode is the current observation of some window
        assert set(now.astype(int)) == set(range(N))
        # the Ta executed actions are the next steps (or the repeated last step of the episode)
        ep_end = ENDS[s.episode_of_window] - 1
        for k in range(Ta):
            np.testing.assert_array_equal(b["action"][:, To - 1 + k, 0],
                                          np.minimum(now + k, ep_end))


def test_gather_shapes_and_types():
    s = WindowSampler(ENDS, 8, 2, 4, episodes=[1, 2])
    assert set(s.episode_of_window) == {1, 2}
    a = arrays()
    idx = np.array([0, 3, 3, len(s) - 1])
    b = s.gather(a, idx, ["state", "image"])
    assert b["obs"]["state"].shape == (4, 2, 3) and b["obs"]["image"].shape == (4, 2, 4, 4, 3)
    assert b["action"].shape == (4, 8, 2) and b["obs"]["image"].dtype == np.uint8
    tb = s.gather({k: torch.from_numpy(v) for k, v in a.items()}, idx, ["state", "image"])
    assert isinstance(tb["action"], torch.Tensor)
    np.testing.assert_array_equal(tb["obs"]["image"].numpy(), b["obs"]["image"])
    np.testing.assert_array_equal(tb["action"].numpy(), b["action"])
    with pytest.raises(ValueError, match="n_action_steps"):
        WindowSampler(ENDS, 8, 2, 8)


def test_split_episodes():
    train, val = split_episodes(20, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(20))
    t2, v2 = split_episodes(20, 0.1, seed=3)
    np.testing.assert_array_equal(train, t2)
    np.testing.assert_array_equal(val, v2)
    assert not np.array_equal(split_episodes(20, 0.1, seed=4)[1], val) or \
        not np.array_equal(split_episodes(20, 0.1, seed=5)[1], val)
    small, val3 = split_episodes(20, 0.1, seed=3, max_train_episodes=5)
    assert len(small) == 5 and set(small) <= set(train) and np.array_equal(val3, val)
    assert len(split_episodes(3, 0.0, 0)[1]) == 0 and len(split_episodes(2, 0.9, 0)[0]) == 1


def test_dataset_and_loader_gather_once_per_batch(tmp_path):
    store = EpisodeStore.create(tmp_path / "w.zarr")
    a = arrays()
    for s0, s1 in zip(np.r_[0, ENDS[:-1]], ENDS):
        store.add_episode({k: v[s0:s1] for k, v in a.items()})
    store = EpisodeStore.open(tmp_path / "w.zarr")  # images lazy
    train, val = make_datasets(store, 8, 2, 4, ["state", "image"], val_ratio=0.25, seed=0)
    assert len(train) + len(val) == len(WindowSampler(ENDS, 8, 2, 4))
    item = train[0]
    assert item["obs"]["image"].shape == (2, 4, 4, 3) and item["obs"]["image"].dtype == torch.uint8
    assert item["action"].shape == (8, 2) and item["action"].dtype == torch.float32

    calls = []
    original = WindowDataset.__getitems__

    def counting(self, indices):
        calls.append(len(indices))
        return original(self, indices)

    WindowDataset.__getitems__ = counting
    try:
        batches = list(make_loader(train, batch_size=4, shuffle=True, seed=0))
    finally:
        WindowDataset.__getitems__ = original
    assert calls == [4] * (len(train) // 4) and len(batches) == len(calls)
    b = batches[0]
    assert b["obs"]["state"].shape == (4, 2, 3) and b["action"].shape == (4, 8, 2)
    # lazy images give the same batch as in-memory ones
    ref = train.sampler.gather(a, np.arange(len(train)), ["image"])["obs"]["image"]
    got = train.__getitems__(list(range(len(train)))).batch["obs"]["image"].numpy()
    np.testing.assert_array_equal(got, ref)
    # a plain DataLoader (per-item fetching + default collate) gives the same layout
    plain = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert plain["obs"]["image"].shape == (4, 2, 4, 4, 3)
