"""``fanroute bench http-publish``: publications/s through the batch HTTP publish API.

A back-end feed's way in: ``POST /api/publish`` with ``{"items": [...]}`` on the admin
port, ``--batch`` publications per request, over ``--connections`` keep-alive
connections, each waiting for its answer before it sends the next request (the way a
feed handler that wants every ``seq`` works). Publications spread over ``--topics``
topics; every answer is read and every item checked: an item with an error, or a
status other than 200, is counted and reported, never hidden.

Targets, started as real processes on loopback:

- ``standalone``: ``fanroute standalone`` (the gateway's hub and its shards in one
  process);
- ``link``: one ``fanroute gateway`` and one ``fanroute router``, so every
  publication crosses one nng link to one router process and its answer comes back
  over the other: the publications per second one link and one router carry.

``--baseline DIR`` runs every target a second time from another build of fanroute
(``pip install --no-deps --target DIR <checkout>``), interleaved with this one in the
same run, so a change is measured against what it replaced on the same machine at the
same moment. With ``--pin`` (the default on a machine with two cores or more) the
server processes share core 0 and the load generator runs on core 1: "server side on
one core".
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fanroute.errors import BenchError
from fanroute.bench.loadgen import cpu_seconds, emit_report, machine
from fanroute.localcluster import LocalCluster, LocalClusterError

TARGETS = ("standalone", "link")
API_KEY = "bench-http-publish-api-key-0123456789"
# The bench measures the data path, not the abuse limits.
SERVER_ENV = {
    "FANROUTE_LOG_LEVEL": "warning",
    "FANROUTE_PUBLISH_RATE": "0",
    "FANROUTE_COMMAND_RATE": "0",
    "FANROUTE_CONNECTION_RATE": "0",
    "FANROUTE_API_KEY": API_KEY,
}
_READY_TIMEOUT = 30.0
_ANSWER_TIMEOUT = 15.0


@dataclass
class Run:
    target: str
    build: str  # "current" or "baseline"
    publications: int = 0
    requests: int = 0
    errors: int = 0
    bad_status: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    per_process_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.publications / self.seconds if self.seconds else 0.0


def _bodies(batch: int, topics: int, payload: int, count: int = 8) -> list[bytes]:
    """A few request bodies, built once: the generator must cost far less than the server."""
    filler = "x" * max(0, payload - 12)
    out = []
    n = 0
    for _ in range(count):
        items = []
        for _ in range(batch):
            items.append({"topic": f"bench.t{n % topics}", "payload": {"n": n, "f": filler}})
            n += 1
        out.append(orjson.dumps({"items": items}))
    return out


def _request(host: str, port: int, body: bytes) -> bytes:
    head = (
        f"POST /api/publish HTTP/1.1\r\nhost: {host}:{port}\r\nx-api-key: {API_KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Conn:
    """One keep-alive connection: one request in flight, its answer parsed by hand."""

    __slots__ = ("sock", "buf", "sent_at", "requests", "next")

    def __init__(self, host: str, port: int, requests: list[bytes], first: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""
        self.requests = requests
        self.next = first
        self.sent_at = 0.0

    def send(self) -> None:
        data = self.requests[self.next % len(self.requests)]
        self.next += 1
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)
        self.sent_at = time.monotonic()

    def answer(self) -> tuple[int, bytes] | None:
        """The status and body of a complete answer in the buffer, if there is one."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buf[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(self.buf) < end + 4 + length:
            return None
        body = self.buf[end + 4 : end + 4 + length]
        self.buf = self.buf[end + 4 + length :]
        return status, body


def _drive(host: str, port: int, run: Run, requests: list[bytes], batch: int, connections: int,
           warmup: float, duration: float, pids: dict[str, int]) -> None:
    conns = [_Conn(host, port, requests, i) for i in range(connections)]
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
        c.send()
    start = time.monotonic()
    measure_from = start + warmup
    end = measure_from + duration
    measuring = False
    cpu0: dict[str, float] = {}
    try:
        while True:
            now = time.monotonic()
            if not measuring and now >= measure_from:
                measuring = True
                cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
                run.publications = run.requests = run.errors = run.bad_status = 0
                t0 = now
            if now >= end:
                break
            for key, _ in sel.select(timeout=0.5):
                c: _Conn = key.data
                data = c.sock.recv(1 << 20)
                if not data:
                    raise BenchError(f"{run.target}: the server closed a keep-alive connection")
                c.buf += data
                got = c.answer()
                if got is None:
                    continue
                status, body = got
                run.requests += 1
                if status != 200:
                    run.bad_status += 1
                    run.errors += batch
                else:
                    results = orjson.loads(body)["results"]
                    bad = sum(1 for r in results if "error" in r)
                    run.errors += bad
                    run.publications += len(results) - bad
                c.send()
            for c in conns:
                if time.monotonic() - c.sent_at > _ANSWER_TIMEOUT:
                    raise BenchError(f"{run.target}: no answer to a POST within {_ANSWER_TIMEOUT:g} s")
        run.seconds = time.monotonic() - t0
        run.per_process_cpu = {name: round(cpu_seconds(pid) - cpu0[name], 3) for name, pid in pids.items()}
        run.server_cpu = round(sum(run.per_process_cpu.values()), 3)
        # Let the answers in flight come back before the target stops.
        deadline = time.monotonic() + _ANSWER_TIMEOUT
        waiting = {c for c in conns}
        while waiting and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                c = key.data
                data = c.sock.recv(1 << 20)
                c.buf += data
                if not data or c.answer() is not None:
                    waiting.discard(c)
    finally:
        for c in conns:
            c.sock.close()


def _pin(pids: list[int], cores: set[int]) -> None:
    for pid in pids:
        try:
            os.sched_setaffinity(pid, cores)
        except OSError:
            pass


def _start(target: str, build: str, baseline: str | None, logdir: Path) -> LocalCluster:
    env = dict(SERVER_ENV)
    if build == "baseline":
        env["PYTHONPATH"] = str(Path(baseline).resolve())
    shape = {"gateways": 0, "routers": 0, "standalones": 1} if target == "standalone" else {"gateways": 1, "routers": 1}
    cluster = LocalCluster(**shape, env=env, logdir=logdir / f"{target}-{build}")
    cluster.start()
    try:
        cluster.wait_ready(_READY_TIMEOUT)
    except LocalClusterError as exc:
        cluster.stop()
        raise BenchError(f"{target} ({build}): {exc}") from None
    return cluster


def run_one(target: str, build: str, settings: Any, requests_for: dict, logdir: Path) -> Run:
    cluster = _start(target, build, settings.baseline, logdir)
    try:
        nodes = [*cluster.standalones, *cluster.gateways, *cluster.routers]
        pids = {n.name: n.pid for n in nodes}
        if settings.pin:
            _pin(list(pids.values()), {0})
        front = (cluster.standalones or cluster.gateways)[0]
        host, port = "127.0.0.1", front.admin_port
        requests = requests_for.setdefault(port, [_request(host, port, b) for b in requests_for["bodies"]])
        run = Run(target, build)
        profilers = _profile(settings, target, build, pids)
        try:
            _drive(host, port, run, requests, settings.batch, settings.connections, settings.warmup, settings.duration, pids)
        finally:
            for prof in profilers:
                try:
                    prof.wait(timeout=settings.warmup + settings.duration + 30)
                except subprocess.TimeoutExpired:
                    prof.kill()
        return run
    finally:
        cluster.stop()


def _profile(settings: Any, target: str, build: str, pids: dict[str, int]) -> list[subprocess.Popen]:
    """With ``--profile DIR``: a py-spy sampling profile of every server process over
    the run, as collapsed stacks (``DIR/<target>-<build>-<process>.txt``)."""
    if not settings.profile:
        return []
    spy = shutil.which("py-spy") or str(Path(os.sys.executable).with_name("py-spy"))
    out = Path(settings.profile)
    out.mkdir(parents=True, exist_ok=True)
    seconds = max(1, int(settings.warmup + settings.duration))
    return [
        subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250", "--nonblocking",
             "--format", "raw", "--output", str(out / f"{target}-{build}-{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]


def http_publish_main(args: Any) -> int:
    if args.baseline and not (Path(args.baseline) / "fanroute").is_dir():
        raise BenchError(f"--baseline {args.baseline} holds no fanroute package (pip install --no-deps --target DIR <checkout>)")
    args.pin = args.pin and (os.cpu_count() or 1) >= 2
    if args.pin:
        os.sched_setaffinity(0, {1})
    builds = ["current", "baseline"] if args.baseline else ["current"]
    bodies = _bodies(args.batch, args.topics, args.payload)
    runs: dict[tuple[str, str], list[Run]] = {}
    logdir = Path(tempfile.mkdtemp(prefix="fanroute-bench-http-"))
    mach = machine()
    for _ in range(args.repeat):
        for target in args.targets:
            for build in builds:
                requests_for: dict = {"bodies": bodies}
                run = run_one(target, build, args, requests_for, logdir)
                runs.setdefault((target, build), []).append(run)
    rows = []
    for (target, build), rs in runs.items():
        rates = [r.rate for r in rs]
        mid = sorted(rs, key=lambda r: r.rate)[len(rs) // 2]
        rows.append({
            "target": target,
            "build": build,
            "publications_per_s": round(statistics.median(rates)),
            "runs": [round(x) for x in rates],
            "errors": sum(r.errors for r in rs),
            "bad_status": sum(r.bad_status for r in rs),
            "requests": sum(r.requests for r in rs),
            "server_cpu_us_per_publication": round(1e6 * mid.server_cpu / max(1, mid.publications), 2),
            "cpu_by_process": mid.per_process_cpu,
        })
    for row in rows:
        base = next((r for r in rows if r["target"] == row["target"] and r["build"] == "baseline"), None)
        if base is not None and row["build"] == "current" and base["publications_per_s"]:
            row["ratio_to_baseline"] = round(row["publications_per_s"] / base["publications_per_s"], 2)
    report = {
        "benchmark": "http-publish",
        "settings": {
            "batch": args.batch, "connections": args.connections, "topics": args.topics, "payload": args.payload,
            "duration": args.duration, "warmup": args.warmup, "repeat": args.repeat, "pinned": args.pin,
            "baseline": bool(args.baseline),
        },
        "machine": mach,
        "results": rows,
    }

    def render() -> None:
        print(f"fanroute bench http-publish: {args.batch} per POST, {args.connections} keep-alive connections, "
              f"{args.topics} topics, {args.duration:g} s x {args.repeat}" + (", servers on core 0" if args.pin else ""))
        print(f"{'target':<11} {'build':<9} {'publications/s':>15} {'errors':>7} {'µs CPU/pub':>11} {'vs baseline':>12}")
        for r in rows:
            ratio = f"{r['ratio_to_baseline']:.2f}x" if "ratio_to_baseline" in r else ""
            print(f"{r['target']:<11} {r['build']:<9} {r['publications_per_s']:>15,} {r['errors']:>7} "
                  f"{r['server_cpu_us_per_publication']:>11} {ratio:>12}")

    emit_report(report, args.save, args.json, render)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


def _targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"known targets: {', '.join(TARGETS)}")
    return names


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def add_publish_command(sub: Any, flag: Any) -> None:
    p = sub.add_parser(
        "http-publish",
        help="publications/s through the batch HTTP publish API",
        description="Batch POST /api/publish through fanroute standalone and through one gateway, one nng link "
        "and one router, optionally side by side with another build (--baseline).",
    )
    flag(p, "--targets", _targets, list(TARGETS), "comma-separated targets: standalone, link")
    flag(p, "--batch", int, 500, "publications per POST")
    flag(p, "--connections", int, 2, "keep-alive connections, one request in flight on each")
    flag(p, "--topics", int, 100, "topics the publications spread over")
    flag(p, "--payload", int, 64, "approximate payload size in bytes")
    flag(p, "--duration", float, 5.0, "seconds measured per run")
    flag(p, "--warmup", float, 1.0, "seconds before the measurement starts")
    flag(p, "--repeat", int, 1, "runs of every target (interleaved); the median is reported")
    flag(p, "--pin", _bool, True, "servers on core 0, the load generator on core 1 (with 2 cores or more)")
    flag(p, "--baseline", str, "", "a directory holding another fanroute build to run side by side")
    flag(p, "--profile", str, "", "a directory for py-spy profiles of the server processes (collapsed stacks)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--save", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(bench_main=http_publish_main)
