"""Standalone runs its gateway and shards in one trio loop, with no nng inside."""

import gc
from pathlib import Path

import pynng

from fanroute.gateway.locallink import LocalShardLink
from tests.support import DEADLINE, free_port, ready, spawn, start_standalone, urls, wait_until, ws_connect


def _nng_threads(pid: int) -> list[str]:
    """nng names every thread it starts (``nng:task``, ``nng:resolver``, ...)."""
    names = []
    for comm in Path(f"/proc/{pid}/task").glob("*/comm"):
        try:
            names.append(comm.read_text().strip())
        except OSError:
            pass  # the thread ended meanwhile
    return [name for name in names if name.startswith("nng:")]


async def _round_trip(url: str) -> None:
    async with ws_connect(url) as sub, ws_connect(url) as pub:
        await sub.subscribe("local.t")
        await pub.send({"type": "publish", "topic": "local.t", "payload": {"n": 1}, "id": 2})
        assert (await pub.recv_type("published"))["seq"] == 1
        assert (await sub.recv())["payload"] == {"n": 1}


async def test_standalone_opens_no_nng_socket(nursery):
    before = {id(o) for o in gc.get_objects() if isinstance(o, pynng.Socket)}
    bound = await start_standalone(nursery, shards=3)
    url, _ = urls(bound)
    await _round_trip(url)
    gw = bound.gateway
    assert all(type(link) is LocalShardLink for link in gw.links.values())
    assert len(gw.links) == 3
    opened = [o for o in gc.get_objects() if isinstance(o, pynng.Socket) and id(o) not in before]
    assert opened == []


async def test_a_standalone_process_starts_no_nng_thread():
    """From outside: nng starts its worker threads with its first socket; standalone has none."""
    port, admin = free_port(), free_port()
    proc = spawn(
        "standalone",
        ["standalone", "--port", str(port), "--admin-port", str(admin)],
        url=f"ws://127.0.0.1:{port}/",
        admin=f"http://127.0.0.1:{admin}",
    )
    try:
        wait_until(lambda: ready(proc), DEADLINE, "standalone ready")
        await _round_trip(f"ws://127.0.0.1:{port}/")
        assert _nng_threads(proc.pid) == []
    finally:
        proc.stop()


async def test_a_router_process_does_start_nng_threads():
    """The check above can fail: a process with an nng socket shows nng's threads."""
    port, admin = free_port(), free_port()
    proc = spawn(
        "router",
        # --peers: a router reports ready once it is caught up in a view of the
        # routers it knows (here, itself alone).
        ["router", "--listen", f"tcp://127.0.0.1:{port}", "--peers", f"router-0=tcp://127.0.0.1:{port}", "--admin-port", str(admin)],
        admin=f"http://127.0.0.1:{admin}",
    )
    try:
        wait_until(lambda: ready(proc), DEADLINE, "router ready")
        assert _nng_threads(proc.pid)
    finally:
        proc.stop()
