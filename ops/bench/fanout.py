"""``fanroute bench``: benchmarks, side by side with a reference in the same run.

``fanroute bench fanout`` measures fan-out of small publications to 1, 100 and 1000
subscribers of one topic, through three targets started as real processes on
loopback ports:

- ``standalone``: ``fanroute standalone`` (gateway and shards in one process);
- ``cluster``: two ``fanroute gateway`` and three ``fanroute router`` processes, the
  subscribers spread over both gateways, the publisher on the first;
- ``reference``: ``ops/bench/reference_server.py``, the minimal ``websockets``
  broadcast server, the yardstick every fanroute figure is divided by;
- ``seed``: ``ops/bench/seed/seed_server.js``, the source design's Node ``ws``
  server adapted to explicit subscribes (``ops/setup-bench.sh`` installs ``ws``),
  the second yardstick (``×seed``).

``--server-cpus 0`` pins every server process to CPU 0 (``sched_setaffinity``) and
the load generator to the other CPUs, so that a server's figure is what one core
gives, whatever the machine has.

Each cell (target × fan-out) has two phases, both bounded in time and count:

1. **saturation**: the publisher(s) publish as fast as the slowest subscriber lets
   them — at most ``--window`` publications in flight, counted against the
   subscriber that has received the fewest — and the subscribers' deliveries per
   second are counted over ``--duration`` seconds after a warm-up. The window keeps
   every connection's backlog far below the gateway's 1 MiB outbox limit, so the
   figure is throughput, not how fast buffers fill; a 4008 close is still counted
   and reported, never hidden.
2. **latency**: one publisher publishes at ``--rate`` publications/s, each payload
   carrying its send time (``CLOCK_MONOTONIC``, which all processes of a machine
   share); every subscriber records publish→receive latency in an HDR histogram,
   checks that sequence numbers rise by one and counts what it received, so loss,
   gaps and duplicates show up beside p50/p99.

The load generator is separate processes (``multiprocessing``, spawn): subscriber
processes hold raw non-blocking sockets in one ``epoll`` loop each and parse
WebSocket frame headers by hand (no per-frame library work, so they are cheap
enough to count a few hundred thousand deliveries per second per process), and
publisher processes write pre-built masked frames, many per ``send``. The CPU time
of the server processes and of the load generator during the saturation window is
reported, so a reader can tell who was the bottleneck on a small machine.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import multiprocessing
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fanroute.errors import BenchError
from fanroute.bench.loadgen import client_frame, cpu_seconds, emit_report, expect, machine, split_frames
from fanroute.localcluster import LocalCluster, LocalClusterError, free_port

REFERENCE_SERVER = Path(__file__).resolve().with_name("reference_server.py")
SEED_DIR = Path(__file__).resolve().with_name("seed")
SEED_SERVER = SEED_DIR / "seed_server.js"
TARGETS = ("standalone", "cluster", "cluster-1copy", "reference", "seed")
BASELINES = ("reference", "seed")  # not fanroute: what fanroute's figures are divided by
CLOSE_SLOW_CONSUMER = 4008
_READY_TIMEOUT = 30.0
# The benchmark measures the data path, not the abuse limits: per-connection and
# per-gateway rate limits are turned off (0) in the targets' environment. A flag
# that a version of fanroute does not have is simply not read.
SERVER_ENV = {
    "FANROUTE_LOG_LEVEL": "warning",
    "FANROUTE_PUBLISH_RATE": "0",
    "FANROUTE_COMMAND_RATE": "0",
    "FANROUTE_CONNECTION_RATE": "0",
}
_STOP_TIMEOUT = 5.0


# --- the client side of RFC 6455, just enough for a load generator -------------------


def _ws_connect(host: str, port: int, timeout: float = 5.0) -> tuple[socket.socket, bytes]:
    """A blocking TCP connection with the WebSocket handshake done.

    Returns the socket and whatever arrived after the handshake response.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (host.encode(), port, key)
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise BenchError(f"{host}:{port} closed the connection during the handshake")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise BenchError(f"{host}:{port} refused the WebSocket upgrade: {head.splitlines()[0]!r}")
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        if accept.lower() not in head.lower():
            raise BenchError(f"{host}:{port} answered the handshake with a wrong Sec-WebSocket-Accept")
        return sock, rest
    except BaseException:
        sock.close()
        raise


def _subscribe(host: str, port: int, topic: str, timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """Connect, subscribe to ``topic`` and wait for ``subscribed``; returns the socket
    and any bytes received after the reply."""
    sock, buf = _ws_connect(host, port, timeout)
    try:
        sock.sendall(client_frame(json.dumps({"type": "subscribe", "topic": topic, "id": 1}).encode()))
        deadline = time.monotonic() + timeout
        pos = 0
        while True:
            frames, end = split_frames(buf, pos)
            for i, (op, start, stop) in enumerate(frames):
                if op == 0x8:
                    raise BenchError(f"{host}:{port} closed the subscriber: {bytes(buf[start:stop])!r}")
                if op == 0x1 and b'"subscribed"' in buf[start:stop]:
                    # Frames are contiguous: whatever follows the reply belongs
                    # to the subscription.
                    return sock, bytes(buf[stop:])
                if op == 0x1 and b'"error"' in buf[start:stop]:
                    raise BenchError(f"{host}:{port} refused the subscription: {bytes(buf[start:stop])!r}")
            pos = end
            if time.monotonic() > deadline:
                raise BenchError(f"{host}:{port} did not answer a subscribe within {timeout:g} s")
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError(f"{host}:{port} closed the connection before answering a subscribe")
            buf = buf[pos:] + chunk
            pos = 0
    except BaseException:
        sock.close()
        raise


# --- the load generator: subscriber processes --------------------------------------

# Layout of the shared counters (one RawArray of int64, written by one process each).
_SUB_FIELDS = 4  # total delivered, phase progress (slowest open subscriber), closed, phase ack
_PUB_FIELDS = 2  # published in the current phase, done flag
_STOP = 0  # index: publishers stop saturating when non-zero
_HEADER = 4


def _sub_base(w: int) -> int:
    return _HEADER + w * _SUB_FIELDS


def _pub_base(workers: int, p: int) -> int:
    return _HEADER + workers * _SUB_FIELDS + p * _PUB_FIELDS


def _shared_size(workers: int, publishers: int) -> int:
    return _HEADER + workers * _SUB_FIELDS + publishers * _PUB_FIELDS


_NO_PROGRESS = 1 << 62  # the progress of a worker whose subscribers are all closed


@dataclass
class _Sub:
    sock: socket.socket
    rest: bytes = b""
    count: int = 0
    last_seq: int = -1
    gaps: int = 0
    duplicates: int = 0
    closed: int | None = None  # close code


def subscriber_worker(
    w: int, endpoints: list[tuple[str, int]], topic: str, heartbeat: float, shared: Any, control: Any
) -> None:
    """One subscriber process: subscribes its connections, then counts deliveries.

    Commands arrive on ``control`` (a Pipe end, polled in the same epoll loop):
    ``("phase", name)`` resets the per-phase counts, ``("report",)`` answers with the
    phase's statistics and latency histogram, ``("close",)`` ends the process.
    Every ``heartbeat`` seconds (0: never) each connection sends an application
    ``ping``, as a client SDK does; it answers WebSocket pings in any case.
    In the latency phase, deliveries whose payload carries no send time (left over
    from saturation) are counted as ``stale``, not as latency-phase deliveries.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when to stop
    from hdrh.histogram import HdrHistogram

    subs: list[_Sub] = []
    try:
        for host, port in endpoints:
            sock, rest = _subscribe(host, port, topic)
            subs.append(_Sub(sock, rest))
    except Exception as exc:  # reported to the coordinator, which stops the run
        control.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    control.send(("ready", len(subs)))

    sel = selectors.DefaultSelector()
    for i, s in enumerate(subs):
        s.sock.setblocking(False)
        sel.register(s.sock, selectors.EVENT_READ, i)
    sel.register(control, selectors.EVENT_READ, -1)
    base = _sub_base(w)
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds, up to a minute
    latency_mode = False
    total = 0
    open_subs = len(subs)
    closes: dict[int, int] = {}
    last_publish = 0.0
    last_beat = time.monotonic()
    stale = 0
    app_ping = client_frame(b'{"type":"ping","ts":0}')
    marker = b'"payload":"'
    seq_key = b'"seq":'

    def finish(s: _Sub, code: int) -> None:
        nonlocal open_subs
        if s.closed is None:
            s.closed = code
            closes[code] = closes.get(code, 0) + 1
            open_subs -= 1
            shared[base + 2] = len(subs) - open_subs
        try:
            sel.unregister(s.sock)
        except (KeyError, ValueError):
            pass
        s.sock.close()

    running = True
    while running:
        for key, _ in sel.select(0.001):
            i = key.data
            if i < 0:
                cmd = control.recv()
                if cmd[0] == "phase":
                    latency_mode = cmd[1] == "latency"
                    for s in subs:
                        s.count, s.last_seq, s.gaps, s.duplicates = 0, -1, 0, 0
                    hist.reset()
                    closes.clear()
                    stale = 0
                    shared[base + 1] = 0 if open_subs else _NO_PROGRESS
                    shared[base + 3] += 1
                    control.send(("phase", cmd[1]))
                elif cmd[0] == "report":
                    counts = [s.count for s in subs if s.closed is None]
                    control.send(
                        (
                            "report",
                            {
                                "received": sum(s.count for s in subs),
                                "min": min(counts) if counts else 0,
                                "max": max(counts) if counts else 0,
                                "gaps": sum(s.gaps for s in subs),
                                "duplicates": sum(s.duplicates for s in subs),
                                "closes": dict(closes),
                                "stale": stale,
                                "histogram": hist.encode() if latency_mode else None,
                            },
                        )
                    )
                elif cmd[0] == "close":
                    running = False
                continue
            s = subs[i]
            try:
                chunk = s.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                finish(s, 1006)
                continue
            if not chunk:
                finish(s, 1006)
                continue
            now = time.monotonic_ns()
            buf = s.rest + chunk if s.rest else chunk
            frames, end = split_frames(buf, 0)
            s.rest = buf[end:]
            n = 0
            for op, start, stop in frames:
                if op == 0x1 or op == 0x2:
                    if buf[start + 3] == 121 and buf.startswith(b'{"type":"pong"', start):
                        continue  # the answer to our heartbeat, not a delivery
                    if latency_mode:
                        at = buf.find(marker, start, stop)
                        sent = int(buf[at + 11 : at + 31]) if at >= 0 else 0
                        if not sent:
                            stale += 1
                            continue
                        n += 1
                        hist.record_value(max(1, (now - sent) // 1000))
                        at = buf.rfind(seq_key, start, stop)
                        if at >= 0:
                            j = at + 6
                            k = j
                            while k < stop and 48 <= buf[k] <= 57:
                                k += 1
                            seq = int(buf[j:k])
                            if s.last_seq >= 0:
                                if seq <= s.last_seq:
                                    s.duplicates += 1
                                elif seq != s.last_seq + 1:
                                    s.gaps += seq - s.last_seq - 1
                            s.last_seq = seq
                    else:
                        n += 1
                elif op == 0x9:  # ping: answer with a pong carrying the same data
                    try:
                        s.sock.send(client_frame(bytes(buf[start:stop]), 0xA))
                    except OSError:
                        pass
                elif op == 0x8:
                    code = int.from_bytes(buf[start : start + 2], "big") if stop - start >= 2 else 1005
                    s.count += n
                    total += n
                    n = 0
                    finish(s, code)
                    break
            if n:
                s.count += n
                total += n
        shared[base] = total
        t = time.monotonic()
        if heartbeat and t - last_beat >= heartbeat:
            last_beat = t
            for s in subs:
                if s.closed is None:
                    try:
                        s.sock.send(app_ping)
                    except OSError:
                        pass
        if t - last_publish >= 0.001:
            last_publish = t
            counts = [s.count for s in subs if s.closed is None]
            shared[base + 1] = min(counts) if counts else _NO_PROGRESS
    for s in subs:
        if s.closed is None:
            try:
                s.sock.setblocking(True)
                s.sock.settimeout(0.5)
                s.sock.sendall(client_frame(b"\x03\xe8", 0x8))
            except OSError:
                pass
            s.sock.close()


# --- the load generator: publisher processes ---------------------------------------


def _payload(size: int, now_ns: int) -> str:
    """A payload string of exactly ``size`` characters that starts with its send time."""
    stamp = f"{now_ns:020d}:"
    return (stamp + "x" * size)[:size] if size >= len(stamp) else stamp


def publisher_worker(
    p: int, workers: int, publishers: int, host: str, port: int, topic: str, size: int, shared: Any, control: Any
) -> None:
    """One publisher process. ``("saturate", window)`` publishes until the shared stop
    flag is set, never more than ``window`` publications ahead of the slowest
    subscriber (across all publishers); ``("rate", per_second, count)`` publishes
    ``count`` publications at a fixed rate. Both answer ``("done", published, seconds)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sock, _ = _ws_connect(host, port)
    except Exception as exc:
        control.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    control.send(("ready", 1))
    base = _pub_base(workers, p)
    prefix = b'{"type":"publish","topic":' + json.dumps(topic).encode() + b',"payload":'
    closed: list[int] = []

    def frame(now_ns: int) -> bytes:
        return client_frame(prefix + json.dumps(_payload(size, now_ns)).encode() + b"}")

    def drain() -> None:
        """Read what the server sent the publisher (pings, errors, a close)."""
        sock.setblocking(False)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    closed.append(1006)
                    return
                frames, _ = split_frames(data, 0)
                for op, start, stop in frames:
                    if op == 0x9:
                        sock.sendall(client_frame(data[start:stop], 0xA))
                    elif op == 0x8:
                        closed.append(int.from_bytes(data[start : start + 2], "big"))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            closed.append(1006)
        finally:
            sock.setblocking(True)

    sub_progress = [_sub_base(w) + 1 for w in range(workers)]
    pub_counts = [_pub_base(workers, q) for q in range(publishers)]
    while True:
        while not control.poll(0.2):
            drain()  # idle between phases: still answer the gateway's pings
        cmd = control.recv()
        if cmd[0] == "close":
            break
        shared[base] = 0
        started = time.monotonic()
        sent = 0
        if cmd[0] == "saturate":
            window = cmd[1]
            last_drain = started
            while not shared[_STOP] and not closed:
                slowest = min(shared[i] for i in sub_progress)
                in_flight = sum(shared[i] for i in pub_counts) - slowest
                room = window - in_flight
                if room <= 0:
                    time.sleep(0.0002)
                else:
                    batch = min(room, 256)
                    one = frame(0)  # no send time: saturation measures counts only
                    sock.sendall(one * batch)
                    sent += batch
                    shared[base] = sent
                now = time.monotonic()
                if now - last_drain > 0.05:
                    last_drain = now
                    drain()
        elif cmd[0] == "rate":
            per_second, count = cmd[1], cmd[2]
            for i in range(count):
                due = started + i / per_second
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sock.sendall(frame(time.monotonic_ns()))
                sent += 1
                shared[base] = sent
                if i % 64 == 0:
                    drain()
                    if closed:
                        break
        drain()
        control.send(("done", sent, time.monotonic() - started, list(closed)))
    sock.close()


# --- the targets: servers started as processes -------------------------------------


@dataclass
class Target:
    """A running server under test: its processes and where clients connect.

    fanroute's targets are a :class:`~fanroute.localcluster.LocalCluster`; the
    reference server, which is not fanroute, is one plain process.
    """

    name: str
    cluster: LocalCluster | None = None
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    endpoints: list[tuple[str, int]] = field(default_factory=list)  # client ports
    logs: list[Path] = field(default_factory=list)

    def cpu(self) -> dict[str, float]:
        out = {node.name: cpu_seconds(node.pid) for node in self.cluster.nodes} if self.cluster else {}
        out.update({name: cpu_seconds(proc.pid) for name, proc in self.procs})
        return out

    def check_alive(self) -> None:
        if self.cluster is not None:
            try:
                self.cluster.check_alive()
            except LocalClusterError as exc:
                raise BenchError(f"{self.name}: {exc}") from None
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise BenchError(f"{self.name}: {name} exited with status {proc.returncode}{self._tail()}")

    def _tail(self) -> str:
        text = ""
        for log in self.logs:
            try:
                lines = log.read_text(errors="replace").splitlines()[-5:]
            except OSError:
                continue
            if lines:
                text += f"\n  {log.name}: " + "\n  ".join(lines)
        return text

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop(timeout=_STOP_TIMEOUT)
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(target: Target, deadline: float) -> None:
    """Poll until every client port takes a subscription (never a fixed sleep)."""
    pending_ports = list(target.endpoints)
    last_error = "not started"
    while pending_ports:
        target.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{target.name} was not ready within {_READY_TIMEOUT:g} s: {last_error}{target._tail()}")
        host, port = pending_ports[0]
        try:
            sock, _ = _subscribe(host, port, "bench.ready", timeout=2.0)
            sock.close()
            pending_ports.pop(0)
            continue
        except (BenchError, OSError) as exc:
            last_error = f"ws://{host}:{port}/: {exc}"
        time.sleep(0.05)


def baseline_command(name: str, port: int) -> list[str]:
    """The command line of a baseline server: the websockets reference or the Node seed."""
    if name == "reference":
        return [sys.executable, str(REFERENCE_SERVER), "--port", str(port)]
    node = shutil.which("node")
    if node is None or not (SEED_DIR / "node_modules" / "ws" / "package.json").is_file():
        raise BenchError("the seed target needs Node and the ws package: run ops/setup-bench.sh")
    return [node, str(SEED_SERVER), "--port", str(port)]


def server_pids(target: Target) -> list[int]:
    pids = [node.pid for node in target.cluster.nodes] if target.cluster else []
    return pids + [proc.pid for _, proc in target.procs]


def pin(pids: list[int], cpus: set[int] | None) -> None:
    """Pin processes (and every thread of each) to ``cpus``; ``None`` leaves them alone."""
    if not cpus:
        return
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), cpus)
        except (OSError, ValueError):
            pass  # a process that just exited has nothing to pin


def load_cpus(server_cpus: set[int] | None) -> set[int] | None:
    """The CPUs left for the load generator when the servers are pinned."""
    if not server_cpus:
        return None
    rest = set(range(os.cpu_count() or 1)) - server_cpus
    return rest or None


def start_target(name: str, logdir: Path, server_cpus: set[int] | None = None) -> Target:
    target = Target(name)
    deadline = time.monotonic() + _READY_TIMEOUT
    try:
        if name in ("standalone", "cluster", "cluster-1copy"):
            # standalone: gateway and shards in one process; cluster: 2 gateways, 3 routers
            # holding every stream on 2 of them (the default); cluster-1copy: the same
            # with --copies 1, to measure what replication costs.
            shape: dict[str, Any] = (
                {"gateways": 0, "routers": 0, "standalones": 1} if name == "standalone" else {"gateways": 2, "routers": 3}
            )
            if name == "cluster-1copy":
                shape["router_args"] = ["--copies", "1"]
            target.cluster = LocalCluster(**shape, env=SERVER_ENV, logdir=logdir / name)
            target.cluster.start()
            try:
                target.cluster.wait_ready(_READY_TIMEOUT)
            except LocalClusterError as exc:
                raise BenchError(f"{name}: {exc}") from None
            target.endpoints = target.cluster.endpoints
        elif name in BASELINES:
            port = free_port()
            log = logdir / f"{name}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    baseline_command(name, port),
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                )
            target.procs.append((name, proc))
            target.logs.append(log)
            target.endpoints = [("127.0.0.1", port)]
        else:
            raise BenchError(f"unknown target {name!r} (known: {', '.join(TARGETS)})")
        pin(server_pids(target), server_cpus)
        _wait_ready(target, deadline)
    except BaseException:
        target.stop()
        raise
    return target


# --- one cell: a target at one fan-out ---------------------------------------------


@dataclass
class Settings:
    subscribers: list[int]
    targets: list[str]
    duration: float
    warmup: float
    rate: float
    rate_deliveries: int
    window: int
    window_deliveries: int
    heartbeat: float
    publishers: int
    client_procs: int
    payload: int
    repeat: int = 1
    server_cpus: set[int] | None = None


class _Workers:
    """The load-generator processes of one cell, stopped together."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.subs: list[Any] = []  # control pipe ends
        self.pubs: list[Any] = []

    def start(self, fn: Any, args: tuple, pipes: list[Any]) -> None:
        here, there = self.ctx.Pipe()
        proc = self.ctx.Process(target=fn, args=(*args, there), daemon=True)
        proc.start()
        there.close()
        self.procs.append(proc)
        pipes.append(here)

    def expect(self, pipe: Any, kind: str, timeout: float) -> tuple:
        return expect(pipe, kind, timeout, BenchError, "a load-generator process")

    def stop(self) -> None:
        for pipe in self.subs + self.pubs:
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
        for pipe in self.subs + self.pubs:
            pipe.close()


def _wait_until(predicate: Any, timeout: float, alive: Any) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        alive()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def cell_window(s: Settings, subscribers: int) -> int:
    """Publications in flight at saturation: ``--window``, but no more than
    ``--window-deliveries`` deliveries in flight over all subscribers (at least 16),
    so that at high fan-out what is buffered stays small and drains in time."""
    return max(16, min(s.window, s.window_deliveries // subscribers))


def cell_rate(s: Settings, subscribers: int) -> float:
    """Publications/s in the latency phase: ``--rate``, but no more than
    ``--rate-deliveries`` deliveries/s, so that every target is measured below
    saturation at every fan-out (latency above saturation is only queueing)."""
    return min(s.rate, s.rate_deliveries / subscribers)


def run_cell(target: Target, subscribers: int, s: Settings, progress: Any) -> dict[str, Any]:
    from hdrh.histogram import HdrHistogram

    topic = f"bench.fanout.{target.name}.{subscribers}.{os.getpid()}.{time.monotonic_ns()}"
    workers = max(1, min(s.client_procs, subscribers))
    shared = multiprocessing.get_context("spawn").RawArray("q", _shared_size(workers, s.publishers))
    endpoints = target.endpoints
    # Subscriber i connects to gateway (i + 1) % G: spread over all gateways, and
    # the first one is on another gateway than the publisher's when there are two.
    plan = [endpoints[(i + 1) % len(endpoints)] for i in range(subscribers)]
    pool = _Workers()
    result: dict[str, Any] = {"target": target.name, "subscribers": subscribers}
    try:
        progress(f"{target.name} × {subscribers}: connecting subscribers")
        for w in range(workers):
            pool.start(subscriber_worker, (w, plan[w::workers], topic, s.heartbeat, shared), pool.subs)
        for pipe in pool.subs:
            pool.expect(pipe, "ready", 60 + subscribers * 0.05)
        host, port = endpoints[0]
        for p in range(s.publishers):
            pool.start(publisher_worker, (p, workers, s.publishers, host, port, topic, s.payload, shared), pool.pubs)
        for pipe in pool.pubs:
            pool.expect(pipe, "ready", 30)
        pin([proc.pid for proc in pool.procs], load_cpus(s.server_cpus))

        def alive() -> None:
            target.check_alive()

        def progress_of_slowest() -> int:
            return min(shared[_sub_base(w) + 1] for w in range(workers))

        def published() -> int:
            return sum(shared[_pub_base(workers, p)] for p in range(s.publishers))

        def delivered() -> int:
            return sum(shared[_sub_base(w)] for w in range(workers))

        def phase(name: str) -> None:
            for pipe in pool.subs:
                pipe.send(("phase", name))
            for pipe in pool.subs:
                pool.expect(pipe, "phase", 10)

        def report() -> list[dict[str, Any]]:
            for pipe in pool.subs:
                pipe.send(("report",))
            return [pool.expect(pipe, "report", 10)[1] for pipe in pool.subs]

        # (a) saturation
        progress(f"{target.name} × {subscribers}: saturation")
        phase("saturation")
        shared[_STOP] = 0
        window = cell_window(s, subscribers)
        for pipe in pool.pubs:
            pipe.send(("saturate", window))
        time.sleep(s.warmup)  # a measurement interval, not synchronisation
        alive()
        cpu0, d0, p0, t0 = target.cpu(), delivered(), published(), time.monotonic()
        load0 = sum(cpu_seconds(proc.pid) for proc in pool.procs)
        time.sleep(s.duration)
        cpu1, d1, p1, t1 = target.cpu(), delivered(), published(), time.monotonic()
        load1 = sum(cpu_seconds(proc.pid) for proc in pool.procs)
        shared[_STOP] = 1
        pub_closes: list[int] = []
        total_published = 0
        for pipe in pool.pubs:
            msg = pool.expect(pipe, "done", 30)
            total_published += msg[1]
            pub_closes += msg[3]
        progress(f"{target.name} × {subscribers}: draining")
        # Bounded: what is in flight is at most one window, so at the measured rate
        # it drains in window/rate seconds; allow three times that, at least 10 s.
        pub_rate = max(1.0, (p1 - p0) / (t1 - t0))
        drained = _wait_until(lambda: progress_of_slowest() >= total_published, max(10.0, 3 * window / pub_rate), alive)
        reports = report()
        elapsed = t1 - t0
        by_proc = {name: round((cpu1[name] - cpu0.get(name, 0.0)) / elapsed, 3) for name in cpu1}
        result["saturation"] = {
            "deliveries_per_s": round((d1 - d0) / elapsed),
            "publications_per_s": round((p1 - p0) / elapsed),
            "seconds": round(elapsed, 3),
            "window": window,
            "published": total_published,
            "expected": total_published * subscribers,
            "delivered": sum(r["received"] for r in reports),
            "lost": total_published * subscribers - sum(r["received"] for r in reports),
            "drained": drained,
            "server_cpu": round(sum(by_proc.values()), 3),
            "server_cpu_by_process": by_proc,
            "loadgen_cpu": round((load1 - load0) / elapsed, 3),
            "close_codes": _merge_closes(reports, pub_closes),
        }

        # (b) latency at a fixed rate
        rate = cell_rate(s, subscribers)
        count = max(1, round(rate * s.duration))
        progress(f"{target.name} × {subscribers}: latency at {rate:g}/s")
        phase("latency")
        pool.pubs[0].send(("rate", rate, count))
        msg = pool.expect(pool.pubs[0], "done", s.duration * 3 + 30)
        sent, seconds = msg[1], msg[2]
        _wait_until(lambda: progress_of_slowest() >= sent, max(10.0, s.duration), alive)
        reports = report()
        hist = HdrHistogram(1, 60_000_000, 3)
        for r in reports:
            if r["histogram"]:
                hist.add(HdrHistogram.decode(r["histogram"]))
        received = sum(r["received"] for r in reports)
        result["latency"] = {
            "rate": rate,
            "achieved_rate": round(sent / seconds, 1) if seconds else 0.0,
            "published": sent,
            "expected": sent * subscribers,
            "delivered": received,
            "lost": sent * subscribers - received,
            "gaps": sum(r["gaps"] for r in reports),
            "duplicates": sum(r["duplicates"] for r in reports),
            "samples": hist.get_total_count(),
            "stale": sum(r["stale"] for r in reports),
            "p50_ms": round(hist.get_value_at_percentile(50) / 1000, 3),
            "p99_ms": round(hist.get_value_at_percentile(99) / 1000, 3),
            "max_ms": round(hist.get_max_value() / 1000, 3),
            "close_codes": _merge_closes(reports, msg[3]),
        }
    finally:
        pool.stop()
    return result


def combine(runs: list[dict[str, Any]], s: Settings) -> list[dict[str, Any]]:
    """One result per cell from its ``--repeat`` runs: the saturation figures of the
    run with the median deliveries/s, the latency figures of the run with the median
    p99, and loss and closes summed over all runs (nothing hidden by the choice)."""
    out = []
    for n in s.subscribers:
        for name in s.targets:
            mine = [r for r in runs if r["target"] == name and r["subscribers"] == n]
            if not mine:
                continue
            by_rate = sorted(mine, key=lambda r: r["saturation"]["deliveries_per_s"])
            by_p99 = sorted(mine, key=lambda r: r["latency"]["p99_ms"])
            cell = {
                "target": name,
                "subscribers": n,
                "saturation": dict(by_rate[len(by_rate) // 2]["saturation"]),
                "latency": dict(by_p99[len(by_p99) // 2]["latency"]),
            }
            if len(mine) > 1:
                for phase in ("saturation", "latency"):
                    cell[phase]["lost"] = sum(r[phase]["lost"] for r in mine)
                    closes: dict[str, int] = {}
                    for r in mine:
                        for code, k in r[phase]["close_codes"].items():
                            closes[code] = closes.get(code, 0) + k
                    cell[phase]["close_codes"] = closes
                cell["saturation"]["drained"] = all(r["saturation"]["drained"] for r in mine)
                cell["latency"]["gaps"] = sum(r["latency"]["gaps"] for r in mine)
                cell["runs"] = mine
                cell["deliveries_per_s_all"] = [r["saturation"]["deliveries_per_s"] for r in mine]
                cell["p99_ms_all"] = [r["latency"]["p99_ms"] for r in mine]
            out.append(cell)
    return out


def _merge_closes(reports: list[dict[str, Any]], publisher: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reports:
        for code, n in r["closes"].items():
            out[str(code)] = out.get(str(code), 0) + n
    for code in publisher:
        out[f"publisher:{code}"] = out.get(f"publisher:{code}", 0) + 1
    return out


# --- the whole run -----------------------------------------------------------------


def ratios(results: list[dict[str, Any]], baseline: str = "reference") -> list[dict[str, Any]]:
    """fanroute ÷ ``baseline`` for every cell that has both: throughput (higher is
    better) and latency percentiles (lower is better)."""
    ref = {r["subscribers"]: r for r in results if r["target"] == baseline}
    out = []
    for r in results:
        base = ref.get(r["subscribers"])
        if r["target"] in BASELINES or base is None:
            continue

        def div(a: float, b: float) -> float | None:
            return round(a / b, 3) if b else None

        out.append(
            {
                "target": r["target"],
                "subscribers": r["subscribers"],
                "throughput": div(r["saturation"]["deliveries_per_s"], base["saturation"]["deliveries_per_s"]),
                "p50": div(r["latency"]["p50_ms"], base["latency"]["p50_ms"]),
                "p99": div(r["latency"]["p99_ms"], base["latency"]["p99_ms"]),
            }
        )
    return out


def render(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    ratio = {(r["target"], r["subscribers"]): r for r in report["ratios"]}
    seed = {(r["target"], r["subscribers"]): r for r in report.get("ratios_seed", [])}
    m, c = report["machine"], report["config"]
    table = Table(
        title=f"fanroute bench fanout — {c['payload']}-byte payloads, {m['nproc']} × {m['cpu']}",
        caption=(
            f"saturation: at most {c['window']} publications and {c['window_deliveries']:,} deliveries in flight, "
            f"{c['duration']:g} s after {c['warmup']:g} s warm-up; latency: {c['rate']:g} publications/s "
            f"(at most {c['rate_deliveries']:,} deliveries/s: column 'pub/s') for {c['duration']:g} s. "
            "×ref = fanroute ÷ reference, ×seed = fanroute ÷ the Node seed (throughput: higher is better; latency: lower is better). "
            + (f"Servers pinned to CPU {','.join(map(str, c['server_cpus']))}. " if c.get("server_cpus") else "")
            + "CPU in cores, server and load generator share the machine; 'µs CPU each' is server CPU per delivery, "
            "the figure least moved by other work on the machine."
            + (f" Median of {c['repeat']} interleaved runs; lost and closes summed over them." if c.get("repeat", 1) > 1 else "")
            + f" Load average at start: {', '.join(map(str, m.get('loadavg_at_start', [])))}."
        ),
    )
    for col in ("target", "subs", "deliveries/s", "×ref", "×seed", "server CPU", "µs CPU each", "load CPU", "pub/s", "p50 ms", "p99 ms", "×ref p99", "×seed p99", "lost", "closes"):
        table.add_column(col, justify="left" if col in ("target", "closes") else "right")
    for r in sorted(report["results"], key=lambda r: (r["subscribers"], TARGETS.index(r["target"]))):
        sat, lat = r["saturation"], r["latency"]
        x = ratio.get((r["target"], r["subscribers"]), {})
        y = seed.get((r["target"], r["subscribers"]), {})
        closes = {**sat["close_codes"]}
        for k, v in lat["close_codes"].items():
            closes[k] = closes.get(k, 0) + v
        lost = sat["lost"] + lat["lost"]
        table.add_row(
            r["target"],
            str(r["subscribers"]),
            f"{sat['deliveries_per_s']:,}",
            "" if x.get("throughput") is None else f"{x['throughput']:.2f}",
            "" if y.get("throughput") is None else f"{y['throughput']:.2f}",
            f"{sat['server_cpu']:.2f}",
            "" if not sat["deliveries_per_s"] else f"{sat['server_cpu'] * 1e6 / sat['deliveries_per_s']:.1f}",
            f"{sat['loadgen_cpu']:.2f}",
            f"{lat['rate']:g}",
            f"{lat['p50_ms']:.2f}",
            f"{lat['p99_ms']:.2f}",
            "" if x.get("p99") is None else f"{x['p99']:.2f}",
            "" if y.get("p99") is None else f"{y['p99']:.2f}",
            f"{lost:,}" + ("" if sat["drained"] else " (not drained)") + (f", {lat['gaps']} gaps" if lat["gaps"] else ""),
            ", ".join(f"{k}×{v}" for k, v in sorted(closes.items())) or "-",
        )
    console.print(table)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one subscriber count, each at least 1")
    return values


def cpu_set(text: str) -> set[int] | None:
    """A comma-separated list of CPU numbers this process may use; empty for none."""
    if not text.strip():
        return None
    try:
        cpus = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of CPU numbers") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise argparse.ArgumentTypeError(f"{text!r}: CPUs must be among {', '.join(map(str, sorted(allowed)))}")
    return cpus


def _targets(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown target(s) {', '.join(bad) or text!r}; known: {', '.join(TARGETS)}")
    return names


def fanout_main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    s = Settings(
        subscribers=args.subscribers,
        targets=args.targets,
        duration=args.duration,
        warmup=args.warmup,
        rate=args.rate,
        rate_deliveries=args.rate_deliveries,
        window=args.window,
        window_deliveries=args.window_deliveries,
        heartbeat=args.client_heartbeat,
        publishers=args.publishers,
        client_procs=args.client_procs,
        payload=args.payload,
        repeat=args.repeat,
        server_cpus=args.server_cpus,
    )
    for name, value in (("--duration", s.duration), ("--rate", s.rate), ("--window", s.window), ("--publishers", s.publishers), ("--client-procs", s.client_procs), ("--repeat", s.repeat)):
        if value <= 0:
            print(f"fanroute: {name} must be positive", file=sys.stderr)
            return 2
    if s.payload < 21:
        print("fanroute: --payload must be at least 21 bytes (it carries a 20-digit send time)", file=sys.stderr)
        return 2
    facts = machine()
    err = Console(stderr=True)
    out = Console()
    if not out.is_terminal:
        out = Console(width=150)  # a file or a pipe: room for the whole table

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with tempfile.TemporaryDirectory(prefix="fanroute-bench-") as tmp:
        logdir = Path(tmp)
        cells = len(s.targets) * len(s.subscribers) * s.repeat
        runs: list[dict[str, Any]] = []
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} cells"), TimeElapsedColumn(), console=err, transient=args.json) as bar:
            task = bar.add_task("starting", total=cells)

            def say(text: str) -> None:
                bar.update(task, description=text)

            # Every target runs for the whole benchmark and the cells are
            # interleaved (each fan-out through every target in turn), so that
            # whatever else the machine does falls on all of them alike.
            running: dict[str, Target] = {}
            try:
                for name in s.targets:
                    say(f"{name}: starting")
                    running[name] = start_target(name, logdir, s.server_cpus)
                for _ in range(s.repeat):
                    for n in s.subscribers:
                        for name in s.targets:
                            runs.append(run_cell(running[name], n, s, say))
                            bar.advance(task)
            except BenchError as exc:
                print(f"fanroute: {exc}", file=sys.stderr)
                return 1
            finally:
                for target in running.values():
                    target.stop()
    results = combine(runs, s)
    report = {
        "benchmark": "fanout",
        "argv": sys.argv[1:],
        "machine": facts,
        "config": {
            "subscribers": s.subscribers,
            "targets": s.targets,
            "duration": s.duration,
            "warmup": s.warmup,
            "rate": s.rate,
            "rate_deliveries": s.rate_deliveries,
            "window": s.window,
            "window_deliveries": s.window_deliveries,
            "client_heartbeat": s.heartbeat,
            "publishers": s.publishers,
            "client_procs": s.client_procs,
            "payload": s.payload,
            "repeat": s.repeat,
            "server_cpus": sorted(s.server_cpus) if s.server_cpus else None,
        },
        "results": results,
        "ratios": ratios(results),
        "ratios_seed": ratios(results, "seed"),
    }
    emit_report(report, args.save, args.json, lambda: render(report, out))
    return 0


def add_fanout_command(sub: Any, flag: Any) -> None:
    p = sub.add_parser(
        "fanout",
        help="deliveries/s and latency vs a reference server",
        description="Fan-out of small publications to many subscribers of one topic, through "
        "fanroute standalone, a local cluster, a minimal websockets broadcast server and the source design's Node ws server, side by side.",
    )
    flag(p, "--subscribers", _int_list, [1, 100, 1000], "comma-separated subscriber counts, one cell each")
    flag(p, "--targets", _targets, ["standalone", "cluster", "reference", "seed"], "comma-separated targets: standalone, cluster, cluster-1copy, reference, seed")
    flag(p, "--duration", float, 5.0, "seconds measured per phase (saturation, then latency) per cell")
    flag(p, "--warmup", float, 1.0, "seconds of saturation before the measurement starts")
    flag(p, "--rate", float, 100.0, "publications per second in the latency phase")
    flag(p, "--rate-deliveries", int, 20000, "cap on deliveries per second in the latency phase (the rate is lowered at high fan-out)")
    flag(p, "--window", int, 1000, "most publications in flight (ahead of the slowest subscriber) at saturation")
    flag(p, "--window-deliveries", int, 200000, "cap on deliveries in flight at saturation (the window shrinks at high fan-out)")
    flag(p, "--client-heartbeat", float, 3.0, "seconds between application pings from each subscriber; 0 for none")
    flag(p, "--publishers", int, 1, "publisher processes at saturation")
    flag(p, "--client-procs", int, 2, "subscriber processes of the load generator")
    flag(p, "--payload", int, 64, "payload size in bytes")
    flag(p, "--repeat", int, 1, "runs of every cell (interleaved); the median is reported")
    flag(p, "--server-cpus", cpu_set, None, "pin the servers to these CPUs (e.g. 0) and the load generator to the rest")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--save", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(bench_main=fanout_main)
