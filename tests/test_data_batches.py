"""EpochBatches: the batch of a step is a function of (seed, step), ranks split one global batch,
the device cache changes nothing, and validation sees the same windows every time."""
import numpy as np
import pytest
import torch

from diffusion_policy.data.batches import EpochBatches
from diffusion_policy.data.windows import WindowDataset, WindowSampler

ENDS = np.cumsum([12, 9, 15])  # 36 steps in three episodes
H, TO, TA = 4, 2, 2


def windows() -> WindowDataset:
    """Step t of the data holds t, so a batch shows which time steps it gathered."""
    t = np.arange(int(ENDS[-1]))
    arrays = {"action": np.stack([t, -t], 1).astype(np.float32), "state": t[:, None].astype(np.float32)}
    return WindowDataset(arrays, WindowSampler(ENDS, H, TO, TA), ["state"])


def expected_rows(w: WindowDataset, seed: int, step: int, batch_size: int) -> np.ndarray:
    """The window ids of a global batch, written out: permutation of epoch (seed, epoch), slice k."""
    per_epoch = len(w) // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(len(w))
    return perm[k * batch_size:(k + 1) * batch_size]


def test_batch_is_the_steps_slice_of_its_epochs_permutation():
    w = windows()
    assert len(w) == 36 - 3 * (H - 1) + 3 * (TO - 1 + TA - 1)  # windows per episode: L - H + pads + 1
    b = EpochBatches(w, batch_size=8, seed=3)
    for step in [0, 1, 3, 4, 9]:  # 33 windows: 4 batches per epoch, steps 4 and 9 in later epochs
        ids = expected_rows(w, 3, step, 8)
        got = b.batch(step)
        np.testing.assert_array_equal(got["action"].numpy(), w.sampler.sample_indices[ids][..., None]
                                      * np.array([1, -1], np.float32))
        np.testing.assert_array_equal(got["obs"]["state"].numpy()[..., 0], w.sampler.sample_indices[ids][:, :TO])
    # a fresh object (a resumed run) gives the same batch for a step, whatever came before
    again = EpochBatches(w, batch_size=8, seed=3)
    torch.testing.assert_close(again.batch(9)["action"], b.batch(9)["action"])
    assert not torch.equal(EpochBatches(w, batch_size=8, seed=4).batch(9)["action"], b.batch(9)["action"])


def test_ranks_split_the_global_batch_and_the_device_cache_changes_nothing():
    w = windows()
    whole = EpochBatches(w, batch_size=8, seed=0).batch(5)["action"]
    for cached in (False, True):  # both paths: the gather path and the device cache
        ranks = [EpochBatches(w, batch_size=8, seed=0, rank=r, world=2, on_device=cached).batch(5)["action"]
                 for r in range(2)]
        torch.testing.assert_close(ranks[0], whole[0::2])
        torch.testing.assert_close(ranks[1], whole[1::2])
    with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of the number of ranks \\(4\\)"):
        EpochBatches(w, batch_size=6, world=4)


def test_tiny_sets_draw_with_replacement():
    w = windows()
    b = EpochBatches(w, batch_size=64, seed=1)  # more than the 33 windows
    ids = np.random.default_rng([1, 2]).integers(0, len(w), 64)  # step 2 is epoch 2
    np.testing.assert_array_equal(b.batch(2)["action"].numpy()[..., 0], w.sampler.sample_indices[ids])


def test_fixed_validation_windows_are_the_same_every_call_and_split_over_ranks():
    w = windows()
    v = EpochBatches(w, batch_size=8, seed=7)
    first = [x["action"] for x in v.fixed(max_windows=20, chunk=8)]
    assert [len(x) for x in first] == [7, 7, 6]  # 20 windows in three near-equal chunks
    ids = np.random.default_rng(7).permutation(len(w))[:20]
    np.testing.assert_array_equal(torch.cat(first).numpy()[..., 0], w.sampler.sample_indices[ids])
    second = [x["action"] for x in v.fixed(max_windows=20, chunk=8)]
    torch.testing.assert_close(torch.cat(second), torch.cat(first))
    halves = [torch.cat([x["action"] for x in EpochBatches(w, 8, seed=7, rank=r, world=2).fixed(20, 8)])
              for r in range(2)]
    torch.testing.assert_close(halves[0], torch.cat(first)[0::2])
    torch.testing.assert_close(halves[1], torch.cat(first)[1::2])
