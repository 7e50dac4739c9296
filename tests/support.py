"""Test helpers: JSON/msgpack WebSocket clients, free ports, process clusters, metrics.

Processes, ports and Prometheus text are :mod:`fanroute.localcluster`'s; the names
here are the ones the tests use.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import orjson
import trio
from trio_websocket import open_websocket_url

from fanroute import localcluster
from fanroute.config import GatewayConfig, RouterConfig
from fanroute.localcluster import FANROUTE, LocalCluster, Node, free_port, free_port_run  # noqa: F401 - for the tests
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


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    return localcluster.http_get(url, timeout)


def metric(text: str, name: str, labels: str | None = None) -> float:
    """Sum of a metric's samples in Prometheus text (optionally those whose labels
    include ``labels``, e.g. ``'reason="mac"'``); KeyError when there is none."""
    return localcluster.metric(text, name, labels)


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


async def until(pred, what: str = "condition", timeout: float = DEADLINE) -> None:
    """Wait for ``pred()`` (cheap, in-process state, asked on the event loop) within
    the generous deadline; :func:`await_until` is for predicates that block (HTTP)."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


# Processes are fanroute.localcluster's: one implementation for the command line, the
# benchmarks and the tests. These are its names as the tests have always used them.
Proc = Node
_SPAWN_LOGS = Path(tempfile.mkdtemp(prefix="fanroute-tests-"))
atexit.register(shutil.rmtree, _SPAWN_LOGS, True)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("FANROUTE_CLUSTER_SECRET", CLUSTER_SECRET)
    return env


def spawn(name: str, args: list[str], url: str = "", admin: str = "") -> Proc:
    """One ``python -m fanroute.cli <args>`` process, outside any cluster."""
    node = Node(name, args[0], [*FANROUTE, *args], url=url, admin=admin, env=_env(), cwd=str(ROOT), log=_SPAWN_LOGS / f"{name}-{os.urandom(4).hex()}.log")
    return node.start()


def ready(proc: Proc) -> bool:
    if proc.dead:
        raise AssertionError(f"{proc.name} {proc.exit_text()}: {proc.log_tail()}")
    return proc.ready()


class Cluster:
    """A :class:`LocalCluster` with the tests' names: ``routers``, ``gateways``,
    ``all()``, ``stop()`` (SIGKILL), ``start_gateway``, ``start_router``."""

    def __init__(self, local: LocalCluster) -> None:
        self.local = local

    @property
    def routers(self) -> list[Proc]:
        return self.local.routers

    @property
    def gateways(self) -> list[Proc]:
        return self.local.gateways

    @property
    def router_arg(self) -> str:
        return self.local.router_list

    def all(self) -> list[Proc]:
        return self.local.nodes

    def stop(self) -> None:
        self.local.stop(signal.SIGKILL)

    def start_gateway(self, extra: list[str] = ()) -> Proc:
        """One more gateway, started (not waited for)."""
        return self.local.start_gateway(list(extra))

    def start_router(self, i: int, port: int, extra: list[str] = ()) -> Proc:
        """Router ``i`` started again on its own port (after it was killed)."""
        node = self.local.routers[i]
        assert port == node.port and not extra, "a router comes back on its own port, with its own flags"
        return self.local.restart(node.name, signal.SIGKILL)


def start_cluster(gateways: int, routers: int, gateway_args: list[str] = (), router_args: list[str] = (), env: dict[str, str] | None = None) -> Cluster:
    """Routers and gateways as processes, every one ready; ``stop()`` when done."""
    local = LocalCluster(
        gateways, routers, gateway_args=gateway_args, router_args=router_args,
        env=env, secret=os.environ.get("FANROUTE_CLUSTER_SECRET", CLUSTER_SECRET), cwd=ROOT,
    )
    try:
        local.start()
        local.wait_ready(2 * DEADLINE)
    except BaseException:
        local.stop(signal.SIGKILL)
        raise
    return Cluster(local)


async def start_standalone(nursery: trio.Nursery, shards: int = 4, router: RouterConfig | None = None, **gateway: Any) -> Bound:
    """Run a standalone server (gateway + shards over inproc://) in the caller's nursery."""
    gw = GatewayConfig(routers=[("unused", "inproc://unused")], port=0, admin_port=0, **gateway)
    return await nursery.start(serve_standalone, gw, router or RouterConfig(admin_port=None), shards)


def urls(bound: Bound) -> tuple[str, str]:
    return f"ws://127.0.0.1:{bound.port}/", f"http://127.0.0.1:{bound.admin_port}"
