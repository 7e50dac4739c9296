"""The Python SDK's tokens, ``last`` and presence against a real standalone gateway.

The rules themselves are the client core's (``tests/unit/test_clientcore.py`` and the
shared case table); these tests show that the SDK carries them out over real sockets
against the gateway's real ``refresh``, expiry and 4001 behaviour, and that the
gateway's ``last`` and presence frames are what the core expects.
"""

from __future__ import annotations

import time
from itertools import count

import jwt
import pytest
import trio

from fanroute.client import Client, Message, Presence, Unrecovered
from fanroute.codes import TOKEN_EXPIRED_REASON
from fanroute.errors import RequestFailed
from tests.support import DEADLINE, start_standalone, until, urls

SECRET = "client-live-tests-secret-of-32-bytes!"


def token(sub: str, ttl: float) -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + ttl}, SECRET, algorithm="HS256")



@pytest.fixture
async def secured(nursery):
    # A short ping interval makes the gateway sweep expiries often (a quarter of it).
    bound = await start_standalone(nursery, jwt_secret=SECRET, anonymous="deny", ping_interval=1.0, ping_timeout=5.0)
    return urls(bound)[0]


async def read_until(sub, last: int) -> list[object]:
    """Every item of ``sub`` up to the message with seq ``last``."""
    items: list[object] = []
    with trio.fail_after(DEADLINE):
        while not (items and isinstance(items[-1], Message) and items[-1].seq >= last):
            items.append(await sub.get())
    return items


async def publish_every(client: Client, topic: str, seqs: list[int], stop: trio.Event) -> None:
    while not stop.is_set():
        seqs.append(await client.publish(topic, {"n": len(seqs)}))
        await trio.sleep(0.05)


async def test_a_token_callable_keeps_one_connection_alive_past_many_expiries(secured):
    """2-second tokens, refreshed on the open connection: no reconnect, nothing lost."""
    calls: list[float] = []

    async def source() -> str:  # an async token source, as an app's HTTP call would be
        calls.append(time.time())
        await trio.sleep(0)
        return token("viewer", 2.0)

    async with Client(secured, token=lambda: token("feed", 600)) as feed, Client(secured, token=source) as viewer:
        sub = await viewer.subscribe("live.refresh")
        sent: list[int] = []
        stop = trio.Event()
        async with trio.open_nursery() as publishing:  # its end waits for the last publish
            publishing.start_soon(publish_every, feed, "live.refresh", sent, stop)
            await until(lambda: viewer.refreshes >= 3, "three refreshes")  # past at least two expiries
            stop.set()
        await until(lambda: bool(sent), "a publication")
        items = await read_until(sub, sent[-1])
        assert all(isinstance(i, Message) for i in items), items
        assert [i.seq for i in items] == list(range(1, sent[-1] + 1))
        assert viewer.connects == 1 and viewer.connected
        assert len(calls) >= 4  # the first connect, then one per refresh


async def test_an_expired_token_reconnects_with_a_new_one_and_recovers(secured):
    """The refresh comes too late (a stuck token source): the gateway closes with 4001
    'token expired'; the client asks for a new token, reconnects and recovers."""
    calls = count()

    async def source() -> str:
        n = next(calls)
        if n == 1:
            await trio.sleep_forever()  # the refresh never answers; the reconnect cancels it
        return token("viewer", 1.5 if n == 0 else 600)

    async with Client(secured, token=lambda: token("feed", 600)) as feed, Client(
        secured, token=source, min_delay=0.01, max_delay=0.2
    ) as viewer:
        sub = await viewer.subscribe("live.expiry")
        sent: list[int] = []
        stop = trio.Event()
        async with trio.open_nursery() as publishing:
            publishing.start_soon(publish_every, feed, "live.expiry", sent, stop)
            await until(lambda: viewer.connects >= 2 and viewer.connected, "a reconnect")
            stop.set()
        await until(lambda: bool(sent), "a publication")
        items = await read_until(sub, sent[-1])
        assert all(isinstance(i, Message) for i in items), items
        assert [i.seq for i in items] == list(range(1, sent[-1] + 1))  # recovered with since
        assert next(calls) == 3


async def test_a_fixed_token_that_expires_is_terminal(secured):
    """With a string token there is no new one to get: 4001 'token expired' ends it."""
    async with Client(secured, token=token("fixed", 1.0)) as c:
        sub = await c.subscribe("live.fixed")
        with trio.fail_after(DEADLINE), pytest.raises(RequestFailed) as ended:
            async for _ in sub:
                pass
        assert ended.value.code == "unauthorized"
        assert c.last_close_code == 4001 and c.last_close_reason == TOKEN_EXPIRED_REASON
        assert c.connects == 1


async def test_a_refused_new_token_is_terminal(secured):
    calls = count()

    def source() -> str:  # sync: the second token is for someone else, so refused
        return token("viewer" if next(calls) == 0 else "intruder", 1.5)

    async with Client(secured, token=source, min_delay=0.01, max_delay=0.2) as viewer:
        sub = await viewer.subscribe("live.refused")
        with trio.fail_after(DEADLINE), pytest.raises(RequestFailed) as ended:
            async for _ in sub:
                pass
        assert ended.value.code == "unauthorized"
        assert viewer.connects == 1 and next(calls) == 2  # no reconnect, no further token asked
        with pytest.raises(RequestFailed):
            await viewer.publish("live.refused", 1)


async def test_a_token_source_with_no_token_stops_the_client(secured):
    async with Client(secured, token=lambda: None) as c:
        with pytest.raises(RequestFailed) as refused:
            await c.subscribe("live.none")
        assert refused.value.code == "unauthorized"
        assert c.connects == 0


async def test_a_failing_token_source_is_asked_again(secured):
    calls = count()

    def source() -> str:
        if next(calls) < 2:
            raise RuntimeError("token service unavailable")
        return token("viewer", 600)

    async with Client(secured, token=source, min_delay=0.01, max_delay=0.1) as c:
        with trio.fail_after(DEADLINE):
            await c.subscribe("live.flaky")
        assert c.connects == 1 and next(calls) == 3


async def test_bad_options_are_refused_at_once(open_gateway) -> None:
    with pytest.raises(TypeError):
        Client(open_gateway, token=42)  # type: ignore[arg-type]
    async with Client(open_gateway) as c:
        for bad in (0, -3, 2.5):
            with pytest.raises(ValueError):
                await c.subscribe("t", last=bad)  # type: ignore[arg-type]


# --- last and presence (the gateway's side: the live-feed features) -------------------


@pytest.fixture
async def open_gateway(nursery):
    bound = await start_standalone(nursery)
    return urls(bound)[0]


async def test_last_gives_the_newest_messages_at_once_then_live_ones(open_gateway):
    async with Client(open_gateway) as feed, Client(open_gateway) as viewer:
        for i in range(1, 11):
            assert await feed.publish("prices.LAST", {"price": i}) == i
        sub = await viewer.subscribe("prices.LAST", last=3)
        with trio.fail_after(DEADLINE):
            first = [await sub.get() for _ in range(3)]
        assert [(m.seq, m.payload["price"]) for m in first] == [(8, 8), (9, 9), (10, 10)]
        await feed.publish("prices.LAST", {"price": 11})
        with trio.fail_after(DEADLINE):
            assert (await sub.get()).seq == 11
        one = await viewer.subscribe("prices.EMPTY", last=5)  # nothing published yet: nothing to show
        await feed.publish("prices.EMPTY", {"price": 1})
        with trio.fail_after(DEADLINE):
            assert (await one.get()).seq == 1


async def test_a_reconnect_that_cannot_recover_gets_last_again(nursery):
    """History of 3: the client is away for 10 messages; it says exactly which were
    lost and shows the newest 3 (the ticker is never blank)."""
    from fanroute.config import RouterConfig

    bound = await start_standalone(nursery, router=RouterConfig(admin_port=None, history_size=3))
    url = urls(bound)[0]
    async with Client(url) as feed, Client(url, min_delay=0.01, max_delay=0.1) as viewer:
        sub = await viewer.subscribe("prices.AWAY", last=3)
        for i in range(1, 3):
            await feed.publish("prices.AWAY", i)
        with trio.fail_after(DEADLINE):
            assert [(await sub.get()).seq for _ in range(2)] == [1, 2]
        back = trio.Event()
        viewer.drop_connection(hold=back)
        await until(lambda: not viewer.connected, "the drop")
        for i in range(3, 13):
            await feed.publish("prices.AWAY", i)
        back.set()
        with trio.fail_after(DEADLINE):
            lost = await sub.get()
            rest = [await sub.get() for _ in range(3)]
        assert isinstance(lost, Unrecovered) and lost.seq == 9 and lost.previous is not None and lost.previous.seq == 2
        assert [m.seq for m in rest] == [10, 11, 12]


async def test_presence_counts_are_pushed_and_asked(open_gateway):
    async with Client(open_gateway) as a, Client(open_gateway) as b:
        sub = await a.subscribe("live.watch", presence=True)
        with trio.fail_after(DEADLINE):
            first = await sub.get()
        assert isinstance(first, Presence) and first.subscribers == 1
        other = await b.subscribe("live.watch")
        with trio.fail_after(DEADLINE):
            while (item := await sub.get()) and not (isinstance(item, Presence) and item.subscribers == 2):
                pass
        assert sub.subscribers == 2
        assert await b.presence("live.watch") == 2
        await other.unsubscribe()
        with trio.fail_after(DEADLINE):
            while (item := await sub.get()) and not (isinstance(item, Presence) and item.subscribers == 1):
                pass
