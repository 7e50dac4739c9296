"""The server API across a real cluster (2 gateways, 2 routers, real processes), driven
from outside with the third-party ``websockets`` client and plain HTTP: disconnect
(4003, 1012), unsubscribe (the unsolicited ``unsubscribed``, nothing after it), info,
401 without a key, 400 on bad input, the per-user connection limit (1013), and one
parsed JSON log line for every event kind the processes emit.

The cluster is shared by the module's tests (starting one takes seconds); each test
uses users of its own. The last test kills processes, so it runs last.
"""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import jwt
import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.support import DEADLINE, metric, ready, start_cluster, wait_until

SECRET = "server-api-test-secret-0123456789abcdef"
API_KEY = "server-api-test-key"
ENDPOINTS = {"disconnect": "POST", "unsubscribe": "POST", "info": "GET"}


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + 3600}, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def cluster():
    env = {"FANROUTE_LOG_LEVEL": "debug", "FANROUTE_LOG_FORMAT": "json"}
    c = start_cluster(
        gateways=2,
        routers=2,
        gateway_args=["--jwt-secret", SECRET, "--api-key", API_KEY, "--max-connections-per-user", "2"],
        router_args=["--gateway-timeout", "2"],
        env=env,
    )
    yield c
    c.stop()


def call(admin: str, endpoint: str, body: Any = None, key: str | None = API_KEY, raw: bytes | None = None) -> tuple[int, Any]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["x-api-key"] = key
    method = ENDPOINTS.get(endpoint, "POST")
    data = raw if raw is not None else (None if body is None else orjson.dumps(body))
    req = urllib.request.Request(f"{admin}/api/{endpoint}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=DEADLINE) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


@contextmanager
def client(gateway, user: str) -> Iterator[ClientConnection]:
    with connect(f"{gateway.url}?token={token(user)}", open_timeout=DEADLINE, close_timeout=2) as ws:
        ws.send(orjson.dumps({"type": "ping", "ts": 1, "id": 99}).decode())
        assert recv(ws)["type"] == "pong"  # authenticated and served
        yield ws


def recv(ws: ClientConnection, timeout: float = DEADLINE) -> dict[str, Any]:
    return orjson.loads(ws.recv(timeout=timeout))


def subscribe(ws: ClientConnection, topic: str) -> None:
    ws.send(orjson.dumps({"type": "subscribe", "topic": topic, "id": 1}).decode())
    reply = recv(ws)
    assert reply["type"] == "subscribed" and reply["topic"] == topic, reply


def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Wait for the server to close ``ws``; its close code and reason."""
    with pytest.raises(ConnectionClosed) as caught:
        while True:
            ws.recv(timeout=DEADLINE)
    rcvd = caught.value.rcvd
    assert rcvd is not None, "closed without a close frame"
    return rcvd.code, rcvd.reason


def alive(ws: ClientConnection) -> None:
    ws.send(orjson.dumps({"type": "ping", "ts": 7, "id": 7}).decode())
    assert recv(ws) == {"type": "pong", "ts": 7, "id": 7}


def publish(admin: str, topic: str, payload: Any) -> int:
    status, body = call(admin, "publish", {"topic": topic, "payload": payload})
    assert status == 200, body
    return body["seq"]




# --- disconnect -------------------------------------------------------------------------


@pytest.mark.parametrize("reconnect, code", [(False, 4003), (True, 1012)])
def test_disconnect_closes_every_connection_of_the_user_on_every_gateway(cluster, reconnect, code):
    g0, g1 = cluster.gateways
    user = f"alice-{code}"
    with client(g0, user) as a0, client(g1, user) as a1, client(g1, f"bob-{code}") as bob:
        body = {"user": user, "reconnect": True} if reconnect else {"user": user}
        started = time.monotonic()
        status, answer = call(g0.admin, "disconnect", body)
        assert (status, answer) == (200, {"disconnected": 1})  # the count is this gateway's
        for ws in (a0, a1):  # the one on the other gateway too, through the shards
            got, reason = closed_with(ws)
            assert got == code and reason
        print(f"both connections closed {time.monotonic() - started:.3f}s after the call")
        alive(bob)  # nobody else is touched
    assert metric(g1.metrics(), "fanroute_gateway_api_command_targets_total", 'kind="disconnect"') >= 1
    assert metric(g0.metrics(), "fanroute_gateway_api_calls_total", 'endpoint="disconnect",outcome="ok"') >= 1


def test_disconnecting_a_user_with_no_connection_answers_zero(cluster):
    assert call(cluster.gateways[1].admin, "disconnect", {"user": "nobody-here"}) == (200, {"disconnected": 0})


# --- unsubscribe ------------------------------------------------------------------------


def test_unsubscribe_ends_the_subscription_everywhere_and_no_message_of_it_follows(cluster):
    g0, g1 = cluster.gateways
    room, other = "chat.api-room1", "chat.api-room2"
    with (
        client(g0, "carol") as a0,
        client(g1, "carol") as a1,
        client(g0, "dan") as witness0,
        client(g1, "dan") as witness1,
    ):
        for ws in (a0, a1):
            subscribe(ws, room)
            subscribe(ws, other)
        subscribe(witness0, room)
        subscribe(witness1, room)
        status, answer = call(g1.admin, "unsubscribe", {"user": "carol", "topic": room})
        assert (status, answer) == (200, {"unsubscribed": 1})
        for ws in (a0, a1):
            assert recv(ws) == {"type": "unsubscribed", "topic": room}  # unsolicited: no id
        # A message of the topic reaches the witness on each gateway: had carol still
        # been subscribed there, hers would have been queued in the same fan-out,
        # before the pong below.
        seq = publish(g0.admin, room, "after")
        for witness in (witness0, witness1):
            assert recv(witness) == {"topic": room, "payload": "after", "seq": seq}
        for ws in (a0, a1):
            alive(ws)
        # Her other subscription is untouched.
        seq = publish(g1.admin, other, "still here")
        for ws in (a0, a1):
            assert recv(ws) == {"topic": other, "payload": "still here", "seq": seq}


# --- info -------------------------------------------------------------------------------


def test_info_lists_every_gateway_and_router_with_their_counts(cluster):
    g0, g1 = cluster.gateways
    with client(g0, "erin") as e0, client(g1, "erin") as e1, client(g1, "frank") as f1:
        subscribe(e0, "news.a")
        subscribe(e1, "news.a")
        subscribe(f1, "news.b")

        def counted() -> bool:
            _, info = call(g1.admin, "info")
            by_conns = sorted((g["connections"], g["subscriptions"], g["topics"]) for g in info["gateways"])
            return len(info["gateways"]) == 2 and by_conns == [(1, 1, 1), (2, 2, 2)]

        wait_until(counted, what="info showing both gateways' connections, subscriptions and topics")
        status, info = call(g1.admin, "info")
        assert status == 200
        assert [g["self"] for g in info["gateways"]] == [True, False]
        routers = {r["name"]: r for r in info["routers"]}
        assert set(routers) == {r.name for r in cluster.routers}
        assert all(r["reachable"] and r["connections"] == 2 for r in routers.values())
        # Each gateway holds news.a, g1 holds news.b: three (topic, gateway) pairs in all.
        assert sum(r["subscriptions"] for r in routers.values()) == 3
        assert sum(r["topics"] for r in routers.values()) >= 2


# --- 401 and 400 ------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["disconnect", "unsubscribe", "info"])
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_without_a_valid_key_every_call_is_401_on_every_gateway(cluster, endpoint, key):
    body = None if endpoint == "info" else {"user": "alice", "topic": "t"}
    for gateway in cluster.gateways:
        status, answer = call(gateway.admin, endpoint, body, key=key)
        assert status == 401 and answer["error"]["code"] == "unauthorized"
        assert metric(gateway.metrics(), "fanroute_gateway_api_calls_total", f'endpoint="{endpoint}",outcome="unauthorized"') >= 1


@pytest.mark.parametrize(
    "endpoint, body, raw",
    [
        ("disconnect", None, b"{not json"),
        ("disconnect", {}, None),
        ("disconnect", {"user": ""}, None),
        ("disconnect", {"user": "a", "reconnect": "yes"}, None),
        ("disconnect", {"user": "a", "reconect": True}, None),
        ("unsubscribe", {"user": "a"}, None),
        ("unsubscribe", {"user": "a", "topic": "no spaces allowed"}, None),
        ("unsubscribe", ["user", "a"], None),
    ],
)
def test_bad_input_is_400_with_one_sentence(cluster, endpoint, body, raw):
    for gateway in cluster.gateways:
        status, answer = call(gateway.admin, endpoint, body, raw=raw)
        assert status == 400, answer
        error = answer["error"]
        assert error["code"] == "bad_request" and error["message"] and "\n" not in error["message"]


# --- the per-user connection limit ----------------------------------------------------------


def test_past_the_per_user_limit_a_new_connection_is_closed_with_1013_on_that_gateway_only(cluster):
    g0, g1 = cluster.gateways
    before = g0.metric("fanroute_gateway_limit_hits_total", 'limit="user_connections"', default=0)
    with ExitStack() as stack:
        stack.enter_context(client(g0, "gina"))
        stack.enter_context(client(g0, "gina"))
        with connect(f"{g0.url}?token={token('gina')}", open_timeout=DEADLINE) as third:
            code, reason = closed_with(third)
        assert code == 1013 and "user" in reason
        # Counted per gateway: the other gateway still lets her in.
        other = stack.enter_context(client(g1, "gina"))
        alive(other)
    assert metric(g0.metrics(), "fanroute_gateway_limit_hits_total", 'limit="user_connections"') == before + 1
    # Closed connections no longer count: she may connect again.
    with client(g0, "gina"), client(g0, "gina"):
        pass


# --- log lines: one JSON object per event (kills processes: keep it last) ---------------------


def events(node) -> list[dict[str, Any]]:
    out = []
    for line in node.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(orjson.loads(line))  # every log line is one JSON object
    return out


def test_every_event_kind_is_one_parsable_json_line(cluster):
    g0, g1 = cluster.gateways
    with connect(f"{g0.url}?token=not-a-token", open_timeout=DEADLINE) as bad:
        assert closed_with(bad)[0] == 4001
    assert call(g0.admin, "info", key="wrong-key")[0] == 401
    with client(g0, "hank") as h:
        subscribe(h, "logs.topic")
        assert call(g1.admin, "unsubscribe", {"user": "hank", "topic": "logs.topic"})[0] == 200
        assert recv(h)["type"] == "unsubscribed"
        assert call(g1.admin, "disconnect", {"user": "hank"})[0] == 200
        closed_with(h)
    # A gateway joins and goes away: the routers forget it after --gateway-timeout. A
    # router goes away: the gateways see their links to it go down.
    extra = cluster.start_gateway()
    wait_until(lambda: ready(extra), what="a third gateway ready")
    extra.kill(signal.SIGKILL)
    router = cluster.routers[1]
    router.kill(signal.SIGKILL)

    def logged(nodes, kind: str) -> bool:
        return any(e.get("event") == kind for node in nodes for e in events(node))

    gateway_kinds = [
        "connection_opened", "connection_closed", "auth_failed", "api_disconnect", "api_unsubscribe",
        "shard_link_up", "shard_link_down",
    ]
    for kind in gateway_kinds:
        wait_until(lambda: logged([g0], kind), what=f"a {kind} event in the gateway's log")
    for kind in ("gateway_joined", "gateway_forgotten"):
        wait_until(lambda: logged([cluster.routers[0]], kind), what=f"a {kind} event in the router's log")

    by_kind = {e["event"]: e for node in (g0, cluster.routers[0]) for e in events(node) if "event" in e}
    for kind, e in by_kind.items():
        assert {"ts", "level", "logger", "message", "event"} <= set(e), e
    closed = next(e for e in events(g0) if e.get("event") == "connection_closed" and e.get("user") == "hank")
    assert closed["code"] == 4003 and closed["connection"] and closed["reason"] == "api_disconnect"
    assert by_kind["api_unsubscribe"]["topic"] == "logs.topic" and by_kind["api_unsubscribe"]["user"] == "hank"
    assert by_kind["api_disconnect"]["code"] == 4003
    refused = next(e for e in events(g0) if e.get("event") == "auth_failed" and e.get("code") == 4001)
    assert refused["connection"] and refused["reason"]
    assert any(e.get("event") == "auth_failed" and e.get("reason") == "api_key" for e in events(g0))
    assert by_kind["shard_link_down"]["shard"] == router.name
    assert by_kind["gateway_forgotten"]["gateway"]
