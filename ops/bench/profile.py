"""``fanroute bench profile``: the per-process constants of the capacity model.

``fanroute capacity`` (:mod:`fanroute.capacity`) sizes a cluster from a handful of
per-process costs; this benchmark measures them against real processes on
127.0.0.1 and ``--save-profile FILE`` writes them, with the machine, the date and
the command, as the JSON file the planner reads (``ops/capacity-profile.json``).
Two parts, each bounded in time and count:

1. **Connections** — one ``fanroute gateway`` and one ``fanroute router``. Holder
   processes (raw sockets in one ``epoll`` loop each, answering pings) open
   ``--connections`` idle connections in ``--steps`` steps: the gateway's CPU time
   over the steps ÷ the connections is the CPU per **handshake**, the slope of its
   RSS against the connections (least squares over the steps) the **bytes per idle
   connection**. The idle connections then send application pings at ``--ping-rate``
   per second each: the gateway's extra CPU ÷ the pings is the CPU per
   **heartbeat** (one frame in, one out). Then every connection subscribes to
   ``--subscriptions`` topics (two rounds) of a pool of ``--topics``: the gateway's
   RSS slope gives **bytes per subscription** and its CPU the cost of a subscribe;
   the router's RSS growth ÷ the topics gives its **bytes per topic**. Last, one
   connection publishes ``--history`` messages of 1 KiB over the pool: the router's
   RSS growth ÷ the bytes it accounts to history (``fanroute_router_history_bytes``)
   is the **RSS per history byte**.
2. **Publications** — the fan-out benchmark's ``cluster`` target (2 gateways,
   3 routers) and its cells (:func:`fanroute.bench.fanout.run_cell`): fan-out 1, 2,
   200 and 1000 at 64-byte payloads, and 200 at 1 KiB. Fan-out 2 puts one subscriber
   on each gateway at the publication rates of fan-out 1, so that the cost of a
   second interested gateway is not confused with the batching a lower rate gets. Each cell's saturation phase
   gives publications/s and every process's CPU; the gateways' CPU is fitted (least
   squares, relative) to ``publications in × a + publications out × b + deliveries ×
   (c + KiB × d)`` — the publisher is on gateway-0 and the subscribers alternate, so
   each cell gives two equations — and the routers' to ``publications × (e +
   (interested gateways − 1) × f)``: the CPU per **delivery** (and per delivered
   KiB), per **publication** in and out, and the **router publications/s per core**
   (1 / e). Latency phases at a light rate and at 75 % of the cell's saturation give
   the p99 figures the planner quotes, by fan-out per gateway and utilisation.

``--check`` measures instead what ``fanroute capacity --ceiling 2:3`` predicts, on a
fresh 2-gateway, 3-router local cluster: the connections (one subscription each,
100 per topic) the two gateways hold before each one's RSS reaches
``--check-memory`` MiB, and the deliveries/s at fan-out 100 (``--repeat`` runs, the
median), beside the planner's figures for the same shape and the CPU the gateways
were measured to use.

Every process is stopped at the end (SIGTERM, SIGKILL after a bound), also on an
error or Ctrl-C. CPU times come from ``/proc/<pid>/stat`` (10 ms ticks), RSS from
``/proc/<pid>/status``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import selectors
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fanroute.errors import BenchError
from fanroute.bench.fanout import SERVER_ENV, Settings, _ws_connect, run_cell, start_target
from fanroute.bench.loadgen import client_frame, cpu_seconds, expect, machine, split_frames
from fanroute.localcluster import LocalCluster, LocalClusterError

# The cells of part 2: (subscribers, payload bytes, latency level). "light" runs the
# latency phase at the fan-out benchmark's rates, "loaded" at 75 % of the
# saturation that the light cell of the same fan-out measured just before.
CELLS: tuple[tuple[int, int, str], ...] = (
    (1, 64, "light"),
    (1, 64, "loaded"),
    (2, 64, "light"),  # one subscriber on each gateway: the second interested gateway at fan-out 1's rates
    (200, 64, "light"),
    (200, 64, "loaded"),
    (200, 1024, "light"),
    (1000, 64, "light"),
    (1000, 64, "loaded"),
)
LOADED = 0.75
ROUTER_CELLS_UP_TO = 2  # fan-outs whose cells give the routers' constants (see fit_cells)
HISTORY_PAYLOAD = 1024
_STOP_TIMEOUT = 5.0


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


# --- holders: processes that keep many connections open ---------------------------


class _Held:
    __slots__ = ("sock", "rest", "subscribed", "errors", "closed")

    def __init__(self, sock: socket.socket, rest: bytes) -> None:
        self.sock, self.rest = sock, rest
        self.subscribed = self.errors = 0
        self.closed = False


def holder_worker(w: int, control: Any) -> None:
    """One holder process: opens connections when told, keeps them, answers the
    gateway's pings, sends application pings at a given rate and subscribes.

    Commands on ``control``: ``("connect", [(host, port), ...])``, ``("subscribe",
    [[topic, ...], ...])`` (one list per connection, from the first), ``("ping",
    per_connection_per_s)``, ``("stats",)``, ``("close",)``. Each is answered once
    it is done (``subscribe`` once every reply arrived, within a bound).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when to stop
    sel = selectors.DefaultSelector()
    sel.register(control, selectors.EVENT_READ, -1)
    held: list[_Held] = []
    ping_hz = 0.0
    ping_frame = client_frame(b'{"type":"ping","ts":0}')
    ping_due, ping_next, last = 0.0, 0, time.monotonic()
    waiting: tuple[int, float] | None = None  # (subscribed replies wanted, deadline)
    sent_pings = 0

    def send(h: _Held, data: bytes) -> None:
        try:
            h.sock.setblocking(True)
            h.sock.sendall(data)
            h.sock.setblocking(False)
        except OSError:
            close(h)

    def close(h: _Held) -> None:
        if not h.closed:
            h.closed = True
            try:
                sel.unregister(h.sock)
            except (KeyError, ValueError):
                pass
            h.sock.close()

    def stats() -> dict[str, int]:
        return {
            "connections": sum(not h.closed for h in held),
            "closed": sum(h.closed for h in held),
            "subscribed": sum(h.subscribed for h in held),
            "errors": sum(h.errors for h in held),
            "pings_sent": sent_pings,
        }

    while True:
        for key, _ in sel.select(0.005):
            if key.data == -1:
                try:
                    cmd = control.recv()
                except EOFError:
                    return
                if cmd[0] == "close":
                    for h in held:
                        close(h)
                    return
                if cmd[0] == "connect":
                    started, failed = time.monotonic(), 0
                    for host, port in cmd[1]:
                        try:
                            sock, rest = _ws_connect(host, port, timeout=10.0)
                        except (OSError, BenchError):
                            failed += 1
                            continue
                        sock.setblocking(False)
                        h = _Held(sock, rest)
                        sel.register(sock, selectors.EVENT_READ, len(held))
                        held.append(h)
                    control.send(("connected", len(held), failed, time.monotonic() - started))
                elif cmd[0] == "subscribe":
                    want = sum(h.subscribed for h in held)
                    for h, topics in zip(held, cmd[1]):
                        frames = b"".join(
                            client_frame(json.dumps({"type": "subscribe", "topic": t, "id": i + 1}).encode())
                            for i, t in enumerate(topics)
                        )
                        want += len(topics)
                        send(h, frames)
                    waiting = (want, time.monotonic() + 60.0)
                elif cmd[0] == "ping":
                    ping_hz = float(cmd[1])
                    control.send(("ok",))
                elif cmd[0] == "stats":
                    control.send(("stats", stats()))
                continue
            h = held[key.data]
            try:
                chunk = h.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                close(h)
                continue
            if not chunk:
                close(h)
                continue
            buf = h.rest + chunk if h.rest else chunk
            frames, end = split_frames(buf, 0)
            h.rest = buf[end:]
            for op, start, stop in frames:
                if op == 0x1:
                    if buf.startswith(b'{"type":"subscribed"', start):
                        h.subscribed += 1
                    elif buf.startswith(b'{"type":"error"', start):
                        h.errors += 1
                elif op == 0x9:
                    send(h, client_frame(bytes(buf[start:stop]), 0xA))
                elif op == 0x8:
                    close(h)
                    break
        now = time.monotonic()
        if ping_hz and held:
            # Spread the pings: each connection pings ping_hz times a second, in turn.
            ping_due += (now - last) * ping_hz * len(held)
            while ping_due >= 1:
                h = held[ping_next % len(held)]
                ping_next += 1
                ping_due -= 1
                if not h.closed:
                    send(h, ping_frame)
                    sent_pings += 1
        else:
            ping_due = 0.0
        last = now
        if waiting is not None:
            got = sum(h.subscribed + h.errors for h in held)
            if got >= waiting[0] or now > waiting[1] or all(h.closed for h in held):
                control.send(("subscribed", stats()))
                waiting = None


class Holders:
    """``procs`` holder processes, driven together; stopped by :meth:`stop`."""

    def __init__(self, procs: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.pipes: list[Any] = []
        self.count = [0] * procs  # connections each holds
        for w in range(procs):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=holder_worker, args=(w, there), daemon=True)
            proc.start()
            there.close()
            self.procs.append(proc)
            self.pipes.append(here)

    def _expect(self, pipe: Any, kind: str, timeout: float) -> tuple:
        try:
            return expect(pipe, kind, timeout, BenchError, "a holder process")
        except OSError as exc:  # the holder died with its end of the pipe
            raise BenchError(f"a holder process died ({exc.strerror})") from None

    def connect(self, endpoints: Sequence[tuple[str, int]]) -> int:
        """Open one connection per endpoint, spread over the holders; returns how many failed."""
        parts = [list(endpoints[w :: len(self.pipes)]) for w in range(len(self.pipes))]
        for pipe, part in zip(self.pipes, parts):
            pipe.send(("connect", part))
        failed = 0
        for w, pipe in enumerate(self.pipes):
            msg = self._expect(pipe, "connected", 60 + 0.05 * len(parts[w]))
            self.count[w] = msg[1]
            failed += msg[2]
        return failed

    def subscribe(self, topics_of: Callable[[int, int], list[str]]) -> dict[str, int]:
        """``topics_of(holder, i)`` for connection ``i`` of each holder; waits for the replies."""
        for w, pipe in enumerate(self.pipes):
            pipe.send(("subscribe", [topics_of(w, i) for i in range(self.count[w])]))
        return self._sum([self._expect(pipe, "subscribed", 90)[1] for pipe in self.pipes])

    def ping(self, hz: float) -> None:
        for pipe in self.pipes:
            pipe.send(("ping", hz))
        for pipe in self.pipes:
            self._expect(pipe, "ok", 10)

    def stats(self) -> dict[str, int]:
        for pipe in self.pipes:
            pipe.send(("stats",))
        return self._sum([self._expect(pipe, "stats", 10)[1] for pipe in self.pipes])

    @staticmethod
    def _sum(parts: list[dict[str, int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in parts:
            for k, v in p.items():
                out[k] = out.get(k, 0) + v
        return out

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("close",))
            except OSError:
                pass
        deadline = time.monotonic() + _STOP_TIMEOUT
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for pipe in self.pipes:
            pipe.close()


# --- fitting -----------------------------------------------------------------------


def slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares line through (xs, ys): (slope, intercept)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if not sxx:
        raise BenchError("cannot fit a line through points that all have the same x")
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return k, my - k * mx


def least_squares(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """The x minimising Σ((row·x − y) / y)² — relative errors, so that cells with
    little CPU weigh as much as busy ones. Normal equations, Gaussian elimination."""
    n = len(rows[0])
    weights = [1.0 / y if y else 0.0 for y in ys]
    a = [[sum(w * w * r[i] * r[j] for r, w in zip(rows, weights)) for j in range(n)] for i in range(n)]
    b = [sum(w * w * r[i] * y for r, w, y in zip(rows, weights, ys)) for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-30:
            raise BenchError("the cells do not determine every constant (a singular fit)")
        a[col], a[pivot] = a[pivot], a[col]
        b[col], b[pivot] = b[pivot], b[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
                b[r] -= f * b[col]
    return [b[i] / a[i][i] for i in range(n)]


def fit_cells(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The CPU constants from the saturation phases of the cluster cells.

    The routers' constants come from the cells that load them, fan-out 1 and 2
    (publications at the highest rates, the owning router at half a core or more): in
    the wide cells the gateways run out first and the router idles at a few percent,
    where each publication also carries the receive loop's wake-ups that a busy
    router shares over a batch; a plan keeps routers busy, near its CPU target.

    In each cell the publisher is on gateway-0 and subscriber i on gateway (i+1) mod 2:
    gateway-0 takes every publication in, and sends it out (and delivers F//2) when
    F > 1; gateway-1 sends every publication out and delivers the other ceil(F/2).
    """
    rows, ys, residual_of = [], [], []
    router_rows, router_ys = [], []
    for c in cells:
        sat, f, kib = c["saturation"], c["subscribers"], c["payload"] / 1024
        p = sat["publications_per_s"]
        by = sat["server_cpu_by_process"]
        for name, pub_in, pub_out, deliveries in (
            ("gateway-0", p, p if f > 1 else 0, p * (f // 2)),
            ("gateway-1", 0, p, p * ((f + 1) // 2)),
        ):
            rows.append([pub_in, pub_out, deliveries, deliveries * kib])
            ys.append(by[name] * 1e6)
            residual_of.append((c["subscribers"], c["payload"], name))
        if f <= ROUTER_CELLS_UP_TO:
            interested = 2 if f > 1 else 1
            router_rows.append([p, p * (interested - 1)])
            router_ys.append(sum(v for k, v in by.items() if k.startswith("router")) * 1e6)
    a_in, a_out, a_del, a_kib = least_squares(rows, ys)
    r_pub, r_gw = least_squares(router_rows, router_ys)
    fitted = [sum(x * k for x, k in zip(r, (a_in, a_out, a_del, a_kib))) for r in rows]
    residuals = [
        {"subscribers": s, "payload": b, "process": name, "cpu_cores": round(y / 1e6, 3), "fitted_cores": round(fv / 1e6, 3)}
        for (s, b, name), y, fv in zip(residual_of, ys, fitted)
    ]
    return {
        "gateway_us_per_publication_in": a_in,
        "gateway_us_per_publication_out": a_out,
        "gateway_us_per_delivery": a_del,
        "gateway_us_per_delivered_kib": a_kib,
        "router_us_per_publication": r_pub,
        "router_us_per_extra_gateway": r_gw,
        "residuals": residuals,
    }


# --- part 1: connections, subscriptions, heartbeats, history ------------------------


def _settle(seconds: float) -> None:
    time.sleep(seconds)  # a measurement interval: let the servers finish what they were given


def measure_connections(a: argparse.Namespace, logdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    n, steps = a.connections, a.steps
    cluster = LocalCluster(gateways=1, routers=1, env=SERVER_ENV, logdir=logdir / "connections")
    holders: Holders | None = None
    try:
        say("connections: starting a gateway and a router")
        cluster.start()
        try:
            cluster.wait_ready(30)
        except LocalClusterError as exc:
            raise BenchError(str(exc)) from None
        gw, router = cluster.gateways[0], cluster.routers[0]
        endpoint = cluster.endpoints[0]
        holders = Holders(a.holders)
        _settle(1.0)
        c0, t0 = cpu_seconds(gw.pid), time.monotonic()
        _settle(2.0)
        idle_empty = (cpu_seconds(gw.pid) - c0) / (time.monotonic() - t0)
        points = [(0, rss_bytes(gw.pid))]
        router_base = rss_bytes(router.pid)
        handshake_cpu, handshake_wall, failed = 0.0, 0.0, 0
        per_step = max(1, n // steps)
        for step in range(steps):
            say(f"connections: {(step + 1) * per_step} idle connections")
            c0, t0 = cpu_seconds(gw.pid), time.monotonic()
            failed += holders.connect([endpoint] * per_step)
            handshake_cpu += cpu_seconds(gw.pid) - c0
            handshake_wall += time.monotonic() - t0
            _settle(0.5)
            cluster.check_alive()
            points.append((holders.stats()["connections"], rss_bytes(gw.pid)))
        held = holders.stats()["connections"]
        if failed or held < per_step * steps:
            raise BenchError(f"only {held} of {per_step * steps} connections were opened and kept")
        per_conn, base = slope([p[0] for p in points], [p[1] for p in points])
        handshake_us = (handshake_cpu - idle_empty * handshake_wall) / held * 1e6

        say("connections: idle")
        c0, t0 = cpu_seconds(gw.pid), time.monotonic()
        _settle(a.phase)
        idle_rate = (cpu_seconds(gw.pid) - c0) / (time.monotonic() - t0)
        say(f"connections: application pings, {a.ping_rate:g}/s each")
        holders.ping(a.ping_rate)
        _settle(0.5)
        p0, c0, t0 = holders.stats()["pings_sent"], cpu_seconds(gw.pid), time.monotonic()
        _settle(a.phase)
        p1, c1, t1 = holders.stats()["pings_sent"], cpu_seconds(gw.pid), time.monotonic()
        holders.ping(0)
        pings, ping_cpu, ping_wall = p1 - p0, c1 - c0, t1 - t0
        heartbeat_us = (ping_cpu - idle_rate * ping_wall) / max(1, pings) * 1e6

        subs_rounds: list[tuple[int, int, int]] = [(0, rss_bytes(gw.pid), rss_bytes(router.pid))]
        subscribe_cpu = 0.0
        k, pool = a.subscriptions, a.topics
        half = [k // 2, k - k // 2]
        done = 0
        for r, count in enumerate(half):
            say(f"subscriptions: round {r + 1}, {count} per connection")
            offset = done

            def topics_of(w: int, i: int, offset: int = offset, count: int = count) -> list[str]:
                g = i * a.holders + w  # the connection's number over all holders
                return [f"profile.t{(g * k + offset + j) % pool}" for j in range(count)]

            c0 = cpu_seconds(gw.pid)
            got = holders.subscribe(topics_of)
            subscribe_cpu += cpu_seconds(gw.pid) - c0
            done += count
            _settle(0.5)
            cluster.check_alive()
            if got["subscribed"] < held * done:
                raise BenchError(f"{got['subscribed']} of {held * done} subscriptions were confirmed ({got['errors']} errors)")
            subs_rounds.append((held * done, rss_bytes(gw.pid), rss_bytes(router.pid)))
        per_sub, _ = slope([s[0] for s in subs_rounds], [s[1] for s in subs_rounds])
        topics_held = router.metric("fanroute_router_topics", default=0.0)
        router_per_topic = (subs_rounds[-1][2] - subs_rounds[0][2]) / max(1.0, topics_held)
        subscribe_us = subscribe_cpu / (held * k) * 1e6

        say(f"history: {a.history} publications of {HISTORY_PAYLOAD} bytes")
        history = _fill_history(cluster, endpoint, a.history, pool, a.timeout)
        return {
            "connections": held,
            "steps": [{"connections": c, "gateway_rss": b} for c, b in points],
            "handshake_cpu_s": round(handshake_cpu, 3),
            "handshake_wall_s": round(handshake_wall, 3),
            "gateway_idle_cores_empty": round(idle_empty, 4),
            "gateway_idle_cores_with_connections": round(idle_rate, 4),
            "pings": pings,
            "ping_seconds": round(ping_wall, 3),
            "ping_cpu_s": round(ping_cpu, 3),
            "subscription_rounds": [{"subscriptions": s, "gateway_rss": g, "router_rss": r} for s, g, r in subs_rounds],
            "router_topics": topics_held,
            "router_rss_before": router_base,
            "history": history,
            "constants": {
                "gateway_base_bytes": base,
                "gateway_bytes_per_connection": per_conn,
                "gateway_bytes_per_subscription": per_sub,
                "gateway_us_per_handshake": handshake_us,
                "gateway_us_per_heartbeat": heartbeat_us,
                "gateway_us_per_subscribe": subscribe_us,
                "router_base_bytes": float(router_base),
                "router_bytes_per_topic": router_per_topic,
                "router_rss_per_history_byte": history["rss_per_history_byte"],
            },
        }
    finally:
        if holders is not None:
            holders.stop()
        cluster.stop(timeout=_STOP_TIMEOUT)


def _fill_history(cluster: LocalCluster, endpoint: tuple[str, int], count: int, pool: int, timeout: float) -> dict[str, Any]:
    """Publish ``count`` messages over the topic pool through one connection and read
    the router's RSS against the bytes it accounts to history."""
    router = cluster.routers[0]
    before = router.metric("fanroute_router_publications_total", default=0.0)
    bytes_before = router.metric("fanroute_router_history_bytes", default=0.0)
    rss_before = rss_bytes(router.pid)
    sock, _ = _ws_connect(*endpoint)
    try:
        body = json.dumps("h" * HISTORY_PAYLOAD)
        frames = [
            client_frame(f'{{"type":"publish","topic":"profile.t{i % pool}","payload":{body}}}'.encode())
            for i in range(count)
        ]
        for i in range(0, count, 200):
            sock.sendall(b"".join(frames[i : i + 200]))
        deadline = time.monotonic() + timeout
        while router.metric("fanroute_router_publications_total", default=0.0) < before + count:
            cluster.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"the router did not sequence {count} publications within {timeout:g} s")
            time.sleep(0.1)
    finally:
        sock.close()
    _settle(0.5)
    accounted = router.metric("fanroute_router_history_bytes", default=0.0) - bytes_before
    grown = rss_bytes(router.pid) - rss_before
    return {
        "publications": count,
        "payload": HISTORY_PAYLOAD,
        "history_bytes": accounted,
        "router_rss_growth": grown,
        "rss_per_history_byte": grown / accounted if accounted else 0.0,
    }


# --- part 2: publications through the cluster target ------------------------------


def _settings(a: argparse.Namespace, subscribers: int, payload: int, rate: float) -> Settings:
    return Settings(
        subscribers=[subscribers], targets=["cluster"], duration=a.duration, warmup=1.0, rate=rate,
        rate_deliveries=10**9, window=1000, window_deliveries=200000, heartbeat=3.0, publishers=1,
        client_procs=2, payload=payload,
    )


def light_rate(subscribers: int) -> float:
    """The fan-out benchmark's latency rates: 100/s, at most 20,000 deliveries/s."""
    return min(100.0, 20000 / subscribers)


def measure_cells(a: argparse.Namespace, logdir: Path, say: Callable[[str], None], cells: Sequence[tuple[int, int, str]] = CELLS) -> list[dict[str, Any]]:
    target = start_target("cluster", logdir)
    out: list[dict[str, Any]] = []
    saturation: dict[int, float] = {}
    try:
        for subscribers, payload, level in cells:
            if level == "loaded":
                rate = LOADED * saturation.get(subscribers, light_rate(subscribers) / LOADED)
            else:
                rate = light_rate(subscribers)
            cell = run_cell(target, subscribers, _settings(a, subscribers, payload, rate), say)
            cell["payload"], cell["level"] = payload, level
            if level == "light" and payload == 64:
                saturation[subscribers] = cell["saturation"]["publications_per_s"]
            out.append(cell)
    finally:
        target.stop()
    return out


def latency_points(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """p99 by fan-out per gateway and utilisation (the latency rate ÷ the highest
    saturation publications/s a cell of that fan-out measured: on a shared machine
    one saturation phase can come out low), for the 64-byte cells."""
    out = []
    best: dict[int, float] = {}
    for c in cells:
        if c["payload"] == 64:
            best[c["subscribers"]] = max(best.get(c["subscribers"], 0.0), c["saturation"]["publications_per_s"])
    for c in cells:
        if c["payload"] != 64:
            continue
        lat, sat = c["latency"], {"publications_per_s": best[c["subscribers"]]}
        out.append(
            {
                "fanout": c["subscribers"],
                "fanout_per_gateway": max(1, c["subscribers"] // 2) if c["subscribers"] > 1 else 1,
                "publications_per_s": lat["achieved_rate"],
                "utilisation": round(lat["achieved_rate"] / sat["publications_per_s"], 3) if sat["publications_per_s"] else None,
                "p50_ms": lat["p50_ms"],
                "p99_ms": lat["p99_ms"],
                "lost": lat["lost"],
            }
        )
    return out


# --- the command --------------------------------------------------------------------


def _summary_cell(c: dict[str, Any]) -> dict[str, Any]:
    sat, lat = c["saturation"], c["latency"]
    return {
        "subscribers": c["subscribers"],
        "payload": c["payload"],
        "level": c.get("level"),
        "deliveries_per_s": sat["deliveries_per_s"],
        "publications_per_s": sat["publications_per_s"],
        "server_cpu_by_process": sat["server_cpu_by_process"],
        "loadgen_cpu": sat["loadgen_cpu"],
        "lost": sat["lost"] + lat["lost"],
        "latency": {k: lat[k] for k in ("rate", "achieved_rate", "p50_ms", "p99_ms", "max_ms", "lost", "gaps")},
        "close_codes": {**sat["close_codes"], **{f"latency:{k}": v for k, v in lat["close_codes"].items()}},
    }


def profile_main(a: argparse.Namespace) -> int:
    for name in ("connections", "steps", "holders", "subscriptions", "topics", "history", "duration", "phase", "ping_rate", "repeat", "check_memory"):
        if getattr(a, name) <= 0:
            print(f"fanroute: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if a.steps < 2:
        print("fanroute: --steps must be at least 2 (a slope needs two points)", file=sys.stderr)
        return 2

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    facts = machine()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    command = "fanroute " + " ".join(sys.argv[1:])
    try:
        with tempfile.TemporaryDirectory(prefix="fanroute-profile-") as tmp:
            if a.check:
                report = check(a, Path(tmp), say)
            else:
                report = profile(a, Path(tmp), say)
    except (BenchError, LocalClusterError) as exc:
        print(f"fanroute: {exc}", file=sys.stderr)
        return 1
    report["machine"] = facts
    report["command"] = command
    report["date"] = datetime.date.today().isoformat()
    report["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2) + "\n"
    if a.save_profile:
        if a.check:
            print("fanroute: --save-profile writes a profile, not a --check", file=sys.stderr)
            return 2
        Path(a.save_profile).write_text(text)
    if a.json:
        print(text, end="")
    else:
        render(report)
    return 0


def profile(a: argparse.Namespace, logdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    conns = measure_connections(a, logdir, say)
    runs: list[list[dict[str, Any]]] = []
    for r in range(a.repeat):
        say(f"publications: round {r + 1} of {a.repeat}")
        runs.append(measure_cells(a, logdir, say))
    fits = [fit_cells(run) for run in runs]
    fit = {k: statistics.median(f[k] for f in fits) for k in fits[0] if k != "residuals"}
    cells = [c for run in runs for c in run]
    constants = {
        **{k: v for k, v in fit.items()},
        "router_publications_per_core": 1e6 / fit["router_us_per_publication"],
        **conns["constants"],
    }
    constants = {k: round(v, 3) if abs(v) < 1000 else round(v) for k, v in sorted(constants.items())}
    return {
        "profile": "fanroute capacity profile",
        "version": 1,
        "payload": 64,
        "constants": constants,
        "latency": latency_points(runs[len(runs) // 2]),
        "measurements": {
            "connections": {k: v for k, v in conns.items() if k != "constants"},
            "cells": [_summary_cell(c) for c in cells],
            "fit_residuals": fits[len(fits) // 2]["residuals"],
            "settings": {
                "connections": a.connections, "steps": a.steps, "holders": a.holders,
                "subscriptions": a.subscriptions, "topics": a.topics, "history": a.history,
                "duration": a.duration, "phase": a.phase, "ping_rate": a.ping_rate, "repeat": a.repeat,
            },
        },
    }


# --- --check: the planner's ceiling against a measured local cluster -----------------


def fill_to_memory(limit_bytes: int, bound: int, holders_n: int, logdir: Path, say: Callable[[str], None], step: int = 500) -> dict[str, Any]:
    """Connections, one subscription each (100 per topic), added ``step`` at a time
    to a fresh 2-gateway, 3-router cluster until each gateway's RSS reached
    ``limit_bytes`` (or ``bound`` connections in all): where each crossed it."""
    cluster = LocalCluster(gateways=2, routers=3, env=SERVER_ENV, logdir=logdir / "fill")
    holders: Holders | None = None
    try:
        cluster.start()
        try:
            cluster.wait_ready(30)
        except LocalClusterError as exc:
            raise BenchError(str(exc)) from None
        holders = Holders(holders_n)
        _settle(1.0)
        gws = cluster.gateways
        trace = [{"connections": 0, "rss": [rss_bytes(g.pid) for g in gws]}]
        crossed: list[float | None] = [None, None]
        total = 0
        while total < bound and None in crossed:
            plan = [cluster.endpoints[(total + i) % 2] for i in range(step)]
            if holders.connect(plan):
                raise BenchError("a connection failed while filling the gateways")
            start = total
            total += step

            def topics_of(w: int, i: int) -> list[str]:
                # Every step gives each holder step/holders connections, so a holder's
                # i-th connection is connection i * holders + w of the fill, on
                # gateway (i * holders + w) mod 2; only this step's ones subscribe.
                g = i * holders_n + w
                return [f"fill.t{g // 100}"] if g >= start else []

            holders.subscribe(topics_of)
            _settle(0.3)
            cluster.check_alive()
            rss = [rss_bytes(g.pid) for g in gws]
            trace.append({"connections": total, "rss": rss})
            for j in range(2):
                if crossed[j] is None and rss[j] >= limit_bytes:
                    # Interpolate between this step and the last: connections on gateway j.
                    r0, r1 = trace[-2]["rss"][j], rss[j]
                    n0, n1 = trace[-2]["connections"] / 2, total / 2
                    crossed[j] = n0 + (n1 - n0) * (limit_bytes - r0) / max(1, r1 - r0)
            say(f"fill: {total} connections, gateway RSS {', '.join(f'{r / 2**20:.0f}' for r in rss)} MiB")
        return {
            "limit_bytes": limit_bytes,
            "reached": None not in crossed,
            "per_gateway": [round(c) if c is not None else None for c in crossed],
            "connections": round(sum(c if c is not None else total / 2 for c in crossed)),
            "trace": trace,
        }
    finally:
        if holders is not None:
            holders.stop()
        cluster.stop(timeout=_STOP_TIMEOUT)


def check(a: argparse.Namespace, logdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from fanroute import capacity

    limit = int(a.check_memory * 2**20)
    say(f"check: connections until each gateway's RSS reaches {a.check_memory:g} MiB")
    fill = fill_to_memory(limit, a.check_bound, max(a.holders, 4), logdir, say)
    target = start_target("cluster", logdir)
    runs = []
    try:
        for r in range(a.repeat):
            runs.append(run_cell(target, 100, _settings(a, 100, 64, light_rate(100)), say))
    finally:
        target.stop()
    runs.sort(key=lambda c: c["saturation"]["deliveries_per_s"])
    median = runs[len(runs) // 2]
    by = median["saturation"]["server_cpu_by_process"]
    gw_cores = (by["gateway-0"] + by["gateway-1"]) / 2
    router_cores = max(v for k, v in by.items() if k.startswith("router"))
    prof = capacity.load_profile(a.profile) if a.profile else capacity.load_profile()
    predicted = capacity.ceiling(
        prof,
        capacity.Shape(fanout=100, payload=64, topics=1, subscriptions_per_connection=1.0),
        gateways=2, routers=3, gateway_cpu=gw_cores, router_cpu=1.0, gateway_memory=limit,
    )
    return {
        "check": "fanroute capacity --ceiling 2:3 against a measured local cluster",
        "measured": {
            "connections_at_memory": fill,
            "deliveries_per_s_at_fanout_100": median["saturation"]["deliveries_per_s"],
            "deliveries_per_s_all": [c["saturation"]["deliveries_per_s"] for c in runs],
            "gateway_cores_each": round(gw_cores, 3),
            "owning_router_cores": round(router_cores, 3),
            "cells": [_summary_cell({**c, "payload": 64}) for c in runs],
        },
        "predicted": predicted.as_dict(),
        "planner_command": (
            f"fanroute capacity --ceiling 2:3 --fanout 100 --topics 1 --payload 64 "
            f"--gateway-cpu {gw_cores:.2f} --router-cpu 1 --gateway-memory {a.check_memory:g}"
        ),
    }


def render(report: dict[str, Any]) -> None:
    if "check" in report:
        m, p = report["measured"], report["predicted"]
        fill = m["connections_at_memory"]
        rows = [
            ("connections, 2 gateways at " + f"{fill['limit_bytes'] / 2**20:g} MiB RSS each", p["connections"], fill["connections"]),
            ("deliveries/s at fan-out 100", p["deliveries_per_s"], m["deliveries_per_s_at_fanout_100"]),
        ]
        print(f"{'':48} {'predicted':>12} {'measured':>12} {'ratio':>7}")
        for name, pred, meas in rows:
            print(f"{name:48} {pred:>12,.0f} {meas:>12,.0f} {pred / meas if meas else float('nan'):>7.2f}")
        print(f"gateway CPU measured at saturation: {m['gateway_cores_each']:.2f} cores each; planner: {report['planner_command']}")
        return
    print(f"fanroute capacity profile ({report['machine']['nproc']} × {report['machine']['cpu']}, {report['date']}, {report['seconds']:g} s)")
    for k, v in report["constants"].items():
        print(f"  {k:36} {v:>14,}")
    print("  latency (fan-out per gateway, utilisation, p99 ms):")
    for pt in report["latency"]:
        print(f"    {pt['fanout_per_gateway']:>5} {pt['utilisation']!s:>6} {pt['p99_ms']:>8.2f}")


def add_profile_command(sub: Any, flag: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="measure the capacity model's per-process constants (--save-profile FILE)",
        description="CPU per delivery, publication, handshake and heartbeat, bytes per connection, "
        "subscription and topic, and router publications/s per core, measured against real processes "
        "on 127.0.0.1; --save-profile writes the file fanroute capacity reads.",
    )
    flag(p, "--connections", int, 8000, "idle connections of the connections part (enough that allocator start-up does not dominate the slope)")
    flag(p, "--steps", int, 4, "steps the connections are opened in (points of the RSS slope)")
    flag(p, "--holders", int, 2, "processes holding the connections")
    flag(p, "--subscriptions", int, 10, "subscriptions per connection (two rounds)")
    flag(p, "--topics", int, 5000, "topics the subscriptions are spread over")
    flag(p, "--history", int, 20000, "publications of 1 KiB stored as history (router RSS per history byte)")
    flag(p, "--ping-rate", float, 5.0, "application pings per second per connection while the heartbeat cost is measured")
    flag(p, "--phase", float, 4.0, "seconds of each idle and ping measurement")
    flag(p, "--duration", float, 4.0, "seconds of each cell's saturation and latency phases")
    flag(p, "--repeat", int, 1, "rounds of the cells (constants: the median); with --check, runs at fan-out 100")
    flag(p, "--timeout", float, 60.0, "bound on waiting for the router to sequence the history publications")
    flag(p, "--check-memory", float, 200.0, "with --check: the gateway pod memory (MiB of RSS) the connections fill")
    flag(p, "--check-bound", int, 40000, "with --check: most connections opened in all")
    p.add_argument("--profile", metavar="FILE", help="with --check: the profile the planner uses (default ops/capacity-profile.json)")
    p.add_argument("--check", action="store_true", help="measure the 2-gateway, 3-router ceiling and compare it with the planner's")
    p.add_argument("--save-profile", metavar="FILE", help="write the profile (JSON) to FILE")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(bench_main=profile_main)
