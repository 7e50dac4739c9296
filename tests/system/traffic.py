"""Continuous acknowledged traffic for the replication and partition tests.

A :class:`Subscriber` follows every topic and records every break of a stream (an
epoch change, a skipped or repeated seq) and every payload it was given per
``(topic, epoch, seq)``; a :class:`Publisher` publishes round-robin with ids and
``idem`` keys, and retries what is answered ``unavailable`` or ``outcome_unknown``
with the same key, as the clients do. The test then checks that every acknowledged
publication reached every subscriber exactly once, in seq order.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import trio

from tests.support import DEADLINE, until, ws_connect

TOPICS = [f"rep.t{i}" for i in range(20)]


class Subscriber:
    """Follows every topic and records what it sees; fails on any break of the stream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.epochs: dict[str, str] = {}
        self.seqs: dict[str, int] = {}
        self.payloads: dict[str, list[Any]] = defaultdict(list)
        self.seen: dict[tuple[str, str, int], Any] = {}  # (topic, epoch, seq) -> payload
        self.problems: list[str] = []

    async def run(self, url: str, ready: trio.Event) -> None:
        async with ws_connect(url) as ws:
            for i, topic in enumerate(TOPICS):
                ok = await ws.subscribe(topic, id=i + 1)
                assert ok["type"] == "subscribed", ok
                self.epochs[topic], self.seqs[topic] = ok["epoch"], ok["seq"]
            ready.set()
            while True:
                msg = await ws.recv()
                topic = msg.get("topic")
                if msg.get("type") == "subscribed":  # unsolicited: the stream moved or restarted
                    if msg["epoch"] != self.epochs.get(topic) or not msg.get("recovered", True):
                        self.problems.append(f"{self.name}: epoch change on {topic}: {msg}")
                    self.epochs[topic], self.seqs[topic] = msg["epoch"], msg["seq"]
                elif "seq" in msg and "payload" in msg and msg.get("type") in (None, "message"):
                    expected = self.seqs[topic] + 1
                    if msg["seq"] != expected:
                        self.problems.append(f"{self.name}: {topic} seq {msg['seq']} after {self.seqs[topic]}")
                    self.seqs[topic] = msg["seq"]
                    self.payloads[topic].append(msg["payload"])
                    self.seen[(topic, self.epochs[topic], msg["seq"])] = msg["payload"]


class Publisher:
    """Publishes round-robin with ids and idem keys; retries what is unavailable or unknown."""

    def __init__(self) -> None:
        self.acked: dict[str, dict[int, Any]] = defaultdict(dict)  # topic -> seq -> payload
        self.refused = 0
        self.unknown = 0
        self.longest_wait = 0.0  # seconds the longest publication took to be acknowledged
        self.count = 0
        self.done = False

    async def run(self, url: str, stop: trio.Event) -> None:
        async with ws_connect(url) as ws:
            n = 0
            while not stop.is_set():
                topic = TOPICS[n % len(TOPICS)]
                payload = {"n": n}
                started = trio.current_time()
                while True:
                    await ws.send({"type": "publish", "topic": topic, "payload": payload, "id": n + 1, "idem": f"p-{n}"})
                    answer = await ws.recv()
                    while answer.get("id") != n + 1:
                        answer = await ws.recv()
                    if answer["type"] == "published":
                        seq = answer["seq"]
                        assert self.acked[topic].get(seq, payload) == payload, (topic, seq, payload)
                        self.acked[topic][seq] = payload
                        break
                    assert answer["type"] == "error" and answer["code"] in ("unavailable", "outcome_unknown"), answer
                    if answer["code"] == "unavailable":
                        self.refused += 1
                    else:
                        self.unknown += 1
                    await trio.sleep(0.05)  # the retry's pacing, as a client's backoff
                self.longest_wait = max(self.longest_wait, trio.current_time() - started)
                self.count += 1
                n += 1
                await trio.sleep(0.005)  # about 150 publications a second: pacing, not waiting
            self.done = True


async def settle(publisher: Publisher, more: int) -> None:
    """Let ``more`` publications be acknowledged (the cluster carries traffic again)."""
    target = publisher.count + more
    await until(lambda: publisher.count >= target, f"{more} more publications")






async def start(nursery: trio.Nursery, sub_urls: list[str], pub_url: str) -> tuple[Publisher, list[Subscriber], trio.Event]:
    """A subscriber on each of ``sub_urls`` (subscribed when this returns) and a publisher
    on ``pub_url``; set the returned event to stop publishing."""
    subs = [Subscriber(f"sub{i}") for i in range(len(sub_urls))]
    for sub, url in zip(subs, sub_urls):
        started = trio.Event()
        nursery.start_soon(sub.run, url, started)
        with trio.fail_after(DEADLINE):
            await started.wait()
    publisher, stop = Publisher(), trio.Event()
    nursery.start_soon(publisher.run, pub_url, stop)
    return publisher, subs, stop


async def finish(publisher: Publisher, subs: list[Subscriber], stop: trio.Event) -> None:
    """Stop publishing and wait until every subscriber has every acknowledged seq."""
    stop.set()
    count = publisher.count
    await until(lambda: publisher.count > count or publisher.done, "the last publication")
    last = {t: max(s) for t, s in publisher.acked.items()}
    for sub in subs:
        await until(lambda: all(sub.seqs.get(t, 0) >= s for t, s in last.items()), f"{sub.name} caught up")


def check_exactly_once(publisher: Publisher, subs: list[Subscriber]) -> None:
    """Every acknowledged publication reached every subscriber once, in seq order; no
    two payloads under one ``(topic, epoch, seq)`` anywhere."""
    for sub in subs:
        assert not sub.problems, sub.problems[:10]
        for topic, acked in publisher.acked.items():
            got = sub.payloads[topic]
            assert [acked[s] for s in sorted(acked)] == got[: len(acked)], topic
            assert len(got) == len(acked), (topic, len(got), len(acked))
    truth: dict[tuple[str, str, int], Any] = {}
    for sub in subs:
        for key, payload in sub.seen.items():
            assert truth.setdefault(key, payload) == payload, f"two truths at {key}: {truth[key]} and {payload}"
