"""dp-data: info, validate, pop, copy; bad input gives one line naming the problem and exit status 2,
never a traceback, and leaves the store's files untouched."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from diffusion_policy.data.cli import main
from diffusion_policy.data.store import EpisodeStore

LENGTHS = [4, 6, 5]


def make_store(path):
    store = EpisodeStore.create(path)
    for i, n in enumerate(LENGTHS):
        store.add_episode({"action": np.full((n, 2), i, np.float32),
                           "image": np.full((n, 8, 8, 3), i, np.uint8)})
    return path


def snapshot(path):
    """Every directory and file under path (or the file itself); files with size, mtime, hash."""
    if not os.path.exists(path):
        return None
    files = [path] if os.path.isfile(path) else [
        os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    out = {os.path.relpath(r, path): "dir" for r, _, _ in os.walk(path)}
    for f in sorted(files):
        st = os.stat(f)
        out[os.path.relpath(f, path)] = (st.st_size, st.st_mtime_ns,
                                         hashlib.sha1(open(f, "rb").read()).hexdigest())
    return out


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_info_validate_pop_copy(tmp_path, capsys):
    path = str(make_store(tmp_path / "s.zarr"))
    code, out, err = run(["info", path], capsys)
    assert code == 0 and not err
    for text in ("episodes: 3", "steps:    15", "min 4, median 5, max 6", "action: shape (15, 2)",
                 "float32", "image: shape (15, 8, 8, 3), uint8", "chunks (", "blosc(", "on disk"):
        assert text in out, text
    # 5 chunk files: episode_ends, episode_digests, action (one chunk), image (8 frames per chunk);
    # decoded: action 15 x 2 x 4 = 120 bytes (fast: floats only), + image 15 x 192 = 3000 bytes
    assert run(["validate", path], capsys)[:2] == (
        0, f"{path}: valid (fast check: 3 episodes, 15 steps, 5 chunk files, 0.1 KiB decoded, "
           f"0 digests verified)\n")
    assert run(["validate", path, "--checksums"], capsys)[:2] == (
        0, f"{path}: valid (checksum check: 3 episodes, 15 steps, 5 chunk files, 2.9 KiB decoded, "
           f"6 digests verified)\n")
    dst = str(tmp_path / "c.zarr")
    code, out, _ = run(["copy", path, dst, "--episodes", "0,2"], capsys)
    assert code == 0
    np.testing.assert_array_equal(EpisodeStore.open(dst).episode_ends, [4, 9])
    code, out, _ = run(["pop", path], capsys)
    assert code == 0 and "removed episode 2 (5 steps)" in out
    np.testing.assert_array_equal(EpisodeStore.open(path).episode_ends, [4, 10])


def corrupt(kind, path):
    """Make a bad store of the given kind at path; returns the text the error must contain."""
    if kind == "wrong_path":
        return "no such file or directory"
    if kind == "not_a_store":
        os.makedirs(path / "data")
        return "not a Zarr store"
    if kind == "a_file":
        path.write_text("hello")
        return "not a Zarr store"
    make_store(path)
    # a temporary file of a killed writer: `pop` of a malformed store must not remove it either
    (path / "data" / f"zarr.{'cd' * 16}.partial").write_bytes(b"")
    root = zarr.open_group(str(path), mode="r+")
    if kind == "no_ends":
        del root["meta/episode_ends"]
        return "missing meta/episode_ends"
    if kind == "decreasing":
        root["meta/episode_ends"][:] = [4, 10, 7]
        return "meta/episode_ends is not increasing at episode 2 (7 after 10)"
    if kind == "short_key":
        root["data/action"].resize((12, 2))
        return "data/action has 12 steps, expected at least 15"
    if kind == "ends_garbage":
        (path / "meta" / "episode_ends" / "c" / "0").write_bytes(b"\x02\x01" + bytes(range(40)))
        return "cannot read meta/episode_ends ("
    if kind == "bad_root_json":
        (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", \n')
        return ("the root group's metadata is not valid JSON (Expecting property name enclosed in double "
                "quotes: line 2 column 1 (char 42)), expected zarr.json (v3) or .zgroup (v2)")
    if kind == "nan":
        root["data/action"][7, 1] = np.nan
        return "data/action has NaN/inf in episode 1 (first at step 7), expected finite values"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["wrong_path", "not_a_store", "a_file", "no_ends", "decreasing",
                                  "short_key", "ends_garbage", "bad_root_json", "nan"])
def test_bad_input_one_line_and_untouched(kind, tmp_path, capsys):
    path = tmp_path / "bad.zarr"
    expected = corrupt(kind, path)
    before = snapshot(path)
    commands = [["validate"], ["info"], ["pop"], ["copy"]] if kind != "nan" else [["validate"]]
    for cmd in commands:
        argv = cmd + [str(path)] + ([str(tmp_path / "out.zarr")] if cmd == ["copy"] else [])
        code, out, err = run(argv, capsys)
        assert code == 2, (cmd, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert expected in err and str(path) in err, err
        assert snapshot(path) == before, f"dp-data {cmd[0]} modified the store"
        assert not (tmp_path / "out.zarr").exists()


def test_bad_episode_ranges(tmp_path, capsys):
    path = str(make_store(tmp_path / "s.zarr"))
    for spec, text in [("0-5", "out of range (the store has 3 episodes: 0-2)"),
                       ("2-1", "is decreasing"), ("a", "is not an episode id")]:
        code, _, err = run(["copy", path, str(tmp_path / "o.zarr"), "--episodes", spec], capsys)
        assert code == 2 and text in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o.zarr").exists()


def test_real_command_line(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    corrupt("nan", tmp_path / "n.zarr")
    cmd = [sys.executable, "-m", "diffusion_policy.data.cli"]
    ok = subprocess.run(cmd + ["validate", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(cmd + ["validate", str(tmp_path / "n.zarr")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "NaN" in bad.stderr
