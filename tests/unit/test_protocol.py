"""Client command parsing and the encodings, with no sockets."""

import msgpack
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanroute import protocol as p
from fanroute.codes import CloseCode, ErrorCode, close_code_label
from fanroute.codec import Encoding, FrameCache, ws_frame


def parse(obj):
    return p.parse_command(obj)


def test_every_command_parses():
    assert parse({"type": "subscribe", "topic": "prices.AAPL", "id": 1}) == p.Subscribe("prices.AAPL", 1)
    sub = parse({"type": "subscribe", "topic": "t", "since": {"epoch": "e", "seq": 41}, "id": 2})
    assert sub.since == p.Since("e", 41)
    assert parse({"type": "unsubscribe", "topic": "t", "id": 3}) == p.Unsubscribe("t", 3)
    assert parse({"type": "publish", "topic": "chat.room1", "payload": {"a": 1}, "id": 4}) == p.Publish(
        "chat.room1", {"a": 1}, 4
    )
    assert parse({"type": "ping", "ts": 1732550000000}) == p.Ping(1732550000000)
    assert parse({"type": "connect", "token": "x"}) == p.Connect("x")


def test_plain_topic_payload_is_a_publish():
    assert parse({"topic": "chat.room1", "payload": None}) == p.Publish("chat.room1", None)


@pytest.mark.parametrize(
    "frame",
    [
        [],
        "x",
        {},
        {"type": "nope"},
        {"type": 5},
        {"type": "subscribe"},
        {"type": "subscribe", "topic": ""},
        {"type": "subscribe", "topic": "a b"},
        {"type": "subscribe", "topic": "x" * 300},
        {"type": "subscribe", "topic": "ü"},
        {"type": "subscribe", "topic": 5},
        {"type": "subscribe", "topic": "t", "since": 5},
        {"type": "subscribe", "topic": "t", "since": {"epoch": "e", "seq": -1}},
        {"type": "subscribe", "topic": "t", "since": {"epoch": 1, "seq": 1}},
        {"type": "publish", "topic": "t"},
        {"type": "subscribe", "topic": "t", "id": "1"},
        {"type": "subscribe", "topic": "t", "id": True},
        {"type": "subscribe", "topic": "t", "id": -1},
        {"type": "connect", "token": 5},
        {"topic": "t"},
    ],
)
def test_bad_commands_are_bad_requests(frame):
    with pytest.raises(p.ProtocolError) as err:
        parse(frame)
    assert err.value.code == ErrorCode.BAD_REQUEST
    assert err.value.message


def test_error_keeps_the_command_id():
    with pytest.raises(p.ProtocolError) as err:
        parse({"type": "subscribe", "topic": "bad topic", "id": 7})
    assert err.value.id == 7
    assert p.error_event(err.value.code, err.value.message, err.value.id)["id"] == 7


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_payloads_round_trip_in_both_encodings(payload):
    event = p.message_event("t.1", payload, 42)
    for enc in Encoding:
        frame = enc.encode(event)
        body = _unframe(frame)
        assert (orjson.loads(body) if enc is Encoding.JSON else msgpack.unpackb(body)) == event
    cmd = {"type": "publish", "topic": "t.1", "payload": payload}
    assert Encoding.JSON.decode(orjson.dumps(cmd).decode()) == cmd
    assert Encoding.MSGPACK.decode(msgpack.packb(cmd)) == cmd


@given(st.binary(max_size=200))
def test_junk_never_escapes_as_anything_but_a_protocol_error(junk):
    for enc, data in ((Encoding.JSON, junk.decode("latin-1")), (Encoding.MSGPACK, junk)):
        try:
            p.parse_command(enc.decode(data))
        except p.ProtocolError as err:
            assert err.code == ErrorCode.BAD_REQUEST


def test_wrong_frame_kind_for_the_encoding():
    with pytest.raises(p.ProtocolError, match="subprotocol"):
        Encoding.JSON.decode(b"\x81")
    with pytest.raises(p.ProtocolError, match="binary"):
        Encoding.MSGPACK.decode("{}")


def test_payloads_some_encoding_cannot_carry_are_refused_whichever_encoding_brought_them():
    from fanroute.codec import pack_payload

    with pytest.raises(p.ProtocolError):
        Encoding.MSGPACK.decode(msgpack.packb({1: 2}))  # non-string keys: not even a command
    deep: list = []
    for _ in range(100):
        deep = [deep]
    json_deep = "[" * 300 + "]" * 300  # orjson reads it, but cannot write it back
    for value in (
        b"raw",
        {"n": float("nan")},
        Encoding.MSGPACK.decode(msgpack.packb(deep)),
        Encoding.JSON.decode(json_deep),
        Encoding.MSGPACK.decode(msgpack.packb({"bin": [1, b"\x00"]})),
    ):
        with pytest.raises(p.ProtocolError) as err:
            pack_payload(value, 1 << 20)
        assert err.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(p.ProtocolError) as err:
        pack_payload("x" * 2000, 1000)
    assert err.value.code == ErrorCode.TOO_LARGE
    assert msgpack.unpackb(pack_payload({"a": [1, "b", None, 2.5]}, 100)) == {"a": [1, "b", None, 2.5]}


def test_an_idem_key_is_a_short_string():
    cmd = p.parse_command({"type": "publish", "topic": "t", "payload": 1, "idem": "k-1"})
    assert cmd.idem == "k-1"
    for bad in ("", "x" * 65, 5, ["k"]):
        with pytest.raises(p.ProtocolError):
            p.parse_command({"type": "publish", "topic": "t", "payload": 1, "idem": bad})


def test_close_code_labels_are_bounded():
    assert close_code_label(4001) == "4001" and close_code_label(1000) == "1000"
    known = {int(c) for c in CloseCode}
    assert {close_code_label(c) for c in range(3000, 5000) if c not in known} == {"other"}
    assert close_code_label(None) == "other"


def test_huge_json_numbers():
    # Integers beyond 64 bits become the nearest double, as JSON.parse does in a
    # browser; numbers beyond a double's range are refused.
    cmd = Encoding.JSON.decode('{"type":"publish","topic":"t","payload":123456789012345678901234567890}')
    assert cmd["payload"] == 1.2345678901234568e29
    with pytest.raises(p.ProtocolError):
        Encoding.JSON.decode('{"type":"publish","topic":"t","payload":1e400}')


def test_frame_lengths_use_the_right_header():
    for n, header in ((10, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)):
        assert len(ws_frame(1, b"x" * n)) == n + header


def test_frame_cache_builds_each_encoding_once():
    cache = FrameCache(p.message_event("t", {"x": 1}, 1))
    assert cache.get(Encoding.JSON) is cache.get(Encoding.JSON)
    assert cache.get(Encoding.MSGPACK) is cache.get(Encoding.MSGPACK)


def _unframe(frame: bytes) -> bytes:
    n = frame[1] & 0x7F
    if n == 126:
        return frame[4:]
    if n == 127:
        return frame[10:]
    return frame[2:]


frames = st.dictionaries(
    st.sampled_from(["type", "topic", "payload", "id", "since", "ts", "token", "x"]),
    st.one_of(
        st.sampled_from(["subscribe", "unsubscribe", "publish", "ping", "connect", "refresh", "?"]),
        json_values,
        st.dictionaries(st.sampled_from(["epoch", "seq"]), json_values, max_size=2),
    ),
    max_size=6,
)


@given(frames)
def test_any_frame_parses_to_a_command_or_a_protocol_error(frame):
    try:
        cmd = p.parse_command(frame)
    except p.ProtocolError as err:
        assert err.code == ErrorCode.BAD_REQUEST and err.message
    else:
        assert type(cmd) in (p.Subscribe, p.Unsubscribe, p.Publish, p.Ping, p.Connect, p.Refresh)
