"""The whole path in one process: real sockets, real nng (inproc), real clients."""

from __future__ import annotations

import asyncio
import json

import trio
from trio_websocket import ConnectionClosed

from fanroute.client import Client, Message, Unrecovered
from tests.support import DEADLINE, await_until, http_get, metric, start_standalone, urls, ws_connect


async def test_subscribe_publish_ack_and_ping(standalone):
    url, _ = urls(standalone)
    async with ws_connect(url) as a, ws_connect(url) as b:
        sub = await a.subscribe("prices.AAPL")
        assert sub == {"type": "subscribed", "topic": "prices.AAPL", "id": 1, "epoch": sub["epoch"], "seq": 0, "recovered": False}
        await b.send({"type": "publish", "topic": "prices.AAPL", "payload": {"p": 189.5}, "id": 4})
        assert await b.recv() == {"type": "published", "topic": "prices.AAPL", "id": 4, "seq": 1}
        assert await a.recv() == {"topic": "prices.AAPL", "payload": {"p": 189.5}, "seq": 1}
        await b.send({"topic": "prices.AAPL", "payload": [1, "two", None]})  # plain style, no reply
        assert await a.recv() == {"topic": "prices.AAPL", "payload": [1, "two", None], "seq": 2}
        await b.send({"type": "ping", "ts": 1732550000000, "id": 9})
        assert await b.recv() == {"type": "pong", "ts": 1732550000000, "id": 9}
        await a.send({"type": "unsubscribe", "topic": "prices.AAPL", "id": 3})
        assert await a.recv() == {"type": "unsubscribed", "topic": "prices.AAPL", "id": 3}
        await b.send({"type": "publish", "topic": "prices.AAPL", "payload": 3, "id": 5})
        assert (await b.recv())["seq"] == 3
        await a.send({"type": "ping", "ts": 1})
        assert await a.recv() == {"type": "pong", "ts": 1}  # nothing more for prices.AAPL


async def test_connect_frame_is_answered(standalone):
    url, _ = urls(standalone)
    async with ws_connect(url) as a:
        await a.send({"type": "connect", "id": 1})
        reply = await a.recv()
        assert reply["type"] == "connected" and reply["id"] == 1
        assert reply["ping_interval"] > 0 and reply["ping_timeout"] > 0 and reply["session"]


async def test_every_bad_command_gets_an_error_and_nobody_else_notices(standalone):
    url, _ = urls(standalone)
    bad = [
        "not json",
        "[1,2]",
        '{"type":"subscribe"}',
        '{"type":"subscribe","topic":"has space","id":5}',
        '{"type":"nope","id":6}',
        '{"type":"publish","topic":"t"}',
        '{"type":"subscribe","topic":"t","since":{"epoch":1}}',
    ]
    async with ws_connect(url) as good, ws_connect(url) as evil, ws_connect(url) as pub:
        await good.subscribe("chat.room1")
        for i, frame in enumerate(bad):
            await evil.conn.send_message(frame)
            err = await evil.recv()
            assert err["type"] == "error" and err["code"] == "bad_request" and err["message"], frame
            await pub.send({"type": "publish", "topic": "chat.room1", "payload": i})
            assert (await good.recv())["payload"] == i
        await evil.conn.send_message(b"\x00binary")
        assert (await evil.recv())["code"] == "bad_request"
        await evil.send({"type": "subscribe", "topic": "has space", "id": 5})
        assert (await evil.recv())["id"] == 5


async def test_msgpack_and_json_subscribers_get_the_same_message(standalone):
    url, _ = urls(standalone)
    async with ws_connect(url, binary=True) as mp, ws_connect(url) as js:
        assert (await mp.subscribe("alerts.ops"))["type"] == "subscribed"
        await js.subscribe("alerts.ops")
        await mp.send({"type": "publish", "topic": "alerts.ops", "payload": {"level": "warn", "n": [1, 2.5]}, "id": 2})
        assert await js.recv() == {"topic": "alerts.ops", "payload": {"level": "warn", "n": [1, 2.5]}, "seq": 1}
        # The publisher subscribes too: its delivery and its ack both come, in either order.
        got = [await mp.recv(), await mp.recv()]
        assert {"type": "published", "topic": "alerts.ops", "id": 2, "seq": 1} in got
        assert {"topic": "alerts.ops", "payload": {"level": "warn", "n": [1, 2.5]}, "seq": 1} in got
        await mp.conn.send_message('{"type":"ping"}')
        assert (await mp.recv())["code"] == "bad_request"


async def test_recovery_with_since_while_a_publisher_keeps_publishing(standalone, nursery):
    """A subscriber leaves, comes back with ``since``: it gets every message exactly once, in order."""
    url, _ = urls(standalone)
    total = 600
    published = trio.Event()

    async def publisher():
        async with ws_connect(url) as pub:
            for i in range(1, total + 1):
                await pub.send({"type": "publish", "topic": "feed.ticks", "payload": i})
                if i % 50 == 0:
                    await pub.send({"type": "ping", "ts": i})
                    await pub.recv_type("pong")  # pace: let the subscriber interleave
        published.set()

    seen: list[int] = []
    async with ws_connect(url) as sub:
        first = await sub.subscribe("feed.ticks")
        epoch = first["epoch"]
        nursery.start_soon(publisher)
        while len(seen) < 100:
            msg = await sub.recv()
            seen.append(msg["seq"])
    # Gone for a while; the publisher goes on.
    async with ws_connect(url) as sub:
        reply = await sub.subscribe("feed.ticks", since={"epoch": epoch, "seq": seen[-1]})
        assert reply["recovered"] is True
        while seen[-1] < total:
            msg = await sub.recv()
            if "seq" in msg and msg.get("type") is None:
                seen.append(msg["seq"])
    assert seen == list(range(1, total + 1))
    with trio.fail_after(DEADLINE):
        await published.wait()


async def test_recovery_impossible_says_so(nursery):
    from fanroute.config import RouterConfig

    bound = await start_standalone(nursery, router=RouterConfig(admin_port=None, history_size=5))
    url, _ = urls(bound)
    async with ws_connect(url) as c:
        first = await c.subscribe("t.x")
        await c.send({"type": "unsubscribe", "topic": "t.x", "id": 2})
        await c.recv_type("unsubscribed")
        for i in range(20):
            await c.send({"type": "publish", "topic": "t.x", "payload": i, "id": 10 + i})
            await c.recv_type("published")
        reply = await c.subscribe("t.x", id=3, since={"epoch": first["epoch"], "seq": 1})
        assert reply["recovered"] is False and reply["seq"] == 20
        reply = await c.send({"type": "subscribe", "topic": "t.y", "since": {"epoch": "gone", "seq": 0}, "id": 4})
        assert (await c.recv_type("subscribed"))["recovered"] is False


async def test_third_party_websockets_client(standalone):
    """The `websockets` library (asyncio) as an outside client: the README's demo."""
    url, _ = urls(standalone)

    async def demo() -> list[dict]:
        import websockets

        out = []
        async with websockets.connect(url) as sub, websockets.connect(url + "ws") as pub:
            await sub.send(json.dumps({"type": "subscribe", "topic": "chat.room1", "id": 1}))
            out.append(json.loads(await sub.recv()))
            await pub.send(json.dumps({"topic": "chat.room1", "payload": {"text": "hello"}}))
            await pub.send(json.dumps({"type": "publish", "topic": "chat.room1", "payload": "again", "id": 7}))
            out.append(json.loads(await pub.recv()))
            out.append(json.loads(await sub.recv()))
            out.append(json.loads(await sub.recv()))
            await pub.send(json.dumps({"type": "ping", "ts": 5}))
            out.append(json.loads(await pub.recv()))
        return out

    got = await trio.to_thread.run_sync(lambda: asyncio.run(asyncio.wait_for(demo(), DEADLINE)))
    assert got[0]["type"] == "subscribed" and got[0]["id"] == 1
    assert got[1] == {"type": "published", "topic": "chat.room1", "id": 7, "seq": 2}
    assert got[2] == {"topic": "chat.room1", "payload": {"text": "hello"}, "seq": 1}
    assert got[3] == {"topic": "chat.room1", "payload": "again", "seq": 2}
    assert got[4] == {"type": "pong", "ts": 5}


async def test_admin_port_and_pages(standalone):
    url, admin = urls(standalone)
    status, body = await trio.to_thread.run_sync(http_get, admin + "/readyz")
    assert status == 200 and "ready" in body
    assert (await trio.to_thread.run_sync(http_get, admin + "/healthz"))[0] == 200
    async with ws_connect(url) as a:
        await a.subscribe("t.m")
    text = (await trio.to_thread.run_sync(http_get, admin + "/metrics"))[1]
    assert metric(text, "fanroute_gateway_subscribes_total") == 1
    assert metric(text, "fanroute_router_topics") == 1
    status, page = await trio.to_thread.run_sync(http_get, url.replace("ws://", "http://"))
    assert status == 200 and "<" in page
    assert (await trio.to_thread.run_sync(http_get, url.replace("ws://", "http://") + "no-such-file"))[0] == 404


async def test_slow_consumer_is_closed_with_4008_and_others_keep_up(nursery):
    bound = await start_standalone(nursery, outbox_limit=64 * 1024, conflate_threshold=32 * 1024)
    url, admin = urls(bound)
    blob = "x" * 16000
    async with ws_connect(url) as healthy, ws_connect(url) as slow, ws_connect(url) as pub:
        await healthy.subscribe("big.feed")
        await slow.subscribe("big.feed")
        # `slow` never reads from here on; its socket and then its buffer fill up.
        n = 0
        with trio.fail_after(DEADLINE):
            while True:
                n += 1
                await pub.send({"type": "publish", "topic": "big.feed", "payload": blob, "id": n})
                await pub.recv_type("published")
                assert (await healthy.recv())["seq"] == n
                text = await trio.to_thread.run_sync(http_get, admin + "/metrics")
                if metric(text[1], "fanroute_gateway_slow_consumer_closes_total") == 1:
                    break
        # The slow one reads again and finds its close code behind what it missed.
        with trio.fail_after(DEADLINE):
            try:
                while True:
                    await slow.conn.get_message()
            except ConnectionClosed as exc:
                assert exc.reason.code == 4008

        def closed_4008() -> bool:
            try:
                text = http_get(admin + "/metrics")[1]
                return metric(text, "fanroute_gateway_connections_closed_total", 'code="4008"') == 1
            except KeyError:
                return False

        await await_until(closed_4008, what="the 4008 close to be counted")


async def test_sdk_resubscribes_and_recovers_after_a_dropped_connection(standalone, nursery):
    url, _ = urls(standalone)
    async with Client([url], min_delay=0.01, max_delay=0.2) as client:
        sub = await client.subscribe("sdk.topic")
        assert await client.publish("sdk.topic", {"n": 1}) == 1
        first = await sub.get()
        assert first == Message("sdk.topic", {"n": 1}, 1)
        async with ws_connect(url) as pub:
            client.drop_connection()
            for i in range(2, 52):
                await pub.send({"type": "publish", "topic": "sdk.topic", "payload": {"n": i}})
            await pub.send({"type": "ping", "ts": 0})
            await pub.recv_type("pong")
        got = [await sub.get() for _ in range(50)]
        assert [m.seq for m in got] == list(range(2, 52))
        assert all(isinstance(m, Message) for m in got)
        assert client.connects >= 2
        assert sub.duplicates == 0


async def test_sdk_reports_unrecoverable_gaps(nursery):
    from fanroute.config import RouterConfig

    bound = await start_standalone(nursery, router=RouterConfig(admin_port=None, history_size=3))
    url, _ = urls(bound)
    async with Client(url, min_delay=0.01, max_delay=0.2) as client:
        sub = await client.subscribe("gap.topic")
        await client.publish("gap.topic", 0)
        assert (await sub.get()).seq == 1
        published = trio.Event()
        # Away until all 10 are published (acked), so history (3) cannot cover the gap.
        client.drop_connection(hold=published)
        async with ws_connect(url) as pub:
            for i in range(10):
                await pub.send({"type": "publish", "topic": "gap.topic", "payload": i, "id": i})
                await pub.recv_type("published")
        published.set()
        item = await sub.get()
        assert isinstance(item, Unrecovered) and (item.epoch, item.seq) == (sub.epoch, 11)
        assert item.previous is not None and item.previous.seq == 1
        assert await client.publish("gap.topic", "after") == 12
        assert (await sub.get()).seq == 12


async def test_quiet_clients_that_answer_pings_stay_connected(nursery):
    """Clients that only answer the gateway's pings are never taken for dead, even
    when their first frame arrives in the same packet as the handshake."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import Ping, Request

    bound = await start_standalone(nursery, ping_interval=0.2, ping_timeout=0.3)
    url, admin = urls(bound)
    closed = 0

    async def quiet(i: int, done: trio.Event) -> None:
        nonlocal closed
        ws = WSConnection(ConnectionType.CLIENT)
        stream = await trio.open_tcp_stream("127.0.0.1", bound.port)
        # Handshake and first command in one write, as an eager client does.
        command = f'{{"type":"subscribe","topic":"quiet.{i}","id":1}}'.encode()
        mask = b"\x01\x02\x03\x04"
        frame = bytes([0x81, 0x80 | len(command)]) + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(command))
        await stream.send_all(ws.send(Request(host="127.0.0.1", target="/")) + frame)
        with trio.move_on_after(3.0):  # many ping rounds: the silence is the behaviour under test
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    closed += 1
                    return
                ws.receive_data(chunk)
                for event in ws.events():
                    if isinstance(event, Ping):
                        await stream.send_all(ws.send(event.response()))
        await stream.aclose()

    async with trio.open_nursery() as clients:
        for i in range(30):
            clients.start_soon(quiet, i, trio.Event())
    text = (await trio.to_thread.run_sync(http_get, admin + "/metrics"))[1]
    assert closed == 0
    assert metric(text, "fanroute_gateway_heartbeat_timeouts_total") == 0
