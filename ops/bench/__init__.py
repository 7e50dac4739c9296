"""Benchmarks and load generators: ``fanroute bench fanout|reconnect|heartbeat``.

They install with fanroute as ``fanroute.bench`` but need their own extras,
``pip install 'fanroute[bench]'`` (percentiles, progress, tables and the reference
server), which gateways and routers never import. Registering the subcommands
imports none of them, so ``fanroute --help`` works without the extras, and running
one without them stops with one sentence saying what to install.

* ``fanout`` — deliveries/s and latency against a reference broadcast server and
  the Node seed;
* ``memory``, ``accept`` — RSS per connection, and new connections/s in a
  reconnect storm, against the same two (``connections``);
* ``http-publish`` — publications/s through the batch HTTP publish API, in
  standalone and through one nng link and one router;
* ``reconnect``, ``heartbeat`` — recovery after a SIGKILL and dead-peer detection;
* ``conflation``, ``presence`` — a stalled subscriber of a conflated price feed, and
  presence counts under join/leave churn (``live``);
* ``python -m fanroute.bench.hostile`` — router memory under a history flood and
  metric series under hostile close codes;
* ``loadgen`` — the pieces the load generators share; ``reference_server`` — the
  reference the fan-out benchmark runs beside fanroute.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from typing import Any

from fanroute.config import ConfigError

EXTRAS = ("hdrh", "rich", "websockets")


def add_bench_commands(parser: argparse.ArgumentParser, flag: Callable[..., None]) -> None:
    from fanroute.bench.connections import add_connection_commands
    from fanroute.bench.fanout import add_fanout_command
    from fanroute.bench.live import add_live_commands
    from fanroute.bench.profile import add_profile_command
    from fanroute.bench.publish import add_publish_command
    from fanroute.bench.reconnect import add_reconnect_commands

    sub = parser.add_subparsers(dest="bench", required=True)
    add_fanout_command(sub, flag)
    add_connection_commands(sub, flag)
    add_reconnect_commands(sub, flag)
    add_profile_command(sub, flag)
    add_publish_command(sub, flag)
    add_live_commands(sub, flag)


def run(args: argparse.Namespace) -> Any:
    """Run the chosen benchmark, once its extras are known to be installed."""
    missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"fanroute bench needs {', '.join(missing)}: install the extras with pip install 'fanroute[bench]'"
        )
    return args.bench_main(args)
