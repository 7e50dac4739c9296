"""``fanroute local-cluster``: gateways and routers as real processes on loopback.

It exists to see sharding on one machine: every process is the same ``fanroute``
command a deployment runs, started with the flags printed here, and stopped together
on Ctrl-C or SIGTERM (SIGTERM to each, SIGKILL to any still running after 10 s).
The processes share a cluster secret: ``FANROUTE_CLUSTER_SECRET`` when it is set,
else a fresh random one, handed to them in the environment (not on the command
line, where other users could read it).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass
class ProcessPlan:
    kind: str
    name: str
    argv: list[str]
    url: str  # the client URL (gateways) or nng address (routers)
    admin_url: str


def plan_cluster(
    gateways: int,
    routers: int,
    *,
    base_port: int,
    admin_base_port: int,
    router_base_port: int,
    extra_gateway_args: tuple[str, ...] = (),
) -> list[ProcessPlan]:
    cmd = [sys.executable, "-m", "fanroute.cli"]
    plans = []
    router_list = []
    for i in range(routers):
        url = f"tcp://127.0.0.1:{router_base_port + i}"
        admin = admin_base_port + 100 + i
        router_list.append(f"router-{i}={url}")
        plans.append(
            ProcessPlan(
                "router",
                f"router-{i}",
                [*cmd, "router", "--listen", url, "--name", f"router-{i}", "--admin-port", str(admin)],
                url,
                f"http://127.0.0.1:{admin}/metrics",
            )
        )
    for i in range(gateways):
        port, admin = base_port + i, admin_base_port + i
        plans.append(
            ProcessPlan(
                "gateway",
                f"gateway-{i}",
                [
                    *cmd, "gateway", "--routers", ",".join(router_list),
                    "--port", str(port), "--admin-port", str(admin), *extra_gateway_args,
                ],
                f"ws://127.0.0.1:{port}/",
                f"http://127.0.0.1:{admin}/metrics",
            )
        )
    return plans


def run_local_cluster(args: argparse.Namespace) -> int:
    if args.gateways < 1 or args.routers < 1:
        print("fanroute: --gateways and --routers must each be at least 1", file=sys.stderr)
        return 2
    extra = ("--ping-interval", str(args.ping_interval), "--ping-timeout", str(args.ping_timeout))
    plans = plan_cluster(
        args.gateways,
        args.routers,
        base_port=args.base_port,
        admin_base_port=args.admin_base_port,
        router_base_port=args.router_base_port,
        extra_gateway_args=extra,
    )
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    env = dict(os.environ)
    env.setdefault("FANROUTE_CLUSTER_SECRET", secrets.token_urlsafe(32))
    procs = []
    for plan in plans:
        procs.append((plan, subprocess.Popen(plan.argv, env=env)))
        print(f"{plan.name:<10} {plan.url:<28} admin {plan.admin_url}", flush=True)
    print("local cluster running; Ctrl-C stops it", flush=True)
    status = 0
    while not stopping:
        for plan, proc in procs:
            if proc.poll() is not None:
                print(f"fanroute: {plan.name} exited with status {proc.returncode}; stopping the cluster", file=sys.stderr)
                stopping, status = True, 1
                break
        else:
            time.sleep(0.2)
    for _, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for _, proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return status
