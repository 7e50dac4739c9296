"""Test helpers: JSON/msgpack WebSocket clients, free ports, process clusters, metrics."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import orjson
import trio
from trio_websocket import open_websocket_url

from fanroute.config import GatewayConfig, RouterConfig
from fanroute.node import Bound, serve_standalone

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 30.0  # generous: the machines are shared and noisy
CLUSTER_SECRET = "tests-cluster-secret-0123456789"  # what spawned gateways and routers share


class WS:
    """A minimal protocol client over trio-websocket, for tests."""

    def __init__(self, conn: Any, binary: bool) -> None:
        self.conn = conn
        self.binary = binary

    async def send(self, obj: Any) -> None:
        if self.binary:
            await self.conn.send_message(msgpack.packb(obj))
        else:
            await self.conn.send_message(orjson.dumps(obj).decode())

    async def recv(self, timeout: float = DEADLINE) -> dict[str, Any]:
        with trio.fail_after(timeout):
            data = await self.conn.get_message()
        return msgpack.unpackb(data) if self.binary else orjson.loads(data)

    async def recv_type(self, kind: str, timeout: float = DEADLINE) -> dict[str, Any]:
        """Receive until a frame of ``kind`` arrives (other frames are dropped)."""
        with trio.fail_after(timeout):
            while True:
                msg = await self.recv()
                if msg.get("type") == kind:
                    return msg

    async def subscribe(self, topic: str, id: int = 1, since: dict | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "subscribe", "topic": topic, "id": id}
        if since is not None:
            frame["since"] = since
        await self.send(frame)
        return await self.recv_type("subscribed")


@asynccontextmanager
async def ws_connect(url: str, binary: bool = False):
    subprotocols = ["fanroute.msgpack"] if binary else None
    async with open_websocket_url(url, subprotocols=subprotocols) as conn:
        yield WS(conn, binary)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now, below the ephemeral range."""
    import random

    for _ in range(200):
        base = random.randrange(10000, 32000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports found")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, labels: str | None = None) -> float:
    """Sum of a metric's samples in Prometheus text (optionally those with ``labels``)."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and (labels is None or labels in (m.group(1) or "")):
            total += float(m.group(2))
            found = True
    if not found:
        raise KeyError(name)
    return total


def wait_until(pred, timeout: float = DEADLINE, what: str = "condition") -> None:
    """Poll ``pred`` (a plain function) until true; for processes outside trio."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def await_until(pred, timeout: float = DEADLINE, what: str = "condition") -> None:
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(pred):
            await trio.sleep(0.05)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    url: str = ""
    admin: str = ""
    argv: list[str] = field(default_factory=list)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def metrics(self) -> str:
        return http_get(self.admin + "/metrics")[1]


def spawn(name: str, args: list[str], url: str = "", admin: str = "") -> Proc:
    argv = [sys.executable, "-m", "fanroute.cli", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("FANROUTE_CLUSTER_SECRET", CLUSTER_SECRET)
    popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Proc(name, popen, url, admin, argv)


def ready(proc: Proc) -> bool:
    if proc.popen.poll() is not None:
        raise AssertionError(f"{proc.name} exited: {proc.popen.stderr.read().decode()[-2000:]}")
    try:
        return http_get(proc.admin + "/readyz", timeout=1)[0] == 200
    except OSError:
        return False


@dataclass
class Cluster:
    routers: list[Proc]
    gateways: list[Proc]
    router_arg: str

    def all(self) -> list[Proc]:
        return [*self.routers, *self.gateways]

    def stop(self) -> None:
        for p in self.all():
            p.kill()
        for p in self.all():
            p.popen.wait(timeout=10)

    def start_gateway(self, extra: list[str] = ()) -> Proc:
        port, admin = free_port(), free_port()
        i = len(self.gateways)
        proc = spawn(
            f"gateway-{i}",
            ["gateway", "--routers", self.router_arg, "--port", str(port), "--admin-port", str(admin), *extra],
            f"ws://127.0.0.1:{port}/",
            f"http://127.0.0.1:{admin}",
        )
        self.gateways.append(proc)
        return proc

    def start_router(self, i: int, port: int, extra: list[str] = ()) -> Proc:
        admin = free_port()
        return spawn(
            f"router-{i}",
            ["router", "--listen", f"tcp://127.0.0.1:{port}", "--name", f"router-{i}", "--admin-port", str(admin), *extra],
            f"tcp://127.0.0.1:{port}",
            f"http://127.0.0.1:{admin}",
        )


def start_cluster(gateways: int, routers: int, gateway_args: list[str] = (), router_args: list[str] = ()) -> Cluster:
    ports = [free_port() for _ in range(routers)]
    cluster = Cluster([], [], ",".join(f"router-{i}=tcp://127.0.0.1:{p}" for i, p in enumerate(ports)))
    try:
        for i, port in enumerate(ports):
            cluster.routers.append(cluster.start_router(i, port, list(router_args)))
        for _ in range(gateways):
            cluster.start_gateway(list(gateway_args))
        for proc in cluster.all():
            wait_until(lambda: ready(proc), what=f"{proc.name} ready")
    except BaseException:
        cluster.stop()
        raise
    return cluster


async def start_standalone(nursery: trio.Nursery, shards: int = 4, router: RouterConfig | None = None, **gateway: Any) -> Bound:
    """Run a standalone server (gateway + shards over inproc://) in the caller's nursery."""
    gw = GatewayConfig(routers=[("unused", "inproc://unused")], port=0, admin_port=0, **gateway)
    return await nursery.start(serve_standalone, gw, router or RouterConfig(admin_port=None), shards)


def urls(bound: Bound) -> tuple[str, str]:
    return f"ws://127.0.0.1:{bound.port}/", f"http://127.0.0.1:{bound.admin_port}"
