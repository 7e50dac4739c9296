"""Access control, limits and hostile input against a live gateway over real sockets."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import jwt
import msgpack
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tests.support import DEADLINE, ROOT, free_port, http_get, metric, start_standalone, urls, wait_until, ws_connect
from tests.unit.test_access_rules import CONFIG, MATRIX, SECRET

API_KEY = "test-api-key"


def token(sub: str, **claims) -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + 3600, **claims}, SECRET, algorithm="HS256")


TOKENS = {
    "anonymous": None,
    "alice": token("alice"),
    "bob": token("bob"),
    "claims": token("carol", role="staff", fanroute={"subscribe": ["vip.*"], "publish": ["vip.lounge"]}),
}


def post(url: str, body: object, key: str | None = API_KEY) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    headers = {"content-type": "application/json"}
    if key is not None:
        headers["x-api-key"] = key
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


@pytest.fixture
async def secured(nursery, tmp_path):
    cfg = tmp_path / "ns.toml"
    cfg.write_text(CONFIG)
    return await start_standalone(nursery, config_file=str(cfg), jwt_secret=SECRET, api_key=API_KEY, anonymous="allow")


async def test_permission_matrix_live(secured):
    """Each namespace rule × each role × (subscribe, publish), over real sockets."""
    url, admin = urls(secured)
    for role, tok in TOKENS.items():
        async with ws_connect(url + (f"?token={tok}" if tok else "")) as c:
            for i, (topic, rules) in enumerate(MATRIX.items()):
                may_sub, may_pub = rules[role]
                await c.send({"type": "subscribe", "topic": topic, "id": 2 * i + 1})
                reply = await c.recv()
                assert reply["type"] == ("subscribed" if may_sub else "error"), (role, topic, reply)
                if not may_sub:
                    assert reply["code"] == "forbidden" and reply["id"] == 2 * i + 1
                await c.send({"type": "publish", "topic": topic, "payload": role, "id": 2 * i + 2})
                while True:  # our own delivery may come before the answer
                    reply = await c.recv()
                    if reply.get("id") == 2 * i + 2:
                        break
                assert reply["type"] == ("published" if may_pub else "error"), (role, topic, reply)
                if not may_pub:
                    assert reply["code"] == "forbidden"
    for topic, rules in MATRIX.items():
        status, body = await trio.to_thread.run_sync(post, admin + "/api/publish", {"topic": topic, "payload": "api"})
        assert (status == 200) == bool(rules["api"][1]), (topic, status, body)
        if status != 200:
            assert status == 403 and body["error"]["code"] == "forbidden"


async def test_no_user_ever_receives_another_users_private_topic(secured):
    url, admin = urls(secured)
    async with ws_connect(url + f"?token={TOKENS['alice']}") as alice, ws_connect(url + f"?token={TOKENS['bob']}") as bob:
        await alice.subscribe("user:alice")
        await bob.subscribe("user:bob")
        await bob.send({"type": "subscribe", "topic": "user:alice", "id": 5})
        assert (await bob.recv())["code"] == "forbidden"
        for who in ("alice", "bob", "alice"):
            status, body = await trio.to_thread.run_sync(post, admin + "/api/publish", {"topic": f"user:{who}", "payload": who})
            assert status == 200
        assert [(await alice.recv())["payload"] for _ in range(2)] == ["alice", "alice"]
        assert (await bob.recv())["payload"] == "bob"
        await bob.send({"type": "ping", "ts": 1})
        assert await bob.recv() == {"type": "pong", "ts": 1}  # nothing of alice's came first


async def test_http_publish_api(secured):
    url, admin = urls(secured)
    async with ws_connect(url) as sub:
        await sub.subscribe("feed.prices")
        status, body = await trio.to_thread.run_sync(post, admin + "/api/publish", {"topic": "feed.prices", "payload": {"p": 1}})
        assert (status, body) == (200, {"topic": "feed.prices", "seq": 1})
        assert (await sub.recv())["payload"] == {"p": 1}
        batch = {"items": [{"topic": "feed.prices", "payload": 2}, {"topic": "closed.x", "payload": 3}, {"topic": "bad topic", "payload": 4}, {"topic": "public.y"}]}
        status, body = await trio.to_thread.run_sync(post, admin + "/api/publish", batch)
        assert status == 200
        results = body["results"]
        assert results[0] == {"topic": "feed.prices", "seq": 2}
        assert [r.get("error", {}).get("code") for r in results] == [None, "forbidden", "bad_request", "bad_request"]
        assert (await sub.recv())["seq"] == 2
    assert (await trio.to_thread.run_sync(post, admin + "/api/publish", {"topic": "feed.x", "payload": 1}, "wrong"))[0] == 401
    assert (await trio.to_thread.run_sync(post, admin + "/api/publish", {"topic": "feed.x", "payload": 1}, None))[0] == 401
    assert (await trio.to_thread.run_sync(post, admin + "/api/publish", b"{nope"))[0] == 400
    assert (await trio.to_thread.run_sync(post, admin + "/api/publish", {"items": []}))[0] == 400


async def test_token_in_connect_frame_and_bad_token_closes_4001(nursery):
    bound = await start_standalone(nursery, jwt_secret=SECRET, anonymous="deny", auth_timeout=0.5)
    url, _ = urls(bound)
    async with ws_connect(url) as c:
        await c.send({"type": "subscribe", "topic": "t.1", "id": 1})
        assert (await c.recv())["code"] == "unauthorized"  # a token is required first
        await c.send({"type": "connect", "token": TOKENS["alice"], "id": 2})
        assert (await c.recv())["type"] == "connected"
        assert (await c.subscribe("t.1", id=3))["type"] == "subscribed"
    async with ws_connect(url) as c:
        await c.send({"type": "connect", "token": "garbage", "id": 1})
        assert (await c.recv())["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv()
        assert closed.value.reason.code == 4001
    async with ws_connect(url) as c:  # no token at all: closed after the auth timeout
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv()
        assert closed.value.reason.code == 4001


async def test_expiring_token_closes_unless_refreshed(nursery):
    bound = await start_standalone(nursery, jwt_secret=SECRET, anonymous="deny")
    url, _ = urls(bound)
    soon = time.time() + 1.5
    async with ws_connect(url + f"?token={token('a', exp=soon)}") as lazy, ws_connect(url + f"?token={token('b', exp=soon)}") as keen:
        await keen.send({"type": "refresh", "token": token("b", exp=time.time() + 600), "id": 1})
        assert (await keen.recv())["type"] == "refreshed"
        await keen.send({"type": "refresh", "token": token("someone-else", exp=time.time() + 600), "id": 2})
        assert (await keen.recv())["code"] == "unauthorized"  # and keen is closed for trying
        with pytest.raises(ConnectionClosed) as closed:
            await lazy.recv()
        assert closed.value.reason.code == 4001
    async with ws_connect(url + f"?token={token('c', exp=soon)}") as c:
        await c.send({"type": "refresh", "token": token("c", exp=time.time() + 600), "id": 1})
        assert (await c.recv())["type"] == "refreshed"
        with trio.move_on_after(3):  # past the first expiry: still open
            await c.recv()
        await c.send({"type": "ping", "ts": 2})
        assert (await c.recv())["type"] == "pong"


async def test_limits(nursery):
    bound = await start_standalone(
        nursery, max_subscriptions=3, command_rate=50, abuse_limit=5, max_connections=3, max_frame=1024,
        allowed_origins=["https://app.example"],
    )
    url, admin = urls(bound)
    async with ws_connect(url) as flood, ws_connect(url) as good:
        for i in range(3):
            await good.subscribe(f"s.{i}", id=i)
        await good.send({"type": "subscribe", "topic": "s.3", "id": 9})
        assert (await good.recv())["code"] == "too_large"
        # A third connection is allowed, a fourth is closed with 1013.
        async with ws_connect(url) as third:
            await third.send({"type": "ping", "ts": 0})
            await third.recv()
            async with ws_connect(url) as fourth:
                with pytest.raises(ConnectionClosed) as closed:
                    await fourth.recv()
                assert closed.value.reason.code == 1013
        # A command flood is rate-limited, then closed with 4029; the good client is unaffected.
        codes = []
        with pytest.raises(ConnectionClosed) as closed:
            for i in range(5000):
                await flood.send({"type": "ping", "ts": i})
            while True:
                msg = await flood.recv()
                codes.append(msg.get("code"))
        assert closed.value.reason.code == 4029 and "rate_limited" in codes
        await good.send({"type": "publish", "topic": "s.0", "payload": "still fine", "id": 1})
        got = [await good.recv(), await good.recv()]
        assert {"topic": "s.0", "payload": "still fine", "seq": 1} in got
    # Frames over --max-frame close with 1009.
    async with ws_connect(url) as big:
        await big.conn.send_message("x" * 5000)
        with pytest.raises(ConnectionClosed) as closed:
            await big.recv()
        assert closed.value.reason.code == 1009
    # Cross-site pages are refused at the handshake.
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(url, extra_headers=[(b"origin", b"https://evil.example")]):
            pass
    assert rejected.value.status_code == 403
    async with open_websocket_url(url, extra_headers=[(b"origin", b"https://app.example")]) as ok:
        await ok.send_message('{"type":"ping","ts":1}')
        assert orjson.loads(await ok.get_message())["type"] == "pong"
    text = (await trio.to_thread.run_sync(http_get, admin + "/metrics"))[1]
    for limit in ("subscriptions", "connections", "commands"):
        assert metric(text, "fanroute_gateway_limit_hits_total", f'limit="{limit}"') >= 1
    assert metric(text, "fanroute_gateway_connections_rejected_total", 'reason="origin"') == 1


async def test_publish_flood_is_limited_without_slowing_others(nursery):
    bound = await start_standalone(nursery, publish_rate=100, abuse_limit=5000)
    url, _ = urls(bound)
    async with ws_connect(url) as flooder, ws_connect(url) as sub, ws_connect(url) as pub:
        await sub.subscribe("calm.feed")
        limited = 0
        for i in range(2000):
            await flooder.send({"type": "publish", "topic": "noise.x", "payload": i, "id": i})
        with trio.fail_after(DEADLINE):
            for i in range(2000):
                msg = await flooder.recv()
                limited += msg.get("code") == "rate_limited"
        assert limited > 1000
        for i in range(20):
            await pub.send({"type": "publish", "topic": "calm.feed", "payload": i})
        assert [(await sub.recv())["payload"] for _ in range(20)] == list(range(20))


def _junk(rng: random.Random) -> str | bytes:
    """A random or malformed frame."""
    choice = rng.randrange(10)
    if choice == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if choice == 1:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(1, 64)))
    if choice == 2:
        return "[" * rng.randrange(100, 5000)
    if choice == 3:
        return orjson.dumps({"type": rng.choice(["subscribe", "publish", "unsubscribe", "ping", "connect", "x", 5, None]),
                             "topic": rng.choice(["ok.topic", "", "sp ace", 7, None, "x" * 300]),
                             "id": rng.choice([1, -1, "1", True, 2**60, None]),
                             "since": rng.choice([None, {}, {"epoch": 1}, {"epoch": "e", "seq": -5}, [1]])}).decode()
    if choice == 4:
        return msgpack.packb({"type": "publish", "topic": "x.y", "payload": b"\x00bin"})
    if choice == 5:
        return '{"type":"publish","topic":"fuzz.sink","payload":' + "9" * rng.randrange(20, 400) + "}"
    if choice == 6:
        return '{"type":"publish","topic":"fuzz.sink","payload":"' + "y" * rng.randrange(1000, 40000) + '"}'
    if choice == 7:
        return '{"type":"subscribe","topic":"fuzz.' + str(rng.randrange(50)) + '","id":1}'
    if choice == 8:
        return '{"type":"unsubscribe","topic":"fuzz.' + str(rng.randrange(50)) + '"}'
    return "{" + "".join(rng.choice('{}[]":,truefalsn0123') for _ in range(rng.randrange(1, 80)))


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def test_live_fuzz_loses_nothing_and_memory_stays_flat():
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fanroute.cli", "standalone", "--port", str(port), "--admin-port", str(admin)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _ok(f"http://127.0.0.1:{admin}/readyz"), what="standalone ready")
        url = f"ws://127.0.0.1:{port}/"
        rng = random.Random(1234)
        received: list[int] = []

        async def fuzz_round(n: int) -> None:
            sent = 0
            while sent < n:
                try:
                    async with ws_connect(url) as evil:
                        while sent < n:
                            await evil.conn.send_message(_junk(rng))
                            sent += 1
                            if sent % 100 == 0:
                                await evil.send({"type": "ping", "ts": sent})
                                await evil.recv_type("pong")
                except ConnectionClosed:
                    continue  # closed for a frame over the limit (1009): that is the answer

        async with ws_connect(url) as good, ws_connect(url) as pub:
            await good.subscribe("steady.feed")
            seq = 0

            async def publish_some(k: int) -> None:
                nonlocal seq
                for _ in range(k):
                    seq += 1
                    await pub.send({"type": "publish", "topic": "steady.feed", "payload": seq})
                while len(received) < seq:
                    received.append((await good.recv())["seq"])

            await fuzz_round(1500)  # warm up caches and allocator pools
            await publish_some(50)
            before = _rss_kb(proc.pid)
            for _ in range(4):
                async with trio.open_nursery() as n:
                    n.start_soon(fuzz_round, 1500)
                    n.start_soon(publish_some, 100)
            after = _rss_kb(proc.pid)
        assert received == list(range(1, seq + 1))
        assert after - before < 20_000, f"RSS grew {after - before} kB"
    finally:
        proc.kill()
        proc.wait()


def _ok(url: str) -> bool:
    try:
        return http_get(url, timeout=1)[0] == 200
    except OSError:
        return False


async def test_clients_that_reset_while_refused_cannot_stop_the_gateway(nursery):
    """Refused handshakes (bad Origin, draining) whose client resets at once."""
    import socket
    import struct

    bound = await start_standalone(nursery, allowed_origins=["https://app.example"])
    url, _ = urls(bound)
    request = (
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Origin: https://evil.example\r\n\r\n"
    ).encode()

    def hit_and_reset() -> None:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", bound.port))
            s.sendall(request)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST, while the gateway may still be answering 403
        for _ in range(50):  # half a request, then a reset
            s = socket.create_connection(("127.0.0.1", bound.port))
            s.sendall(request[:30])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

    await trio.to_thread.run_sync(hit_and_reset)
    async with open_websocket_url(url, extra_headers=[(b"origin", b"https://app.example")]) as ok:
        await ok.send_message('{"type":"ping","ts":7}')
        assert orjson.loads(await ok.get_message()) == {"type": "pong", "ts": 7}
