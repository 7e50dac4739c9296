"""Replicated topic streams with real processes and real signals (issue 12).

Three routers (two copies of every stream) and two gateways carry continuous
acknowledged publications to 20 topics while routers are killed (SIGKILL),
restarted, and stopped one after the other (SIGTERM, a rolling upgrade). A
subscriber on each gateway checks, per topic, that the stream never changes epoch,
never skips or repeats a seq, and that every acknowledged publication arrives exactly
once. The publisher retries every publication answered ``unavailable`` or
``outcome_unknown`` with its ``idem`` key, as the clients do.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
import trio

from tests.support import CLUSTER_SECRET, DEADLINE, LocalCluster, ws_connect

pytestmark = pytest.mark.trio

TOPICS = [f"rep.t{i}" for i in range(20)]


class Subscriber:
    """Follows every topic and records what it sees; fails on any break of the stream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.epochs: dict[str, str] = {}
        self.seqs: dict[str, int] = {}
        self.payloads: dict[str, list[Any]] = defaultdict(list)
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


class Publisher:
    """Publishes round-robin with ids and idem keys; retries what is unavailable or unknown."""

    def __init__(self) -> None:
        self.acked: dict[str, dict[int, Any]] = defaultdict(dict)  # topic -> seq -> payload
        self.refused = 0
        self.unknown = 0
        self.longest_wait = 0.0  # seconds the longest publication took to be acknowledged
        self.count = 0

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


async def wait_for(pred, what: str, timeout: float = DEADLINE) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


async def settle(publisher: Publisher, more: int) -> None:
    """Let ``more`` publications be acknowledged (the cluster carries traffic again)."""
    target = publisher.count + more
    await wait_for(lambda: publisher.count >= target, f"{more} more publications")




async def test_no_router_loss_or_restart_changes_a_stream():
    cluster = LocalCluster(gateways=2, routers=3, secret=CLUSTER_SECRET)
    with cluster:
        subs = [Subscriber("gw0"), Subscriber("gw1")]
        publisher = Publisher()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for sub, gw in zip(subs, cluster.gateways):
                started = trio.Event()
                nursery.start_soon(sub.run, gw.url, started)
                await started.wait()
            nursery.start_soon(publisher.run, cluster.gateways[1].url, stop)
            await settle(publisher, 200)
            # A crash: SIGKILL, and back 2 s later.
            cluster.kill("router-0")
            await settle(publisher, 200)
            await trio.to_thread.run_sync(cluster.restart, "router-0")
            await wait_for(lambda: cluster["router-0"].ready(), "router-0 ready again")
            await settle(publisher, 200)
            # A rolling upgrade: every router in turn, SIGTERM then start.
            for r in cluster.routers:
                await trio.to_thread.run_sync(cluster.restart, r.name)
                await wait_for(lambda: r.ready(), f"{r.name} ready again")
                await settle(publisher, 150)
            stop.set()
            await trio.sleep(0)  # the publisher sees stop after its current publication
            last = {t: max(s) for t, s in publisher.acked.items()}
            for sub in subs:
                await wait_for(lambda: all(sub.seqs.get(t, 0) >= s for t, s in last.items()), f"{sub.name} caught up")
            nursery.cancel_scope.cancel()
        print(f"publications {publisher.count}, refused {publisher.refused}, unknown {publisher.unknown}, "
              f"longest wait {publisher.longest_wait:.2f} s")
        for sub in subs:
            assert not sub.problems, sub.problems[:10]
            for topic, acked in publisher.acked.items():
                got = sub.payloads[topic]
                # Every acknowledged publication exactly once, in seq order.
                assert [acked[s] for s in sorted(acked)] == got[: len(acked)], topic
                assert len(got) == len(acked), (topic, len(got), len(acked))
