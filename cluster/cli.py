"""The ``fanroute`` command line.

Every flag can also be given as an environment variable ``FANROUTE_<FLAG>`` (upper
case, dashes as underscores: ``--ping-interval`` is ``FANROUTE_PING_INTERVAL``), so
the Helm chart and a shell use the same names. A flag on the command line wins over
the environment. A bad value stops start-up with one sentence that names it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import trio

from fanroute.config import ConfigError, GatewayConfig, RouterConfig, parse_routers

log = logging.getLogger("fanroute")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fanroute: {message}\n")


def _env_name(flag: str) -> str:
    return "FANROUTE_" + flag.lstrip("-").replace("-", "_").upper()


class _FromEnv(str):
    """A flag's value taken from its FANROUTE_* variable (for error messages)."""


def _flag(parser: argparse.ArgumentParser, flag: str, kind: Callable[[str], Any], default: Any, help: str) -> None:
    """A flag whose default may come from its FANROUTE_* variable.

    The variable is converted only when its subcommand runs, so a variable meant
    for one subcommand (FANROUTE_ROUTERS for ``gateway``) never trips another.
    """
    env = _env_name(flag)
    raw = os.environ.get(env)

    def convert(value: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            if isinstance(value, _FromEnv):
                raise argparse.ArgumentTypeError(f"{env}={str(value)!r} is not a valid value for {flag}") from None
            raise

    convert.__name__ = getattr(kind, "__name__", "value")
    shown = default if raw is None else f"{raw!r} from {env}"
    parser.add_argument(
        flag,
        type=convert,
        default=default if raw is None else _FromEnv(raw),
        help=f"{help} (env {env}; default {shown})",
    )


def _optional_port(value: str) -> int | None:
    return None if value.lower() in ("", "none", "off") else int(value)


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


_bool.__name__ = "true or false"


def _add_link_flags(p: argparse.ArgumentParser) -> None:
    """The inter-node links' secret: every gateway and router of a cluster shares it."""
    _flag(p, "--cluster-secret", str, "", "secret that authenticates every message between gateways and routers (required)")
    _flag(p, "--cluster-secret-file", str, "", "file holding the cluster secret (instead of --cluster-secret)")
    _flag(p, "--cluster-encrypt", _bool, False, "also encrypt inter-node messages (for networks that are not trusted)")


def cluster_secret(args: argparse.Namespace) -> str | None:
    """The cluster secret from --cluster-secret or --cluster-secret-file."""
    if args.cluster_secret_file:
        try:
            return open(args.cluster_secret_file, encoding="utf-8").read().strip() or None
        except OSError as exc:
            raise ConfigError(f"--cluster-secret-file {args.cluster_secret_file} cannot be read: {exc.strerror}") from None
    return args.cluster_secret or None


def _add_gateway_flags(p: argparse.ArgumentParser, port: int, admin_port: int, anonymous: str) -> None:
    _flag(p, "--host", str, "127.0.0.1", "address for WebSocket clients")
    _flag(p, "--port", int, port, "port for WebSocket clients")
    _flag(p, "--admin-host", str, "127.0.0.1", "address of the admin HTTP port")
    _flag(p, "--admin-port", _optional_port, admin_port, "admin HTTP port (/metrics, /healthz, /readyz); 'off' for none")
    _flag(p, "--ping-interval", float, 25.0, "seconds between WebSocket pings to each client")
    _flag(p, "--ping-timeout", float, 8.0, "seconds a client may stay silent after a ping")
    _flag(p, "--outbox-limit", int, 1 << 20, "bytes a connection may have waiting before it is closed with 4008")
    _flag(p, "--max-frame", int, 64 * 1024, "largest client frame in bytes (larger: close 1009)")
    _flag(p, "--drain-window", float, 10.0, "seconds over which SIGTERM closes clients with 1012 before exit")
    _flag(p, "--config", str, "", "namespaces file (TOML or YAML): permissions and history per namespace")
    _flag(p, "--jwt-secret", str, "", "HS256 secret for client tokens")
    _flag(p, "--jwt-public-key-file", str, "", "PEM public key for RS256/ES256 client tokens (or FANROUTE_JWT_PUBLIC_KEY)")
    _flag(p, "--jwt-audience", str, "", "required token audience (aud)")
    _flag(p, "--jwt-issuer", str, "", "required token issuer (iss)")
    _flag(p, "--anonymous", str, anonymous, "allow, deny, or auto (allow unless a JWT key is set)")
    _flag(p, "--api-key", str, "", "key for the HTTP publish API (POST /api/publish on the admin port)")
    _flag(p, "--auth-timeout", float, 5.0, "seconds to present a valid token when one is required (else 4001)")
    _flag(p, "--jwt-require-exp", _bool, True, "refuse tokens without an exp claim")
    _flag(p, "--message-timeout", float, 10.0, "seconds for every frame of one client message to arrive (else close 4010)")
    _flag(p, "--allowed-origins", str, "", "comma-separated Origin allow-list for browsers (empty: any)")
    _flag(p, "--max-subscriptions", int, 1000, "subscriptions per connection")
    _flag(p, "--max-connections", int, 50000, "connections per gateway (beyond: close 1013)")
    _flag(p, "--connection-rate", float, 5000.0, "new connections per second (beyond: close 1013); 0 for no limit")
    _flag(p, "--command-rate", float, 0.0, "commands per second per connection; 0 for no limit")
    _flag(p, "--publish-rate", float, 0.0, "publishes per second per connection; 0 for no limit")


def _add_history_flags(p: argparse.ArgumentParser) -> None:
    _flag(p, "--history-size", int, 1000, "messages kept per topic for recovery")
    _flag(p, "--history-ttl", float, 300.0, "seconds a message stays in history")
    _flag(p, "--history-bytes", int, 256 << 20, "bytes of history per router across all topics (oldest evicted first)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fanroute", description="A sharded WebSocket pub/sub cluster.")
    _flag(parser, "--log-level", str, "info", "logging level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("standalone", help="gateway and shards in one process")
    _add_gateway_flags(p, 8080, 9100, "allow")
    _add_history_flags(p)
    _flag(p, "--shards", int, 4, "number of router shards inside the process")
    _flag(p, "--demo-feed", float, 0.0, "publish random-walk prices for the ticker page, updates/s per symbol (0: off)")

    p = sub.add_parser("gateway", help="a gateway that links to router shards")
    _add_gateway_flags(p, 8081, 9101, "auto")
    _flag(p, "--routers", str, "tcp://127.0.0.1:7101", "router shards: name=url,... or url,... (the same list on every gateway)")
    _flag(p, "--inbox", str, "tcp://127.0.0.1:0", "nng address this gateway receives deliveries on")
    _flag(p, "--advertise", str, "", "inbox address the shards should dial, if not --inbox")
    _add_link_flags(p)

    p = sub.add_parser("router", help="one router shard")
    _flag(p, "--listen", str, "tcp://127.0.0.1:7101", "nng address gateways send to")
    _flag(p, "--name", str, "router-0", "shard name")
    _flag(p, "--admin-host", str, "127.0.0.1", "address of the admin HTTP port")
    _flag(p, "--admin-port", _optional_port, 9201, "admin HTTP port; 'off' for none")
    _flag(p, "--gateway-timeout", float, 10.0, "seconds of gateway silence before it is forgotten")
    _flag(p, "--config", str, "", "namespaces file (TOML or YAML): history size and age per namespace")
    _add_history_flags(p)
    _add_link_flags(p)

    p = sub.add_parser("local-cluster", help="gateways and routers as processes on loopback")
    _flag(p, "--gateways", int, 2, "number of gateway processes")
    _flag(p, "--routers", int, 3, "number of router processes")
    _flag(p, "--base-port", int, 8081, "first gateway client port")
    _flag(p, "--admin-base-port", int, 9101, "first gateway admin port (routers follow at +100)")
    _flag(p, "--router-base-port", int, 7101, "first router nng port")
    _flag(p, "--ping-interval", float, 25.0, "seconds between WebSocket pings")
    _flag(p, "--ping-timeout", float, 8.0, "seconds a client may stay silent after a ping")

    p = sub.add_parser("demo-feed", help="publish random-walk prices for the ticker demo page")
    from fanroute.demo_feed import add_arguments as add_demo_feed_arguments

    add_demo_feed_arguments(p, _flag)

    p = sub.add_parser("bench", help="benchmarks (see ops/bench/README.md)")
    from fanroute.bench import add_bench_commands

    add_bench_commands(p, _flag)
    return parser


def gateway_config(args: argparse.Namespace, routers: list[tuple[str, str]]) -> GatewayConfig:
    return GatewayConfig(
        routers=routers,
        host=args.host,
        port=args.port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        outbox_limit=args.outbox_limit,
        max_frame=args.max_frame,
        drain_window=args.drain_window,
        config_file=args.config or None,
        jwt_secret=args.jwt_secret or None,
        jwt_public_key_file=args.jwt_public_key_file or None,
        jwt_audience=args.jwt_audience or None,
        jwt_issuer=args.jwt_issuer or None,
        anonymous=args.anonymous,
        api_key=args.api_key or None,
        auth_timeout=args.auth_timeout,
        jwt_require_exp=args.jwt_require_exp,
        message_timeout=args.message_timeout,
        allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()],
        max_subscriptions=args.max_subscriptions,
        max_connections=args.max_connections,
        connection_rate=args.connection_rate,
        command_rate=args.command_rate,
        publish_rate=args.publish_rate,
        inbox=getattr(args, "inbox", "tcp://127.0.0.1:0"),
        advertise=getattr(args, "advertise", "") or None,
        cluster_secret=cluster_secret(args) if hasattr(args, "cluster_secret") else None,
        cluster_encrypt=getattr(args, "cluster_encrypt", False),
    )


def router_config(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        listen=getattr(args, "listen", "inproc://unused"),
        name=getattr(args, "name", "shard"),
        admin_host=args.admin_host,
        admin_port=getattr(args, "admin_port", None),
        history_size=args.history_size,
        history_ttl=args.history_ttl,
        history_bytes=args.history_bytes,
        gateway_timeout=getattr(args, "gateway_timeout", 10.0),
        config_file=args.config or None,
        cluster_secret=cluster_secret(args) if hasattr(args, "cluster_secret") else None,
        cluster_encrypt=getattr(args, "cluster_encrypt", False),
    )


async def _run_until_signal(serve: Callable[..., Any], describe: Callable[[Any], str]) -> None:
    """Run a process until SIGTERM or SIGINT; a gateway drains first, a second signal stops at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve)
            print(describe(bound), flush=True)
            async for signum in signals:
                log.info("received %s; stopping", signal.Signals(signum).name)
                break
            if bound.gateway is not None:
                with trio.CancelScope() as drain_scope:
                    async with trio.open_nursery() as draining:

                        async def second_signal() -> None:
                            async for _ in signals:
                                log.info("second signal: stopping now")
                                drain_scope.cancel()

                        draining.start_soon(second_signal)
                        await bound.gateway.drain()
                        draining.cancel_scope.cancel()
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
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.log_level.upper() not in logging.getLevelNamesMapping():
            raise ConfigError(f"--log-level {args.log_level!r} is not one of debug, info, warning, error")
        logging.basicConfig(
            level=args.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return _dispatch(args)
    except ConfigError as exc:
        print(f"fanroute: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:
        # Raised inside trio nurseries, a ConfigError arrives wrapped in a group.
        match, _ = group.split(ConfigError)
        if match is None:
            raise
        while isinstance(match, BaseExceptionGroup):
            match = match.exceptions[0]
        print(f"fanroute: {match}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from functools import partial

    from fanroute import node

    if args.command == "standalone":
        gw = gateway_config(args, [("unused", "inproc://unused")])
        rc = router_config(args)
        if args.demo_feed < 0:
            raise ConfigError("--demo-feed must be 0 (off) or a positive rate")
        serve = partial(node.serve_standalone, gw, rc, args.shards, demo_feed=args.demo_feed)
        trio.run(_run_until_signal, serve, _describe("standalone"))
    elif args.command == "gateway":
        routers = parse_routers(args.routers)
        trio.run(_run_until_signal, partial(node.serve_gateway, gateway_config(args, routers)), _describe("gateway"))
    elif args.command == "router":
        trio.run(_run_until_signal, partial(node.serve_router, router_config(args)), _describe(f"router {args.name} {args.listen}"))
    elif args.command == "local-cluster":
        from fanroute.localcluster import run_local_cluster

        return run_local_cluster(args)
    elif args.command == "demo-feed":
        from fanroute.demo_feed import run_args

        return run_args(args)
    elif args.command == "bench":
        from fanroute import bench

        return bench.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
