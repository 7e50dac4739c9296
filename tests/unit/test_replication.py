"""Replicated streams (fanroute.router.replication) under crashes, restarts and partitions.

A small simulated network drives real :class:`Replica` objects: every message waits
in a per-link FIFO queue until the test delivers it, so messages are delayed,
reordered across links and lost (cut links, crashed routers) as hypothesis chooses,
and time moves only when the test moves it. What must hold whatever happens:

* no two routers commit different payloads under the same ``(topic, epoch, seq)``;
* a retried ``idem`` key is acknowledged with its original seq;
* with 3 routers and 2 copies, losing one router at a time (crash, SIGTERM,
  isolation) never changes a topic's epoch, and once everything is back every
  acknowledged publication is in its topic's stream exactly once.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fanroute import wire
from fanroute.errors import WireError
from fanroute.history import History
from fanroute.ring import Ring
from fanroute.router.replication import Committed, Ready, Refused, Replica

TOPICS = [f"topic-{i}" for i in range(6)]


class Sim:
    def __init__(self, n: int, copies: int = 2, seed: int = 0) -> None:
        self.names = [f"r{i}" for i in range(n)]
        self.ring = Ring(self.names)
        self.copies = copies
        self.rng = random.Random(seed)
        self.now = 0.0
        self.nodes: dict[str, Replica] = {}
        self.up: set[str] = set()
        for name in self.names:
            self.start(name)
        self.queues: dict[tuple[str, str], deque[list[Any]]] = defaultdict(deque)
        self.cut: set[frozenset[str]] = set()
        self.log: dict[tuple[str, str, int], bytes] = {}
        self.acked: dict[str, tuple[str, str, int, bytes]] = {}  # idem -> (topic, epoch, seq, payload)
        self.epochs: dict[str, set[str]] = defaultdict(set)
        self.outstanding: dict[str, tuple[str, bytes]] = {}  # idem -> (topic, payload), not yet acked
        self.tokens: dict[int, str] = {}  # token -> idem
        self.token_at: dict[int, str] = {}  # token -> the router it was sent to
        self._token = 0
        self._pub = 0

    # --- the network -------------------------------------------------------------

    def start(self, name: str) -> None:
        self.nodes[name] = Replica(
            name,
            self.names,
            self.ring.order,
            copies=self.copies,
            timeout=0.3,
            beat_interval=0.05,
            hold=0.5,
            history=lambda topic: History(100_000, 1e9),
        )
        self.up.add(name)

    def crash(self, name: str) -> None:
        """The router is gone, with every answer it owed: its clients will retry."""
        self.up.discard(name)
        for token in [t for t, at in self.token_at.items() if at == name]:
            self.tokens.pop(token, None)
            del self.token_at[token]
        for key in list(self.queues):
            if key[1] == name:
                del self.queues[key]

    def linked(self, a: str, b: str) -> bool:
        return a in self.up and b in self.up and frozenset((a, b)) not in self.cut

    def collect(self, name: str) -> None:
        node = self.nodes[name]
        out, node.out = node.out, []
        for to, msg in out:
            wire.check_peer_frame(msg)  # every message is one the receiver's checks let in
            if self.linked(name, to):
                self.queues[(name, to)].append(msg)
        events, node.events = node.events, []
        for ev in events:
            self.on_event(name, ev)

    def on_event(self, name: str, ev: Any) -> None:
        if isinstance(ev, Committed):
            key = (ev.topic, ev.epoch, ev.seq)
            assert self.log.setdefault(key, ev.payload) == ev.payload, f"two truths at {key}"
            self.epochs[ev.topic].add(ev.epoch)
            for token in ev.tokens:
                idem = self.tokens.pop(token)
                self.token_at.pop(token, None)
                got = (ev.topic, ev.epoch, ev.seq, ev.payload)
                first = self.acked.setdefault(idem, got)
                if first[1] == ev.epoch:
                    assert first == got, f"{idem} acknowledged as {first} and as {got}"
                self.outstanding.pop(idem, None)
        elif isinstance(ev, Refused):
            # The client retries later (`retry_all`), as after an error frame.
            self.tokens.pop(ev.token, None)
            self.token_at.pop(ev.token, None)

    def deliver(self, count: int) -> None:
        for _ in range(count):
            keys = [k for k, q in self.queues.items() if q]
            if not keys:
                return
            src, dst = self.rng.choice(keys)
            msg = self.queues[(src, dst)].popleft()
            if not self.linked(src, dst):
                continue
            self.nodes[dst].receive(src, msg, self.now)
            self.collect(dst)

    def advance(self, dt: float) -> None:
        self.now += dt
        for name in sorted(self.up):
            self.nodes[name].tick(self.now)
            self.collect(name)

    # --- the clients ---------------------------------------------------------------

    def leader_guess(self, topic: str) -> str | None:
        for name in sorted(self.up):
            node = self.nodes[name]
            if node.ready and node.view is not None:
                return node.leader_of(topic)
        return None

    def send(self, to: str, idem: str) -> None:
        topic, payload = self.outstanding[idem]
        self._token += 1
        self.tokens[self._token] = idem
        self.token_at[self._token] = to
        self.nodes[to].publish(topic, payload, self.now, idem, self._token, self.now)
        self.collect(to)

    def publish(self, topic: str) -> None:
        self._pub += 1
        idem = f"k{self._pub}"
        self.outstanding[idem] = (topic, f"{topic}/{self._pub}".encode())
        self.retry_one(idem)

    def retry_one(self, idem: str) -> None:
        topic, _ = self.outstanding[idem]
        leader = self.leader_guess(topic)
        if leader is not None and leader in self.up:
            self.send(leader, idem)

    def retry_all(self) -> None:
        waiting = set(self.tokens.values())
        for idem in list(self.outstanding):
            if idem not in waiting:
                self.retry_one(idem)

    # --- states --------------------------------------------------------------------

    def stable(self) -> bool:
        """Every router that is up is linked to the others and ready in one view of them all."""
        if self.cut:
            return False
        nodes = [self.nodes[n] for n in self.up]
        views = {(n.view.number if n.view else None, n.ready, n.promised) for n in nodes}
        if len(views) != 1:
            return False
        number, ready, promised = next(iter(views))
        return ready and promised == number and set(nodes[0].view.members) == self.up

    def settle(self, limit: float = 20.0) -> None:
        end = self.now + limit
        while self.now < end:
            self.advance(0.02)
            self.deliver(10_000)
            if self.stable() and not self.tokens:
                self.retry_all()
                self.deliver(10_000)
                if not self.outstanding and not self.tokens:
                    return
        raise AssertionError(f"no stable view: {[(n.name, n.view, n.ready) for n in self.nodes.values()]}")


ACTIONS = st.one_of(
    st.tuples(st.just("deliver"), st.integers(1, 40)),
    st.tuples(st.just("time"), st.floats(0.01, 0.4)),
    st.tuples(st.just("publish"), st.sampled_from(TOPICS)),
    st.tuples(st.just("retry"), st.just(0)),
    st.tuples(st.just("crash"), st.integers(0, 4)),
    st.tuples(st.just("restart"), st.integers(0, 4)),
    st.tuples(st.just("leave"), st.integers(0, 4)),
    st.tuples(st.just("isolate"), st.integers(0, 4)),
    st.tuples(st.just("heal"), st.just(0)),
)


def run(sim: Sim, actions: list[tuple[str, Any]], *, one_at_a_time: bool) -> None:
    n = len(sim.names)
    for kind, arg in actions:
        if kind == "deliver":
            sim.deliver(arg)
        elif kind == "time":
            if one_at_a_time:
                sim.deliver(10_000)  # a network that is never slower than the timeout
            sim.advance(arg)
        elif kind == "publish":
            sim.publish(arg)
        elif kind == "retry":
            sim.retry_all()
        elif kind in ("crash", "leave", "isolate"):
            name = sim.names[arg % n]
            if one_at_a_time and not (sim.stable() and sim.up == set(sim.names)):
                continue  # one router at a time, each loss repaired before the next
            if name not in sim.up:
                continue
            if kind == "crash":
                sim.crash(name)
            elif kind == "leave":
                sim.nodes[name].leave(sim.now)
                sim.collect(name)
            else:
                sim.cut |= {frozenset((name, other)) for other in sim.names if other != name}
        elif kind == "restart":
            name = sim.names[arg % n]
            if name in sim.up and not sim.nodes[name].leaving:
                continue
            sim.crash(name)
            sim.start(name)
        elif kind == "heal":
            sim.cut.clear()


def finish(sim: Sim) -> None:
    """Bring everything back and check the streams hold every acknowledged publication once."""
    sim.cut.clear()
    for name in sim.names:
        if name not in sim.up or sim.nodes[name].leaving:
            sim.crash(name)
            sim.start(name)
    sim.settle()
    for topic in TOPICS:
        sim.publish(topic)
    sim.settle()
    for idem, (topic, epoch, seq, payload) in sim.acked.items():
        leader = sim.nodes[sim.nodes["r0"].leader_of(topic)]
        stream = leader.streams[topic]
        if stream.epoch != epoch:
            continue
        got = stream.history.after(seq - 1, stream.seq, sim.now)
        assert got and got[0].payload == payload and got[0].idem == idem, f"{idem} lost from {topic}"
    for topic in TOPICS:
        stream = sim.nodes[sim.nodes["r0"].leader_of(topic)].streams.get(topic)
        if stream is None:
            continue
        keys = [e.idem for e in stream.history.newest(len(stream.history), sim.now)]
        assert len(keys) == len(set(keys)), f"a publication applied twice in {topic}"


def random_actions(rng: random.Random, count: int) -> list[tuple[str, Any]]:
    kinds = ["deliver", "time", "publish", "publish", "retry", "crash", "restart", "leave", "isolate", "heal"]
    out: list[tuple[str, Any]] = []
    for _ in range(count):
        kind = rng.choice(kinds)
        arg = {"deliver": rng.randint(1, 40), "time": rng.uniform(0.01, 0.4), "publish": rng.choice(TOPICS)}
        out.append((kind, arg.get(kind, rng.randint(0, 4))))
    return out


def test_long_random_schedules():
    """Hundreds of steps each: what hypothesis' shorter lists reach less often."""
    for seed in range(60):
        actions = random_actions(random.Random(seed), 300)
        sim = Sim(3, seed=seed)
        sim.settle()
        run(sim, actions, one_at_a_time=True)
        finish(sim)
        for topic, epochs in sim.epochs.items():
            assert len(epochs) == 1, f"seed {seed}: {topic} changed epoch: {epochs}"
        sim = Sim(5, seed=seed)
        sim.settle()
        run(sim, actions, one_at_a_time=False)
        finish(sim)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTIONS, max_size=150), st.integers(0, 2**32))
def test_three_routers_losing_one_at_a_time_keep_every_stream(actions, seed):
    sim = Sim(3, seed=seed)
    sim.settle()
    run(sim, actions, one_at_a_time=True)
    finish(sim)
    for topic, epochs in sim.epochs.items():
        assert len(epochs) == 1, f"{topic} changed epoch: {epochs}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTIONS, max_size=150), st.integers(0, 2**32))
def test_any_partition_or_crash_never_makes_two_truths(actions, seed):
    sim = Sim(5, seed=seed)
    sim.settle()
    run(sim, actions, one_at_a_time=False)
    finish(sim)


# --- single behaviours -------------------------------------------------------------


def test_a_publication_is_committed_only_once_both_copies_hold_it():
    sim = Sim(3)
    sim.settle()
    topic = TOPICS[0]
    leader = sim.nodes[sim.leader_guess(topic)]
    (follower,) = [n for n in leader.copies_of(topic) if n != leader.name]
    sim.publish(topic)
    assert sim.outstanding and sim.queues[(leader.name, follower)]  # the append is on its way
    sim.queues[(leader.name, follower)].clear()  # and lost: nothing is committed
    sim.deliver(10_000)
    assert sim.outstanding and not sim.log
    for _ in range(20):  # the leader sends it again after a timeout
        sim.advance(0.02)
        sim.deliver(10_000)
    assert not sim.outstanding
    assert sim.nodes[follower].streams[topic].seq == 1
    assert list(sim.log) == [(topic, sim.nodes[follower].streams[topic].epoch, 1)]


def test_sigkill_of_a_leader_keeps_the_epoch_and_the_next_seq():
    sim = Sim(3)
    sim.settle()
    topic = TOPICS[1]
    for _ in range(5):
        sim.publish(topic)
    sim.deliver(10_000)
    ((_, epoch, seq, _),) = {v for v in sim.acked.values() if v[2] == 5}
    old = sim.leader_guess(topic)
    sim.crash(old)
    t0 = sim.now
    while True:
        sim.advance(0.02)
        sim.deliver(10_000)
        if any(n.ready and n.view and old not in n.view.members for n in sim.nodes.values() if n.name in sim.up):
            break
        assert sim.now - t0 < 5
    sim.publish(topic)
    sim.deliver(10_000)
    sim.settle()
    new = [v for k, v in sim.acked.items() if v[2] == 6]
    assert new and new[0][1] == epoch
    # Detection (0.3 s of silence) plus the lease wait (0.33 s) and one round trip.
    assert sim.now - t0 < 5


def test_sigterm_hands_off_without_waiting_out_the_lease():
    sim = Sim(3)
    sim.settle()
    topic = TOPICS[2]
    sim.publish(topic)
    sim.deliver(10_000)
    old = sim.nodes[sim.leader_guess(topic)]
    old.leave(sim.now)
    sim.collect(old.name)
    sim.deliver(10_000)
    for _ in range(3):
        sim.advance(0.01)
        sim.deliver(10_000)
    others = [sim.nodes[n] for n in sim.names if n != old.name]
    assert all(n.ready and old.name not in n.view.members for n in others)
    assert old.handed_off(sim.now)
    assert sum(n.stats.handoffs for n in others) >= 1


def test_a_retried_idem_key_gets_its_original_seq_from_the_new_leader():
    sim = Sim(3)
    sim.settle()
    topic = TOPICS[3]
    sim.publish(topic)
    leader = sim.leader_guess(topic)
    (follower,) = [n for n in sim.nodes[leader].copies_of(topic) if n != leader]
    # The follower gets the append, the leader dies before it hears back.
    while sim.queues[(leader, follower)]:
        sim.deliver(1)
        held = sim.nodes[follower].streams.get(topic)
        if held is not None and held.seq >= 1:
            break
    assert sim.nodes[follower].streams[topic].seq == 1
    sim.crash(leader)  # the answer is lost with it: the client retries with its key
    sim.settle()
    ((_, _, seq, _),) = sim.acked.values()
    assert seq == 1
    assert sim.nodes[sim.leader_guess(topic)].streams[topic].seq == 1


def test_two_routers_refuse_rather_than_guess_when_one_is_gone():
    sim = Sim(2)
    sim.settle()
    sim.crash("r1")
    refused = []
    sim.on_event = lambda name, ev: refused.append(ev) if isinstance(ev, Refused) else None
    for _ in range(60):
        sim.advance(0.05)
        sim.deliver(10_000)
    sim.nodes["r0"].publish(TOPICS[0], b"x", 0.0, None, 1, sim.now)
    sim.advance(1.0)
    assert [ev.reason for ev in refused] == ["unavailable"]
    assert sim.nodes["r0"].stats.refused_unsafe == 1


def test_copies_follow_the_rendezvous_order_and_survive_removals():
    names = [f"r{i}" for i in range(5)]
    ring = Ring(names)
    smaller = Ring(names[:-1])
    for i in range(500):
        topic = f"t{i}"
        order = ring.order(topic)
        assert order[0] == ring.owner(topic) and sorted(order) == names
        assert smaller.order(topic) == tuple(r for r in order if r != "r4")


def test_adding_a_router_moves_a_share_of_the_streams_with_their_epoch():
    sim = Sim(4)
    sim.crash("r3")
    sim.settle()
    topics = [f"moved-{i}" for i in range(40)]
    for topic in topics:
        sim.publish(topic)
    sim.settle()
    before = {t: sim.nodes[sim.leader_guess(t)].streams[t].epoch for t in topics}
    sim.start("r3")
    sim.settle()
    r3 = sim.nodes["r3"]
    held = [t for t in topics if t in r3.streams]
    assert 0 < len(held) < len(topics)
    for topic in topics:
        stream = sim.nodes[sim.leader_guess(topic)].streams[topic]
        assert (stream.epoch, stream.seq) == (before[topic], 1)


def test_a_returning_router_is_ready_only_after_it_caught_up():
    sim = Sim(3)
    sim.settle()
    for topic in TOPICS:
        sim.publish(topic)
    sim.deliver(10_000)
    sim.crash("r1")
    sim.settle()
    sim.start("r1")
    events: list[Any] = []
    original = sim.on_event
    sim.on_event = lambda name, ev: (events.append((name, ev)), original(name, ev))
    sim.settle()
    (ready,) = [ev for name, ev in events if name == "r1" and isinstance(ev, Ready)]
    r1 = sim.nodes["r1"]
    for topic in TOPICS:
        if "r1" in r1.copies_of(topic):
            assert r1.streams[topic].seq == 1


def test_malformed_router_frames_are_refused_before_the_replica_sees_them():
    for frame in ([60, 1, 2, "x"], [62, 1, "r0"], [66, 1, "t", "e", 1, [[1, "not bytes", 0.0, None]]], [70, 1], [59], "x", []):
        try:
            wire.check_peer_frame(frame)
        except WireError:
            continue
        raise AssertionError(f"{frame!r} was let in")


def test_batched_confirmations_cover_every_seq_up_to_the_highest():
    """With batch_acks a copy confirms a batch of appends once per topic; the leader
    commits every entry the one confirmation covers."""
    sim = Sim(2)
    for node in sim.nodes.values():
        node.batch_acks = True
    sim.settle()
    topic = TOPICS[0]
    leader = sim.nodes[sim.nodes["r0"].leader_of(topic)]
    follower = next(n for n in sim.nodes.values() if n is not leader)
    for i in range(5):
        leader.publish(topic, bytes([i]), 0.0, None, ("t", i), sim.now)
    appends = [m for to, m in leader.out if m[0] == wire.PEER_APPEND]
    assert [a[4] for a in appends] == [0, 1, 2, 3, 4, 5]  # the stream's start, then its entries
    leader.out.clear()
    for m in appends:
        follower.receive(leader.name, m, sim.now)
    assert not [m for _, m in follower.out if m[0] == wire.PEER_APPENDED]  # held for the batch
    follower.flush_acks()
    acks = [m for _, m in follower.out if m[0] == wire.PEER_APPENDED]
    assert [a[3] for a in acks] == [5]
    follower.out.clear()
    leader.events.clear()
    for a in acks:
        leader.receive(follower.name, a, sim.now)
    assert [e.seq for e in leader.events if isinstance(e, Committed)] == [1, 2, 3, 4, 5]
