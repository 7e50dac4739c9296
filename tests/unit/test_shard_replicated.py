"""The shard with replicated streams: what gateways see of the replica's decisions.

Two or three :class:`Shard` objects, each with its :class:`Replica`, joined by an
in-memory network that delivers every router message at once (the rules under loss,
delay and partitions are ``test_replication.py``'s). What is checked here is the
shard's side: acknowledgements and deliveries only once every copy holds an entry,
subscribes refused (with the view) where a router does not serve a topic, the
shard-wide history byte cap over replicated streams, and a gateway that comes back to
a new epoch getting it whole.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fanroute import wire
from fanroute.errors import WireError
from fanroute.ring import Ring
from fanroute.router.replication import Replica
from fanroute.router.shard import Shard

GW = "tcp://127.0.0.1:9999"


class Cluster:
    def __init__(self, n: int = 2, **shard: Any) -> None:
        self.names = [f"r{i}" for i in range(n)]
        self.ring = Ring(self.names)
        self.now = 0.0
        self.shards: dict[str, Shard] = {}
        self.held: list[tuple[str, str, list[Any]]] = []  # messages not delivered yet
        self.hold = False  # keep router messages back instead of delivering them
        for name in self.names:
            sh = Shard(name, replicated=True, **shard)
            sh.replica = Replica(name, self.names, self.ring.order, copies=2, timeout=0.3, beat_interval=0.05,
                                 history=sh.new_history)
            self.shards[name] = sh

    def step(self, dt: float = 0.05) -> None:
        self.now += dt
        for sh in self.shards.values():
            sh.replica.tick(self.now)
            sh.pump(self.now)
        self.carry()

    def carry(self) -> None:
        moved = True
        while moved:
            moved = False
            for name, sh in self.shards.items():
                out, sh.replica.out = sh.replica.out, []
                for to, msg in out:
                    moved = True
                    if self.hold:
                        self.held.append((name, to, msg))
                    else:
                        self.shards[to].replica.receive(name, msg, self.now)
                        self.shards[to].pump(self.now)

    def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for frm, to, msg in held:
            self.shards[to].replica.receive(frm, msg, self.now)
            self.shards[to].pump(self.now)
        self.carry()

    def settle(self) -> None:
        for _ in range(100):
            self.step()
            if all(sh.replica.serving(self.now) for sh in self.shards.values()):
                return
        raise AssertionError("the routers never formed a view")

    def leader(self, topic: str) -> Shard:
        return self.shards[self.shards["r0"].replica.leader_of(topic)]

    def follower(self, topic: str) -> Shard:
        return next(sh for sh in self.shards.values() if sh is not self.leader(topic))

    def frames(self, sh: Shard) -> list[list[Any]]:
        return sh.take_outbound().get(GW, [])


def hello(sh: Shard, now: float, interest: list[list[Any]] | None = None) -> None:
    sh.receive(GW, [[wire.HELLO, GW, "gw-1", interest or []]], now, sh.name)


def test_a_publication_is_acknowledged_and_delivered_only_once_both_copies_hold_it():
    c = Cluster()
    c.settle()
    topic = "t.1"
    leader = c.leader(topic)
    hello(leader, c.now)
    leader.receive(GW, [[wire.SUB, topic, 1, None, 0]], c.now, leader.name)
    c.frames(leader)
    c.hold = True
    leader.receive(GW, [[wire.PUB, topic, b"\x01", 7, 1.0, "k1"]], c.now, leader.name)
    c.carry()
    assert [f for f in c.frames(leader) if f[0] in (wire.PUBOK, wire.MSG)] == []  # the copy has not said it holds it
    c.release()
    frames = c.frames(leader)
    assert [wire.PUBOK, topic, 7, 1] in frames
    assert [wire.MSG, topic, 1, b"\x01", 1.0] in frames
    assert c.follower(topic).replica.streams[topic].seq == 1


def test_a_retry_with_the_same_idem_key_gets_the_original_seq():
    c = Cluster()
    c.settle()
    topic = "t.2"
    leader = c.leader(topic)
    hello(leader, c.now)
    for req in (1, 2):
        leader.receive(GW, [[wire.PUB, topic, b"\x01", req, 1.0, "same"]], c.now, leader.name)
        c.carry()
    oks = [f for f in c.frames(leader) if f[0] == wire.PUBOK]
    assert oks == [[wire.PUBOK, topic, 1, 1], [wire.PUBOK, topic, 2, 1]]


def test_a_router_that_does_not_lead_a_topic_refuses_and_sends_the_view():
    c = Cluster()
    c.settle()
    topic = "t.3"
    other = c.follower(topic)
    hello(other, c.now)
    c.frames(other)
    other.receive(GW, [[wire.SUB, topic, 5, None, 0], [wire.PUB, topic, b"\x01", 6, 1.0, None]], c.now, other.name)
    c.carry()
    frames = c.frames(other)
    nacks = {f[1]: f[2] for f in frames if f[0] == wire.NACK}
    assert nacks == {5: "unavailable", 6: "unavailable"}
    views = [f for f in frames if f[0] == wire.VIEW]
    assert views and sorted(views[0][2]) == c.names


def test_before_it_knows_its_peers_a_replicated_shard_applies_nothing():
    sh = Shard("r0", replicated=True)
    sh.receive(GW, [[wire.PUB, "t", b"\x01", 3, 1.0, None]], 0.0, "r0")
    assert [f for f in sh.take_outbound()[GW] if f[0] == wire.NACK] == [[wire.NACK, 3, "unavailable", "router r0 does not know its peers yet"]]
    assert sh.stats.refused == 1


def test_the_history_byte_cap_holds_across_replicated_streams():
    cap = 1 << 20
    c = Cluster(history_bytes=cap)
    c.settle()
    for i in range(120):  # 120 topics × 20 KB: more than twice the cap
        topic = f"flood.{i}"
        leader = c.leader(topic)
        hello(leader, c.now)
        leader.receive(GW, [[wire.PUB, topic, b"x" * 20000, i + 1, 1.0, None]], c.now, leader.name)
        c.carry()
    for sh in c.shards.values():
        assert 0 < sh.history_bytes <= cap
        assert sh.stats.history_evicted > 0
        assert sh.history_bytes == sum(st.history.bytes for st in sh.replica.streams.values())


def test_a_gateway_that_comes_back_to_a_new_epoch_gets_it_from_seq_1():
    """A router restarted (every copy lost): the new epoch's first messages reach the
    gateway's subscribers even when it reintroduces itself only after they were published."""
    sh = Shard("r0")
    hello(sh, 0.0)
    for i in range(3):
        sh.receive(GW, [[wire.PUB, "t", bytes([i]), 0, 1.0, None]], 0.0, "r0")
    sh.take_outbound()
    hello(sh, 0.1, [["t", "old-epoch", 41]])
    subok = next(f for f in sh.take_outbound()[GW] if f[0] == wire.SUBOK)
    assert subok[5] is False and [m[0] for m in subok[6]] == [1, 2, 3]


def test_a_leader_cut_off_with_unconfirmed_publications_answers_outcome_unknown():
    """Its copy never confirms and no view can come while it is cut off: after
    ``hold`` seconds without a lease the waiting publication is answered, never left hanging."""
    c = Cluster()
    c.settle()
    topic = "t.cut"
    leader = c.leader(topic)
    hello(leader, c.now)
    c.frames(leader)
    c.hold = True  # from here on nothing reaches the other router
    leader.receive(GW, [[wire.PUB, topic, b"\x01", 9, 1.0, "k"]], c.now, leader.name)
    answered = []
    for _ in range(60):  # 3 s
        c.step()
        answered += [f for f in c.frames(leader) if f[0] in (wire.NACK, wire.PUBOK)]
    assert answered and answered[0][:3] == [wire.NACK, 9, "outcome_unknown"]


def test_a_new_streams_epoch_is_shown_only_once_its_copy_holds_it():
    """Subscribing to a topic nobody published to yet starts its stream: the epoch in
    the answer is the one the other copy holds, so losing the leader right after
    cannot change it."""
    c = Cluster()
    c.settle()
    topic = "t.new"
    leader, follower = c.leader(topic), c.follower(topic)
    hello(leader, c.now)
    c.frames(leader)
    c.hold = True
    leader.receive(GW, [[wire.SUB, topic, 3, None, 0]], c.now, leader.name)
    c.carry()
    assert [f for f in c.frames(leader) if f[0] == wire.SUBOK] == []  # held: the copy has not said it holds it
    c.release()
    (subok,) = [f for f in c.frames(leader) if f[0] == wire.SUBOK]
    assert subok[2] == 3 and subok[3] == follower.replica.streams[topic].epoch


# --- what a broken or hostile peer can send --------------------------------------------

peer_fields = st.one_of(
    st.integers(-3, 20000),
    st.sampled_from(["r0", "r1", "r9", "", "t.1", "E", "tcp://127.0.0.1:1", "junk url"]),
    st.binary(max_size=8),
    st.floats(allow_nan=True),
    st.none(),
    st.booleans(),
    st.lists(st.sampled_from(["r0", "r1", "r9", ""]), max_size=4),
    st.lists(st.lists(st.one_of(st.integers(0, 5), st.binary(max_size=3), st.text(max_size=3), st.none()), max_size=5), max_size=3),
)
peer_frames = st.builds(lambda k, rest: [k, *rest], st.integers(58, 73), st.lists(peer_fields, max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["r0", "r1"]), peer_frames), min_size=1, max_size=20))
def test_any_peer_frames_leave_the_routers_serving(messages):
    """Frames a peer could send (checked as the server checks them) never raise, and the
    routers still acknowledge a publication afterwards."""
    c = Cluster()
    c.settle()
    for sender, frame in messages:
        try:
            wire.check_peer_frame(frame)
        except WireError as err:
            assert err.reason == "malformed"
            continue
        to = "r1" if sender == "r0" else "r0"
        c.shards[to].replica.receive(sender, frame, c.now)
        c.shards[to].pump(c.now)
    c.carry()
    for _ in range(200):  # whatever the frames started (a new view, say), it settles
        c.step()
        leader = c.leader("t.after")
        if leader.replica.serving(c.now) and all(sh.replica.serving(c.now) for sh in c.shards.values()):
            break
    hello(leader, c.now)
    leader.receive(GW, [[wire.PUB, "t.after", b"\x01", 4, 1.0, None]], c.now, leader.name)
    for _ in range(40):
        c.step()
        if [wire.PUBOK, "t.after", 4, 1] in (frames := c.frames(leader)):
            break
    assert [wire.PUBOK, "t.after", 4, 1] in frames


def test_a_router_list_it_could_never_dial_is_refused():
    sh = Shard("r0", replicated=True)
    sh.receive(GW, [[wire.ROUTERS, [["r0", "tcp://127.0.0.1:7101"], ["r1", "not a url"]]]], 0.0, "r0")
    assert sh.router_list is None and sh.stats.frames_rejected == 1
    sh.receive(GW, [[wire.ROUTERS, [["r0", "tcp://127.0.0.1:7101"], ["r1", "tcp://127.0.0.1:7102"]]]], 0.0, "r0")
    assert sh.router_list == [("r0", "tcp://127.0.0.1:7101"), ("r1", "tcp://127.0.0.1:7102")] and sh.own_name == "r0"
