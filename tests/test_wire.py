import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster import wire


def test_round_trip():
    frames = [[wire.PUB, "t", {"x": 1}, 3, 1.5], [wire.BEAT]]
    sender, got, reply_as = wire.unpack(wire.pack("tcp://gw:1", frames, "router-0"))
    assert (sender, got, reply_as) == ("tcp://gw:1", frames, "router-0")


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", msgpack.packb([1, "s"]), msgpack.packb([2, "s", [], ""]), msgpack.packb({"a": 1}), msgpack.packb([1, 5, [], ""])],
)
def test_junk_messages_are_refused(data):
    with pytest.raises(wire.WireError):
        wire.unpack(data)


@pytest.mark.parametrize(
    "frame",
    [
        [wire.PUB, "t", {}, 0, 1.0],
        [wire.SUB, "t", 1, None, 0],
        [wire.SUB, "t", 1, "e", 4],
        [wire.UNSUB, "t"],
        [wire.HELLO, "tcp://x:1", "inst", [["t", "e", 3], ["u", None, 0]]],
        [wire.BEAT],
        [wire.BYE],
    ],
)
def test_valid_gateway_frames(frame):
    assert wire.check_gateway_frame(frame) == frame[0]


@pytest.mark.parametrize(
    "frame",
    [
        [wire.MSG, "t", 1, {}, 1.0],
        [wire.SUBOK, "t", 1, "e", 3, True, [[3, {}, 1.0]]],
        [wire.PUBOK, "t", 1, 4],
        [wire.WELCOME, "epoch", "inst"],
        [wire.NACK, 1, "unavailable", "why"],
    ],
)
def test_valid_shard_frames(frame):
    assert wire.check_shard_frame(frame) == frame[0]


@given(st.lists(st.one_of(st.integers(-5, 30), st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2)), max_size=8))
def test_malformed_frames_raise_wire_error_only(frame):
    for check in (wire.check_gateway_frame, wire.check_shard_frame):
        try:
            check(frame)
        except wire.WireError:
            pass


def test_frames_of_the_other_direction_are_refused():
    with pytest.raises(wire.WireError):
        wire.check_gateway_frame([wire.MSG, "t", 1, {}, 1.0])
    with pytest.raises(wire.WireError):
        wire.check_shard_frame([wire.PUB, "t", {}, 0, 1.0])
