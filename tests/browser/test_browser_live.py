"""Chromium: the live-feed features on the demo pages, and tokens that refresh themselves.

- the ticker shows every symbol's current price the moment it opens (``last: 1``);
- the comments page shows the room's last 20 comments on load (``last: 20``) and a
  live "N watching" (presence counts, cluster-wide, across two gateways);
- a page whose tokens last 3 seconds stays subscribed for 20 seconds and loses
  nothing: ``getToken`` fetches each one from a token endpoint, and the client sends
  ``refresh`` on the open connection before each expires.

Processes, browser and helpers are ``tests/browser/test_browser.py``'s. Waits are on
the pages' own state; the one fixed span is the token test's 20-second observation
window, which is what that test is about.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest

from fanroute.demo_feed import DEFAULT_SYMBOLS
from fanroute.localcluster import free_port
from tests.browser.test_browser import (  # noqa: F401  (fixtures)
    CALM,
    DEADLINE,
    ROOT,
    WAIT_MS,
    Proc,
    browser,
    demo,
    page,
    peer,
    processes,
    screenshot,
    standalone,
    start_cluster,
    start_standalone,
    wait_demo,
)

pytestmark = pytest.mark.timeout(300)


# --- the ticker ------------------------------------------------------------------------


def test_ticker_shows_every_price_the_moment_it_opens(page: Any, standalone: Proc) -> None:
    """The feed runs before the page opens; each row's first value is the newest price
    (the seq of the subscribe's answer: sent with it by last: 1, not a later tick)."""
    topics = [f"prices.{s}" for s in DEFAULT_SYMBOLS]
    with peer(standalone.ws) as watcher:
        for topic in topics:
            watcher.subscribe(topic)
        feed = subprocess.Popen(
            [sys.executable, "-m", "fanroute.demo_feed", "--url", standalone.ws, "--rate", "0.5", "--seed", "11"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            for topic in topics:  # a first round: every symbol has a price
                watcher.next_message(topic)
            page.goto(standalone.http + "/ticker.html?" + CALM)
            wait_demo(page, "d.symbols.every(s => d.rows[s].price !== null)")
            assert feed.poll() is None, feed.stderr.read().decode()[-2000:]
            screenshot(page, "ticker-at-once.png")
        finally:
            feed.kill()
            feed.wait(timeout=10)
    answers = {e["topic"]: e["seq"] for e in demo(page, "d.log.filter(e => e.event === 'subscribed')")}
    seqs = demo(page, "d.seqs")
    for symbol in DEFAULT_SYMBOLS:
        assert answers[f"prices.{symbol}"] >= 1, symbol
        assert seqs[symbol][0] == answers[f"prices.{symbol}"], (symbol, seqs[symbol], answers)
        price = page.text_content(f'#quotes tr[data-symbol="{symbol}"] td.price')
        assert price not in (None, "—") and float(price.replace(",", "")) > 0


# --- the comments page -----------------------------------------------------------------


def test_comments_page_shows_the_last_20_comments_on_load(page: Any, standalone: Proc) -> None:
    room = f"history{free_port()}"
    topic = f"comments.{room}"
    with peer(standalone.ws) as other:
        for i in range(1, 31):
            assert other.publish(topic, {"nick": "earlier", "text": f"comment {i}"}) == i
        page.goto(f"{standalone.http}/comments.html?room={room}&{CALM}")
        wait_demo(page, "d.seqs.length === 20")
        assert demo(page, "d.seqs") == list(range(11, 31))
        assert demo(page, "d.history") == 20
        assert page.locator("#recent li.history").count() == 20
        assert page.text_content("#recent li:first-child") == "#30earlier: comment 30"
        assert page.locator(".danmaku").count() == 0  # the past is listed, not flown
        other.publish(topic, {"nick": "now", "text": "a live one"})
        wait_demo(page, "d.seqs.length === 21")
    assert demo(page, "d.seqs")[-1] == 31
    assert page.locator(".danmaku").count() == 1
    assert page.locator("#recent li.history").count() == 20


def watching(pg: Any) -> str:
    return pg.text_content("#watching") or ""


def wait_watching(pg: Any, n: int) -> None:
    pg.wait_for_function(
        "(n) => document.getElementById('watching').textContent === `${n} watching`", arg=n, timeout=WAIT_MS
    )


def test_comments_page_shows_who_is_watching_across_two_gateways(browser: Any) -> None:
    room = "watchers"
    with processes() as procs:
        gateways = start_cluster(procs, gateways=2, routers=2)
        contexts, pages = [], []
        try:
            for i in range(3):
                context = browser.new_context(viewport={"width": 1280, "height": 800})
                context.set_default_timeout(WAIT_MS)
                pg = context.new_page()
                gw = gateways[i % 2]  # two pages on one gateway, one on the other
                pg.goto(f"{gw.http}/comments.html?room={room}&gateways={gw.ws}&{CALM}")
                contexts.append(context)
                pages.append(pg)
            for pg in pages:
                wait_watching(pg, 3)
            screenshot(pages[0], "comments-watching.png")
            contexts.pop().close()  # the third page goes away
            for pg in pages[:2]:
                wait_watching(pg, 2)
            assert [watching(pg) for pg in pages[:2]] == ["2 watching", "2 watching"]
            assert all(demo(pg, "d.watching") == 2 for pg in pages[:2])
        finally:
            for context in contexts:
                context.close()


# --- tokens that refresh themselves -----------------------------------------------------

SECRET = "browser-refresh-secret-of-at-least-32-bytes"
TOKEN_LIFE = 3.0
WINDOW = 20.0


@contextmanager
def token_endpoint(origin: str) -> Iterator[dict[str, Any]]:
    """An app's token endpoint: a fresh HS256 token for the signed-in viewer, valid
    TOKEN_LIFE seconds, readable by the page's origin (CORS with credentials)."""
    served: dict[str, Any] = {"count": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            served["count"] += 1
            body = jwt.encode({"sub": "viewer", "exp": time.time() + TOKEN_LIFE}, SECRET, algorithm="HS256").encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("access-control-allow-origin", origin)
            self.send_header("access-control-allow-credentials", "true")
            self.send_header("cache-control", "no-store")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    served["url"] = f"http://127.0.0.1:{server.server_address[1]}/token"
    try:
        yield served
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_three_second_tokens_over_20_seconds_keep_the_page_subscribed_and_lose_nothing(page: Any) -> None:
    topic = "comments.refresh"
    with processes() as procs:
        gw = start_standalone(procs, ("--jwt-secret", SECRET, "--anonymous", "deny"))
        feed_token = jwt.encode({"sub": "feed", "exp": time.time() + 600}, SECRET, algorithm="HS256")
        with token_endpoint(gw.http) as tokens, peer(f"{gw.ws}?token={feed_token}") as other:
            page.goto(f"{gw.http}/comments.html?room=refresh&tokenUrl={tokens['url']}&{CALM}")
            wait_demo(page, "d.client.state === 'connected' && d.client.getSubscription(d.topic)?.state === 'subscribed'")
            # The observation window: comments keep coming while tokens expire and are replaced.
            sent = 0
            end = time.monotonic() + WINDOW
            while time.monotonic() < end:
                sent = other.publish(topic, {"nick": "feed", "text": f"comment {sent + 1}"})
                time.sleep(0.25)  # the feed's pace, not a wait for anything
            wait_demo(page, "d.seqs.length >= arg", sent)
            served = tokens["count"]
        log, seqs, connects = demo(page, "d.log"), demo(page, "d.seqs"), demo(page, "d.client.stats.connects")
        assert page.text_content("#substate") == "subscribed"
    assert seqs == list(range(1, sent + 1))  # every comment, once, in order
    assert [e for e in log if e["event"] == "disconnected"] == []
    assert connects == 1
    states = [(e["previous"], e["state"]) for e in log if e["event"] == "sub-state"]
    assert states == [("unsubscribed", "subscribing"), ("subscribing", "subscribed")]  # never left subscribed
    refreshes = [e for e in log if e["event"] == "refreshed"]
    # A 3-second token is refreshed after 2 seconds: about ten in 20 seconds.
    assert len(refreshes) >= int(WINDOW / TOKEN_LIFE), refreshes
    assert served >= len(refreshes) + 1  # the first token, then one per refresh
