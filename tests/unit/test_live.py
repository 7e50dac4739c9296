"""``last`` on subscribe and presence counts: the pure parts, driven directly."""

import msgpack
import orjson
import pytest

from fanroute import protocol as p
from fanroute import wire
from fanroute.codec import Encoding
from fanroute.errors import ProtocolError
from fanroute.gateway.hub import Hub, Session
from fanroute.gateway.presence import GatewayPresence
from fanroute.ring import Ring
from fanroute.router.presence import ShardPresence
from fanroute.router.shard import Shard

GW = "tcp://127.0.0.1:7001"
GW2 = "tcp://127.0.0.1:7002"


class Capture:
    def __init__(self):
        self.frames = []

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)

    def events(self):
        out = [orjson.loads(f[2:] if f[1] < 126 else f[4:]) for f in self.frames]
        self.frames.clear()
        return out


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make_hub(clock=None):
    hub = Hub(Ring(["s0"]), inbox=GW, instance="i1", clock=clock or Clock())
    hub.link_up("s0")
    hub.on_shard_frames("s0", [[wire.WELCOME, "E", "i1"]])
    hub.to_shards["s0"] = []
    return hub


def session(name="a"):
    return Session(name, Encoding.JSON, Capture())


def P(value):
    return msgpack.packb(value)


# --- parsing ---------------------------------------------------------------------------


def test_subscribe_parses_last_and_presence():
    cmd = p.parse_command({"type": "subscribe", "topic": "t", "last": 5, "presence": True})
    assert (cmd.last, cmd.presence) == (5, True)
    assert p.parse_command({"type": "subscribe", "topic": "t"}).last == 0


def test_last_is_capped():
    assert p.parse_command({"type": "subscribe", "topic": "t", "last": 10**9}).last == p.MAX_LAST


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True, [1]])
def test_last_must_be_an_integer_of_at_least_one(bad):
    with pytest.raises(ProtocolError) as err:
        p.parse_command({"type": "subscribe", "topic": "t", "last": bad, "id": 7})
    assert (err.value.code, err.value.id) == ("bad_request", 7)


def test_presence_flag_must_be_boolean():
    with pytest.raises(ProtocolError):
        p.parse_command({"type": "subscribe", "topic": "t", "presence": "yes"})


def test_presence_command_parses_and_checks_its_topic():
    assert p.parse_command({"type": "presence", "topic": "live.1", "id": 3}) == p.Presence("live.1", 3)
    with pytest.raises(ProtocolError):
        p.parse_command({"type": "presence", "topic": "bad topic"})


def test_wire_accepts_old_and_new_sub_frames_and_the_presence_frames():
    assert wire.check_gateway_frame([wire.SUB, "t", 1, None, 0]) == wire.SUB
    assert wire.check_gateway_frame([wire.SUB, "t", 1, None, 0, 3]) == wire.SUB
    assert wire.check_gateway_frame([wire.COUNTS, [["t", 3, True]]]) == wire.COUNTS
    assert wire.check_shard_frame([wire.TOTALS, [["t", 3, 1]]]) == wire.TOTALS
    assert wire.check_shard_frame([wire.COUNTA, "t", 4, 3, 1]) == wire.COUNTA
    for bad in ([wire.SUB, "t", 1, None, 0, -1], [wire.COUNTS, [["t", -1, True]]], [wire.COUNTS, [["t", 1, 1]]]):
        with pytest.raises(wire.WireError):
            wire.check_gateway_frame(bad)


# --- last --------------------------------------------------------------------------------


def _shard_with(n):
    shard = Shard("s0", epoch="E")
    shard.receive(GW, [[wire.PUB, "t", P(i), 0, 0.0, None] for i in range(1, n + 1)], 1.0)
    shard.take_outbound()
    return shard


def test_shard_answers_last_with_the_newest_oldest_first():
    shard = _shard_with(10)
    shard.receive(GW, [[wire.SUB, "t", 1, None, 0, 3]], 2.0)
    ((_, _, _, _, seq, recovered, missed),) = shard.take_outbound()[GW]
    assert (seq, recovered, [m[0] for m in missed]) == (10, False, [8, 9, 10])


def test_shard_answers_last_with_what_there_is():
    shard = _shard_with(2)
    shard.receive(GW, [[wire.SUB, "t", 1, None, 0, 50]], 2.0)
    ((*_, missed),) = shard.take_outbound()[GW]
    assert [m[0] for m in missed] == [1, 2]


def test_recovery_wins_over_last():
    shard = _shard_with(10)
    epoch = shard.topics["t"].epoch
    shard.receive(GW, [[wire.SUB, "t", 1, epoch, 8, 5]], 2.0)
    ((*_, recovered, missed),) = shard.take_outbound()[GW]
    assert (recovered, [m[0] for m in missed]) == (True, [9, 10])


def test_last_applies_when_recovery_fails():
    shard = _shard_with(10)
    shard.receive(GW, [[wire.SUB, "t", 1, "other-epoch", 8, 2]], 2.0)
    ((*_, recovered, missed),) = shard.take_outbound()[GW]
    assert (recovered, [m[0] for m in missed]) == (False, [9, 10])


def test_hub_sends_last_through_the_shard_even_when_it_follows_the_topic():
    hub, a, b = make_hub(), session("a"), session("b")
    hub.subscribe(a, p.Subscribe("t"))
    req = hub.to_shards["s0"].pop()[2]
    hub.on_shard_frames("s0", [[wire.SUBOK, "t", req, "E-1", 3, False, []]])
    hub.subscribe(b, p.Subscribe("t", 2, last=2))
    sub = hub.to_shards["s0"].pop()
    assert sub[0] == wire.SUB and sub[5] == 2
    # A live message that overtakes the answer goes to a only; b gets it inside the answer.
    hub.on_shard_frames(
        "s0",
        [[wire.MSG, "t", 4, P("d"), 0.0], [wire.SUBOK, "t", sub[2], "E-1", 4, False, [[3, P("c"), 0.0], [4, P("d"), 0.0]]], [wire.MSG, "t", 5, P("e"), 0.0]],
    )
    assert [e.get("seq") for e in b.outbox.events()] == [4, 3, 4, 5]  # subscribed (seq 4), then 3, 4, then live 5


# --- presence on the shard -------------------------------------------------------------------


def test_shard_sums_gateways_and_pushes_to_watchers_only():
    pr = ShardPresence(interval=1.0)
    pr.report(GW, "t", 3, True)
    pr.report(GW2, "t", 2, False)
    assert pr.total("t", GW) == (5, 3)
    assert pr.due(0.0) == {GW: [["t", 5, 3]]}
    pr.report(GW2, "t", 4, False)
    assert pr.due(0.5) == {}  # paced: not twice within a second
    assert pr.due(1.0) == {GW: [["t", 7, 3]]}
    assert pr.due(3.0) == {}  # nothing changed


def test_a_silent_gateway_leaves_the_totals_and_comes_back():
    pr = ShardPresence(timeout=1.5)
    pr.report(GW, "t", 1, True)
    pr.report(GW2, "t", 2, False)
    pr.due(0.0)
    pr.liveness({GW: 2.0, GW2: 0.0}, 2.0)
    assert pr.total("t") == (1, 0)
    assert pr.due(2.0) == {GW: [["t", 1, 1]]}
    pr.liveness({GW: 3.0, GW2: 3.0}, 3.0)
    assert pr.total("t") == (3, 0)


def test_a_gateway_falling_silent_is_pushed_at_once_not_after_the_interval():
    # What a cluster did: GW2 reports its 3 subscribers (its last frame) and dies
    # right after GW, whose watcher came second, was sent the total of 4.
    pr = ShardPresence(interval=1.0, timeout=1.5)
    pr.report(GW2, "t", 3, False)
    assert pr.due(0.0) == {}  # nobody watches yet, but the interval starts
    pr.report(GW, "t", 1, True)
    assert pr.due(0.1) == {GW: [["t", 4, 1]]}  # a new watcher is sent the total at once
    assert pr.due(1.0) == {GW: [["t", 4, 1]]}  # the paced push of GW's join
    pr.liveness({GW: 1.6, GW2: 0.0}, 1.6)
    # GW2 is left out 1.6 s after its last frame. Held by the interval until 2.0
    # (and in a cluster to the tick after, then a hop), the count would be right
    # only about 2 s after the death: it goes out at once.
    assert pr.due(1.6) == {GW: [["t", 1, 1]]}
    pr.report(GW, "t", 2, True)
    assert pr.due(2.0) == {}  # ordinary changes are paced from there again
    assert pr.due(2.6) == {GW: [["t", 2, 2]]}


def test_forgetting_a_gateway_drops_its_counts_and_memory():
    pr = ShardPresence()
    pr.report(GW, "t", 1, False)
    pr.report(GW2, "t", 2, True)
    pr.forget(GW)
    assert pr.total("t") == (2, 0)
    pr.report(GW2, "t", 0, False)
    assert pr.topics == {} and pr._by_gateway == {}


def test_shard_answers_count_queries_and_forgets_on_hello():
    shard = Shard("s0", epoch="E")
    shard.receive(GW, [[wire.COUNTS, [["t", 4, False]]], [wire.COUNTQ, "t", 9]], 1.0)
    assert shard.take_outbound()[GW][-1] == [wire.COUNTA, "t", 9, 4, 4]
    shard.receive(GW, [[wire.HELLO, GW, "i2", []], [wire.COUNTQ, "t", 10]], 1.0)
    assert shard.take_outbound()[GW][-1] == [wire.COUNTA, "t", 10, 0, 0]


# --- presence on the gateway -------------------------------------------------------------------


def test_gateway_reports_only_changes_coalesced():
    gp = GatewayPresence()
    for _ in range(5):
        gp.joined("t")
    gp.left("t")
    assert gp.reports() == [("t", 4, False)]
    assert gp.reports() == []


def test_watchers_get_a_first_count_then_changes_at_most_once_a_second():
    gp = GatewayPresence(interval=1.0)
    gp.joined("t")
    assert gp.watch("t", "w", 0.0) is None  # total not known yet
    gp.totals("t", 10, 0)  # the shard did not count this gateway's subscriber yet
    assert gp.due(0.1) == [("t", 11, ["w"])]
    gp.totals("t", 12, 1)
    assert gp.due(0.5) == []  # held back
    assert gp.due(1.1) == [("t", 12, ["w"])]
    gp.totals("t", 12, 1)
    assert gp.due(5.0) == []  # same count: nothing sent


def test_hub_presence_command_asks_the_shard_and_adds_its_own_fresh_count():
    hub, a = make_hub(), session("a")
    hub.subscribe(a, p.Subscribe("t"))
    req = hub.to_shards["s0"].pop()[2]
    hub.on_shard_frames("s0", [[wire.SUBOK, "t", req, "E-1", 0, False, []]])
    a.outbox.events()
    hub.presence(a, p.Presence("t", 5))
    (q,) = hub.to_shards["s0"]
    assert q[:2] == [wire.COUNTQ, "t"]
    hub.on_shard_frames("s0", [[wire.COUNTA, "t", q[2], 7, 0]])  # the shard has not seen a yet
    assert a.outbox.events() == [{"type": "presence", "topic": "t", "subscribers": 8, "id": 5}]


def test_hub_pushes_to_watchers_and_stops_when_they_leave():
    clock = Clock()
    hub, a = make_hub(clock), session("a")
    hub.subscribe(a, p.Subscribe("t", 1, presence=True))
    req = hub.to_shards["s0"].pop()[2]
    hub.on_shard_frames("s0", [[wire.SUBOK, "t", req, "E-1", 0, False, []]])
    assert hub.to_shards["s0"][-1][0] == wire.COUNTQ
    hub.on_shard_frames("s0", [[wire.COUNTA, "t", 0, 0, 0]])
    assert [e["type"] for e in a.outbox.events()] == ["subscribed", "presence"]
    hub.to_shards["s0"] = []
    hub.presence_tick()
    assert hub.to_shards["s0"] == [[wire.COUNTS, [["t", 1, True]]]]
    clock.now += 2
    hub.on_shard_frames("s0", [[wire.TOTALS, [["t", 3, 1]]]])
    assert a.outbox.events() == [{"type": "presence", "topic": "t", "subscribers": 3}]
    hub.unsubscribe(a, p.Unsubscribe("t"))
    hub.to_shards["s0"] = []
    hub.presence_tick()
    assert hub.to_shards["s0"] == [[wire.COUNTS, [["t", 0, False]]]]


# --- conflation in the hub ---------------------------------------------------------------------


class Slow(Capture):
    """An outbox whose bytes stay waiting until the test says they were written."""

    def __init__(self):
        super().__init__()
        self.size = 0

    def push(self, frame: bytes) -> None:
        super().push(frame)
        self.size += len(frame)


def test_hub_conflates_a_subscriber_behind_and_releases_the_newest_with_skipped():
    hub = Hub(Ring(["s0"]), inbox=GW, instance="i1", conflates=lambda t: t.startswith("px."), conflate_threshold=100)
    hub.link_up("s0")
    hub.on_shard_frames("s0", [[wire.WELCOME, "E", "i1"]])
    hub.to_shards["s0"] = []
    a = Session("a", Encoding.JSON, Slow())
    for i, topic in enumerate(["px.A", "plain.B"]):
        hub.subscribe(a, p.Subscribe(topic, i))
        req = hub.to_shards["s0"].pop()[2]
        hub.on_shard_frames("s0", [[wire.SUBOK, topic, req, "E-1", 0, False, []]])
    a.outbox.events()
    a.outbox.size = 1000  # far behind
    frames = [[wire.MSG, t, seq, P(seq), 0.0] for seq in range(1, 6) for t in ("px.A", "plain.B")]
    hub.on_shard_frames("s0", frames)
    assert [(e["topic"], e["seq"]) for e in a.outbox.events()] == [("plain.B", s) for s in range(1, 6)]
    assert hub.stats.conflated == 4  # px.A 1..4 replaced, 5 held
    hub.release_conflated()
    assert a.outbox.events() == []  # still behind
    a.outbox.size = 0  # it read everything
    hub.release_conflated()
    assert a.outbox.events() == [{"topic": "px.A", "payload": 5, "seq": 5, "skipped": 4}]
    hub.on_shard_frames("s0", [[wire.MSG, "px.A", 6, P(6), 0.0]])
    assert a.outbox.events() == [{"topic": "px.A", "payload": 6, "seq": 6}]


def test_a_gateway_going_silent_after_its_topic_ended_elsewhere_does_not_stop_the_shard():
    # Gateway a's count went to 0 while b still watched; then b left too and the
    # topic was dropped. a falling silent afterwards must not find a stale topic.
    pr = ShardPresence(timeout=1.5)
    pr.report("a", "live.1", 1, False)
    pr.report("b", "live.1", 0, True)
    pr.report("a", "live.1", 0, False)
    pr.report("b", "live.1", 0, False)
    pr.liveness({"b": 10.0}, 10.0)
    assert pr.total("live.1") == (0, 0)
