"""A writer killed with SIGKILL at random moments leaves a store with only complete episodes, every
one of them matching the digest recorded when it was appended."""
import os
import signal
import subprocess
import sys
import time

import numpy as np

from diffusion_policy.data.cli import validate_store
from diffusion_policy.data.store import EpisodeStore

WRITER = r"""
import sys
import numpy as np
from diffusion_policy.data.store import EpisodeStore

store = EpisodeStore.open(sys.argv[1], mode="a")
print("ready", flush=True)
while True:
    i = store.n_episodes
    n = 3 + (i * 5) % 11
    t = np.arange(n)
    store.add_episode({
        "action": np.stack([np.full(n, i), t], 1).astype(np.float32),
        "image": np.full((n, 32, 32, 3), i % 251, np.uint8),
    })
"""


def check_visible(path) -> int:
    """Every visible episode is complete and intact; returns the number of episodes."""
    store = EpisodeStore.open(path)
    for i in range(store.n_episodes):
        ep = store.get_episode(i)
        n = 3 + (i * 5) % 11
        assert len(ep["action"]) == n, f"episode {i}: length {len(ep['action'])}, expected {n}"
        np.testing.assert_array_equal(ep["action"][:, 0], i)
        np.testing.assert_array_equal(ep["action"][:, 1], np.arange(n))
        assert (ep["image"] == i % 251).all(), f"episode {i}: image damaged"
    errors, _ = validate_store(path, checksums=True)
    assert not errors, errors
    return store.n_episodes


def test_sigkill_during_appends(tmp_path):
    path = tmp_path / "crash.zarr"
    EpisodeStore.create(path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                                env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.02, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts.append(check_visible(path))
    assert counts[-1] > 0 and counts == sorted(counts)
