"""The inter-node codec: what gateways and router shards say to each other over nng.

One nng message is a msgpack array ``[version, sender, frames, reply_as]``; ``frames`` batches
many small frames (publications, deliveries, replies) so that under load one message
carries a hundred publications instead of one (an nng message costs ~47 µs here;
a packed publication a fraction of a microsecond). Every frame is a short array whose
first item is its kind. Both ends validate what they receive: a frame of the wrong
shape raises :class:`WireError`, the receiver drops it and counts it, and nothing else
is affected.

``sender`` is a shard's name, or a gateway's inbox address (where the shard sends
back). ``reply_as`` is set by gateways only: the name the gateway knows the shard by
(its ``--routers`` entry), which the shard uses as ``sender`` in everything it sends
to that gateway, so each gateway can match replies to its links whatever names the
shards give themselves.

Gateway → shard frames:
    HELLO  [1, inbox, instance, [[topic, epoch|None, seq], ...]]   full interest
    SUB    [2, topic, req, since_epoch|None, since_seq]            subscribe (interest +1)
    UNSUB  [3, topic]                                              last local subscriber left
    PUB    [4, topic, payload, req, ts]                            req 0: no ack wanted
    BEAT   [5]                                                     gateway heartbeat
    BYE    [6]                                                     gateway leaving

Shard → gateway frames:
    MSG    [20, topic, seq, payload, ts]                           a delivery
    SUBOK  [21, topic, req, epoch, seq, recovered, [[seq, payload, ts], ...]]
    PUBOK  [22, topic, req, seq]
    WELCOME [23, shard_epoch, instance]                            answer to HELLO and BEAT:
                                                                   the gateway instance the shard
                                                                   knows at that inbox ("" if none)
    NACK   [24, req, code, message]                                a request that failed
"""

from __future__ import annotations

from typing import Any

import msgpack

WIRE_VERSION = 1

HELLO, SUB, UNSUB, PUB, BEAT, BYE = 1, 2, 3, 4, 5, 6
MSG, SUBOK, PUBOK, WELCOME, NACK = 20, 21, 22, 23, 24

GATEWAY_KINDS = frozenset({HELLO, SUB, UNSUB, PUB, BEAT, BYE})
SHARD_KINDS = frozenset({MSG, SUBOK, PUBOK, WELCOME, NACK})


class WireError(Exception):
    """An inter-node message or frame that does not follow this codec."""


def pack(sender: str, frames: list[list[Any]], reply_as: str = "") -> bytes:
    return msgpack.packb([WIRE_VERSION, sender, frames, reply_as], use_bin_type=True)


def unpack(data: bytes) -> tuple[str, list[Any], str]:
    """Split an nng message into sender, (not yet validated) frames and reply_as."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise WireError(f"undecodable message: {type(exc).__name__}") from None
    if not isinstance(msg, list) or len(msg) != 4:
        raise WireError("message is not [version, sender, frames, reply_as]")
    version, sender, frames, reply_as = msg
    if version != WIRE_VERSION:
        raise WireError(f"unsupported wire version {version!r}")
    if not isinstance(sender, str) or not isinstance(frames, list) or not isinstance(reply_as, str):
        raise WireError("bad sender, frames or reply_as")
    return sender, frames, reply_as


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_str(v: Any) -> bool:
    return type(v) is str


def _is_num(v: Any) -> bool:
    return type(v) in (int, float)


def _check(ok: bool, frame: Any) -> None:
    if not ok:
        raise WireError(f"malformed frame {str(frame)[:80]}")


def check_gateway_frame(frame: Any) -> int:
    """Validate a frame a shard received from a gateway; return its kind."""
    _check(isinstance(frame, list) and frame and type(frame[0]) is int and frame[0] in GATEWAY_KINDS, frame)
    kind, n = frame[0], len(frame)
    if kind == PUB:
        _check(n == 5 and _is_str(frame[1]) and _is_int(frame[3]) and _is_num(frame[4]), frame)
    elif kind == SUB:
        _check(
            n == 5
            and _is_str(frame[1])
            and _is_int(frame[2])
            and (frame[3] is None or _is_str(frame[3]))
            and _is_int(frame[4]),
            frame,
        )
    elif kind == UNSUB:
        _check(n == 2 and _is_str(frame[1]), frame)
    elif kind == HELLO:
        _check(n == 4 and _is_str(frame[1]) and _is_str(frame[2]) and isinstance(frame[3], list), frame)
        for item in frame[3]:
            _check(
                isinstance(item, list)
                and len(item) == 3
                and _is_str(item[0])
                and (item[1] is None or _is_str(item[1]))
                and _is_int(item[2]),
                item,
            )
    else:
        _check(n == 1, frame)
    return kind


def check_shard_frame(frame: Any) -> int:
    """Validate a frame a gateway received from a shard; return its kind."""
    _check(isinstance(frame, list) and frame and type(frame[0]) is int and frame[0] in SHARD_KINDS, frame)
    kind, n = frame[0], len(frame)
    if kind == MSG:
        _check(n == 5 and _is_str(frame[1]) and _is_int(frame[2]) and _is_num(frame[4]), frame)
    elif kind == SUBOK:
        _check(
            n == 7
            and _is_str(frame[1])
            and _is_int(frame[2])
            and _is_str(frame[3])
            and _is_int(frame[4])
            and type(frame[5]) is bool
            and isinstance(frame[6], list),
            frame,
        )
        for item in frame[6]:
            _check(isinstance(item, list) and len(item) == 3 and _is_int(item[0]), item)
    elif kind == PUBOK:
        _check(n == 4 and _is_str(frame[1]) and _is_int(frame[2]) and _is_int(frame[3]), frame)
    elif kind == WELCOME:
        _check(n == 3 and _is_str(frame[1]) and _is_str(frame[2]), frame)
    elif kind == NACK:
        _check(n == 4 and _is_int(frame[1]) and _is_str(frame[2]) and _is_str(frame[3]), frame)
    return kind
