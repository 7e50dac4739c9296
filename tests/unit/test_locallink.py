"""The in-process shard link: the hub and a Shard joined by direct calls, one turn at a time."""

import orjson
import trio
import trio.testing

from fanroute import protocol as p
from fanroute import wire
from fanroute.codec import Encoding
from fanroute.gateway.hub import Hub, Session
from fanroute.gateway.locallink import LocalShardLink
from fanroute.ring import Ring
from fanroute.router.shard import Shard


class Capture:
    def __init__(self):
        self.frames = []

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)

    def events(self):
        out = [orjson.loads(f[2:] if f[1] < 126 else f[4:]) for f in self.frames]
        self.frames.clear()
        return out


class Joined:
    """A hub, its shards and their links, with the server's two callbacks recorded."""

    def __init__(self, names=("s0",)):
        self.hub = Hub(Ring(names), inbox="inproc://gw", instance="i1")
        self.shards = {name: Shard(name, epoch="E") for name in names}
        self.batches = []
        self.flushes = 0
        self.states = []
        self.links = {
            name: LocalShardLink(
                self.hub,
                name,
                shard,
                beat_interval=1.0,
                deliver=self.deliver,
                flush=self.flush,
                on_state=lambda n, up: self.states.append((n, up)),
            )
            for name, shard in self.shards.items()
        }

    def deliver(self, name, frames):
        self.batches.append((name, [f[0] for f in frames]))
        self.hub.on_shard_frames(name, frames)
        self.links[name].heard()

    def flush(self):
        self.flushes += 1
        self.hub.dirty.clear()

    def up(self):
        for name, link in self.links.items():
            self.hub.link_up(name)
            link.turn()


def session(name="a"):
    return Session(name, Encoding.JSON, Capture())


async def test_a_link_comes_up_with_hello_and_welcome_and_reports_it_once():
    j = Joined()
    assert not j.hub.shard_up["s0"]
    j.up()
    assert j.hub.shard_up["s0"]
    assert j.batches == [("s0", [wire.WELCOME])]
    assert j.states == [("s0", True)]
    assert "inproc://gw" in j.shards["s0"].gateways
    # Nothing queued: a turn carries nothing and calls nobody.
    assert j.links["s0"].turn() == 0
    assert j.batches == [("s0", [wire.WELCOME])]


async def test_one_turn_carries_every_queued_frame_and_brings_the_answers_back_in_order():
    j = Joined()
    j.up()
    a, b = session("a"), session("b")
    j.hub.subscribe(a, p.Subscribe("t", 1))
    j.hub.publish(b, p.Publish("t", {"n": 1}, 2))
    j.hub.publish(b, p.Publish("t", {"n": 2}, 3))
    assert j.links["s0"].turn() == 3
    assert j.hub.to_shards["s0"] == []
    assert a.outbox.events() == [
        {"type": "subscribed", "topic": "t", "epoch": "E-1", "seq": 0, "recovered": False, "id": 1},
        {"topic": "t", "payload": {"n": 1}, "seq": 1},
        {"topic": "t", "payload": {"n": 2}, "seq": 2},
    ]
    assert [e["seq"] for e in b.outbox.events()] == [1, 2]
    # One batch back for the whole turn.
    assert j.batches[-1] == ("s0", [wire.SUBOK, wire.MSG, wire.PUBOK, wire.MSG, wire.PUBOK])


async def test_each_turn_sets_room_for_publishers_held_back():
    j = Joined()
    j.up()
    link = j.links["s0"]
    room = link.room
    j.hub.publish(session(), p.Publish("t", 1, None))
    assert not room.is_set()
    link.turn()
    assert room.is_set()
    assert not link.room.is_set()  # a fresh event for the next wait


async def test_a_shard_that_forgot_the_gateway_is_introduced_again_on_the_next_beat():
    j = Joined()
    j.up()
    a = session()
    j.hub.subscribe(a, p.Subscribe("t", 1))
    j.links["s0"].turn()
    a.outbox.events()
    j.shards["s0"].forget("inproc://gw")
    j.hub.to_shards["s0"].append([wire.BEAT])
    j.links["s0"].turn()  # WELCOME for an unknown instance: the hub queues HELLO
    assert not j.hub.shard_up["s0"]
    j.links["s0"].turn()
    assert j.hub.shard_up["s0"]
    assert j.shards["s0"].topics["t"].gateways == {"inproc://gw"}


async def test_shards_are_reached_only_through_their_own_link():
    j = Joined(("s0", "s1"))
    j.up()
    s = session()
    topics = [f"t{i}" for i in range(20)]
    for i, topic in enumerate(topics):
        j.hub.subscribe(s, p.Subscribe(topic, i + 1))
    for link in j.links.values():
        link.turn()
    for name, shard in j.shards.items():
        assert set(shard.topics) == {t for t in topics if j.hub.ring.owner(t) == name}
        assert set(shard.topics)  # both shards own some of them
    assert len([e for e in s.outbox.events() if e["type"] == "subscribed"]) == 20


async def test_the_running_link_carries_a_turn_when_woken_and_flushes_after_it():
    j = Joined()
    a = session()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(j.links["s0"].run)
        await trio.testing.wait_all_tasks_blocked()
        assert j.hub.shard_up["s0"]
        assert a.outbox.frames == []
        j.hub.subscribe(a, p.Subscribe("t", 1))
        j.links["s0"].wake.set()
        await trio.testing.wait_all_tasks_blocked()
        assert a.outbox.events()[0]["type"] == "subscribed"
        assert j.flushes >= 2
        nursery.cancel_scope.cancel()
