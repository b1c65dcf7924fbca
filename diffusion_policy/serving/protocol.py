"""The wire format of ``dp-serve``: msgpack messages over websockets, numpy arrays without pickle.

Shared by the server and the client; it imports numpy and msgpack only (no torch), so the client
embeds in any robot codebase.

Every message is one binary websocket message holding one msgpack map with a ``type``. Arrays are
maps ``{"__ndarray__": True, "dtype": "<f4", "shape": [B, To, D], "data": <bytes>}`` (the layout
openpi's policy server uses): little-endian, C order, booleans, integers and floats only. Object,
string, void and complex dtypes are refused on both sides, and nothing is ever unpickled; msgpack
extension types are refused as well.

Conversation (``PROTOCOL_VERSION`` 1)::

    client                                          server
    hello   {version, token, seed}           ->
                                             <-     welcome {version, metadata, session: {id, seed}}
                                                    (or error {code, message}, then close)
    predict {id, obs: {key: (B, To, ...)},   ->
             num_steps, prefix (B, P, Da),
             prefix_weights (H,) or (B, H),
             max_guidance, seed}
                                             <-     chunk {id, actions (B, H, Da) float32,
                                                           count, timings: {decode_ms, queue_ms,
                                                           inference_ms}}
    reset   {id, seed}                       ->
                                             <-     reset {id, seed}
    (any request that is wrong)              <-     error {id, code, message}; the connection stays
                                                    (id null when the request could not be read)

``metadata`` is :func:`diffusion_policy.serving.server.policy_metadata`'s dict: observation keys,
shapes and dtypes, action size and range, ``To``, ``H``, ``Ta``, control rate and method. A
server accepts a message of up to its ``max_message_bytes`` and answers a larger one (up to
``TRANSPORT_FACTOR`` times that) with an ``error`` reply before decoding it; the websocket layer
drops a connection whose message is larger still without reading it (close code 1009).
"""
from __future__ import annotations

import math

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
DEFAULT_PORT = 8765
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20
TRANSPORT_FACTOR = 2  # websocket frame limit = this x max_message_bytes (larger: connection dropped)
MAX_NDIM = 8
ALLOWED_KINDS = "biuf"  # numpy dtype kinds that may travel: bool, signed, unsigned, float

# request types a client may send after the handshake, and the fields each may carry
REQUEST_FIELDS = {
    "predict": {"type", "id", "obs", "num_steps", "prefix", "prefix_weights", "max_guidance", "seed"},
    "reset": {"type", "id", "seed"},
}
HELLO_FIELDS = {"type", "version", "token", "seed", "client"}

# error codes of an ``error`` reply
ERROR_CODES = (
    "malformed",      # not msgpack, not a map, a text frame, a bad array
    "too_large",      # over max_message_bytes
    "version",        # protocol version not spoken by the server (connection closed)
    "unauthorized",   # wrong or missing token (connection closed)
    "handshake",      # a request before hello, or a bad hello (connection closed)
    "server_full",    # max_clients connections already (connection closed)
    "unknown_type",   # a request type the server does not know
    "bad_request",    # a field or an observation that does not match the policy's metadata
    "internal",       # the policy raised: the server logs it and keeps serving
)
# codes after which the server closes the connection (the handshake did not complete)
FATAL_CODES = ("version", "unauthorized", "handshake", "server_full")


class ProtocolError(ValueError):
    """A message that does not follow this schema; ``code`` is one of ``ERROR_CODES``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------- arrays
def check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in ALLOWED_KINDS:
        raise ProtocolError("malformed", f"{where}: dtype {dtype.str!r} cannot travel; expected a "
                                         f"bool, integer or float array (never objects)")


def encode_array(arr: np.ndarray) -> dict:
    """A numpy array as a msgpack-able map (little-endian, C order)."""
    arr = np.asarray(arr)
    check_dtype(arr.dtype, "array")
    le = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    arr = np.ascontiguousarray(arr, dtype=le)
    return {"__ndarray__": True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}


def decode_array(d: dict, where: str) -> np.ndarray:
    """The array of an :func:`encode_array` map, checked field by field (a writable copy)."""
    if set(d) != {"__ndarray__", "dtype", "shape", "data"}:
        raise ProtocolError("malformed", f"{where}: an array map has fields {sorted(d)}, expected "
                                         f"['__ndarray__', 'data', 'dtype', 'shape']")
    dt, shape, data = d["dtype"], d["shape"], d["data"]
    if not isinstance(dt, str) or not isinstance(data, bytes) or not isinstance(shape, list):
        raise ProtocolError("malformed", f"{where}: array dtype must be a string, shape a list and "
                                         f"data bytes")
    try:
        dtype = np.dtype(dt)
    except TypeError:
        raise ProtocolError("malformed", f"{where}: unknown dtype {dt!r}") from None
    check_dtype(dtype, where)
    if dtype.byteorder == ">":
        raise ProtocolError("malformed", f"{where}: dtype {dt!r} is big-endian; expected little-endian")
    if len(shape) > MAX_NDIM or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                        for s in shape):
        raise ProtocolError("malformed", f"{where}: shape {shape} must be at most {MAX_NDIM} "
                                         f"non-negative integers")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ProtocolError("malformed", f"{where}: {len(data)} bytes of data for shape {shape} "
                                         f"and dtype {dt!r}, expected {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _default(obj):
    if isinstance(obj, np.ndarray):
        return encode_array(obj)
    if isinstance(obj, np.generic):
        check_dtype(obj.dtype, "scalar")
        return obj.item()
    raise TypeError(f"cannot serialize {type(obj).__name__}: messages carry numbers, strings, "
                    f"lists, maps and numpy arrays only")


def _no_ext(code, data):
    raise ProtocolError("malformed", f"msgpack extension type {code} is not part of this schema")


def _arrays(obj, where: str):
    """Replace every array map inside a decoded message by its numpy array."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return decode_array(obj, where)
        return {k: _arrays(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_arrays(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


# ----------------------------------------------------------------------------------- messages
def pack(msg: dict) -> bytes:
    """One message (a dict with numpy arrays in it) to bytes."""
    return msgpack.packb(msg, default=_default, use_bin_type=True)


def unpack(data, max_bytes: int) -> dict:
    """Bytes to one message, refusing anything over ``max_bytes`` before decoding it."""
    if isinstance(data, str):
        raise ProtocolError("malformed", "got a text websocket message; expected a binary msgpack one")
    if len(data) > max_bytes:
        raise ProtocolError("too_large", f"message of {len(data)} bytes exceeds max_message_bytes="
                                         f"{max_bytes}")
    try:
        msg = msgpack.unpackb(data, raw=False, ext_hook=_no_ext, strict_map_key=True)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # ExtraData, FormatError, StackError...
        raise ProtocolError("malformed", f"not a msgpack message ({type(e).__name__}: {e})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("malformed", "a message must be a msgpack map with a string 'type'")
    return _arrays(msg, msg["type"])


def error(code: str, message: str, request_id=None) -> dict:
    assert code in ERROR_CODES, code
    return {"type": "error", "code": code, "message": message, "id": request_id}
