"""The gateway hub's rules, with frames captured instead of written to sockets."""

import msgpack
import orjson

from fanroute import protocol as p
from fanroute.codes import ErrorCode
from fanroute import wire
from fanroute.codec import Encoding
from fanroute.ring import Ring
from fanroute.gateway.hub import Hub, Session


class Capture:
    def __init__(self):
        self.frames = []

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)

    def events(self):
        out = [orjson.loads(f[2:] if f[1] < 126 else f[4:]) for f in self.frames]
        self.frames.clear()
        return out


def P(value):
    """A payload as it comes from a shard."""
    return msgpack.packb(value)


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
    hub.on_shard_frames("s0", [[wire.MSG, "t", 5, P("early"), 0.0]])
    assert a.outbox.events() == []
    hub.on_shard_frames("s0", [[wire.SUBOK, "t", req, "E-1", 5, False, []], [wire.MSG, "t", 6, P("x"), 0.0]])
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
            [wire.MSG, "t", 4, P("live-before-answer"), 0.0],
            [wire.SUBOK, "t", sub[2], "E-1", 4, True, [[2, P("m2"), 0], [3, P("m3"), 0], [4, P("m4"), 0]]],
            [wire.MSG, "t", 5, P("live"), 0.0],
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
    hub.on_shard_frames("s0", [[wire.MSG, "nobody", 1, P(0), 0.0]])
    assert hub.stats.deliveries_unrouted == 1


def test_publish_ack_and_unavailable_shard():
    hub, a = make_hub(), session()
    hub.publish(a, p.Publish("t", {"x": 1}, 4))
    frame = hub.to_shards["s0"].pop()
    assert frame[:3] == [wire.PUB, "t", P({"x": 1})] and frame[3] > 0
    hub.on_shard_frames("s0", [[wire.PUBOK, "t", frame[3], 17]])
    assert a.outbox.events() == [{"type": "published", "topic": "t", "id": 4, "seq": 17}]
    hub.publish(a, p.Publish("t", 1, 5))
    hub.link_down("s0")  # never handed to the link: not applied
    assert a.outbox.events()[0]["code"] == ErrorCode.UNAVAILABLE
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
    hub.on_shard_frames("s0", [[wire.WELCOME, "E", "i1"], [wire.SUBOK, "t", 0, "E-1", 5, True, [[4, P("a"), 0], [5, P("b"), 0]]]])
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
    assert a.outbox.events()[0]["code"] == ErrorCode.BAD_REQUEST


def test_a_publication_lost_after_sending_is_answered_outcome_unknown_not_unavailable():
    hub, a = make_hub(), session()
    hub.publish(a, p.Publish("t", 1, 1, idem="k1"))
    assert hub.to_shards["s0"][-1][5] == "k1"
    hub.handed_off("s0")  # the link took it: the shard may apply it
    hub.publish(a, p.Publish("t", 2, 2))  # still queued here
    hub.link_down("s0")
    codes = {e["id"]: e["code"] for e in a.outbox.events()}
    assert codes == {1: ErrorCode.OUTCOME_UNKNOWN, 2: ErrorCode.UNAVAILABLE}


def test_a_shard_that_forgot_the_gateway_fails_queued_publications_truthfully():
    hub, a = make_hub(), session()
    hub.publish(a, p.Publish("t", 1, 1))
    hub.handed_off("s0")
    hub.publish(a, p.Publish("t", 2, 2))
    hub.on_shard_frames("s0", [[wire.WELCOME, "E", ""]])  # the shard does not know us
    codes = {e["id"]: e["code"] for e in a.outbox.events()}
    assert codes == {1: ErrorCode.OUTCOME_UNKNOWN, 2: ErrorCode.UNAVAILABLE}
    assert hub.requests == {}


def test_payloads_that_cannot_reach_every_encoding_are_refused_at_publish():
    hub, a = make_hub(), session()
    deep = [0]
    for _ in range(300):
        deep = [deep]
    for payload in (deep, b"bytes", {"k": {1, 2}}, "x" * 70_000):
        hub.publish(a, p.Publish("t", payload, 1))
    assert [e["code"] for e in a.outbox.events()] == [ErrorCode.BAD_REQUEST, ErrorCode.BAD_REQUEST, ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE]
    assert hub.to_shards["s0"] == []


def test_a_bad_payload_from_a_shard_is_counted_and_skipped_and_the_batch_goes_on():
    hub, a = make_hub(), session()
    hub.subscribe(a, p.Subscribe("t"))
    req = hub.to_shards["s0"].pop()[2]
    deep = b"\x91" * 300 + b"\x01"  # 300 nested arrays: more than JSON subscribers can be sent
    hub.on_shard_frames(
        "s0",
        [
            [wire.SUBOK, "t", req, "E-1", 3, True, [[2, msgpack.packb(b"bin"), 0], [3, P("ok"), 0]]],
            [wire.MSG, "t", 4, deep, 0.0],
            [wire.MSG, "t", 5, msgpack.packb(b"raw"), 0.0],
            [wire.MSG, "t", 6, P("fine"), 0.0],
        ],
    )
    events = a.outbox.events()
    assert [e.get("seq") for e in events] == [3, 3, 6]
    assert hub.stats.payloads_rejected == 3


def test_a_revoked_subscription_ends_with_an_unsolicited_unsubscribed():
    hub, a = make_hub(), session()
    hub.subscribe(a, p.Subscribe("t"))
    req = hub.to_shards["s0"].pop()[2]
    hub.on_shard_frames("s0", [[wire.SUBOK, "t", req, "E-1", 3, False, []]])
    a.outbox.events()
    hub.revoke(a, "t")
    assert a.outbox.events() == [{"type": "unsubscribed", "topic": "t"}]
    hub.on_shard_frames("s0", [[wire.MSG, "t", 4, P("after"), 0.0]])
    assert a.outbox.events() == []


# --- replicated streams: views, refusals, a new epoch whole -----------------------------


def subscribed_hub(topic="t", shards=("s0", "s1", "s2")):
    """A hub with one subscriber to ``topic``, answered by its shard at (E-1, 3)."""
    hub, a = make_hub(shards), session()
    hub.subscribe(a, p.Subscribe(topic, 1))
    owner = hub.owner(topic)
    req = hub.to_shards[owner].pop()[2]
    hub.on_shard_frames(owner, [[wire.SUBOK, topic, req, "E-1", 3, False, []]])
    a.outbox.events()
    return hub, a, owner


def test_a_view_moves_interest_to_the_next_copy_with_the_gateway_position():
    hub, a, old = subscribed_hub()
    members = [s for s in ("s0", "s1", "s2") if s != old]
    hub.on_shard_frames(members[0], [[wire.VIEW, 5, members]])
    new = hub.owner("t")
    assert new != old and new == next(s for s in hub.ring.order("t") if s in members)
    assert [wire.UNSUB, "t"] in hub.to_shards[old]
    hub.on_shard_frames(new, [[wire.VIEW, 5, members]])
    assert [wire.SUB, "t", 0, "E-1", 3] in hub.to_shards[new]
    # The new leader answers with what the gateway missed: the stream goes on, same epoch.
    hub.on_shard_frames(new, [[wire.SUBOK, "t", 0, "E-1", 5, True, [[4, P("d"), 0.0], [5, P("e"), 0.0]]]])
    assert a.outbox.events() == [{"topic": "t", "payload": "d", "seq": 4}, {"topic": "t", "payload": "e", "seq": 5}]


def test_an_older_view_changes_nothing():
    hub, _, old = subscribed_hub()
    hub.on_shard_frames("s0", [[wire.VIEW, 9, ["s0", "s1", "s2"]]])
    hub.on_shard_frames("s1", [[wire.VIEW, 4, [s for s in ("s0", "s1", "s2") if s != old]]])
    assert hub.owner("t") == old


def test_a_refused_subscribe_leaves_nothing_pending():
    hub, a = make_hub(), session()
    hub.subscribe(a, p.Subscribe("t", 4))
    req = hub.to_shards["s0"].pop()[2]
    hub.on_shard_frames("s0", [[wire.NACK, req, "unavailable", "not served here now"]])
    assert a.outbox.events() == [{"type": "error", "code": "unavailable", "message": "not served here now", "id": 4}]
    assert "t" not in a.topics and "t" not in hub.topics
    hub.subscribe(a, p.Subscribe("t", 5))  # may be asked again
    assert hub.to_shards["s0"][-1][:2] == [wire.SUB, "t"]


def test_a_new_epoch_sent_whole_reaches_subscribers_from_its_first_seq():
    hub, a, owner = subscribed_hub(shards=("s0",))
    hub.on_shard_frames(owner, [[wire.SUBOK, "t", 0, "E-2", 3, False, [[1, P("x"), 0.0], [2, P("y"), 0.0], [3, P("z"), 0.0]]]])
    assert a.outbox.events() == [
        {"type": "subscribed", "topic": "t", "epoch": "E-2", "seq": 0, "recovered": False},
        {"topic": "t", "payload": "x", "seq": 1},
        {"topic": "t", "payload": "y", "seq": 2},
        {"topic": "t", "payload": "z", "seq": 3},
    ]


def test_a_gap_is_never_shown_the_missing_deliveries_come_from_history_in_order():
    hub, a, owner = subscribed_hub(shards=("s0",))
    hub.to_shards[owner] = []
    hub.on_shard_frames(owner, [[wire.MSG, "t", 5, P("e"), 0.0], [wire.MSG, "t", 6, P("f"), 0.0]])
    assert a.outbox.events() == []  # 4 is missing: nothing after it is shown yet
    assert hub.to_shards[owner] == [[wire.SUB, "t", 0, "E-1", 3]]  # asked once
    hub.on_shard_frames(owner, [[wire.SUBOK, "t", 0, "E-1", 6, True, [[4, P("d"), 0.0], [5, P("e"), 0.0], [6, P("f"), 0.0]]]])
    hub.on_shard_frames(owner, [[wire.MSG, "t", 6, P("f"), 0.0], [wire.MSG, "t", 7, P("g"), 0.0]])  # 6 again: dropped
    assert [e["seq"] for e in a.outbox.events()] == [4, 5, 6, 7]
    assert hub.stats.gaps == 2 and hub.stats.duplicates_dropped == 1
