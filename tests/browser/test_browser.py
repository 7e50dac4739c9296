"""Browser tests: the demo pages and fanroute.js in a real Chromium.

Playwright (the Python package) drives Debian's Chromium at /usr/bin/chromium; no
browser is downloaded (``ops/setup-browser.sh`` installs it). Servers are real
``fanroute`` processes on 127.0.0.1, killed at the end of every test. Waits are on the
page's own state (``window.fanrouteDemo``, which each demo page keeps for people and
for these tests), never on sleeps. Where a test must be sure that the page is *not*
reconnecting yet, it pauses the page's clock (Playwright's fake timers): the client's
reconnect timer then cannot fire until the test resumes it.

Screenshots of the pages land in ``artifacts/browser/`` (git-ignored).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import serve as ws_serve

from fanroute.localcluster import LocalCluster, Node, free_port
from tests.support import CLUSTER_SECRET

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; the rest keep it off the (closed) network.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 30_000  # generous: the machines are shared and noisy
DEADLINE = 30.0

pytestmark = pytest.mark.timeout(240)


# --- processes ------------------------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


@dataclass
class Proc:
    """A gateway or standalone server of a :class:`LocalCluster`, with the URLs a page uses."""

    node: Node

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def popen(self) -> subprocess.Popen:
        return self.node.popen

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.node.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.node.port}/ws"


@contextmanager
def processes() -> Iterator[list[LocalCluster]]:
    """Every cluster started in the block is SIGKILLed at its end, pass or fail."""
    clusters: list[LocalCluster] = []
    try:
        yield clusters
    finally:
        for cluster in clusters:
            cluster.stop(signal.SIGKILL)


HEARTBEAT = ["--ping-interval", "1", "--ping-timeout", "5"]


def _started(clusters: list[LocalCluster], cluster: LocalCluster) -> LocalCluster:
    clusters.append(cluster)
    cluster.start()
    cluster.wait_ready(2 * DEADLINE)  # a port taken meanwhile is chosen anew there
    return cluster


def start_standalone(clusters: list[LocalCluster], extra: tuple[str, ...] = ()) -> Proc:
    cluster = LocalCluster(0, 0, standalones=1, standalone_args=[*HEARTBEAT, *extra], secret=CLUSTER_SECRET, cwd=ROOT)
    return Proc(_started(clusters, cluster).standalones[0])


def start_cluster(
    clusters: list[LocalCluster],
    gateways: int,
    routers: int,
    gateway_args: tuple[str, ...] = (),
    router_args: tuple[str, ...] = (),
) -> list[Proc]:
    """Routers and gateways as separate processes; returns the gateways."""
    cluster = LocalCluster(
        gateways, routers, gateway_args=[*HEARTBEAT, *gateway_args], router_args=router_args, secret=CLUSTER_SECRET, cwd=ROOT
    )
    return [Proc(g) for g in _started(clusters, cluster).gateways]


@pytest.fixture(scope="module")
def standalone() -> Iterator[Proc]:
    with processes() as procs:
        yield start_standalone(procs)


# --- a plain protocol client on the test's side ----------------------------------------


class Peer:
    """Publishes and subscribes from outside the browser (websockets, sync)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = count(1)
        self.backlog: list[dict[str, Any]] = []  # frames that arrived while waiting for an answer

    def _request(self, frame: dict[str, Any], answer: str) -> dict[str, Any]:
        frame["id"] = next(self.ids)
        self.ws.send(json.dumps(frame))
        end = time.monotonic() + DEADLINE
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("id") == frame["id"]:
                assert msg.get("type") == answer, msg
                return msg
            self.backlog.append(msg)

    def publish(self, topic: str, payload: Any) -> int:
        return self._request({"type": "publish", "topic": topic, "payload": payload}, "published")["seq"]

    def subscribe(self, topic: str) -> dict[str, Any]:
        self.backlog = []
        return self._request({"type": "subscribe", "topic": topic}, "subscribed")

    def next_message(self, topic: str) -> dict[str, Any]:
        while self.backlog:
            msg = self.backlog.pop(0)
            if msg.get("topic") == topic and "seq" in msg and msg.get("type") in (None, "message"):
                return msg
        end = time.monotonic() + DEADLINE
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("topic") == topic and "seq" in msg and msg.get("type") in (None, "message"):
                return msg


@contextmanager
def peer(url: str) -> Iterator[Peer]:
    with ws_connect(url, open_timeout=DEADLINE) as ws:
        yield Peer(ws)


# --- the browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run ops/setup-browser.sh (ops/test.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # Playwright gives every launch a fresh, temporary user-data directory.
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def screenshot(pg: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    pg.screenshot(path=str(path))
    assert path.stat().st_size > 10_000, "the screenshot looks empty"
    return path


def demo(pg: Any, expr: str) -> Any:
    return pg.evaluate(f"() => {{ const d = window.fanrouteDemo; return {expr}; }}")


def wait_demo(pg: Any, expr: str, arg: Any = None) -> None:
    pg.wait_for_function(
        f"(arg) => {{ const d = window.fanrouteDemo; return !!d && ({expr}); }}", arg=arg, timeout=WAIT_MS
    )


SUBSCRIBED = "d.log.some(e => e.event === 'subscribed')"
# The pages ping every second and allow ten of silence, so that a loaded machine
# does not make them give up on a live gateway; the heartbeat test sets its own.
CALM = "pingInterval=1000&pingTimeout=10000"


def freeze_clock(pg: Any) -> None:
    """Stop the page's timers (after a small jump ahead: pause_at cannot go back in
    time, and the page's clock runs on while the command travels). pause_at takes
    seconds since the epoch, as Python's time() does."""
    pg.clock.pause_at((demo(pg, "Date.now()") + 500) / 1000)


# --- the tests -----------------------------------------------------------------------------


def test_gateway_serves_the_client_and_the_pages(standalone: Proc) -> None:
    status, headers, body = http_get(standalone.http + "/fanroute.js")
    assert status == 200
    assert headers["content-type"].startswith("text/javascript")
    assert b"export class FanrouteClient" in body
    status, _, body = http_get(standalone.http + "/fanroute.d.ts")
    assert status == 200 and b"declare class FanrouteClient" in body
    status, headers, body = http_get(standalone.http + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'href="comments.html"' in body and b'href="ticker.html"' in body
    for name in ("comments.html", "ticker.html", "demo.js", "demo.css", "favicon.svg"):
        assert http_get(f"{standalone.http}/{name}")[0] == 200, name
    # The Node tests live beside the pages but are not served.
    assert http_get(standalone.http + "/tests/fanroute.test.mjs")[0] == 404


def test_index_page_links_to_both_demos(page: Any, standalone: Proc) -> None:
    page.goto(standalone.http + "/?" + CALM)
    wait_demo(page, "d.client.state === 'connected'")
    assert page.get_attribute("#status", "data-state") == "connected"
    screenshot(page, "index.png")
    page.click("#link-ticker")
    page.wait_for_url("**/ticker.html")
    page.go_back()
    page.click("#link-comments")
    page.wait_for_url("**/comments.html")
    wait_demo(page, SUBSCRIBED)


def test_comments_page_connects_subscribes_receives_and_publishes(page: Any, standalone: Proc) -> None:
    room = f"r{free_port()}"
    topic = f"comments.{room}"
    page.goto(f"{standalone.http}/comments.html?room={room}&{CALM}")
    wait_demo(page, SUBSCRIBED)
    assert demo(page, "d.topic") == topic
    assert page.get_attribute("#status", "data-state") == "connected"
    with peer(standalone.ws) as other:
        other.subscribe(topic)
        # Receives: three comments from another client, in order.
        for i, (nick, text) in enumerate([("ana", "first!"), ("bo", "hello from Python"), ("cy", "ça marche — ok")], 1):
            assert other.publish(topic, {"nick": nick, "text": text, "color": "#ffd166"}) == i
        wait_demo(page, "d.seqs.length >= 3")
        assert demo(page, "d.seqs") == [1, 2, 3]
        assert [c["text"] for c in demo(page, "d.comments")] == ["first!", "hello from Python", "ça marche — ok"]
        for _ in range(3):
            other.next_message(topic)
        # Publishes: through the box, seen by the page itself and by the other client.
        page.fill("#nick", "browser")
        page.fill("#text", "posted from Chromium")
        page.click("#send")
        wait_demo(page, "d.published.length === 1 && d.seqs.length === 4")
        assert demo(page, "d.published") == [4]
        assert page.text_content("#sent") == "sent as #4"
        msg = other.next_message(topic)
        assert msg["seq"] == 4
        assert msg["payload"]["text"] == "posted from Chromium"
        assert msg["payload"]["nick"] == "browser"
        # A handful more, so the screenshot shows the stage busy.
        lines = [
            ("mei", "this is so smooth", "#ffffff"), ("raj", "gg", "#06d6a0"), ("li", "where is everyone from?", "#ffd166"),
            ("sam", "hi from Lisbon", "#ef476f"), ("kai", "fanroute ftw", "#118ab2"), ("zoe", "lol", "#ffffff"),
            ("noa", "can't wait for the next one", "#f78c6b"), ("ivo", "+1", "#ffffff"),
        ]
        for nick, text, color in lines:
            other.publish(topic, {"nick": nick, "text": text, "color": color})
    wait_demo(page, "d.seqs.length === 12 && document.querySelectorAll('.danmaku').length >= 6")
    # Screenshot once the comments have flown well into the stage.
    page.wait_for_function(
        """() => {
            const stage = document.getElementById('stage').getBoundingClientRect();
            const inside = [...document.querySelectorAll('.danmaku')]
                .filter(el => el.getBoundingClientRect().left < stage.left + stage.width * 0.6);
            return inside.length >= 6;
        }""",
        timeout=WAIT_MS,
    )
    assert demo(page, "d.seqs") == list(range(1, 13))
    assert page.locator("#recent li").count() == 12
    screenshot(page, "comments.png")


def test_ticker_page_updates_in_place_from_the_demo_feed(page: Any, standalone: Proc) -> None:
    page.goto(standalone.http + "/ticker.html?" + CALM)
    symbols = demo(page, "d.symbols")
    assert len(symbols) >= 4
    wait_demo(page, f"d.log.filter(e => e.event === 'subscribed').length === {len(symbols)}")
    feed = subprocess.Popen(
        [sys.executable, "-m", "fanroute.demo_feed", "--url", standalone.ws, "--rate", "10", "--seed", "7"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_demo(page, "d.symbols.every(s => d.rows[s].updates >= 20)")
        assert feed.poll() is None, feed.stderr.read().decode()[-2000:]
        screenshot(page, "ticker.png")
    finally:
        feed.kill()
        feed.wait(timeout=10)
    # Updated in place: one row per symbol, whatever the number of updates.
    assert page.locator("#quotes tbody tr").count() == len(symbols)
    rows, seqs = demo(page, "d.rows"), demo(page, "d.seqs")
    for symbol in symbols:
        got = seqs[symbol]
        assert got == list(range(got[0], got[0] + len(got))), f"{symbol}: {got}"
        price = page.text_content(f'#quotes tr[data-symbol="{symbol}"] td.price')
        assert price == f"{rows[symbol]['price']:,.2f}"


def test_ticker_page_can_publish_its_own_prices(page: Any, standalone: Proc) -> None:
    page.goto(standalone.http + "/ticker.html?symbols=DEMO1,DEMO2&" + CALM)
    assert demo(page, "d.symbols") == ["DEMO1", "DEMO2"]
    wait_demo(page, "d.log.filter(e => e.event === 'subscribed').length === 2")
    page.click("#feed")
    wait_demo(page, "d.symbols.every(s => d.rows[s].updates >= 3)")
    page.click("#feed")  # stop
    assert page.text_content("#feed") == "Publish demo prices from this page"
    assert page.locator("#quotes tbody tr").count() == 2


def test_page_survives_sigkill_of_its_gateway_and_recovers_every_message(page: Any) -> None:
    topic = "comments.failover"
    with processes() as procs:
        gateways = start_cluster(procs, gateways=2, routers=2)
        urls = ",".join(g.ws for g in gateways)
        page.clock.install()  # time flows normally until the test pauses it
        page.goto(f"{gateways[0].http}/comments.html?room=failover&gateways={urls}&{CALM}&minDelay=200&maxDelay=2000")
        wait_demo(page, SUBSCRIBED)
        first = demo(page, "d.client.url")
        victim = next(g for g in gateways if g.ws == first)
        survivor = next(g for g in gateways if g is not victim)
        with peer(survivor.ws) as other:
            for i in range(1, 6):
                assert other.publish(topic, {"nick": "feed", "text": f"before {i}"}) == i
            wait_demo(page, "d.seqs.length === 5")

            # Freeze the page's timers: once the connection drops, the reconnect
            # cannot happen until the test says so.
            freeze_clock(page)
            victim.popen.send_signal(signal.SIGKILL)
            wait_demo(page, "d.client.state === 'connecting' && d.log.some(e => e.event === 'disconnected')")
            assert page.get_attribute("#status", "data-state") == "reconnecting"
            assert "reconnecting" in page.text_content("#status .text")
            # Noticed from the socket closing, not from a heartbeat deadline.
            assert demo(page, "d.log.find(e => e.event === 'disconnected').code") == 1006
            screenshot(page, "comments-reconnecting.png")
            # Published while the page has no connection at all.
            for i in range(6, 26):
                assert other.publish(topic, {"nick": "feed", "text": f"meanwhile {i}"}) == i
            assert demo(page, "d.client.state") == "connecting"
            assert demo(page, "d.seqs.length") == 5

            page.clock.resume()
            wait_demo(page, "d.client.state === 'connected' && d.seqs.length >= 25")
            assert demo(page, "d.client.url") == survivor.ws
            assert page.get_attribute("#status", "data-state") == "connected"
            resumed = demo(page, "d.log.filter(e => e.event === 'subscribed' && e.resumed)")
            assert resumed and resumed[-1]["recovered"] is True, resumed
            # And live again afterwards.
            for i in range(26, 31):
                assert other.publish(topic, {"nick": "feed", "text": f"after {i}"}) == i
            wait_demo(page, "d.seqs.length >= 30")
        # Every message once, in order: nothing lost, nothing twice.
        assert demo(page, "d.seqs") == list(range(1, 31))
        assert demo(page, "d.log.filter(e => e.event === 'unrecovered').length") == 0
        disconnect = demo(page, "d.log.find(e => e.event === 'disconnected')")
        assert disconnect["reconnect"] is True and disconnect["url"] == victim.ws


def test_page_is_told_when_history_cannot_cover_the_outage(page: Any) -> None:
    """Recovery has limits: with a history of 3, missing 10 is shown, not hidden; the
    page's ``last: 20`` then brings what the history still holds (13 to 15)."""
    topic = "comments.short"
    with processes() as procs:
        gateways = start_cluster(procs, gateways=2, routers=1, router_args=("--history-size", "3"))
        urls = ",".join(g.ws for g in gateways)
        page.clock.install()
        page.goto(f"{gateways[0].http}/comments.html?room=short&gateways={urls}&{CALM}&minDelay=200&maxDelay=2000")
        wait_demo(page, SUBSCRIBED)
        victim = next(g for g in gateways if g.ws == demo(page, "d.client.url"))
        survivor = next(g for g in gateways if g is not victim)
        with peer(survivor.ws) as other:
            for i in range(1, 6):
                other.publish(topic, {"text": f"before {i}"})
            wait_demo(page, "d.seqs.length === 5")
            freeze_clock(page)
            victim.popen.send_signal(signal.SIGKILL)
            wait_demo(page, "d.client.state === 'connecting'")
            for i in range(6, 16):
                other.publish(topic, {"text": f"meanwhile {i}"})
            page.clock.resume()
            wait_demo(page, "d.log.some(e => e.event === 'unrecovered')")
            lost = demo(page, "d.log.find(e => e.event === 'unrecovered')")
            assert lost["topic"] == topic and lost["seq"] == 12 and lost["previous"]["seq"] == 5
            assert "6…12 could not be recovered" in page.text_content("#recent li.lost")
            wait_demo(page, "d.seqs.length === 8")
            assert other.publish(topic, {"text": "after"}) == 16
            wait_demo(page, "d.seqs.length === 9")
        assert demo(page, "d.seqs") == [1, 2, 3, 4, 5, 13, 14, 15, 16]
        assert demo(page, "d.client.stats.unrecovered") == 1


def test_page_detects_a_frozen_gateway_by_its_heartbeat_deadline(page: Any) -> None:
    """SIGSTOP: the socket stays open, so only the client's own deadline can notice."""
    topic = "comments.frozen"
    with processes() as procs:
        gateways = start_cluster(procs, gateways=2, routers=1)
        urls = ",".join(g.ws for g in gateways)
        page.goto(f"{gateways[0].http}/comments.html?room=frozen&gateways={urls}&pingInterval=1000&pingTimeout=2000&minDelay=200&maxDelay=2000")
        wait_demo(page, SUBSCRIBED)
        victim = next(g for g in gateways if g.ws == demo(page, "d.client.url"))
        survivor = next(g for g in gateways if g is not victim)
        with peer(survivor.ws) as other:
            assert other.publish(topic, {"text": "before"}) == 1
            wait_demo(page, "d.seqs.length === 1")
            victim.popen.send_signal(signal.SIGSTOP)
            # Nothing reaches the page through a frozen gateway: these are missed.
            for i in range(2, 12):
                assert other.publish(topic, {"text": f"while frozen {i}"}) == i
            wait_demo(page, "d.client.state === 'connected' && d.seqs.length >= 11")
            assert demo(page, "d.client.url") == survivor.ws
        assert demo(page, "d.seqs") == list(range(1, 12))
        event = demo(page, "d.log.find(e => e.event === 'disconnected')")
        assert event["code"] == 4009 and event["reconnect"] is True


def test_draining_gateway_sends_the_page_elsewhere_promptly(page: Any) -> None:
    """SIGTERM: the gateway closes its clients with 1012; the page is back within a second."""
    topic = "comments.drain"
    with processes() as procs:
        gateways = start_cluster(procs, gateways=2, routers=1, gateway_args=("--drain-window", "0.2"))
        urls = ",".join(g.ws for g in gateways)
        # A backoff this slow would keep the page away for seconds; 1012 must not.
        page.goto(f"{gateways[0].http}/comments.html?room=drain&gateways={urls}&{CALM}&minDelay=5000&maxDelay=30000")
        wait_demo(page, SUBSCRIBED)
        victim = next(g for g in gateways if g.ws == demo(page, "d.client.url"))
        survivor = next(g for g in gateways if g is not victim)
        with peer(survivor.ws) as other:
            assert other.publish(topic, {"text": "before"}) == 1
            wait_demo(page, "d.seqs.length === 1")
            victim.popen.send_signal(signal.SIGTERM)
            wait_demo(page, "d.log.some(e => e.event === 'disconnected')")
            for i in range(2, 7):
                assert other.publish(topic, {"text": f"during the restart {i}"}) == i
            wait_demo(page, "d.client.state === 'connected' && d.seqs.length >= 6")
            assert demo(page, "d.client.url") == survivor.ws
        assert demo(page, "d.seqs") == list(range(1, 7))
        event = demo(page, "d.log.find(e => e.event === 'disconnected')")
        assert event["code"] == 1012 and event["reconnect"] is True
        assert 0 <= event["delay"] < 1000
        assert victim.popen.wait(timeout=DEADLINE) == 0  # and the gateway exits cleanly


# --- close codes, against a scripted server ----------------------------------------------


@dataclass
class ScriptedGateway:
    """A WebSocket server that plays one scripted role per connection.

    Each connection takes the next action: ``("close", code)`` closes right after the
    connect frame; ``("serve",)`` answers like a gateway with an empty topic.
    """

    actions: list[tuple[Any, ...]]
    hellos: list[dict[str, Any]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def handle(self, ws: Any) -> None:
        hello = json.loads(ws.recv(timeout=DEADLINE))
        with self.changed:
            index = len(self.hellos)
            self.hellos.append(hello)
            self.changed.notify_all()
        action = self.actions[min(index, len(self.actions) - 1)]
        if action[0] == "close":
            ws.close(action[1], "scripted")
            return
        ws.send(json.dumps({"type": "connected", "session": f"s{index}", "ping_interval": 1, "ping_timeout": 1, "id": hello.get("id")}))
        for raw in ws:
            msg = json.loads(raw)
            if msg.get("type") == "ping":
                ws.send(json.dumps({"type": "pong", "ts": msg.get("ts")}))
            elif msg.get("type") == "subscribe":
                ws.send(json.dumps({"type": "subscribed", "topic": msg["topic"], "id": msg["id"], "epoch": "x", "seq": 0, "recovered": False}))

    def wait_hellos(self, n: int) -> list[dict[str, Any]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.hellos) >= n, timeout=DEADLINE), self.hellos
            return list(self.hellos)


@contextmanager
def scripted_gateway(*actions: tuple[Any, ...]) -> Iterator[tuple[ScriptedGateway, str]]:
    gw = ScriptedGateway(list(actions))
    with ws_serve(gw.handle, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield gw, f"ws://127.0.0.1:{server.socket.getsockname()[1]}/ws"
        finally:
            server.shutdown()
            thread.join(timeout=10)


def test_terminal_close_code_stops_reconnecting(page: Any, standalone: Proc) -> None:
    with scripted_gateway(("close", 4001)) as (gw, url):
        page.clock.install()
        page.goto(f"{standalone.http}/comments.html?gateways={url}&{CALM}&minDelay=50&maxDelay=200")
        wait_demo(page, "d.log.some(e => e.event === 'disconnected')")
        event = demo(page, "d.log.find(e => e.event === 'disconnected')")
        assert event["code"] == 4001 and event["reconnect"] is False
        assert demo(page, "d.client.state") == "disconnected"
        assert page.get_attribute("#status", "data-state") == "disconnected"
        assert "4001" in page.text_content("#status .text")
        # A minute of the page's time: any reconnect timer would have fired by now.
        page.clock.run_for(60_000)
        assert demo(page, "d.client.state") == "disconnected"
        # Probe: a connection the test asks for arrives as the second one, so no
        # automatic attempt was made in between (Chromium opens WebSockets to one
        # host one at a time, in order).
        page.evaluate("() => { const c = window.fanrouteDemo.client; c.options.token = 'probe'; c.connect(); }")
        hellos = gw.wait_hellos(2)
        assert [h.get("token") for h in hellos] == [None, "probe"]


def test_page_with_a_token_works_and_a_refused_token_stops_it(page: Any) -> None:
    """Against a real gateway that requires tokens: 4001 ends the page's reconnecting."""
    import jwt

    secret = "browser-test-secret-of-at-least-32-bytes"
    with processes() as procs:
        gw = start_standalone(procs, ("--jwt-secret", secret))
        good = jwt.encode({"sub": "viewer", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
        page.goto(f"{gw.http}/comments.html?room=auth&token={good}&{CALM}")
        wait_demo(page, SUBSCRIBED)
        page.fill("#text", "signed in")
        page.click("#send")
        wait_demo(page, "d.seqs.length === 1 && d.published.length === 1")

        page.goto(f"{gw.http}/comments.html?room=auth&token=not-a-token&{CALM}&minDelay=50&maxDelay=200")
        wait_demo(page, "d.log.some(e => e.event === 'disconnected')")
        event = demo(page, "d.log.find(e => e.event === 'disconnected')")
        assert event["code"] == 4001 and event["reconnect"] is False
        assert demo(page, "d.client.state") == "disconnected"
        assert demo(page, "d.log.filter(e => e.event === 'connecting').length") == 1
        assert "4001" in page.text_content("#status .text")


def test_service_restart_reconnects_promptly(page: Any, standalone: Proc) -> None:
    with scripted_gateway(("close", 1012), ("serve",)) as (gw, url):
        # With a large maxDelay the backoff alone could wait seconds; 1012 must not.
        page.goto(f"{standalone.http}/comments.html?gateways={url}&{CALM}&minDelay=5000&maxDelay=30000")
        wait_demo(page, "d.client.state === 'connected' && " + SUBSCRIBED)
        event = demo(page, "d.log.find(e => e.event === 'disconnected')")
        assert event["code"] == 1012 and event["reconnect"] is True
        assert 0 <= event["delay"] < 1000
        assert len(gw.wait_hellos(2)) == 2
