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
2. **Publications** — the fan-out benchmark's ``cluster`` shape (2 gateways,
   3 routers) with the routers' ``--copies`` given (``--copies``, default the
   routers' own: 2, so every topic's stream is on two routers) and its cells
   (:func:`fanroute.bench.fanout.run_cell`): fan-out 1, 2, 10, 50, 100, 200 and 1000
   at 64-byte payloads, and 200 at 1 KiB. Fan-out 2 puts one subscriber on each
   gateway at the publication rates of fan-out 1, so that the cost of a second
   interested gateway is not confused with the batching a lower rate gets. First
   the cluster runs ``REST_SECONDS`` with no traffic: every process's CPU **at
   rest** (a router's heartbeats and leases with the others). Each cell's
   saturation phase gives publications/s and every process's CPU; the gateways'
   CPU is fitted (least squares, relative, no constant below 0) to ``publications
   in × a + publications out × b + deliveries × (c + KiB × d)`` — the publisher is
   on gateway-0 and the subscribers alternate, so each cell gives two equations,
   from fan-out 1 to 1000 — and the routers' as :func:`fit_cells` says: the topic's
   leader ``publications × (e + (interested gateways − 1) × f)``, each further copy
   ``publications × h``, both above what a router holding no copy spends in the same
   cell. That gives the CPU per **delivery** (and per delivered KiB), per
   **publication** in and out, the **router publications/s per core** (1 / e), the
   CPU per publication of a **further copy** (h) and a router's CPU **at rest**.
   The profile records the ``--copies`` they were measured with, and beside each
   cell the CPU per publication measured and fitted (``per_publication``). Latency
   phases at a light rate and at 75 % of the cell's saturation give the p99
   figures the planner quotes, by fan-out per gateway and utilisation.

``--check`` measures instead what ``fanroute capacity --ceiling 2:3`` predicts, on
fresh 2-gateway, 3-router local clusters with the same ``--copies``: the
connections (one subscription each, 100 per topic) the two gateways hold before
each one's RSS reaches ``--check-memory`` MiB, and the deliveries/s at fan-out 100
(``--repeat`` runs, the median) with every server process pinned to CPU 0 and the
load generator to the others — beside the planner's ceiling for the same shape
when all five pods share one core (a figure of the ceiling's output), so that the
CPU the servers have is set by the check, not taken from what they were measured to
use. ``--save-check FILE`` writes the report (JSON).

Every process is stopped at the end (SIGTERM, SIGKILL after a bound), also on an
error or Ctrl-C. CPU times come from ``/proc/<pid>/stat`` (10 ms ticks), RSS from
``/proc/<pid>/status``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
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
from fanroute.bench.fanout import SERVER_ENV, Settings, Target, _wait_ready, _ws_connect, pin, run_cell, server_pids
from fanroute.bench.loadgen import client_frame, cpu_seconds, expect, machine, split_frames
from fanroute.localcluster import LocalCluster, LocalClusterError
from fanroute.settings import setting

# The cells of part 2: (subscribers, payload bytes, latency level). "light" runs the
# latency phase at the fan-out benchmark's rates, "loaded" at 75 % of the
# saturation that the light cell of the same fan-out measured just before.
CELLS: tuple[tuple[int, int, str], ...] = (
    (1, 64, "light"),
    (1, 64, "loaded"),
    (2, 64, "light"),  # one subscriber on each gateway: the second interested gateway at fan-out 1's rates
    (10, 64, "light"),
    (50, 64, "light"),
    (100, 64, "light"),
    (100, 64, "loaded"),
    (200, 64, "light"),
    (200, 64, "loaded"),
    (200, 1024, "light"),
    (1000, 64, "light"),
    (1000, 64, "loaded"),
)
LOADED = 0.75
ROUTER_CELLS_UP_TO = 100  # fan-outs whose cells give the routers' constants (see fit_cells)
HISTORY_PAYLOAD = 1024
REST_SECONDS = 4.0  # the cluster at rest before the cells: every process's CPU with no traffic
_STOP_TIMEOUT = 5.0
_READY_TIMEOUT = 30.0


def cluster_target(logdir: Path, copies: int, server_cpus: set[int] | None = None) -> Target:
    """The fan-out benchmark's ``cluster`` target (2 gateways, 3 routers) with the
    routers' ``--copies`` set, not left to their default; with ``server_cpus`` every
    server process (and thread) is pinned to those CPUs."""
    target = Target("cluster")
    try:
        target.cluster = LocalCluster(
            gateways=2, routers=3, router_args=["--copies", str(copies)], env=SERVER_ENV, logdir=logdir / "cluster"
        )
        target.cluster.start()
        try:
            target.cluster.wait_ready(_READY_TIMEOUT)
        except LocalClusterError as exc:
            raise BenchError(f"cluster: {exc}") from None
        target.endpoints = target.cluster.endpoints
        pin(server_pids(target), server_cpus)
        _wait_ready(target, time.monotonic() + _READY_TIMEOUT)
    except BaseException:
        target.stop()
        raise
    return target


def at_rest(target: Target, seconds: float) -> dict[str, float]:
    """Every server process's CPU (cores) over ``seconds`` with no client connected."""
    c0, t0 = target.cpu(), time.monotonic()
    _settle(seconds)
    c1, t1 = target.cpu(), time.monotonic()
    return {name: round((c1[name] - c0.get(name, 0.0)) / (t1 - t0), 4) for name in c1}


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


def nonnegative_least_squares(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """:func:`least_squares` with no constant below 0: a constant the fit makes
    negative (a small one, lost in the noise of a shared machine) is set to 0 and the
    others fitted again without it."""
    active = list(range(len(rows[0])))
    while True:
        if not active:
            raise BenchError("every constant of a fit came out negative: the cells measured nothing")
        x = least_squares([[r[i] for i in active] for r in rows], ys)
        if min(x) >= 0:
            break
        active.pop(x.index(min(x)))
    out = [0.0] * len(rows[0])
    for i, v in zip(active, x):
        out[i] = v
    return out


def router_roles(by_process: dict[str, float], copies: int) -> tuple[float, list[float], list[float]]:
    """The routers' CPU (cores) in a cell of one topic: its leader (the busiest
    router), its further copies (the next ``copies`` − 1) and the routers that hold
    no copy of it."""
    cpu = sorted((v for k, v in by_process.items() if k.startswith("router")), reverse=True)
    return cpu[0], cpu[1:copies], cpu[copies:]


def fit_cells(cells: Sequence[dict[str, Any]], copies: int = 1, rest: float = 0.0) -> dict[str, Any]:
    """The CPU constants from the saturation phases of the cluster cells.

    Gateways: in each cell the publisher is on gateway-0 and subscriber i on gateway
    (i+1) mod 2: gateway-0 takes every publication in, and sends it out (and delivers
    F//2) when F > 1; gateway-1 sends every publication out and delivers the other
    ceil(F/2). Every cell, from fan-out 1 to 1000, gives two equations.

    Routers: each cell has one topic, held by ``copies`` routers. Its leader is the
    busiest router, its further copies the next ones; a router holding no copy does
    only what every router does at rest (heartbeats and leases between copies), and
    its CPU in the same cell is taken off the others' (``rest``, the CPU a router had
    before any traffic, when every router holds a copy). The leader's CPU above rest
    is fitted to ``publications × (e + (interested gateways − 1) × f)`` and the
    copies' to ``publications × copies beyond the leader × h``, over the cells up to
    fan-out ``ROUTER_CELLS_UP_TO``, where the leader runs at a tenth of a core or more
    above rest; in the wider cells so few publications pass that what is left after
    the rest is mostly noise.
    """
    rows, ys, residual_of = [], [], []
    router_rows, router_ys, copy_rows, copy_ys, router_of = [], [], [], [], []
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
        if f <= ROUTER_CELLS_UP_TO and c["payload"] == 64:
            leader, further, others = router_roles(by, copies)
            base = statistics.mean(others) if others else rest
            interested = 2 if f > 1 else 1
            router_rows.append([p, p * (interested - 1)])
            router_ys.append((leader - base) * 1e6)
            router_of.append((f, c["payload"]))
            if further:
                copy_rows.append([p * len(further)])
                copy_ys.append((sum(further) - base * len(further)) * 1e6)
    a_in, a_out, a_del, a_kib = nonnegative_least_squares(rows, ys)
    r_pub, r_gw = nonnegative_least_squares(router_rows, router_ys)
    fitted = [sum(x * k for x, k in zip(r, (a_in, a_out, a_del, a_kib))) for r in rows]
    residuals = [
        {"subscribers": s, "payload": b, "process": name, "cpu_cores": round(y / 1e6, 3), "fitted_cores": round(fv / 1e6, 3)}
        for (s, b, name), y, fv in zip(residual_of, ys, fitted)
    ]
    for (s, b), r, y in zip(router_of, router_rows, router_ys):
        residuals.append({"subscribers": s, "payload": b, "process": "router: leader above rest", "cpu_cores": round(y / 1e6, 3),
                          "fitted_cores": round((r[0] * r_pub + r[1] * r_gw) / 1e6, 3)})
    out = {
        "gateway_us_per_publication_in": a_in,
        "gateway_us_per_publication_out": a_out,
        "gateway_us_per_delivery": a_del,
        "gateway_us_per_delivered_kib": a_kib,
        "router_us_per_publication": r_pub,
        "router_us_per_extra_gateway": r_gw,
        "residuals": residuals,
    }
    if copy_rows:
        (r_copy,) = nonnegative_least_squares(copy_rows, copy_ys)
        out["router_us_per_copy"] = r_copy
        for (s, b), r, y in zip(router_of, copy_rows, copy_ys):
            residuals.append({"subscribers": s, "payload": b, "process": "routers: further copies above rest",
                              "cpu_cores": round(y / 1e6, 3), "fitted_cores": round(r[0] * r_copy / 1e6, 3)})
    return out


def per_publication(
    runs: Sequence[Sequence[dict[str, Any]]], router_rest: Sequence[float], constants: dict[str, float], copies: int,
) -> list[dict[str, Any]]:
    """For each cell: the CPU µs per publication the gateways (both) and the routers
    (all three, rest included) spent, the median over the rounds, beside what the
    fitted constants give — how well one line per role fits every fan-out."""
    k = constants
    out = []
    for i, first in enumerate(runs[0]):
        f, payload = first["subscribers"], first["payload"]
        gw, rt = [], []
        for run, rest in zip(runs, router_rest):
            sat = run[i]["saturation"]
            p, by = sat["publications_per_s"], sat["server_cpu_by_process"]
            if p:
                gw.append((by["gateway-0"] + by["gateway-1"]) * 1e6 / p)
                rt.append((sum(v for n, v in by.items() if n.startswith("router")) * 1e6 - 3 * rest * 1e6) / p)
        interested = 2 if f > 1 else 1
        gw_fit = (
            k["gateway_us_per_publication_in"] + interested * k["gateway_us_per_publication_out"]
            + f * (k["gateway_us_per_delivery"] + k["gateway_us_per_delivered_kib"] * payload / 1024)
        )
        rt_fit = k["router_us_per_publication"] + (interested - 1) * k["router_us_per_extra_gateway"] + (copies - 1) * k.get("router_us_per_copy", 0.0)
        out.append({
            "subscribers": f, "payload": payload, "level": first.get("level"),
            "gateways_us": round(statistics.median(gw), 1) if gw else None, "gateways_fitted_us": round(gw_fit, 1),
            "routers_above_rest_us": round(statistics.median(rt), 1) if rt else None, "routers_fitted_us": round(rt_fit, 1),
        })
    return out


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


def measure_cells(
    a: argparse.Namespace, logdir: Path, say: Callable[[str], None], cells: Sequence[tuple[int, int, str]] = CELLS,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The cells on one cluster target, and every process's CPU at rest before them."""
    target = cluster_target(logdir, a.copies)
    out: list[dict[str, Any]] = []
    saturation: dict[int, float] = {}
    try:
        say(f"publications: the cluster at rest ({REST_SECONDS:g} s, routers with --copies {a.copies})")
        _settle(1.0)
        rest = at_rest(target, REST_SECONDS)
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
    return out, rest


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
    if a.copies < 1:
        print("fanroute: --copies must be at least 1", file=sys.stderr)
        return 2
    if a.save_profile and a.check:
        print("fanroute: --save-profile writes a profile, not a --check (--save-check FILE writes that)", file=sys.stderr)
        return 2
    if a.save_check and not a.check:
        print("fanroute: --save-check writes the report of --check", file=sys.stderr)
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
    report["machine"] = {**facts, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    report["command"] = command
    report["date"] = datetime.date.today().isoformat()
    report["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2) + "\n"
    if a.save_profile:
        Path(a.save_profile).write_text(text)
    if a.save_check:
        Path(a.save_check).write_text(text)
    if a.json:
        print(text, end="")
    else:
        render(report)
    return 0


def profile(a: argparse.Namespace, logdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    conns = measure_connections(a, logdir, say)
    runs: list[list[dict[str, Any]]] = []
    rests: list[dict[str, float]] = []
    for r in range(a.repeat):
        say(f"publications: round {r + 1} of {a.repeat}")
        cells, rest = measure_cells(a, logdir, say)
        runs.append(cells)
        rests.append(rest)
    router_rest = [statistics.mean(v for k, v in rest.items() if k.startswith("router")) for rest in rests]
    fits = [fit_cells(run, a.copies, idle) for run, idle in zip(runs, router_rest)]
    fit = {k: statistics.median(f[k] for f in fits) for k in fits[0] if k != "residuals"}
    cells = [c for run in runs for c in run]
    constants = {
        **{k: v for k, v in fit.items()},
        "router_publications_per_core": 1e6 / fit["router_us_per_publication"],
        "router_idle_cores": statistics.median(router_rest),
        **conns["constants"],
    }
    constants = {k: round(v, 3) if abs(v) < 1000 else round(v) for k, v in sorted(constants.items())}
    return {
        "profile": "fanroute capacity profile",
        "version": 2,
        "payload": 64,
        # The routers of the cells ran with --copies router_copies: their leader's and
        # copies' CPU are the constants router_us_per_publication and router_us_per_copy.
        "router_copies": a.copies,
        "constants": constants,
        "latency": latency_points(runs[len(runs) // 2]),
        "measurements": {
            "connections": {k: v for k, v in conns.items() if k != "constants"},
            "at_rest": rests,
            "per_publication": per_publication(runs, router_rest, constants, a.copies),
            "cells": [_summary_cell(c) for c in cells],
            "fit_residuals": fits[len(fits) // 2]["residuals"],
            "settings": {
                "connections": a.connections, "steps": a.steps, "holders": a.holders,
                "subscriptions": a.subscriptions, "topics": a.topics, "history": a.history,
                "duration": a.duration, "phase": a.phase, "ping_rate": a.ping_rate, "repeat": a.repeat,
                "copies": a.copies, "cells": [list(c) for c in CELLS],
            },
        },
    }


# --- --check: the planner's ceiling against a measured local cluster -----------------


def fill_to_memory(
    limit_bytes: int, bound: int, holders_n: int, copies: int, logdir: Path, say: Callable[[str], None], step: int = 500,
) -> dict[str, Any]:
    """Connections, one subscription each (100 per topic), added ``step`` at a time
    to a fresh 2-gateway, 3-router cluster until each gateway's RSS reached
    ``limit_bytes`` (or ``bound`` connections in all): where each crossed it."""
    cluster = LocalCluster(gateways=2, routers=3, router_args=["--copies", str(copies)], env=SERVER_ENV, logdir=logdir / "fill")
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


CHECK_CPUS = {0}  # --check pins every server process to CPU 0, the load generator to the others


def check(a: argparse.Namespace, logdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from fanroute import capacity

    if (os.cpu_count() or 1) < 2:
        raise BenchError("--check needs two CPUs at least: the servers get one, the load generator the others")
    limit = int(a.check_memory * capacity.MIB)
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    say(f"check: connections until each gateway's RSS reaches {a.check_memory:g} MiB")
    fill = fill_to_memory(limit, a.check_bound, max(a.holders, 4), a.copies, logdir, say)
    # The deliveries: every server process on one CPU, so that what they share is set
    # by the check (one core), not by what the load generator leaves them.
    target = cluster_target(logdir, a.copies, CHECK_CPUS)
    runs = []
    try:
        for r in range(a.repeat):
            settings = dataclasses.replace(_settings(a, 100, 64, light_rate(100)), server_cpus=CHECK_CPUS)
            runs.append(run_cell(target, 100, settings, say))
    finally:
        target.stop()
    loadavg_end = [round(x, 2) for x in os.getloadavg()]
    runs.sort(key=lambda c: c["saturation"]["deliveries_per_s"])
    median = runs[len(runs) // 2]
    sat = median["saturation"]
    by = sat["server_cpu_by_process"]
    gateways = by["gateway-0"] + by["gateway-1"]
    routers = sum(v for k, v in by.items() if k.startswith("router"))
    prof = capacity.load_profile(a.profile)
    # Exactly what the printed command computes: the ceiling's defaults for every
    # flag it does not give (1 core per pod; the shared figure is for one core).
    shape = capacity.Shape(fanout=100, payload=64, topics=1, subscriptions_per_connection=1.0, copies=a.copies)
    predicted = capacity.ceiling(
        prof, shape, gateways=2, routers=3, gateway_cpu=1.0, router_cpu=1.0, gateway_memory=a.check_memory * capacity.MIB,
        shared_cpu=float(len(CHECK_CPUS)),
    )
    f = predicted.figures
    pubs = sat["publications_per_s"]
    return {
        "check": "fanroute capacity --ceiling 2:3 against a measured local cluster",
        "profile": {"source": prof.source, "date": prof.date, "command": prof.command, "router_copies": prof.router_copies},
        "copies": a.copies,
        "server_cpus": sorted(CHECK_CPUS),
        "loadavg": {"start": loadavg_start, "end": loadavg_end},
        "measured": {
            "connections_at_memory": fill,
            "deliveries_per_s_at_fanout_100": sat["deliveries_per_s"],
            "deliveries_per_s_all": [c["saturation"]["deliveries_per_s"] for c in runs],
            "server_cores": round(sum(by.values()), 3),
            "gateway_cores": round(gateways, 3),
            "router_cores": round(routers, 3),
            "loadgen_cores": sat["loadgen_cpu"],
            "us_per_publication": {
                "gateways": round(gateways * 1e6 / pubs, 1) if pubs else None,
                "routers": round(routers * 1e6 / pubs, 1) if pubs else None,
            },
            "cells": [_summary_cell({**c, "payload": 64}) for c in runs],
        },
        "predicted": {
            "connections": predicted.connections,
            "deliveries_per_s_at_fanout_100": f["deliveries_per_s_shared"],
            "us_per_publication": {
                "gateways": round(f["gateway_us_per_publication"], 1),
                # with the three routers' rest spread over the publications measured
                "routers": round(f["router_us_per_publication_all_copies"] + 3 * f["router_idle_cores"] * 1e6 / pubs, 1) if pubs else None,
            },
            "ceiling": predicted.as_dict(),
        },
        "planner_command": (
            "fanroute capacity --ceiling 2:3 --fanout 100 --topics 1 --payload 64 "
            f"--copies {a.copies} --gateway-memory {a.check_memory:g}" + (f" --profile {a.profile}" if a.profile else "")
        ),
    }


def render(report: dict[str, Any]) -> None:
    if "check" in report:
        m, p = report["measured"], report["predicted"]
        fill = m["connections_at_memory"]
        rows = [
            ("connections, 2 gateways at " + f"{fill['limit_bytes'] / 2**20:g} MiB RSS each", p["connections"], fill["connections"]),
            ("deliveries/s at fan-out 100, servers on 1 core", p["deliveries_per_s_at_fanout_100"], m["deliveries_per_s_at_fanout_100"]),
            ("  gateways' CPU µs per publication", p["us_per_publication"]["gateways"], m["us_per_publication"]["gateways"]),
            ("  routers' CPU µs per publication", p["us_per_publication"]["routers"], m["us_per_publication"]["routers"]),
        ]
        print(f"{'':48} {'predicted':>12} {'measured':>12} {'ratio':>7}")
        for name, pred, meas in rows:
            if pred is None or meas is None:
                continue
            print(f"{name:48} {pred:>12,.{1 if pred < 1000 else 0}f} {meas:>12,.{1 if meas < 1000 else 0}f} {pred / meas if meas else float('nan'):>7.2f}")
        print(
            f"the servers (pinned to CPU {', '.join(map(str, report['server_cpus']))}) used {m['server_cores']:.2f} cores "
            f"(gateways {m['gateway_cores']:.2f}, routers {m['router_cores']:.2f}), the load generator {m['loadgen_cores']:.2f}; "
            f"load average {report['loadavg']['start'][0]:g} at the start, {report['loadavg']['end'][0]:g} at the end"
        )
        print(f"runs: {', '.join(f'{d:,}' for d in m['deliveries_per_s_all'])} deliveries/s; planner: {report['planner_command']}")
        return
    print(f"fanroute capacity profile ({report['machine']['nproc']} × {report['machine']['cpu']}, {report['date']}, {report['seconds']:g} s)")
    for k, v in report["constants"].items():
        print(f"  {k:36} {v:>14,}")
    print("  CPU µs per publication (fan-out, payload: gateways measured / fitted, routers above rest measured / fitted):")
    for row in report["measurements"]["per_publication"]:
        print(
            f"    {row['subscribers']:>5} {row['payload']:>5} B {row['level'] or '':6}  {row['gateways_us']!s:>7} / {row['gateways_fitted_us']:<7}"
            f"  {row['routers_above_rest_us']!s:>6} / {row['routers_fitted_us']}"
        )
    print("  latency (fan-out per gateway, utilisation, p99 ms):")
    for pt in report["latency"]:
        print(f"    {pt['fanout_per_gateway']:>5} {pt['utilisation']!s:>6} {pt['p99_ms']:>8.2f}")


def add_profile_command(sub: Any, flag: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="measure the capacity model's per-process constants (--save-profile FILE)",
        description="CPU per delivery, publication, handshake and heartbeat, bytes per connection, "
        "subscription and topic, router publications/s per core, CPU per further copy and at rest, measured "
        "against real processes on 127.0.0.1; --save-profile writes the file fanroute capacity reads. "
        "--check compares the planner's ceiling of 2 gateways and 3 routers with a measured one.",
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
    p.add_argument("--save-check", metavar="FILE", help="with --check: write its report (JSON) to FILE")
    p.add_argument(
        "--copies", type=int, default=setting("copies").default,
        help="the routers' --copies in the cells and the check (default: the routers' own, %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(bench_main=profile_main)
