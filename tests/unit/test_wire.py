import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanroute import wire

KEY = wire.LinkKey("a-cluster-secret-for-tests")
P = msgpack.packb({"x": 1})


def seal(frames, sender="tcp://gw:1", reply_as="router-0", key=KEY):
    return wire.Sealer(key).pack(sender, frames, reply_as)


def test_round_trip():
    frames = [[wire.PUB, "t", P, 3, 1.5, None], [wire.BEAT]]
    env = wire.ReplayGuard(KEY).open(seal(frames))
    assert (env.sender, env.frames, env.reply_as) == ("tcp://gw:1", frames, "router-0")


@pytest.mark.parametrize("encrypt", [False, True])
def test_a_message_sealed_with_another_secret_is_refused(encrypt):
    data = seal([[wire.BEAT]], key=wire.LinkKey("another-cluster-secret", encrypt=encrypt))
    with pytest.raises(wire.WireError) as err:
        wire.ReplayGuard(wire.LinkKey("a-cluster-secret-for-tests", encrypt=encrypt)).open(data)
    assert err.value.reason == "mac"


def test_encrypted_messages_round_trip_and_hide_their_content():
    key = wire.LinkKey("a-cluster-secret-for-tests", encrypt=True)
    data = wire.Sealer(key).pack("tcp://gw:1", [[wire.PUB, "secret.topic", P, 0, 1.0, None]])
    assert b"secret.topic" not in data
    assert wire.ReplayGuard(key).open(data).frames[0][1] == "secret.topic"


def test_any_changed_byte_is_refused():
    data = bytearray(seal([[wire.BEAT]]))
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(wire.WireError):
            wire.ReplayGuard(KEY).open(bytes(tampered))


def test_a_replayed_or_stale_message_is_refused():
    sealer, guard = wire.Sealer(KEY), wire.ReplayGuard(KEY)
    first, second = sealer.pack("s", [[wire.BEAT]]), sealer.pack("s", [[wire.BEAT]])
    guard.open(second)
    for again in (second, first):  # the same message, or an older one of the session
        with pytest.raises(wire.WireError) as err:
            guard.open(again)
        assert err.value.reason == "replay"
    late = sealer.pack("s", [[wire.BEAT]])
    with pytest.raises(wire.WireError):
        wire.ReplayGuard(KEY).open(late, now=10**10)


def test_the_replay_table_is_bounded():
    guard = wire.ReplayGuard(KEY)
    for _ in range(wire._MAX_SESSIONS + 10):
        guard.open(wire.Sealer(KEY).pack("s", []))
    assert len(guard._last) == wire._MAX_SESSIONS


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", msgpack.packb([2, "s"]), msgpack.packb([1, "s", [], "", "x", 1, 0.0]), msgpack.packb({"a": 1}),
     msgpack.packb([2, 5, [], "", "x", 1, 0.0]), msgpack.packb([2, "s", [], "", "x", "1", 0.0])],
)
def test_authentic_junk_is_refused(body):
    with pytest.raises(wire.WireError):
        wire.ReplayGuard(KEY).open(KEY.seal(body))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_wire_error(data):
    with pytest.raises(wire.WireError):
        wire.ReplayGuard(KEY).open(data)


@pytest.mark.parametrize(
    "frame",
    [
        [wire.PUB, "t", P, 0, 1.0, None],
        [wire.PUB, "t", P, 0, 1.0, "key"],
        [wire.SUB, "t", 1, None, 0],
        [wire.SUB, "t", 1, "e", 4],
        [wire.UNSUB, "t"],
        [wire.HELLO, "tcp://x:1", "inst", [["t", "e", 3], ["u", None, 0]]],
        [wire.BEAT],
    ],
)
def test_valid_gateway_frames(frame):
    assert wire.check_gateway_frame(frame) == frame[0]


@pytest.mark.parametrize(
    "frame",
    [
        [wire.MSG, "t", 1, P, 1.0],
        [wire.SUBOK, "t", 1, "e", 3, True, [[3, P, 1.0]]],
        [wire.PUBOK, "t", 1, 4],
        [wire.WELCOME, "epoch", "inst"],
        [wire.NACK, 1, "unavailable", "why"],
    ],
)
def test_valid_shard_frames(frame):
    assert wire.check_shard_frame(frame) == frame[0]


@pytest.mark.parametrize(
    "frame",
    [
        [wire.PUB, "t", {"x": 1}, 0, 1.0, None],  # a payload that is not packed bytes
        [wire.PUB, "t", b"x" * (wire.MAX_PAYLOAD + 1), 0, 1.0, None],
        [wire.PUB, "t", P, 0, 1.0, 5],
    ],
)
def test_bad_gateway_payloads_are_refused(frame):
    with pytest.raises(wire.WireError):
        wire.check_gateway_frame(frame)


@pytest.mark.parametrize(
    "frame",
    [[wire.MSG, "t", 1, "text", 1.0], [wire.SUBOK, "t", 1, "e", 3, True, [[3, {}, 1.0]]]],
)
def test_bad_shard_payloads_are_refused(frame):
    with pytest.raises(wire.WireError):
        wire.check_shard_frame(frame)


@given(st.lists(st.one_of(st.integers(-5, 30), st.text(max_size=3), st.binary(max_size=3), st.none(),
                          st.lists(st.integers(), max_size=2)), max_size=8))
def test_malformed_frames_raise_wire_error_only(frame):
    for check in (wire.check_gateway_frame, wire.check_shard_frame):
        try:
            check(frame)
        except wire.WireError:
            pass


def test_frames_of_the_other_direction_are_refused():
    with pytest.raises(wire.WireError):
        wire.check_gateway_frame([wire.MSG, "t", 1, P, 1.0])
    with pytest.raises(wire.WireError):
        wire.check_shard_frame([wire.PUB, "t", P, 0, 1.0, None])
