"""Property tests: the pure cores never raise, whatever arrives.

The gateway and router shells catch what escapes the cores, but a frame that raises
there takes the rest of its batch with it, and a client command that raises is
answered ``internal``. So the cores themselves must turn every bad input into their
own error (:class:`ProtocolError`, :class:`WireError`) or a counted drop:

* codecs and command parsing, over arbitrary and structured-but-hostile input;
* the inter-node wire: sealed messages and frames;
* the gateway hub, driven as a state machine against real router shards, a link
  model that loses and reorders nothing it should not, and forged or junk frames;
* the router shard, over arbitrary batches from several senders and sweeps.

Inputs that trip a reported bug are left out where noted (``KNOWN BUG``); widen
the strategies again once it is fixed.
"""

from __future__ import annotations

import json
import math
import struct
import time
from typing import Any

import msgpack
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fanroute import protocol as p
from fanroute import wire
from fanroute.codec import Encoding, pack_payload, unpack_payload
from fanroute.codes import ErrorCode
from fanroute.config import is_nng_url
from fanroute.errors import ProtocolError, WireError
from fanroute.gateway.hub import ACTIVE, PENDING, Hub, Session
from fanroute.ring import Ring
from fanroute.router.shard import Shard

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- hostile values ------------------------------------------------------------

BIG_INTS = [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30, -(10**30), 2**1000]
surrogate_text = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
texts = st.one_of(
    st.text(max_size=12),
    surrogate_text,
    st.lists(st.one_of(st.text(max_size=3), surrogate_text), max_size=3).map("".join),
)
ints = st.one_of(st.integers(), st.sampled_from(BIG_INTS))
floats = st.floats(allow_nan=True, allow_infinity=True)
json_leaves = st.one_of(st.none(), st.booleans(), ints, floats, texts)
hostile_leaves = st.one_of(
    json_leaves,
    st.binary(max_size=8),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999)),
    st.tuples(st.integers(0, 3)),
    st.frozensets(st.integers(0, 3), max_size=2),
)
hashable_keys = st.one_of(texts, st.integers(-3, 3), st.binary(max_size=3), st.none(), st.booleans(), st.just(1.5))


def _nest(depth: int, shape: str, leaf: Any) -> Any:
    """``leaf`` inside ``depth`` containers, built without recursion."""
    value = leaf
    for i in range(depth):
        if shape == "list" or (shape == "mixed" and i % 2):
            value = [value]
        else:
            value = {"k": value}
    return value


def deep(leaves: st.SearchStrategy[Any], max_depth: int = 400) -> st.SearchStrategy[Any]:
    return st.builds(_nest, st.integers(0, max_depth), st.sampled_from(["list", "dict", "mixed"]), leaves)


json_like = st.recursive(
    json_leaves,
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(texts, ch, max_size=4),
    max_leaves=20,
)
hostile = st.one_of(
    st.recursive(
        hostile_leaves,
        lambda ch: st.lists(ch, max_size=4) | st.dictionaries(hashable_keys, ch, max_size=4),
        max_leaves=20,
    ),
    deep(hostile_leaves),
    deep(json_like, 80),  # around the 64-level cap
)


def _no_surrogates(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and any("\ud800" <= c <= "\udfff" for c in item):
            return False
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, frozenset)):
            stack.extend(item)
    return True


def _has_infinity(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and math.isinf(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# One of each kind of payload that must be refused (or only just accepted), alone.
HOSTILE_PAYLOADS = [
    _nest(300, "list", 0), _nest(65, "list", 0), _nest(64, "list", 0), _nest(64, "mixed", "x"), _nest(200, "dict", None),
    b"bytes", {"k": b"x"}, msgpack.ExtType(3, b"x"), msgpack.Timestamp(1, 0), {1: 2}, {b"k": 1}, {None: 1},
    2**64 - 1, 2**64, 2**63 - 1, -(2**63), -(2**63) - 1, 10**30, math.inf, -math.inf, math.nan, [math.nan], {"n": math.nan},
    "x" * 700, ["y" * 200] * 4, "", [], {}, (1, 2), frozenset([1]),
]
# What a publisher can hand to pack_payload. KNOWN BUG (reported): a str holding a
# lone surrogate makes pack_payload raise UnicodeEncodeError instead of ProtocolError;
# neither client decoder can produce one, so they are left out of the payload
# properties (they stay in the decoder properties below).
payload_values = st.one_of(
    hostile, json_like, deep(st.sampled_from([0, "x", None, [], {}, 1.5]), 400), st.sampled_from(HOSTILE_PAYLOADS)
).filter(_no_surrogates)


def json_text(value: Any) -> str:
    """JSON text for any value, including what no JSON encoder writes.

    Integers of any size, NaN and infinities as bare words, lone surrogates as
    ``\\ud800`` escapes; what JSON has no form for becomes a string.
    """
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if math.isinf(value):
            return "1e400" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # ensure_ascii: surrogates become \\udXXX escapes
    if isinstance(value, list):
        return "[" + ",".join(json_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{json_text(v)}" for k, v in value.items()) + "}"
    return json.dumps(repr(value))


def msgpack_bytes(value: Any) -> bytes:
    """msgpack for any value msgpack can hold; lone surrogates are written as (invalid) UTF-8."""
    try:
        return msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")
    except (OverflowError, TypeError, ValueError):
        return b"\xc1"  # the one byte msgpack never uses


JSON_WORDS = [
    "null", "true", "false", "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E-400",
    "123456789012345678901234567890", "-0", "0.0", "01", "1.", ".5", '"\\ud800"', '"\\udc00x"',
    '"\\ud800\\udc00"', '"\\u0000"', '"\\x"', '"abc', "[1,]", "{", "}", '{"a"}', '{"a":1,}', "\ufeff{}",
]
json_fragments = st.recursive(
    st.one_of(st.sampled_from(JSON_WORDS), json_like.map(json_text)),
    lambda ch: st.lists(ch, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
    | st.lists(st.tuples(texts.map(json.dumps), ch), max_size=4).map(
        lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
    ),
    max_leaves=12,
)
deep_json = st.builds(lambda n, o, c: o * n + "0" + c * n, st.integers(0, 1100), st.sampled_from(["[", '{"a":']),
                      st.sampled_from(["]", "}"]))
COMMAND_KEYS = ["type", "topic", "payload", "id", "since", "idem", "ts", "token"]
command_json = st.lists(
    st.tuples(st.sampled_from(COMMAND_KEYS), st.one_of(
        st.sampled_from(['"publish"', '"subscribe"', '"unsubscribe"', '"ping"', '"connect"', '"refresh"', '"t0"', "7"]),
        json_fragments,
    )),
    max_size=6,
).map(lambda kv: "{" + ",".join(f'"{k}":{v}' for k, v in kv) + "}")
json_messages = st.one_of(st.text(), json_fragments, deep_json, command_json, hostile.map(json_text))

deep_msgpack = st.builds(
    lambda n, head, tail: head * n + tail,
    st.integers(0, 1100),
    st.sampled_from([b"\x91", b"\x81\xa1k", b"\x81\x01"]),
    st.sampled_from([b"\xc0", b"\x01", b"\xc4\x01x", b"\xd4\x05\x00"]),
)
command_msgpack = st.dictionaries(
    st.sampled_from(COMMAND_KEYS),
    st.one_of(st.sampled_from(["publish", "subscribe", "unsubscribe", "ping", "connect", "t0", 7]), hostile),
    max_size=6,
).map(msgpack_bytes)
msgpack_messages = st.one_of(
    st.binary(max_size=64),
    hostile.map(msgpack_bytes),
    deep_msgpack,
    command_msgpack,
    command_msgpack.flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda i: b[:i])),  # truncated
)


# --- 1. codecs and command parsing --------------------------------------------


def _decode_and_parse(encoding: Encoding, message: str | bytes) -> None:
    try:
        value = encoding.decode(message)
    except ProtocolError as err:
        assert err.code == ErrorCode.BAD_REQUEST
        return
    try:
        p.parse_command(value)
    except ProtocolError:
        pass


@FUZZ
@given(json_messages)
def test_json_client_frames_raise_only_protocol_error(message):
    _decode_and_parse(Encoding.JSON, message)
    _decode_and_parse(Encoding.MSGPACK, message)  # text on a msgpack connection


@FUZZ
@given(msgpack_messages)
def test_msgpack_client_frames_raise_only_protocol_error(message):
    _decode_and_parse(Encoding.MSGPACK, message)
    _decode_and_parse(Encoding.JSON, message)  # binary on a JSON connection


@FUZZ
@given(st.one_of(hostile, json_like, st.dictionaries(st.sampled_from(COMMAND_KEYS), hostile, max_size=6)))
def test_parse_command_raises_only_protocol_error(value):
    for frame in (value, {"type": "publish", "topic": "t", "payload": value}, {"type": "subscribe", "topic": "t", "since": value},
                  {"type": value, "topic": value, "id": value, "idem": value}, {"topic": value, "payload": value}):
        try:
            p.parse_command(frame)
        except ProtocolError:
            pass


@FUZZ
@given(payload_values, st.one_of(st.just(1 << 16), st.integers(0, 1 << 14)))
def test_an_accepted_payload_reaches_every_encoding_unchanged(value, limit):
    try:
        data = pack_payload(value, limit)
    except ProtocolError as err:
        assert err.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)
        return
    assert len(data) <= limit
    assert unpack_payload(data) == value
    event = p.message_event("t", value, 1)
    as_json = Encoding.JSON.encode(event)
    as_msgpack = Encoding.MSGPACK.encode(event)
    assert msgpack.unpackb(_ws_data(as_msgpack)[1]) == event
    if not _has_infinity(value):
        # Infinities are left out: JSON subscribers are sent null (reported finding).
        assert orjson.loads(_ws_data(as_json)[1]) == event


@FUZZ
@given(st.one_of(st.binary(max_size=64), msgpack_messages, hostile.map(msgpack_bytes), hostile))
def test_unpack_payload_raises_only_protocol_error_and_accepts_only_deliverable_values(data):
    try:
        value = unpack_payload(data)
    except ProtocolError:
        return
    event = p.message_event("t", value, 1)
    Encoding.JSON.encode(event)
    Encoding.MSGPACK.encode(event)
    assert pack_payload(value, 1 << 20) is not None


# --- 2. the wire ----------------------------------------------------------------

KEYS = [wire.LinkKey("a-cluster-secret-for-tests"), wire.LinkKey("a-cluster-secret-for-tests", encrypt=True)]
NOW = 1_000_000.0
KINDS = sorted(wire.GATEWAY_KINDS | wire.SHARD_KINDS)

frame_fields = st.one_of(
    hostile,
    st.sampled_from(["t0", "", "E-1", "tcp://127.0.0.1:7201"]),
    st.integers(-2, 30),
    st.binary(max_size=16),
    st.booleans(),
    st.lists(st.lists(st.one_of(st.integers(0, 5), st.binary(max_size=4), st.text(max_size=3), st.none()), max_size=4), max_size=3),
)
frames = st.one_of(
    hostile,
    st.builds(lambda k, rest: [k, *rest], st.one_of(st.sampled_from(KINDS), st.integers(-3, 40), st.just(True), st.just(1.0)),
              st.lists(frame_fields, max_size=7)),
)


@FUZZ
@given(frames)
def test_frame_checks_raise_only_wire_error(frame):
    for check, kinds in ((wire.check_gateway_frame, wire.GATEWAY_KINDS), (wire.check_shard_frame, wire.SHARD_KINDS)):
        try:
            kind = check(frame)
        except WireError as err:
            assert err.reason == "malformed"
        else:
            assert kind in kinds and kind == frame[0]


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(KEYS), st.floats(allow_nan=False))
def test_opening_arbitrary_bytes_raises_only_wire_error(data, key, now):
    try:
        wire.ReplayGuard(key).open(data, now=now)
    except WireError:
        pass
    else:
        raise AssertionError("arbitrary bytes authenticated")


ENVELOPE_FIELDS = [
    st.sampled_from([wire.WIRE_VERSION, 1, 3, "2", 2.0, True, None]),
    st.sampled_from(["tcp://127.0.0.1:7201", "r0", ""]),
    st.lists(frames, max_size=4),
    st.sampled_from(["", "r0"]),
    st.sampled_from(["s1", "s2"]),
    st.one_of(st.integers(0, 5), ints),
    st.one_of(st.floats(NOW - 200, NOW + 200), st.integers(int(NOW) - 200, int(NOW) + 200), floats, ints),
]


@st.composite
def envelopes(draw) -> Any:
    """A message body: a well-formed envelope with some fields broken, or anything at all."""
    if draw(st.integers(0, 4)) == 4:
        return draw(st.one_of(hostile, st.lists(frame_fields, max_size=8)))
    body = [wire.WIRE_VERSION, "tcp://127.0.0.1:7201", draw(st.lists(frames, max_size=4)), "r0", "s1",
            draw(st.integers(0, 5)), NOW]
    for i in draw(st.lists(st.integers(0, 6), max_size=2)):
        body[i] = draw(st.one_of(ENVELOPE_FIELDS[i], frame_fields))
    if draw(st.integers(0, 9)) == 9:
        body = body[: draw(st.integers(0, 6))] if draw(st.booleans()) else [*body, draw(frame_fields)]
    return body


@FUZZ
@given(st.lists(st.one_of(envelopes().map(msgpack_bytes), st.binary(max_size=40)), min_size=1, max_size=4), st.sampled_from(KEYS))
def test_authentic_bodies_either_open_or_raise_wire_error(bodies, key):
    guard = wire.ReplayGuard(key)
    for body in bodies:
        try:
            env = guard.open(key.seal(body), now=NOW)
        except WireError as err:
            assert err.reason in ("malformed", "replay")
            continue
        assert type(env.sender) is str and type(env.reply_as) is str and type(env.session) is str
        assert isinstance(env.frames, list) and type(env.counter) is int and type(env.sent_at) is float


# --- 3. the gateway hub ---------------------------------------------------------

GW = "tcp://127.0.0.1:7201"
FOREIGN_GW = "tcp://127.0.0.1:7299"
TOPICS = ["t0", "t1", "t2", "t3", "t4"]


class AnyBytes:
    """A session's outbox: keeps every frame, whatever it holds."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def push(self, frame: bytes) -> None:
        assert type(frame) is bytes
        self.frames.append(frame)


def _ws_data(frame: bytes) -> tuple[int, bytes]:
    """Opcode and payload of one server frame, checking its header."""
    first, second = frame[0], frame[1]
    assert first & 0x80 and not second & 0x80, "a final, unmasked frame"
    n, offset = second & 0x7F, 2
    if n == 126:
        (n,), offset = struct.unpack("!H", frame[2:4]), 4
    elif n == 127:
        (n,), offset = struct.unpack("!Q", frame[2:10]), 10
    assert len(frame) - offset == n, "the length in the header is the frame's"
    return first & 0x0F, frame[offset:]


def decode_event(frame: bytes, encoding: Encoding) -> dict[str, Any]:
    opcode, data = _ws_data(frame)
    if encoding is Encoding.JSON:
        assert opcode == 0x1
        event = orjson.loads(data)
    else:
        assert opcode == 0x2
        event = msgpack.unpackb(data, raw=False, strict_map_key=True)
    assert isinstance(event, dict)
    return event


class Client:
    """What the test knows about one session: frames checked so far and streams followed."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.checked = 0
        self.frames_at_close: int | None = None
        self.streams: dict[str, int | None] = {}  # topic -> last seq since the latest `subscribed`
        self.epochs: dict[str, str] = {}  # topic -> the epoch of that `subscribed`


def _js(value: Any) -> str:
    return orjson.dumps(value).decode()


# The hub machine draws many steps, so its values are cheap to draw: small JSON, and
# the hostile cases as a fixed list rather than built each time.
small_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([0.5, -0.0, 1e300]), st.text(max_size=4)),
    lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "c"]), ch, max_size=3),
    max_leaves=6,
)
HOSTILE_JSON_PAYLOADS = ["1e400", "NaN", "123456789012345678901234567890", '"\\ud800"', "[" * 300 + "]" * 300,
                         "[" * 64 + "]" * 64, "[" * 65 + "1" + "]" * 65, '{"a":' * 70 + "1" + "}" * 70]
JUNK_MESSAGES_JSON = ["", "{", "[]", "null", '"x"', "{}", '{"type":"nope"}', '{"type":5}', "\ud800", '{"type":"publish"}',
                      '{"id":1.5,"type":"ping"}', "[" * 1100 + "]" * 1100, '{"topic":"t0"}', '{"type":"subscribe","topic":"t0","since":5}']
JUNK_MESSAGES_MSGPACK = [b"", b"\xc1", b"\x91" * 1100 + b"\xc0", msgpack.packb({1: 2}), msgpack.packb([1]),
                         msgpack.packb({"type": "ping", "ts": msgpack.ExtType(1, b"")}), msgpack.packb({b"type": b"ping"}),
                         b"\xa3\xed\xa0\x80", msgpack.packb({"type": "subscribe", "topic": "t0"})[:-1],
                         msgpack.packb({"type": "publish", "topic": "t0", "payload": b"x"})]


@st.composite
def client_messages(
    draw, encoding: Encoding, subscribed: list[str], followed: list[str], positions: list[tuple[str, int]]
) -> str | bytes:
    """One client frame in ``encoding``: mostly a valid command, now and then a hostile one.

    Topics are picked where something happens: new ones to subscribe, followed ones
    to publish on, subscribed ones to leave; a ``since`` is mostly a position some
    client reached. One frame in five has a field made hostile.
    """
    kind = draw(st.sampled_from(["publish"] * 5 + ["subscribe"] * 4 + ["unsubscribe", "plain", "ping", "junk"]))
    if kind == "junk":
        if encoding is Encoding.JSON:
            return draw(st.one_of(st.sampled_from(JUNK_MESSAGES_JSON), st.text(max_size=6)))
        return draw(st.one_of(st.sampled_from(JUNK_MESSAGES_MSGPACK), st.binary(max_size=6)))
    hostile = draw(st.sampled_from([None] * 24 + ["topic", "id", "since", "idem", "payload", "payload"]))
    fresh = [t for t in TOPICS if t not in subscribed]
    likely = {"subscribe": fresh, "unsubscribe": subscribed, "publish": followed, "plain": followed}.get(kind) or TOPICS
    topic = draw(st.sampled_from(likely) if draw(st.integers(0, 9)) < 9 else st.sampled_from(TOPICS))
    fields: dict[str, Any] = {}
    if kind != "plain":  # the source design's style: {topic, payload} with no type
        fields["type"] = kind
    if draw(st.booleans()):
        fields["id"] = draw(st.integers(0, 50))
    if hostile == "id":
        fields["id"] = draw(st.sampled_from([-1, True, "3", 2**53, 1.0, None]))
    fields["topic"] = draw(st.sampled_from(["", "a b", "ü", 5, None, "x" * 257])) if hostile == "topic" else topic
    if kind == "subscribe" and draw(st.booleans()):
        if positions and draw(st.integers(0, 3)) < 3:
            epoch, seq = draw(st.sampled_from(positions))
        else:
            epoch, seq = draw(st.sampled_from(["Er0a-1", "Er1a-1", "x"])), draw(st.integers(0, 12))
        fields["since"] = {"epoch": epoch, "seq": seq}
    if kind == "subscribe" and hostile == "since":
        fields["since"] = draw(st.sampled_from([5, [], {"epoch": 1, "seq": 1}, {"epoch": "e", "seq": -1},
                                                {"epoch": "e", "seq": True}, {"epoch": "e" * 65, "seq": 1}]))
    if kind == "ping":
        # KNOWN BUG (reported): a ts nested 254+ levels makes hub.ping raise on a JSON
        # session (orjson writes fewer levels than it reads), so ts stays shallower here.
        fields["ts"] = draw(st.one_of(small_json, st.sampled_from([_nest(200, "list", 1), 2**64 - 1, 1e300]),
                                      st.sampled_from([msgpack.ExtType(1, b"x"), b"x", {1: 2}, 2**63 - 1])
                                      if encoding is Encoding.MSGPACK else small_json))
    if kind in ("publish", "plain"):
        payload: Any = draw(st.sampled_from(HOSTILE_PAYLOADS) if hostile == "payload" else small_json)
        if draw(st.booleans()):
            fields["idem"] = draw(st.sampled_from(["k1", "k2", "k3"]))
        if hostile == "idem":
            fields["idem"] = draw(st.sampled_from(["", "x" * 65, 5, []]))
        if encoding is Encoding.JSON:
            text = (draw(st.sampled_from(HOSTILE_JSON_PAYLOADS)) if hostile == "payload" and draw(st.booleans())
                    else json_text(payload))
            return "{" + ",".join([*(f"{_js(k)}:{json_text(v)}" for k, v in fields.items()), f'"payload":{text}']) + "}"
        fields["payload"] = payload
    if encoding is Encoding.JSON:
        return "{" + ",".join(f"{_js(k)}:{json_text(v)}" for k, v in fields.items()) + "}"
    data = msgpack_bytes(fields)
    if data == b"\xc1":  # the payload has no msgpack form: a client could not send it
        fields["payload"] = None
        data = msgpack_bytes(fields)
    return data


JUNK_PAYLOADS = [
    msgpack.packb(b"raw bytes"),
    b"\x91" * 300 + b"\x01",  # 300 nested arrays
    b"\x81\xa1k" * 100 + b"\x01",
    msgpack.packb(msgpack.ExtType(5, b"x")),
    msgpack.packb({1: 2}),
    msgpack.packb(2**64 - 1) + b"trailing",
    b"\xa3\xed\xa0\x80",  # a lone surrogate as UTF-8
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN
    b"",
    b"\xc1",
]
JUNK_FRAMES = [
    [], [None], "frame", b"frame", 5, {"a": 1}, [wire.MSG], [wire.MSG, "t0", 1, "text", 0.0], [wire.MSG, "t0", "1", b"\x01", 0.0],
    [wire.MSG, "t0", 1, b"\x01"], [wire.SUBOK, "t0", 1, "e", 3, 1, []], [wire.SUBOK, "t0", 1, "e", 3, True, [[1, {}, 0.0]]],
    [wire.SUBOK, "t0", 1, "e", 3, True, [[1]]], [wire.SUBOK, "t0", 1, "e", 3, True, "x"], [wire.PUBOK, "t0", 1],
    [wire.PUBOK, "t0", 1, 2.5], [wire.WELCOME, "e"], [wire.WELCOME, 1, "gw-1"], [wire.NACK, "1", "x", "y"],
    [wire.PUB, "t0", b"\x01", 0, 0.0, None], [wire.HELLO, "a", "b", []], [True, "t0"], [20.0, "t0", 1, b"\x01", 0.0],
    [wire.MSG, "t0", 1, b"\x01" * (wire.MAX_PAYLOAD + 1), 0.0], _nest(300, "list", wire.MSG), [_nest(300, "mixed", 1)],
    [wire.SUBOK, "t0", 1, "e", 3, True, [_nest(300, "list", 1)]], [99, 1, 2, 3],
]
shard_payloads = st.one_of(
    st.sampled_from(JUNK_PAYLOADS),
    st.binary(max_size=6),
    small_json.map(msgpack_bytes),
    st.sampled_from([msgpack.packb(i) for i in range(4)]),
)


class HubMachine(RuleBasedStateMachine):
    """A hub, a real shard behind each ring name, and the links between them.

    Frames go gateway → shard only when the link is connected and the sender took
    them (``handed_off``); each direction is its own FIFO, and losing a link may or may
    not lose what was in flight either way. On top of that, frames are forged from
    the hub's own pending requests and junk is thrown in. Topics that received a forged
    MSG or SUBOK are exempt from the ordering check (the hub trusts its shard's order),
    not from any other.
    """

    @initialize(
        n=st.integers(2, 3),
        max_payload=st.sampled_from([64, 512, 1 << 16]),
        history_size=st.sampled_from([4, 2, 1, 0]),
        history_bytes=st.sampled_from([1 << 20, 1500, 500, 0]),
        forge_streams=st.booleans(),
    )
    def setup(self, n, max_payload, history_size, history_bytes, forge_streams):
        self.names = [f"r{i}" for i in range(n)]
        self.hub = Hub(Ring(self.names), inbox=GW, instance="gw-1", max_payload=max_payload)
        self.shard_args = dict(history_size=history_size, history_bytes=history_bytes, history_ttl=3.0, gateway_timeout=4.0)
        self.restarts = 0
        self.shards = {name: Shard(name, epoch=f"E{name}a", **self.shard_args) for name in self.names}
        self.link = {name: False for name in self.names}  # connected?
        self.out: dict[str, list[list[Any]]] = {name: [] for name in self.names}  # batches on their way to the shard
        self.back: dict[str, list[Any]] = {name: [] for name in self.names}  # frames on their way to the hub
        self.clients: list[Client] = []
        self.tainted: set[str] = set()
        self.positions: set[tuple[str, int]] = set()  # (epoch, seq) clients reached, for their `since`
        # Whether forged frames may lie about a stream (MSG, SUBOK): half the examples,
        # so that the other half checks the order of every topic.
        self.forge_streams = forge_streams
        self.now = 0.0
        for encoding in (Encoding.JSON, Encoding.MSGPACK):
            self.clients.append(Client(Session(f"s{len(self.clients)}", encoding, AnyBytes())))
        for name in self.names:  # the links come up; link_change takes them down
            self._connect(name)
        self.do_pump()

    # --- helpers ---------------------------------------------------------------

    def _shard(self, i: int) -> str:
        return self.names[i % len(self.names)]

    def _live(self) -> list[Client]:
        return [c for c in self.clients if not c.session.closed]

    def _connect(self, name: str) -> None:
        self.link[name] = True
        self.hub.link_up(name)

    def _send(self, name: str) -> None:
        frames = self.hub.to_shards[name]
        if frames:
            self.hub.to_shards[name] = []
            self.hub.handed_off(name)
            self.out[name].append(frames)

    def _collect(self, name: str) -> None:
        out = self.shards[name].take_outbound()
        for inbox in out:
            assert is_nng_url(inbox)
        self.back[name].extend(out.get(GW, []))

    def _process(self, name: str) -> None:
        if self.out[name]:
            self.shards[name].receive(GW, self.out[name].pop(0), self.now, reply_as=name)
            self._collect(name)

    def _deliver(self, name: str, count: int) -> None:
        frames, self.back[name] = self.back[name][:count], self.back[name][count:]
        self.hub.on_shard_frames(name, frames)

    # --- steps -------------------------------------------------------------------
    #
    # One rule draws what happens next, with weights: clients speak and links carry
    # frames more often than links fail. (Separate rules would be switched off at
    # random per example, and most examples would then never deliver anything.)

    ACTIONS = (
        ["command"] * 8 + ["pump"] * 5 + ["link_step"] * 3 + ["flap"] * 2 + ["link_change"] * 2
        + ["open", "open", "close", "close", "forged", "forged", "foreign_publish", "foreign_publish"]
        + ["revoke", "tick", "junk"]
    )

    @rule(data=st.data())
    def step(self, data):
        action = data.draw(st.sampled_from(self.ACTIONS), label="action")
        getattr(self, f"do_{action}")(data)

    def do_open(self, data):
        if len(self._live()) < 4:
            encoding = data.draw(st.sampled_from([Encoding.JSON, Encoding.MSGPACK]))
            self.clients.append(Client(Session(f"s{len(self.clients)}", encoding, AnyBytes())))

    def do_command(self, data):
        if not self._live():
            return self.do_open(data)
        for _ in range(data.draw(st.integers(1, 3), label="commands")):
            self._command(data)

    def _command(self, data):
        session = data.draw(st.sampled_from(self._live()), label="client").session
        message = data.draw(
            client_messages(session.encoding, sorted(session.topics), sorted(self.hub.topics), sorted(self.positions)),
            label="message",
        )
        try:
            cmd = p.parse_command(session.encoding.decode(message))
        except ProtocolError as err:
            self.hub.reject(session, err)
            return
        if isinstance(cmd, p.Ping):
            self.hub.ping(session, cmd)
        elif isinstance(cmd, p.Publish):
            self.hub.publish(session, cmd)
        elif isinstance(cmd, p.Subscribe):
            self.hub.subscribe(session, cmd)
        elif isinstance(cmd, p.Unsubscribe):
            self.hub.unsubscribe(session, cmd)

    def do_revoke(self, data):
        if self._live():
            client = data.draw(st.sampled_from(self._live()), label="client")
            self.hub.revoke(client.session, data.draw(st.sampled_from(TOPICS)))

    def do_close(self, data):
        if self._live():
            client = data.draw(st.sampled_from(self._live()), label="client")
            client.frames_at_close = len(client.session.outbox.frames)
            self.hub.close_session(client.session)

    def do_link_step(self, data):
        """One move of one link: the sender takes the queue, the shard reads a batch, answers arrive."""
        name = self._shard(data.draw(st.integers(0, 2), label="shard"))
        move = data.draw(st.sampled_from(["send", "send", "process", "process", "deliver", "beat"]), label="move")
        if move == "send" and self.link[name]:
            self._send(name)
        elif move == "process":
            self._process(name)
        elif move == "deliver":
            self._deliver(name, data.draw(st.integers(1, 20), label="count"))
        elif move == "beat" and self.link[name]:
            self.hub.to_shards[name].append([wire.BEAT])

    def do_link_change(self, data):
        """A link comes up or is lost, or its shard restarts (losing its state).

        Each direction is its own connection: what was in flight may arrive or not.
        """
        name = self._shard(data.draw(st.integers(0, 2), label="shard"))
        change = data.draw(st.sampled_from(["connect", "connect", "connect", "disconnect", "restart"]), label="change")
        if change == "connect":
            if not self.link[name]:
                self._connect(name)
            return
        keep_out = data.draw(st.booleans(), label="keep_out") and change != "restart"
        if change == "restart":
            self.restarts += 1
            self.shards[name] = Shard(name, epoch=f"E{name}{self.restarts}", **self.shard_args)
        if not keep_out:
            self.out[name] = []
        if not data.draw(st.booleans(), label="keep_back"):
            self.back[name] = []
        if self.link[name]:
            self.link[name] = False
            self.hub.link_down(name)

    def do_flap(self, data):
        """The links drop just after their shards answered, and come straight back.

        The answers were already on their way and still arrive, before whatever the
        shards say to the hub's new HELLO: the hub sees old deliveries after link_up.
        """
        for name in self.names:
            if self.link[name]:
                self._send(name)
                while self.out[name]:
                    self._process(name)
                self.link[name] = False
                self.hub.link_down(name)
                self._connect(name)

    def do_pump(self, data=None):
        """The links at work: everything queued goes across and every answer comes back."""
        for _ in range(2):
            for name in self.names:
                if self.link[name]:
                    self._send(name)
                while self.out[name]:
                    self._process(name)
                self._deliver(name, len(self.back[name]))

    def do_tick(self, data):
        """Time passes: shards sweep (and may forget this gateway), and the links beat."""
        self.now += data.draw(st.sampled_from([0.5, 1.0, 2.5, 5.0]), label="dt")
        for name, shard in self.shards.items():
            shard.sweep(self.now)
            self._collect(name)
            if self.link[name]:
                self.hub.to_shards[name].append([wire.BEAT])

    def do_foreign_publish(self, data):
        """Another gateway (maybe of another version) publishes straight to the shard."""
        topic = data.draw(st.sampled_from(TOPICS), label="topic")
        payload = data.draw(shard_payloads, label="payload")
        idem = data.draw(st.sampled_from([None, "k1", "k2"]), label="idem")
        name = self.hub.ring.owner(topic)
        self.shards[name].receive(FOREIGN_GW, [[wire.PUB, topic, payload, 1, time.time(), idem]], self.now)
        self._collect(name)

    def do_forged(self, data):
        """Well-formed frames a shard could send, built from what the hub waits for."""
        name = self._shard(data.draw(st.integers(0, 2), label="shard"))
        reqs = sorted(self.hub.requests)
        req = data.draw(st.sampled_from(reqs) if reqs and data.draw(st.booleans()) else st.integers(0, 30), label="req")
        r = self.hub.requests.get(req)
        topic = r.topic if r is not None and data.draw(st.booleans()) else data.draw(st.sampled_from(TOPICS))
        seq = data.draw(st.integers(0, 12), label="seq")
        epoch = data.draw(st.sampled_from([f"E{name}a-1", f"E{name}a-2", "other"]), label="epoch")
        kinds = ["PUBOK", "WELCOME", "NACK"] + (["MSG", "SUBOK", "RESYNC"] if self.forge_streams else [])
        choice = data.draw(st.sampled_from(kinds), label="kind")
        if choice == "MSG":
            frame = [wire.MSG, topic, seq, data.draw(shard_payloads), time.time()]
        elif choice in ("SUBOK", "RESYNC"):
            missed = data.draw(st.lists(st.builds(lambda s, pl: [s, pl, 0.0], st.integers(0, 12), shard_payloads), max_size=3))
            frame = [wire.SUBOK, topic, req if choice == "SUBOK" else 0, epoch, seq, data.draw(st.booleans()), missed]
        elif choice == "PUBOK":
            frame = [wire.PUBOK, topic, req, seq]
        elif choice == "WELCOME":
            frame = [wire.WELCOME, epoch, data.draw(st.sampled_from(["gw-1", "", "gw-0"]))]
        else:
            frame = [wire.NACK, req, data.draw(st.sampled_from([ErrorCode.UNAVAILABLE, "made-up"])), "nope"]
        if frame[0] in (wire.MSG, wire.SUBOK):
            self.tainted.add(topic)
            if frame[0] == wire.SUBOK and (pending := self.hub.requests.get(frame[2])) is not None:
                self.tainted.add(pending.topic)
        self.hub.on_shard_frames(name, [frame])

    def do_junk(self, data):
        name = self._shard(data.draw(st.integers(0, 2), label="shard"))
        junk_msgs = st.builds(lambda t, s, pl: [wire.MSG, t, s, pl, 0.0], st.sampled_from(TOPICS), st.integers(0, 12),
                              st.sampled_from(JUNK_PAYLOADS))
        junk = data.draw(st.lists(st.one_of(st.sampled_from(JUNK_FRAMES), junk_msgs) if self.forge_streams
                                  else st.sampled_from(JUNK_FRAMES), max_size=4), label="junk")
        for frame in junk:
            try:
                if wire.check_shard_frame(frame) in (wire.MSG, wire.SUBOK):
                    self.tainted.add(frame[1])
            except WireError:
                pass
        self.hub.on_shard_frames(name, junk)

    @invariant()
    def nothing_failed_inside(self):
        # Handlers catch what raises so one frame cannot stop the gateway; here any
        # such catch is a bug.
        assert self.hub.stats.frames_failed == 0
        for shard in self.shards.values():
            assert shard.stats.frames_failed == 0

    @invariant()
    def sessions_see_decodable_ordered_frames(self):
        for client in self.clients:
            session = client.session
            frames = session.outbox.frames
            if client.frames_at_close is not None:
                assert len(frames) == client.frames_at_close, "a closed session was sent something"
            for frame in frames[client.checked:]:
                event = decode_event(frame, session.encoding)
                kind, topic = event.get("type"), event.get("topic")
                if kind == "subscribed":
                    client.streams[topic] = None
                    client.epochs[topic] = event["epoch"]
                    self.positions.add((event["epoch"], event["seq"]))
                elif kind == "unsubscribed":
                    client.streams.pop(topic, None)
                elif kind is None:
                    assert set(event) == {"topic", "payload", "seq"}
                    assert topic in client.streams, f"a message for {topic!r} without a subscription"
                    last = client.streams[topic]
                    if topic not in self.tainted:
                        assert last is None or event["seq"] > last, f"{topic}: seq {event['seq']} after {last}"
                    client.streams[topic] = event["seq"]
                    self.positions.add((client.epochs[topic], event["seq"]))
            client.checked = len(frames)

    @invariant()
    def the_local_index_is_consistent(self):
        hub = self.hub
        for topic, entry in hub.topics.items():
            assert entry.subscribers or entry.pending
            for session in entry.subscribers:
                assert not session.closed and session.topics.get(topic) == ACTIVE
            for session in entry.pending:
                assert not session.closed and session.topics.get(topic) == PENDING
        for client in self.clients:
            session = client.session
            if session.closed:
                assert not session.topics
            for topic in session.topics:
                assert topic in hub.topics

    @invariant()
    def requests_are_for_live_sessions_or_still_answerable(self):
        """A request is answered by its shard, or failed or re-sent when its link comes back.

        While a link is connected, each of its requests must be on its way: queued,
        in flight to the shard, or answered in flight back. While it is down, the
        next link_up fails the publications and re-sends the subscribes.
        """
        for req, r in self.hub.requests.items():
            assert r.kind in (wire.SUB, wire.PUB) and r.shard in self.names
            if not self.link[r.shard]:
                continue
            position = 3 if r.kind == wire.PUB else 2
            answer = wire.PUBOK if r.kind == wire.PUB else wire.SUBOK
            outgoing = self.hub.to_shards[r.shard] + [f for batch in self.out[r.shard] for f in batch]
            assert any(f[0] == r.kind and f[position] == req for f in outgoing) or any(
                f[0] == answer and f[2] == req for f in self.back[r.shard]
            ), f"request {req} ({r}) can no longer be answered"

    @invariant()
    def shard_outbound_passes_the_gateway_check(self):
        for frames_back in self.back.values():
            for frame in frames_back:
                wire.check_shard_frame(frame)


TestHubStateMachine = HubMachine.TestCase
TestHubStateMachine.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- 4. the router shard ----------------------------------------------------------

INBOXES = ["tcp://127.0.0.1:7201", "tcp://127.0.0.1:7202", "ipc:///tmp/fanroute-gw3", "inproc://gw4"]
JUNK_SENDERS = ["", "x", "tcp://", "http://127.0.0.1:7201", "tcp:/127.0.0.1:7203", "tcp://" + "a" * 600, "udp://1.2.3.4:5"]
senders = st.integers(0, 19).flatmap(
    lambda i: st.sampled_from(INBOXES) if i < 15 else st.sampled_from(JUNK_SENDERS) if i < 19 else st.text(max_size=8)
)
shard_topics = st.sampled_from(["t0", "t1", "t2", "t3"])
# Topic epochs are "E-<generation>": these hit real ones now and then.
epochs = st.sampled_from([None, "E-1", "E-2", "E-3", "E-4", "E-1", "E-2", "E-5", "", "other"])
cursors = st.integers(-2, 10)


@st.composite
def gateway_frames(draw) -> Any:
    """A frame from a gateway: mostly well formed, with random fields; sometimes junk."""
    kind = draw(st.sampled_from(["PUB"] * 5 + ["SUB"] * 2 + ["UNSUB", "HELLO", "BEAT", "junk", "bad PUB"]))
    topic = draw(shard_topics)
    if kind == "PUB":
        ts = draw(st.one_of(st.floats(-1e3, 1e3), st.integers(-5, 5), st.floats()))
        idem = draw(st.sampled_from([None, None, "k1", "k2", "k3", "k1"]))
        return [wire.PUB, topic, draw(shard_payloads), draw(st.sampled_from([1, 1, 0])), ts, idem]
    if kind == "SUB":
        return [wire.SUB, topic, draw(st.integers(-1, 9)), draw(epochs), draw(cursors)]
    if kind == "UNSUB":
        return [wire.UNSUB, topic]
    if kind == "HELLO":
        interest = draw(st.lists(st.builds(lambda t, e, c: [t, e, c], shard_topics, epochs, cursors), max_size=4))
        return [wire.HELLO, draw(st.sampled_from([*INBOXES, "junk"])), draw(st.sampled_from(["i1", "i2", ""])), interest]
    if kind == "BEAT":
        return [wire.BEAT]
    if kind == "bad PUB":  # one field of the wrong type
        frame = [wire.PUB, topic, b"\x01", 1, 0.0, None]
        frame[draw(st.integers(1, 5))] = draw(frame_fields)
        return frame
    return draw(st.one_of(st.sampled_from(JUNK_FRAMES), frames))


shard_actions = st.lists(
    st.one_of(
        st.tuples(st.just("batch"), senders, st.lists(gateway_frames(), min_size=1, max_size=8),
                  st.sampled_from(["", "r0", "router-x"])),
        st.tuples(st.just("sweep"), st.sampled_from([0.0, 0.5, 1.5, 4.0]), st.none(), st.none()),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shard_actions,
    st.integers(0, 4),
    st.sampled_from([1 << 20, 1500, 700, 200, 0]),
    st.sampled_from([3.0, 1.0, 0.0]),
    st.booleans(),
)
def test_the_shard_survives_any_batches_and_keeps_its_books(actions, history_size, history_bytes, ttl, override):
    sh = Shard(
        "router-0",
        epoch="E",
        history_size=history_size,
        history_bytes=history_bytes,
        history_ttl=ttl,
        gateway_timeout=2.0,
        history_for=(lambda name: (1, 100.0) if name == "t3" else (None, None)) if override else (lambda name: (None, None)),
    )
    now = 0.0
    accepted: set[str] = set()
    seqs: dict[str, tuple[str, int]] = {}  # topic -> (epoch, seq) last seen
    idem_seqs: dict[tuple[str, str, str], int] = {}  # (topic, epoch, idem) -> seq of its latest PUBOK
    delivered: dict[tuple[str, str, str], int] = {}  # (inbox, topic, epoch) -> seq of the latest MSG sent there
    req_ids = iter(range(1, 1 << 30))
    for action, arg, batch, reply_as in actions:
        reqs: dict[int, tuple[str, str]] = {}  # req -> (topic, idem) of this batch's acked publications
        # Entries only leave history from the front: what was gone before the batch stays gone.
        gone_below = {name: (t.epoch, t.history.first_seq or t.seq + 1) for name, t in sh.topics.items()}
        if action == "sweep":
            now += arg
            sh.sweep(now)
        else:
            sender = arg
            frames_in = []
            for frame in batch:
                if isinstance(frame, list) and len(frame) == 6 and frame[0] == wire.PUB and frame[3] == 1:
                    frame = [*frame[:3], next(req_ids), *frame[4:]]  # unique, so each PUBOK names its publication
                    if type(frame[1]) is str and type(frame[5]) is str:
                        reqs[frame[3]] = (frame[1], frame[5])
                frames_in.append(frame)
            if is_nng_url(sender):
                accepted.add(sender)
            sh.receive(sender, frames_in, now, reply_as)
            now += 0.25
        out = sh.take_outbound()
        assert sh.stats.frames_failed == 0
        for inbox, sent in out.items():
            assert inbox in accepted and is_nng_url(inbox), f"the shard would dial {inbox!r}"
            for frame in sent:
                wire.check_shard_frame(frame)  # everything sent passes the gateway's check
                if frame[0] == wire.MSG:
                    stream = (inbox, frame[1], sh.topics[frame[1]].epoch)
                    assert frame[2] > delivered.get(stream, 0), f"{stream}: MSG {frame[2]} after {delivered.get(stream)}"
                    delivered[stream] = frame[2]
                if frame[0] == wire.PUBOK and frame[2] in reqs:
                    topic, idem = reqs[frame[2]]
                    key = (topic, sh.topics[topic].epoch, idem)
                    before = idem_seqs.get(key)
                    if before is not None and frame[3] != before:
                        history = sh.topics[topic].history
                        assert frame[3] > before
                        assert history.first_seq is None or history.first_seq > before, (
                            f"{key}: acked {frame[3]} while {before} is still in history"
                        )
                    elif before is not None and gone_below.get(topic, ("", 0))[0] == key[1]:
                        assert before >= gone_below[topic][1], (
                            f"{key}: answered as a duplicate of {before}, which had left history"
                        )
                    idem_seqs[key] = frame[3]
        for name, topic in sh.topics.items():
            last = seqs.get(name)
            if last is not None and last[0] == topic.epoch:
                assert topic.seq >= last[1], f"{name}: seq went from {last[1]} to {topic.seq}"
            seqs[name] = (topic.epoch, topic.seq)
            stored = [e.seq for e in topic.history._entries]
            assert stored == list(range(topic.seq - len(stored) + 1, topic.seq + 1)), f"{name}: history {stored}"
            assert topic.history.bytes == sum(e.cost for e in topic.history._entries)
        assert sh.history_bytes == sum(t.history.bytes for t in sh.topics.values())
        assert sh.history_bytes <= sh.history_bytes_limit
