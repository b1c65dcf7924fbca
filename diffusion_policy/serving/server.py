"""The policy server behind ``dp-serve``: one policy, many robot clients, over websockets.

    server = PolicyServer(policy, host="127.0.0.1", port=8765, token="s3cret").start()
    ...                                   # clients: diffusion_policy.serving.client.RemotePolicy
    server.close()

Each connection is one robot episode stream with its own session (:class:`Session`): a sampler
generator seeded at the handshake (by the client's seed or a fresh random one, sent back in the
``welcome``), a request counter, and a ``reset``. The client always sends the whole observation
window ``{key: (B, To, ...)}``: the server keeps no history, so it cannot drop any (LeRobot's
server keeps only the newest frame and breaks policies with ``To > 1``).

Concurrency: the websocket library runs one thread per connection; decoding and checking happen
there, in parallel. The policy itself runs under one lock, one request at a time, because
- a :class:`~diffusion_policy.inference.FastPredictor` replays CUDA graphs from static input and
  output buffers: two overlapping replays would overwrite each other's observations and chunks;
- the methods copy their scheduler per call (``DiffusionMethod.sample``), but the networks keep
  tables between calls (the UNet's sampling tables) and the methods fill caches;
- on a CPU two concurrent calls only split the same cores, and on one GPU they would queue anyway.
The time a request waits for the lock is its ``queue_ms``; the session generator is the one
piece of sampler state, and it is per connection, never shared.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import serve

from diffusion_policy.serving import protocol as P

logger = logging.getLogger("diffusion_policy.serving")
MAX_SEED = 2**63 - 1


def policy_metadata(policy, checkpoint: str = "", predictor: str = "Policy", max_message_bytes: int = 0,
                    prefix_weights: bool = False) -> dict:
    """What the handshake tells a client about the served ``policy`` (a :class:`Policy`)."""
    task, method = policy.task_cfg, policy.method_cfg
    stats = policy.normalizer.stats[policy.action_key]
    return {
        "obs_keys": list(policy.obs_keys),
        "image_keys": list(policy.image_keys),
        "shapes": {k: list(v) for k, v in policy.shapes.items()},
        # images travel as uint8 (H, W, 3), everything else as float32
        "dtypes": {k: "uint8" if k in policy.image_keys else "float32" for k in policy.obs_keys},
        "action_key": policy.action_key,
        "action_dim": int(policy.action_dim),
        # per-dimension range of the training actions (the normalizer's statistics), not a safety limit
        "action_min": [float(v) for v in stats.min.tolist()],
        "action_max": [float(v) for v in stats.max.tolist()],
        "n_obs_steps": int(policy.n_obs_steps),
        "horizon": int(policy.horizon),
        "n_action_steps": int(policy.n_action_steps),
        "control_rate_hz": float(task.fps),
        "task": task.name,
        "env_id": task.env_id,
        "method": method.name,
        "scheduler": method.scheduler if method.name == "diffusion" else None,
        "integrator": method.integrator if method.name == "flow" else None,
        "num_inference_steps": int(policy.method.num_inference_steps),
        "stochastic": bool(policy.method.stochastic),
        "net": policy.policy_cfg.name,
        "predictor": predictor,
        "device": str(policy.device),
        "checkpoint": str(checkpoint),
        "max_message_bytes": int(max_message_bytes),
        "prefix_weights": bool(prefix_weights),
    }


def _guidance():
    """``predict_guided`` of the guided-inpainting module, or None where it is not installed."""
    try:
        from diffusion_policy.methods.guidance import predict_guided
    except ImportError:
        return None
    return predict_guided


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


@dataclass
class Session:
    """One connection's episode state."""

    id: int
    peer: str
    seed: int
    generator: torch.Generator
    requests: int = 0

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.generator.manual_seed(seed)
        self.requests = 0


class PolicyServer:
    """Serve ``policy`` (a :class:`Policy`) over websockets.

    Args:
        policy: the policy; its configs give the metadata.
        predictor: what runs ``predict`` (default: ``policy``; e.g. a ``FastPredictor`` of it).
        host, port: where to listen (``port=0``: any free port, see :attr:`port`).
        token: a shared secret every client must present in its ``hello`` ('' or None: none).
        max_message_bytes: largest message accepted or sent (checked before decoding).
        max_clients: connections served at once; one more is told ``server_full``.
        handshake_timeout_s: a connection that sends no ``hello`` within this is closed.
        checkpoint: where the policy came from (reported in the metadata).
    """

    def __init__(self, policy, predictor=None, host: str = "127.0.0.1", port: int = P.DEFAULT_PORT,
                 token: str | None = None, max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES,
                 max_clients: int = 8, handshake_timeout_s: float = 10.0, checkpoint: str = ""):
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes={max_message_bytes} is too small; expected >= 1024")
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self.policy = policy
        self.predictor = predictor if predictor is not None else policy
        self.host, self.requested_port = host, int(port)
        self.token = token or None
        self.max_message_bytes = int(max_message_bytes)
        self.max_clients = int(max_clients)
        self.handshake_timeout_s = float(handshake_timeout_s)
        self._guided = _guidance()
        name = type(self.predictor).__name__
        self.metadata = policy_metadata(policy, checkpoint, name, self.max_message_bytes, self._guided is not None)
        self._lock = threading.Lock()  # one predict at a time (module docstring)
        self._clients_lock = threading.Lock()
        self._clients = 0
        self._ids = itertools.count(1)
        self._server = None
        self._thread = None
        self._serving = False

    # ------------------------------------------------------------------------------ lifecycle
    def bind(self) -> PolicyServer:
        """Open the listening socket (warning loudly when it is reachable without a token)."""
        if not is_loopback(self.host) and self.token is None:
            logger.warning("dp-serve: WARNING: listening on %s (%s) WITHOUT A TOKEN: anyone who can reach "
                           "port %d can request actions. Pass token=... (or set DP_SERVE_TOKEN), or bind "
                           "host=127.0.0.1 and tunnel (ssh -L).", self.host,
                           "all interfaces" if self.host in ("0.0.0.0", "::", "") else "not loopback",
                           self.requested_port)
        self._server = serve(self._handle, self.host, self.requested_port, compression=None,
                             max_size=P.TRANSPORT_FACTOR * self.max_message_bytes,
                             open_timeout=self.handshake_timeout_s)
        return self

    def start(self) -> PolicyServer:
        """Bind and serve from a background thread (tests, benchmarks, notebooks)."""
        if self._server is None:
            self.bind()
        self._thread = threading.Thread(target=self._server.serve_forever, name="dp-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        if self._server is None:
            self.bind()
        self._serving = True
        self._server.serve_forever()

    @property
    def port(self) -> int:
        return self._server.socket.getsockname()[1]

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"ws://{host}:{self.port}"

    def close(self) -> None:
        """Stop listening, close every connection (code 1001) and wait for their handlers."""
        if self._server is not None:
            if self._thread is None and not self._serving:
                # bound but never served: shutdown() waits for serve_forever() to have stopped
                self._server.socket_closed.set()
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None
        self._serving = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------ connections
    def _send(self, conn, msg: dict) -> None:
        conn.send(P.pack(msg))

    def _refuse(self, conn, code: str, message: str) -> None:
        """Error reply, then close the connection (the handshake did not complete)."""
        logger.info("dp-serve: refused %s: %s", conn.remote_address, message)
        try:
            self._send(conn, P.error(code, message))
            conn.close(code=1008 if code == "unauthorized" else 1002, reason=code)
        except ConnectionClosed:
            pass

    def _handle(self, conn) -> None:
        with self._clients_lock:
            full = self._clients >= self.max_clients
            if not full:
                self._clients += 1
        if full:
            self._refuse(conn, "server_full", f"this server already serves max_clients={self.max_clients} "
                                              f"connections; try again later")
            return
        try:
            session = self._handshake(conn)
            if session is None:
                return
            logger.info("dp-serve: session %d from %s (seed %d)", session.id, session.peer, session.seed)
            while True:
                try:
                    data = conn.recv()
                except ConnectionClosed:
                    break
                t_recv = time.perf_counter()
                self._send(conn, self._reply(session, data, t_recv))
            logger.info("dp-serve: session %d closed after %d requests", session.id, session.requests)
        except ConnectionClosed:
            pass
        finally:
            with self._clients_lock:
                self._clients -= 1

    def _handshake(self, conn) -> Session | None:
        try:
            data = conn.recv(timeout=self.handshake_timeout_s)
        except TimeoutError:
            self._refuse(conn, "handshake", f"no hello within handshake_timeout_s={self.handshake_timeout_s}")
            return None
        try:
            hello = P.unpack(data, self.max_message_bytes)
        except P.ProtocolError as e:
            self._refuse(conn, e.code, f"handshake: {e}")
            return None
        if hello["type"] != "hello":
            self._refuse(conn, "handshake", f"the first message must be 'hello', got {hello['type']!r}")
            return None
        version = hello.get("version")
        if version != P.PROTOCOL_VERSION:
            self._refuse(conn, "version", f"protocol version {version!r} is not supported; this server "
                                          f"speaks version {P.PROTOCOL_VERSION}")
            return None
        if self.token is not None:
            token = hello.get("token")
            if not isinstance(token, str) or not token:
                self._refuse(conn, "unauthorized", "this server requires a token; none was given")
                return None
            # constant time, and on digests of equal length: the time says nothing of the token's length
            if not hmac.compare_digest(_digest(token), _digest(self.token)):
                self._refuse(conn, "unauthorized", "wrong token")
                return None
        unknown = sorted(set(hello) - P.HELLO_FIELDS)
        seed = hello.get("seed")
        if unknown or not (seed is None or _is_seed(seed)):
            self._refuse(conn, "handshake", f"bad hello: unknown fields {unknown}" if unknown else
                         f"bad hello: seed must be an integer in [0, 2**63) or null, got {seed!r}")
            return None
        seed = secrets.randbits(63) if seed is None else seed
        generator = torch.Generator(device=self.policy.device).manual_seed(seed)
        peer = ":".join(str(p) for p in conn.remote_address[:2])
        session = Session(next(self._ids), peer, seed, generator)
        self._send(conn, {"type": "welcome", "version": P.PROTOCOL_VERSION, "metadata": self.metadata,
                          "session": {"id": session.id, "seed": seed}})
        return session

    # ------------------------------------------------------------------------------ requests
    def _reply(self, session: Session, data, t_recv: float) -> dict:
        request_id = None
        try:
            msg = P.unpack(data, self.max_message_bytes)
            request_id = msg.get("id")
            kind = msg["type"]
            if kind not in P.REQUEST_FIELDS:
                raise P.ProtocolError("unknown_type", f"unknown request type {kind!r}; expected one of "
                                                      f"{sorted(P.REQUEST_FIELDS)}")
            unknown = sorted(set(msg) - P.REQUEST_FIELDS[kind])
            if unknown:
                raise P.ProtocolError("bad_request", f"{kind}: unknown fields {unknown}; expected "
                                                     f"{sorted(P.REQUEST_FIELDS[kind])}")
            if kind == "reset":
                seed = msg.get("seed")
                _check(seed is None or _is_seed(seed), f"reset: seed must be an integer in [0, 2**63) or null, "
                                                       f"got {seed!r}")
                session.reseed(secrets.randbits(63) if seed is None else seed)
                return {"type": "reset", "id": request_id, "seed": session.seed}
            return self._predict(session, msg, t_recv)
        except P.ProtocolError as e:
            return P.error(e.code, str(e), request_id)
        except (ValueError, KeyError, TypeError) as e:  # the policy refused the request
            return P.error("bad_request", f"{type(e).__name__}: {e}", request_id)
        except Exception as e:
            logger.exception("dp-serve: session %d: predict failed", session.id)
            return P.error("internal", f"{type(e).__name__}: {e}", request_id)

    def _predict(self, session: Session, msg: dict, t_recv: float) -> dict:
        meta = self.metadata
        obs, B = self._check_obs(msg.get("obs"))
        num_steps = msg.get("num_steps")
        _check(num_steps is None or (_is_int(num_steps) and num_steps >= 1),
               f"predict: num_steps must be a positive integer or null, got {num_steps!r}")
        seed = msg.get("seed")
        _check(seed is None or _is_seed(seed), f"predict: seed must be an integer in [0, 2**63) or null, "
                                               f"got {seed!r}")
        prefix, weights = msg.get("prefix"), msg.get("prefix_weights")
        if prefix is not None:
            _check(isinstance(prefix, np.ndarray) and prefix.dtype == np.float32 and prefix.ndim == 3
                   and prefix.shape[0] == B and prefix.shape[2] == meta["action_dim"]
                   and prefix.shape[1] <= meta["horizon"],
                   f"predict: prefix must be float32 (B={B}, P <= H={meta['horizon']}, Da={meta['action_dim']}), "
                   f"got {_describe(prefix)}")
            _check(bool(np.isfinite(prefix).all()), "predict: prefix contains NaN/inf")
        if weights is not None:
            _check(prefix is not None, "predict: prefix_weights needs a prefix")
            _check(self._guided is not None, "predict: prefix_weights (guided inpainting) needs "
                                             "diffusion_policy.methods.guidance, which this server lacks")
            _check(isinstance(weights, np.ndarray) and weights.dtype == np.float32,
                   f"predict: prefix_weights must be a float32 array, got {_describe(weights)}")
        max_guidance = msg.get("max_guidance")
        if max_guidance is not None:
            _check(weights is not None, "predict: max_guidance needs prefix_weights")
            _check(isinstance(max_guidance, (int, float)) and not isinstance(max_guidance, bool)
                   and max_guidance > 0, f"predict: max_guidance must be a number > 0, got {max_guidance!r}")
        generator = session.generator
        if seed is not None:  # this request alone; the session's generator is left as it is
            generator = torch.Generator(device=self.policy.device).manual_seed(seed)
        obs_t = {k: torch.from_numpy(v) for k, v in obs.items()}
        t_checked = time.perf_counter()
        with self._lock:
            t_start = time.perf_counter()
            if weights is not None:
                # guided inpainting differentiates through the network: the plain policy, not a
                # FastPredictor's graph (guidance.predict_guided validates the weights' shape)
                dev = self.policy.device
                kw = {} if max_guidance is None else {"max_guidance": float(max_guidance)}
                out = self._guided(self.policy, {k: v.to(dev) for k, v in obs_t.items()},
                                   torch.from_numpy(prefix).to(dev), torch.from_numpy(weights).to(dev),
                                   num_steps=num_steps, generator=generator, **kw)
            else:
                out = self.predictor.predict(obs_t, num_steps=num_steps, generator=generator,
                                             prefix=None if prefix is None else torch.from_numpy(prefix))
            actions = out.detach().float().cpu().numpy()  # waits for the device
            t_done = time.perf_counter()
        session.requests += 1
        return {"type": "chunk", "id": msg.get("id"), "actions": actions, "count": session.requests,
                "timings": {"decode_ms": (t_checked - t_recv) * 1e3, "queue_ms": (t_start - t_checked) * 1e3,
                            "inference_ms": (t_done - t_start) * 1e3}}

    def _check_obs(self, obs) -> tuple[dict, int]:
        """Observation window against the metadata: keys, (B, To, ...) shapes, dtypes, finite."""
        meta = self.metadata
        _check(isinstance(obs, dict), f"predict: obs must be a map {{key: (B, To, ...) array}}, got "
                                      f"{type(obs).__name__}")
        keys = meta["obs_keys"]
        missing, extra = [k for k in keys if k not in obs], sorted(k for k in obs if k not in keys)
        _check(not missing and not extra, f"predict: obs keys {sorted(obs)} do not match the policy's "
                                          f"obs_keys {keys} (missing {missing}, unexpected {extra})")
        B = None
        for k in keys:
            x, dtype = obs[k], meta["dtypes"][k]
            expected = (meta["n_obs_steps"], *meta["shapes"][k])
            _check(isinstance(x, np.ndarray), f"predict: obs[{k!r}] must be an array, got {type(x).__name__}")
            _check(x.ndim == len(expected) + 1 and tuple(x.shape[1:]) == expected and x.shape[0] >= 1,
                   f"predict: obs[{k!r}] has shape {tuple(x.shape)}, expected (B, To={expected[0]}, "
                   f"{', '.join(map(str, expected[1:]))})")
            _check(x.dtype == np.dtype(dtype), f"predict: obs[{k!r}] has dtype {x.dtype}, expected {dtype}")
            _check(B is None or x.shape[0] == B, f"predict: obs[{k!r}] has batch {x.shape[0]}, other keys {B}")
            if x.dtype.kind == "f":
                _check(bool(np.isfinite(x).all()), f"predict: obs[{k!r}] contains NaN/inf")
            B = x.shape[0]
        return obs, B


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise P.ProtocolError("bad_request", message)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_seed(v) -> bool:
    return _is_int(v) and 0 <= v <= MAX_SEED


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {tuple(x.shape)}"
    return type(x).__name__
