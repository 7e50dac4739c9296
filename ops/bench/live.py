"""Live-feed benchmarks: ``fanroute bench conflation`` and ``fanroute bench presence``.

* ``conflation`` — a price feed (``--symbols`` topics in a ``conflate = true``
  namespace, ``--rate`` updates per second each, published in batches over the HTTP
  API) to ``--subscribers`` connections, each subscribed to every symbol, over
  ``--gateways`` gateways (one by default; subscriber i on gateway i mod N);
  ``--stalled`` of them (so spread the same way) stop reading for ``--stall``
  seconds (they keep sending application pings, as a frozen tab's heartbeat would).
  Reported: slow consumer closes (must be 0), each gateway's resident memory before,
  during and after the stall (must stay flat: each within the bound its own stalled
  subscribers allow), the messages conflated, how long each stalled subscriber takes
  after reading again to hold the newest price of every symbol (goal: 1 s), and
  whether every ``skipped`` it was sent accounts exactly for what it missed. The
  feed's cost grows with subscribers × publications, so the issue's shape (5 million
  messages a second) takes several gateways, and ``--client-procs`` processes to
  read what the subscribers that keep reading are sent.
* ``presence`` — ``--subscribers`` connections over 2 gateways join one topic and
  then leave it at ``--rate`` per second, while one watcher per gateway
  (``presence: true``) records the counts it is pushed. Reported: the largest lag
  between the true count and the pushed one (goal: 2 s), when each watcher settles
  on the final count, and the CPU time the gateways and routers spend per join and
  leave, beside the same churn on a topic nobody watches (the reference: counting
  alone, no pushes).

Both start their cluster through :class:`fanroute.localcluster.LocalCluster`, are
bounded in count and time, and drive the clients from one trio process over raw
sockets (:class:`RawClient`). That is cheaper than the servers measured, but not by
much on a fast feed (0.7 µs to split off a frame against a gateway's 0.9 µs to write
it), so the conflation feed's readers can move to processes of their own. Each
report ends with ``goals``: every criterion above, met or not. The conflation feed's
offered rate is one of them: when the gateways cannot take it, the publisher sends
back to back and ``publications_per_s`` gives the rate achieved.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import socket
import tempfile
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
import trio

from fanroute import localcluster
from fanroute.bench.loadgen import client_frame, cpu_seconds, emit_report, expect, machine, split_frames
from fanroute.config import ConfigError

API_KEY = "bench-live-api-key"
STALLED_RCVBUF = 4096  # SO_RCVBUF of a subscriber that will stall, until it reads again
RESUMED_RCVBUF = 256 * 1024  # and once it does (the kernel doubles both)
IDLE_S = 2.0  # presence: seconds without churn that measure the servers' idle CPU
_NAMESPACES = """
allow_unknown_namespaces = true

[namespaces.px]
conflate = true
"""


class Closed(Exception):
    """The server closed the connection; ``code`` is its close code (1006 if none)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class RawClient:
    """A WebSocket client over a trio socket: JSON commands out, frames in."""

    def __init__(self, stream: trio.SocketStream, rest: bytes) -> None:
        self.stream = stream
        self.buf = bytearray(rest)
        # A pong sent by the task reading and a command sent by another must not
        # interleave (trio raises BusyResourceError on two concurrent send_all).
        self.sending = trio.Lock()

    @classmethod
    async def connect(cls, host: str, port: int, rcvbuf: int | None = None) -> RawClient:
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all(
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(65536)
            if not data:
                raise Closed(1006)
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise Closed(1006)
        return cls(stream, rest)

    async def send(self, obj: dict[str, Any]) -> None:
        async with self.sending:
            await self.stream.send_all(client_frame(json.dumps(obj).encode()))

    async def receive(self, parse: bool = True) -> list[dict[str, Any]]:
        """The messages of the next read (empty if only control frames came)."""
        data = await self.stream.receive_some(1 << 18)
        if not data:
            raise Closed(1006)
        self.buf += data
        frames, pos = split_frames(self.buf)
        out = []
        for opcode, start, end in frames:
            if opcode == 0x8:
                code = int.from_bytes(self.buf[start : start + 2], "big") if end - start >= 2 else 1005
                raise Closed(code)
            if opcode == 0x9:
                # Shielded: a pong cut off by a caller's timeout would corrupt the stream.
                with trio.CancelScope(shield=True):
                    async with self.sending:
                        await self.stream.send_all(client_frame(bytes(self.buf[start:end]), 0xA))
            elif opcode == 0x1 and parse:
                # orjson: about 0.7 µs a message where json takes 4.4, which matters
                # for the stalled subscribers reading a full feed in this one process.
                out.append(orjson.loads(self.buf[start:end]))
        del self.buf[:pos]
        return out

    async def expect(self, kind: str) -> dict[str, Any]:
        while True:
            for msg in await self.receive():
                if msg.get("type") == kind:
                    return msg
                if msg.get("type") == "error":
                    raise RuntimeError(f"the gateway answered {msg}")

    async def aclose(self) -> None:
        await self.stream.aclose()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _publish_batch(admin: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    body = json.dumps({"items": items}).encode()
    req = urllib.request.Request(
        f"{admin}/api/publish", data=body, headers={"X-API-Key": API_KEY, "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["results"]


def _cluster(gateways: int, routers: int, logdir: Path, extra: list[str]) -> localcluster.LocalCluster:
    config = logdir / "namespaces.toml"
    config.write_text(_NAMESPACES)
    cluster = localcluster.LocalCluster(
        gateways,
        routers,
        gateway_args=["--config", str(config), "--max-subscriptions", "10000", *extra],
        env={"FANROUTE_LOG_LEVEL": "warning", "FANROUTE_API_KEY": API_KEY},
        clean_env=True,
        logdir=logdir,
        stop_timeout=3.0,
    )
    try:
        cluster.start()
        cluster.wait_ready(120)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    return host, int(port)


# --- conflation ---------------------------------------------------------------------------


async def _subscribe_all(c: RawClient, symbols: list[str]) -> None:
    """Subscribe ``c`` to every symbol and wait for each ``subscribed``, so that the
    feed starts only once every subscriber would be sent all of it."""
    for j, sym in enumerate(symbols):
        await c.send({"type": "subscribe", "topic": sym, "id": j + 1})
    got = 0
    while got < len(symbols):
        got += sum(1 for m in await c.receive() if m.get("type") == "subscribed")


def _reader_process(endpoints: list[tuple[str, int]], symbols: list[str], pipe: Connection) -> None:
    """A process of subscribers that keep reading (``--client-procs``): each endpoint
    is one subscriber's gateway. Reports ``("ready",)`` once all are subscribed, then
    reads until told ``("stop",)`` and reports ``("done", closes)``.

    At the issue's shape the subscribers that keep reading are sent 5 million messages
    a second; splitting their frames costs about 0.7 µs each in Python, so one process
    reads at most about a million a second, and a subscriber that falls behind would
    be conflated, which the bench means to see only for the stalled ones.
    """
    try:
        trio.run(_readers, endpoints, symbols, pipe)
    except BaseException as exc:  # reported, so the bench stops with the reason
        try:
            pipe.send(("error", repr(exc)))
        except OSError:
            pass


async def _readers(endpoints: list[tuple[str, int]], symbols: list[str], pipe: Connection) -> None:
    closes: dict[int, int] = {}
    subscribed = [0]
    all_subscribed = trio.Event()

    async def reader(host: str, port: int) -> None:
        # As in the bench's process, a subscriber refused before it is subscribed
        # stops the run (here through the "error" report).
        c = await RawClient.connect(host, port)
        await _subscribe_all(c, symbols)
        subscribed[0] += 1
        if subscribed[0] == len(endpoints):
            all_subscribed.set()
        try:
            while True:
                await c.receive(parse=False)
        except Closed as closed:
            closes[closed.code] = closes.get(closed.code, 0) + 1
        finally:
            await c.aclose()

    async with trio.open_nursery() as nursery:
        for host, port in endpoints:
            nursery.start_soon(reader, host, port)
        with trio.fail_after(120):
            await all_subscribed.wait()
        pipe.send(("ready",))
        try:
            await trio.to_thread.run_sync(pipe.recv, abandon_on_cancel=True)  # ("stop",)
        except EOFError:  # the bench is gone
            pass
        nursery.cancel_scope.cancel()
    pipe.send(("done", closes))


class _ReaderProcesses:
    """The ``--client-procs`` processes and their pipes; :meth:`close` ends them all."""

    def __init__(self, shares: list[list[tuple[str, int]]], symbols: list[str]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        try:
            for share in shares:
                here, there = ctx.Pipe()
                proc = ctx.Process(target=_reader_process, args=(share, symbols, there), daemon=True)
                proc.start()
                there.close()
                self.pipes.append(here)
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def wait_ready(self, timeout: float) -> None:
        for pipe in self.pipes:
            expect(pipe, "ready", timeout, RuntimeError, "a subscriber process")

    def stop(self, timeout: float) -> dict[int, int]:
        """Stop reading; the closes the subscribers saw, by code."""
        closes: dict[int, int] = {}
        for pipe in self.pipes:
            pipe.send(("stop",))
        for pipe in self.pipes:
            for code, n in expect(pipe, "done", timeout, RuntimeError, "a subscriber process")[1].items():
                closes[code] = closes.get(code, 0) + n
        return closes

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


def _mb(n: float) -> float:
    return round(n / 2**20, 1)


async def _conflation(s: argparse.Namespace, cluster: localcluster.LocalCluster, say: Any) -> dict[str, Any]:
    gws = cluster.gateways
    endpoints = [_host_port(g.url) for g in gws]
    # Subscriber i connects to gateway i mod N, and subscribers 0 .. stalled-1 stall:
    # each gateway gets its share of both, so each pays only for its own.
    home = [i % len(gws) for i in range(s.subscribers)]
    subscribers_on = [home.count(g) for g in range(len(gws))]
    stalled_on = [home[: s.stalled].count(g) for g in range(len(gws))]
    # The subscribers that keep reading run here, or spread over --client-procs processes.
    readers = list(range(s.stalled, s.subscribers))
    local = list(range(s.subscribers)) if not s.client_procs else list(range(s.stalled))
    shares = [[endpoints[home[i]] for i in readers[k :: s.client_procs]] for k in range(s.client_procs)]
    shares = [share for share in shares if share]
    symbols = [f"px.S{i}" for i in range(s.symbols)]
    closes: dict[int, int] = {}
    newest: dict[str, int] = {}  # symbol -> newest seq acknowledged by the API
    published = {"ok": 0, "errors": 0, "first": 0.0, "last": 0.0}  # what the API acknowledged
    batches = [0] * len(gws)  # publish batches sent through each gateway's API
    rss: list[tuple[float, list[int]]] = []  # (time, each gateway's RSS)
    stalled_results: dict[int, dict[str, Any]] = {}
    phase = {"stall": trio.Event(), "resume": trio.Event(), "done": trio.Event(), "published": trio.Event()}
    t0 = time.monotonic()

    async def subscriber(i: int, stalls: bool, ready: trio.Semaphore) -> None:
        # A stalled subscriber's tiny receive buffer makes its stall fill the gateway's
        # buffer (what conflation watches) rather than the kernel's.
        c = await RawClient.connect(*endpoints[home[i]], rcvbuf=STALLED_RCVBUF if stalls else None)
        await _subscribe_all(c, symbols)
        ready.release()
        last: dict[str, int] = {}
        try:
            if not stalls:
                while True:
                    await c.receive(parse=False)
            while not phase["stall"].is_set():
                with trio.move_on_after(0.2):
                    for m in await c.receive():
                        if "seq" in m and m.get("type") != "subscribed":
                            last[m["topic"]] = m["seq"]
            # Stop reading; keep pinging so the gateway's heartbeat sees a live client.
            while not phase["resume"].is_set():
                await c.send({"type": "ping", "ts": 0})
                with trio.move_on_after(2.0):
                    await phase["resume"].wait()
            resumed = time.monotonic()
            target = dict(newest)
            # Reading again, it reads as a client normally does: with the 4 KiB buffer
            # it took about 25 reads, each waiting its turn among 500 busy subscribers
            # in this one process, to get through what the kernel and the gateway held.
            c.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RESUMED_RCVBUF)
            state = stalled_results[i] = {"caught_up_s": None, "skipped": 0, "violations": 0}
            while True:
                for m in await c.receive():
                    if m.get("type") is not None:
                        continue
                    t, seq, k = m["topic"], m["seq"], m.get("skipped", 0)
                    state["skipped"] += k
                    if t in last and seq - k - 1 != last[t]:
                        state["violations"] += 1
                    last[t] = seq
                if state["caught_up_s"] is None and all(last.get(x, 0) >= target.get(x, 0) for x in symbols):
                    state["caught_up_s"] = time.monotonic() - resumed
        except Closed as closed:
            closes[closed.code] = closes.get(closed.code, 0) + 1
        finally:
            await c.aclose()

    async def publisher() -> None:
        # One batch at a time, each through the next gateway's API in turn: taking
        # the feed costs a gateway parsing and forwarding it, which spread evenly
        # leaves every gateway the same work, so their figures compare. Each batch
        # is answered before the next goes, so the seqs acknowledged come in order.
        seq_tick = 0
        interval = 1.0 / s.ticks
        per_tick = max(1, round(s.rate / s.ticks))
        pad = "x" * s.payload
        start = trio.current_time()
        try:
            while not phase["done"].is_set():
                via = seq_tick % len(gws)
                seq_tick += 1
                items = [
                    {"topic": sym, "payload": {"sym": sym, "price": seq_tick, "pad": pad}}
                    for _ in range(per_tick)
                    for sym in symbols
                ]
                sent_at = time.monotonic()
                results = await trio.to_thread.run_sync(_publish_batch, gws[via].admin, items)
                batches[via] += 1
                if not published["first"]:
                    published["first"] = sent_at
                published["last"] = time.monotonic()
                for r in results:
                    if "seq" in r:
                        newest[r["topic"]] = max(newest.get(r["topic"], 0), r["seq"])
                        published["ok"] += 1
                    else:
                        published["errors"] += 1
                await trio.sleep_until(start + seq_tick * interval)
        finally:
            phase["published"].set()

    async def sampler() -> None:
        while not phase["done"].is_set():
            rss.append((time.monotonic() - t0, [rss_bytes(g.pid) for g in gws]))
            await trio.sleep(0.5)

    def all_rss() -> list[int]:
        return [rss_bytes(g.pid) for g in gws]

    def all_metrics() -> list[str]:
        return [g.metrics(timeout=5.0) for g in gws]

    def cpu() -> dict[str, Any]:
        return {
            "gateways": [cpu_seconds(g.pid) for g in gws],
            "routers": sum(cpu_seconds(r.pid) for r in cluster.routers),
            # This process and the --client-procs ones: the subscribers and the publisher.
            "bench": time.process_time() + sum(cpu_seconds(pid) for pid in procs.pids()),
        }

    procs = await trio.to_thread.run_sync(_ReaderProcesses, shares, symbols)
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Semaphore(len(local), max_value=max(1, len(local)))
            for _ in local:
                await ready.acquire()
            for i in local:
                nursery.start_soon(subscriber, i, i < s.stalled, ready)
            with trio.fail_after(120):
                for _ in local:
                    await ready.acquire()
            await trio.to_thread.run_sync(procs.wait_ready, 120.0)
            say(f"{s.subscribers} subscribers on {len(symbols)} symbols over {len(gws)} gateway(s)")
            texts0 = await trio.to_thread.run_sync(all_metrics)
            cpu0, wall0 = cpu(), time.monotonic()
            nursery.start_soon(sampler)
            nursery.start_soon(publisher)
            await trio.sleep(s.warmup)
            rss_before = all_rss()
            t_stall = time.monotonic() - t0
            phase["stall"].set()
            say(f"{s.stalled} subscribers stop reading for {s.stall:g} s")
            await trio.sleep(s.stall)
            rss_stalled = all_rss()
            t_resume = time.monotonic() - t0
            phase["resume"].set()
            with trio.move_on_after(s.stall + 30):
                while sum(r["caught_up_s"] is not None for r in stalled_results.values()) + sum(closes.values()) < s.stalled:
                    await trio.sleep(0.1)
            await trio.sleep(s.after)
            rss_after = all_rss()
            cpu1, wall = cpu(), time.monotonic() - wall0
            phase["done"].set()
            with trio.move_on_after(15):
                await phase["published"].wait()
            # A router sends each gateway a publication as it acknowledges it, each
            # over its own link: wait (bounded) until every gateway has received what
            # was acknowledged, so that its counters are of the same feed.
            texts = await trio.to_thread.run_sync(all_metrics)
            with trio.move_on_after(10):
                while any(
                    localcluster.metric(t1, "fanroute_gateway_deliveries_received_total", default=0.0)
                    - localcluster.metric(t, "fanroute_gateway_deliveries_received_total", default=0.0)
                    < published["ok"]
                    for t, t1 in zip(texts0, texts)
                ):
                    await trio.sleep(0.1)
                    texts = await trio.to_thread.run_sync(all_metrics)
            for code, n in (await trio.to_thread.run_sync(procs.stop, 30.0)).items():
                closes[code] = closes.get(code, 0) + n
            nursery.cancel_scope.cancel()
    finally:
        procs.close()

    def counted(g: int, name: str, labels: str | None = None) -> float:
        """How much a counter of gateway ``g`` grew while the feed ran."""
        return localcluster.metric(texts[g], name, labels, default=0.0) - localcluster.metric(texts0[g], name, labels, default=0.0)

    spent = {"gateways": [b - a for a, b in zip(cpu0["gateways"], cpu1["gateways"])]}
    spent.update({k: cpu1[k] - cpu0[k] for k in ("routers", "bench")})
    per_gateway = []
    for g in range(len(gws)):
        during = [b[g] for t, b in rss if t_stall <= t <= t_resume]
        growth = max(during or [rss_before[g]]) - rss_before[g]
        # What conflation bounds this gateway's stalled subscribers to: each one's
        # buffer up to the threshold plus one held message per symbol (counted at a
        # generous 1 KiB), and 4 MiB for the allocator's own growth.
        bound = stalled_on[g] * (s.threshold + s.symbols * 1024) + 4 * 2**20
        written = counted(g, "fanroute_gateway_messages_out_total")
        conflated = counted(g, "fanroute_gateway_conflated_total")
        per_gateway.append({
            "subscribers": subscribers_on[g],
            "stalled": stalled_on[g],
            "publish_batches": batches[g],
            "received": counted(g, "fanroute_gateway_deliveries_received_total"),
            "written": written,
            "conflated": conflated,
            "slow_consumer_closes": max(
                counted(g, "fanroute_gateway_slow_consumer_closes_total"),
                counted(g, "fanroute_gateway_connections_closed_total", 'code="4008"'),
            ),
            "rss_mb": {
                "before_stall": _mb(rss_before[g]),
                "peak_during_stall": _mb(max(during or [0])),
                "end_of_stall": _mb(rss_stalled[g]),
                "after": _mb(rss_after[g]),
                "growth_during_stall": _mb(growth),
                "conflation_bound": _mb(bound),
            },
            "memory_flat": growth <= bound,
            "cpu_s": round(spent["gateways"][g], 2),
            "cpu_us_per_subscriber_message": round(spent["gateways"][g] / max(1.0, written + conflated) * 1e6, 3),
        })

    caught = sorted(r["caught_up_s"] for r in stalled_results.values() if r["caught_up_s"] is not None)
    # The gateways' RSS summed at each sample; per gateway in per_gateway.
    during_all = [sum(b) for t, b in rss if t_stall <= t <= t_resume]
    growth_all = max(during_all or [sum(rss_before)]) - sum(rss_before)
    offered = s.symbols * max(1, round(s.rate / s.ticks)) * s.ticks
    achieved = published["ok"] / max(1e-9, published["last"] - published["first"])
    slow_closes = sum(g["slow_consumer_closes"] for g in per_gateway)
    messages_out = sum(g["written"] for g in per_gateway)
    conflated = sum(g["conflated"] for g in per_gateway)
    gateway_cpu = sum(spent["gateways"])
    skipped_violations = sum(r["violations"] for r in stalled_results.values())
    return {
        "subscribers": s.subscribers,
        "stalled": s.stalled,
        "symbols": s.symbols,
        "rate_per_symbol": s.rate,
        "gateways": len(gws),
        "routers": len(cluster.routers),
        "client_procs": len(shares),
        "publications_per_s": {
            "offered": offered,
            # Acknowledged by the API, first request to last answer: below the offered
            # rate when the gateways cannot take it (the publisher then sends back to back).
            "achieved": round(achieved),
            "acknowledged": published["ok"],
            "errors": published["errors"],
        },
        # Summed over the gateways: each receives every publication once.
        "gateway_messages": {
            "received": sum(g["received"] for g in per_gateway),
            "written": messages_out,
            "conflated": conflated,
        },
        "client_closes": closes,
        "slow_consumer_closes": slow_closes,
        "conflated": conflated,
        # The gateways' RSS summed (one gateway: its own), beside the sum of their
        # bounds; the goal is judged on each gateway against its own bound.
        "rss_mb": {
            "before_stall": _mb(sum(rss_before)),
            "peak_during_stall": _mb(max(during_all or [0])),
            "end_of_stall": _mb(sum(rss_stalled)),
            "after": _mb(sum(rss_after)),
            "growth_during_stall": _mb(growth_all),
            "conflation_bound": _mb(sum(
                stalled_on[g] * (s.threshold + s.symbols * 1024) + 4 * 2**20 for g in range(len(gws))
            )),
        },
        "per_gateway": per_gateway,
        "caught_up_s": {
            "stalled_measured": len(caught),
            "p50": round(caught[len(caught) // 2], 3) if caught else None,
            "max": round(caught[-1], 3) if caught else None,
        },
        "skipped_violations": skipped_violations,
        "skipped_total": sum(r["skipped"] for r in stalled_results.values()),
        # CPU seconds over the feed (warm-up to the end), summed over every gateway;
        # the bench's processes run every subscriber, so on a small machine they
        # compete with the gateways.
        "cpu": {
            "wall_s": round(wall, 2),
            "gateway_s": round(gateway_cpu, 2),
            "routers_s": round(spent["routers"], 2),
            "bench_s": round(spent["bench"], 2),
            "gateway_us_per_subscriber_message": round(gateway_cpu / max(1.0, messages_out + conflated) * 1e6, 3),
        },
        "goals": {
            "no_slow_consumer_close": slow_closes == 0 and not closes,
            "memory_flat": all(g["memory_flat"] for g in per_gateway),
            "newest_within_1s": len(caught) == s.stalled and bool(caught) and caught[-1] <= 1.0,
            "skipped_exact": skipped_violations == 0,
            "offered_rate_reached": published["errors"] == 0 and achieved >= 0.95 * offered,
        },
    }


# --- presence ------------------------------------------------------------------------------


async def _presence(s: argparse.Namespace, cluster: localcluster.LocalCluster, say: Any) -> dict[str, Any]:
    gws = [_host_port(g.url) for g in cluster.gateways]
    procs = [*cluster.gateways, *cluster.routers]
    pushes: dict[int, list[tuple[float, int]]] = {0: [], 1: []}
    truth: list[tuple[float, int]] = [(0.0, 0)]
    t0 = time.monotonic()

    clients: list[RawClient] = []
    with trio.fail_after(300):
        for i in range(s.subscribers):
            clients.append(await RawClient.connect(*gws[i % len(gws)]))
            if i % 500 == 499:
                say(f"{i + 1} connected")

    async def watcher(i: int, topic: str) -> None:
        c = await RawClient.connect(*gws[i])
        await c.send({"type": "subscribe", "topic": topic, "id": 1, "presence": True})
        while True:
            for m in await c.receive():
                if m.get("type") == "presence":
                    pushes[i].append((time.monotonic() - t0, m["subscribers"]))

    async def drain(c: RawClient) -> None:
        while True:
            await c.receive(parse=False)

    def cpu() -> float:
        return sum(cpu_seconds(p.pid) for p in procs)

    def cpu_gateways() -> float:
        return sum(cpu_seconds(g.pid) for g in cluster.gateways)

    async def churn(topic: str, watched: bool) -> dict[str, Any]:
        for i in pushes:
            pushes[i] = []
        # The watchers are subscribers too: they are in the count from the start.
        truth[:] = [(time.monotonic() - t0, len(gws) if watched else 0)]
        async with trio.open_nursery() as nursery:
            for c in clients:
                nursery.start_soon(drain, c)
            if watched:
                for i in range(len(gws)):
                    nursery.start_soon(watcher, i, topic)
                with trio.fail_after(30):
                    while not all(pushes[i] and pushes[i][-1][1] == len(gws) for i in range(len(gws))):
                        await trio.sleep(0.05)
                for i in pushes:
                    pushes[i] = []
                truth[:] = [(time.monotonic() - t0, len(gws))]
            interval = 1.0 / s.rate
            results = {}
            c0, g0, w0 = cpu(), cpu_gateways(), time.monotonic()
            await trio.sleep(IDLE_S)
            # Ticks and heartbeats, subtracted below.
            idle_per_s = (cpu() - c0) / (time.monotonic() - w0)
            idle_gw_per_s = (cpu_gateways() - g0) / (time.monotonic() - w0)
            for kind, delta in (("subscribe", 1), ("unsubscribe", -1)):
                c0, g0, w0 = cpu(), cpu_gateways(), time.monotonic()
                start = trio.current_time()
                for n, c in enumerate(clients):
                    # Recorded before sending: the count may be pushed before send returns.
                    truth.append((time.monotonic() - t0, truth[-1][1] + delta))
                    await c.send({"type": kind, "topic": topic})
                    await trio.sleep_until(start + (n + 1) * interval)
                last_change = truth[-1][0]
                sending = time.monotonic() - w0
                expected = truth[-1][1]
                settle = {}
                with trio.move_on_after(30):
                    while watched and len(settle) < len(gws):
                        for i in range(len(gws)):
                            if i not in settle and pushes[i] and pushes[i][-1][1] == expected:
                                settle[i] = round(pushes[i][-1][0] - last_change, 3)
                        await trio.sleep(0.05)
                await trio.sleep(1.0)
                elapsed = time.monotonic() - w0
                spent = cpu() - c0 - idle_per_s * elapsed
                spent_gw = cpu_gateways() - g0 - idle_gw_per_s * elapsed
                results[kind] = {
                    "changes": len(clients),
                    "seconds": round(elapsed, 2),
                    "changes_per_s": round(len(clients) / sending),  # as sent: the goal is --rate
                    "cpu_us_per_change": round(spent / len(clients) * 1e6, 1),
                    "gateways_cpu_us_per_change": round(spent_gw / len(clients) * 1e6, 1),
                    "routers_cpu_us_per_change": round((spent - spent_gw) / len(clients) * 1e6, 1),
                    "settled_after_last_change_s": settle if watched else None,
                }
            nursery.cancel_scope.cancel()
        out: dict[str, Any] = {"results": results, "pushes": {i: len(v) for i, v in pushes.items()}}
        if watched:
            out["max_lag_s"], out["wrong_counts"] = _lag(pushes, truth)
            settled = [r["settled_after_last_change_s"] for r in results.values()]
            out["unsettled"] = sum(len(gws) - len(x) for x in settled)
            out["max_settle_s"] = max((v for x in settled for v in x.values()), default=None)
        return out

    watched = await churn("live.watched", True)
    say("churn with watchers done")
    reference = await churn("live.unwatched", False)
    for c in clients:
        await c.aclose()
    lag, settle = watched["max_lag_s"], watched["max_settle_s"]
    return {
        "subscribers": s.subscribers,
        "rate": s.rate,
        "gateways": len(gws),
        "watched": watched,
        "reference_unwatched": reference,
        # Pushed counts that were never the true count, and watchers that never
        # settled on the final one: each is a wrong count.
        "violations": watched["wrong_counts"] + watched["unsettled"],
        "goals": {
            "count_right_within_2s": watched["wrong_counts"] == 0 and watched["unsettled"] == 0
            and lag <= 2.0 and settle is not None and settle <= 2.0,
        },
    }


def _lag(pushes: dict[int, list[tuple[float, int]]], truth: list[tuple[float, int]]) -> tuple[float, int]:
    """The longest time a pushed count trailed the true one, and how many pushes were
    of a count that was never true.

    For each push (t, v): if the true count at t is v, no lag; otherwise the lag is t
    minus the last moment before t at which the true count was v (none: a wrong count).
    """
    worst, wrong = 0.0, 0
    for series in pushes.values():
        for t, v in series:
            current = next((n for tt, n in reversed(truth) if tt <= t), 0)
            if current == v:
                continue
            at = next((tt for tt, n in reversed(truth) if tt <= t and n == v), None)
            if at is None:
                wrong += 1
            else:
                worst = max(worst, t - at)
    return round(worst, 3), wrong


# --- command line -------------------------------------------------------------------------


def _run(s: argparse.Namespace, which: str) -> dict[str, Any]:
    def say(text: str) -> None:
        if not s.json:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    host = machine()  # before the cluster starts: its load average is the one at the start
    with tempfile.TemporaryDirectory(prefix=f"fanroute-bench-{which}-") as tmp:
        logdir = Path(s.logs) if s.logs else Path(tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        gateways, routers = (s.gateways, s.routers) if which == "conflation" else (2, 2)
        extra = ["--conflate-threshold", str(s.threshold)] if which == "conflation" else []
        cluster = _cluster(gateways, routers, logdir, extra)
        try:
            say(f"cluster up: {gateways} gateway(s), {routers} router(s)")
            run = _conflation if which == "conflation" else _presence
            result = trio.run(_bounded, run, s, cluster, say)
        finally:
            cluster.stop()
    return {"bench": which, "machine": host, "settings": {k: v for k, v in vars(s).items() if isinstance(v, (int, float, str, bool)) and k not in ("save", "logs")}, "result": result}


async def _bounded(run: Any, s: argparse.Namespace, cluster: Any, say: Any) -> dict[str, Any]:
    with trio.fail_after(s.timeout):
        return await run(s, cluster, say)


def _check(s: argparse.Namespace) -> None:
    """Refuse a conflation shape the report could not describe: a gateway without
    subscribers would receive no feed, and more stalled than subscribers cannot be."""
    if s.bench != "conflation":
        return
    if s.gateways < 1 or s.routers < 1 or s.client_procs < 0:
        raise ConfigError("--gateways and --routers must be at least 1, --client-procs at least 0")
    if s.subscribers < s.gateways:
        raise ConfigError(f"--subscribers ({s.subscribers}) must be at least --gateways ({s.gateways}): each gateway needs one")
    if not 0 <= s.stalled <= s.subscribers:
        raise ConfigError(f"--stalled must be between 0 and --subscribers ({s.subscribers})")
    if s.symbols < 1 or s.rate <= 0 or s.ticks < 1:
        raise ConfigError("--symbols, --rate and --ticks must be positive")


def bench_main(args: argparse.Namespace) -> int:
    _check(args)
    report = _run(args, args.bench)

    def render() -> None:
        print(json.dumps(report["result"], indent=2))

    emit_report(report, args.save, args.json, render)
    return 0


def add_live_commands(subparsers: Any, flag: Any) -> None:
    """Add ``conflation`` and ``presence`` to a ``fanroute bench`` subparsers object."""
    p = subparsers.add_parser(
        "conflation",
        help="a price feed to subscribers of whom some stop reading: closes, memory, time to the newest prices",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flag(p, "--symbols", int, 100, "topics of the conflated namespace")
    flag(p, "--rate", float, 100.0, "updates per second of each symbol")
    flag(p, "--ticks", int, 10, "publish batches per second (each holds every symbol's updates of one tick)")
    flag(p, "--payload", int, 100, "padding bytes in each update")
    flag(p, "--subscribers", int, 500, "connections, each subscribed to every symbol")
    flag(p, "--stalled", int, 50, "subscribers that stop reading")
    flag(p, "--stall", float, 10.0, "seconds they stop reading for")
    flag(p, "--warmup", float, 3.0, "seconds of feed before the stall")
    flag(p, "--after", float, 3.0, "seconds of feed after the stalled ones caught up")
    flag(p, "--threshold", int, 64 * 1024, "the gateway's --conflate-threshold")
    flag(p, "--gateways", int, 1, "gateways of the local cluster; subscribers, stalled ones too, go to them in turn")
    flag(p, "--routers", int, 2, "routers of the local cluster")
    flag(p, "--client-procs", int, 0, "processes running the subscribers that keep reading (0: the bench's own)")
    _common(p, flag, "conflation")
    p = subparsers.add_parser(
        "presence",
        help="subscribers join and leave a topic over 2 gateways: count lag and CPU per join",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flag(p, "--subscribers", int, 5000, "connections that join, then leave, the topic")
    flag(p, "--rate", float, 500.0, "joins (then leaves) per second")
    _common(p, flag, "presence")


def _common(p: argparse.ArgumentParser, flag: Any, name: str) -> None:
    flag(p, "--timeout", float, 600.0, "most seconds the whole run may take")
    flag(p, "--logs", str, "", "directory to keep the cluster's process logs in (default: a temporary one, removed)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--save", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(bench_main=bench_main, bench=name)


if __name__ == "__main__":  # python -m fanroute.bench.live conflation|presence [flags]
    import sys

    def _flag(parser: argparse.ArgumentParser, name: str, type: Any, default: Any, help: str) -> None:
        parser.add_argument(name, type=type, default=default, help=f"{help} (default {default})")

    _parser = argparse.ArgumentParser(prog="python -m fanroute.bench.live")
    add_live_commands(_parser.add_subparsers(dest="bench", required=True), _flag)
    _args = _parser.parse_args()
    sys.exit(_args.bench_main(_args))
