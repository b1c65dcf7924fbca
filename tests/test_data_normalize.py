"""Normalizer: closed-form statistics, exact inverses, constant dimensions, saving and loading."""
import numpy as np
import pytest
import torch
from torch import nn

from diffusion_policy.data.normalize import Normalizer


def data():
    rng = np.random.default_rng(0)
    return {
        "action": np.stack([rng.uniform(-3, 5, 500), rng.uniform(10, 11, 500),
                            np.full(500, 7.0)], 1).astype(np.float32),  # last dim constant
        "state": rng.normal([1.0, -2.0], [0.5, 3.0], size=(500, 2)),
        "image": rng.integers(0, 256, size=(500, 6, 8, 3), dtype=np.uint8),
        "raw": rng.normal(size=(500, 4)),
    }


MODES = {"action": "minmax", "state": "meanstd", "image": "image", "raw": "identity"}


def test_minmax_to_unit_box_and_constant_dim_to_zero():
    d = data()
    norm = Normalizer.fit(d, MODES)
    y = norm.normalize("action", torch.from_numpy(d["action"]))
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y[:, :2].min(0).values, [-1, -1], atol=1e-5)
    np.testing.assert_allclose(y[:, :2].max(0).values, [1, 1], atol=1e-5)
    np.testing.assert_allclose(y[:, 2], 0.0)  # constant: no division by zero, mapped to 0
    assert torch.isfinite(y).all()
    back = norm.unnormalize("action", y)
    np.testing.assert_allclose(back, d["action"], rtol=1e-5, atol=1e-5)
    # a value off the constant dimension stays invertible
    x = torch.tensor([[0.0, 10.5, 8.0]])
    back = norm.unnormalize("action", norm.normalize("action", x))
    np.testing.assert_allclose(back, x, atol=1e-5)


def test_meanstd_identity_and_image():
    d = data()
    norm = Normalizer.fit(d, MODES)
    y = norm.normalize("state", torch.from_numpy(d["state"]))
    np.testing.assert_allclose(y.mean(0), [0, 0], atol=1e-5)
    np.testing.assert_allclose(y.std(0, unbiased=False), [1, 1], atol=1e-5)
    np.testing.assert_allclose(norm.unnormalize("state", y), d["state"], rtol=1e-5, atol=1e-5)
    r = torch.from_numpy(d["raw"])
    np.testing.assert_allclose(norm.normalize("raw", r), r.float())
    img = torch.from_numpy(d["image"][:4]).reshape(2, 2, 6, 8, 3)  # (B, To, H, W, 3)
    f = norm.normalize("image", img)
    assert f.shape == (2, 2, 3, 6, 8) and f.dtype == torch.float32
    assert 0 <= f.min() and f.max() <= 1
    np.testing.assert_allclose(f[1, 0, 2], img[1, 0, :, :, 2].float() / 255)
    assert torch.equal(norm.unnormalize("image", f), img)
    with pytest.raises(KeyError, match="no key 'nope'"):
        norm.normalize("nope", r)
    with pytest.raises(ValueError, match="mode of 'raw'"):
        Normalizer.fit(d, {"raw": "zscore"})
    bad = dict(d, raw=np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="'raw' contains NaN"):
        Normalizer.fit(bad, {"raw": "meanstd"})


def test_state_dict_and_json_roundtrip():
    d = data()
    norm = Normalizer.fit(d, MODES)
    x = torch.from_numpy(d["action"][:5])

    empty = Normalizer()
    empty.load_state_dict(norm.state_dict())
    assert empty.mode("state") == "meanstd" and set(empty.keys()) == set(MODES)
    assert torch.equal(empty.normalize("action", x), norm.normalize("action", x))

    from_json = Normalizer.from_json(norm.to_json())
    assert torch.equal(from_json.normalize("action", x), norm.normalize("action", x))
    assert from_json.mode("image") == "image"

    class Holder(nn.Module):  # a normalizer inside a policy loads with the policy's state dict
        def __init__(self, n):
            super().__init__()
            self.normalizer = n
            self.lin = nn.Linear(2, 2)

    src = Holder(norm)
    dst = Holder(Normalizer())
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.normalizer.normalize("state", x[:, :2].double()),
                       norm.normalize("state", x[:, :2].double()))
    assert all(isinstance(v, torch.Tensor) for v in src.state_dict().values())


def test_fit_from_store(tmp_path):
    from diffusion_policy.data.store import EpisodeStore
    d = data()
    store = EpisodeStore.create(tmp_path / "n.zarr")
    store.add_episode({k: d[k][:200] for k in ("action", "image")})
    store.add_episode({k: d[k][200:] for k in ("action", "image")})
    store = EpisodeStore.open(tmp_path / "n.zarr")
    norm = Normalizer.fit(store, {"action": "minmax", "image": "image"})
    np.testing.assert_allclose(norm.stats["action"].min, d["action"].min(0))
    np.testing.assert_allclose(norm.stats["action"].max, d["action"].max(0))
