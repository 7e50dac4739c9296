"""The client protocol (version 1) as plain data: commands in, events out.

This module does no I/O. The gateway hands it a decoded frame (a dict from JSON or
msgpack) and gets back a command dataclass or a :class:`ProtocolError` that carries
the error code and the command's ``id``, so that every bad command is answered with
an ``error`` frame and never with silence. ``gateway/PROTOCOL.md`` is the prose
version of the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fanroute.codes import ErrorCode
from fanroute.errors import ProtocolError


PROTOCOL_VERSION = 1
MSGPACK_SUBPROTOCOL = "fanroute.msgpack"

MAX_TOPIC_LENGTH = 256
MAX_IDEM_LENGTH = 64
# The most recent messages a subscribe may ask for with ``last``: a larger N is served
# as this many. It bounds the burst one command can put in a connection's outbox.
MAX_LAST = 100
# Topic characters: letters, digits and a small set of separators. Anything else
# (spaces, control characters, quotes) is refused so topics stay safe to log,
# to put in URLs and to use as namespace keys.
_TOPIC_EXTRA = frozenset("._:-/@=+,#~")
# Every character a topic may hold: ASCII letters and digits, and the extras.
_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") | _TOPIC_EXTRA


@dataclass(slots=True, frozen=True)
class Since:
    """A recovery cursor: the last message the client saw of a topic."""

    epoch: str
    seq: int


@dataclass(slots=True)
class Connect:
    token: str | None
    id: int | None = None


@dataclass(slots=True)
class Refresh:
    token: str
    id: int | None = None


@dataclass(slots=True)
class Subscribe:
    topic: str
    id: int | None = None
    since: Since | None = None
    last: int = 0  # the newest N messages to send after ``subscribed`` (0: none), capped
    presence: bool = False  # push the topic's subscriber count to this connection


@dataclass(slots=True)
class Presence:
    """How many connections are subscribed to ``topic`` across the cluster."""

    topic: str
    id: int | None = None


@dataclass(slots=True)
class Unsubscribe:
    topic: str
    id: int | None = None


@dataclass(slots=True)
class Publish:
    topic: str
    payload: Any
    id: int | None = None
    idem: str | None = None  # idempotency key: a retry with the same key is not applied twice


@dataclass(slots=True)
class Ping:
    ts: Any
    id: int | None = None


Command = Connect | Refresh | Subscribe | Unsubscribe | Publish | Ping | Presence


def check_topic(topic: Any, id: int | None = None) -> str:
    """Return ``topic`` if it is a valid topic name, else raise ``bad_request``."""
    if not isinstance(topic, str) or not topic:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "topic must be a non-empty string", id)
    if len(topic) > MAX_TOPIC_LENGTH:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"topic is longer than {MAX_TOPIC_LENGTH} characters", id)
    if not _TOPIC_CHARS.issuperset(topic):  # one pass in C, not a generator per character
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "topic may hold only letters, digits and . _ : - / @ = + , # ~", id
        )
    return topic


def check_idem(value: Any, id: int | None = None) -> str | None:
    """An ``idem`` key: absent, or a string of 1 to 64 characters."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_IDEM_LENGTH:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"idem must be a string of 1 to {MAX_IDEM_LENGTH} characters", id)
    return value


def _check_id(frame: dict[str, Any]) -> int | None:
    if "id" not in frame:
        return None
    value = frame["id"]
    # bool is an int subclass in Python; a JSON true is not an id.
    if type(value) is not int or not (0 <= value < 2**53):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "id must be a non-negative integer")
    return value


def _parse_since(value: Any, id: int | None) -> Since:
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "since must be an object with epoch and seq", id)
    epoch, seq = value.get("epoch"), value.get("seq")
    if not isinstance(epoch, str) or len(epoch) > 64:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "since.epoch must be a string", id)
    if type(seq) is not int or seq < 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "since.seq must be a non-negative integer", id)
    return Since(epoch, seq)


def _parse_last(value: Any, id: int | None) -> int:
    """``last``: absent, or an integer >= 1, served as at most :data:`MAX_LAST`."""
    if value is None:
        return 0
    if type(value) is not int or value < 1:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "last must be an integer >= 1", id)
    return min(value, MAX_LAST)


def _parse_flag(frame: dict[str, Any], name: str, id: int | None) -> bool:
    value = frame.get(name, False)
    if type(value) is not bool:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be true or false", id)
    return value


def parse_command(frame: Any) -> Command:
    """Turn one decoded client frame into a command, or raise :class:`ProtocolError`."""
    if not isinstance(frame, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a frame must be a JSON object (or msgpack map)")
    id = _check_id(frame)
    kind = frame.get("type")
    if kind is None:
        # The plain style of the source design: {"topic": ..., "payload": ...}.
        if "topic" in frame and "payload" in frame:
            kind = "publish"
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "frame has no type (and is not {topic, payload})", id)
    if kind == "publish":
        if "payload" not in frame:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "publish needs a payload", id)
        return Publish(check_topic(frame.get("topic"), id), frame["payload"], id, check_idem(frame.get("idem"), id))
    if kind == "subscribe":
        topic = check_topic(frame.get("topic"), id)
        since = frame.get("since")
        return Subscribe(
            topic,
            id,
            None if since is None else _parse_since(since, id),
            _parse_last(frame.get("last"), id),
            _parse_flag(frame, "presence", id),
        )
    if kind == "unsubscribe":
        return Unsubscribe(check_topic(frame.get("topic"), id), id)
    if kind == "ping":
        return Ping(frame.get("ts"), id)
    if kind == "presence":
        return Presence(check_topic(frame.get("topic"), id), id)
    if kind == "connect":
        token = frame.get("token")
        if token is not None and not isinstance(token, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "token must be a string", id)
        return Connect(token, id)
    if kind == "refresh":
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "refresh needs a token string", id)
        return Refresh(token, id)
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "type must be a string", id)
    raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown command type {kind[:40]!r}", id)


# --- server events, as plain dicts ready for either encoding -------------------


def _with_id(event: dict[str, Any], id: int | None) -> dict[str, Any]:
    if id is not None:
        event["id"] = id
    return event


def error_event(code: str, message: str, id: int | None = None) -> dict[str, Any]:
    return _with_id({"type": "error", "code": code, "message": message}, id)


def subscribed_event(
    topic: str, epoch: str, seq: int, recovered: bool, id: int | None = None
) -> dict[str, Any]:
    return _with_id(
        {"type": "subscribed", "topic": topic, "epoch": epoch, "seq": seq, "recovered": recovered},
        id,
    )


def unsubscribed_event(topic: str, id: int | None = None) -> dict[str, Any]:
    return _with_id({"type": "unsubscribed", "topic": topic}, id)


def published_event(topic: str, seq: int, id: int) -> dict[str, Any]:
    return {"type": "published", "topic": topic, "id": id, "seq": seq}


def pong_event(ts: Any, id: int | None = None) -> dict[str, Any]:
    return _with_id({"type": "pong", "ts": ts}, id)


def connected_event(
    session: str, ping_interval: float, ping_timeout: float, id: int | None = None
) -> dict[str, Any]:
    return _with_id(
        {
            "type": "connected",
            "session": session,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "version": PROTOCOL_VERSION,
        },
        id,
    )


def refreshed_event(expires: float | None, id: int | None = None) -> dict[str, Any]:
    return _with_id({"type": "refreshed", "expires": expires}, id)


def message_event(topic: str, payload: Any, seq: int) -> dict[str, Any]:
    return {"topic": topic, "payload": payload, "seq": seq}


def presence_event(topic: str, subscribers: int, id: int | None = None) -> dict[str, Any]:
    """A topic's cluster-wide subscriber count: a reply (with ``id``) or a push (without)."""
    return _with_id({"type": "presence", "topic": topic, "subscribers": subscribers}, id)
