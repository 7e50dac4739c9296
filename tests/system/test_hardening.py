"""Each hostile input that once stopped a process or slipped past a rule, replayed from
outside: real gateways and routers, real WebSocket clients, raw nng sockets for the
links between nodes. Every test shows the process still serving and the victim
losing nothing.
"""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
import time

import jwt
import msgpack
import orjson
import pynng
import pytest
import trio
import wsproto
import wsproto.events as wse
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, open_websocket_url

from fanroute import wire
from tests.support import (
    CLUSTER_SECRET,
    DEADLINE,
    ROOT,
    await_until,
    free_port,
    http_get,
    metric,
    ready,
    start_cluster,
    start_standalone,
    urls,
    wait_until,
    ws_connect,
)
from tests.unit.test_access_rules import SECRET
from tests.integration.test_security import post, secured  # noqa: F401 - secured is a fixture


def deep_json(levels: int) -> str:
    return "[" * levels + "]" * levels


def series(text: str, name: str) -> int:
    """How many samples a metric family has (parsed, not pattern-matched)."""
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return len([s for s in family.samples if s.name == name + "_total" or s.name == name])
    return 0


def token(sub: str, ttl: float = 3600, **claims) -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + ttl, **claims}, SECRET, algorithm="HS256")


@pytest.fixture
def cluster():
    inbox = free_port()
    c = start_cluster(gateways=2, routers=1, gateway_args=[])
    # A third gateway on a known inbox, for the forged-delivery test.
    extra = c.start_gateway(["--inbox", f"tcp://127.0.0.1:{inbox}"])
    wait_until(lambda: ready(extra), what="gateway with a known inbox ready")
    c.known_inbox = f"tcp://127.0.0.1:{inbox}"
    yield c
    c.stop()


def alive(c) -> None:
    for proc in c.all():
        assert proc.popen.poll() is None, f"{proc.name} exited"
        assert http_get(proc.admin + "/healthz")[0] == 200


# --- 1, 2: payloads that some encoding cannot carry ----------------------------------


async def test_a_payload_json_cannot_write_back_is_refused_and_no_gateway_dies(cluster):
    gw0, gw1 = cluster.gateways[0], cluster.gateways[1]
    nested = orjson.loads(deep_json(60))
    async with ws_connect(gw1.url) as json_sub, ws_connect(gw1.url, binary=True) as bin_sub:
        epoch = (await json_sub.subscribe("deep.t"))["epoch"]
        await bin_sub.subscribe("deep.t")
        async with ws_connect(gw0.url) as pub, ws_connect(gw0.url, binary=True) as bin_pub:
            # 300 levels: orjson reads it, but cannot write it to a JSON subscriber.
            raw = '{"type":"publish","topic":"deep.t","id":1,"payload":' + deep_json(300) + "}"
            await pub.conn.send_message(raw)
            err = await pub.recv_type("error")
            assert err["id"] == 1 and err["code"] == "bad_request"
            # Binary values through the msgpack subprotocol: refused for every subscriber alike.
            await bin_pub.send({"type": "publish", "topic": "deep.t", "id": 2, "payload": {"b": b"\x00\x01"}})
            err = await bin_pub.recv_type("error")
            assert err["id"] == 2 and err["code"] == "bad_request"
            await pub.send({"type": "publish", "topic": "deep.t", "id": 3, "payload": nested})
            assert (await pub.recv_type("published"))["seq"] == 1
        for sub in (json_sub, bin_sub):
            got = await sub.recv()
            assert got["seq"] == 1 and got["payload"] == nested
    alive(cluster)
    # History holds nothing that can stop a gateway: resuming from seq 0 works.
    async with ws_connect(cluster.gateways[2].url) as late:
        ack = await late.subscribe("deep.t", since={"epoch": epoch, "seq": 0})
        assert ack["recovered"] is True
        assert (await late.recv())["seq"] == 1
    alive(cluster)


# --- 3, 4: the links between nodes trust nobody without the secret -----------------


def raw_push(url: str) -> pynng.Push0:
    sock = pynng.Push0(send_timeout=5000)
    sock.dial(url, block=True)
    return sock


async def test_unsealed_or_forged_inter_node_messages_are_dropped_and_counted(cluster):
    router, gw0, gw1 = cluster.routers[0], cluster.gateways[0], cluster.gateways[1]
    before = metric(router.metrics(), "fanroute_router_wire_rejected_total")
    forged = wire.Sealer(wire.LinkKey("not-the-cluster-secret-at-all"))
    listener = pynng.Pull0(recv_timeout=300)
    spy_port = free_port()
    spy = f"tcp://127.0.0.1:{spy_port}"
    listener.listen(spy)
    payload = msgpack.packb("stolen?")
    async with ws_connect(gw1.url) as victim:
        await victim.subscribe("user:bob")
        with raw_push(router.url) as sock:
            # The 8-byte BEAT that once made the router dial "x" and exit.
            sock.send(msgpack.packb([1, "x", [[5]], ""]))
            sock.send(b"\x00" * 8)
            # A publication into a private topic and a fake gateway asking for it,
            # unsealed (old format) and sealed with the wrong secret.
            pub = [wire.PUB, "user:bob", payload, 0, time.time(), None]
            hello = [wire.HELLO, spy, "spy", [["user:bob", None, 0]]]
            sock.send(msgpack.packb([1, spy, [pub, hello], ""]))
            sock.send(forged.pack(spy, [hello, [wire.SUB, "user:bob", 1, None, 0], pub]))
            # 3000 fake gateways, as in the flood that once saturated the router.
            for i in range(3000):
                sock.send(forged.pack(f"tcp://127.0.0.1:{20000 + i}", [[wire.HELLO, "x", "y", []], [wire.BEAT]]))
        with raw_push(cluster.known_inbox) as sock:
            sock.send(forged.pack("router-0", [[wire.MSG, "user:bob", 999, payload, time.time()]]))
            sock.send(msgpack.packb([1, "router-0", [[20, "user:bob", 999, "x", 0.0]], ""]))

        def counted() -> bool:
            return metric(router.metrics(), "fanroute_router_wire_rejected_total") >= before + 3004

        wait_until(counted, what="the router to count every forged message")
        wait_until(
            lambda: metric(cluster.gateways[2].metrics(), "fanroute_gateway_wire_rejected_total") >= 2,
            what="the gateway to count the forged deliveries",
        )
        # The real path still works, and the victim sees only what was really published.
        async with ws_connect(gw0.url) as pub:
            await pub.send({"type": "publish", "topic": "user:bob", "payload": "real", "id": 1})
            assert (await pub.recv_type("published"))["seq"] == 1
        got = await victim.recv()
        assert got == {"topic": "user:bob", "payload": "real", "seq": 1}
    # The spy inbox was never dialed, let alone sent bob's publications.
    with pytest.raises(pynng.Timeout):
        listener.recv()
    listener.close()
    text = router.metrics()
    assert metric(text, "fanroute_router_gateways") == 3  # the three real gateways, no fake one
    assert metric(text, "fanroute_router_wire_rejected_total", 'reason="mac"') >= 3001
    for g in cluster.gateways:  # no link flapped: no "down" change was ever counted
        assert 'state="down"' not in "".join(
            line for line in g.metrics().splitlines() if line.startswith("fanroute_gateway_shard_link_changes_total")
        )
    alive(cluster)


# --- 5: exact permissions, live --------------------------------------------------


async def test_a_user_whose_name_is_a_prefix_cannot_read_the_other_users_private_topic(secured):
    url, admin = urls(secured)
    async with ws_connect(url + f"?token={token('john')}") as john, ws_connect(
        url + f"?token={token('john.smith')}"
    ) as smith:
        # john.smith's private topic is user:john~2Esmith; user:john.smith is john's own.
        assert (await smith.subscribe("user:john~2Esmith"))["type"] == "subscribed"
        for topic in ("user:john~2Esmith", "user:john~2Esmith.otp"):
            await john.send({"type": "subscribe", "topic": topic, "id": 2})
            assert (await john.recv_type("error"))["code"] == "forbidden"
        status, body = await trio.to_thread.run_sync(
            post, admin + "/api/publish", {"topic": "user:john~2Esmith", "payload": {"otp": "492817"}}
        )
        assert status == 200
        assert (await smith.recv())["payload"] == {"otp": "492817"}
        # A grant pattern cannot cross the private rule, nor match past its segment.
        async with ws_connect(url + f"?token={token('alice', fanroute={'subscribe': ['user:alice*', 'closed.*']})}") as a:
            for topic in ("user:alice2", "closed.x"):
                await a.send({"type": "subscribe", "topic": topic, "id": 3})
                assert (await a.recv_type("error"))["code"] == "forbidden"


async def test_a_connection_cannot_change_its_subject(secured):
    url, _ = urls(secured)
    async with ws_connect(url + f"?token={token('bob')}") as bob:
        await bob.subscribe("user:bob")
        await bob.send({"type": "connect", "token": token("alice"), "id": 5})
        err = await bob.recv_type("error")
        assert err["code"] == "unauthorized" and err["id"] == 5
        with pytest.raises(ConnectionClosed) as closed:
            await bob.recv()
        assert closed.value.reason.code == 4001


async def test_a_refresh_that_narrows_rights_ends_the_subscriptions_it_no_longer_allows(secured):
    url, admin = urls(secured)
    wide = token("carol", fanroute={"subscribe": ["vip.*"]})
    async with ws_connect(url + f"?token={wide}") as carol:
        await carol.subscribe("vip.lounge")
        await carol.subscribe("public.news", id=2)
        await carol.send({"type": "refresh", "token": token("carol"), "id": 9})
        assert await carol.recv() == {"type": "unsubscribed", "topic": "vip.lounge"}
        assert (await carol.recv())["type"] == "refreshed"
        for topic, payload in (("vip.lounge", "not for carol now"), ("public.news", "still hers")):
            await trio.to_thread.run_sync(post, admin + "/api/publish", {"topic": topic, "payload": payload})
        assert (await carol.recv())["payload"] == "still hers"


async def test_a_token_without_exp_is_refused(secured):
    url, _ = urls(secured)
    forever = jwt.encode({"sub": "mallory"}, SECRET, algorithm="HS256")
    async with ws_connect(url) as c:
        await c.send({"type": "connect", "token": forever, "id": 1})
        assert "exp" in (await c.recv_type("error"))["message"]
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv()
        assert closed.value.reason.code == 4001


# --- 6: router memory is bounded ---------------------------------------------------


async def test_router_history_is_capped_in_bytes_oldest_first():
    cap = 2 << 20
    c = start_cluster(gateways=1, routers=1, gateway_args=["--max-frame", "40000"], router_args=["--history-bytes", str(cap)])
    try:
        gw, router = c.gateways[0], c.routers[0]
        async with ws_connect(gw.url) as pub:
            for i in range(200):  # 200 topics × 30 KB: three times the cap
                await pub.send({"type": "publish", "topic": f"flood.{i}", "payload": "x" * 30000, "id": i})
            for _ in range(200):
                await pub.recv_type("published")
        text = router.metrics()
        assert metric(text, "fanroute_router_history_bytes") <= cap
        assert metric(text, "fanroute_router_history_evicted_total") >= 100
        for topic, recovered in (("flood.0", False), ("flood.199", True)):
            async with ws_connect(gw.url) as first:
                epoch = (await first.subscribe(topic))["epoch"]
            async with ws_connect(gw.url) as resumed:
                ack = await resumed.subscribe(topic, since={"epoch": epoch, "seq": 0})
                # The oldest topic's message was evicted, and the client is told so.
                assert ack["recovered"] is recovered, topic
                if recovered:
                    assert (await resumed.recv())["seq"] == 1
        alive(c)
    finally:
        c.stop()


# --- 7: degraded paths ---------------------------------------------------------------


async def test_hostile_close_codes_add_no_series(nursery):
    bound = await start_standalone(nursery)
    url, admin = urls(bound)
    for code in list(range(3000, 3100)) + list(range(4100, 4200)):
        async with open_websocket_url(url) as conn:
            await conn.aclose(code)
    def all_closed() -> bool:
        return metric(http_get(admin + "/metrics")[1], "fanroute_gateway_connections") == 0

    await await_until(all_closed, what="every connection closed")
    text = (await trio.to_thread.run_sync(http_get, admin + "/metrics"))[1]
    assert series(text, "fanroute_gateway_connections_closed") <= 3
    assert metric(text, "fanroute_gateway_connections_closed_total", 'code="other"') == 200


async def test_http_keep_alive_connections_count_against_max_connections(nursery):
    bound = await start_standalone(nursery, max_connections=3)
    url, admin = urls(bound)
    held = []
    try:
        for _ in range(3):
            s = await trio.open_tcp_stream("127.0.0.1", bound.port)
            await s.send_all(b"GET /fanroute.js HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await s.receive_some(65536)).startswith(b"HTTP/1.1 200")
            held.append(s)
        with pytest.raises(ConnectionClosed) as closed:
            async with ws_connect(url) as c:
                await c.recv()
        assert closed.value.reason.code == 1013
    finally:
        for s in held:
            await s.aclose()
    async with ws_connect(url) as c:  # room again once they are gone
        await c.subscribe("t")


async def test_past_the_connection_rate_new_connections_are_closed_1013_and_counted(nursery):
    """A storm beyond --connection-rate is answered at once with 1013 ("try again
    later"), counted, rather than queued; once the rate allows, connections open again."""
    bound = await start_standalone(nursery, connection_rate=2)
    url, admin = urls(bound)
    codes = []
    for _ in range(12):
        try:
            async with ws_connect(url) as c:
                await c.send({"type": "ping", "ts": 1})
                await c.recv_type("pong")
                codes.append(None)
        except ConnectionClosed as closed:
            codes.append((closed.reason.code, closed.reason.reason))
    refused = [c for c in codes if c is not None]
    assert refused and {code for code, _ in refused} == {1013}, codes
    text = (await trio.to_thread.run_sync(http_get, admin + "/metrics"))[1]
    assert metric(text, "fanroute_gateway_connections_rejected_total", 'reason="connection_rate"') == len(refused)

    async def opens() -> bool:
        try:
            async with ws_connect(url) as c:
                await c.send({"type": "ping", "ts": 1})
                await c.recv_type("pong")
                return True
        except ConnectionClosed:
            return False

    deadline = trio.current_time() + DEADLINE
    while not await opens():  # each try is a connection: the bucket refills at 2 a second
        assert trio.current_time() < deadline, "no connection let in again"
        await trio.sleep(0.5)  # pacing the retries, as a client's backoff would


async def _raw_ws(port: int) -> tuple[trio.SocketStream, wsproto.WSConnection]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(wse.Request(host="127.0.0.1", target="/")))
    while True:
        ws.receive_data(await stream.receive_some(65536))
        if any(isinstance(e, wse.AcceptConnection) for e in ws.events()):
            return stream, ws


async def _close_code(stream: trio.SocketStream, ws: wsproto.WSConnection, answer_pings: bool = True) -> int:
    """Read until the server closes; answer its pings meanwhile (the client is alive)."""
    with trio.fail_after(DEADLINE):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return 1006
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, wse.CloseConnection):
                    return event.code
                if isinstance(event, wse.Ping) and answer_pings:
                    await stream.send_all(ws.send(event.response()))


async def test_an_unfinished_message_is_closed_with_4010_even_while_pongs_arrive(nursery):
    bound = await start_standalone(nursery, message_timeout=1.0, ping_interval=0.2, ping_timeout=5.0, max_frame=65536)
    stream, ws = await _raw_ws(bound.port)
    await stream.send_all(ws.send(wse.TextMessage(data='{"type":"publish","topic":"t","payload":"' + "x" * 60000, message_finished=False)))
    started = time.monotonic()
    assert await _close_code(stream, ws) == 4010
    assert time.monotonic() - started < DEADLINE
    # Fragments that add up past --max-frame are refused with 1009.
    stream, ws = await _raw_ws(bound.port)
    for _ in range(3):
        await stream.send_all(ws.send(wse.TextMessage(data="y" * 30000, message_finished=False)))
    assert await _close_code(stream, ws) == 1009
    url, _ = urls(bound)
    async with ws_connect(url) as c:
        assert (await c.subscribe("t"))["type"] == "subscribed"


def test_running_out_of_descriptors_leaves_healthz_answering():
    port, admin = free_port(), free_port()

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600))

    env = {"FANROUTE_CLUSTER_SECRET": CLUSTER_SECRET, "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanroute.cli", "standalone", "--port", str(port), "--admin-port", str(admin)],
        cwd=ROOT, env=env, preexec_fn=low_limit, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    socks = []
    try:
        wait_until(lambda: _up(admin), what="standalone with 600 descriptors ready")
        for _ in range(700):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
        assert http_get(f"http://127.0.0.1:{admin}/healthz", timeout=10)[0] == 200

        def shed() -> bool:
            text = http_get(f"http://127.0.0.1:{admin}/metrics", timeout=10)[1]
            try:
                # 600 descriptors: at most 600 - 256 - 64 connections, and 64 more answered 503.
                return metric(text, "fanroute_gateway_connections_rejected_total", 'reason="connections"') >= 700 - 344
            except KeyError:
                return False

        wait_until(shed, what="connections past the cap shed at accept")
        assert http_get(f"http://127.0.0.1:{admin}/healthz", timeout=10)[0] == 200
        assert proc.poll() is None
    finally:
        for s in socks:
            s.close()
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=10)
    assert b"lowered to" in err and err.count(b"accept failed") <= 1


def _up(admin: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200
    except OSError:
        return False


# --- truthful answers ------------------------------------------------------------------


async def test_a_publication_answered_unavailable_was_not_applied():
    """SIGSTOP the router under acked publishing: every answer is true afterwards."""
    c = start_cluster(gateways=1, routers=1)
    try:
        gw, router = c.gateways[0], c.routers[0]
        answers: dict[int, str] = {}
        arrived = trio.Event()  # set, and replaced, whenever an answer arrives

        async def until(pred) -> None:
            nonlocal arrived
            with trio.fail_after(DEADLINE):
                while not pred():
                    await arrived.wait()
                    arrived = trio.Event()

        async with ws_connect(gw.url) as pub:
            sent = 0

            async def publish_until(stop: trio.Event) -> None:
                nonlocal sent
                while not stop.is_set():
                    sent += 1
                    await pub.send({"type": "publish", "topic": "truth.t", "payload": sent, "id": sent})
                    await trio.sleep(0.02)  # a steady feed, not a synchronisation

            async def collect() -> None:
                while True:
                    msg = await pub.recv()
                    answers[msg["id"]] = msg.get("code", "published")
                    arrived.set()

            async with trio.open_nursery() as n:
                n.start_soon(collect)
                stop = trio.Event()
                n.start_soon(publish_until, stop)
                await until(lambda: len(answers) >= 50)
                router.kill(signal.SIGSTOP)
                await until(lambda: any(code != "published" for code in answers.values()))
                router.kill(signal.SIGCONT)
                await await_until(lambda: ready(gw), what="the gateway to reach the router again")
                stop.set()
                await until(lambda: len(answers) >= sent)
                n.cancel_scope.cancel()
        async with ws_connect(gw.url) as reader:
            ack = await reader.subscribe("truth.t")
            async with ws_connect(gw.url) as again:
                resumed = await again.subscribe("truth.t", since={"epoch": ack["epoch"], "seq": 0})
                assert resumed["recovered"] is True
                applied = [(await again.recv())["payload"] for _ in range(ack["seq"])]
        codes = set(answers.values())
        assert codes <= {"published", "unavailable", "outcome_unknown"}, codes
        assert "published" in codes and codes - {"published"}
        for id, code in answers.items():
            if code == "published":
                assert id in applied
            elif code == "unavailable":
                assert id not in applied, f"publication {id} was answered unavailable but applied"
        assert len(applied) == len(set(applied))
    finally:
        c.stop()
