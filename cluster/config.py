"""Settings of each process, with their defaults and their checks.

The command line (``fanroute.cli``) fills these from flags and ``FANROUTE_*``
environment variables; tests build them directly. A setting that cannot work raises
:class:`ConfigError` with one sentence that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fanroute.errors import ConfigError


@dataclass
class GatewayConfig:
    routers: list[tuple[str, str]]  # (shard name, nng URL)
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int | None = 9100
    inbox: str = "tcp://127.0.0.1:0"  # where shards send to this gateway
    advertise: str | None = None  # the inbox address shards dial, if not ``inbox``
    ping_interval: float = 25.0
    ping_timeout: float = 8.0
    outbox_limit: int = 1 << 20  # bytes per connection, as Centrifugo
    max_frame: int = 64 * 1024
    shard_beat: float = 1.0
    shard_timeout: float = 3.5
    backlog_limit: int = 4096  # frames waiting for one shard before publishers wait
    message_timeout: float = 10.0  # seconds for all frames of one client message to arrive
    drain_window: float = 10.0  # seconds over which SIGTERM closes clients with 1012
    # Access control (see cluster/auth.py and cluster/permissions.py).
    config_file: str | None = None  # namespaces: TOML or YAML
    jwt_secret: str | None = None
    jwt_public_key_file: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    anonymous: str = "auto"  # allow | deny | auto (allow unless a JWT key is configured)
    api_key: str | None = None
    auth_timeout: float = 5.0  # seconds to present a valid token when one is required
    jwt_require_exp: bool = True  # tokens without exp are refused
    allowed_origins: list[str] = field(default_factory=list)  # empty: any Origin
    # Limits; 0 turns a rate limit off. Per-connection command and publish rates are
    # off by default (back-end feeds publish thousands per second over one socket);
    # a gateway open to browsers should set them (the Helm chart does).
    max_subscriptions: int = 1000
    max_connections: int = 50000
    connection_rate: float = 5000.0  # new connections per second (burst: the same)
    command_rate: float = 0.0  # per connection, all commands
    publish_rate: float = 0.0  # per connection
    abuse_limit: int = 100  # rate-limited commands within 10 s before closing with 4029
    # Inter-node links (fanroute.wire): every message is sealed with this secret.
    cluster_secret: str | None = None
    cluster_encrypt: bool = False

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
        if self.anonymous not in ("allow", "deny", "auto"):
            raise ConfigError("--anonymous must be allow, deny or auto")
        for flag, value in (("--max-subscriptions", self.max_subscriptions), ("--max-connections", self.max_connections)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1")
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
    listen: str = "tcp://127.0.0.1:7101"
    name: str = "router-0"
    admin_host: str = "127.0.0.1"
    admin_port: int | None = 9201
    history_size: int = 1000
    history_ttl: float = 300.0
    gateway_timeout: float = 10.0
    config_file: str | None = None  # namespaces: per-namespace history size and age
    history_bytes: int = 256 << 20  # all topics' history together, payloads and overhead
    cluster_secret: str | None = None
    cluster_encrypt: bool = False

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
        _check_secret(self.cluster_secret)


def _check_secret(secret: str | None) -> None:
    if not secret:
        raise ConfigError(
            "--cluster-secret (or FANROUTE_CLUSTER_SECRET, or --cluster-secret-file) is required: "
            "every message between gateways and routers is authenticated with it"
        )
    if len(secret) < 16:
        raise ConfigError("--cluster-secret must be at least 16 characters")


def parse_routers(value: str) -> list[tuple[str, str]]:
    """``name=url,name=url`` or plain ``url,url`` (the URL is then the shard's name).

    All gateways must list the same names, since the ring hashes names.
    """
    out = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name, sep, url = item.partition("=")
        if not sep:
            name, url = item, item
        out.append((name.strip(), url.strip()))
    return out


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
