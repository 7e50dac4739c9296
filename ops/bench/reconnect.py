"""``fanroute bench reconnect`` and ``fanroute bench heartbeat``: recovery after faults.

Both start a local cluster (``--routers`` router and ``--gateways`` gateway processes
on free loopback ports, short heartbeats), connect ``--clients`` subscribers of one
topic spread over every gateway, and publish to that topic at a steady ``--rate``
with acknowledgements, through the gateway that the fault leaves alone, so every
``seq`` the cluster gave out is known.

``reconnect``
    SIGKILL the first gateway mid-stream. The clients it held notice, back off,
    reconnect to another gateway and resubscribe with ``since``. For each of them:

    * **recovery from the kill** = first *live* message after resubscribing (one
      whose ``seq`` is above the ``seq`` of the ``subscribed`` reply, so every missed
      one came before it) minus the moment the coordinator sent SIGKILL;
    * **recovery from the disconnect** = the same minus the moment the client itself
      saw the connection end;
    * **resubscribed** = the ``subscribed`` reply minus the kill (it does not wait
      for the next publication, so it is free of the publication interval).

``heartbeat``
    Two dead-peer measurements. *Gateway side*: SIGSTOP the client processes holding
    ``--frozen`` connections spread over the gateways and poll every gateway's
    ``/metrics`` (``fanroute_gateway_heartbeat_timeouts_total`` and
    ``fanroute_gateway_connections``) until they have closed them all. *Client side*: SIGSTOP a gateway and measure how
    long each client takes to declare the silent connection dead (nothing received for
    ``ping_interval + ping_timeout``), then to recover on another gateway.

Every client checks ``seq`` continuity (an *audit*): **lost** is every acked ``seq``
a client did not get (from its first ``subscribed`` on), **duplicated** every
``seq`` it got twice. **Stability** is the fraction of clients that ended connected
and complete (nothing lost, nothing unrecovered).

Clients are ``--client-procs`` processes (``multiprocessing``, spawn), each running
its share of the clients in one ``epoll`` loop (``--client light``, the default), or
the trio SDK, one :class:`fanroute.client.Client` per client (``--client sdk``). The
light client does what the SDK does — the same backoff policy
(:class:`fanroute.backoff.Backoff`, same defaults), URL rotation, resubscription with
``since``, duplicate drop and gap repair, the ``ping_interval + ping_timeout``
deadline, application pings — as a state machine per socket instead of trio tasks
and wsproto, because thousands of SDK clients cost more CPU than a 2-core machine
has beside the cluster under test. See ``ops/bench/RECONNECT.md``.
"""

from __future__ import annotations

import argparse
import base64
import errno
import heapq
import math
import multiprocessing
import os
import random
import resource
import selectors
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fanroute import clientcore as cc
from fanroute import localcluster
from fanroute.errors import BenchError
from fanroute.bench.loadgen import client_frame, cpu_seconds, emit_report, expect, machine, split_frames
from fanroute.localcluster import LocalClusterError

HOST = "127.0.0.1"
_READY_TIMEOUT = 60.0

# Targets printed beside the figures.
SOURCE = {"recovery_p95": 2.0, "recovery_p99": 5.0, "detection": 45.0, "stability": 0.99}
GOALS = {"recovery_p95": 1.0, "recovery_p99": 2.0, "lost": 0, "duplicated": 0}


# --- small shared helpers ---------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise the soft file-descriptor limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def _handshake(host: str, port: int) -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (host.encode(), port, key)
    )


def percentiles(values: list[float], of: int | None = None) -> dict[str, Any]:
    """Nearest-rank percentiles in seconds over ``of`` clients (default: the values).

    Clients without a value (not recovered within the bound) rank above every
    measured one: a percentile that falls among them is None — "more than the
    bound" — rather than hidden by ranking only those that made it."""
    v = sorted(values)
    total = max(len(v), of if of is not None else len(v))
    out: dict[str, Any] = {"count": len(v), "missing": total - len(v)}
    if not total:
        return {**out, "min": None, "p50": None, "p95": None, "p99": None, "max": None}

    def rank(q: float) -> float | None:
        i = max(0, math.ceil(q / 100 * total) - 1)
        return round(v[i], 4) if i < len(v) else None

    out.update(min=round(v[0], 4) if v else None, p50=rank(50), p95=rank(95), p99=rank(99))
    out["max"] = round(v[-1], 4) if v and len(v) == total else None
    return out


# --- the client side: what every client records -------------------------------------

# Shared counters per client process (one int64 each, written by that process only).
_F_ACTIVE, _F_RECOVERED, _F_DISCONNECTED, _F_COMPLETE, _F_RECEIVED, _F_AFFECTED, _F_OPEN = range(7)
_FIELDS = 7
_SWEEP = 0.05  # seconds between a light client process's deadline and ping checks


class Track:
    """One client's audit and fault timeline (times are ``time.monotonic()``, which is
    CLOCK_MONOTONIC, shared by every process of the machine)."""

    __slots__ = (
        "base", "hi", "lost", "dups", "gaps", "unrecovered", "received",
        "affected", "armed", "disc_t", "disc_why", "sub_t", "sub_recovered", "floor", "live_t",
        "attempts", "discs", "gw",
    )

    def __init__(self) -> None:
        self.base: int | None = None  # seq of the first subscribed reply
        self.hi = 0  # last seq accepted in order
        self.lost = 0  # seqs skipped over by an unrecovered resubscription
        self.dups = 0
        self.gaps = 0
        self.unrecovered = 0
        self.received = 0
        self.affected = False
        self.armed = False
        self.disc_t: float | None = None
        self.disc_why = ""
        self.sub_t: float | None = None
        self.sub_recovered: bool | None = None
        self.floor = 0
        self.live_t: float | None = None
        self.attempts = 0
        self.discs = 0
        self.gw = -1  # gateway index currently connected to, -1 for none

    def arm(self, gw: int) -> None:
        """The fault is about to happen to gateway ``gw``: watch from now on."""
        self.armed = True
        self.affected = self.gw == gw
        self.disc_t = self.sub_t = self.live_t = self.sub_recovered = None
        self.attempts = self.discs = 0

    def on_disconnect(self, now: float, why: str) -> None:
        if self.armed:
            self.discs += 1
            if self.disc_t is None:
                self.disc_t, self.disc_why = now, why
        self.gw = -1

    def on_attempt(self) -> None:
        if self.armed and self.disc_t is not None and self.live_t is None:
            self.attempts += 1

    def on_subscribed(self, now: float, seq: int) -> None:
        if self.base is None:
            self.base = self.hi = seq
        if self.armed and self.disc_t is not None and self.live_t is None:
            self.sub_t = now
            self.floor = seq

    def on_live(self, now: float, seq: int) -> None:
        if self.sub_t is not None and self.live_t is None and seq > self.floor:
            self.live_t = now

    def report(self, last: int, connected: bool) -> dict[str, Any]:
        base = self.base if self.base is not None else 0
        missing = max(0, last - max(self.hi, base)) if self.base is not None else max(0, last)
        return {
            "gw": self.gw,
            "connected": connected,
            "base": base,
            "hi": self.hi,
            "received": self.received,
            "lost": self.lost + missing,
            "duplicated": self.dups,
            "gaps": self.gaps,
            "unrecovered": self.unrecovered,
            "affected": self.affected,
            "disc_t": self.disc_t,
            "disc_why": self.disc_why,
            "sub_t": self.sub_t,
            "sub_recovered": self.sub_recovered,
            "live_t": self.live_t,
            "attempts": self.attempts,
            "discs": self.discs,
        }


# --- the light client: one state machine per socket, one epoll loop per process ----------

IDLE, CONNECTING, HANDSHAKE, OPEN = range(4)
NONE, PENDING, ACTIVE = range(3)
_PONG = b'{"type":"pong"'


class _Loop:
    """What the light clients of one process share: the selector, timers, settings."""

    def __init__(self, topic: str, opts: dict[str, Any]) -> None:
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Any]] = []
        self.tick = 0
        self.topic = topic
        self.opts = opts
        self.min_delay = opts["min_delay"]
        self.max_delay = opts["max_delay"]
        self.connect_timeout = opts["connect_timeout"]
        self.client_ping = opts["client_ping"]

    def later(self, at: float, client: Any) -> None:
        self.tick += 1
        heapq.heappush(self.timers, (at, self.tick, client))


DELIVERED = cc.DELIVERED  # what ClientCore.message returns for an in-order message


class LightClient:
    """A subscriber that does what ``fanroute.client.Client`` does, without trio.

    Every rule — URL rotation, backoff and close codes, resubscription with ``since``,
    duplicate drop and gap repair, the ``ping_interval + ping_timeout`` deadline, the
    application pings (every ``--client-ping`` seconds) — is
    :class:`fanroute.clientcore.ClientCore`'s, the SDK's and ``fanroute.js``'s one
    core; this class moves bytes between a non-blocking socket and it, and keeps the
    audit (:class:`Track`). It is *eager*: ``connect`` and ``subscribe`` go out in one
    write (the bench's gateways are anonymous), as before.

    The per-message path stays cheap: a message frame is recognised by its first
    bytes, only its ``seq`` is parsed, and :meth:`ClientCore.message` returns the shared
    :data:`~fanroute.clientcore.DELIVERED` tuple for an in-order one.
    """

    def __init__(self, loop: _Loop, urls: list[tuple[str, int, int]], rng: random.Random) -> None:
        self.loop = loop
        settings = cc.Settings(
            min_delay=loop.min_delay, max_delay=loop.max_delay, backoff_reset=5.0,
            connect_timeout=loop.connect_timeout, app_ping=loop.client_ping, eager=True,
        )
        self.core: cc.ClientCore[tuple[str, int, int]] = cc.ClientCore(urls, settings, rng=rng)
        self.core.subscribe(loop.topic)
        self.stream = self.core.streams[loop.topic]
        self._message = self.core.message  # bound once: on_message runs per message
        self._topic = loop.topic
        self.state = IDLE
        self.sub = NONE  # the stream's state, mirrored for the worker's sweep
        self.sock: socket.socket | None = None
        self.url: tuple[str, int, int] | None = None
        self.rest = b""
        self.track = Track()

    # --- connecting -----------------------------------------------------------

    def connect(self, now: float) -> None:
        actions = self.core.connect(now)
        if not actions:
            return  # stopped by a terminal close code
        self.url = host, port, _ = actions[0].url
        self.track.on_attempt()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex((host, port))
        self.sock, self.rest = s, b""
        self.state = CONNECTING
        if err not in (0, errno.EINPROGRESS):
            self.fail(now, f"connect: {errno.errorcode.get(err, err)}")
            return
        self.loop.sel.register(s, selectors.EVENT_WRITE, self)

    def on_writable(self, now: float) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(now, f"connect: {errno.errorcode.get(err, err)}")
            return
        host, port, _ = self.url
        try:
            self.sock.send(_handshake(host, port))
        except OSError as exc:
            self.fail(now, f"handshake: {exc}")
            return
        self.state = HANDSHAKE
        self.loop.sel.modify(self.sock, selectors.EVENT_READ, self)

    def fail(self, now: float, why: str, code: int | None = None) -> None:
        """The connection (or the attempt) ended: the core says when to try again."""
        if self.state == IDLE:
            return
        if self.sock is not None:
            try:
                self.loop.sel.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()
            self.sock = None
        if self.state == OPEN:
            self.track.on_disconnect(now, why)
        self.state, self.rest = IDLE, b""
        for action in self.core.closed(code, now, why):
            if type(action) is cc.ReconnectAt:
                self.loop.later(action.at, self)
            # Stop (4001, 4003, 1008): nothing is scheduled, the client stays down.
        self.sub = NONE

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError:
            pass  # the read side notices the broken connection

    def on_open(self, now: float) -> None:
        self.state = OPEN
        self.track.gw = self.url[2]
        # `connect` and `subscribe` in one write (eager): no wait for `connected`.
        self.act(now, self.core.opened(now))

    # --- reading --------------------------------------------------------------

    def on_readable(self, now: float) -> None:
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(now, f"recv: {exc.__class__.__name__}")
            return
        if not data:
            self.fail(now, "eof")
            return
        buf = self.rest + data if self.rest else data
        if self.state == HANDSHAKE:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.rest = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.fail(now, "refused: " + buf[:40].decode(errors="replace"))
                return
            buf = buf[end + 4 :]
            self.on_open(now)
        core = self.core
        core.heard(now)
        frames, rest_at = split_frames(buf)
        for op, start, end in frames:
            if op == 0x1:
                if buf.startswith(b'{"topic"', start):
                    at = buf.rfind(b'"seq":', start, end)
                    self.on_message(now, int(buf[at + 6 : end - 1]))
                elif not buf.startswith(_PONG, start):
                    self.act(now, core.received(orjson.loads(buf[start:end]), now))
                    if self.state != OPEN:
                        return
            elif op == 0x9:
                self.send(client_frame(bytes(buf[start:end]), 0xA))
            elif op == 0x8:
                code = int.from_bytes(buf[start : start + 2], "big") if end - start >= 2 else 1005
                self.fail(now, f"close {code}", code)
                return
        self.rest = buf[rest_at:]

    def on_message(self, now: float, seq: int) -> None:
        actions = self._message(self._topic, seq)
        track = self.track
        if actions is DELIVERED:
            track.hi = seq
            track.received += 1
            if track.live_t is None:
                track.on_live(now, seq)
        elif actions:
            track.gaps = self.stream.gaps
            self.act(now, actions)  # a gap: unsubscribe + subscribe with since
        else:
            track.dups = self.stream.duplicates

    def act(self, now: float, actions: Any) -> None:
        """Carry out the core's actions; the audit follows what they say."""
        out = []
        track = self.track
        for a in actions:
            kind = type(a)
            if kind is cc.Send:
                out.append(client_frame(orjson.dumps(a.frame)))
            elif kind is cc.Ping:
                out.append(client_frame(b'{"type":"ping","ts":%d}' % int(time.time() * 1000)))
            elif kind is cc.Subscribed:
                if not a.resumed:
                    track.hi = a.seq  # a first subscribe starts at the stream's head
                track.on_subscribed(now, a.seq)
                if track.sub_t == now:
                    track.sub_recovered = a.recovered
            elif kind is cc.Unrecovered:
                track.unrecovered += 1
                if a.seq > track.hi:
                    track.lost += a.seq - track.hi
                track.hi = a.seq
            elif kind is cc.Drop:
                if out:
                    self.send(b"".join(out))
                self.fail(now, "heartbeat" if a.code == 4009 else a.reason, a.code)
                return
            # Ready, Answer, SubscribeError (retried by the core, or the topic ended:
            # the stream leaves ACTIVE and the audit shows it) need nothing here.
        if out:
            self.send(b"".join(out))
        state = self.stream.state if self.core.streams.get(self.loop.topic) is self.stream else None
        self.sub = ACTIVE if state is cc.ACTIVE else PENDING if state in (cc.PENDING, cc.RETRY) else NONE

    def sweep(self, now: float) -> None:
        actions = self.core.tick(now)
        if actions:
            self.act(now, actions)


def _plan_urls(endpoints: list[tuple[str, int]], first: int) -> list[tuple[str, int, int]]:
    """All gateway URLs, starting at ``first`` (the SDK rotates through them in order)."""
    g = len(endpoints)
    return [(*endpoints[(first + k) % g], (first + k) % g) for k in range(g)]


def light_worker(w: int, specs: list[list[tuple[str, int, int]]], topic: str, opts: dict[str, Any], shared: Any, control: Any) -> None:
    """One client process with light clients. Commands on ``control``:
    ``("arm", gw)``, ``("target", last_seq)``, ``("report", last_seq)``, ``("close",)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when to stop
    raise_nofile()
    loop = _Loop(topic, opts)
    rng = random.Random(opts["seed"] * 1000 + w)
    clients = [LightClient(loop, urls, random.Random(rng.random())) for urls in specs]
    loop.sel.register(control, selectors.EVENT_READ, None)
    start = time.monotonic()
    for k, c in enumerate(clients):
        loop.later(start + k / opts["connect_rate"], c)
    base = w * _FIELDS
    ready_sent = False
    target: int | None = None
    last_sweep = 0.0
    running = True
    while running:
        now = time.monotonic()
        timeout = 0.05
        if loop.timers:
            timeout = max(0.0, min(timeout, loop.timers[0][0] - now))
        for key, ev in loop.sel.select(timeout):
            c = key.data
            now = time.monotonic()
            if c is None:
                cmd = control.recv()
                if cmd[0] == "arm":
                    for x in clients:
                        x.track.arm(cmd[1])
                    shared[base + _F_AFFECTED] = sum(1 for x in clients if x.track.affected)
                    control.send(("armed",))
                elif cmd[0] == "target":
                    target = cmd[1]
                elif cmd[0] == "report":
                    control.send(("report", [x.track.report(cmd[1], x.state == OPEN and x.sub == ACTIVE) for x in clients]))
                elif cmd[0] == "close":
                    running = False
                continue
            if ev & selectors.EVENT_WRITE and c.state == CONNECTING:
                c.on_writable(now)
            elif c.state in (HANDSHAKE, OPEN):
                c.on_readable(now)
        now = time.monotonic()
        while loop.timers and loop.timers[0][0] <= now:
            _, _, c = heapq.heappop(loop.timers)
            if c.state == IDLE:
                c.connect(now)
        if now - last_sweep >= _SWEEP:
            last_sweep = now
            active = recovered = disconnected = complete = received = opened = 0
            for c in clients:
                c.sweep(now)
                t = c.track
                received += t.received
                if c.state == OPEN:
                    opened += 1
                    if c.sub == ACTIVE:
                        active += 1
                if t.affected:
                    recovered += t.live_t is not None
                    disconnected += t.disc_t is not None
                if target is not None and c.sub == ACTIVE and t.hi >= target:
                    complete += 1
            shared[base + _F_ACTIVE] = active
            shared[base + _F_RECOVERED] = recovered
            shared[base + _F_DISCONNECTED] = disconnected
            shared[base + _F_COMPLETE] = complete
            shared[base + _F_RECEIVED] = received
            shared[base + _F_OPEN] = opened
            # Ready once every client has been subscribed at least once; one that
            # dropped since is the run's to report, not a reason to wait.
            if not ready_sent and all(c.track.base is not None for c in clients):
                ready_sent = True
                control.send(("ready", active))
    for c in clients:
        if c.sock is not None:
            c.sock.close()


# --- the SDK path: one fanroute.client.Client per client, under trio ----------------------


def sdk_worker(w: int, specs: list[list[tuple[str, int, int]]], topic: str, opts: dict[str, Any], shared: Any, control: Any) -> None:
    """One client process running ``fanroute.client.Client`` objects (same commands)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()
    import trio

    from fanroute.client import Client, Message, Unrecovered

    base = w * _FIELDS

    class Tracked(Client):
        """The SDK client, telling its Track when a connection ends and a reply comes."""

        def __init__(self, urls: list[tuple[str, int, int]], track: Track, **kw: Any) -> None:
            super().__init__([f"ws://{h}:{p}/" for h, p, _ in urls], **kw)
            self.gw_of = {f"ws://{h}:{p}/": g for h, p, g in urls}
            self.track = track

        def _disconnected(self) -> None:
            if self._ws is not None:
                self.track.on_disconnect(time.monotonic(), f"close {self.last_close_code}" if self.last_close_code else "lost")
            else:
                self.track.on_attempt()
            super()._disconnected()

        async def _on_subscribed(self, sub: Any, msg: dict[str, Any]) -> None:
            now = time.monotonic()
            self.track.gw = self.gw_of.get(self.url or "", -1)
            self.track.on_subscribed(now, msg["seq"])
            if self.track.sub_t == now:
                self.track.sub_recovered = bool(msg.get("recovered", False))
            await super()._on_subscribed(sub, msg)

    tracks = [Track() for _ in specs]
    clients: list[Any] = [None] * len(specs)
    subs: list[Any] = [None] * len(specs)

    async def one(k: int, urls: list[tuple[str, int, int]]) -> None:
        track = tracks[k]
        async with Tracked(urls, track, min_delay=opts["min_delay"], max_delay=opts["max_delay"], connect_timeout=opts["connect_timeout"]) as c:
            clients[k] = c
            sub = subs[k] = await c.subscribe(topic)
            async for item in sub:
                now = time.monotonic()
                if isinstance(item, Unrecovered):
                    track.unrecovered += 1
                    continue
                assert isinstance(item, Message)
                if item.seq <= track.hi:
                    track.dups += 1
                    continue
                if item.seq != track.hi + 1:
                    track.lost += item.seq - track.hi - 1
                track.hi = item.seq
                track.received += 1
                if track.live_t is None:
                    track.on_live(now, item.seq)

    def connected(k: int) -> bool:
        c = clients[k]
        return c is not None and c.connected and subs[k] is not None and subs[k].epoch is not None

    async def main() -> None:
        target: int | None = None
        ready_sent = False
        async with trio.open_nursery() as nursery:
            for k, urls in enumerate(specs):
                nursery.start_soon(one, k, urls)
                await trio.sleep(1 / opts["connect_rate"])
            while True:
                cmd = await trio.to_thread.run_sync(lambda: control.recv() if control.poll(0.05) else None)
                if cmd is not None:
                    if cmd[0] == "arm":
                        for k, t in enumerate(tracks):
                            t.gw = clients[k].track.gw if connected(k) else -1
                            t.arm(cmd[1])
                        shared[base + _F_AFFECTED] = sum(1 for t in tracks if t.affected)
                        control.send(("armed",))
                    elif cmd[0] == "target":
                        target = cmd[1]
                    elif cmd[0] == "report":
                        for k, t in enumerate(tracks):
                            s = subs[k]
                            if s is not None:
                                t.dups += s.duplicates
                                t.gaps += s.gaps
                        control.send(("report", [t.report(cmd[1], connected(k)) for k, t in enumerate(tracks)]))
                    elif cmd[0] == "close":
                        nursery.cancel_scope.cancel()
                        return
                active = sum(1 for k in range(len(specs)) if connected(k))
                shared[base + _F_ACTIVE] = active
                shared[base + _F_OPEN] = active
                shared[base + _F_RECOVERED] = sum(1 for t in tracks if t.affected and t.live_t is not None)
                shared[base + _F_DISCONNECTED] = sum(1 for t in tracks if t.affected and t.disc_t is not None)
                shared[base + _F_RECEIVED] = sum(t.received for t in tracks)
                if target is not None:
                    shared[base + _F_COMPLETE] = sum(1 for k, t in enumerate(tracks) if connected(k) and t.hi >= target)
                if not ready_sent and all(t.base is not None for t in tracks):
                    ready_sent = True
                    control.send(("ready", active))

    trio.run(main)


# --- the publisher: acked publications at a steady rate ----------------------------------


def _publisher_connect(host: str, port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection((host, port), timeout=5)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_handshake(host, port))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise BenchError("closed during the handshake")
            buf += chunk
        if not buf.startswith(b"HTTP/1.1 101"):
            raise BenchError(f"handshake refused: {buf[:60]!r}")
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock, buf.split(b"\r\n\r\n", 1)[1]


def publisher_worker(host: str, port: int, topic: str, rate: float, shared: Any, control: Any) -> None:
    """Publishes ``{"type":"publish","id":i}`` at ``rate``/s between ``("start",)`` and
    ``("stop",)``, then waits (bounded) for the last acks and answers
    ``("done", sent, acked seqs, errors, closes)``. Shared: [0] acked, [1] last seq.

    If the gateway closes the connection, the publisher reconnects (as an SDK
    client would) and goes on; publications in flight then are never acked, and
    every close is reported."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sock, rest = _publisher_connect(host, port)
    except Exception as exc:
        control.send(("error", f"publisher: {type(exc).__name__}: {exc}"))
        return
    control.send(("ready",))
    prefix = b'{"type":"publish","topic":' + orjson.dumps(topic) + b',"payload":'
    acked: list[int] = []
    errors: list[str] = []
    closes: list[int] = []
    lost_acks = 0
    sent = 0
    started: float | None = None
    stop_by: float | None = None
    in_flight: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)

    def reconnect(code: int) -> None:
        nonlocal sock, rest, lost_acks
        closes.append(code)
        lost_acks += len(in_flight)
        in_flight.clear()
        sel.unregister(sock)
        sock.close()
        while True:
            try:
                sock, rest = _publisher_connect(host, port)
                break
            except (OSError, BenchError):
                if stop_by is not None and time.monotonic() > stop_by:
                    raise
                time.sleep(0.1)
        sel.register(sock, selectors.EVENT_READ)

    try:
        while True:
            now = time.monotonic()
            if control.poll(0):
                cmd = control.recv()
                if cmd[0] == "start":
                    started = now
                elif cmd[0] == "stop":
                    stop_by = now + 10.0
            if started is not None and stop_by is None:
                while now >= started + sent / rate:
                    sent += 1
                    in_flight.add(sent)
                    try:
                        sock.send(client_frame(prefix + b'%d,"id":%d}' % (sent, sent)))
                    except OSError:
                        break  # the read side sees the close and reconnects
            if stop_by is not None and (not in_flight or now > stop_by):
                break
            due = started + sent / rate if started is not None and stop_by is None else now + 0.05
            if not sel.select(max(0.0, min(0.05, due - time.monotonic()))):
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                reconnect(1006)
                continue
            buf = rest + data
            pos, n = 0, len(buf)
            closed = None
            while pos + 2 <= n:
                ln = buf[pos + 1] & 0x7F
                start = pos + 2
                if ln == 126:
                    if pos + 4 > n:
                        break
                    ln, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
                elif ln == 127:
                    if pos + 10 > n:
                        break
                    ln, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
                if start + ln > n:
                    break
                op, body = buf[pos] & 0x0F, buf[start : start + ln]
                pos = start + ln
                if op == 0x1:
                    msg = orjson.loads(body)
                    if msg.get("type") == "published":
                        in_flight.discard(msg.get("id"))
                        acked.append(msg["seq"])
                        shared[0] = len(acked)
                        shared[1] = max(shared[1], msg["seq"])
                    elif msg.get("type") == "error":
                        in_flight.discard(msg.get("id"))
                        errors.append(f"{msg.get('code')}: {msg.get('message')}")
                elif op == 0x9:
                    try:
                        sock.send(client_frame(bytes(body), 0xA))
                    except OSError:
                        pass
                elif op == 0x8:
                    closed = int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005
                    break
            rest = buf[pos:]
            if closed is not None:
                reconnect(closed)
    except Exception as exc:
        control.send(("error", f"publisher: {type(exc).__name__}: {exc}"))
        return
    sock.close()
    control.send(("done", sent, acked, errors, closes, lost_acks + len(in_flight)))


# --- the cluster under test ----------------------------------------------------------


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in Prometheus text (0 if absent)."""
    return localcluster.metric(text, name, default=0.0)


class LocalCluster(localcluster.LocalCluster):
    """The cluster under test (:class:`fanroute.localcluster.LocalCluster`): gateways
    by number, and a process that died is a BenchError."""

    def metrics(self, i: int) -> str:
        return self.gateways[i].metrics(timeout=2.0)

    def check_alive(self, skip: tuple[int, ...] = ()) -> None:
        try:
            super().check_alive(skip=[self.gateways[i].name for i in skip])
        except LocalClusterError as exc:
            raise BenchError(str(exc)) from None


def start_cluster(gateways: int, routers: int, ping_interval: float, ping_timeout: float, logdir: Path, extra: list[str]) -> LocalCluster:
    """Routers and gateways as ``python -m fanroute.cli`` processes on free ports,
    waited for by polling every ``/readyz`` (never a fixed sleep)."""
    cluster = LocalCluster(
        gateways,
        routers,
        gateway_args=["--ping-interval", f"{ping_interval:g}", "--ping-timeout", f"{ping_timeout:g}", *extra],
        env={"FANROUTE_LOG_LEVEL": "warning"},
        clean_env=True,
        logdir=logdir,
        stop_timeout=3.0,
    )
    try:
        cluster.start()
        cluster.wait_ready(_READY_TIMEOUT)
    except LocalClusterError as exc:
        cluster.stop()
        raise BenchError(str(exc)) from None
    except BaseException:
        cluster.stop()
        raise
    return cluster


# --- the coordinator ---------------------------------------------------------------------


class Pool:
    """Client processes and the publisher, stopped together."""

    def __init__(self, n_workers: int) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.shared = self.ctx.RawArray("q", max(1, n_workers) * _FIELDS)
        self.pub_shared = self.ctx.RawArray("q", 2)
        self.procs: list[Any] = []
        self.pipes: list[Any] = []
        self.pub: Any = None
        self.pub_proc: Any = None

    def start(self, fn: Any, args: tuple) -> tuple[Any, Any]:
        here, there = self.ctx.Pipe()
        proc = self.ctx.Process(target=fn, args=(*args, there), daemon=True)
        proc.start()
        there.close()
        return proc, here

    def add_worker(self, fn: Any, args: tuple) -> None:
        proc, pipe = self.start(fn, args)
        self.procs.append(proc)
        self.pipes.append(pipe)

    @staticmethod
    def expect(pipe: Any, kind: str, timeout: float) -> tuple:
        return expect(pipe, kind, timeout, BenchError, "a client process")

    def total(self, f: int, workers: list[int] | None = None) -> int:
        ws = range(len(self.procs)) if workers is None else workers
        return sum(self.shared[w * _FIELDS + f] for w in ws)

    def broadcast(self, cmd: tuple, reply: str | None = None, timeout: float = 30.0, workers: list[int] | None = None) -> list[tuple]:
        ws = range(len(self.pipes)) if workers is None else workers
        for w in ws:
            self.pipes[w].send(cmd)
        return [self.expect(self.pipes[w], reply, timeout) for w in ws] if reply else []

    def stop(self) -> None:
        for proc in [*self.procs, self.pub_proc]:
            if proc is not None and proc.pid is not None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except OSError:
                    pass
        for pipe in [*self.pipes, self.pub]:
            if pipe is not None:
                try:
                    pipe.send(("close",))
                except OSError:
                    pass
        deadline = time.monotonic() + 3.0
        for proc in [*self.procs, self.pub_proc]:
            if proc is None:
                continue
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()


@dataclass
class Settings:
    clients: int
    rate: float
    gateways: int
    routers: int
    ping_interval: float
    ping_timeout: float
    client_procs: int
    client: str
    client_ping: float
    min_delay: float
    max_delay: float
    connect_rate: float
    warmup: float
    after: float
    timeout: float
    seed: int
    frozen: int = 0
    logs: str = ""
    connect_timeout: float = 5.0
    gateway_args: list[str] = field(default_factory=list)

    def opts(self) -> dict[str, Any]:
        return {
            "min_delay": self.min_delay,
            "max_delay": self.max_delay,
            "connect_timeout": self.connect_timeout,
            "client_ping": self.client_ping,
            "connect_rate": self.connect_rate,
            "seed": self.seed,
        }


def _start_clients(pool: Pool, s: Settings, endpoints: list[tuple[str, int]], topic: str, n: int, procs: int, first_gw: Any, say: Any) -> list[int]:
    """Start ``procs`` client processes holding ``n`` clients; client ``i`` starts on
    gateway ``first_gw(i)`` and rotates through all of them. Returns the new workers."""
    fn = sdk_worker if s.client == "sdk" else light_worker
    specs = [_plan_urls(endpoints, first_gw(i)) for i in range(n)]
    new = []
    for k in range(procs):
        new.append(len(pool.procs))
        pool.add_worker(fn, (len(pool.procs), specs[k::procs], topic, s.opts(), pool.shared))
    deadline = time.monotonic() + 60 + n / s.connect_rate * 3
    pending = list(new)
    while pending:
        say("connecting clients (subscribed now)", pool.total(_F_ACTIVE, new), n)
        for w in list(pending):
            if pool.pipes[w].poll(0):
                pool.expect(pool.pipes[w], "ready", 0)
                pending.remove(w)
        if time.monotonic() > deadline:
            raise BenchError(f"clients not all subscribed once within the bound ({n / s.connect_rate * 3 + 60:.0f} s): {pool.total(_F_ACTIVE, new)}/{n} subscribed now, {pool.total(_F_OPEN, new)} connected")
        time.sleep(0.05)
    return new


def _start_publisher(pool: Pool, endpoint: tuple[str, int], topic: str, rate: float) -> None:
    pool.pub_proc, pool.pub = pool.start(publisher_worker, (*endpoint, topic, rate, pool.pub_shared))
    pool.expect(pool.pub, "ready", 30)
    pool.pub.send(("start",))


def _stop_publisher(pool: Pool) -> dict[str, Any]:
    pool.pub.send(("stop",))
    _, sent, acked, errors, closes, unanswered = pool.expect(pool.pub, "done", 30)
    return {
        "sent": sent,
        "acked": len(acked),
        "unanswered": unanswered,
        "last_seq": max(acked, default=0),
        "acked_in_order": acked == sorted(acked) and len(set(acked)) == len(acked),
        "errors": errors[:10],
        "error_count": len(errors),
        "closes": closes,
    }


def _wait(pred: Any, timeout: float, alive: Any, say: Any = None) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        alive()
        if say:
            say()
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _audit(records: list[dict[str, Any]]) -> dict[str, Any]:
    stable = sum(1 for r in records if r["connected"] and r["lost"] == 0 and r["unrecovered"] == 0)
    return {
        "lost": sum(r["lost"] for r in records),
        "duplicated": sum(r["duplicated"] for r in records),
        "gaps_repaired": sum(r["gaps"] for r in records),
        "unrecovered": sum(r["unrecovered"] for r in records),
        "clients_losing": sum(1 for r in records if r["lost"]),
        "connected_at_end": sum(1 for r in records if r["connected"]),
        "stability": {"clients": len(records), "stable": stable, "rate": round(stable / len(records), 5) if records else None},
    }


def _recovery(records: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    hit = [r for r in records if r["affected"]]
    live = [r for r in hit if r["live_t"] is not None]
    why: dict[str, int] = {}
    for r in hit:
        if r["disc_t"] is not None:
            key = r["disc_why"].split(":")[0]
            why[key] = why.get(key, 0) + 1
    return {
        "affected": len(hit),
        "recovered": len(live),
        "not_recovered": len(hit) - len(live),
        "recovery_from_fault_s": percentiles([r["live_t"] - t0 for r in live], len(hit)),
        "recovery_from_disconnect_s": percentiles([r["live_t"] - r["disc_t"] for r in live if r["disc_t"] is not None], len(hit)),
        "resubscribed_from_fault_s": percentiles([r["sub_t"] - t0 for r in hit if r["sub_t"] is not None], len(hit)),
        "disconnect_seen_s": percentiles([r["disc_t"] - t0 for r in hit if r["disc_t"] is not None], len(hit)),
        "caught_up_at_end": sum(1 for r in hit if r["connected"] and r["lost"] == 0),
        "resumed_from_history": sum(1 for r in live if r["sub_recovered"]),
        "attempts": percentiles([float(r["attempts"]) for r in hit if r["disc_t"] is not None]),
        "disconnect_reasons": why,
        "unaffected_disconnected": sum(1 for r in records if not r["affected"] and r["discs"]),
    }


def gateway_closes(text: str) -> dict[str, float]:
    """Closed and refused connections of one gateway by reason (from /metrics)."""
    out: dict[str, float] = {}
    shorts = {"fanroute_gateway_connections_closed_total": "closed", "fanroute_gateway_connections_rejected_total": "rejected"}
    for sample in localcluster.samples(text):
        short = shorts.get(sample.name)
        if short and sample.labels and sample.value:
            key = short + " " + ",".join(sample.labels.values())
            out[key] = out.get(key, 0) + sample.value
    return out


def _gateways_report(cluster: LocalCluster, skip: tuple[int, ...]) -> dict[str, Any]:
    out = {}
    for i, g in enumerate(cluster.gateways):
        if i in skip:
            continue
        try:
            out[g.name] = gateway_closes(cluster.metrics(i))
        except OSError as exc:
            out[g.name] = {"error": str(exc)}
    return out


def _cpu_of(cluster: LocalCluster, pool: Pool) -> dict[str, float]:
    out = {n.name: cpu_seconds(n.pid) for n in cluster.nodes}
    out["clients"] = sum(cpu_seconds(p.pid) for p in pool.procs if p.pid)
    return out


def _cpu_delta(a: dict[str, float], b: dict[str, float], seconds: float) -> dict[str, float]:
    # A process gone by the second reading (the killed gateway) has no figure.
    return {k: round((b[k] - a[k]) / seconds, 3) for k in a if b.get(k)} if seconds > 0 else {}


def _finish_audit(pool: Pool, workers: list[int], cluster: LocalCluster, skip: tuple[int, ...], say: Any, n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    publisher = _stop_publisher(pool)
    last = publisher["last_seq"]
    pool.broadcast(("target", last), workers=workers)
    drained = _wait(
        lambda: pool.total(_F_COMPLETE, workers) >= n,
        15.0,
        lambda: cluster.check_alive(skip),
        lambda: say("draining: every client up to the last acked seq", pool.total(_F_COMPLETE, workers), n),
    )
    records: list[dict[str, Any]] = []
    for _, part in pool.broadcast(("report", last), "report", workers=workers):
        records += part
    publisher["drained"] = drained
    return publisher, records


def _logdir(s: Settings, tmp: str) -> Path:
    """Where the cluster's processes write their logs: ``--logs``, or a temporary
    directory removed at the end."""
    if s.logs:
        path = Path(s.logs)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tmp)


def run_reconnect(s: Settings, say: Any) -> dict[str, Any]:
    topic = f"bench.reconnect.{os.getpid()}.{time.monotonic_ns()}"
    with tempfile.TemporaryDirectory(prefix="fanroute-reconnect-") as tmp:
        say("starting the cluster", 0, 1)
        cluster = start_cluster(s.gateways, s.routers, s.ping_interval, s.ping_timeout, _logdir(s, tmp), s.gateway_args)
        pool = Pool(s.client_procs)
        try:
            workers = _start_clients(pool, s, cluster.endpoints, topic, s.clients, s.client_procs, lambda i: i % s.gateways, say)
            _start_publisher(pool, cluster.endpoints[-1], topic, s.rate)
            # Steady state: every client has received live messages, then warm-up.
            _wait(lambda: pool.total(_F_RECEIVED) >= s.clients * 2, 30, cluster.check_alive, lambda: say("publishing: steady state", 0, 1))
            w0, end = _cpu_of(cluster, pool), time.monotonic() + s.warmup
            _wait(lambda: time.monotonic() >= end, s.warmup + 1, cluster.check_alive, lambda: say(f"publishing {s.rate:g}/s: warm-up", 0, 1))
            steady_cpu = _cpu_delta(w0, _cpu_of(cluster, pool), s.warmup)
            before = _gateways_report(cluster, ())
            connected_at_fault = pool.total(_F_ACTIVE)
            pool.broadcast(("arm", 0), "armed")
            affected = pool.total(_F_AFFECTED)
            cpu0 = _cpu_of(cluster, pool)
            t_kill = time.monotonic()
            cluster.gateways[0].popen.send_signal(signal.SIGKILL)
            alive = lambda: cluster.check_alive(skip=(0,))  # noqa: E731
            done = _wait(
                lambda: pool.total(_F_RECOVERED) >= affected,
                s.timeout,
                alive,
                lambda: say("SIGKILL gateway-0: clients recovering", pool.total(_F_RECOVERED), affected),
            )
            t_rec = time.monotonic()
            cpu1 = _cpu_of(cluster, pool)
            end = time.monotonic() + s.after
            _wait(lambda: time.monotonic() >= end, s.after + 1, alive, lambda: say("publishing after recovery", 0, 1))
            publisher, records = _finish_audit(pool, workers, cluster, (0,), say, s.clients)
            after = _gateways_report(cluster, (0,))
        finally:
            say("stopping", 0, 1)
            pool.stop()
            cluster.stop()
    rec = _recovery(records, t_kill)
    rec["subscribed_at_fault"] = connected_at_fault
    rec["cpu_cores_steady"] = steady_cpu
    rec["gateway_closes_before_fault"] = before
    rec["gateway_closes_at_end"] = after
    rec["all_recovered_within_bound"] = done
    rec["cpu_cores_during_recovery"] = _cpu_delta(cpu0, cpu1, t_rec - t_kill)
    audit = _audit(records)
    p95, p99 = rec["recovery_from_fault_s"]["p95"], rec["recovery_from_fault_s"]["p99"]
    targets = [
        _target("recovery P95 (from kill)", p95, "s", SOURCE["recovery_p95"], GOALS["recovery_p95"], "<"),
        _target("recovery P99 (from kill)", p99, "s", SOURCE["recovery_p99"], GOALS["recovery_p99"], "<"),
        _target("stability", audit["stability"]["rate"], "ratio", SOURCE["stability"], None, ">="),
        _target("messages lost", audit["lost"], "count", None, 0, "=="),
        _target("messages duplicated", audit["duplicated"], "count", None, 0, "=="),
    ]
    return {"benchmark": "reconnect", "fault": "SIGKILL gateway-0", "recovery": rec, "audit": audit, "publisher": publisher, "targets": targets}


def run_heartbeat(s: Settings, say: Any) -> dict[str, Any]:
    bound = s.ping_interval + s.ping_timeout
    topic = f"bench.heartbeat.{os.getpid()}.{time.monotonic_ns()}"
    with tempfile.TemporaryDirectory(prefix="fanroute-heartbeat-") as tmp:
        say("starting the cluster", 0, 1)
        cluster = start_cluster(s.gateways, s.routers, s.ping_interval, s.ping_timeout, _logdir(s, tmp), s.gateway_args)
        frozen_n = s.frozen or s.clients
        frozen_procs = max(1, min(s.client_procs, math.ceil(frozen_n / 1000)))
        pool = Pool(frozen_procs + s.client_procs)
        try:
            _start_publisher(pool, cluster.endpoints[-1], topic, s.rate)
            # (a) the gateway finds clients that stopped answering.
            # Spread over every gateway, as in production; each gateway must find its own.
            frozen = _start_clients(pool, s, cluster.endpoints, topic, frozen_n, frozen_procs, lambda i: i % s.gateways, say)
            _wait(lambda: pool.total(_F_RECEIVED, frozen) >= frozen_n, 30, cluster.check_alive, lambda: say("publishing: steady state", 0, 1))
            def gateways_now() -> tuple[float, float]:
                texts = [cluster.metrics(i) for i in range(len(cluster.gateways))]
                return (
                    sum(metric(t, "fanroute_gateway_heartbeat_timeouts_total") for t in texts),
                    sum(metric(t, "fanroute_gateway_connections") for t in texts),
                )

            timeouts0, conns0 = gateways_now()
            t_stop = time.monotonic()
            for w in frozen:
                os.kill(pool.procs[w].pid, signal.SIGSTOP)
            series: list[tuple[float, float, float]] = []

            def poll() -> bool:
                timeouts, conns = gateways_now()
                series.append((time.monotonic() - t_stop, timeouts - timeouts0, conns))
                say("SIGSTOP clients: gateway detecting", int(series[-1][1]), frozen_n)
                # Done when every frozen connection timed out and was released
                # (the gauge falls once the gateway gave up its close handshake).
                return series[-1][1] >= frozen_n and series[-1][2] <= conns0 - frozen_n

            _wait(poll, bound + s.timeout, cluster.check_alive)
            # The k-th timeout (release) happened by the first poll that counted k.
            firsts, released = [], []
            for k in range(1, frozen_n + 1):
                hit = next((t for t, n, _ in series if n >= k), None)
                if hit is not None:
                    firsts.append(hit)
                hit = next((t for t, _, c in series if conns0 - c >= k), None)
                if hit is not None:
                    released.append(hit)
            for w in frozen:
                pool.procs[w].kill()
                pool.procs[w].join(5)
            server = {
                "clients": frozen_n,
                "connections_before": conns0,
                "detected": int(series[-1][1]) if series else 0,
                "connections_after": series[-1][2] if series else None,
                "detection_s": percentiles(firsts, frozen_n),
                "released_s": percentiles(released, frozen_n),
                "poll_interval_s": round((series[-1][0] - series[0][0]) / max(1, len(series) - 1), 4) if len(series) > 1 else None,
                "bound_s": bound,
            }
            # (b) clients find a gateway that stopped answering.
            active = _start_clients(pool, s, cluster.endpoints, topic, s.clients, s.client_procs, lambda i: i % s.gateways, say)
            _wait(lambda: pool.total(_F_RECEIVED, active) >= s.clients * 2, 30, cluster.check_alive, lambda: say("publishing: steady state", 0, 1))
            pool.broadcast(("arm", 0), "armed", workers=active)
            affected = pool.total(_F_AFFECTED, active)
            t_freeze = time.monotonic()
            cluster.gateways[0].popen.send_signal(signal.SIGSTOP)
            try:
                _wait(
                    lambda: pool.total(_F_RECOVERED, active) >= affected,
                    bound + s.timeout,
                    lambda: cluster.check_alive(skip=(0,)),
                    lambda: say("SIGSTOP gateway-0: clients detecting", pool.total(_F_DISCONNECTED, active), affected),
                )
                end = time.monotonic() + s.after
                _wait(lambda: time.monotonic() >= end, s.after + 1, cluster.check_alive, lambda: say("publishing after recovery", 0, 1))
                publisher, records = _finish_audit(pool, active, cluster, (0,), say, s.clients)
            finally:
                cluster.gateways[0].popen.send_signal(signal.SIGCONT)
        finally:
            say("stopping", 0, 1)
            pool.stop()
            cluster.stop()
    rec = _recovery(records, t_freeze)
    client = {
        "clients": s.clients,
        "affected": rec["affected"],
        "detected": rec["disconnect_seen_s"]["count"],
        "detection_s": rec["disconnect_seen_s"],
        "recovery_from_fault_s": rec["recovery_from_fault_s"],
        "resubscribed_from_fault_s": rec["resubscribed_from_fault_s"],
        "disconnect_reasons": rec["disconnect_reasons"],
        "bound_s": bound,
    }
    audit = _audit(records)
    # fanroute's goal is ping_interval + ping_timeout; each side checks its deadline
    # periodically, so that check period is allowed on top (the JSON gives both).
    server["check_period_s"] = gateway_sweep(s.ping_interval, s.ping_timeout)
    client["check_period_s"] = client_check_period(s, bound)
    targets = [
        _target("gateway finds dead clients (last)", server["detection_s"]["max"] if server["detected"] >= frozen_n else None, "s", SOURCE["detection"], round(bound + server["check_period_s"], 3), "<="),
        _target("client finds a dead gateway (max)", client["detection_s"]["max"] if client["detected"] >= client["affected"] else None, "s", SOURCE["detection"], round(bound + client["check_period_s"], 3), "<="),
        _target("messages lost", audit["lost"], "count", None, 0, "=="),
        _target("messages duplicated", audit["duplicated"], "count", None, 0, "=="),
    ]
    return {"benchmark": "heartbeat", "server_side": server, "client_side": client, "audit": audit, "publisher": publisher, "targets": targets}


def gateway_sweep(ping_interval: float, ping_timeout: float) -> float:
    """How often the gateway's heartbeat sweep runs (``gateway/server.py``)."""
    return max(0.02, min(1.0, ping_interval / 4, ping_timeout / 4))


def client_check_period(s: Settings, deadline: float) -> float:
    """How often a client checks its silence deadline: the SDK every
    ``min(ping_interval, deadline / 4)``, the light client at every 50 ms sweep."""
    return min(s.ping_interval, deadline / 4) if s.client == "sdk" else _SWEEP


def _target(name: str, value: Any, unit: str, source: float | None, goal: float | None, op: str) -> dict[str, Any]:
    def ok(limit: float | None) -> bool | None:
        if limit is None:
            return None
        if value is None:
            return False
        return {"<": value < limit, "<=": value <= limit, ">=": value >= limit, "==": value == limit}[op]

    return {"metric": name, "measured": value, "unit": unit, "op": op, "source": source, "fanroute": goal, "source_ok": ok(source), "fanroute_ok": ok(goal)}


# --- output -----------------------------------------------------------------------------


def _fmt(value: Any, unit: str, bound: float | None = None) -> str:
    if value is None:
        return f"> {bound:g} s (bound)" if unit == "s" and bound else "—"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ratio":
        return f"{value * 100:.2f} %"
    return f"{value:,}"


def _fmt_target(limit: Any, op: str, unit: str, ok: bool | None) -> str:
    if limit is None:
        return ""
    mark = "" if ok is None else (" [green]✓[/]" if ok else " [red]✗[/]")
    return f"{op} {_fmt(limit, unit)}{mark}"


def _cpu_line(cpu: dict[str, float]) -> str:
    gw = sum(v for k, v in cpu.items() if k.startswith("gateway"))
    rt = sum(v for k, v in cpu.items() if k.startswith("router"))
    return f"{gw:.2f} / {rt:.2f} / {cpu.get('clients', 0.0):.2f}"


def render(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    m, c = report["machine"], report["config"]
    head = (
        f"{c['clients']:,} clients ({c['client']} client, {c['client_procs']} process{'es' if c['client_procs'] != 1 else ''}), {c['gateways']} gateways, {c['routers']} routers, "
        f"{c['rate']:g} publications/s, ping {c['ping_interval']:g}+{c['ping_timeout']:g} s — {m['nproc']} × {m['cpu']}"
    )
    rows: list[tuple[str, str]] = []

    bound = "n/r"  # not recovered (or not seen) by the end of the run

    def dist(label: str, d: dict[str, Any]) -> None:
        def f(x: float | None) -> str:
            return bound if x is None else f"{x:.3f}"

        if d["count"]:
            missing = f", n/r: {d['missing']:,} not by the end of the run" if d.get("missing") else ""
            rows.append((label, f"p50 {f(d['p50'])}  p95 {f(d['p95'])}  p99 {f(d['p99'])}  max {f(d['max'])} s  (n={d['count']:,}{missing})"))
        else:
            rows.append((label, "—"))

    a = report["audit"]
    if report["benchmark"] == "reconnect":
        r = report["recovery"]
        title = "fanroute bench reconnect — SIGKILL one gateway mid-stream"
        rows.append(("subscribed when the gateway was killed", f"{r['subscribed_at_fault']:,}/{c['clients']:,}"))
        rows.append(("CPU cores, steady state (gateways / routers / clients)", _cpu_line(r["cpu_cores_steady"])))
        rows.append(("CPU cores, kill → all recovered", _cpu_line(r["cpu_cores_during_recovery"])))
        rows.append(("clients on the killed gateway", f"{r['affected']:,} (recovered {r['recovered']:,}, not {r['not_recovered']:,})"))
        dist("recovery from the kill", r["recovery_from_fault_s"])
        dist("recovery from the client's disconnect", r["recovery_from_disconnect_s"])
        dist("resubscribed (reply) from the kill", r["resubscribed_from_fault_s"])
        dist("disconnect seen by the client", r["disconnect_seen_s"])
        rows.append(("resumed from history (recovered:true)", f"{r['resumed_from_history']:,}"))
        rows.append(("of those, connected and complete at the end", f"{r['caught_up_at_end']:,}"))
        rows.append(("clients on the other gateway that dropped", f"{r['unaffected_disconnected']:,}"))
    else:
        sv, cl = report["server_side"], report["client_side"]
        title = "fanroute bench heartbeat — dead peers, both directions"
        rows.append(("gateway side: SIGSTOP a client process", f"{sv['detected']:,}/{sv['clients']:,} closed by heartbeat timeout"))
        dist("  time to heartbeat timeout (metrics polled)", sv["detection_s"])
        dist("  time to connection released (gauge)", sv["released_s"])
        rows.append(("client side: SIGSTOP a gateway", f"{cl['detected']:,}/{cl['affected']:,} declared it dead"))
        dist("  time to notice", cl["detection_s"])
        dist("  recovery from the freeze", cl["recovery_from_fault_s"])
    p = report["publisher"]
    rows.append(("publisher", f"{p['acked']:,} acked of {p['sent']:,} sent, {p['error_count']} errors"))
    rows.append(("lost / duplicated / gaps repaired / unrecovered", f"{a['lost']:,} / {a['duplicated']:,} / {a['gaps_repaired']:,} / {a['unrecovered']:,}"))
    st = a["stability"]
    rows.append(("stable (connected and complete at the end)", f"{st['stable']:,}/{st['clients']:,}"))
    facts = Table(title=title, caption=head, show_header=False)
    facts.add_column("what")
    facts.add_column("measured")
    for k, v in rows:
        facts.add_row(k, v)
    console.print(facts)
    t = Table(title="against the targets")
    for col in ("metric", "measured", "source design", "fanroute goal"):
        t.add_column(col)
    for x in report["targets"]:
        t.add_row(x["metric"], _fmt(x["measured"], x["unit"], c["timeout"]), _fmt_target(x["source"], x["op"], x["unit"], x["source_ok"]), _fmt_target(x["fanroute"], x["op"], x["unit"], x["fanroute_ok"]))
    console.print(t)


def bench_main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    kind = args.bench
    n = args.clients
    for name, value in (("--clients", n), ("--rate", args.rate), ("--gateways", args.gateways - 1), ("--routers", args.routers)):
        if value <= 0:
            print(f"fanroute: {name} is too small", file=sys.stderr)
            return 2
    per = max(1, args.clients_per_proc)
    procs = args.client_procs or max(1, math.ceil(n / per))
    s = Settings(
        clients=n, rate=args.rate, gateways=args.gateways, routers=args.routers,
        ping_interval=args.ping_interval, ping_timeout=args.ping_timeout,
        client_procs=min(procs, n), client=args.client,
        client_ping=args.ping_interval if args.client_ping < 0 else args.client_ping,
        min_delay=args.min_delay, max_delay=args.max_delay, connect_rate=args.connect_rate,
        warmup=args.warmup, after=args.after, timeout=args.timeout, seed=args.seed,
        frozen=getattr(args, "frozen", 0),
        logs=args.logs,
        connect_timeout=args.connect_timeout,
        gateway_args=args.gateway_args.split() if args.gateway_args else [],
    )
    if s.client not in ("light", "sdk"):
        print("fanroute: --client must be light or sdk", file=sys.stderr)
        return 2
    nofile = raise_nofile()
    facts = machine()
    err = Console(stderr=True)
    out = Console() if Console().is_terminal else Console(width=150)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=args.json) as bar:
            task = bar.add_task("starting", total=1)

            def say(text: str, done: int, total: int) -> None:
                bar.update(task, description=text, completed=done, total=max(1, total))

            result = (run_reconnect if kind == "reconnect" else run_heartbeat)(s, say)
    except BenchError as exc:
        print(f"fanroute: {exc}", file=sys.stderr)
        return 1
    config = asdict(s)
    config["nofile"] = list(nofile)
    report = {
        "benchmark": kind,
        "argv": sys.argv[1:],
        "machine": facts,
        "config": config,
        "seconds": round(time.monotonic() - started, 1),
        **{k: v for k, v in result.items() if k != "benchmark"},
    }
    emit_report(report, args.save, args.json, lambda: render(report, out))
    return 0


def add_reconnect_commands(subparsers: Any, flag: Any) -> None:
    """Add ``reconnect`` and ``heartbeat`` to a ``fanroute bench`` subparsers object."""
    for name, help, desc in (
        ("reconnect", "recovery after SIGKILL of a gateway: P50/P95/P99, loss, duplicates, stability",
         "SIGKILL one gateway of a local cluster mid-stream and measure how fast its clients "
         "recover on another one, and whether any message was lost or duplicated (seq audit)."),
        ("heartbeat", "dead-peer detection: frozen clients (gateway side) and a frozen gateway (client side)",
         "SIGSTOP a client process and time the gateway's heartbeat closes; SIGSTOP a gateway "
         "and time how long clients take to notice and recover."),
    ):
        p = subparsers.add_parser(name, help=help, description=desc)
        flag(p, "--clients", int, 1000, "subscribers")
        flag(p, "--rate", float, 20.0, "acked publications per second on the topic")
        flag(p, "--gateways", int, 2, "gateway processes (gateway-0 is the one the fault hits)")
        flag(p, "--routers", int, 3, "router processes")
        flag(p, "--ping-interval", float, 1.0, "gateways' --ping-interval for the bench")
        flag(p, "--ping-timeout", float, 1.0, "gateways' --ping-timeout for the bench")
        flag(p, "--client", str, "light", "client implementation: light (epoll state machine) or sdk (fanroute.client.Client)")
        flag(p, "--client-procs", int, 0, "client processes (0: one per --clients-per-proc clients)")
        flag(p, "--clients-per-proc", int, 1000, "clients per client process when --client-procs is 0")
        flag(p, "--client-ping", float, -1.0, "seconds between application pings per client (-1: the ping interval; 0: none)")
        flag(p, "--min-delay", float, 0.05, "clients' backoff: first delay cap in seconds (the SDK default)")
        flag(p, "--max-delay", float, 10.0, "clients' backoff: largest delay cap in seconds (the SDK default)")
        flag(p, "--connect-timeout", float, 5.0, "seconds a client waits for TCP + WebSocket handshake (the SDK default)")
        flag(p, "--connect-rate", float, 500.0, "initial connections per second per client process")
        flag(p, "--warmup", float, 2.0, "seconds of steady publishing before the fault")
        flag(p, "--after", float, 2.0, "seconds of publishing after every client recovered")
        flag(p, "--timeout", float, 60.0, "most seconds to wait for recovery (or detection) after the fault")
        flag(p, "--seed", int, 1, "seed of the clients' backoff jitter")
        flag(p, "--logs", str, "", "directory to keep the cluster's process logs in (default: a temporary one, removed)")
        flag(p, "--gateway-args", str, "", "extra flags for every gateway, space-separated")
        if name == "heartbeat":
            flag(p, "--frozen", int, 0, "connections frozen in the gateway-side test (0: --clients)")
        p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
        p.add_argument("--save", metavar="FILE", help="also write the results as JSON to FILE")
        p.set_defaults(bench_main=bench_main, bench=name)
