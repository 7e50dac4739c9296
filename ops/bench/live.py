"""Live-feed benchmarks: ``fanroute bench conflation`` and ``fanroute bench presence``.

* ``conflation`` — a price feed (``--symbols`` topics in a ``conflate = true``
  namespace, ``--rate`` updates per second each, published in batches over the HTTP
  API) to ``--subscribers`` connections of one gateway, each subscribed to every
  symbol; ``--stalled`` of them stop reading for ``--stall`` seconds (they keep
  sending application pings, as a frozen tab's heartbeat would). Reported: slow
  consumer closes (must be 0), the gateway's resident memory before, during and after
  the stall (must stay flat), the messages conflated, how long each stalled subscriber
  takes after reading again to hold the newest price of every symbol (goal: 1 s), and
  whether every ``skipped`` it was sent accounts exactly for what it missed.
* ``presence`` — ``--subscribers`` connections over 2 gateways join one topic and
  then leave it at ``--rate`` per second, while one watcher per gateway
  (``presence: true``) records the counts it is pushed. Reported: the largest lag
  between the true count and the pushed one (goal: 2 s), when each watcher settles
  on the final count, and the CPU time the gateways and routers spend per join and
  leave, beside the same churn on a topic nobody watches (the reference: counting
  alone, no pushes).

Both start their cluster through :class:`fanroute.localcluster.LocalCluster`, are
bounded in count and time, and drive the clients from one trio process over raw
sockets (:class:`RawClient`), which costs far less than the servers measured. Each
report ends with ``goals``: every criterion above, met or not. The conflation feed's
offered rate is one of them: when the gateway cannot take it, the publisher sends
back to back and ``publications_per_s`` gives the rate achieved.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio

from fanroute import localcluster
from fanroute.bench.loadgen import client_frame, cpu_seconds, emit_report, machine, split_frames

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
                out.append(json.loads(self.buf[start:end]))
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


async def _conflation(s: argparse.Namespace, cluster: localcluster.LocalCluster, say: Any) -> dict[str, Any]:
    gw = cluster.gateways[0]
    host, port = _host_port(gw.url)
    symbols = [f"px.S{i}" for i in range(s.symbols)]
    closes: dict[int, int] = {}
    newest: dict[str, int] = {}  # symbol -> newest seq acknowledged by the API
    published = {"ok": 0, "errors": 0, "first": 0.0, "last": 0.0}  # what the API acknowledged
    rss: list[tuple[float, int]] = []
    stalled_results: dict[int, dict[str, Any]] = {}
    phase = {"stall": trio.Event(), "resume": trio.Event(), "done": trio.Event()}
    t0 = time.monotonic()

    async def subscriber(i: int, stalls: bool, ready: trio.Semaphore) -> None:
        # A stalled subscriber's tiny receive buffer makes its stall fill the gateway's
        # buffer (what conflation watches) rather than the kernel's.
        c = await RawClient.connect(host, port, rcvbuf=STALLED_RCVBUF if stalls else None)
        for j, sym in enumerate(symbols):
            await c.send({"type": "subscribe", "topic": sym, "id": j + 1})
        got = 0
        while got < len(symbols):
            got += sum(1 for m in await c.receive() if m.get("type") == "subscribed")
        ready.release()
        last: dict[str, int] = {}
        try:
            if not stalls:
                while not phase["done"].is_set():
                    await c.receive(parse=False)
                return
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
        seq_tick = 0
        interval = 1.0 / s.ticks
        per_tick = max(1, round(s.rate / s.ticks))
        pad = "x" * s.payload
        start = trio.current_time()
        while not phase["done"].is_set():
            seq_tick += 1
            items = [
                {"topic": sym, "payload": {"sym": sym, "price": seq_tick, "pad": pad}}
                for _ in range(per_tick)
                for sym in symbols
            ]
            sent_at = time.monotonic()
            results = await trio.to_thread.run_sync(_publish_batch, gw.admin, items)
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

    async def sampler() -> None:
        while not phase["done"].is_set():
            rss.append((time.monotonic() - t0, rss_bytes(gw.pid)))
            await trio.sleep(0.5)

    def cpu() -> dict[str, float]:
        return {
            "gateway": cpu_seconds(gw.pid),
            "routers": sum(cpu_seconds(r.pid) for r in cluster.routers),
            "bench": time.process_time(),  # this process: the subscribers and the publisher
        }

    async with trio.open_nursery() as nursery:
        ready = trio.Semaphore(s.subscribers, max_value=s.subscribers)
        for _ in range(s.subscribers):
            await ready.acquire()
        for i in range(s.subscribers):
            nursery.start_soon(subscriber, i, i < s.stalled, ready)
        with trio.fail_after(120):
            for _ in range(s.subscribers):
                await ready.acquire()
        say(f"{s.subscribers} subscribers on {len(symbols)} symbols")
        text0 = await trio.to_thread.run_sync(lambda: gw.metrics(timeout=5.0))
        cpu0, wall0 = cpu(), time.monotonic()
        nursery.start_soon(sampler)
        nursery.start_soon(publisher)
        await trio.sleep(s.warmup)
        rss_before = rss_bytes(gw.pid)
        t_stall = time.monotonic() - t0
        phase["stall"].set()
        say(f"{s.stalled} subscribers stop reading for {s.stall:g} s")
        await trio.sleep(s.stall)
        rss_stalled = rss_bytes(gw.pid)
        t_resume = time.monotonic() - t0
        phase["resume"].set()
        with trio.move_on_after(s.stall + 30):
            while sum(r["caught_up_s"] is not None for r in stalled_results.values()) + sum(closes.values()) < s.stalled:
                await trio.sleep(0.1)
        await trio.sleep(s.after)
        rss_after = rss_bytes(gw.pid)
        cpu1, wall = cpu(), time.monotonic() - wall0
        phase["done"].set()
        nursery.cancel_scope.cancel()
    text = gw.metrics(timeout=5.0)

    def counted(name: str, labels: str | None = None) -> float:
        """How much a gateway counter grew while the feed ran."""
        return localcluster.metric(text, name, labels, default=0.0) - localcluster.metric(text0, name, labels, default=0.0)

    caught = sorted(r["caught_up_s"] for r in stalled_results.values() if r["caught_up_s"] is not None)
    during = [b for t, b in rss if t_stall <= t <= t_resume]
    offered = s.symbols * max(1, round(s.rate / s.ticks)) * s.ticks
    achieved = published["ok"] / max(1e-9, published["last"] - published["first"])
    slow_closes = max(
        counted("fanroute_gateway_slow_consumer_closes_total"),
        counted("fanroute_gateway_connections_closed_total", 'code="4008"'),
    )
    messages_out = counted("fanroute_gateway_messages_out_total")
    conflated = counted("fanroute_gateway_conflated_total")
    spent = {k: cpu1[k] - cpu0[k] for k in cpu0}
    growth = max(during or [rss_before]) - rss_before
    # What conflation bounds the stalled subscribers to: each one's buffer up to the
    # threshold plus one held message per symbol (counted at a generous 1 KiB), and
    # 4 MiB for the allocator's own growth.
    bound = s.stalled * (s.threshold + s.symbols * 1024) + 4 * 2**20
    skipped_violations = sum(r["violations"] for r in stalled_results.values())
    return {
        "subscribers": s.subscribers,
        "stalled": s.stalled,
        "symbols": s.symbols,
        "rate_per_symbol": s.rate,
        "publications_per_s": {
            "offered": offered,
            # Acknowledged by the API, first request to last answer: below the offered
            # rate when the gateway cannot take it (the publisher then sends back to back).
            "achieved": round(achieved),
            "acknowledged": published["ok"],
            "errors": published["errors"],
        },
        "gateway_messages": {
            "received": counted("fanroute_gateway_deliveries_received_total"),
            "written": messages_out,
            "conflated": conflated,
        },
        "client_closes": closes,
        "slow_consumer_closes": slow_closes,
        "conflated": conflated,
        "rss_mb": {
            "before_stall": round(rss_before / 2**20, 1),
            "peak_during_stall": round(max(during or [0]) / 2**20, 1),
            "end_of_stall": round(rss_stalled / 2**20, 1),
            "after": round(rss_after / 2**20, 1),
            "growth_during_stall": round(growth / 2**20, 1),
            "conflation_bound": round(bound / 2**20, 1),
        },
        "caught_up_s": {
            "stalled_measured": len(caught),
            "p50": round(caught[len(caught) // 2], 3) if caught else None,
            "max": round(caught[-1], 3) if caught else None,
        },
        "skipped_violations": skipped_violations,
        "skipped_total": sum(r["skipped"] for r in stalled_results.values()),
        # CPU seconds over the feed (warm-up to the end); the bench's own process runs
        # every subscriber, so on a small machine it competes with the gateway.
        "cpu": {
            "wall_s": round(wall, 2),
            **{f"{k}_s": round(v, 2) for k, v in spent.items()},
            "gateway_us_per_subscriber_message": round(spent["gateway"] / max(1.0, messages_out + conflated) * 1e6, 3),
        },
        "goals": {
            "no_slow_consumer_close": slow_closes == 0 and not closes,
            "memory_flat": growth <= bound,
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
        gateways = 1 if which == "conflation" else 2
        extra = ["--conflate-threshold", str(s.threshold)] if which == "conflation" else []
        cluster = _cluster(gateways, 2, logdir, extra)
        try:
            say(f"cluster up: {gateways} gateway(s), 2 routers")
            run = _conflation if which == "conflation" else _presence
            result = trio.run(_bounded, run, s, cluster, say)
        finally:
            cluster.stop()
    return {"bench": which, "machine": host, "settings": {k: v for k, v in vars(s).items() if isinstance(v, (int, float, str, bool)) and k not in ("save", "logs")}, "result": result}


async def _bounded(run: Any, s: argparse.Namespace, cluster: Any, say: Any) -> dict[str, Any]:
    with trio.fail_after(s.timeout):
        return await run(s, cluster, say)


def bench_main(args: argparse.Namespace) -> int:
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
