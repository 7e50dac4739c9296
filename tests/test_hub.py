"""The gateway hub's rules, with frames captured instead of written to sockets."""

import orjson

from cluster import protocol as p
from cluster import wire
from cluster.codec import Encoding
from cluster.ring import Ring
from gateway.hub import Hub, Session


class Capture:
    def __init__(self):
        self.frames = []

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)

    def events(self):
        out = [orjson.loads(f[2:] if f[1] < 126 else f[4:]) for f in self.frames]
        self.frames.clear()
        return out


def make_hub(shards=("s0",)):
    hub = Hub(Ring(shards), inbox="inproc://gw", instance="i1")
    for s in shards:
        hub.link_up(s)
        hub.on_shard_frames(s, [[wire.WELCOME, "E", "i1"]])
        hub.to_shards[s] = []
    return hub


def session(name="a"):
    return Session(name, Encoding.JSON, Capture())


def test_first_subscriber_asks_the_shard_and_waits_for_its_answer():
    hub, a = make_hub(), session()
    hub.subscribe(a, p.Subscribe("t", 1))
    ((kind, topic, req, epoch, seq),) = hub.to_shards["s0"]
    assert (kind, topic, epoch) == (wire.SUB, "t", None)
    # A delivery that overtakes the answer is not shown to the pending subscriber.
    hub.on_shard_frames("s0", [[wire.MSG, "t", 5, "early", 0.0]])
    assert a.outbox.events() == []
    hub.on_shard_frames("s0", [[wire.SUBOK, "t", req, "E-1", 5, False, []], [wire.MSG, "t", 6, "x", 0.0]])
    assert a.outbox.events() == [
        {"type": "subscribed", "topic": "t", "epoch": "E-1", "seq": 5, "recovered": False, "id": 1},
        {"topic": "t", "payload": "x", "seq": 6},
    ]


def test_second_subscriber_is_answered_locally():
    hub, a, b = make_hub(), session("a"), session("b")
    hub.subscribe(a, p.Subscribe("t"))
    req = hub.to_shards["s0"].pop()[2]
    hub.on_shard_frames("s0", [[wire.SUBOK, "t", req, "E-1", 3, False, []]])
    hub.subscribe(b, p.Subscribe("t", 2))
    assert hub.to_shards["s0"] == []
    assert b.outbox.events()[0]["seq"] == 3


def test_recovery_through_the_shard_delivers_missed_then_live():
    hub, a, b = make_hub(), session("a"), session("b")
    hub.subscribe(a, p.Subscribe("t"))
    req = hub.to_shards["s0"].pop()[2]
    hub.on_shard_frames("s0", [[wire.SUBOK, "t", req, "E-1", 3, False, []]])
    a.outbox.events()
    hub.subscribe(b, p.Subscribe("t", 9, p.Since("E-1", 1)))
    sub = hub.to_shards["s0"].pop()
    assert sub[3:] == ["E-1", 1]
    hub.on_shard_frames(
        "s0",
        [
            [wire.MSG, "t", 4, "live-before-answer", 0.0],
            [wire.SUBOK, "t", sub[2], "E-1", 4, True, [[2, "m2", 0], [3, "m3", 0], [4, "m4", 0]]],
            [wire.MSG, "t", 5, "live", 0.0],
        ],
    )
    got = b.outbox.events()
    assert got[0]["recovered"] is True and got[0]["id"] == 9
    assert [e["seq"] for e in got[1:]] == [2, 3, 4, 5]
    assert [e["seq"] for e in a.outbox.events()] == [4, 5]
    assert hub.stats.recovered == 1


def test_last_subscriber_out_withdraws_interest():
    hub, a, b = make_hub(), session("a"), session("b")
    for s in (a, b):
        hub.subscribe(s, p.Subscribe("t"))
    hub.to_shards["s0"].clear()
    hub.unsubscribe(a, p.Unsubscribe("t", 1))
    assert hub.to_shards["s0"] == []
    hub.close_session(b)
    assert hub.to_shards["s0"] == [[wire.UNSUB, "t"]]
    assert "t" not in hub.topics


def test_deliveries_without_local_subscribers_are_counted_not_sent():
    hub = make_hub()
    hub.on_shard_frames("s0", [[wire.MSG, "nobody", 1, 0, 0.0]])
    assert hub.stats.deliveries_unrouted == 1


def test_publish_ack_and_unavailable_shard():
    hub, a = make_hub(), session()
    hub.publish(a, p.Publish("t", {"x": 1}, 4))
    frame = hub.to_shards["s0"].pop()
    assert frame[:4] == [wire.PUB, "t", {"x": 1}, frame[3]] and frame[3] > 0
    hub.on_shard_frames("s0", [[wire.PUBOK, "t", frame[3], 17]])
    assert a.outbox.events() == [{"type": "published", "topic": "t", "id": 4, "seq": 17}]
    hub.publish(a, p.Publish("t", 1, 5))
    hub.link_down("s0")
    assert a.outbox.events()[0]["code"] == p.UNAVAILABLE
    hub.publish(a, p.Publish("t", 1, 6))
    assert a.outbox.events() == [
        {"type": "error", "code": "unavailable", "message": "the shard for 't' is unreachable", "id": 6}
    ]


def test_reconnect_hello_lists_interest_and_resync_fills_the_gap():
    hub, a = make_hub(), session()
    hub.subscribe(a, p.Subscribe("t"))
    req = hub.to_shards["s0"].pop()[2]
    hub.on_shard_frames("s0", [[wire.SUBOK, "t", req, "E-1", 3, False, []]])
    a.outbox.events()
    hub.link_down("s0")
    hub.link_up("s0")
    assert hub.to_shards["s0"] == [[wire.HELLO, "inproc://gw", "i1", [["t", "E-1", 3]]]]
    hub.on_shard_frames("s0", [[wire.WELCOME, "E", "i1"], [wire.SUBOK, "t", 0, "E-1", 5, True, [[4, "a", 0], [5, "b", 0]]]])
    assert [e["seq"] for e in a.outbox.events()] == [4, 5]


def test_a_restarted_shard_tells_subscribers_the_stream_restarted():
    hub, a = make_hub(), session()
    hub.subscribe(a, p.Subscribe("t"))
    req = hub.to_shards["s0"].pop()[2]
    hub.on_shard_frames("s0", [[wire.SUBOK, "t", req, "E-1", 3, False, []]])
    a.outbox.events()
    hub.link_down("s0")
    hub.link_up("s0")
    hub.on_shard_frames("s0", [[wire.WELCOME, "F", "i1"], [wire.SUBOK, "t", 0, "F-1", 0, False, []]])
    assert a.outbox.events() == [
        {"type": "subscribed", "topic": "t", "epoch": "F-1", "seq": 0, "recovered": False}
    ]


def test_unknown_to_the_shard_means_introduce_again():
    hub = make_hub()
    hub.on_shard_frames("s0", [[wire.WELCOME, "E", ""]])
    assert hub.to_shards["s0"][0][0] == wire.HELLO
    assert hub.shard_up["s0"] is False


def test_duplicate_subscribe_is_an_error():
    hub, a = make_hub(), session()
    hub.subscribe(a, p.Subscribe("t"))
    hub.subscribe(a, p.Subscribe("t", 3))
    assert a.outbox.events()[0]["code"] == p.BAD_REQUEST
