"""``fanroute bench memory`` and ``fanroute bench accept``: what a connection costs.

Both run fanroute standalone beside the two yardsticks of ``bench fanout`` (the
``websockets`` reference and the Node ``ws`` seed), started the same way, in one
run, each target in turn; ``--server-cpus`` pins the servers as ``bench fanout`` does.

``memory`` opens ``--connections`` idle WebSocket connections (each answers one
application ping, so the server has set each up completely), leaves them quiet for
``--quiet-for`` seconds as idle connections are, reads the server's resident set
size (``VmRSS``), then subscribes every connection to
``--subscriptions`` topics (drawn from ``--topics`` shared topics) and reads it
again, as long after. The figures are the growth over the server's RSS before the first
connection, divided by the connections: KB per idle connection and KB per
connection with its subscriptions. Kernel socket buffers are not in RSS, for any
target alike.

``accept`` is a reconnect storm: ``--connections`` new clients, at most
``--concurrency`` in flight per load-generator process, each doing what a client
does after losing its gateway — TCP connect, WebSocket handshake, and its first
subscribe with ``since`` (a real epoch and seq, so fanroute recovers the missed
messages from history) — until the ``subscribed`` answer. The figure is completed
connections per second of wall time and per second of server CPU (the rate one
core would give), with the connect-to-subscribed latency percentiles. Connections
stay open until the storm ends, as after a real failover.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import multiprocessing
import os
import resource
import selectors
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fanroute.errors import BenchError
from fanroute.bench.fanout import (
    BASELINES,
    Target,
    _ws_connect,
    cpu_set,
    load_cpus,
    pin,
    server_pids,
    start_target,
)
from fanroute.bench.loadgen import client_frame, cpu_seconds, emit_report, expect, machine, split_frames

TARGETS = ("standalone", "reference", "seed")
_KEY = base64.b64encode(b"fanroute-bench-k").decode()


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"process {pid} has no VmRSS")


def _server_pid(target: Target) -> int:
    """The process holding the connections: the standalone process, or the baseline's."""
    pids = server_pids(target)
    if len(pids) != 1:
        raise BenchError(f"{target.name}: expected one server process, found {len(pids)}")
    return pids[0]


def _read_until(sock: socket.socket, buf: bytes, count: int, marker: bytes, timeout: float) -> bytes:
    """Read until ``count`` text frames containing ``marker`` have arrived; the rest of the buffer."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        frames, end = split_frames(buf, 0)
        for op, start, stop in frames:
            if op == 0x8:
                raise BenchError(f"the server closed a connection: {bytes(buf[start:stop])!r}")
            if op == 0x1 and marker in buf[start:stop]:
                seen += 1
        buf = buf[end:]
        if seen >= count:
            return buf
        if time.monotonic() > deadline:
            raise BenchError(f"no answer within {timeout:g} s")
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("the server closed a connection")
        buf += chunk


# --- memory ---------------------------------------------------------------------------


def measure_memory(target: Target, connections: int, subscriptions: int, topics: int, quiet: float = 0.0) -> dict[str, Any]:
    host, port = target.endpoints[0]
    pid = _server_pid(target)
    before = rss_kb(pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(connections):
            sock, rest = _ws_connect(host, port, timeout=30)
            sock.sendall(client_frame(b'{"type":"ping","ts":1}'))
            _read_until(sock, rest, 1, b'"pong"', 30)
            socks.append(sock)
        time.sleep(quiet)  # idle connections are quiet ones: read RSS once they have been
        idle = rss_kb(pid)
        for i, sock in enumerate(socks):
            frames = b"".join(
                client_frame(json.dumps({"type": "subscribe", "topic": f"mem.t{(i * subscriptions + j) % topics}", "id": j}).encode())
                for j in range(subscriptions)
            )
            sock.sendall(frames)
        for sock in socks:
            _read_until(sock, b"", subscriptions, b'"subscribed"', 60)
        time.sleep(quiet)
        subscribed = rss_kb(pid)
    finally:
        for sock in socks:
            sock.close()
    return {
        "target": target.name,
        "connections": connections,
        "subscriptions": subscriptions,
        "quiet_s": quiet,
        "rss_before_kb": before,
        "rss_idle_kb": idle,
        "rss_subscribed_kb": subscribed,
        "kb_per_idle_connection": round((idle - before) / connections, 2),
        "kb_per_subscribed_connection": round((subscribed - before) / connections, 2),
    }


def memory_main(args: argparse.Namespace) -> int:
    if args.connections < 1 or args.subscriptions < 0 or args.topics < 1 or args.quiet_for < 0:
        print("fanroute: --connections and --topics must be positive, --subscriptions and --quiet-for at least 0", file=sys.stderr)
        return 2
    _raise_nofile()
    results = []
    with tempfile.TemporaryDirectory(prefix="fanroute-bench-") as tmp:
        for name in args.targets:
            print(f"{name}: {args.connections} connections", file=sys.stderr)
            try:
                target = start_target(name, Path(tmp), args.server_cpus)
            except BenchError as exc:
                print(f"fanroute: {exc}", file=sys.stderr)
                return 1
            try:
                results.append(measure_memory(target, args.connections, args.subscriptions, args.topics, args.quiet_for))
            except (BenchError, OSError) as exc:
                print(f"fanroute: {name}: {exc}", file=sys.stderr)
                return 1
            finally:
                target.stop()
    report = {"benchmark": "memory", "argv": sys.argv[1:], "machine": machine(), "results": results,
              "ratios_seed": _ratios(results, "kb_per_idle_connection", "seed")}
    emit_report(report, args.save, args.json, lambda: _render_memory(report))
    return 0


def _ratios(results: list[dict[str, Any]], key: str, baseline: str) -> dict[str, float]:
    base = next((r[key] for r in results if r["target"] == baseline), None)
    return {r["target"]: round(r[key] / base, 3) for r in results if base and r["target"] not in BASELINES}


def _render_memory(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    r0 = report["results"][0] if report["results"] else {"connections": 0, "subscriptions": 0}
    table = Table(
        title=f"fanroute bench memory — {r0['connections']} connections, then {r0['subscriptions']} subscriptions each",
        caption="RSS growth over the server's RSS before the first connection, per connection (KB = 1024 bytes).",
    )
    for col in ("target", "RSS before KB", "KB per idle connection", "KB per connection with subscriptions"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for r in report["results"]:
        table.add_row(r["target"], f"{r['rss_before_kb']:,}", f"{r['kb_per_idle_connection']:.2f}", f"{r['kb_per_subscribed_connection']:.2f}")
    Console(width=150).print(table)


# --- accept: a reconnect storm ---------------------------------------------------------


def _prepare_topics(host: str, port: int, topics: int, backlog: int) -> list[tuple[str, str, int]]:
    """Publish ``backlog`` messages to each topic; (topic, epoch, seq) to resume from."""
    sock, rest = _ws_connect(host, port, timeout=30)
    try:
        out = []
        for t in range(topics):
            topic = f"storm.t{t}"
            sock.sendall(client_frame(json.dumps({"type": "subscribe", "topic": topic, "id": t}).encode()))
            buf = rest
            deadline = time.monotonic() + 30
            epoch = None
            while epoch is None:
                frames, end = split_frames(buf, 0)
                for op, start, stop in frames:
                    if op == 0x1 and b'"subscribed"' in buf[start:stop]:
                        epoch = json.loads(buf[start:stop]).get("epoch", "")
                buf = buf[end:]
                if epoch is None:
                    if time.monotonic() > deadline:
                        raise BenchError("no answer to a subscribe within 30 s")
                    buf += sock.recv(65536)
            for i in range(backlog):
                sock.sendall(client_frame(json.dumps({"type": "publish", "topic": topic, "payload": "x" * 48, "id": i}).encode()))
            rest = _read_until(sock, buf, backlog, b'"published"', 30)
            out.append((topic, epoch, backlog))
    finally:
        sock.close()
    return out


def storm_worker(host: str, port: int, count: int, concurrency: int, resume: list[tuple[str, str, int]], missed: int, control: Any) -> None:
    """One load-generator process: ``count`` connections, ``concurrency`` in flight."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _raise_nofile()
    from hdrh.histogram import HdrHistogram

    control.send(("ready",))
    if control.recv()[0] != "go":
        return
    hist = HdrHistogram(1, 60_000_000, 3)
    sel = selectors.DefaultSelector()
    request = (
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    done: list[socket.socket] = []
    started = failed = 0
    refused: dict[str, int] = {}
    inflight = 0
    t0 = time.monotonic()

    def start_one(i: int) -> None:
        nonlocal inflight, failed
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            failed += 1
            return
        topic, epoch, seq = resume[i % len(resume)]
        sub = client_frame(json.dumps({"type": "subscribe", "topic": topic, "since": {"epoch": epoch, "seq": seq - missed}, "id": 1}).encode())
        # state: [phase, buffer, started at, subscribe frame]; phase 0 connecting, 1 handshake, 2 subscribed?
        sel.register(sock, selectors.EVENT_WRITE, [0, b"", time.monotonic_ns(), sub])
        inflight += 1

    def end(sock: socket.socket, ok: bool, why: str = "") -> None:
        nonlocal inflight, failed
        sel.unregister(sock)
        inflight -= 1
        if ok:
            done.append(sock)
        else:
            failed += 1
            refused[why] = refused.get(why, 0) + 1
            sock.close()

    deadline = t0 + 120
    while (started < count or inflight) and time.monotonic() < deadline:
        while started < count and inflight < concurrency:
            start_one(started)
            started += 1
        for key, _ in sel.select(1.0):
            sock, state = key.fileobj, key.data
            if state[0] == 0:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    end(sock, False, "connect")
                    continue
                try:
                    sock.send(request)
                except OSError:
                    end(sock, False, "connect")
                    continue
                state[0] = 1
                sel.modify(sock, selectors.EVENT_READ, state)
                continue
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                end(sock, False, "reset")
                continue
            if not chunk:
                end(sock, False, "closed")
                continue
            buf = state[1] + chunk
            if state[0] == 1:
                if b"\r\n\r\n" not in buf:
                    state[1] = buf
                    continue
                head, _, buf = buf.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 101"):
                    end(sock, False, head.split(b" ", 2)[1].decode(errors="replace") if b" " in head else "http")
                    continue
                sock.send(state[3])
                state[0] = 2
            frames, stop_at = split_frames(buf, 0)
            for op, start, stop in frames:
                if op == 0x8:
                    code = int.from_bytes(buf[start : start + 2], "big") if stop - start >= 2 else 1005
                    end(sock, False, str(code))
                    break
                if op == 0x1 and b'"subscribed"' in buf[start:stop]:
                    hist.record_value(max(1, (time.monotonic_ns() - state[2]) // 1000))
                    end(sock, True)
                    break
            else:
                state[1] = buf[stop_at:]
    elapsed = time.monotonic() - t0
    control.send(("done", len(done), failed, refused, elapsed, hist.encode()))
    control.recv()  # hold the connections open until the storm is over everywhere
    for sock in done:
        sock.close()


def measure_storm(target: Target, connections: int, concurrency: int, procs: int, topics: int, missed: int, server_cpus: set[int] | None) -> dict[str, Any]:
    from hdrh.histogram import HdrHistogram

    host, port = target.endpoints[0]
    resume = _prepare_topics(host, port, topics, max(missed, 1) + 5)
    ctx = multiprocessing.get_context("spawn")
    pipes, workers = [], []
    share = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    try:
        for n in share:
            here, there = ctx.Pipe()
            proc = ctx.Process(target=storm_worker, args=(host, port, n, concurrency, resume, missed, there), daemon=True)
            proc.start()
            there.close()
            pipes.append(here)
            workers.append(proc)
        for pipe in pipes:
            expect(pipe, "ready", 60, BenchError, "a load-generator process")
        pin([w.pid for w in workers], load_cpus(server_cpus))
        cpu0 = sum(cpu_seconds(pid) for pid in server_pids(target))
        t0 = time.monotonic()
        for pipe in pipes:
            pipe.send(("go",))
        reports = [expect(pipe, "done", 180, BenchError, "a load-generator process") for pipe in pipes]
        wall = time.monotonic() - t0
        cpu = sum(cpu_seconds(pid) for pid in server_pids(target)) - cpu0
        target.check_alive()
    finally:
        for pipe in pipes:
            try:
                pipe.send(("close",))
            except OSError:
                pass
        for proc in workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    hist = HdrHistogram(1, 60_000_000, 3)
    refused: dict[str, int] = {}
    for r in reports:
        hist.add(HdrHistogram.decode(r[5]))
        for k, v in r[3].items():
            refused[k] = refused.get(k, 0) + v
    ok = sum(r[1] for r in reports)
    return {
        "target": target.name,
        "connections": connections,
        "completed": ok,
        "failed": sum(r[2] for r in reports),
        "refused": refused,
        "seconds": round(wall, 3),
        "per_s": round(ok / wall) if wall else 0,
        "server_cpu_s": round(cpu, 3),
        "per_cpu_s": round(ok / cpu) if cpu else 0,
        "p50_ms": round(hist.get_value_at_percentile(50) / 1000, 2),
        "p99_ms": round(hist.get_value_at_percentile(99) / 1000, 2),
    }


def accept_main(args: argparse.Namespace) -> int:
    if min(args.connections, args.concurrency, args.procs, args.topics) < 1 or args.missed < 0:
        print("fanroute: --connections, --concurrency, --procs and --topics must be positive", file=sys.stderr)
        return 2
    _raise_nofile()
    results = []
    with tempfile.TemporaryDirectory(prefix="fanroute-bench-") as tmp:
        for _ in range(args.repeat):
            for name in args.targets:
                print(f"{name}: a storm of {args.connections} connections", file=sys.stderr)
                try:
                    target = start_target(name, Path(tmp), args.server_cpus)
                except BenchError as exc:
                    print(f"fanroute: {exc}", file=sys.stderr)
                    return 1
                try:
                    results.append(measure_storm(target, args.connections, args.concurrency, args.procs, args.topics, args.missed, args.server_cpus))
                except (BenchError, OSError) as exc:
                    print(f"fanroute: {name}: {exc}", file=sys.stderr)
                    return 1
                finally:
                    target.stop()
    results = _median_by_target(results)
    report = {"benchmark": "accept", "argv": sys.argv[1:], "machine": machine(), "results": results,
              "ratios_seed": _ratios(results, "per_cpu_s", "seed"),
              "config": {"server_cpus": sorted(args.server_cpus) if args.server_cpus else None, "repeat": args.repeat}}
    emit_report(report, args.save, args.json, lambda: _render_accept(report))
    return 0


def _median_by_target(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(r["target"] for r in results):
        runs = sorted((r for r in results if r["target"] == name), key=lambda r: r["per_cpu_s"])
        median = dict(runs[len(runs) // 2])
        median["runs"] = [r["per_cpu_s"] for r in runs]
        out.append(median)
    return out


def _render_accept(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = report["config"]
    table = Table(
        title="fanroute bench accept — a reconnect storm: connect, handshake, subscribe with since",
        caption="per server-CPU second = the rate one core gives; ×seed of that. "
        + (f"Servers pinned to CPU {','.join(map(str, c['server_cpus']))}. " if c.get("server_cpus") else "")
        + (f"Median of {c['repeat']} runs. " if c.get("repeat", 1) > 1 else ""),
    )
    for col in ("target", "completed", "failed", "per s (wall)", "server CPU s", "per server-CPU s", "×seed", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "target" else "right")
    ratio = report["ratios_seed"]
    for r in report["results"]:
        failed = f"{r['failed']}" + (" (" + ", ".join(f"{k}×{v}" for k, v in sorted(r["refused"].items())) + ")" if r["refused"] else "")
        table.add_row(
            r["target"], f"{r['completed']:,}", failed, f"{r['per_s']:,}", f"{r['server_cpu_s']:.2f}", f"{r['per_cpu_s']:,}",
            "" if r["target"] not in ratio else f"{ratio[r['target']]:.2f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
        )
    Console(width=150).print(table)


# --- the subcommands ---------------------------------------------------------------------


def _targets(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown target(s) {', '.join(bad) or text!r}; known: {', '.join(TARGETS)}")
    return names


def add_connection_commands(sub: Any, flag: Any) -> None:
    p = sub.add_parser(
        "memory",
        help="server RSS per idle connection and per connection with subscriptions",
        description="RSS per connection of fanroute standalone, the websockets reference and the Node seed, side by side.",
    )
    flag(p, "--targets", _targets, list(TARGETS), "comma-separated targets: standalone, reference, seed")
    flag(p, "--connections", int, 5000, "idle connections opened")
    flag(p, "--subscriptions", int, 10, "subscriptions per connection in the second measurement")
    flag(p, "--topics", int, 1000, "topics the subscriptions are drawn from")
    flag(p, "--quiet-for", float, 3.0, "seconds the connections stay quiet before each RSS reading, every target alike (0: at once)")
    flag(p, "--server-cpus", cpu_set, None, "pin the servers to these CPUs (e.g. 0)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--save", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(bench_main=memory_main)

    p = sub.add_parser(
        "accept",
        help="new connections per second in a reconnect storm (handshake and subscribe with since)",
        description="A reconnect storm against fanroute standalone, the websockets reference and the Node seed, side by side.",
    )
    flag(p, "--targets", _targets, list(TARGETS), "comma-separated targets: standalone, reference, seed")
    flag(p, "--connections", int, 5000, "new connections in the storm")
    flag(p, "--concurrency", int, 256, "connection attempts in flight per load-generator process")
    flag(p, "--procs", int, 2, "load-generator processes")
    flag(p, "--topics", int, 100, "topics the clients resume")
    flag(p, "--missed", int, 5, "messages each client missed (recovered from history by fanroute)")
    flag(p, "--repeat", int, 1, "runs of every target; the median is reported")
    flag(p, "--server-cpus", cpu_set, None, "pin the servers to these CPUs (e.g. 0) and the load generator to the rest")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--save", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(bench_main=accept_main)
