"""Metrics operators can trust, on a live standalone gateway: build and process metrics,
gzip when the scraper asks for it, and a number of series that hostile clients cannot
grow (close codes, topics, user agents and command types of their choosing)."""

from __future__ import annotations

import gzip
import random
import string
import urllib.request

import orjson
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from fanroute.codes import CloseCode
from fanroute.metrics import version
from tests.support import DEADLINE, await_until, http_get, metric, start_standalone, urls


def scrape(admin: str, accept_encoding: str | None = None) -> tuple[dict[str, str], bytes]:
    headers = {} if accept_encoding is None else {"accept-encoding": accept_encoding}
    req = urllib.request.Request(admin + "/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=DEADLINE) as r:
        return {k.lower(): v for k, v in r.headers.items()}, r.read()


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every sample of an exposition, as (name, labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_build_info_and_process_metrics_are_exposed(nursery):
    _, admin = urls(await start_standalone(nursery))
    text = (await trio.to_thread.run_sync(http_get, admin + "/metrics"))[1]
    assert metric(text, "fanroute_build_info", f'version="{version()}"') == 1
    assert version() != "unknown"
    assert metric(text, "process_resident_memory_bytes") > 0
    assert metric(text, "process_open_fds") > 0
    assert metric(text, "process_cpu_seconds_total") > 0
    # One registry for the gateway and its shards: each family once.
    assert text.count("# TYPE fanroute_build_info ") == 1 and text.count("# TYPE process_open_fds ") == 1


async def test_metrics_are_gzipped_when_the_scraper_asks(nursery):
    _, admin = urls(await start_standalone(nursery))
    headers, body = await trio.to_thread.run_sync(scrape, admin, "gzip, deflate")
    assert headers.get("content-encoding") == "gzip" and "accept-encoding" in headers.get("vary", "")
    text = gzip.decompress(body).decode()
    assert "fanroute_gateway_connections" in text
    headers, plain = await trio.to_thread.run_sync(scrape, admin, None)
    assert "content-encoding" not in headers and b"fanroute_gateway_connections" in plain
    assert len(body) * 3 < len(plain)
    headers, _ = await trio.to_thread.run_sync(scrape, admin, "identity")
    assert "content-encoding" not in headers


def hostile(rng: random.Random, size: int = 24) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "._:-") for _ in range(size))


async def one_client(url: str, user_agent: str, topic: str, junk_type: str, close_code: int) -> None:
    """What a client may choose: its user agent, topics, command types and close code."""
    async with open_websocket_url(url, extra_headers=[(b"user-agent", user_agent.encode())]) as ws:
        await ws.send_message(orjson.dumps({"type": "subscribe", "topic": topic, "id": 1}).decode())
        await ws.send_message(orjson.dumps({"type": "publish", "topic": topic, "payload": 1, "id": 2}).decode())
        await ws.send_message(orjson.dumps({"type": junk_type, "topic": topic, "id": 3}).decode())
        await ws.send_message(orjson.dumps({"type": "subscribe", "topic": topic + " bad", "id": 4}).decode())
        got = set()
        with trio.fail_after(DEADLINE):
            while len(got) < 4:
                got.add(orjson.loads(await ws.get_message()).get("id"))
        await ws.aclose(close_code)


async def test_hostile_clients_add_no_series(nursery):
    bound = await start_standalone(nursery)
    url, admin = urls(bound)
    rng = random.Random(14)

    async def closed_all() -> None:
        def none_open() -> bool:
            return metric(http_get(admin + "/metrics")[1], "fanroute_gateway_connections") == 0

        await await_until(none_open, what="every connection closed")

    # One client of each kind first: every series their kinds of input can create
    # (the close codes fanroute knows are labels of their own; any other is "other").
    for code in (3000, 1000, 1001):
        await one_client(url, "warm-up", "warm.up", "nope", code)
    await closed_all()
    before_text = (await trio.to_thread.run_sync(http_get, admin + "/metrics"))[1]
    before = series(before_text)
    chosen: list[str] = []
    for i in range(150):
        agent, topic, kind = f"ua-{hostile(rng)}", f"t.{hostile(rng)}", hostile(rng, 12)
        invented = rng.choice([c for c in range(3000, 5000) if c not in set(CloseCode)])
        code = (invented, 1000, 1001)[i % 3]
        chosen += [agent, topic, kind]
        await one_client(url, agent, topic, kind, code)
    await closed_all()
    after_text = (await trio.to_thread.run_sync(http_get, admin + "/metrics"))[1]
    after = series(after_text)
    assert after == before, f"new series: {sorted(after - before)[:10]}"
    for value in chosen:
        assert value not in after_text
    assert metric(after_text, "fanroute_gateway_connections_closed_total", 'code="other"') >= 50
