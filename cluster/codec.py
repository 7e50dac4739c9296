"""Client encodings (JSON text frames, msgpack binary frames) and WebSocket framing.

The gateway encodes a delivery once per encoding and writes the same bytes to every
subscriber, so the unit this module produces is a complete, unmasked server-to-client
WebSocket frame (RFC 6455 section 5.2), not just a payload.

orjson is used for JSON because it is several times faster than the standard
library at both ends and refuses what JSON cannot carry (integers beyond 64 bits,
NaN); msgpack is the binary encoding the protocol names.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Any

import msgpack
import orjson

from fanroute.codes import ErrorCode
from fanroute.errors import ProtocolError
from fanroute.protocol import MSGPACK_SUBPROTOCOL

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_PING = 0x9

# A payload must be deliverable in every encoding a subscriber may use. orjson writes
# at most 254 levels and msgpack reads about 1000, so the depth both can carry is
# well above this cap; 64 levels is more than any feed needs.
MAX_DEPTH = 64


def ws_frame(opcode: int, data: bytes) -> bytes:
    """One final, unmasked WebSocket frame as a server sends it."""
    n = len(data)
    first = 0x80 | opcode
    if n < 126:
        return bytes((first, n)) + data
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + data
    return struct.pack("!BBQ", first, 127, n) + data


PING_FRAME = ws_frame(OP_PING, b"")


def ws_payload(frame: bytes) -> bytes:
    """The payload of one unmasked frame built by :func:`ws_frame`."""
    n = frame[1] & 0x7F
    return frame[2 + {126: 2, 127: 8}.get(n, 0) :]


class Encoding(Enum):
    """How one connection frames its messages; chosen by subprotocol at handshake."""

    JSON = "json"
    MSGPACK = "msgpack"

    @classmethod
    def for_subprotocols(cls, offered: tuple[str, ...] | list[str]) -> Encoding:
        return cls.MSGPACK if MSGPACK_SUBPROTOCOL in offered else cls.JSON

    @property
    def subprotocol(self) -> str | None:
        return MSGPACK_SUBPROTOCOL if self is Encoding.MSGPACK else None

    def encode(self, event: dict[str, Any]) -> bytes:
        """Encode an event as a complete WebSocket frame."""
        if self is Encoding.JSON:
            return ws_frame(OP_TEXT, orjson.dumps(event))
        return ws_frame(OP_BINARY, msgpack.packb(event, use_bin_type=True))

    def decode(self, message: str | bytes) -> Any:
        """Decode one client message; junk raises ``bad_request``."""
        if self is Encoding.JSON:
            if isinstance(message, bytes):
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"binary frames need the {MSGPACK_SUBPROTOCOL} subprotocol; send JSON as text",
                )
            try:
                return orjson.loads(message)
            except orjson.JSONDecodeError as exc:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"malformed JSON: {exc}") from None
        if isinstance(message, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this connection speaks msgpack: send binary frames")
        return decode_msgpack_value(message)


def decode_msgpack_value(data: bytes) -> Any:
    """Decode a msgpack client frame; junk raises ``bad_request``.

    Payloads inside it are checked when they are published (:func:`pack_payload`).
    """
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on junk
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"malformed msgpack: {type(exc).__name__}") from None


_SCALARS = (str, int, float, bool, type(None))


def check_json_compatible(value: Any) -> None:
    """Refuse values a JSON subscriber could not be sent (bytes, ext types, deep nests).

    Every publication reaches JSON and msgpack subscribers alike, so its payload must
    be a JSON value both encoders can write. Binary values are refused rather than
    turned into something else: a publisher that needs bytes sends them as a base64
    string, and every subscriber then sees the same payload.
    """
    if type(value) in _SCALARS and type(value) is not int and value == value:
        return  # the common case of a plain string or number: nothing to walk
    if type(value) is dict and _flat_json_object(value):
        return  # the next most common: an object of plain strings and numbers
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"value nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, str):
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "map keys must be strings")
                stack.append((v, depth + 1))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, int) and not isinstance(item, bool):
            if not -(2**63) <= item < 2**64:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "integer out of 64-bit range")
        elif item is None or isinstance(item, (str, bool, float)):
            if isinstance(item, float) and item != item:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "NaN is not a JSON value")
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{type(item).__name__} values cannot be published")


def _flat_json_object(value: dict[Any, Any]) -> bool:
    """True if ``value`` is an object whose keys are strings and whose values are all
    plain scalars a JSON subscriber can be sent (exact types only); False means
    "walk it", not "refuse it"."""
    for k, v in value.items():
        if type(k) is not str:
            return False
        t = type(v)
        if t is str or t is bool or v is None:
            continue
        if t is int:
            if -(2**63) <= v < 2**64:
                continue
            return False
        if t is not float or v != v:
            return False
    return True


def pack_payload(value: Any, limit: int) -> bytes:
    """A publication's payload as the bytes that travel between nodes and into history.

    This is the one place where a payload is accepted: it must be a JSON value (see
    :func:`check_json_compatible`) whose msgpack form is at most ``limit`` bytes.
    Shards store and forward these bytes without decoding them, so history is
    accounted for exactly in bytes.
    """
    check_json_compatible(value)
    data = msgpack.packb(value, use_bin_type=True)
    if len(data) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"payload larger than {limit} bytes")
    return data


def unpack_payload(data: Any) -> Any:
    """Read back a payload that came from a shard (a delivery or history).

    The shard is a cluster member, but what it holds was written by another
    process, maybe of another version: it is checked as at the edge, and a payload
    that could not be delivered to every encoding raises :class:`ProtocolError`.
    """
    if type(data) is not bytes:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a payload from a shard must be packed bytes")
    value = decode_msgpack_value(data)
    check_json_compatible(value)
    return value


class FrameCache:
    """Frames of one event, built at most once per encoding.

    A delivery reaches JSON and msgpack subscribers alike; each encoding is
    built the first time a subscriber needs it and reused for the rest.
    """

    __slots__ = ("event", "_json", "_msgpack")

    def __init__(self, event: dict[str, Any]) -> None:
        self.event = event
        self._json: bytes | None = None
        self._msgpack: bytes | None = None

    def get(self, encoding: Encoding) -> bytes:
        if encoding is Encoding.JSON:
            if self._json is None:
                self._json = Encoding.JSON.encode(self.event)
            return self._json
        if self._msgpack is None:
            self._msgpack = Encoding.MSGPACK.encode(self.event)
        return self._msgpack
