"""``RemotePolicy``: a policy served by ``dp-serve``, called like a local one.

    from diffusion_policy.serving.client import RemotePolicy
    policy = RemotePolicy("ws://gpu-box:8765", token="s3cret", timeout_s=1.0, seed=0)
    policy.metadata["control_rate_hz"], policy.n_obs_steps, policy.horizon      # from the handshake
    chunk = policy.predict({"state": window})       # window (B, To, 6) float32 -> (B, H, Da) float32
    policy.last_timings                             # round trip, server decode/queue/inference, transport

It needs numpy, msgpack and websockets only (no torch, nothing else of this package), so it drops
into any robot codebase: copy ``client.py`` and ``protocol.py``, or install the package and
import this module. It is a drop-in for the receding-horizon controller
(``RecedingHorizonController(RemotePolicy(...))``): it has the attributes the controller reads
(``horizon``, ``n_obs_steps``, ``n_action_steps``, ``obs_keys``, ``action_dim``, ``shapes``).

Randomness: a ``torch.Generator`` cannot travel over the wire, so ``predict`` refuses one (and a
list of them) with a ``TypeError``. The server keeps one sampler generator per connection, seeded
with ``seed`` at the handshake (random when None, reported as ``session_seed``): the k-th chunk of
a connection is what ``Policy.predict`` returns for the same window with a generator seeded
``seed`` after k-1 calls. ``predict(..., seed=s)`` samples one chunk from a fresh generator seeded
``s`` (as ``predict(obs, generator=torch.Generator().manual_seed(s))`` locally), and
:meth:`reset` re-seeds the session for a new episode.

Failures: every request has a deadline (``timeout_s``; :class:`RemoteTimeoutError`). When the
connection drops (server restarted), the next request reconnects with exponential backoff, at most
``reconnect_attempts`` tries over at most ``reconnect_timeout_s``, handshakes again (a new session
with the same seed rule) and is sent again once; a server that now serves another policy (other
metadata) is refused (:class:`RemoteError`). An error reply raises :class:`RemoteRequestError` (a
``ValueError``) for a request the server refused, :class:`RemoteError` otherwise.

Observations: low-dimensional floating arrays are cast to float32 (the policy's normalizer casts
them to float32 first anyway); images must be uint8 and nothing else is converted: a wrong key,
shape or dtype comes back as a ``RemoteRequestError`` naming it, and so does a window with NaN or
inf in it (a local ``Policy.predict`` would return a NaN chunk). Torch tensors are accepted (read
through ``.detach().cpu().numpy()``). One request runs at a time per client (a lock): a control
loop's inference thread and its main thread may share one.
"""
from __future__ import annotations

import itertools
import threading
import time

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import connect

from diffusion_policy.serving import protocol as P

# metadata fields that may differ between two runs of the same policy's server (the checkpoint
# path is not one: another checkpoint of the same config is another policy)
VOLATILE = ("device", "predictor")


class RemoteError(RuntimeError):
    """The server answered with an error (``code``: one of protocol.ERROR_CODES) or cannot be used."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class RemoteRequestError(RemoteError, ValueError):
    """The server refused a request: a field or observation that does not match its policy."""


class RemoteTimeoutError(TimeoutError):
    """No reply within the request timeout."""


class RemotePolicy:
    """A policy behind ``dp-serve`` at ``url`` (``ws://host:port``).

    Args:
        url: the server, ``ws://host:port``.
        token: the server's shared token (None when it has none).
        timeout_s: deadline of each request (and of connecting).
        max_message_bytes: largest message sent or received (checked before decoding).
        seed: seed of the session's sampler generator (None: the server draws one).
        reconnect_attempts, reconnect_timeout_s: bound on reconnecting after a dropped connection.
        backoff_s, max_backoff_s: first wait between attempts, doubled each time up to the maximum.
    """

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 5.0,
                 max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES, seed: int | None = None,
                 reconnect_attempts: int = 8, reconnect_timeout_s: float = 10.0, backoff_s: float = 0.05,
                 max_backoff_s: float = 1.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if reconnect_attempts < 1:
            raise ValueError(f"reconnect_attempts must be >= 1, got {reconnect_attempts}")
        self.url, self.token, self.timeout_s = url, token, float(timeout_s)
        self.max_message_bytes = int(max_message_bytes)
        self.seed = seed
        self.reconnect_attempts, self.reconnect_timeout_s = int(reconnect_attempts), float(reconnect_timeout_s)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.metadata: dict = {}
        self.session: dict = {}
        self.reconnects = 0  # successful connections after the first
        self.last_timings: dict = {}
        self._ids = itertools.count(1)
        self._conn = None
        self._lock = threading.Lock()  # one request at a time (a control loop's worker and its main thread)
        self._connect()
        m = self.metadata
        self.obs_keys: list = list(m["obs_keys"])
        self.image_keys: list = list(m["image_keys"])
        self.shapes: dict = {k: tuple(v) for k, v in m["shapes"].items()}
        self.dtypes: dict = dict(m["dtypes"])
        self.action_dim: int = int(m["action_dim"])
        self.horizon: int = int(m["horizon"])
        self.n_obs_steps: int = int(m["n_obs_steps"])
        self.n_action_steps: int = int(m["n_action_steps"])
        self.control_rate_hz: float = float(m["control_rate_hz"])

    @property
    def session_seed(self) -> int:
        """The seed of the current session's generator (the server's choice when ``seed`` is None)."""
        return int(self.session["seed"])

    # ------------------------------------------------------------------------------ connection
    def _open(self) -> None:
        """One connection attempt and handshake; raises OSError/ConnectionClosed to be retried."""
        # legacy=True: the connection itself (websockets >= 17 otherwise yields it from a context)
        conn = connect(self.url, open_timeout=self.timeout_s, close_timeout=1.0, compression=None,
                       max_size=self.max_message_bytes, legacy=True)
        try:
            conn.send(P.pack({"type": "hello", "version": P.PROTOCOL_VERSION, "token": self.token,
                              "seed": self.seed, "client": "diffusion_policy.serving.client"}))
            reply = self._recv(conn, time.monotonic() + self.timeout_s, None)
        except BaseException:
            conn.close()
            raise
        if reply["type"] != "welcome" or reply.get("version") != P.PROTOCOL_VERSION:
            conn.close()
            raise RemoteError(f"{self.url}: expected a welcome of protocol version {P.PROTOCOL_VERSION}, "
                              f"got {reply['type']!r} (version {reply.get('version')!r})", "handshake")
        meta = reply["metadata"]
        if self.metadata:
            changed = sorted(k for k in set(meta) | set(self.metadata)
                             if k not in VOLATILE and meta.get(k) != self.metadata.get(k))
            if changed:
                conn.close()
                raise RemoteError(f"{self.url}: after reconnecting the server serves another policy "
                                  f"(metadata {changed} changed); refusing to use it", "handshake")
        if self.metadata:
            self.reconnects += 1
        self.metadata, self.session, self._conn = meta, reply["session"], conn

    def _connect(self) -> None:
        """Connect (or reconnect), retrying with exponential backoff within the bounds."""
        start, delay, last = time.monotonic(), self.backoff_s, None
        for attempt in range(self.reconnect_attempts):
            try:
                self._open()
                return
            except (OSError, ConnectionClosed, InvalidHandshake) as e:  # refused, reset, server closing
                last = e
            except InvalidURI as e:
                raise ValueError(f"url {self.url!r}: {e}") from None
            left = self.reconnect_timeout_s - (time.monotonic() - start)
            if attempt == self.reconnect_attempts - 1 or left <= 0:
                break
            time.sleep(min(delay, left))
            delay = min(2 * delay, self.max_backoff_s)
        raise ConnectionError(f"{self.url}: no policy server reachable after {attempt + 1} attempts over "
                              f"{time.monotonic() - start:.1f} s (last error: {type(last).__name__}: {last})")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _recv(self, conn, deadline: float, request_id) -> dict:
        """The reply to ``request_id`` (None: the next message); older replies (of requests that
        timed out) are skipped. An error reply raises."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteTimeoutError(f"{self.url}: no reply within timeout_s={self.timeout_s}")
            try:
                data = conn.recv(timeout=left)
            except TimeoutError:
                raise RemoteTimeoutError(f"{self.url}: no reply within timeout_s={self.timeout_s}") from None
            msg = P.unpack(data, self.max_message_bytes)
            # a reply to an older request that timed out; an error without an id (the server could
            # not read the request, e.g. too large for its own limit) is this request's
            if request_id is not None and msg.get("id") != request_id and not (
                    msg["type"] == "error" and msg.get("id") is None):
                continue
            if msg["type"] == "error":
                code, text = msg.get("code", ""), f"{self.url}: {msg.get('code')}: {msg.get('message')}"
                if code in ("bad_request", "unknown_type", "malformed", "too_large"):
                    raise RemoteRequestError(text, code)
                raise RemoteError(text, code)
            return msg

    def _request(self, msg: dict) -> dict:
        with self._lock:
            return self._exchange(msg)

    def _exchange(self, msg: dict) -> dict:
        msg["id"] = next(self._ids)
        data = P.pack(msg)
        if len(data) > self.max_message_bytes:
            raise ValueError(f"{msg['type']} request of {len(data)} bytes exceeds max_message_bytes="
                             f"{self.max_message_bytes}")
        for attempt in range(2):  # once more after a reconnect: predict and reset are idempotent
            if self._conn is None:
                self._connect()
            try:
                self._conn.send(data)
                return self._recv(self._conn, time.monotonic() + self.timeout_s, msg["id"])
            except ConnectionClosed as e:
                self._conn = None
                if e.sent is not None and e.sent.code == 1009:  # we refused an oversized reply
                    raise RemoteError(f"{self.url}: a reply exceeded max_message_bytes="
                                      f"{self.max_message_bytes}", "too_large") from None
                if attempt:
                    raise ConnectionError(f"{self.url}: connection lost again after reconnecting "
                                          f"({e})") from None

    # ------------------------------------------------------------------------------ policy calls
    def predict(self, obs: dict, num_steps: int | None = None, generator=None, prefix=None,
                prefix_weights=None, seed: int | None = None, max_guidance: float | None = None) -> np.ndarray:
        """``(B, H, Da)`` float32 action chunks for observation windows ``{key: (B, To, ...)}``.

        As ``Policy.predict``: ``num_steps`` sampler steps (None: the policy's), ``prefix (B, P, Da)``
        actions the chunk must start with (inpainted); ``prefix_weights`` ``(H,)`` or ``(B, H)``:
        instead, guided inpainting toward the prefix with this soft mask (real-time chunking; the
        server's ``guidance.predict_guided``, e.g. weights ``rtc_weights(H, d, s, start=To - 1)``),
        with ``max_guidance`` (None: that function's default); ``seed``: this chunk from a fresh
        generator seeded so. ``generator`` must be None (module docstring).
        """
        if generator is not None:
            raise TypeError("RemotePolicy.predict: a torch.Generator cannot be sent to the server; the "
                            "server keeps one sampler generator per connection (RemotePolicy(seed=...), "
                            "reset(seed=...)) or seeds one chunk with predict(..., seed=...): pass "
                            "generator=None")
        msg = {"type": "predict", "obs": {k: self._array(k, v) for k, v in obs.items()},
               "num_steps": num_steps, "seed": seed}
        if prefix is not None:
            msg["prefix"] = np.asarray(_numpy(prefix), dtype=np.float32)
        if prefix_weights is not None:
            msg["prefix_weights"] = np.asarray(_numpy(prefix_weights), dtype=np.float32)
        if max_guidance is not None:
            msg["max_guidance"] = float(max_guidance)
        t0 = time.perf_counter()
        reply = self._request(msg)
        rtt = (time.perf_counter() - t0) * 1e3
        server = reply["timings"]
        self.last_timings = {"round_trip_ms": rtt, **{f"server_{k}": v for k, v in server.items()},
                             "transport_ms": rtt - sum(server.values())}
        return reply["actions"]

    def _array(self, key, value) -> np.ndarray:
        arr = _numpy(value)
        if key not in self.image_keys and arr.dtype.kind == "f" and arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        return arr

    def reset(self, seed: int | None = None) -> int:
        """Start a new episode on this connection: re-seed its generator (None: the server draws a
        seed) and zero its request count; returns the seed."""
        reply = self._request({"type": "reset", "seed": seed})
        if seed is not None:
            self.seed = seed  # a reconnect re-seeds the new session with it
        self.session = {**self.session, "seed": reply["seed"]}
        return int(reply["seed"])

    def eval(self) -> RemotePolicy:
        return self  # the evaluation job calls policy.eval()


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)
