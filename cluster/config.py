"""The settings of each process, as the servers take them, and their checks.

Every field that is a setting takes its default from the table in
:mod:`fanroute.settings` (``GatewayConfig`` the ``gateway`` command's defaults,
``RouterConfig`` the ``router`` command's); the few fields that are not settings are
tuning with no flag. The command line builds these with :meth:`GatewayConfig.from_args`
and :meth:`RouterConfig.from_args`; tests build them directly with keyword arguments.
A setting that cannot work raises :class:`ConfigError` with one sentence that names it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from typing import Any

from fanroute.errors import ConfigError
from fanroute.settings import config_field, config_values, parse_routers

__all__ = ["ConfigError", "GatewayConfig", "RouterConfig", "is_nng_url", "parse_routers"]

_gateway = partial(config_field, command="gateway")
_router = partial(config_field, command="router")


@dataclass
class GatewayConfig:
    routers: list[tuple[str, str]] = _gateway("routers", required=True)  # (shard name, nng URL)
    host: str = _gateway("host")
    port: int = _gateway("port")
    admin_host: str = _gateway("admin-host")
    admin_port: int | None = _gateway("admin-port")
    inbox: str = _gateway("inbox")  # where shards send to this gateway
    advertise: str | None = _gateway("advertise")  # the inbox address shards dial, if not ``inbox``
    ping_interval: float = _gateway("ping-interval")
    ping_timeout: float = _gateway("ping-timeout")
    outbox_limit: int = _gateway("outbox-limit")  # bytes per connection, as Centrifugo
    conflate_threshold: int = _gateway("conflate-threshold")  # bytes; conflated topics past it (gateway.conflation)
    max_frame: int = _gateway("max-frame")
    # Tuning, not settings: no flag sets these.
    shard_beat: float = 1.0
    shard_timeout: float = 3.5
    backlog_limit: int = 4096  # frames waiting for one shard before publishers wait
    message_timeout: float = _gateway("message-timeout")  # for all frames of one client message
    drain_window: float = _gateway("drain-window")  # seconds over which SIGTERM closes clients with 1012
    # Access control (see cluster/auth.py and cluster/permissions.py).
    config_file: str | None = _gateway("config")  # namespaces: TOML or YAML
    jwt_secret: str | None = _gateway("jwt-secret")
    jwt_public_key_file: str | None = _gateway("jwt-public-key-file")
    jwt_audience: str | None = _gateway("jwt-audience")
    jwt_issuer: str | None = _gateway("jwt-issuer")
    anonymous: str = _gateway("anonymous")  # allow | deny | auto (allow unless a JWT key is configured)
    api_key: str | None = _gateway("api-key")
    auth_timeout: float = _gateway("auth-timeout")  # seconds to present a valid token when one is required
    jwt_require_exp: bool = _gateway("jwt-require-exp")  # tokens without exp are refused
    allowed_origins: list[str] = _gateway("allowed-origins")  # empty: any Origin
    # Limits; 0 turns a rate limit off. Per-connection command and publish rates are
    # off by default (back-end feeds publish thousands per second over one socket);
    # a gateway open to browsers should set them (the Helm chart does).
    max_subscriptions: int = _gateway("max-subscriptions")
    max_connections: int = _gateway("max-connections")
    max_connections_per_user: int = _gateway("max-connections-per-user")  # per gateway; 0: no limit
    connection_rate: float = _gateway("connection-rate")  # new connections per second (burst: the same)
    backlog: int = _gateway("backlog")  # a reconnect storm waits here, in the kernel, not in timeouts
    command_rate: float = _gateway("command-rate")  # per connection, all commands
    publish_rate: float = _gateway("publish-rate")  # per connection
    abuse_limit: int = 100  # tuning: rate-limited commands within 10 s before closing with 4029
    # Inter-node links (fanroute.wire): every message is sealed with this secret.
    cluster_secret: str | None = _gateway("cluster-secret")
    cluster_encrypt: bool = _gateway("cluster-encrypt")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> GatewayConfig:
        """The gateway settings of parsed arguments (:func:`fanroute.settings.parse`)."""
        return cls(**{**config_values(cls, args), **overrides})

    def check(self) -> None:
        if not self.routers:
            raise ConfigError("--routers must name at least one router")
        names = [n for n, _ in self.routers]
        if len(set(names)) != len(names):
            raise ConfigError("--routers lists the same router twice")
        for name, url in self.routers:
            _check_nng_url("--routers", url)
        _check_nng_url("--inbox", self.inbox)
        _check_port("--port", self.port)
        if self.admin_port is not None:
            _check_port("--admin-port", self.admin_port)
        if self.ping_interval <= 0 or self.ping_timeout <= 0:
            raise ConfigError("--ping-interval and --ping-timeout must be positive numbers of seconds")
        if self.outbox_limit < 1024:
            raise ConfigError("--outbox-limit must be at least 1024 bytes")
        if not 0 <= self.conflate_threshold < self.outbox_limit:
            raise ConfigError("--conflate-threshold must be at least 0 and below --outbox-limit")
        if self.anonymous not in ("allow", "deny", "auto"):
            raise ConfigError("--anonymous must be allow, deny or auto")
        for flag, value in (("--max-subscriptions", self.max_subscriptions), ("--max-connections", self.max_connections), ("--backlog", self.backlog)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1")
        if self.max_connections_per_user < 0:
            raise ConfigError("--max-connections-per-user must not be negative (0 turns it off)")
        for flag, value in (("--connection-rate", self.connection_rate), ("--command-rate", self.command_rate), ("--publish-rate", self.publish_rate)):
            if value < 0:
                raise ConfigError(f"{flag} must not be negative (0 turns it off)")
        if self.drain_window < 0:
            raise ConfigError("--drain-window must not be negative")
        if self.max_frame < 256:
            raise ConfigError("--max-frame must be at least 256 bytes")
        if self.message_timeout <= 0:
            raise ConfigError("--message-timeout must be a positive number of seconds")
        _check_secret(self.cluster_secret)


@dataclass
class RouterConfig:
    listen: str = _router("listen")
    name: str = _router("name")
    admin_host: str = _router("admin-host")
    admin_port: int | None = _router("admin-port")
    history_size: int = _router("history-size")
    history_ttl: float = _router("history-ttl")
    gateway_timeout: float = _router("gateway-timeout")
    config_file: str | None = _router("config")  # namespaces: per-namespace history size and age
    history_bytes: int = _router("history-bytes")  # all topics' history together, payloads and overhead
    cluster_secret: str | None = _router("cluster-secret")
    cluster_encrypt: bool = _router("cluster-encrypt")
    copies: int = _router("copies")
    peers: tuple[tuple[str, str], ...] = _router("peers")
    peer_timeout: float = _router("peer-timeout")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> RouterConfig:
        """The router settings of parsed arguments (in ``standalone``: those it has)."""
        return cls(**{**config_values(cls, args), **overrides})

    def check(self) -> None:
        _check_nng_url("--listen", self.listen)
        if not self.name:
            raise ConfigError("--name must not be empty")
        if self.admin_port is not None:
            _check_port("--admin-port", self.admin_port)
        if self.history_size < 0 or self.history_ttl < 0:
            raise ConfigError("--history-size and --history-ttl must not be negative")
        if self.gateway_timeout <= 0:
            raise ConfigError("--gateway-timeout must be a positive number of seconds")
        if self.history_bytes < 1 << 20:
            raise ConfigError("--history-bytes must be at least 1048576 (1 MiB)")
        if self.copies < 1:
            raise ConfigError("--copies must be at least 1")
        if self.peer_timeout <= 0:
            raise ConfigError("--peer-timeout must be a positive number of seconds")
        if self.peers:
            for name, url in self.peers:
                _check_nng_url("--peers", url)
            if self.name not in {name for name, _ in self.peers}:
                raise ConfigError(f"--peers must list this router's --name {self.name!r}")
        _check_secret(self.cluster_secret)


def _check_secret(secret: str | None) -> None:
    if not secret:
        raise ConfigError(
            "--cluster-secret (or FANROUTE_CLUSTER_SECRET, or --cluster-secret-file) is required: "
            "every message between gateways and routers is authenticated with it"
        )
    if len(secret) < 16:
        raise ConfigError("--cluster-secret must be at least 16 characters")


def is_nng_url(url: str) -> bool:
    """Whether ``url`` is an nng address fanroute links over (tcp, ipc or inproc)."""
    scheme, sep, rest = url.partition("://")
    return bool(sep) and scheme in ("tcp", "tcp4", "tcp6", "ipc", "inproc") and bool(rest) and len(url) <= 512


def _check_nng_url(flag: str, url: str) -> None:
    if not is_nng_url(url):
        raise ConfigError(f"{flag} has {url!r}, which is not an nng address like tcp://127.0.0.1:7101")


def _check_port(flag: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{flag} must be a port number from 0 to 65535, not {port}")
