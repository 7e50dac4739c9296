"""Replicated streams under real network partitions (issue 12, "never two truths").

Three routers and two gateways run as real processes, each in a network namespace of
its own (``tests/netns.py``); partitions are iptables DROP rules between them. Under
continuous acknowledged publishing with idem retries (``tests/system/traffic.py``):

* one router cut off from the other two loses its lease and stops serving; the other
  two form a view without it and carry its topics on in the same epoch; when the cut
  heals it rejoins and takes its topics back;
* a gateway cut off from the router that leads some topics answers ``unavailable`` /
  ``outcome_unknown`` for them (the publisher retries) and catches up with ``since``
  when the cut heals.

Throughout, no two payloads are ever seen under one ``(topic, epoch, seq)``, no
stream changes epoch or shows a gap, every acknowledged publication arrives exactly
once, and what was refused is counted by the routers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import trio

from fanroute.localcluster import FANROUTE, Node, metric
from tests.netns import Hosts
from tests.support import CLUSTER_SECRET, ROOT, await_until, until
from tests.system.traffic import check_exactly_once, finish, settle, start

pytestmark = pytest.mark.trio

ROUTERS = ["router-0", "router-1", "router-2"]
GATEWAYS = ["gateway-0", "gateway-1"]


@pytest.fixture
def network():
    if shutil.which("iptables") is None:
        pytest.fail("iptables is missing: ops/setup-netns.sh installs it (ops/test.sh runs it)")
    hosts = Hosts(ROUTERS + GATEWAYS)
    yield hosts
    hosts.close()


def start_nodes(hosts: Hosts, logdir: Path) -> dict[str, Node]:
    env = {**os.environ, "FANROUTE_CLUSTER_SECRET": CLUSTER_SECRET, "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("FANROUTE_") or k == "FANROUTE_CLUSTER_SECRET"}
    routers = ",".join(f"{r}=tcp://{hosts[r].address}:7101" for r in ROUTERS)
    nodes: dict[str, Node] = {}
    for r in ROUTERS:
        a = hosts[r].address
        argv = [*FANROUTE, "router", "--name", r, "--listen", f"tcp://{a}:7101", "--peers", routers,
                "--admin-host", a, "--admin-port", "9200"]
        nodes[r] = Node(r, "router", hosts[r].command(argv), url=f"tcp://{a}:7101", admin=f"http://{a}:9200",
                        env=env, cwd=str(ROOT), log=logdir / f"{r}.log")
    for g in GATEWAYS:
        a = hosts[g].address
        argv = [*FANROUTE, "gateway", "--routers", routers, "--host", a, "--port", "8080", "--inbox", f"tcp://{a}:7201",
                "--admin-host", a, "--admin-port", "9100"]
        nodes[g] = Node(g, "gateway", hosts[g].command(argv), url=f"ws://{a}:8080/", admin=f"http://{a}:9100",
                        env=env, cwd=str(ROOT), log=logdir / f"{g}.log")
    for node in nodes.values():
        node.start()
    return nodes


def refusals_counted(node: Node) -> float:
    """The error frames a gateway sent for publications it could not make safe."""
    text = node.metrics()
    return sum(metric(text, "fanroute_gateway_errors_total", f'code="{code}"', default=0) for code in ("unavailable", "outcome_unknown"))


async def test_partitions_never_make_two_truths_nor_lose_an_acknowledged_publication(network):
    logdir = Path(tempfile.mkdtemp(prefix="fanroute-partitions-"))
    nodes = start_nodes(network, logdir)
    try:
        await await_until(lambda: all(n.ready() for n in nodes.values()), what="every process ready")
        async with trio.open_nursery() as nursery:
            urls = [nodes[g].url for g in GATEWAYS]
            publisher, subs, stop = await start(nursery, urls, urls[1])
            await settle(publisher, 150)

            # 1. router-0 cut off from the other routers (the gateways still reach it).
            network.cut("router-0", "router-1")
            network.cut("router-0", "router-2")
            await await_until(lambda: not nodes["router-0"].ready(), what="router-0 to stop serving")
            await settle(publisher, 300)
            network.heal()
            await await_until(nodes["router-0"].ready, what="router-0 back in the view")
            await settle(publisher, 150)

            # 2. the publishers' gateway cut off from router-1.
            answered = publisher.refused + publisher.unknown
            network.cut("gateway-1", "router-1")
            # The publisher is held at the first topic router-1 leads: retried until the
            # gateway has said it is unavailable a few times.
            await until(lambda: publisher.refused + publisher.unknown >= answered + 3, "the cut to be answered")
            network.heal()
            await settle(publisher, 300)
            await finish(publisher, subs, stop)
            nursery.cancel_scope.cancel()
        counted = refusals_counted(nodes["gateway-1"])
        print(
            f"publications {publisher.count}, answered unavailable {publisher.refused}, "
            f"outcome unknown {publisher.unknown}, as counted by the gateway {counted:g}"
        )
        check_exactly_once(publisher, subs)
        # Every refusal was answered to the publisher and counted, none dropped silently.
        assert publisher.refused + publisher.unknown > 0
        assert counted == publisher.refused + publisher.unknown
    except BaseException:
        for node in nodes.values():
            print(f"--- {node.name} ({node.exit_text()}), last lines of {node.log}:\n{node.log_tail(15)}")
        raise
    else:
        shutil.rmtree(logdir, ignore_errors=True)
    finally:
        for node in nodes.values():
            node.stop()
