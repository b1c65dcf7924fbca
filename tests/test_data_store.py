"""EpisodeStore: appends, reads, pops, copies, v2 and .zarr.zip stores, chunking and compression."""
import zipfile

import numpy as np
import pytest
import zarr

from diffusion_policy.data.cli import validate_store
from diffusion_policy.data.lazy import LazyArray
from diffusion_policy.data.store import EpisodeStore, StoreError


def episode(i: int, length: int, image_hw: int = 12) -> dict:
    """Values that encode (episode, step), so any mix-up is visible."""
    t = np.arange(length)
    return {
        "action": np.stack([np.full(length, i), t], 1).astype(np.float32),
        "state": (i * 1000 + t)[:, None].repeat(5, 1).astype(np.float32),
        "image": ((i * 7 + t) % 256).astype(np.uint8)[:, None, None, None]
        * np.ones((1, image_hw, image_hw, 3), np.uint8),
    }


LENGTHS = [5, 9, 3, 7]


@pytest.fixture
def store(tmp_path):
    s = EpisodeStore.create(tmp_path / "s.zarr")
    for i, n in enumerate(LENGTHS):
        s.add_episode(episode(i, n))
    return s


def test_append_and_read(store, tmp_path):
    assert store.n_episodes == 4 and store.n_steps == sum(LENGTHS)
    np.testing.assert_array_equal(store.episode_ends, np.cumsum(LENGTHS))
    np.testing.assert_array_equal(store.episode_lengths, LENGTHS)
    assert store.episode_ends.dtype == np.int64
    assert store.keys() == ["action", "image", "state"]
    again = EpisodeStore.open(tmp_path / "s.zarr")
    assert again.zarr_format == 3
    for i, n in enumerate(LENGTHS):
        ep = again.get_episode(i)
        for key, value in episode(i, n).items():
            np.testing.assert_array_equal(ep[key], value)
    np.testing.assert_array_equal(again.get_episode(-1, keys=["state"])["state"],
                                  episode(3, 7)["state"])
    assert isinstance(again["action"], np.ndarray) and again["action"].shape == (24, 2)
    assert isinstance(again["image"], LazyArray) and again["image"].shape == (24, 12, 12, 3)
    cached = EpisodeStore.open(tmp_path / "s.zarr", cache_images=True)
    assert isinstance(cached["image"], np.ndarray)
    np.testing.assert_array_equal(cached["image"], np.asarray(again["image"]))
    assert again["image"]._direct is not None  # chunk files read without zarr's per-chunk cost
    idx = np.array([[0, 23], [5, 5], [-1, 7]])
    np.testing.assert_array_equal(again["image"][idx], cached["image"][idx])
    np.testing.assert_array_equal(again["image"][3, :2], cached["image"][3, :2])
    np.testing.assert_array_equal(again["image"][2:9:3], cached["image"][2:9:3])
    with pytest.raises(IndexError):
        again.get_episode(4)


def test_chunking_and_compression(store):
    img, act = store.zarr_array("image"), store.zarr_array("action")
    assert img.dtype == np.uint8 and 1 <= img.chunks[0] <= 8 and img.chunks[1:] == (12, 12, 3)
    assert act.chunks[0] >= 256  # time-chunked
    for arr in (img, act):
        (codec,) = arr.compressors
        assert type(codec).__name__ == "BloscCodec" and codec.cname.value in ("lz4", "zstd")


def test_bad_appends_leave_store_unchanged(store):
    ends = store.episode_ends
    bad = episode(9, 4)
    bad["state"] = bad["state"][:3]
    with pytest.raises(StoreError, match=r"data\['state'\] has 3 steps, expected 4"):
        store.add_episode(bad)
    with pytest.raises(StoreError, match="missing \\['image'\\]"):
        store.add_episode({k: v for k, v in episode(9, 4).items() if k != "image"})
    wrong = episode(9, 4)
    wrong["state"] = wrong["state"][:, :2]
    with pytest.raises(StoreError, match="per-step shape"):
        store.add_episode(wrong)
    np.testing.assert_array_equal(store.episode_ends, ends)
    with pytest.raises(StoreError, match="read-only"):
        EpisodeStore.open(store.path).add_episode(episode(9, 4))
    with pytest.raises(StoreError, match="already exists"):
        EpisodeStore.create(store.path)


def test_pop_and_copy(store, tmp_path):
    assert store.pop_episode() == 7
    assert store.n_episodes == 3 and store.zarr_array("action").shape[0] == 17
    store.add_episode(episode(3, 2))
    again = EpisodeStore.open(store.path)
    np.testing.assert_array_equal(again.episode_ends, [5, 14, 17, 19])
    np.testing.assert_array_equal(again.get_episode(3)["state"], episode(3, 2)["state"])
    record = {"env_id": "dp/PushT-v1", "task": "pusht", "dart_noise": 0.0}
    EpisodeStore.open(store.path, mode="a")._group.attrs.update(record)  # dp-collect's record
    again = EpisodeStore.open(store.path)
    dst = again.copy_to(tmp_path / "c.zarr", episodes=[3, 1])
    np.testing.assert_array_equal(dst.episode_ends, [2, 11])
    assert dict(dst._group.attrs) == record  # a copy keeps where its episodes came from
    for j, i in enumerate([3, 1]):
        for key in again.keys():
            np.testing.assert_array_equal(dst.get_episode(j)[key], again.get_episode(i)[key])
    with pytest.raises(StoreError, match="episode 4 out of range"):
        again.copy_to(tmp_path / "d.zarr", episodes=[4])


def test_uncommitted_tail_is_ignored_then_overwritten(store):
    # what a writer killed after writing data but before the commit leaves behind
    for key in store.keys():
        arr = store.zarr_array(key)
        arr.resize((30,) + arr.shape[1:])
        arr[24:] = 99
    again = EpisodeStore.open(store.path, mode="a")
    assert again.n_steps == 24 and again["action"].shape == (24, 2)
    errors, notes = validate_store(store.path)
    assert not errors and len(notes) == 3
    again.add_episode(episode(4, 2))
    assert again.zarr_array("state").shape[0] == 26
    np.testing.assert_array_equal(EpisodeStore.open(store.path).get_episode(4)["state"],
                                  episode(4, 2)["state"])
    assert validate_store(store.path) == ([], [])


def write_v2(path, lengths):
    """A replay buffer as Chi et al.'s diffusion_policy writes it (zarr format 2)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    data = root.create_group("data")
    n = sum(lengths)
    rng = np.random.default_rng(0)
    arrays = {"action": rng.normal(size=(n, 2)).astype(np.float32),
              "state": rng.normal(size=(n, 5)).astype(np.float32),
              "keypoint": rng.normal(size=(n, 9, 2)).astype(np.float32),
              "img": rng.uniform(0, 255, size=(n, 16, 16, 3)).astype(np.float32)}
    for key, value in arrays.items():
        arr = data.create_array(key, shape=value.shape, chunks=(4,) + value.shape[1:],
                                dtype=value.dtype)
        arr[:] = value
    ends = root.create_group("meta").create_array("episode_ends", shape=(len(lengths),),
                                                  dtype="int64")
    ends[:] = np.cumsum(lengths)
    return arrays


def test_opens_v2_store_and_zip(tmp_path):
    arrays = write_v2(tmp_path / "v2.zarr", [6, 4, 5])
    # file entries only, uncompressed, as zarr 2's ZipStore writes them (no directory entries)
    with zipfile.ZipFile(tmp_path / "v2.zarr.zip", "w", zipfile.ZIP_STORED) as zf:
        for f in sorted((tmp_path / "v2.zarr").rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(tmp_path / "v2.zarr").as_posix())
    for name in ("v2.zarr", "v2.zarr.zip"):
        with EpisodeStore.open(tmp_path / name) as s:
            assert s.zarr_format == 2
            np.testing.assert_array_equal(s.episode_ends, [6, 10, 15])
            assert s.keys() == ["action", "img", "keypoint", "state"]
            for key, value in arrays.items():
                np.testing.assert_array_equal(np.asarray(s[key]), value)
            np.testing.assert_array_equal(s.get_episode(1)["keypoint"], arrays["keypoint"][6:10])
            assert s.is_image("img") and not s.is_image("keypoint")
            lazy, idx = s["img"], np.array([[14, 0], [3, 3]])
            assert lazy._direct is None  # v2 and zip: read through zarr
            np.testing.assert_array_equal(lazy[idx], arrays["img"][idx])
    for name in ("v2.zarr", "v2.zarr.zip"):
        with pytest.raises(StoreError, match="read-only"):
            EpisodeStore.open(tmp_path / name, mode="a")
    with EpisodeStore.open(tmp_path / "v2.zarr.zip") as s:
        v3 = s.copy_to(tmp_path / "v3.zarr", episodes=[2])
    assert v3.zarr_format == 3
    np.testing.assert_array_equal(v3["state"], arrays["state"][10:15])


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="no such file"):
        EpisodeStore.open(tmp_path / "missing.zarr")
    assert not (tmp_path / "missing.zarr").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a Zarr store"):
        EpisodeStore.open(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_partial_files_of_a_killed_writer_are_noted_then_removed(store):
    leftover = store.path / "data" / "action" / f"zarr.{'ab' * 16}.partial"
    leftover.write_bytes(b"half a file")
    errors, notes = validate_store(store.path)
    assert not errors and any("partial" in n for n in notes)
    EpisodeStore.open(store.path, mode="a")
    assert not leftover.exists()
