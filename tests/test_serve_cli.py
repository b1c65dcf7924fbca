"""The real ``dp-serve``: a child process serving a saved policy, killed (SIGKILL) under a connected
client that then reconnects to its restart; ``main`` stopped by SIGTERM; its one-line errors."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import torch
from test_serve import make_policy, window

from diffusion_policy import serve
from diffusion_policy.config import ServeConfig, compose
from diffusion_policy.policy import Policy
from diffusion_policy.serving.client import RemotePolicy
from diffusion_policy.serving.server import PolicyServer

STARTUP_S = 180  # importing torch and diffusers on two shared cores can take a while


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(policy_dir, port: int) -> subprocess.Popen:
    """``dp-serve`` in a child process, returned once it says where it serves."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DP_SERVE_TOKEN": "tok"}
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_policy.serve", f"checkpoint={policy_dir}",
                             f"port={port}", "device=cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    deadline = time.monotonic() + STARTUP_S
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("dp-serve: serving"):
            assert f"at ws://127.0.0.1:{port} (token: required; protocol 1)" in line, line
            return proc
    proc.kill()
    raise AssertionError("dp-serve did not start:\n" + "".join(lines))


def test_dp_serve_killed_under_a_client_which_reconnects_to_its_restart(tmp_path):
    """SIGKILL: the connection dies without a websocket close; the restarted server (here in this
    process, to spare a second start of torch) is found by the next request."""
    policy_dir = make_policy().save(tmp_path / "policy")
    policy = Policy.load(policy_dir)
    port = free_port()
    proc = start(policy_dir, port)
    try:
        client = RemotePolicy(f"ws://127.0.0.1:{port}", token="tok", seed=3, timeout_s=30)
        assert client.metadata["checkpoint"] == str(policy_dir) and client.metadata["predictor"] == "Policy"
        obs = window(2)
        want = policy.predict({"state": torch.from_numpy(obs["state"])}, generator=torch.Generator().manual_seed(3))
        assert np.array_equal(client.predict(obs), want.numpy())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with PolicyServer(policy, port=port, token="tok", checkpoint=str(policy_dir)):
        # the connection died with the process: this request reconnects (a new session seeded 3)
        assert np.array_equal(client.predict(obs), want.numpy())
        assert client.reconnects == 1
    client.close()


def test_dp_serve_main_serves_and_stops_on_sigterm(tmp_path, capsys):
    policy_dir = make_policy().save(tmp_path / "policy")
    port = free_port()
    seen = {}

    def robot():
        client = RemotePolicy(f"ws://127.0.0.1:{port}", seed=1, reconnect_attempts=100, reconnect_timeout_s=60)
        seen["chunk"] = client.predict(window(1))
        os.kill(os.getpid(), signal.SIGTERM)  # dp-serve's handler stops the server in the main thread
        client.reconnect_attempts, client.reconnect_timeout_s = 3, 0.5
        try:
            client.predict(window(1))
        except ConnectionError as e:  # the server closed the connection and is gone
            seen["after"] = str(e)
        client.close()

    thread = threading.Thread(target=robot)
    thread.start()
    assert serve.main([f"checkpoint={policy_dir}", f"port={port}", "device=cpu"]) == 0
    thread.join()
    want = Policy.load(policy_dir).predict({"state": torch.from_numpy(window(1)["state"])},
                                           generator=torch.Generator().manual_seed(1))
    assert np.array_equal(seen["chunk"], want.numpy())
    assert "no policy server reachable" in seen["after"]
    out = capsys.readouterr().out
    assert out.startswith(f"dp-serve: serving {policy_dir} (toy, diffusion 3 steps, Policy on cpu) at "
                          f"ws://127.0.0.1:{port} (token: none; protocol 1)\n")
    assert out.endswith("dp-serve: stopped\n")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert serve.main([f"checkpoint={tmp_path / 'nothing'}"]) == 2
    assert capsys.readouterr().err == f"dp-serve: checkpoint {str(tmp_path / 'nothing')!r}: no such directory\n"
    assert serve.main([f"checkpoint={tmp_path}", "port=70000"]) == 2
    assert capsys.readouterr().err == "dp-serve: port=70000 must be in [0, 65535]\n"
    assert serve.main(["checkpoint=x", "prot=1"]) == 2
    assert "prot" in capsys.readouterr().err
    assert serve.main(["--help"]) == 0
    assert "dp-serve checkpoint=" in capsys.readouterr().out


def test_serve_config_defaults_are_loopback_without_token():
    cfg = compose("serve", ["checkpoint=x"])
    assert cfg == ServeConfig(checkpoint="x")
    assert (cfg.host, cfg.port, cfg.token, cfg.max_message_bytes) == ("127.0.0.1", 8765, "", 16 * 2**20)


def test_cpu_predictor_is_the_policy_or_its_compiled_fast_path():
    from diffusion_policy.inference import FastPredictor

    policy = make_policy()
    assert serve.build_predictor(policy, ServeConfig(checkpoint="x")) is policy
    fast = serve.build_predictor(policy, ServeConfig(checkpoint="x", compile=True))
    assert isinstance(fast, FastPredictor) and fast.policy is policy and not fast.cuda_graph
