"""Hostile-load figures: what one abusive client costs a router or a gateway.

Two measurements, each against real processes on 127.0.0.1 (``python -m fanroute.cli
router`` and ``gateway`` on free ports, sharing a random ``FANROUTE_CLUSTER_SECRET``),
driven from outside by real WebSocket clients (the ``websockets`` package):

``history-flood``
    One connection publishes ``--topics`` topics × one payload of ``--size`` bytes,
    pipelined, and the router's resident memory and history gauge are read once it
    has sequenced every publication. It runs twice in one invocation: with the
    router's ``--history-bytes`` cap (default 256 MiB) and with the cap effectively
    off, as the reference for what the flood costs without it.

``close-codes``
    ``--connections`` unauthenticated connections (a token is required) each close
    with a random close code, before or just after the auth deadline; the gateway's
    ``fanroute_gateway_connections_closed_total`` series and the sample lines of its
    whole ``/metrics`` exposition are counted before and after.

Each prints a small table, then the whole report as one JSON line. Every child is
stopped in a ``finally`` (SIGTERM, then SIGKILL); each wait polls for its event with
a deadline (``--timeout``). Run from the checkout::

    .venv/bin/python -m fanroute.bench.hostile history-flood
    .venv/bin/python -m fanroute.bench.hostile close-codes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fanroute.errors import BenchError
from fanroute.bench.loadgen import machine
from fanroute.localcluster import LocalCluster, LocalClusterError, Node

POLL = 0.05  # seconds between two looks at a metric while waiting for it
STOP_GRACE = 5.0  # seconds a child gets after SIGTERM before SIGKILL
# Close codes a client may send in the 1xxx range (RFC 6455 §7.4.1; 1004-1006 and
# 1015 are reserved and never appear on the wire).
SENDABLE_1XXX = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)


# --- child processes -----------------------------------------------------------------


class Child:
    """One process of a run (a ``fanroute.localcluster`` node), with what this tool reads."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.name, self.url, self.admin, self.popen = node.name, node.url, node.admin, node.popen

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.popen.returncode}: {self.node.log_tail()}")

    def exposition(self) -> str:
        return self.node.metrics()

    def metrics(self) -> list[Sample]:
        return samples(self.exposition())

    def ready(self) -> bool:
        self.check_alive()
        return self.node.ready()

    def memory_kib(self) -> dict[str, int]:
        """VmRSS (resident now) and VmHWM (peak resident) of the process, in KiB."""
        out = {}
        with open(f"/proc/{self.popen.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out


class Children:
    """The router and gateway of one run, started as every local cluster is
    (``fanroute.localcluster``: free loopback ports, one random cluster secret)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.cluster: LocalCluster | None = None
        self.children: list[Child] = []

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop(timeout=STOP_GRACE)

    def router_and_gateway(self, router_args: list[str], gateway_args: list[str], timeout: float) -> tuple[Child, Child]:
        self.cluster = LocalCluster(
            1, 1, router_args=router_args, gateway_args=["--drain-window", "0", *gateway_args],
            logdir=self.logdir, ready_timeout=timeout,
        )
        try:
            self.cluster.start()
            self.cluster.wait_ready()  # the gateway is ready once its shard link is up
        except LocalClusterError as exc:
            raise BenchError(str(exc)) from None
        self.children = [Child(self.cluster.routers[0]), Child(self.cluster.gateways[0])]
        return self.children[0], self.children[1]


def wait_for(pred: Callable[[], bool], deadline: float, what: str, children: list[Child]) -> None:
    """Poll ``pred`` until it holds; raise once ``deadline`` (monotonic) has passed."""
    while True:
        for c in children:
            c.check_alive()
        if pred():
            return
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(POLL)


# --- metrics -------------------------------------------------------------------------


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def lines_per_family(text: str) -> dict[str, int]:
    return {family.name: len(family.samples) for family in text_string_to_metric_families(text)}


def value(ss: list[Sample], name: str) -> float:
    """The sum of the samples called ``name`` (0 when there are none)."""
    return sum(s.value for s in ss if s.name == name)


def series(ss: list[Sample], name: str) -> list[Sample]:
    return [s for s in ss if s.name == name]


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


# --- history-flood -------------------------------------------------------------------


def _frames(topics: int, size: int):
    """The publications: one plain publish per topic, payload a JSON string of ``size`` bytes."""
    payload = '"' + "x" * max(0, size - 2) + '"'
    for i in range(topics):
        yield f'{{"topic":"flood.{i:06d}","payload":{payload}}}'


async def _flood(url: str, router: Child, topics: int, size: int, deadline: float, children: list[Child]) -> dict[str, Any]:
    """Publish everything through one connection, then hold it open until the router
    has sequenced every publication (closing earlier could drop what the gateway has
    not read yet)."""
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    received: Counter[str] = Counter()
    closed_by_server = None
    # The polling below stops at the deadline; this bounds a send that never returns.
    async with asyncio.timeout(max(0.1, deadline - time.monotonic() + STOP_GRACE)):
        async with connect(url, compression=None, max_size=None, open_timeout=10, close_timeout=5) as ws:

            async def read() -> None:
                # Anything the gateway says back (an error frame) is counted, and
                # read, so that it cannot push back on the gateway.
                async for message in ws:
                    text = message if isinstance(message, str) else message.decode(errors="replace")
                    try:
                        frame = json.loads(text)
                        received[str(frame.get("code") or frame.get("type") or "?")] += 1
                    except (ValueError, AttributeError):
                        received["undecodable"] += 1

            reader = asyncio.create_task(read())
            t0 = time.monotonic()
            sent = 0
            try:
                for frame in _frames(topics, size):
                    await ws.send(frame)  # waits while the gateway pushes back
                    sent += 1
            except Exception as exc:  # the gateway closed the connection
                closed_by_server = f"{type(exc).__name__}: {exc}"
            t_sent = time.monotonic()
            published = 0.0
            while True:
                for c in children:
                    c.check_alive()
                published = value(await loop.run_in_executor(None, router.metrics), "fanroute_router_publications_total")
                if published >= sent or closed_by_server or time.monotonic() > deadline:
                    break
                await asyncio.sleep(POLL)
            t_done = time.monotonic()
            reader.cancel()
    return {
        "sent": sent,
        "publications": int(published),
        "send_s": round(t_sent - t0, 2),
        "elapsed_s": round(t_done - t0, 2),
        "complete": published >= topics,
        "server_frames": dict(received),
        "connection_error": closed_by_server,
    }


def history_flood_run(label: str, history_bytes: int, a: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    run_dir = logdir / label
    run_dir.mkdir()
    procs = Children(run_dir)
    deadline = time.monotonic() + a.timeout
    try:
        router, gateway = procs.router_and_gateway(
            ["--history-bytes", str(history_bytes)],
            ["--max-frame", str(a.max_frame), "--anonymous", "allow"],
            a.timeout,
        )
        before_r, before_g = router.memory_kib(), gateway.memory_kib()
        try:
            flood = asyncio.run(_flood(gateway.url, router, a.topics, a.size, deadline, procs.children))
        except TimeoutError:
            raise BenchError(f"the flood did not finish within --timeout {a.timeout:g} s") from None
        after_r, after_g = router.memory_kib(), gateway.memory_kib()
        m = router.metrics()
        return {
            "run": label,
            "history_bytes_limit": history_bytes,
            "router_rss_before_mib": mib(before_r["VmRSS"]),
            "router_rss_after_mib": mib(after_r["VmRSS"]),
            "router_rss_peak_mib": mib(after_r["VmHWM"]),
            "gateway_rss_before_mib": mib(before_g["VmRSS"]),
            "gateway_rss_after_mib": mib(after_g["VmRSS"]),
            "gateway_rss_peak_mib": mib(after_g["VmHWM"]),
            "history_bytes": int(value(m, "fanroute_router_history_bytes")),
            "history_messages": int(value(m, "fanroute_router_history_messages")),
            "evicted": int(value(m, "fanroute_router_history_evicted_total")),
            "evicted_bytes": int(value(m, "fanroute_router_history_evicted_bytes_total")),
            "topics": int(value(m, "fanroute_router_topics")),
            "wire_rejected": int(value(m, "fanroute_router_wire_rejected_total")),
            **flood,
        }
    finally:
        procs.stop()


def history_flood(a: argparse.Namespace) -> int:
    if a.max_frame is None:
        a.max_frame = max(70000, a.size + 1024)
    report: dict[str, Any] = {
        "command": "history-flood",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": {"topics": a.topics, "size": a.size, "max_frame": a.max_frame, "timeout": a.timeout,
                     "history_bytes": a.history_bytes, "reference_history_bytes": a.reference_bytes},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="fanroute-hostile-") as tmp:
        for label, limit in (("capped", a.history_bytes), ("uncapped", a.reference_bytes)):
            print(f"# {label}: {a.topics} topics x {a.size} B, router --history-bytes {limit}", file=sys.stderr, flush=True)
            try:
                report["runs"].append(history_flood_run(label, limit, a, Path(tmp)))
            except BenchError as exc:
                report["runs"].append({"run": label, "history_bytes_limit": limit, "error": str(exc)})
                print(f"# {label} failed: {exc}", file=sys.stderr, flush=True)
    _table(
        ["run", "--history-bytes", "published", "RSS before MiB", "RSS after MiB", "RSS peak MiB",
         "history_bytes gauge", "evicted", "elapsed s", "gateway RSS after MiB"],
        [[r["run"], f"{r['history_bytes_limit']:,}", f"{r.get('publications', 0):,}/{a.topics:,}",
          r.get("router_rss_before_mib", "-"), r.get("router_rss_after_mib", "-"), r.get("router_rss_peak_mib", "-"),
          f"{r['history_bytes']:,}" if "history_bytes" in r else "-", f"{r['evicted']:,}" if "evicted" in r else "-",
          r.get("elapsed_s", r.get("error", "-")), r.get("gateway_rss_after_mib", "-")]
         for r in report["runs"]],
    )
    print(json.dumps(report, separators=(",", ":")))
    return 0 if all(r.get("complete") for r in report["runs"]) else 1


# --- close-codes ---------------------------------------------------------------------


def _plan(n: int, auth_timeout: float, rng: random.Random) -> list[tuple[int, float]]:
    """(close code, seconds after the handshake) per connection: mostly 3000-4999, one
    in eight from the 1xxx codes a client may send; half before the auth deadline,
    half just after it (when the gateway's once-a-second sweep may not have closed
    the connection yet)."""
    # Application codes are drawn without repetition while they last, so that each
    # connection brings a code no other one did: the most series a client can try.
    fresh = rng.sample(range(3000, 5000), 2000)
    out = []
    for i in range(n):
        if rng.random() < 0.125:
            code = rng.choice(SENDABLE_1XXX)
        else:
            code = fresh.pop() if fresh else rng.randrange(3000, 5000)
        if i % 2:
            delay = rng.uniform(0.0, 0.9 * auth_timeout)
        else:
            delay = rng.uniform(auth_timeout, auth_timeout + 0.5)
        out.append((code, delay))
    return out


async def _one(url: str, code: int, delay: float, tally: Counter[str]) -> None:
    from websockets.asyncio.client import connect

    try:
        async with asyncio.timeout(delay + 15):
            ws = await connect(url, compression=None, open_timeout=10, close_timeout=5)
            try:
                # Behave like the client: stay for ``delay`` seconds, unless the
                # gateway closes first (its auth deadline).
                await asyncio.wait_for(asyncio.shield(ws.wait_closed()), delay)
                tally[f"closed by gateway {ws.close_code}"] += 1
            except TimeoutError:
                await ws.close(code, "bye")
                protocol = ws.protocol
                if protocol.close_rcvd_then_sent and protocol.close_rcvd is not None:  # the gateway's close crossed ours
                    tally[f"closed by gateway {protocol.close_rcvd.code}"] += 1
                else:
                    tally["closed by client"] += 1
            finally:
                await ws.close()
    except Exception as exc:  # a refused or broken handshake: counted, not fatal
        tally[f"failed: {type(exc).__name__}"] += 1


def _exposition(ss: list[Sample]) -> dict[str, Any]:
    closed = series(ss, "fanroute_gateway_connections_closed_total")
    family = [s for s in ss if s.name.startswith("fanroute_gateway_connections_closed_")]
    return {
        "closed_series": len(closed),
        "closed_sample_lines": len(family),  # with the _created twin of each series
        "closed_total": int(sum(s.value for s in closed)),
        "sample_lines": len(ss),
        "closed_by_label": {f"{s.labels.get('reason')}/{s.labels.get('code')}": int(s.value) for s in closed},
    }


def close_codes(a: argparse.Namespace) -> int:
    rng = random.Random(a.seed)
    plan = _plan(a.connections, a.auth_timeout, rng)
    report: dict[str, Any] = {
        "command": "close-codes",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": {"connections": a.connections, "batch": a.batch, "auth_timeout": a.auth_timeout,
                     "timeout": a.timeout, "seed": a.seed},
        "distinct_codes_sent": len({code for code, _ in plan}),
    }
    deadline = time.monotonic() + a.timeout
    tally: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="fanroute-hostile-") as tmp:
        procs = Children(Path(tmp))
        try:
            _, gateway = procs.router_and_gateway(
                [], ["--jwt-secret", "x" * 32, "--anonymous", "deny", "--auth-timeout", str(a.auth_timeout)], a.timeout
            )
            before_text = gateway.exposition()
            before = samples(before_text)
            rss_before = gateway.memory_kib()["VmRSS"]
            t0 = time.monotonic()

            async def drive() -> None:
                for start in range(0, len(plan), a.batch):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise BenchError("timed out opening connections")
                    async with asyncio.timeout(remaining):
                        await asyncio.gather(*(_one(gateway.url, code, delay, tally)
                                               for code, delay in plan[start : start + a.batch]))
                    print(f"# {min(start + a.batch, len(plan))}/{len(plan)} connections done", file=sys.stderr, flush=True)

            asyncio.run(drive())
            opened_before = value(before, "fanroute_gateway_connections_opened_total")
            closed_before = value(before, "fanroute_gateway_connections_closed_total")
            last: list[Sample] = []
            last_text = ""

            def settled() -> bool:
                # Every connection the gateway accepted has been closed and counted.
                nonlocal last, last_text
                last_text = gateway.exposition()
                last = samples(last_text)
                opened = value(last, "fanroute_gateway_connections_opened_total") - opened_before
                closed = value(last, "fanroute_gateway_connections_closed_total") - closed_before
                return value(last, "fanroute_gateway_connections") == 0 and closed == opened

            wait_for(settled, deadline, "the gateway to count every close", procs.children)
            report["elapsed_s"] = round(time.monotonic() - t0, 2)
            report["gateway_rss_before_mib"] = mib(rss_before)
            report["gateway_rss_after_mib"] = mib(gateway.memory_kib()["VmRSS"])
            report["opened"] = int(value(last, "fanroute_gateway_connections_opened_total") - opened_before)
            report["auth_timeouts"] = int(sum(s.value for s in series(last, "fanroute_gateway_auth_failures_total")
                                              if s.labels.get("kind") == "timeout"))
            report["before"], report["after"] = _exposition(before), _exposition(last)
            fam_before, fam_after = lines_per_family(before_text), lines_per_family(last_text)
            report["lines_added_by_family"] = {
                name: n - fam_before.get(name, 0) for name, n in sorted(fam_after.items()) if n != fam_before.get(name, 0)
            }
        finally:
            procs.stop()
    report["client_outcomes"] = dict(sorted(tally.items()))
    b, f = report["before"], report["after"]
    _table(
        ["", "closed_total series", "closed_total sample lines (+_created)", "all sample lines", "connections closed"],
        [["before", b["closed_series"], b["closed_sample_lines"], b["sample_lines"], b["closed_total"]],
         ["after", f["closed_series"], f["closed_sample_lines"], f["sample_lines"], f["closed_total"]],
         ["added", f["closed_series"] - b["closed_series"], f["closed_sample_lines"] - b["closed_sample_lines"],
          f["sample_lines"] - b["sample_lines"], f["closed_total"] - b["closed_total"]]],
    )
    shown = sorted(f["closed_by_label"].items(), key=lambda kv: -kv[1])
    more = f", and {len(shown) - 20} more" if len(shown) > 20 else ""
    print(f"{a.connections} connections, {report['distinct_codes_sent']} distinct close codes sent, "
          f"{report['elapsed_s']} s; closed_total series after (reason/code=count): "
          + ", ".join(f"{k}={v}" for k, v in shown[:20]) + more)
    print("clients saw: " + ", ".join(f"{k}: {v}" for k, v in report["client_outcomes"].items()))
    print("sample lines added, by family: " + ", ".join(f"{k} +{v}" for k, v in report["lines_added_by_family"].items()))
    print(json.dumps(report, separators=(",", ":")))
    return 0


# --- output and command line ---------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hostile.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("history-flood", help="router memory under one client's topic flood, capped and uncapped")
    p.add_argument("--topics", type=int, default=25000, help="topics published to, one publication each (25000)")
    p.add_argument("--size", type=int, default=60000, help="bytes of each payload, a JSON string (60000)")
    p.add_argument("--history-bytes", type=int, default=256 << 20, help="the router's cap in the capped run (256 MiB)")
    p.add_argument("--reference-bytes", type=int, default=10**12, help="the cap in the reference run, effectively off (1e12)")
    p.add_argument("--max-frame", type=int, default=None, help="the gateway's --max-frame (max(70000, size + 1024))")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds each run may take, start to finish (120)")
    p.set_defaults(main=history_flood)
    p = sub.add_parser("close-codes", help="gateway metric series added by unauthenticated clients' close codes")
    p.add_argument("--connections", type=int, default=2000, help="connections opened (2000)")
    p.add_argument("--batch", type=int, default=200, help="connections open at once (200)")
    p.add_argument("--auth-timeout", type=float, default=1.0, help="the gateway's --auth-timeout (1)")
    p.add_argument("--seed", type=int, default=None, help="random seed for codes and timing")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds the whole run may take (150)")
    p.set_defaults(main=close_codes)
    a = parser.parse_args(argv)
    try:
        return a.main(a)
    except BenchError as exc:
        print(f"hostile.py: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
