"""The live-feed contract from outside: ``last``, presence counts, conflation.

Each test is one MUST of the sections "Latest value and recent messages on
subscribe", "Presence counts" and "Conflation" of the client protocol, checked with
a third-party client (the ``websockets`` package, nothing of fanroute's own) against
2 gateways and 2 routers running as processes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from fanroute.protocol import MAX_LAST
from tests.support import DEADLINE, metric, start_cluster, wait_until

API_KEY = "live-features-api-key"
NAMESPACES = """
allow_unknown_namespaces = true

[namespaces.secret]
subscribe = "nobody"
publish = "anyone"

[namespaces.px]
conflate = true
"""


class Client:
    """A plain WebSocket client speaking the JSON protocol."""

    def __init__(self, url: str, *, rcvbuf: int | None = None, max_queue: int | None = 64) -> None:
        sock = None
        if rcvbuf is not None:
            # A small receive buffer, so a client that stops reading is felt soon.
            host, port = url.split("//")[1].rstrip("/").split(":")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(DEADLINE)
            sock.connect((host, int(port)))
            sock.settimeout(None)
        self.ws = connect(url, sock=sock, proxy=None, compression=None, open_timeout=DEADLINE, max_queue=max_queue, max_size=None, legacy=True)

    def send(self, frame: dict[str, Any]) -> None:
        self.ws.send(json.dumps(frame))

    def recv(self, timeout: float = DEADLINE) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=timeout))

    def recv_type(self, kind: str, timeout: float = DEADLINE) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, end - time.monotonic()))
            if msg.get("type") == kind:
                return msg

    def subscribe(self, topic: str, id: int = 1, **extra: Any) -> dict[str, Any]:
        self.send({"type": "subscribe", "topic": topic, "id": id, **extra})
        reply = self.recv()
        assert reply.get("type") == "subscribed" and reply["id"] == id, reply
        return reply

    def publish(self, topic: str, payload: Any, id: int) -> int:
        self.send({"type": "publish", "topic": topic, "payload": payload, "id": id})
        while True:
            msg = self.recv()
            if msg.get("id") == id:
                assert msg["type"] == "published", msg
                return msg["seq"]

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    config = tmp_path_factory.mktemp("live") / "namespaces.toml"
    config.write_text(NAMESPACES)
    c = start_cluster(
        gateways=2, routers=2, gateway_args=["--config", str(config)], env={"FANROUTE_API_KEY": API_KEY}
    )
    yield c
    c.stop()


@pytest.fixture
def gw(cluster):
    a, b = cluster.gateways[:2]
    return a.url, b.url


_topics = iter(range(10**6))


def fresh(prefix: str = "live") -> str:
    return f"{prefix}.t{next(_topics)}-{time.monotonic_ns() % 10**9}"


def publish_n(url: str, topic: str, n: int) -> int:
    """Publish ``n`` messages (payload ``{"i": k}``); return the seq of the last."""
    pub = Client(url)
    for i in range(1, n):
        pub.send({"type": "publish", "topic": topic, "payload": {"i": i}})
    seq = pub.publish(topic, {"i": n}, id=1)
    pub.close()
    return seq


def messages(client: Client, n: int) -> list[dict[str, Any]]:
    return [client.recv() for _ in range(n)]


# --- Latest value and recent messages on subscribe ------------------------------------------


def test_last_sends_the_newest_n_oldest_first_ending_at_the_subscribed_seq(gw):
    a, b = gw
    topic = fresh()
    publish_n(b, topic, 10)
    sub = Client(a)
    reply = sub.subscribe(topic, last=3)
    assert (reply["seq"], reply["recovered"]) == (10, False)
    got = messages(sub, 3)
    assert [m["seq"] for m in got] == [8, 9, 10]
    assert [m["payload"] for m in got] == [{"i": 8}, {"i": 9}, {"i": 10}]
    assert all(m["topic"] == topic for m in got)


def test_last_sends_what_there_is_when_fewer_are_available(gw):
    a, b = gw
    topic = fresh()
    publish_n(b, topic, 2)
    sub = Client(a)
    assert sub.subscribe(topic, last=5)["seq"] == 2
    assert [m["seq"] for m in messages(sub, 2)] == [1, 2]
    publish_n(b, topic, 1)  # seq 3, live
    assert sub.recv()["seq"] == 3  # nothing else came in between


def test_last_on_a_topic_without_messages_sends_none(gw):
    a, b = gw
    topic = fresh()
    sub = Client(a)
    assert sub.subscribe(topic, last=5)["seq"] == 0
    publish_n(b, topic, 1)
    assert sub.recv()["seq"] == 1


def test_last_is_capped_as_documented(gw):
    a, b = gw
    topic = fresh()
    publish_n(b, topic, MAX_LAST + 20)
    sub = Client(a)
    assert sub.subscribe(topic, last=MAX_LAST * 10)["seq"] == MAX_LAST + 20
    got = [m["seq"] for m in messages(sub, MAX_LAST)]
    assert got == list(range(21, MAX_LAST + 21))
    publish_n(b, topic, 1)
    assert sub.recv()["seq"] == MAX_LAST + 21  # the cap, not more


@pytest.mark.parametrize("bad", [0, -2, 1.5, "3", True, None])
def test_a_bad_last_is_a_bad_request(gw, bad):
    sub = Client(gw[0])
    frame = {"type": "subscribe", "topic": fresh(), "id": 4, "last": bad}
    if bad is None:
        frame["last"] = {}
    sub.send(frame)
    reply = sub.recv()
    assert (reply["type"], reply["code"], reply["id"]) == ("error", "bad_request", 4)


def test_last_has_no_gap_and_no_duplicate_while_publications_keep_arriving(gw):
    """Subscribers join with ``last`` on both gateways, one of them already following
    the topic, while a publisher keeps going: each sees one unbroken run of seqs."""
    a, b = gw
    topic = fresh()
    total = 400
    follower = Client(a)
    follower.subscribe(topic)  # gateway a now follows the topic
    started = threading.Event()

    def publisher() -> None:
        pub = Client(b)
        for i in range(1, total + 1):
            pub.send({"type": "publish", "topic": topic, "payload": i})
            if i == 20:
                started.set()
        pub.publish(topic, "end", id=1)
        pub.close()

    t = threading.Thread(target=publisher)
    t.start()
    assert started.wait(DEADLINE)
    subs = []
    for i in range(6):
        c = Client(a if i % 2 == 0 else b)
        subs.append((c, c.subscribe(topic, id=10 + i, last=5)))
    t.join(DEADLINE)
    for c, reply in subs:
        seqs = []
        while not seqs or seqs[-1] != total + 1:
            seqs.append(c.recv()["seq"])
        first = max(1, reply["seq"] - 4)
        assert seqs == list(range(first, total + 2)), (reply["seq"], seqs[:12])


def test_recovery_wins_over_last(gw):
    a, b = gw
    topic = fresh()
    publish_n(b, topic, 10)
    epoch = Client(a).subscribe(topic)["epoch"]
    sub = Client(a)
    reply = sub.subscribe(topic, since={"epoch": epoch, "seq": 6}, last=1)
    assert reply["recovered"] is True
    assert [m["seq"] for m in messages(sub, 4)] == [7, 8, 9, 10]
    publish_n(b, topic, 1)
    assert sub.recv()["seq"] == 11


def test_last_applies_when_recovery_fails(gw):
    a, b = gw
    topic = fresh()
    publish_n(b, topic, 10)
    sub = Client(a)
    reply = sub.subscribe(topic, since={"epoch": "no-such-epoch", "seq": 3}, last=2)
    assert (reply["recovered"], reply["seq"]) == (False, 10)
    assert [m["seq"] for m in messages(sub, 2)] == [9, 10]


# --- Presence counts -----------------------------------------------------------------------


def presence(client: Client, topic: str, id: int = 5) -> int:
    client.send({"type": "presence", "topic": topic, "id": id})
    while True:
        msg = client.recv()
        if msg.get("type") in ("presence", "error") and msg.get("id") == id:
            assert msg["type"] == "presence" and msg["topic"] == topic, msg
            return msg["subscribers"]


def wait_count(client: Client, topic: str, expected: int) -> None:
    seen = []

    def right() -> bool:
        seen.append(presence(client, topic))
        return seen[-1] == expected

    wait_until(right, what=f"{expected} subscribers to {topic} (last seen {seen[-3:]})")


def test_presence_counts_every_connection_on_every_gateway(gw):
    a, b = gw
    topic = fresh()
    subs = [Client(a) for _ in range(3)] + [Client(b) for _ in range(2)]
    for s in subs:
        s.subscribe(topic)
    asker_a, asker_b = Client(a), Client(b)
    wait_count(asker_a, topic, 5)
    wait_count(asker_b, topic, 5)
    subs[0].send({"type": "unsubscribe", "topic": topic, "id": 2})
    subs[4].close()
    wait_count(asker_a, topic, 3)
    wait_count(asker_b, topic, 3)


def test_presence_needs_the_right_to_subscribe(gw):
    c = Client(gw[0])
    c.send({"type": "presence", "topic": "secret.room", "id": 8})
    reply = c.recv()
    assert (reply["type"], reply["code"], reply["id"]) == ("error", "forbidden", 8)


def test_subscribe_with_presence_pushes_the_count_after_subscribed_then_on_change(gw):
    a, b = gw
    topic = fresh()
    watcher = Client(a)
    watcher.send({"type": "subscribe", "topic": topic, "id": 1, "presence": True})
    assert watcher.recv()["type"] == "subscribed"
    first = watcher.recv()
    assert first == {"type": "presence", "topic": topic, "subscribers": 1}
    other = Client(b)
    other.subscribe(topic)
    push = watcher.recv_type("presence")
    assert (push["subscribers"], "id" in push) == (2, False)
    other.close()
    assert watcher.recv_type("presence")["subscribers"] == 1


def test_presence_pushes_at_most_once_a_second_per_topic(gw):
    """Churn on a topic for a few seconds: the watcher is sent at most about one count a second."""
    a, b = gw
    topic = fresh()
    watcher = Client(a)
    watcher.send({"type": "subscribe", "topic": topic, "id": 1, "presence": True})
    watcher.recv_type("subscribed")
    times = [time.monotonic()]
    watcher.recv_type("presence")
    churn = [Client(b if i % 2 else a) for i in range(6)]
    end = time.monotonic() + 3.0
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                if watcher.recv(timeout=0.2).get("type") == "presence":
                    times.append(time.monotonic())
            except TimeoutError:
                pass

    t = threading.Thread(target=watch)
    t.start()
    i = 0
    while time.monotonic() < end:
        c = churn[i % len(churn)]
        c.send({"type": "subscribe" if (i // len(churn)) % 2 == 0 else "unsubscribe", "topic": topic, "id": i})
        i += 1
        time.sleep(0.02)  # pacing the load generator, not waiting for an event
    time.sleep(1.5)
    stop.set()
    t.join(DEADLINE)
    span = times[-1] - times[0]
    assert len(times) >= 2  # the churn was seen
    # One count a second from the first one on, plus one for jitter on the way.
    assert len(times) <= int(span) + 2, (len(times), span)


def test_presence_over_the_http_api(cluster, gw):
    a, b = gw
    topic = fresh()
    subs = [Client(a), Client(b)]
    for s in subs:
        s.subscribe(topic)
    admin = cluster.gateways[1].admin

    def get(query: str, key: str | None = API_KEY) -> tuple[int, dict]:
        req = urllib.request.Request(f"{admin}/api/presence{query}", headers={"X-API-Key": key} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=DEADLINE) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    wait_until(lambda: get(f"?topic={topic}") == (200, {"topic": topic, "subscribers": 2}), what="2 over HTTP")
    assert get(f"?topic={topic}", key=None)[0] == 401
    assert get(f"?topic={topic}", key="wrong")[0] == 401
    assert get("")[0] == 400
    status, body = get("?topic=bad%20topic")
    assert status == 400 and body["error"]["code"] == "bad_request"
    # The same count as the presence command, on the other gateway too. Counts are
    # right within a couple of seconds of a change (each gateway reports its own
    # a tick later), so this waits for it rather than asking once.
    asker = Client(a)
    wait_until(lambda: presence(asker, topic) == 2, what="2 by the presence command")


def test_presence_drops_the_subscribers_of_a_gateway_that_died(cluster, gw):
    a, _ = gw
    topic = fresh()
    extra = cluster.start_gateway()
    wait_until(extra.ready, what="a third gateway")
    mine = Client(a)
    mine.subscribe(topic)
    doomed = [Client(extra.url) for _ in range(3)]
    for c in doomed:
        c.subscribe(topic)
    asker = Client(a)
    wait_count(asker, topic, 4)
    extra.kill()
    wait_count(asker, topic, 1)


# --- Conflation ----------------------------------------------------------------------------


def test_a_stalled_subscriber_of_a_conflated_topic_gets_the_newest_and_is_not_closed(cluster, gw):
    a, b = gw
    topics = [fresh("px") for _ in range(5)]
    stalled = Client(a, rcvbuf=4096, max_queue=1)
    for i, t in enumerate(topics):
        stalled.subscribe(t, id=i + 1)
    pub = Client(b)
    payload = "x" * 2000
    rounds = 400  # 5 topics x 400 x 2 KB: far more than the socket, the threshold and the outbox limit
    for r in range(1, rounds + 1):
        for t in topics:
            pub.send({"type": "publish", "topic": t, "payload": {"r": r, "pad": payload}})
    for t in topics:
        assert pub.publish(t, {"r": rounds + 1, "pad": ""}, id=9) == rounds + 1
    # Now read: for each topic, seqs plus skipped account for every message, and the
    # newest arrives.
    last = {t: 0 for t in topics}
    skipped_any = False
    while any(v < rounds + 1 for v in last.values()):
        msg = stalled.recv()
        t = msg["topic"]
        k = msg.get("skipped", 0)
        skipped_any |= k > 0
        assert msg["seq"] - k - 1 == last[t], msg | {"payload": None}
        last[t] = msg["seq"]
    assert skipped_any
    text = cluster.gateways[0].metrics()
    assert metric(text, "fanroute_gateway_conflated_total") > 0
    stalled.send({"type": "ping", "ts": 1})
    assert stalled.recv_type("pong")["ts"] == 1  # still open


def test_other_topics_on_a_conflating_connection_are_never_skipped(gw):
    """On one connection, a conflated topic and a plain one: the plain one either
    arrives whole or the connection is closed as a slow consumer (4008)."""
    a, b = gw
    px, plain = fresh("px"), fresh("plain")
    stalled = Client(a, rcvbuf=4096, max_queue=1)
    stalled.subscribe(px, id=1)
    stalled.subscribe(plain, id=2)
    pub = Client(b)
    payload = "y" * 2000
    n = 300
    for r in range(1, n + 1):
        pub.send({"type": "publish", "topic": px, "payload": {"r": r, "pad": payload}})
        pub.send({"type": "publish", "topic": plain, "payload": {"r": r, "pad": payload}})
    pub.publish(plain, "end", id=3)
    seqs = []
    try:
        while not seqs or seqs[-1] != n + 1:
            msg = stalled.recv()
            if msg.get("topic") == plain:
                assert "skipped" not in msg
                seqs.append(msg["seq"])
    except ConnectionClosed as closed:
        assert closed.rcvd is not None and closed.rcvd.code == 4008
        assert seqs == list(range(1, len(seqs) + 1))
        return
    assert seqs == list(range(1, n + 2))
