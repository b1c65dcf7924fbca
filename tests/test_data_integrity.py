"""Store integrity: missing, empty, truncated and garbage chunk files, NaN/inf, actions out of bounds,
digests; each found by dp-data validate (one line per problem, exit 2) and refused by the jobs that
call check_store (dp-train, dp-collect, dp-data copy) with one line naming the array and chunk."""
import hashlib
import os
import zipfile

import numpy as np
import pytest
import zarr

from diffusion_policy.data.cli import main as data_main
from diffusion_policy.data.integrity import check_store, scan_store
from diffusion_policy.data.store import EpisodeStore, StoreError

LENGTHS = [5, 6, 4]  # ends 5, 11, 15
CHUNKS = {"action": 4, "state": 4, "image": 2}  # action/state: c/0 = steps 0-3, ..., c/3 = 12-15
MISSING = "is missing (expected a chunk file; zarr would read it back as zeros)"


def episode(i: int, n: int) -> dict:
    t = np.arange(n)
    return {"action": np.stack([np.full(n, i / 10), t / 100], 1).astype(np.float32),
            "state": (i * 100 + t)[:, None].repeat(6, 1).astype(np.float32),
            "image": ((i * 7 + t) % 256).astype(np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)}


def make_store(path, keys=("action", "state", "image")):
    store = EpisodeStore.create(path, chunks=CHUNKS)
    for i, n in enumerate(LENGTHS):
        store.add_episode({k: v for k, v in episode(i, n).items() if k in keys})
    return path


def errors(path, **kw):
    return scan_store(path, **kw).errors


def cli(argv, capsys):
    code = data_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_intact_store_at_every_depth(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    for kw in ({}, {"full": True}, {"checksums": True}):
        report = scan_store(path, **kw)
        assert report.errors == [] and report.notes == []
        # episode_ends 1 + episode_digests 1 + action 4 + state 4 + image 8
        assert report.chunks == 18
    assert scan_store(path).decoded_bytes == 15 * (2 + 6) * 4  # fast: the float arrays only
    assert scan_store(path, full=True).decoded_bytes == 15 * (2 + 6) * 4 + 15 * 48
    assert scan_store(path, checksums=True).digests_verified == 3 * 3


@pytest.mark.parametrize("key,chunk,where", [
    ("action", "c/1/0", "steps 4-7, episodes 0-1"),
    ("state", "c/3/0", "steps 12-14, episode 2"),
    ("image", "c/3/0/0/0", "steps 6-7, episode 1"),
])
def test_deleted_chunk_is_an_error_everywhere(key, chunk, where, tmp_path, capsys):
    path = make_store(tmp_path / "s.zarr")
    os.remove(path / "data" / key / chunk)
    line = f"{path}: data/{key} chunk {chunk} ({where}) {MISSING}"
    assert errors(path) == [line]
    with pytest.raises(StoreError) as exc:
        check_store(EpisodeStore.open(path), keys=[key])
    assert str(exc.value) == line
    check_store(EpisodeStore.open(path), keys=[k for k in ("action", "state", "image") if k != key])
    code, out, err = cli(["validate", path], capsys)
    assert (code, err) == (2, f"dp-data: {line}\n") and "valid" not in out


def test_deleted_meta_chunks(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    os.remove(path / "meta" / "episode_digests" / "c" / "0" / "0")
    assert errors(path) == [f"{path}: meta/episode_digests chunk c/0/0 (episodes 0-2) {MISSING}"]
    os.remove(path / "meta" / "episode_ends" / "c" / "0")
    assert errors(path) == [f"{path}: meta/episode_ends is not increasing at episode 0 (0 after 0)"]


def test_all_zero_chunks_are_written(tmp_path):
    """zarr skips chunks equal to the fill value by default: a missing file would then be data."""
    path = tmp_path / "z.zarr"
    store = EpisodeStore.create(path, chunks={"action": 4})
    store.add_episode({"action": np.zeros((8, 2), np.float32)})
    store.add_episode({"action": np.ones((3, 2), np.float32)})
    assert sorted(os.listdir(path / "data" / "action" / "c")) == ["0", "1", "2"]
    assert errors(path) == []
    again = EpisodeStore.open(path, mode="a")  # appending to a reopened store writes them too
    again.add_episode({"action": np.zeros((9, 2), np.float32)})
    assert sorted(os.listdir(path / "data" / "action" / "c")) == ["0", "1", "2", "3", "4"]
    assert errors(path, checksums=True) == []


def write_v2(path):
    """A zarr-v2 replay buffer (Chi et al.'s layout), chunks of 4 steps, '.' chunk keys."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    rng = np.random.default_rng(0)
    data = root.create_group("data")
    for key, shape in (("action", (15, 2)), ("img", (15, 4, 4, 3)), ("pos", (15, 64))):
        a = data.create_array(key, shape=shape, chunks=(4,) + shape[1:], dtype="float32")
        a[:] = rng.normal(size=shape) if key != "pos" else np.arange(15)[:, None].repeat(64, 1)  # pos compresses
    ends = root.create_group("meta").create_array("episode_ends", shape=(3,), dtype="int64")
    ends[:] = [6, 10, 15]


def zip_dir(src, dst):
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(src).as_posix())


def test_v2_directory_and_zip(tmp_path):
    write_v2(tmp_path / "v2.zarr")
    zip_dir(tmp_path / "v2.zarr", tmp_path / "ok.zarr.zip")
    assert errors(tmp_path / "v2.zarr", full=True) == errors(tmp_path / "ok.zarr.zip", full=True) == []
    os.remove(tmp_path / "v2.zarr" / "data" / "img" / "1.0.0.0")
    zip_dir(tmp_path / "v2.zarr", tmp_path / "bad.zarr.zip")
    for name in ("v2.zarr", "bad.zarr.zip"):
        path = tmp_path / name
        assert errors(path) == [f"{path}: data/img chunk 1.0.0.0 (steps 4-7, episodes 0-1) {MISSING}"]
    # v2 Blosc chunks have the same header: a truncated one is found without decoding
    raw = tmp_path / "v2.zarr" / "data" / "action" / "2.0"
    size = raw.stat().st_size
    raw.write_bytes(raw.read_bytes()[: size - 5])
    path = tmp_path / "v2.zarr"
    assert errors(path, keys=["action"]) == [
        f"{path}: data/action chunk 2.0 (steps 8-11, episodes 1-2) is truncated ({size - 5} of the {size} "
        f"bytes its header states)"]
    report = scan_store(path, checksums=True, keys=["img"])
    assert report.notes[0].startswith(f"{path}: no digests recorded for every episode")
    # garbage behind a valid header, read through zarr (v2): the chunk is found by decoding each one
    damage(path, "pos", "1.0", "garbled_body")
    (line,) = errors(path, keys=["pos"])
    assert line.startswith(f"{path}: data/pos chunk 1.0 (steps 4-7, episodes 0-1) cannot be decoded (")


def damage(path, key, chunk, kind):
    """Rewrite one chunk file; returns its original bytes."""
    f = path / "data" / key / chunk
    raw = f.read_bytes()
    rng = np.random.default_rng(1)
    if kind == "empty":
        f.write_bytes(b"")
    elif kind == "truncated":
        f.write_bytes(raw[: len(raw) // 2])
    elif kind == "garbage":
        f.write_bytes(rng.integers(0, 256, len(raw), dtype=np.uint8).tobytes())
    elif kind == "garbled_body":  # a plausible header before garbage
        f.write_bytes(raw[:16] + rng.integers(0, 256, len(raw) - 16, dtype=np.uint8).tobytes())
    return raw


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage"])
@pytest.mark.parametrize("key,chunk,where,nbytes", [("image", "c/3/0/0/0", "steps 6-7, episode 1", 96),
                                                    ("action", "c/1/0", "steps 4-7, episodes 0-1", 32)])
def test_damaged_chunk_file_found_by_the_fast_check(kind, key, chunk, where, nbytes, tmp_path, capsys):
    """Sizes and Blosc headers: found without decoding, and reported once even where decoded."""
    path = make_store(tmp_path / "s.zarr")
    raw = damage(path, key, chunk, kind)
    head = f"{path}: data/{key} chunk {chunk} ({where})"
    junk = (path / "data" / key / chunk).read_bytes()
    expected = {
        "empty": f"{head} is empty (0 bytes, expected a compressed chunk)",
        "truncated": f"{head} is truncated ({len(raw) // 2} of the {len(raw)} bytes its header states)",
        "garbage": f"{head} is not a Blosc chunk of this array (its header states "
                   f"{int.from_bytes(junk[4:8], 'little')} bytes, expected {nbytes})",
    }[kind]
    assert errors(path) == errors(path, full=True) == errors(path, checksums=True) == [expected]
    code, _, err = cli(["validate", path, "--full"], capsys)
    assert (code, err) == (2, f"dp-data: {expected}\n")


def big_store(path):
    """Chunks large enough that Blosc compresses them (it stores tiny chunks as plain copies)."""
    store = EpisodeStore.create(path, chunks={"action": 256, "image": 4})
    t = np.arange(300)
    store.add_episode({"action": np.stack([np.sin(t / 30), np.cos(t / 30)], 1).astype(np.float32),
                       "image": ((t // 3) % 256).astype(np.uint8)[:, None, None, None] *
                       np.ones((1, 32, 32, 3), np.uint8)})
    return path


@pytest.mark.parametrize("key,chunk,fast", [("image", "c/2/0/0/0", False), ("action", "c/1/0", True)])
def test_garbage_behind_a_valid_header_found_by_decoding(key, chunk, fast, tmp_path):
    path = big_store(tmp_path / "b.zarr")
    damage(path, key, chunk, "garbled_body")
    head = f"{path}: data/{key} chunk {chunk} ({'steps 8-11' if key == 'image' else 'steps 256-299'}, episode 0)"
    # floating-point arrays are decoded by the fast check (for NaN/inf), uint8 images only by --full
    assert len(errors(path)) == int(fast)
    (line,) = errors(path, full=True)
    assert line.startswith(f"{head} cannot be decoded (") and "\n" not in line
    assert errors(path, checksums=True) == [line]


def test_garbage_in_a_stored_copy_chunk_found_by_the_checksums(tmp_path):
    """Blosc keeps chunks under 128 bytes as plain copies: their garbage decodes, only digests see it."""
    path = make_store(tmp_path / "s.zarr")
    damage(path, "image", "c/3/0/0/0", "garbled_body")
    assert errors(path) == errors(path, full=True) == []
    assert errors(path, checksums=True) == [
        f"{path}: data/image does not match its recorded digest in episode 1, expected the values written by "
        f"the append (a chunk was changed or damaged)"]


def test_lazy_image_reader_refuses_a_missing_chunk(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    os.remove(path / "data/image/c/3/0/0/0")
    images = EpisodeStore.open(path)["image"]
    np.testing.assert_array_equal(images[[4, 8]], np.asarray(episode(0, 5)["image"][[4]].tolist() +
                                                             episode(1, 6)["image"][[3]].tolist()))
    with pytest.raises(StoreError, match=r"data/image/c/3/0/0/0: chunk file is missing, expected one for "
                                         r"steps 6-7"):
        images[[7]]


def test_nan_and_inf_name_their_episodes(tmp_path, capsys):
    path = make_store(tmp_path / "s.zarr")
    root = zarr.open_group(str(path), mode="r+")
    root["data/action"][2, 0] = np.nan
    root["data/action"][6, 1] = np.nan
    root["data/state"][13, 4] = -np.inf
    report = scan_store(path)
    assert report.nonfinite == {"action": [0, 1], "state": [2]}
    assert report.errors == [
        f"{path}: data/action has NaN/inf in episodes 0, 1 (first at step 2), expected finite values",
        f"{path}: data/state has NaN/inf in episode 2 (first at step 13), expected finite values"]
    with pytest.raises(StoreError) as exc:
        check_store(EpisodeStore.open(path))
    assert str(exc.value) == report.errors[0] + " (and 1 more problem: dp-data validate lists them)"
    code, _, err = cli(["validate", path], capsys)
    assert code == 2 and err == "".join(f"dp-data: {line}\n" for line in report.errors)


def test_action_bounds(tmp_path, capsys):
    path = make_store(tmp_path / "s.zarr", keys=("action", "state"))
    zarr.open_group(str(path), mode="r+")["data/action"][7, 1] = 0.75
    zarr.open_group(str(path), mode="r+")["data/action"][13, 0] = -0.5
    line = (f"{path}: data/action is outside the action bounds in episodes 1, 2 (first at step 7: 0.75 in "
            f"dimension 1), expected values in [-0.47, 0.47]")
    assert errors(path, action_bounds=(-0.47, 0.47)) == [line]
    assert scan_store(path, action_bounds=([-0.6, -0.47], [0.47, 0.8])).out_of_bounds == []
    assert errors(path) == []  # no bounds given, none checked
    assert errors(path, action_bounds=(-1, 1), action_key="act") == [
        f"{path}: no array data/act to check against the action bounds (the store has ['action', 'state'])"]
    code, _, err = cli(["validate", path, "--task", "avoid"], capsys)  # dp/Avoid-v0: Box(-0.47, 0.47)
    assert (code, err) == (2, f"dp-data: {line}\n")
    code, _, err = cli(["validate", path, "--recorded-env"], capsys)
    assert (code, err) == (2, f"dp-data: {path}: records no env_id in its attributes (stores of dp-collect do); "
                              f"pass --task NAME instead of --recorded-env\n")
    code, _, err = cli(["validate", path, "--task", "nosuchtask"], capsys)
    assert code == 2 and err.count("\n") == 1 and "nosuchtask" in err


def test_digests_recorded_per_episode_and_verified(tmp_path, capsys):
    path = make_store(tmp_path / "s.zarr")
    store = EpisodeStore.open(path)
    keys, table = store.digests()
    assert keys == ["action", "image", "state"] and table.shape == (3, 3) and table.dtype == np.uint64
    for i, n in enumerate(LENGTHS):  # 64-bit BLAKE2b of each key's episode bytes, little-endian
        for j, key in enumerate(keys):
            h = hashlib.blake2b(episode(i, n)[key].tobytes(), digest_size=8).digest()
            assert int(table[i, j]) == int.from_bytes(h, "little")
    # a changed value in a well-formed chunk: only the checksums see it
    zarr.open_group(str(path), mode="r+")["data/state"][9, 0] = 7.0
    assert errors(path) == errors(path, full=True) == []
    line = (f"{path}: data/state does not match its recorded digest in episode 1, expected the values "
            f"written by the append (a chunk was changed or damaged)")
    assert errors(path, checksums=True) == [line]
    code, _, err = cli(["validate", path, "--checksums"], capsys)
    assert (code, err) == (2, f"dp-data: {line}\n")
    # copy checks what it reads against the digests: refused, nothing left behind
    code, _, err = cli(["copy", path, tmp_path / "c.zarr"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"dp-data: {path}: episode 1: data/state: values read for this episode do not "
                          f"match the digest recorded when it was written (")
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]
    assert cli(["copy", path, tmp_path / "c.zarr", "--episodes", "0,2"], capsys)[0] == 0
    assert errors(tmp_path / "c.zarr", checksums=True) == []


def test_digests_follow_pop_and_an_interrupted_append(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    store = EpisodeStore.open(path, mode="a")
    store.pop_episode()
    assert store.zarr_array("action").shape[0] == 11 and store._digests.shape == (2, 3)
    store.add_episode(episode(5, 3))
    # what a writer killed before its commit leaves: data and a digest row past the last episode
    for key in store.keys():
        arr = store.zarr_array(key)
        arr.resize((20,) + arr.shape[1:])
        arr[14:] = 3
    store._digests.resize((4, 3))
    store._digests[3] = 12345
    report = scan_store(path, checksums=True)
    assert report.errors == [] and report.digests_verified == 9
    EpisodeStore.open(path, mode="a").add_episode(episode(6, 2))
    report = scan_store(path, checksums=True)
    assert report.errors == [] and report.digests_verified == 12


def test_copy_of_a_damaged_store_leaves_nothing(tmp_path, capsys):
    path = make_store(tmp_path / "s.zarr")
    os.remove(path / "data/image/c/3/0/0/0")
    dst = tmp_path / "copy.zarr"
    code, out, err = cli(["copy", path, dst], capsys)
    assert (code, out) == (2, "")
    assert err == f"dp-data: {path}: data/image chunk c/3/0/0/0 (steps 6-7, episode 1) {MISSING}\n"
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]
    # the episodes that do not touch the damaged chunk can still be copied out
    assert cli(["copy", path, dst, "--episodes", "0,2"], capsys)[0] == 0
    copy = EpisodeStore.open(dst)
    np.testing.assert_array_equal(copy.episode_ends, [5, 9])
    np.testing.assert_array_equal(copy.get_episode(1)["image"], episode(2, 4)["image"])
    # a chunk that only decoding finds: the copy stops at it, and the temporary copy is removed
    damage(path, "image", "c/0/0/0/0", "garbage")
    stated = int.from_bytes((path / "data/image/c/0/0/0/0").read_bytes()[4:8], "little")
    code, _, err = cli(["copy", path, tmp_path / "copy2.zarr", "--episodes", "2,0"], capsys)
    assert (code, err) == (2, f"dp-data: {path}: data/image chunk c/0/0/0/0 (steps 0-1, episode 0) is not a "
                              f"Blosc chunk of this array (its header states {stated} bytes, expected 96)\n")
    assert sorted(os.listdir(tmp_path)) == ["copy.zarr", "s.zarr"]
    # garbage that only decoding finds, met while copying: stopped there, the temporary copy removed
    big = big_store(tmp_path / "b.zarr")
    damage(big, "image", "c/2/0/0/0", "garbled_body")
    code, _, err = cli(["copy", big, tmp_path / "copy3.zarr"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"dp-data: {big}: data/image steps 0-299 cannot be read (")
    assert sorted(os.listdir(tmp_path)) == ["b.zarr", "copy.zarr", "s.zarr"]


def test_empty_store_is_valid_but_not_trainable(tmp_path, capsys):
    """What a dp-collect killed before its first episode leaves: a valid store with no episodes."""
    path = tmp_path / "e.zarr"
    EpisodeStore.create(path)
    code, out, err = cli(["validate", path], capsys)
    assert (code, err) == (0, "")
    assert out == (f"note: {path}: no episodes yet (valid; dp-train needs at least one)\n"
                   f"{path}: valid (fast check: 0 episodes, 0 steps, 0 chunk files, 0.0 KiB decoded, "
                   f"0 digests verified)\n")
    with pytest.raises(StoreError) as exc:
        check_store(EpisodeStore.open(path), min_episodes=1)
    assert str(exc.value) == f"{path}: no episodes (expected at least 1; dp-collect records them)"
    EpisodeStore.open(path, mode="a").add_episode(episode(0, 3))  # and appending to it works
    assert errors(path, checksums=True) == []


def toy_train_store(path):
    """Keys of dp-train's default task (state (6,), action (2,))."""
    store = EpisodeStore.create(path, chunks={"state": 16, "action": 16})
    rng = np.random.default_rng(0)
    for _ in range(3):
        store.add_episode({"state": rng.normal(0, 0.1, (20, 6)).astype(np.float32),
                           "action": rng.uniform(-0.4, 0.4, (20, 2)).astype(np.float32)})
    return path


@pytest.mark.parametrize("kind", ["missing", "empty_chunk", "garbage", "nan", "no_episodes"])
def test_dp_train_refuses(kind, tmp_path, capsys):
    from diffusion_policy.train import main as train_main

    path = tmp_path / "t.zarr"
    if kind == "no_episodes":
        EpisodeStore.create(path)
        expected = f"{path}: no episodes (expected at least 1; dp-collect records them)"
    else:
        toy_train_store(path)
        if kind == "missing":
            os.remove(path / "data/action/c/2/0")
            expected = f"{path}: data/action chunk c/2/0 (steps 32-47, episodes 1-2) {MISSING}"
        elif kind == "garbage":
            f = path / "data/state/c/0/0"
            f.write_bytes(bytes(range(256)) * 2)
            expected = (f"{path}: data/state chunk c/0/0 (steps 0-15, episode 0) is not a Blosc chunk of this "
                        f"array (its header states {int.from_bytes(bytes(range(4, 8)), 'little')} bytes, "
                        f"expected 384)")
        elif kind == "empty_chunk":
            (path / "data/state/c/1/0").write_bytes(b"")
            expected = (f"{path}: data/state chunk c/1/0 (steps 16-31, episodes 0-1) is empty (0 bytes, "
                        f"expected a compressed chunk)")
        else:
            zarr.open_group(str(path), mode="r+")["data/state"][45, 2] = np.inf
            expected = f"{path}: data/state has NaN/inf in episode 2 (first at step 45), expected finite values"
    code = train_main([f"data={path}", f"run_dir={tmp_path / 'run'}", "steps=1", "device=cpu"])
    err = capsys.readouterr().err
    assert (code, err) == (2, f"dp-train: {expected}\n")
    assert not (tmp_path / "run").exists()


def test_dp_collect_refuses_to_append_to_a_store_with_nan(tmp_path, capsys):
    from diffusion_policy.collect import main as collect_main

    out = tmp_path / "a.zarr"
    assert collect_main(["task=avoid", "episodes=1", f"out={out}", "workers=1"]) == 0
    n = EpisodeStore.open(out).n_steps
    zarr.open_group(str(out), mode="r+")["data/action"][n - 1, 0] = np.nan
    capsys.readouterr()
    assert collect_main(["task=avoid", "episodes=2", f"out={out}", "workers=1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"dp-collect: {out}: data/action has NaN/inf in episode 0 (first at step {n - 1}), "
                   f"expected finite values\n")
    assert EpisodeStore.open(out).n_episodes == 1
    # the env the store records (dp/Avoid-v0): its action space bounds the actions
    zarr.open_group(str(out), mode="r+")["data/action"][n - 1, 0] = 0.5
    code, _, err = cli(["validate", out, "--recorded-env"], capsys)
    assert (code, err) == (2, f"dp-data: {out}: data/action is outside the action bounds in episode 0 (first at "
                              f"step {n - 1}: 0.5 in dimension 0), expected values in [-0.47, 0.47]\n")
    code, _, err = cli(["validate", tmp_path / "x.zarr", "--recorded-env"], capsys)
    assert (code, err) == (2, f"dp-data: {tmp_path / 'x.zarr'}: no such file or directory (expected a Zarr store)\n")
    # a bad setting fails before any store exists
    assert collect_main(["task=avoid", "episodes=0", f"out={tmp_path / 'b.zarr'}"]) == 2
    assert not (tmp_path / "b.zarr").exists()
