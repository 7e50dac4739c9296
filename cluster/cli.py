"""The ``fanroute`` command line.

Its flags and their ``FANROUTE_*`` environment variables are generated from the
table in :mod:`fanroute.settings` (the reference: ``cluster/SETTINGS.md``, or
``fanroute --list-settings``). A flag on the command line wins over the variable,
the variable over the default, and a command reads only its own settings'
variables. ``demo-feed``, ``bench ...`` and ``capacity`` register their flags themselves through
:func:`fanroute.settings.scoped_flag`, which scopes their variables by command
(``FANROUTE_DEMO_FEED_RATE``, ``FANROUTE_BENCH_FANOUT_RATE``).

Every start-up error is a :class:`ConfigError` — argparse's own, a bad variable, a
config check, a file that cannot be read, a port that cannot be listened on — and
:func:`main` reports each the same way: one sentence that names the setting (and the
variable, when the value came from one), and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from fanroute import logs, settings
from fanroute.config import ConfigError, GatewayConfig, RouterConfig

log = logging.getLogger("fanroute")


def _add_demo_feed(parser: argparse.ArgumentParser, flag: settings.FlagFn) -> None:
    from fanroute.demo_feed import add_arguments

    add_arguments(parser, flag)


def _add_bench(parser: argparse.ArgumentParser, flag: settings.FlagFn) -> None:
    from fanroute.bench import add_bench_commands

    add_bench_commands(parser, flag)


def _add_capacity(parser: argparse.ArgumentParser, flag: settings.FlagFn) -> None:
    from fanroute.capacity import add_arguments

    add_arguments(parser, flag)


# Subcommands that register their own flags (through settings.scoped_flag).
PLUGINS = {"demo-feed": _add_demo_feed, "bench": _add_bench, "capacity": _add_capacity}


def build_parser() -> settings.Parser:
    """The whole ``fanroute`` parser: the table's flags and the plugins' own."""
    return settings.build_parser(PLUGINS)


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """``argv`` and ``environ`` (default: this process's) as one command's arguments,
    every value converted; starts nothing and reads no file."""
    return settings.parse(argv, os.environ if environ is None else environ, build_parser())


def _env_name(flag: str) -> str:
    """The variable of a server's flag (a tool's may be scoped: see fanroute.settings)."""
    return settings.env_name(flag)


def read_files(args: argparse.Namespace) -> None:
    """What the settings name in files: the cluster secret of --cluster-secret-file."""
    path = getattr(args, "cluster_secret_file", None)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--cluster-secret-file {path} cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--cluster-secret-file {path} is not UTF-8 text") from None
        args.cluster_secret = text.strip() or None


async def _run_until_signal(serve: Callable[..., Any], describe: Callable[[Any], str]) -> None:
    """Run a process until SIGTERM or SIGINT; a gateway drains first, a router hands its topics over, a second signal stops at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve)
            print(describe(bound), flush=True)
            async for signum in signals:
                log.info("received %s; stopping", signal.Signals(signum).name)
                break
            if bound.gateway is not None:
                await _unless_signalled_again(signals, bound.gateway.drain)
            elif bound.routers and not bound.routers[0].in_process:
                # A router hands the topics it leads to their other copies first.
                await _unless_signalled_again(signals, bound.routers[0].leave)
            nursery.cancel_scope.cancel()



async def _unless_signalled_again(signals: Any, work: Callable[[], Any]) -> None:
    """Run ``work`` (a drain, a hand-over) to its end, or until a second signal."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def second_signal() -> None:
                async for _ in signals:
                    log.info("second signal: stopping now")
                    scope.cancel()

            nursery.start_soon(second_signal)
            await work()
            nursery.cancel_scope.cancel()


def _describe(kind: str) -> Callable[[Any], str]:
    def text(bound: Any) -> str:
        parts = [kind]
        if bound.port is not None:
            parts.append(f"ws://127.0.0.1:{bound.port}/")
        if bound.admin_port is not None:
            parts.append(f"admin http://127.0.0.1:{bound.admin_port}/metrics")
        return "fanroute " + " ".join(parts)

    return text


def main(argv: Sequence[str] | None = None) -> int:
    args: argparse.Namespace | None = None
    try:
        parser = build_parser()
        args = settings.parse(argv, os.environ, parser)
        read_files(args)
        logs.setup(args.log_level, args.log_format, sys.stderr)
        for name, instead in settings.unknown_variables(os.environ, settings.all_settings(parser)).items():
            hint = f"; did you mean {' or '.join(instead)}?" if instead else ""
            log.warning("%s is not a setting of any fanroute command and is ignored%s", name, hint)
        return _dispatch(args)
    except ConfigError as exc:
        return _refuse(exc, args)
    except BaseExceptionGroup as group:
        # Raised inside trio nurseries, a ConfigError arrives wrapped in a group.
        match, _ = group.split(ConfigError)
        if match is None:
            raise
        while isinstance(match, BaseExceptionGroup):
            match = match.exceptions[0]
        return _refuse(match, args)
    except KeyboardInterrupt:
        return 130


def _refuse(exc: BaseException, args: argparse.Namespace | None) -> int:
    """The one way a start-up error is reported: one line, exit status 2."""
    message = " ".join(settings.explain(str(exc), args).split())
    print(f"fanroute: {message}", file=sys.stderr)
    return 2


def _dispatch(args: argparse.Namespace) -> int:
    from functools import partial

    from fanroute import node

    if args.command == "standalone":
        gw = GatewayConfig.from_args(args, routers=[("unused", "inproc://unused")])
        serve = partial(node.serve_standalone, gw, RouterConfig.from_args(args), args.shards, demo_feed=args.demo_feed)
        trio.run(_run_until_signal, serve, _describe("standalone"))
    elif args.command == "gateway":
        trio.run(_run_until_signal, partial(node.serve_gateway, GatewayConfig.from_args(args)), _describe("gateway"))
    elif args.command == "router":
        serve = partial(node.serve_router, RouterConfig.from_args(args))
        trio.run(_run_until_signal, serve, _describe(f"router {args.name} {args.listen}"))
    elif args.command == "local-cluster":
        from fanroute.localcluster import run_local_cluster

        return run_local_cluster(args)
    elif args.command == "demo-feed":
        from fanroute.demo_feed import run_args

        return run_args(args)
    elif args.command == "bench":
        from fanroute import bench

        return bench.run(args)
    elif args.command == "capacity":
        from fanroute import capacity

        return capacity.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
