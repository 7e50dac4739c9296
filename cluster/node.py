"""Whole processes, composed from the servers: standalone, gateway, router.

Each ``serve_*`` coroutine starts its servers and the admin port, reports what it
bound through ``task_status`` and runs until cancelled. The command line and the
in-process tests both use these, so a test runs exactly what a user runs.
"""

from __future__ import annotations

import gc
import secrets
import sys
from dataclasses import dataclass, replace

import trio
from prometheus_client import CollectorRegistry

from fanroute.admin import AdminServer
from fanroute.config import ConfigError, GatewayConfig, RouterConfig
from fanroute.gateway.api import PublishApi, install_server_api
from fanroute.gateway.server import GatewayServer
from fanroute.router.server import RouterServer


@dataclass
class Bound:
    """What a process listens on, once started."""

    port: int | None = None
    admin_port: int | None = None
    gateway: GatewayServer | None = None
    routers: tuple[RouterServer, ...] = ()


async def _serve_admin(
    nursery: trio.Nursery, admin: AdminServer, host: str, port: int | None
) -> int | None:
    if port is None:
        return None
    try:
        return await nursery.start(admin.serve, host, port)
    except OSError as exc:
        raise ConfigError(f"--admin-port {port} on {host} cannot be listened on: {exc.strerror}") from None


def tune_runtime() -> None:
    """The interpreter's settings for a server process: the collector, and the GIL.

    Fewer, larger collections of the young generation: a server allocates short-lived dicts, lists and frames by the million and keeps
    a large, long-lived history. At CPython's default (a young collection every 700
    allocations, and full ones that walk every history entry) the collector took
    about a sixth of the batch publish path. What is alive once the process is set
    up is frozen out of collections, and the young generation is collected every
    200,000 allocations (about 15 % more batch publications per second than at
    50,000): only cyclic garbage waits for it, and little garbage here is cyclic,
    reference counting frees the rest at once.

    The nng links send and receive in threads of their own (:mod:`fanroute.nngio`)
    that need the GIL only for a moment per message; at CPython's default switch
    interval (5 ms) a thread with a message in hand could wait that long while the
    event loop computes. At 0.5 ms the threads get in promptly (measured: fan-out 1
    through a cluster went from about 40k to 45k deliveries/s, at less CPU each).
    """
    gc.freeze()
    gc.set_threshold(200_000, 10, 10)
    sys.setswitchinterval(0.0005)


async def serve_router(
    config: RouterConfig, *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED
) -> None:
    tune_runtime()
    router = RouterServer(config)
    router.listen()
    admin = AdminServer(router.registry, router.ready)
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        admin_port = await _serve_admin(nursery, admin, config.admin_host, config.admin_port)
        task_status.started(Bound(admin_port=admin_port, routers=(router,)))


async def serve_gateway(
    config: GatewayConfig, *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED
) -> None:
    tune_runtime()
    gateway = GatewayServer(config)
    admin = AdminServer(gateway.registry, gateway.ready)
    api = PublishApi(gateway)
    admin.route("POST", "/api/publish", api.handle)
    admin.route("GET", "/api/presence", api.presence)
    install_server_api(admin, gateway)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        admin_port = await _serve_admin(nursery, admin, config.admin_host, config.admin_port)
        task_status.started(Bound(port=gateway.port, admin_port=admin_port, gateway=gateway))


async def serve_standalone(
    gateway_config: GatewayConfig,
    router_config: RouterConfig,
    shards: int,
    *,
    demo_feed: float = 0.0,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A gateway and ``shards`` router shards in one process and one trio loop.

    The gateway's hub calls each shard directly
    (:class:`fanroute.gateway.locallink.LocalShardLink`): no nng socket, no
    encoding, no MAC. nng is for clusters, where there is a wire. The inproc://
    addresses below are never listened on; they only name the parts, the way a
    cluster's addresses do.
    """
    tune_runtime()
    if shards < 1:
        raise ConfigError("--shards must be at least 1")
    tag = secrets.token_hex(4)
    # Nothing leaves the process; the secret only satisfies the configuration.
    secret = secrets.token_hex(16)
    registry = CollectorRegistry()
    names = [(f"shard-{i}", f"inproc://fanroute-{tag}-shard-{i}") for i in range(shards)]
    routers = [
        RouterServer(
            replace(router_config, name=name, listen=url, admin_port=None, cluster_secret=secret, copies=1), registry
        )
        for name, url in names
    ]
    gateway = GatewayServer(
        replace(
            gateway_config, routers=names, inbox=f"inproc://fanroute-{tag}-gateway", advertise=None, cluster_secret=secret
        ),
        registry,
        local_shards={router.config.name: router.shard for router in routers},
    )

    def ready() -> tuple[bool, str]:
        return gateway.ready()

    admin = AdminServer(registry, ready)
    api = PublishApi(gateway)
    admin.route("POST", "/api/publish", api.handle)
    admin.route("GET", "/api/presence", api.presence)
    install_server_api(admin, gateway)
    async with trio.open_nursery() as nursery:
        for router in routers:
            await nursery.start(router.run_in_process)
        await nursery.start(gateway.run)
        # In one process the shards are reachable at once: report started only when
        # the gateway is ready, so the printed URL works the moment it appears.
        with trio.fail_after(10):
            while not gateway.ready()[0]:
                await trio.sleep(0.005)
        admin_port = await _serve_admin(
            nursery, admin, gateway_config.admin_host, gateway_config.admin_port
        )
        if demo_feed:
            from fanroute.demo_feed import run as run_demo_feed

            nursery.start_soon(run_demo_feed, [f"ws://127.0.0.1:{gateway.port}/"], demo_feed)
        task_status.started(
            Bound(port=gateway.port, admin_port=admin_port, gateway=gateway, routers=tuple(routers))
        )
