"""dp-serve over loopback: served chunks equal local ones, the handshake, sessions, errors, reconnects.

A tiny MLP policy (untrained: sampling is deterministic given the noise, which is all these tests
need) is served from a background thread of this process; tests/test_serve_cli.py runs the real
``dp-serve`` process and kills it.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
import time

import numpy as np
import pytest
import torch
from websockets.sync.client import connect

from diffusion_policy.config import MethodConfig, PolicyConfig, TaskConfig
from diffusion_policy.control import RecedingHorizonController
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.policy import Policy
from diffusion_policy.serving import protocol as P
from diffusion_policy.serving.client import RemoteError, RemotePolicy, RemoteRequestError, RemoteTimeoutError
from diffusion_policy.serving.server import PolicyServer

H, TO, TA, DA, D = 8, 2, 4, 2, 5
LIMIT = 64 * 1024  # max_message_bytes of the test servers


def make_policy(seed: int = 0, steps: int = 3) -> Policy:
    torch.manual_seed(seed)
    task = TaskConfig(name="toy", env_id="none", obs_keys=["state"], horizon=H, n_obs_steps=TO,
                      n_action_steps=TA, fps=12.5)
    rng = np.random.default_rng(0)
    arrays = {"state": rng.uniform(-3, 3, (200, D)), "action": rng.uniform(-1, 2, (200, DA))}
    normalizer = Normalizer.fit(arrays, {k: "minmax" for k in arrays})
    return Policy.build(task, PolicyConfig(name="mlp", hidden_dims=[32, 32]),
                        MethodConfig(name="diffusion", scheduler="ddim", num_inference_steps=steps),
                        normalizer, {"state": (D,)}, DA).eval()


@pytest.fixture(scope="module")
def policy():
    return make_policy()


@pytest.fixture
def server(policy):
    with PolicyServer(policy, port=0, max_message_bytes=LIMIT) as srv:
        yield srv


def window(B: int = 1, seed: int = 1) -> dict:
    return {"state": np.random.default_rng(seed).uniform(-3, 3, (B, TO, D)).astype(np.float32)}


def local(policy, obs, generator, **kw) -> np.ndarray:
    return policy.predict({k: torch.from_numpy(v) for k, v in obs.items()}, generator=generator, **kw).numpy()


def raw(url, hello: dict | None = None):
    """A websocket that has said hello (or ``hello``) and read the welcome."""
    conn = connect(url, compression=None, max_size=None, legacy=True)
    conn.send(P.pack(hello or {"type": "hello", "version": P.PROTOCOL_VERSION}))
    return conn, P.unpack(conn.recv(timeout=10), 2**30)


def ask(conn, data) -> dict:
    conn.send(data)
    return P.unpack(conn.recv(timeout=10), 2**30)


def predict_msg(obs, **kw) -> bytes:
    return P.pack({"type": "predict", "id": 7, "obs": obs, **kw})


# ---------------------------------------------------------------------------------- wire format
def test_arrays_round_trip_and_objects_are_refused():
    for arr in (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[1, 2]], dtype=">i4"),
                np.zeros((2, 0, 3), np.uint8), np.array([True, False])):
        out = P.unpack(P.pack({"type": "x", "a": arr}), 2**20)["a"]
        assert out.dtype == arr.dtype.newbyteorder("<") and out.shape == arr.shape and np.array_equal(out, arr)
        assert out.flags.writeable
    with pytest.raises(P.ProtocolError, match="dtype '\\|O' cannot travel"):
        P.pack({"type": "x", "a": np.array([{}, None], dtype=object)})
    with pytest.raises(TypeError, match="cannot serialize set"):
        P.pack({"type": "x", "a": {1, 2}})
    fake = {"__ndarray__": True, "dtype": "|O", "shape": [1], "data": b"\0" * 8}
    with pytest.raises(P.ProtocolError, match="x.a: dtype '\\|O' cannot travel"):
        P.unpack(P.pack({"type": "x", "a": fake}), 2**20)
    short = {"__ndarray__": True, "dtype": "<f4", "shape": [2, 2], "data": b"\0" * 12}
    with pytest.raises(P.ProtocolError,
                       match="x.a: 12 bytes of data for shape \\[2, 2\\] and dtype '<f4', expected 16"):
        P.unpack(P.pack({"type": "x", "a": short}), 2**20)
    with pytest.raises(P.ProtocolError, match="message of 101 bytes exceeds max_message_bytes=100"):
        P.unpack(b"\0" * 101, 100)


# ---------------------------------------------------------------------------------- handshake
def test_client_is_torch_free_in_a_fresh_interpreter():
    import subprocess
    import sys

    code = ("import sys, diffusion_policy.serving.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusion_policy', 'envs')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["diffusion_policy", "diffusion_policy.serving", "diffusion_policy.serving.client",
                         "diffusion_policy.serving.protocol"]


def test_handshake_metadata_is_the_policys(server, policy):
    stats = policy.normalizer.stats["action"]
    with RemotePolicy(server.url, seed=11) as client:
        assert client.metadata == {
            "obs_keys": ["state"], "image_keys": [], "shapes": {"state": [D]}, "dtypes": {"state": "float32"},
            "action_key": "action", "action_dim": DA,
            "action_min": stats.min.tolist(), "action_max": stats.max.tolist(),
            "n_obs_steps": TO, "horizon": H, "n_action_steps": TA, "control_rate_hz": 12.5,
            "task": "toy", "env_id": "none", "method": "diffusion", "scheduler": "ddim", "integrator": None,
            "num_inference_steps": 3, "stochastic": False, "net": "mlp", "predictor": "Policy",
            "device": "cpu", "checkpoint": "", "max_message_bytes": LIMIT,
            "prefix_weights": importlib.util.find_spec("diffusion_policy.methods.guidance") is not None,
        }
        # the training actions' range, as the normalizer fitted it
        rng = np.random.default_rng(0)
        rng.uniform(-3, 3, (200, D))
        assert np.allclose(client.metadata["action_min"], rng.uniform(-1, 2, (200, DA)).min(0), atol=1e-6)
        assert (client.horizon, client.n_obs_steps, client.n_action_steps, client.obs_keys, client.action_dim,
                client.shapes, client.control_rate_hz) == (H, TO, TA, ["state"], DA, {"state": (D,)}, 12.5)
        assert client.session_seed == 11


# ---------------------------------------------------------------------------------- chunks
def test_served_chunk_equals_local_predict(server, policy):
    obs3 = window(3)
    with RemotePolicy(server.url, seed=5) as client:
        # seed per request: a fresh generator seeded so
        assert np.array_equal(client.predict(obs3, seed=42), local(policy, obs3, torch.Generator().manual_seed(42)))
        # session generator: seeded at the handshake, advanced by each request
        g = torch.Generator().manual_seed(5)
        for seed in (2, 3):
            assert np.array_equal(client.predict(window(1, seed)), local(policy, window(1, seed), g))
        # num_steps and an inpainted prefix travel too
        prefix = np.random.default_rng(3).uniform(-1, 2, (3, 2, DA)).astype(np.float32)
        got = client.predict(obs3, num_steps=2, prefix=prefix, seed=9)
        want = local(policy, obs3, torch.Generator().manual_seed(9), num_steps=2, prefix=torch.from_numpy(prefix))
        assert np.array_equal(got, want) and np.allclose(got[:, :2], prefix, atol=1e-6)  # normalized and back
        assert got.dtype == np.float32 and got.shape == (3, H, DA)
        # torch tensors and float64 windows are read as the policy reads them (cast to float32)
        t64 = torch.from_numpy(obs3["state"].astype(np.float64))
        want = local(policy, obs3, torch.Generator().manual_seed(42))
        assert np.array_equal(client.predict({"state": t64}, seed=42), want)
        t = client.last_timings
        assert set(t) == {"round_trip_ms", "server_decode_ms", "server_queue_ms", "server_inference_ms", "transport_ms"}
        assert t["round_trip_ms"] >= t["server_inference_ms"] > 0
        assert t["transport_ms"] == pytest.approx(t["round_trip_ms"] - t["server_decode_ms"] - t["server_queue_ms"]
                                                  - t["server_inference_ms"])


def test_guided_inpainting_is_served_as_predict_guided(server, policy):
    """prefix_weights: real-time chunking's soft mask, through guidance.predict_guided on the server."""
    from diffusion_policy.methods.guidance import predict_guided, rtc_weights

    obs = window(2)
    prefix = np.random.default_rng(6).uniform(-1, 2, (2, 5, DA)).astype(np.float32)
    weights = rtc_weights(H, delay=2, exec_horizon=3, start=TO - 1).float().numpy()  # nonzero on [0, 5)
    torch_obs = {k: torch.from_numpy(v) for k, v in obs.items()}
    with RemotePolicy(server.url) as client:
        assert client.metadata["prefix_weights"] is True
        for kw in ({}, {"max_guidance": 2.0}):
            got = client.predict(obs, prefix=prefix, prefix_weights=weights, seed=4, **kw)
            want = predict_guided(policy, torch_obs, torch.from_numpy(prefix), torch.from_numpy(weights),
                                  generator=torch.Generator().manual_seed(4), **kw).numpy()
            assert np.array_equal(got, want)
        plain = client.predict(obs, prefix=prefix, seed=4)
        assert not np.allclose(plain, got)  # guidance is not the plain replacement of the prefix
        with pytest.raises(RemoteRequestError, match="weights has shape \\(3,\\), expected \\(8,\\) or \\(2, 8\\)"):
            client.predict(obs, prefix=prefix, prefix_weights=weights[:3], seed=4)
        with pytest.raises(RemoteRequestError, match="predict: prefix_weights needs a prefix"):
            client.predict(obs, prefix_weights=weights)


def test_images_travel_as_uint8_and_ddpm_draws_from_the_session(policy):
    """A camera policy: uint8 (B, To, H, W, 3) windows; DDPM draws noise at every step, from the
    session generator as the local call does from its own."""
    from diffusion_policy.config import ObsEncoderConfig

    torch.manual_seed(0)
    task = TaskConfig(name="toy_image", env_id="none", obs_keys=["image", "pos"], image_keys=["image"],
                      horizon=H, n_obs_steps=TO, n_action_steps=TA)
    rng = np.random.default_rng(0)
    normalizer = Normalizer.fit({"pos": rng.normal(size=(50, 2)), "action": rng.normal(size=(50, DA))},
                                {"pos": "minmax", "action": "minmax", "image": "image"})
    cfg = PolicyConfig(name="mlp", hidden_dims=[32, 32],
                       obs_encoder=ObsEncoderConfig(image_feature_dim=8, backbone_width=8))
    camera = Policy.build(task, cfg, MethodConfig(name="diffusion", scheduler="ddpm", num_inference_steps=4),
                          normalizer, {"image": (16, 16, 3), "pos": (2,)}, DA).eval()
    obs = {"image": rng.integers(0, 256, (2, TO, 16, 16, 3), dtype=np.uint8),
           "pos": rng.normal(size=(2, TO, 2)).astype(np.float32)}
    with PolicyServer(camera, port=0) as srv, RemotePolicy(srv.url, seed=6) as client:
        assert client.metadata["dtypes"] == {"image": "uint8", "pos": "float32"}
        assert client.metadata["stochastic"] is True and client.image_keys == ["image"]
        g = torch.Generator().manual_seed(6)
        for _ in range(2):
            assert np.array_equal(client.predict(obs), local(camera, obs, g))
        with pytest.raises(RemoteRequestError, match="obs\\['image'\\] has dtype float32, expected uint8"):
            client.predict({**obs, "image": obs["image"].astype(np.float32)})


def test_generators_are_refused_clearly(server):
    with RemotePolicy(server.url) as client:
        for gen in (torch.Generator(), [torch.Generator(), torch.Generator()]):
            with pytest.raises(TypeError, match="a torch.Generator cannot be sent to the server"):
                client.predict(window(), generator=gen)


def test_controller_drives_a_remote_policy_as_a_local_one(server, policy):
    """The controller's shared-generator path: the remote session generator seeded s plays the role
    of the local generator seeded s, chunk after chunk."""
    states = np.random.default_rng(4).uniform(-3, 3, (10, 2, D)).astype(np.float32)  # 10 steps, 2 envs
    with RemotePolicy(server.url, seed=21) as client:
        remote = RecedingHorizonController(client, n_envs=2)
        mine = RecedingHorizonController(policy, n_envs=2, generator=torch.Generator().manual_seed(21))
        for s in states:
            assert np.array_equal(remote.act({"state": s}), mine.act({"state": s}))
        # per-episode torch generators cannot travel: the controller's list attempt is caught, the
        # one-by-one fallback raises the client's error
        remote.reset(generator=torch.Generator().manual_seed(0))
        with pytest.raises(TypeError, match="cannot be sent to the server"):
            remote.act({"state": states[0]})


def test_two_clients_have_their_own_sessions(server, policy):
    a, b = RemotePolicy(server.url, seed=1), RemotePolicy(server.url, seed=2)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    obs = window(1)
    results = {"a": [], "b": []}

    def run(client, name):
        for _ in range(4):
            results[name].append(client.predict(obs))

    threads = [threading.Thread(target=run, args=(a, "a")), threading.Thread(target=run, args=(b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, g in (("a", ga), ("b", gb)):
        for got in results[name]:
            assert np.array_equal(got, local(policy, obs, g))
    assert a.session["id"] != b.session["id"]
    # reset: a new episode from the seed again; b is untouched
    assert a.reset(seed=1) == 1
    assert np.array_equal(a.predict(obs), local(policy, obs, torch.Generator().manual_seed(1)))
    assert np.array_equal(b.predict(obs), local(policy, obs, gb))
    a.close()
    b.close()


# ---------------------------------------------------------------------------------- errors
def test_bad_requests_get_error_replies_and_the_server_keeps_serving(server, policy):
    other = RemotePolicy(server.url, seed=3)
    g = torch.Generator().manual_seed(3)
    conn, welcome = raw(server.url)
    assert welcome["type"] == "welcome" and welcome["metadata"] == other.metadata
    obs = window(1)
    f64 = {"state": obs["state"].astype(np.float64)}
    nan = {"state": np.full((1, TO, D), np.nan, np.float32)}
    cases = [
        (b"\xc1\x00garbage", None, "malformed", "not a msgpack message (FormatError"),
        ("a text frame", None, "malformed", "got a text websocket message; expected a binary msgpack one"),
        (b"\0" * (LIMIT + 1), None, "too_large", f"message of {LIMIT + 1} bytes exceeds max_message_bytes={LIMIT}"),
        (P.pack([1, 2]), None, "malformed", "a message must be a msgpack map with a string 'type'"),
        (P.pack({"type": "teleport", "id": 7}), 7, "unknown_type",
         "unknown request type 'teleport'; expected one of ['predict', 'reset']"),
        (predict_msg(obs, extra=1), 7, "bad_request",
         "predict: unknown fields ['extra']; expected ['id', 'max_guidance', 'num_steps', 'obs', 'prefix', "
         "'prefix_weights', 'seed', 'type']"),
        (predict_msg({"pos": obs["state"]}), 7, "bad_request",
         "predict: obs keys ['pos'] do not match the policy's obs_keys ['state'] (missing ['state'], "
         "unexpected ['pos'])"),
        (predict_msg({"state": obs["state"][:, :1]}), 7, "bad_request",
         "predict: obs['state'] has shape (1, 1, 5), expected (B, To=2, 5)"),
        (predict_msg({"state": obs["state"][..., :4]}), 7, "bad_request",
         "predict: obs['state'] has shape (1, 2, 4), expected (B, To=2, 5)"),
        (predict_msg(f64), 7, "bad_request", "predict: obs['state'] has dtype float64, expected float32"),
        (predict_msg(nan), 7, "bad_request", "predict: obs['state'] contains NaN/inf"),
        (predict_msg(obs, num_steps=0), 7, "bad_request",
         "predict: num_steps must be a positive integer or null, got 0"),
        (predict_msg(obs, num_steps=500), 7, "bad_request",
         "ValueError: num_"),  # the method refuses more steps than it was trained with
        (predict_msg(obs, prefix=np.zeros((1, H + 1, DA), np.float32)), 7, "bad_request",
         "predict: prefix must be float32 (B=1, P <= H=8, Da=2), got float32 array of shape (1, 9, 2)"),
        (predict_msg(obs, seed=-1), 7, "bad_request", "predict: seed must be an integer in [0, 2**63) or null, got -1"),
        (P.pack({"type": "hello", "version": 1}), None, "unknown_type",
         "unknown request type 'hello'; expected one of ['predict', 'reset']"),
    ]
    for data, rid, code, message in cases:
        reply = ask(conn, data)
        assert (reply["type"], reply["code"], reply["id"]) == ("error", code, rid), (message, reply)
        assert reply["message"].startswith(message), (message, reply["message"])
        # the same connection and another client are still served
        assert ask(conn, predict_msg(obs, seed=4))["type"] == "chunk"
        assert np.array_equal(other.predict(obs), local(policy, obs, g))
    conn.close()
    # the client turns an error reply into an exception naming the problem
    with pytest.raises(RemoteRequestError,
                       match="bad_request: predict: obs\\['state'\\] has dtype int64, expected float32"):
        other.predict({"state": np.zeros((1, TO, D), np.int64)})
    with pytest.raises(ValueError, match=f"predict request of \\d+ bytes exceeds max_message_bytes={LIMIT}"):
        RemotePolicy(server.url, max_message_bytes=LIMIT).predict({"state": np.zeros((1, TO, 10000), np.float32)})
    # a client with a larger limit than the server's: the server's error reply (it has no request id)
    big = RemotePolicy(server.url, max_message_bytes=4 * LIMIT)
    with pytest.raises(RemoteRequestError, match=f"too_large: message of \\d+ bytes exceeds max_message_bytes={LIMIT}"):
        big.predict({"state": np.zeros((1, TO, 10000), np.float32)})  # 80 KB
    big.close()
    other.close()


def test_handshake_errors_close_only_that_connection(policy):
    with PolicyServer(policy, port=0, token="s3cret", max_clients=3) as srv:
        good = RemotePolicy(srv.url, token="s3cret", seed=0)
        hello = {"type": "hello", "version": P.PROTOCOL_VERSION}
        cases = [
            ({**hello, "version": 99}, "version", "protocol version 99 is not supported; this server speaks version 1"),
            (hello, "unauthorized", "this server requires a token; none was given"),
            ({**hello, "token": "s3cres"}, "unauthorized", "wrong token"),
            ({"type": "predict", "id": 1}, "handshake", "the first message must be 'hello', got 'predict'"),
            ({**hello, "token": "s3cret", "seed": "x"}, "handshake",
             "bad hello: seed must be an integer in [0, 2**63) or null, got 'x'"),
        ]
        for msg, code, message in cases:
            conn, reply = raw(srv.url, msg)
            assert (reply["type"], reply["code"], reply["message"]) == ("error", code, message)
            with pytest.raises(Exception, match="received 100[28]"):  # closed: policy violation / protocol error
                conn.recv(timeout=5)
            assert good.predict(window(), seed=1).shape == (1, H, DA)
        with pytest.raises(RemoteError, match="unauthorized: wrong token") as e:
            RemotePolicy(srv.url, token="nope")
        assert e.value.code == "unauthorized"
        # max_clients=3: good + two more; the fourth is told so (once the refused ones are gone)
        deadline = time.monotonic() + 5
        while srv._clients != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        extra = [RemotePolicy(srv.url, token="s3cret") for _ in range(2)]
        with pytest.raises(RemoteError, match="server_full: this server already serves max_clients=3"):
            RemotePolicy(srv.url, token="s3cret")
        for c in extra + [good]:
            c.close()


def test_open_interfaces_without_token_warn_loudly(policy, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusion_policy.serving"):
        PolicyServer(policy, host="0.0.0.0", port=0).bind().close()
        assert "listening on 0.0.0.0 (all interfaces) WITHOUT A TOKEN" in caplog.text
        caplog.clear()
        PolicyServer(policy, host="0.0.0.0", port=0, token="t").bind().close()
        PolicyServer(policy, host="127.0.0.1", port=0).bind().close()
        assert caplog.text == ""


class Slow:
    """The policy, with the first ``n`` calls delayed by ``delay_s``."""

    def __init__(self, policy, delay_s: float, n: int = 1):
        self.policy, self.delay_s, self.n = policy, delay_s, n

    def predict(self, *args, **kwargs):
        if self.n > 0:
            self.n -= 1
            time.sleep(self.delay_s)
        return self.policy.predict(*args, **kwargs)


def test_request_timeout_raises_and_the_late_reply_is_skipped(policy):
    with PolicyServer(policy, Slow(policy, 0.6), port=0) as srv:
        client = RemotePolicy(srv.url, timeout_s=0.2)
        t0 = time.perf_counter()
        with pytest.raises(RemoteTimeoutError, match="no reply within timeout_s=0.2"):
            client.predict(window(), seed=1)
        assert 0.2 <= time.perf_counter() - t0 < 0.5
        time.sleep(0.6)  # the late chunk of seed 1 arrives now and must not answer the next request
        want = local(policy, window(), torch.Generator().manual_seed(2))
        assert np.array_equal(client.predict(window(), seed=2), want)
        client.close()


def test_client_reconnects_after_a_server_restart(policy):
    srv = PolicyServer(policy, port=0).start()
    port = srv.port
    client = RemotePolicy(srv.url, seed=8, reconnect_attempts=4, reconnect_timeout_s=1.0, backoff_s=0.05)
    obs = window(1)
    assert np.array_equal(client.predict(obs), local(policy, obs, torch.Generator().manual_seed(8)))
    srv.close()
    # nobody listening: bounded attempts, then a clear error
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"ws://127.0.0.1:{port}: no policy server reachable after 4 attempts"):
        client.predict(obs)
    assert time.perf_counter() - t0 < 2.0
    srv = PolicyServer(policy, port=port).start()
    # a new session, seeded as the first: the same chunk again
    assert np.array_equal(client.predict(obs), local(policy, obs, torch.Generator().manual_seed(8)))
    srv.close()
    # restarted with another policy: refused, not silently used
    srv = PolicyServer(make_policy(steps=4), port=port).start()
    changed = "after reconnecting the server serves another policy \\(metadata \\['num_inference_steps'\\] changed\\)"
    with pytest.raises(RemoteError, match=changed):
        client.predict(obs)
    srv.close()
    # the same config from another checkpoint is another policy too
    with PolicyServer(policy, port=port, checkpoint="runs/x/checkpoints/step_0000200/policy"):
        with pytest.raises(RemoteError, match="metadata \\['checkpoint'\\] changed"):
            client.predict(obs)
    assert client.reconnects == 1
