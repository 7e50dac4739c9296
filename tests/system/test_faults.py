"""Faults for real: processes killed with SIGKILL, frozen with SIGSTOP, drained with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import trio
from trio_websocket import ConnectionClosed

from fanroute.client import Client, Message
from fanroute.ring import Ring
from tests.support import DEADLINE, await_until, http_get, metric, ready, start_cluster, ws_connect

FAST = ["--ping-interval", "0.5", "--ping-timeout", "0.5"]

CLIENT_SCRIPT = """
import asyncio, json, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1], ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "subscribe", "topic": "frozen.feed", "id": 1}))
        await ws.recv()
        print("ready", flush=True)
        while True:
            await ws.recv()
asyncio.run(main())
"""


@pytest.fixture
def cluster():
    c = start_cluster(gateways=2, routers=2, gateway_args=FAST, router_args=["--gateway-timeout", "2"])
    yield c
    c.stop()


async def test_a_frozen_client_is_closed_and_its_interest_withdrawn(cluster):
    gw = cluster.gateways[0]
    client = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, gw.url], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        assert metric(gw.metrics(), "fanroute_gateway_connections") == 1
        client.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        async with ws_connect(cluster.gateways[1].url) as pub:
            # Keep traffic flowing at the frozen client while we wait.
            deadline = 0.5 + 0.5 + 10  # ping_interval + ping_timeout + a generous grace
            with trio.fail_after(deadline + DEADLINE):
                while metric(gw.metrics(), "fanroute_gateway_heartbeat_timeouts_total") < 1:
                    await pub.send({"type": "publish", "topic": "frozen.feed", "payload": "x" * 1000})
                    await trio.sleep(0.05)
        detected = time.monotonic() - frozen_at
        assert detected < deadline, f"detected after {detected:.1f}s"

        def released() -> bool:
            text = gw.metrics()
            return (
                metric(text, "fanroute_gateway_connections") == 0
                and metric(text, "fanroute_gateway_outbox_bytes") == 0
                and metric(text, "fanroute_gateway_topics") == 0
                and sum(metric(r.metrics(), "fanroute_router_interest_entries") for r in cluster.routers) == 0
            )

        await await_until(released, what="connection, buffer and interest released")
        assert metric(gw.metrics(), "fanroute_gateway_connections_closed_total", 'reason="heartbeat_timeout"') == 1
    finally:
        client.send_signal(signal.SIGCONT)
        client.kill()
        client.wait()


async def test_sigkill_a_gateway_under_a_running_publisher(cluster, nursery):
    gw_a, gw_b = cluster.gateways
    total, n_clients = 300, 8
    acked: list[int] = []
    published = trio.Event()

    async def publisher(started: trio.Event) -> None:
        async with Client([gw_b.url]) as pub:
            for i in range(total):
                acked.append(await pub.publish("live.stream", {"i": i}))
                if i == 50:
                    started.set()
                await trio.sleep(0.005)  # a steady rate, not synchronisation
        published.set()

    results: dict[int, list] = {}

    async def subscriber(k: int, ready_: trio.Event) -> None:
        async with Client([gw_a.url, gw_b.url], min_delay=0.02, max_delay=0.5) as c:
            sub = await c.subscribe("live.stream")
            ready_.set()
            got = results[k] = []
            while not got or (isinstance(got[-1], Message) and got[-1].seq < total):
                got.append(await sub.get())

    readies = [trio.Event() for _ in range(n_clients)]
    with trio.fail_after(DEADLINE * 3):
        async with trio.open_nursery() as subs:
            for k in range(n_clients):
                subs.start_soon(subscriber, k, readies[k])
            for r in readies:
                with trio.fail_after(DEADLINE):
                    await r.wait()
            started = trio.Event()
            nursery.start_soon(publisher, started)
            with trio.fail_after(DEADLINE):
                await started.wait()
            gw_a.kill(signal.SIGKILL)
            # The subscribers finish when each has seen every seq.
        await published.wait()
    assert acked == list(range(1, total + 1))
    for k, got in results.items():
        assert all(isinstance(m, Message) for m in got), f"client {k} lost continuity"
        assert [m.seq for m in got] == list(range(1, total + 1)), f"client {k}"
    # Those that were on the killed gateway came back with since and were recovered.
    assert metric(gw_b.metrics(), "fanroute_gateway_resumes_total") >= 1
    # Every shard forgets the killed gateway once its heartbeats stop.
    for router in cluster.routers:
        await await_until(
            lambda: metric(router.metrics(), "fanroute_router_gateways") == 1
            and metric(router.metrics(), "fanroute_router_gateways_forgotten_total") >= 1,
            what=f"{router.name} to forget the killed gateway",
        )


async def test_sigkill_a_shard_then_restart_it():
    """With one copy of each stream (--copies 1), a router's restart starts its topics
    again in a new epoch; the other router's topics carry on meanwhile.
    (Replicated streams keep their epoch: tests/system/test_replication.py.)"""
    cluster = start_cluster(gateways=1, routers=2, gateway_args=FAST, router_args=["--copies", "1"])
    try:
        gw = cluster.gateways[0]
        ring = Ring(["router-0", "router-1"])
        topic = next(t for t in (f"alert.{i}" for i in range(100)) if ring.owner(t) == "router-0")
        other = next(t for t in (f"alert.{i}" for i in range(100)) if ring.owner(t) == "router-1")
        async with ws_connect(gw.url) as sub, ws_connect(gw.url) as pub:
            first = await sub.subscribe(topic)
            await pub.send({"type": "publish", "topic": topic, "payload": 1, "id": 1})
            assert (await pub.recv_type("published"))["seq"] == 1
            assert (await sub.recv())["seq"] == 1

            router0 = cluster.routers[0]
            port = int(router0.url.rsplit(":", 1)[1])
            router0.kill(signal.SIGKILL)
            router0.popen.wait()
            await await_until(lambda: http_get(gw.admin + "/readyz")[0] == 503, what="readyz to show the lost shard")
            assert "router-0" in http_get(gw.admin + "/readyz")[1]
            await pub.send({"type": "publish", "topic": topic, "payload": 2, "id": 2})
            err = await pub.recv_type("error")
            assert err["code"] == "unavailable" and err["id"] == 2
            # Topics of the other shard are unaffected.
            await pub.send({"type": "publish", "topic": other, "payload": 3, "id": 3})
            assert (await pub.recv_type("published"))["id"] == 3

            cluster.routers[0] = cluster.start_router(0, port)
            await await_until(lambda: ready(gw), what="gateway ready again")
            restarted = await sub.recv_type("subscribed")
            assert restarted["recovered"] is False and restarted["epoch"] != first["epoch"]
            assert "id" not in restarted
            await pub.send({"type": "publish", "topic": topic, "payload": 4, "id": 4})
            assert (await pub.recv_type("published"))["seq"] == restarted["seq"] + 1
            msg = await sub.recv()
            assert msg == {"topic": topic, "payload": 4, "seq": restarted["seq"] + 1}
        text = gw.metrics()
        assert metric(text, "fanroute_gateway_shard_link_changes_total", 'state="down"') >= 1
    finally:
        cluster.stop()


async def test_sigterm_drains_clients_over_the_window_then_exits_zero():
    window = 2.0
    cluster = start_cluster(gateways=1, routers=1, gateway_args=["--drain-window", str(window)])
    try:
        gw = cluster.gateways[0]
        n = 8
        closes: list[tuple[float, int]] = []

        async def client(ready_: trio.Event) -> None:
            async with ws_connect(gw.url) as c:
                await c.subscribe("drain.t")
                ready_.set()
                try:
                    while True:
                        await c.conn.get_message()
                except ConnectionClosed as exc:
                    closes.append((trio.current_time(), exc.reason.code))

        async with trio.open_nursery() as nursery:
            readies = [trio.Event() for _ in range(n)]
            for r in readies:
                nursery.start_soon(client, r)
            for r in readies:
                with trio.fail_after(DEADLINE):
                    await r.wait()
            gw.kill(signal.SIGTERM)
            await await_until(lambda: http_get(gw.admin + "/readyz")[0] == 503, what="not ready while draining")
        assert [code for _, code in closes] == [1012] * n
        times = sorted(t for t, _ in closes)
        assert times[-1] - times[0] >= 0.8 * window * (n - 1) / n  # spread, not all at once
        assert await trio.to_thread.run_sync(lambda: gw.popen.wait(timeout=DEADLINE)) == 0
    finally:
        cluster.stop()


async def test_sdk_leaves_a_frozen_gateway_for_another(cluster):
    gw_a, gw_b = cluster.gateways
    async with Client([gw_a.url, gw_b.url], min_delay=0.02, max_delay=0.5) as client:
        sub = await client.subscribe("frozen.gw")
        assert client.url == gw_a.url
        gw_a.kill(signal.SIGSTOP)
        try:
            frozen_at = trio.current_time()
            # ping_interval + ping_timeout is 1 s here (from the gateway's connected reply).
            await await_until(lambda: client.url == gw_b.url, what="the client to move to the other gateway")
            noticed = trio.current_time() - frozen_at
            assert noticed < 1.0 + 5.0, f"noticed after {noticed:.1f}s"
            seq = await client.publish("frozen.gw", "after")
            item = await sub.get()
            assert isinstance(item, Message) and item.seq == seq
        finally:
            gw_a.kill(signal.SIGCONT)
