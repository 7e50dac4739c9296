"""A real multi-process cluster on loopback: 2 gateways, 3 routers, TCP nng links."""

from __future__ import annotations

import pytest
import trio

from fanroute.ring import Ring
from tests.support import DEADLINE, await_until, metric, start_cluster, ws_connect

TOPICS = [f"market.T{i}" for i in range(120)]
PER_TOPIC = 20


@pytest.fixture
def cluster():
    c = start_cluster(gateways=2, routers=3)
    yield c
    c.stop()


async def test_publications_cross_gateways_in_order_without_gaps_or_duplicates(cluster):
    ring = Ring(f"router-{i}" for i in range(3))
    assert {ring.owner(t) for t in TOPICS} == set(ring.shards)  # every shard is exercised
    gw_a, gw_b = cluster.gateways
    received: dict[str, list[int]] = {t: [] for t in TOPICS}

    async with ws_connect(gw_a.url) as sub_1, ws_connect(gw_a.url) as sub_2, ws_connect(gw_b.url) as pub:
        subs = (sub_1, sub_2)
        for i, topic in enumerate(TOPICS):
            assert (await subs[i % 2].subscribe(topic, id=i + 1))["seq"] == 0
        n = 0
        for round in range(PER_TOPIC):
            for topic in TOPICS:
                n += 1
                await pub.send({"type": "publish", "topic": topic, "payload": {"r": round, "t": topic}})
        await pub.send({"type": "publish", "topic": TOPICS[0], "payload": "last", "id": 1})
        assert (await pub.recv_type("published"))["seq"] == PER_TOPIC + 1

        async def drain(ws, expect: int):
            got = 0
            with trio.fail_after(DEADLINE):
                while got < expect:
                    msg = await ws.recv()
                    received[msg["topic"]].append(msg["seq"])
                    if msg["payload"] != "last":
                        assert msg["payload"]["t"] == msg["topic"]
                    got += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, sub_1, (len(TOPICS) // 2) * PER_TOPIC + 1)
            nursery.start_soon(drain, sub_2, (len(TOPICS) // 2) * PER_TOPIC)

    for topic, seqs in received.items():
        expected = list(range(1, PER_TOPIC + 1 + (topic == TOPICS[0])))
        assert seqs == expected, topic

    # Gateway B has no subscribers: the shards sent it no deliveries at all.
    text_b, text_a = gw_b.metrics(), gw_a.metrics()
    assert metric(text_b, "fanroute_gateway_deliveries_received_total") == 0
    assert metric(text_a, "fanroute_gateway_deliveries_received_total") == len(TOPICS) * PER_TOPIC + 1
    assert metric(text_a, "fanroute_gateway_deliveries_unrouted_total") == 0
    fanout = sum(metric(r.metrics(), "fanroute_router_fanout_sends_total") for r in cluster.routers)
    assert fanout == len(TOPICS) * PER_TOPIC + 1  # once per publication: one interested gateway


async def test_recovery_across_gateways_while_publishing(cluster, nursery):
    gw_a, gw_b = cluster.gateways
    total = 400
    done = trio.Event()

    async def publisher():
        async with ws_connect(gw_b.url) as pub:
            for i in range(1, total + 1):
                await pub.send({"type": "publish", "topic": "ticker.X", "payload": i})
                if i % 25 == 0:
                    await pub.send({"type": "ping", "ts": i})
                    await pub.recv_type("pong")
        done.set()

    seen: list[int] = []
    async with ws_connect(gw_a.url) as sub:
        epoch = (await sub.subscribe("ticker.X"))["epoch"]
        nursery.start_soon(publisher)
        while len(seen) < 50:
            seen.append((await sub.recv())["seq"])
    # Back on the other gateway, from where it left off, while publishing goes on.
    async with ws_connect(gw_b.url) as sub:
        reply = await sub.subscribe("ticker.X", since={"epoch": epoch, "seq": seen[-1]})
        assert reply["recovered"] is True
        while seen[-1] < total:
            seen.append((await sub.recv())["seq"])
    assert seen == list(range(1, total + 1))
    with trio.fail_after(DEADLINE):
        await done.wait()


async def test_interest_follows_subscribers(cluster):
    gw_a, gw_b = cluster.gateways
    async with ws_connect(gw_a.url) as sub, ws_connect(gw_b.url) as pub:
        await sub.subscribe("room.1")
        await sub.send({"type": "unsubscribe", "topic": "room.1", "id": 2})
        await sub.recv_type("unsubscribed")

        def no_interest() -> bool:
            return sum(metric(r.metrics(), "fanroute_router_interest_entries") for r in cluster.routers) == 0

        await await_until(no_interest, what="interest withdrawn")
        await pub.send({"type": "publish", "topic": "room.1", "payload": 1, "id": 1})
        await pub.recv_type("published")
    assert metric(gw_a.metrics(), "fanroute_gateway_deliveries_received_total") == 0
