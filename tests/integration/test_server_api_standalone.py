"""The server API on a standalone server (gateway and shards in one process, linked by
direct calls): the same commands as in a cluster, over real sockets."""

from __future__ import annotations

import time

import jwt
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.integration.test_security import post
from tests.support import DEADLINE, http_get, start_standalone, urls, ws_connect

SECRET = "standalone-api-secret-0123456789abcdef"
KEY = "standalone-api-key"


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + 3600}, SECRET, algorithm="HS256")


@pytest.fixture
async def server(nursery):
    return await start_standalone(nursery, jwt_secret=SECRET, api_key=KEY, anonymous="allow", max_connections_per_user=1)


async def api(admin: str, endpoint: str, body: object) -> tuple[int, dict]:
    return await trio.to_thread.run_sync(lambda: post(f"{admin}/api/{endpoint}", body, key=KEY))


async def closed_code(ws) -> int:
    with trio.fail_after(DEADLINE):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as closed:
            return closed.reason.code


async def test_disconnect_unsubscribe_and_info_in_one_process(server):
    url, admin = urls(server)
    async with ws_connect(url + f"?token={token('ann')}") as ann, ws_connect(url) as anonymous:
        await ann.subscribe("chat.x")
        await anonymous.subscribe("chat.x")
        assert await api(admin, "unsubscribe", {"user": "ann", "topic": "chat.x"}) == (200, {"unsubscribed": 1})
        assert await ann.recv() == {"type": "unsubscribed", "topic": "chat.x"}
        # Without the key, info is refused like the rest.
        status, info = await trio.to_thread.run_sync(http_get, admin + "/api/info")
        assert status == 401 and orjson.loads(info)["error"]["code"] == "unauthorized"
        assert await api(admin, "disconnect", {"user": "ann"}) == (200, {"disconnected": 1})
        assert await closed_code(ann.conn) == 4003
        await anonymous.send({"type": "ping", "ts": 1})
        assert await anonymous.recv_type("pong")


async def test_info_counts_this_gateway_and_every_shard(server):
    url, admin = urls(server)
    async with ws_connect(url) as a, ws_connect(url) as b:
        await a.subscribe("t.1")
        await b.subscribe("t.1")
        await b.subscribe("t.2")

        def info() -> dict:
            import urllib.request

            req = urllib.request.Request(admin + "/api/info", headers={"x-api-key": KEY})
            with urllib.request.urlopen(req, timeout=DEADLINE) as r:
                return orjson.loads(r.read())

        body = await trio.to_thread.run_sync(info)
        (me,) = body["gateways"]
        assert (me["self"], me["connections"], me["subscriptions"], me["topics"]) == (True, 2, 3, 2)
        assert len(body["routers"]) == 4 and all(r["reachable"] for r in body["routers"])
        assert sum(r["subscriptions"] for r in body["routers"]) == 2  # (t.1, gw) and (t.2, gw)


async def test_a_second_connection_of_a_user_past_the_limit_is_closed_1013(server):
    url, _ = urls(server)
    async with ws_connect(url + f"?token={token('bo')}") as first:
        async with ws_connect(url + f"?token={token('bo')}") as second:
            assert await closed_code(second.conn) == 1013
        await first.send({"type": "ping", "ts": 2})
        assert (await first.recv_type("pong"))["ts"] == 2
