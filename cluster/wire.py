"""The inter-node codec: what gateways and router shards say to each other over nng.

One nng message is a msgpack array
``[version, sender, frames, reply_as, session, counter, sent_at]`` sealed under the
cluster secret (:class:`LinkKey`): a keyed MAC by default, authenticated encryption
when the cluster asks for it. The nng ports are reachable by anything on the
network, so a message is acted on only when it authenticates and is not a replay
(:class:`ReplayGuard`): every ``(sender, session)`` numbers its messages upwards,
and a message more than :data:`MAX_AGE` seconds from the receiver's clock is
refused.

``frames`` batches many small frames (publications, deliveries, replies) so that
under load one message carries a hundred publications instead of one (an nng
message costs ~47 µs here; a packed publication a fraction of a microsecond).
Every frame is a short array whose first item is its kind. Both ends validate what
they receive: a frame of the wrong shape raises :class:`WireError`, the receiver
drops it and counts it, and nothing else is affected.

``sender`` is a shard's name, or a gateway's inbox address (where the shard sends
back). ``reply_as`` is set by gateways only: the name the gateway knows the shard by
(its ``--routers`` entry), which the shard uses as ``sender`` in everything it sends
to that gateway, so each gateway can match replies to its links whatever names the
shards give themselves.

A ``payload`` is the publication's msgpack bytes (``fanroute.codec.pack_payload``):
shards store and forward it without decoding it, and gateways check it when they
read it back.

Gateway → shard frames:
    HELLO  [1, inbox, instance, [[topic, epoch|None, seq], ...]]   full interest
    SUB    [2, topic, req, since_epoch|None, since_seq(, last)]    subscribe (interest +1); ``last``
                                                                   (optional, >= 0): the newest N
                                                                   to send when not recovered
    UNSUB  [3, topic]                                              last local subscriber left
    PUB    [4, topic, payload, req, ts, idem|None]                 req 0: no ack wanted
    BEAT   [5]                                                     gateway heartbeat
    CTRL   [30, id, kind, user, topic|None, reconnect]             a server API command (kind
                                                                   "disconnect" or "unsubscribe")
                                                                   for the shard to pass on
    REPORT [31, instance, connections, subscriptions, topics]      this gateway's counts, each beat
    INFOQ  [32, req]                                               ask for the shard's counts and
                                                                   its gateways' last reports
    COUNTS [6, [[topic, subscribers, watching], ...]]              this gateway's local subscriber
                                                                   count per topic (absolute, the
                                                                   changed topics only) and whether
                                                                   it wants the totals pushed
    COUNTQ [7, topic, req]                                         ask for a topic's total now

Shard → gateway frames:
    MSG    [20, topic, seq, payload, ts]                           a delivery
    SUBOK  [21, topic, req, epoch, seq, recovered, [[seq, payload, ts], ...]]
    PUBOK  [22, topic, req, seq]
    WELCOME [23, shard_epoch, instance]                            answer to HELLO and BEAT:
                                                                   the gateway instance the shard
                                                                   knows at that inbox ("" if none)
    NACK   [24, req, code, message]                                a request that failed
    RELAY  [50, id, kind, user, topic|None, reconnect]             a CTRL passed on to every gateway
                                                                   the shard knows (its sender too);
                                                                   gateways act once per id
    INFO   [51, req, [topics, gateways, interest_entries],         answer to INFOQ
            [[instance, inbox, connections, subscriptions, topics], ...]]
    TOTALS [25, [[topic, total, yours], ...]]                      cluster-wide subscriber counts,
                                                                   pushed to watching gateways
    COUNTA [26, topic, req, total, yours]                          answer to COUNTQ

Replication (``router/REPLICATION.md``):
    ROUTERS [8, [[name, url], ...]]                                gateway → shard, after HELLO: the
                                                                   whole router list, so routers
                                                                   find each other with no flag
    VIEW   [27, number, [name, ...]]                               shard → gateway: the routers of
                                                                   the installed view; a topic's
                                                                   shard is the first of them in
                                                                   its rendezvous order
    ROUTERS [8, [[name, url], ...]]                                shard → gateway as well: the
                                                                   router list grew (a router was
                                                                   added); the gateway links to it
    Router → router frames (sender: the router's name) are those of
    ``fanroute.router.replication`` (kinds 60-70), checked by :func:`check_peer_frame`,
    and PEER_ROUTERS [71, [[name, url], ...]]: the sender's router list, which a new
    router announces so the others add it (``RouterServer``).

``yours`` is the count of the receiving gateway inside ``total``, as the shard knows
it: the gateway replaces it with its own current count, so its own changes show at
once (see ``fanroute.gateway.presence``).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack

from fanroute.errors import WireError

WIRE_VERSION = 2

HELLO, SUB, UNSUB, PUB, BEAT, COUNTS, COUNTQ = 1, 2, 3, 4, 5, 6, 7
MSG, SUBOK, PUBOK, WELCOME, NACK, TOTALS, COUNTA = 20, 21, 22, 23, 24, 25, 26

GATEWAY_KINDS = frozenset({HELLO, SUB, UNSUB, PUB, BEAT, COUNTS, COUNTQ})
SHARD_KINDS = frozenset({MSG, SUBOK, PUBOK, WELCOME, NACK, TOTALS, COUNTA})

# The server API's frames (fanroute.gateway.control): commands relayed through the shards.
CTRL, REPORT, INFOQ = 30, 31, 32
RELAY, INFO = 50, 51
CONTROL_KINDS = ("disconnect", "unsubscribe")
GATEWAY_KINDS |= {CTRL, REPORT, INFOQ}
SHARD_KINDS |= {RELAY, INFO}

# Replication: the router list from gateways, the view to gateways, router ↔ router.
ROUTERS, VIEW = 8, 27
GATEWAY_KINDS |= {ROUTERS}
SHARD_KINDS |= {VIEW, ROUTERS}
(PEER_BEAT, PEER_BEATOK, PEER_PROPOSE, PEER_PROMISE, PEER_REFUSE, PEER_INSTALL, PEER_SYNC, PEER_SYNCDONE,
 PEER_APPEND, PEER_APPENDED, PEER_LEAVE, PEER_ROUTERS) = range(60, 72)
PEER_KINDS = frozenset(range(60, 72))
_MAX_ROUTERS = 1024

MAC_SIZE = 16
_NONCE_SIZE = 12
MAX_AGE = 120.0  # seconds: an older message is refused as a possible replay
MAX_PAYLOAD = 16 << 20  # a payload larger than this is malformed, whatever the config
_MAX_MESSAGE = 64 << 20  # nng messages larger than this are not even authenticated
_MAX_SESSIONS = 4096  # (sender, session) pairs remembered for replay checks


class LinkKey:
    """The cluster secret, as the key that seals every inter-node message.

    By default a message is ``mac || body`` with a 16-byte keyed BLAKE2b (stdlib,
    about a microsecond on a typical batch): authentic, readable on the wire. With
    ``encrypt`` it is ``nonce || ChaCha20-Poly1305(body)`` (``cryptography``, already
    installed for JWT): authentic and confidential, for networks that are not
    trusted. Both ends of a cluster must agree; a message sealed the other way fails
    to open and is dropped. The secret is stretched to a key of fixed size so that
    any string works.
    """

    __slots__ = ("_key", "_aead")

    def __init__(self, secret: str | bytes, *, encrypt: bool = False) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        if not raw:
            raise ValueError("the cluster secret must not be empty")
        self._key = hashlib.blake2b(raw, digest_size=32, person=b"fanroute-link").digest()
        self._aead = None
        if encrypt:
            from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

            self._aead = ChaCha20Poly1305(self._key)

    @classmethod
    def random(cls) -> LinkKey:
        """A key for a cluster that lives in one process (standalone, tests)."""
        return cls(secrets.token_bytes(32))

    @property
    def encrypts(self) -> bool:
        return self._aead is not None

    def seal(self, body: bytes) -> bytes:
        if self._aead is not None:
            nonce = secrets.token_bytes(_NONCE_SIZE)
            return nonce + self._aead.encrypt(nonce, body, None)
        return hashlib.blake2b(body, digest_size=MAC_SIZE, key=self._key).digest() + body

    def unseal(self, data: bytes) -> bytes:
        """The body of a sealed message; :class:`WireError` (``mac``) if it is not authentic."""
        if self._aead is not None:
            from cryptography.exceptions import InvalidTag

            if len(data) <= _NONCE_SIZE + MAC_SIZE:
                raise WireError("message too short", "malformed")
            try:
                return self._aead.decrypt(data[:_NONCE_SIZE], data[_NONCE_SIZE:], None)
            except InvalidTag:
                raise WireError("message does not authenticate", "mac") from None
        if len(data) <= MAC_SIZE:
            raise WireError("message too short", "malformed")
        body = data[MAC_SIZE:]
        expected = hashlib.blake2b(body, digest_size=MAC_SIZE, key=self._key).digest()
        if not hmac.compare_digest(data[:MAC_SIZE], expected):
            raise WireError("message MAC does not verify", "mac")
        return body


@dataclass(slots=True)
class Envelope:
    """What a verified message says about itself."""

    sender: str
    frames: list[Any]
    reply_as: str
    session: str
    counter: int
    sent_at: float


class Sealer:
    """Packs and signs this process's messages; one per process.

    ``session`` is fresh for each process start and ``counter`` only grows, so a
    receiver can refuse any message it has seen before.
    """

    def __init__(self, key: LinkKey) -> None:
        self.key = key
        self.session = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def pack(self, sender: str, frames: list[list[Any]], reply_as: str = "") -> bytes:
        body = msgpack.packb(
            [WIRE_VERSION, sender, frames, reply_as, self.session, next(self._counter), time.time()],
            use_bin_type=True,
        )
        return self.key.seal(body)


class ReplayGuard:
    """Opens messages: verifies the MAC, then refuses replays and stale messages.

    Remembers the highest counter of the last :data:`_MAX_SESSIONS` senders; only
    messages that carry a valid MAC can add one, so outsiders cannot grow it.
    """

    def __init__(self, key: LinkKey, *, max_age: float = MAX_AGE) -> None:
        self.key = key
        self.max_age = max_age
        self._last: OrderedDict[tuple[str, str], int] = OrderedDict()

    def open(self, data: bytes, now: float | None = None) -> Envelope:
        if len(data) > _MAX_MESSAGE:
            raise WireError("message too long", "malformed")
        env = _decode(self.key.unseal(data))
        now = time.time() if now is None else now
        if abs(now - env.sent_at) > self.max_age:
            raise WireError("message older than the replay window", "replay")
        key = (env.sender, env.session)
        last = self._last.get(key)
        if last is not None and env.counter <= last:
            raise WireError("message seen before", "replay")
        self._last[key] = env.counter
        self._last.move_to_end(key)
        if len(self._last) > _MAX_SESSIONS:
            self._last.popitem(last=False)
        return env


def _decode(body: bytes) -> Envelope:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise WireError(f"undecodable message: {type(exc).__name__}") from None
    if not isinstance(msg, list) or len(msg) != 7:
        raise WireError("message is not [version, sender, frames, reply_as, session, counter, sent_at]")
    version, sender, frames, reply_as, session, counter, sent_at = msg
    if version != WIRE_VERSION:
        raise WireError(f"unsupported wire version {version!r}")
    if not (
        _is_str(sender)
        and isinstance(frames, list)
        and _is_str(reply_as)
        and _is_str(session)
        and _is_int(counter)
        and _is_num(sent_at)
    ):
        raise WireError("bad sender, frames, reply_as, session, counter or sent_at")
    return Envelope(sender, frames, reply_as, session, counter, float(sent_at))


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_str(v: Any) -> bool:
    return type(v) is str


def _is_num(v: Any) -> bool:
    return type(v) in (int, float)


def _is_payload(v: Any) -> bool:
    return type(v) is bytes and len(v) <= MAX_PAYLOAD


def _check(ok: bool, frame: Any) -> None:
    if not ok:
        raise WireError(f"malformed frame {str(frame)[:80]}")


def check_gateway_frame(frame: Any) -> int:
    """Validate a frame a shard received from a gateway; return its kind."""
    _check(isinstance(frame, list) and frame and type(frame[0]) is int and frame[0] in GATEWAY_KINDS, frame)
    kind, n = frame[0], len(frame)
    if kind == PUB:
        _check(
            n == 6
            and _is_str(frame[1])
            and _is_payload(frame[2])
            and _is_int(frame[3])
            and _is_num(frame[4])
            and (frame[5] is None or _is_str(frame[5])),
            frame,
        )
    elif kind == SUB:
        _check(
            n in (5, 6)
            and _is_str(frame[1])
            and _is_int(frame[2])
            and (frame[3] is None or _is_str(frame[3]))
            and _is_int(frame[4])
            and (n == 5 or (_is_int(frame[5]) and frame[5] >= 0)),
            frame,
        )
    elif kind == COUNTS:
        _check(n == 2 and isinstance(frame[1], list), frame)
        for item in frame[1]:
            _check(
                isinstance(item, list)
                and len(item) == 3
                and _is_str(item[0])
                and _is_int(item[1])
                and item[1] >= 0
                and type(item[2]) is bool,
                item,
            )
    elif kind == COUNTQ:
        _check(n == 3 and _is_str(frame[1]) and _is_int(frame[2]), frame)
    elif kind == UNSUB:
        _check(n == 2 and _is_str(frame[1]), frame)
    elif kind == CTRL:
        _check_control(frame)
    elif kind == REPORT:
        _check(n == 5 and _is_str(frame[1]) and all(_is_count(v) for v in frame[2:]), frame)
    elif kind == INFOQ:
        _check(n == 2 and _is_int(frame[1]), frame)
    elif kind == ROUTERS:
        _check_router_list(frame)
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


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


def _check_control(frame: list[Any]) -> None:
    """CTRL and RELAY: ``[kind, id, what, user, topic|None, reconnect]``."""
    _check(
        len(frame) == 6
        and _is_str(frame[1])
        and 0 < len(frame[1]) <= 64
        and frame[2] in CONTROL_KINDS
        and _is_str(frame[3])
        and (frame[4] is None or _is_str(frame[4]))
        and type(frame[5]) is bool,
        frame,
    )


def check_shard_frame(frame: Any) -> int:
    """Validate a frame a gateway received from a shard; return its kind."""
    _check(isinstance(frame, list) and frame and type(frame[0]) is int and frame[0] in SHARD_KINDS, frame)
    kind, n = frame[0], len(frame)
    if kind == MSG:
        _check(n == 5 and _is_str(frame[1]) and _is_int(frame[2]) and _is_payload(frame[3]) and _is_num(frame[4]), frame)
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
            _check(
                isinstance(item, list) and len(item) == 3 and _is_int(item[0]) and _is_payload(item[1]) and _is_num(item[2]),
                item,
            )
    elif kind == PUBOK:
        _check(n == 4 and _is_str(frame[1]) and _is_int(frame[2]) and _is_int(frame[3]), frame)
    elif kind == WELCOME:
        _check(n == 3 and _is_str(frame[1]) and _is_str(frame[2]), frame)
    elif kind == NACK:
        _check(n == 4 and _is_int(frame[1]) and _is_str(frame[2]) and _is_str(frame[3]), frame)
    elif kind == RELAY:
        _check_control(frame)
    elif kind == INFO:
        _check(
            n == 4
            and _is_int(frame[1])
            and isinstance(frame[2], list)
            and len(frame[2]) == 3
            and all(_is_count(v) for v in frame[2])
            and isinstance(frame[3], list),
            frame,
        )
        for item in frame[3]:
            _check(
                isinstance(item, list)
                and len(item) == 5
                and _is_str(item[0])
                and _is_str(item[1])
                and all(_is_count(v) for v in item[2:]),
                item,
            )
    elif kind == TOTALS:
        _check(n == 2 and isinstance(frame[1], list), frame)
        for item in frame[1]:
            _check(
                isinstance(item, list) and len(item) == 3 and _is_str(item[0]) and _is_int(item[1]) and _is_int(item[2]),
                item,
            )
    elif kind == COUNTA:
        _check(
            n == 5 and _is_str(frame[1]) and _is_int(frame[2]) and _is_int(frame[3]) and _is_int(frame[4]), frame
        )
    elif kind == VIEW:
        _check(n == 3 and _is_int(frame[1]) and _is_names(frame[2]), frame)
    elif kind == ROUTERS:
        _check_router_list(frame)
    return kind


def _check_router_list(frame: list[Any]) -> None:
    _check(len(frame) == 2 and isinstance(frame[1], list) and 0 < len(frame[1]) <= _MAX_ROUTERS, frame)
    for item in frame[1]:
        _check(isinstance(item, list) and len(item) == 2 and _is_str(item[0]) and _is_str(item[1]), item)


def _is_names(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= _MAX_ROUTERS and all(_is_str(x) for x in v)


def check_peer_frame(frame: Any) -> int:
    """Validate a frame a router received from another router; return its kind.

    The kinds and their meaning are ``fanroute.router.replication``'s.
    """
    _check(isinstance(frame, list) and frame and type(frame[0]) is int and frame[0] in PEER_KINDS, frame)
    kind, n, f = frame[0], len(frame), frame
    if kind == PEER_BEAT:
        ok = n == 5 and _is_int(f[1]) and _is_int(f[2]) and _is_str(f[3]) and _is_int(f[4])
    elif kind in (PEER_BEATOK, PEER_REFUSE, PEER_SYNCDONE):
        ok = n == 3 and _is_int(f[1]) and _is_int(f[2])
    elif kind == PEER_PROPOSE:
        ok = n == 3 and _is_int(f[1]) and _is_names(f[2])
    elif kind == PEER_PROMISE:
        ok = n == 4 and _is_int(f[1]) and _is_int(f[2]) and _is_names(f[3])
    elif kind == PEER_INSTALL:
        ok = n == 6 and _is_int(f[1]) and _is_names(f[2]) and _is_int(f[3]) and _is_names(f[4]) and _is_names(f[5])
    elif kind == PEER_SYNC:
        ok = (
            n == 6 and _is_int(f[1]) and _is_str(f[2]) and _is_str(f[3]) and _is_int(f[4]) and isinstance(f[5], list)
            and all(
                isinstance(e, list) and len(e) == 4 and _is_int(e[0]) and _is_payload(e[1]) and _is_num(e[2])
                and (e[3] is None or _is_str(e[3]))
                for e in f[5]
            )
        )
    elif kind == PEER_APPEND:
        ok = (
            n == 8 and _is_int(f[1]) and _is_str(f[2]) and _is_str(f[3]) and _is_int(f[4]) and _is_payload(f[5])
            and _is_num(f[6]) and (f[7] is None or _is_str(f[7]))
        )
    elif kind == PEER_APPENDED:
        ok = n == 4 and _is_int(f[1]) and _is_str(f[2]) and _is_int(f[3])
    elif kind == PEER_ROUTERS:
        _check_router_list(f)
        ok = True
    else:  # PEER_LEAVE
        ok = n == 1
    _check(ok, frame)
    return kind
