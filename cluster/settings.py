"""Every setting of the ``fanroute`` command, defined once.

A :class:`Setting` holds everything about one setting: its name, the kind of value it
takes, its default (per command where commands differ), its help, the commands that
have it, and so its flag and its environment variable. From this table come

* the argparse flags of every subcommand (:func:`build_parser`);
* the ``FANROUTE_*`` environment variables, read for the chosen command only
  (:func:`parse`; a flag on the command line wins over its variable, the variable
  over the default);
* the defaults of :class:`~fanroute.config.GatewayConfig` and
  :class:`~fanroute.config.RouterConfig` (:func:`config_field`), which tests and
  embedders still build directly with keyword arguments;
* the reference in ``cluster/SETTINGS.md`` (:func:`reference`, printed by
  ``fanroute --list-settings``; a test holds the file to it).

Environment names. A setting's variable is ``FANROUTE_`` and its name in upper case,
dashes as underscores, so one variable is one setting with one kind of value in every
command that has it (``FANROUTE_PING_INTERVAL`` is the same setting for
``standalone``, ``gateway`` and ``local-cluster``). The servers' settings are named
like their flags (``--ping-interval``, ``FANROUTE_PING_INTERVAL``). Where two commands
use one flag for different things, the tool's setting carries its command in its name
and keeps the flag users type: ``local-cluster --routers`` (a count) is
``FANROUTE_LOCAL_CLUSTER_ROUTERS``, while ``FANROUTE_ROUTERS`` is the gateway's shard
list. Flags that ``demo-feed`` and ``fanroute bench ...`` register themselves, through
the ``flag(parser, name, type, default, help)`` callable handed to them, are scoped by
their command path: ``demo-feed --rate`` is ``FANROUTE_DEMO_FEED_RATE``,
``bench fanout --rate`` is ``FANROUTE_BENCH_FANOUT_RATE`` and ``bench reconnect
--rate`` is ``FANROUTE_BENCH_RECONNECT_RATE``, so a tool's flag can never collide with
a server's variable or another tool's.

Errors. A value that cannot be converted, from a flag or a variable, raises
:class:`ConfigError` with one sentence that names the flag (and the variable, when
the value came from one); so do argparse's own errors (:class:`Parser`). The checks
that need several settings together stay with the config classes
(``GatewayConfig.check``); :func:`explain` adds the variable to such a message when
the value it is about came from the environment.

Pure: nothing here reads the process environment or a file (:func:`parse` is given
the environment as a mapping) or writes anything but ``--help`` and
``--list-settings``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from fanroute.errors import ConfigError

PREFIX = "FANROUTE_"
TOP = "fanroute"  # the commands of a setting given before the subcommand (--log-level)
SERVERS = ("standalone", "gateway", "router")

# The subcommands, in the order `fanroute --help` lists them.
COMMANDS: dict[str, str] = {
    "standalone": "gateway and shards in one process",
    "gateway": "a gateway that links to router shards",
    "router": "one router shard",
    "local-cluster": "gateways and routers as processes on loopback",
    "demo-feed": "publish random-walk prices for the ticker demo page",
    "bench": "benchmarks (see ops/bench/README.md)",
    "capacity": "gateways and routers a load needs, from the measured capacity profile",
}


# --- kinds of value -------------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as a user would type it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class Kind:
    """What a setting's value is: how text becomes the value, and how it is shown.

    ``parse`` raises ``ValueError`` (or ``argparse.ArgumentTypeError`` with its own
    sentence) for text that is not such a value; the message then says the value is
    not ``description``.
    """

    description: str  # "an integer": completes "--port has 'abc', which is not ..."
    metavar: str | None
    parse: Callable[[str], Any]
    show: Callable[[Any], str] = _show

    @classmethod
    def of(cls, convert: Callable[[str], Any]) -> Kind:
        """The kind of a flag a subcommand registers with a plain converter (int, float...)."""
        if isinstance(convert, Kind):
            return convert
        known = {int: ("an integer", "N"), float: ("a number", "N"), str: ("text", "TEXT")}
        description, metavar = known.get(convert, ("a valid value", None))  # type: ignore[call-overload]
        return cls(description, metavar, convert)


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _optional_text(text: str) -> str | None:
    return text or None


def _optional_port(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none", "off") else int(text)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


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


def _show_routers(routers: Sequence[tuple[str, str]]) -> str:
    return ",".join(url if name == url else f"{name}={url}" for name, url in routers)


LEVELS = ("debug", "info", "warning", "error", "critical")


def _level(text: str) -> str:
    lowered = text.strip().lower()
    if lowered not in LEVELS:
        raise ValueError(text)
    return lowered


LOG_FORMATS = ("auto", "json", "text")  # fanroute.logs.FORMATS


def _log_format(text: str) -> str:
    lowered = text.strip().lower()
    if lowered not in LOG_FORMATS:
        raise ValueError(text)
    return lowered


TEXT = Kind("text", "TEXT", str)
OPTIONAL_TEXT = Kind("text", "TEXT", _optional_text)
HOST = Kind("a host address", "HOST", str)
ADDRESS = Kind("an nng address", "URL", str)  # checked by the config classes
OPTIONAL_ADDRESS = Kind("an nng address", "URL", _optional_text)
FILE = Kind("a file name", "FILE", _optional_text)
SECRET = Kind("text", "SECRET", _optional_text)
INT = Kind("an integer", "N", int)
BYTES = Kind("a whole number of bytes", "BYTES", int)
NUMBER = Kind("a number", "N", _number)
SECONDS = Kind("a number of seconds", "SECONDS", _number)
PORT = Kind("a port number", "PORT", int)
OPTIONAL_PORT = Kind("a port number or off", "PORT|off", _optional_port, lambda v: "off" if v is None else str(v))
BOOL = Kind("true or false", "true|false", _bool)
LIST = Kind("a comma-separated list", "LIST", _list)
ROUTERS = Kind("a list of name=url shards", "ROUTERS", parse_routers, _show_routers)
LEVEL = Kind("one of " + ", ".join(LEVELS), "LEVEL", _level)
LOG_FORMAT = Kind("one of " + ", ".join(LOG_FORMATS), "json|text|auto", _log_format)


# --- settings -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Setting:
    """One setting: a flag of some commands and a ``FANROUTE_*`` variable."""

    name: str  # identity; the variable is FANROUTE_<NAME>
    kind: Kind
    default: Any  # the typed value, as the program sees it
    help: str
    commands: tuple[str, ...]  # subcommands that have it; (TOP,) for a flag before the command
    flag: str = ""  # what users type; "--<name>" unless given
    defaults: Mapping[str, Any] = field(default_factory=dict)  # a command's own default
    minimum: float | None = None  # a rule of this setting alone that no config class checks
    env_only: bool = False  # read from the environment by the process itself; no flag

    def __post_init__(self) -> None:
        if not self.flag and not self.env_only:
            object.__setattr__(self, "flag", "--" + self.name)

    @property
    def env(self) -> str:
        return env_name(self.name)

    @property
    def dest(self) -> str:
        """The attribute of the parsed arguments (``args.ping_interval``)."""
        return self.flag.lstrip("-").replace("-", "_")

    def default_for(self, command: str) -> Any:
        return self.defaults.get(command, self.default)

    def convert(self, text: str, env: str | None = None) -> Any:
        """``text`` as this setting's value; ``env`` is the variable it came from, if any."""
        subject = self.flag if env is None else f"{env} (for {self.flag})"
        try:
            value = self.kind.parse(text)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{subject}: {exc}") from None
        except (TypeError, ValueError):
            raise ConfigError(f"{subject} has {text!r}, which is not {self.kind.description}") from None
        if self.minimum is not None and value is not None and value < self.minimum:
            tail = "" if env is None else f" (from {env})"
            raise ConfigError(f"{self.flag} must be at least {self.minimum:g}, not {text}{tail}")
        return value


def env_name(name: str) -> str:
    """The variable of a setting called ``name``: ``ping-interval`` is ``FANROUTE_PING_INTERVAL``."""
    return PREFIX + name.lstrip("-").replace("-", "_").upper()


GATEWAYS = ("standalone", "gateway")
HISTORY = ("standalone", "router")
LINKS = ("gateway", "router")

SETTINGS: tuple[Setting, ...] = (
    Setting("log-level", LEVEL, "info", "logging level: " + ", ".join(LEVELS[:4]), (TOP,)),
    Setting(
        "log-format", LOG_FORMAT, "auto",
        "log lines as json (one object per line) or text; auto: json unless stderr is a terminal", (TOP,),
    ),
    # -- the gateway's side: clients, admin port, limits, access control
    Setting("host", HOST, "127.0.0.1", "address for WebSocket clients", GATEWAYS),
    Setting("port", PORT, 8081, "port for WebSocket clients", GATEWAYS, defaults={"standalone": 8080}),
    Setting("admin-host", HOST, "127.0.0.1", "address of the admin HTTP port", SERVERS),
    Setting(
        "admin-port", OPTIONAL_PORT, 9101,
        "admin HTTP port (/metrics, /healthz, /readyz; on gateways also POST /api/publish); off for none",
        SERVERS, defaults={"standalone": 9100, "router": 9201},
    ),
    Setting("ping-interval", SECONDS, 25.0, "seconds between WebSocket pings to each client", (*GATEWAYS, "local-cluster")),
    Setting("ping-timeout", SECONDS, 8.0, "seconds a client may stay silent after a ping", (*GATEWAYS, "local-cluster")),
    Setting("outbox-limit", BYTES, 1 << 20, "bytes a connection may have waiting before it is closed with 4008", GATEWAYS),
    Setting(
        "conflate-threshold", BYTES, 64 * 1024,
        "bytes waiting on a connection past which conflated topics send only their newest message (below --outbox-limit)",
        GATEWAYS,
    ),
    Setting("max-frame", BYTES, 64 * 1024, "largest client frame in bytes (larger: close 1009)", GATEWAYS),
    Setting("drain-window", SECONDS, 10.0, "seconds over which SIGTERM closes clients with 1012 before exit", GATEWAYS),
    Setting(
        "message-timeout", SECONDS, 10.0, "seconds for every frame of one client message to arrive (else close 4010)", GATEWAYS
    ),
    Setting(
        "config", FILE, None,
        "namespaces file (TOML or YAML): who may subscribe and publish (gateways), history size and age (routers)",
        SERVERS,
    ),
    Setting("jwt-secret", SECRET, None, "HS256 secret for client tokens", GATEWAYS),
    Setting("jwt-public-key-file", FILE, None, "PEM public key for RS256/ES256 client tokens", GATEWAYS),
    Setting(
        "jwt-public-key", TEXT, None, "the PEM public key itself, instead of --jwt-public-key-file (environment only)",
        GATEWAYS, env_only=True,
    ),
    Setting("jwt-audience", OPTIONAL_TEXT, None, "required token audience (aud)", GATEWAYS),
    Setting("jwt-issuer", OPTIONAL_TEXT, None, "required token issuer (iss)", GATEWAYS),
    Setting("jwt-require-exp", BOOL, True, "refuse tokens without an exp claim", GATEWAYS),
    Setting(
        "anonymous", Kind("allow, deny or auto", "allow|deny|auto", str), "auto", "allow, deny, or auto (allow unless a JWT key is set)", GATEWAYS,
        defaults={"standalone": "allow"},
    ),
    Setting("api-key", SECRET, None, "key for the server API on the admin port (POST /api/publish, /api/disconnect, /api/unsubscribe; GET /api/info)", GATEWAYS),
    Setting("auth-timeout", SECONDS, 5.0, "seconds to present a valid token when one is required (else 4001)", GATEWAYS),
    Setting("allowed-origins", LIST, (), "comma-separated Origin allow-list for browsers (empty: any)", GATEWAYS),
    Setting("max-subscriptions", INT, 1000, "subscriptions per connection", GATEWAYS),
    Setting("max-connections", INT, 50000, "connections per gateway (beyond: close 1013)", GATEWAYS),
    Setting(
        "max-connections-per-user", INT, 0,
        "connections per user (token subject) on each gateway (beyond: close 1013); 0 for no limit", GATEWAYS,
    ),
    Setting(
        "connection-rate", NUMBER, 5000.0, "new connections per second (beyond: close 1013); 0 for no limit", GATEWAYS
    ),
    Setting(
        "backlog", INT, 4096,
        "listen backlog of the client port: connections the kernel queues before accept (capped by net.core.somaxconn)",
        GATEWAYS,
    ),
    Setting("command-rate", NUMBER, 0.0, "commands per second per connection; 0 for no limit", GATEWAYS),
    Setting("publish-rate", NUMBER, 0.0, "publishes per second per connection; 0 for no limit", GATEWAYS),
    # -- standalone only
    Setting("shards", INT, 4, "number of router shards inside the process", ("standalone",), minimum=1),
    Setting(
        "demo-feed", NUMBER, 0.0, "publish random-walk prices for the ticker page, updates/s per symbol (0: off)",
        ("standalone",), minimum=0,
    ),
    # -- the router's side
    Setting("history-size", INT, 1000, "messages kept per topic for recovery", HISTORY),
    Setting("history-ttl", SECONDS, 300.0, "seconds a message stays in history", HISTORY),
    Setting(
        "history-bytes", BYTES, 256 << 20, "bytes of history per router across all topics (oldest evicted first)", HISTORY
    ),
    Setting("listen", ADDRESS, "tcp://127.0.0.1:7101", "nng address gateways send to", ("router",)),
    Setting("name", TEXT, "router-0", "shard name (the same on every gateway's --routers)", ("router",)),
    Setting("gateway-timeout", SECONDS, 10.0, "seconds of gateway silence before it is forgotten", ("router",)),
    Setting(
        "copies", INT, 2, "routers holding each topic's stream (1: no replication; see router/REPLICATION.md)",
        ("router",), minimum=1,
    ),
    Setting(
        "peers", ROUTERS, (),
        "every router of the cluster, name=url,... as the gateways' --routers (default: learned from the gateways)",
        ("router",),
    ),
    Setting(
        "peer-timeout", SECONDS, 0.3,
        "seconds of silence after which routers count a peer gone; also the length of a leader's lease", ("router",),
    ),
    # -- a gateway's links to the shards
    Setting(
        "routers", ROUTERS, (("tcp://127.0.0.1:7101", "tcp://127.0.0.1:7101"),),
        "router shards: name=url,... or url,... (the same list on every gateway)", ("gateway",),
    ),
    Setting("inbox", ADDRESS, "tcp://127.0.0.1:0", "nng address this gateway receives deliveries on", ("gateway",)),
    Setting("advertise", OPTIONAL_ADDRESS, None, "inbox address the shards should dial, if not --inbox", ("gateway",)),
    Setting(
        "cluster-secret", SECRET, None,
        "secret that authenticates every message between gateways and routers (required)", LINKS,
    ),
    Setting("cluster-secret-file", FILE, None, "file holding the cluster secret (instead of --cluster-secret)", LINKS),
    Setting(
        "cluster-encrypt", BOOL, False, "also encrypt inter-node messages (for networks that are not trusted)", LINKS
    ),
    # -- local-cluster: its counts are not the gateway's --routers list
    Setting("local-cluster-gateways", INT, 2, "number of gateway processes", ("local-cluster",), flag="--gateways", minimum=1),
    Setting("local-cluster-routers", INT, 3, "number of router processes", ("local-cluster",), flag="--routers", minimum=1),
    Setting("base-port", PORT, 8081, "first gateway client port", ("local-cluster",)),
    Setting("admin-base-port", PORT, 9101, "first gateway admin port (routers follow at +100)", ("local-cluster",)),
    Setting("router-base-port", PORT, 7101, "first router nng port", ("local-cluster",)),
    Setting(
        "local-cluster-restart", BOOL, False, "start a process that dies again, under its name and ports",
        ("local-cluster",), flag="--restart",
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def setting(name: str) -> Setting:
    return BY_NAME[name]


def of_command(command: str, settings: Iterable[Setting] = SETTINGS) -> list[Setting]:
    """The settings ``command`` has, in table order (``TOP`` for the flags before it)."""
    return [s for s in settings if command in s.commands]


def config_field(name: str, command: str, *, required: bool = False) -> Any:
    """A dataclass field of a config class whose default is ``command``'s default of
    setting ``name``; :func:`config_values` fills it back from parsed arguments."""
    s = BY_NAME[name]
    metadata = {"setting": name}
    if required:
        return field(metadata=metadata)
    default = s.default_for(command)
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def config_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for config class ``cls``: each of its fields that is a setting
    of the command ``args`` were parsed for, with its parsed value."""
    command = getattr(args, "command", None)
    out = {}
    for f in dataclasses.fields(cls):
        name = f.metadata.get("setting")
        if name is None:
            continue
        s = BY_NAME[name]
        if command in s.commands and hasattr(args, s.dest):
            value = getattr(args, s.dest)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


# --- the parser -----------------------------------------------------------------------

FlagFn = Callable[[argparse.ArgumentParser, str, Callable[[str], Any], Any, str], None]


class Parser(argparse.ArgumentParser):
    """A parser whose errors are :class:`ConfigError`, so the command line reports
    them the way it reports every other start-up error. ``settings`` are the flags
    this (sub)command was given from the table or by its own registration."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings: list[Setting] = []

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _add(parser: Parser, s: Setting, command: str) -> None:
    default = s.default_for(command)
    shown = s.kind.show(default)
    extra: dict[str, Any] = {}
    if s.kind is BOOL:
        extra = {"nargs": "?", "const": "true"}  # --cluster-encrypt alone is true
    parser.add_argument(
        s.flag,
        dest=s.dest,
        default=argparse.SUPPRESS,  # absent: the variable, then the default (see parse)
        metavar=s.kind.metavar,
        help=f"{s.help} (env {s.env}; default {shown or 'none'})".replace("%", "%%"),
        **extra,
    )
    parser.settings.append(s)


def scoped_flag(parser: Parser, flag: str, convert: Callable[[str], Any], default: Any, help: str) -> None:
    """The ``flag`` callable handed to subcommands that register their own flags
    (``demo-feed``, ``bench ...``): the setting is named after the subcommand's path,
    ``bench fanout --rate`` is ``bench-fanout-rate``, ``FANROUTE_BENCH_FANOUT_RATE``."""
    path = parser.prog.split()[1:]
    if not path:
        raise ValueError(f"{flag}: only a subcommand's parser can have scoped flags")
    s = Setting(
        "-".join([*path, flag.lstrip("-")]), Kind.of(convert), default, help, (" ".join(path),), flag=flag
    )
    _add(parser, s, s.commands[0])


def build_parser(plugins: Mapping[str, Callable[[argparse.ArgumentParser, FlagFn], None]] | None = None) -> Parser:
    """The ``fanroute`` parser with every setting of the table as a flag; ``plugins``
    register the flags of their subcommands themselves (through :func:`scoped_flag`)."""
    plugins = plugins or {}
    parser = Parser(prog="fanroute", description="A sharded WebSocket pub/sub cluster.")
    parser.add_argument(
        "--list-settings", action=_ListSettings, nargs=0, help="print every setting and its variable (Markdown) and exit"
    )
    for s in of_command(TOP):
        _add(parser, s, TOP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for command, help in COMMANDS.items():
        p = sub.add_parser(command, help=help, description=help)
        for s in of_command(command):
            if not s.env_only:
                _add(p, s, command)
        if command in plugins:
            plugins[command](p, scoped_flag)  # type: ignore[arg-type]
    return parser


class _ListSettings(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        assert isinstance(parser, Parser)
        print(reference(all_settings(parser)), end="")
        parser.exit()


def parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under ``parser`` with its command path ("" for the top), depth first."""
    stack: list[tuple[str, argparse.ArgumentParser]] = [("", parser)]
    while stack:
        path, p = stack.pop(0)
        yield path, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack[0:0] = [(f"{path} {name}".strip(), child) for name, child in action.choices.items()]


def all_settings(parser: argparse.ArgumentParser) -> list[Setting]:
    """The table's settings and every setting a subcommand registered, each once."""
    seen: dict[str, Setting] = {s.name: s for s in SETTINGS}
    for _, p in parsers(parser):
        for s in getattr(p, "settings", ()):
            seen.setdefault(s.name, s)
    return list(seen.values())


def _chain(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[argparse.ArgumentParser]:
    """The parsers ``args`` went through: the top one, the command's, a bench's..."""
    p: argparse.ArgumentParser | None = parser
    while p is not None:
        yield p
        sub = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        p = sub.choices.get(getattr(args, sub.dest, None) or "") if sub is not None else None


@dataclass(frozen=True)
class Origin:
    """Where a parsed value came from: "flag", "env" or "default", and the text given."""

    setting: Setting
    source: str
    text: str | None = None


def parse(
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    parser: argparse.ArgumentParser | None = None,
) -> argparse.Namespace:
    """``argv`` and ``environ`` as the arguments of one command, every value converted.

    For each setting of the chosen command (and the flags before it): the flag if
    given, else its variable if set, else the command's default. Variables of other
    commands are not read, so ``FANROUTE_ROUTERS`` (a gateway's shard list) never
    trips ``local-cluster``. Errors are :class:`ConfigError`; ``args._origins`` says
    where each value came from (for :func:`explain`).
    """
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    origins: list[Origin] = []
    command = getattr(args, "command", TOP)
    for p in _chain(parser, args):
        for s in getattr(p, "settings", ()):
            if hasattr(args, s.dest):
                text = getattr(args, s.dest)
                value, origin = s.convert(text), Origin(s, "flag", text)
            elif s.env in environ:
                text = environ[s.env]
                value, origin = s.convert(text, s.env), Origin(s, "env", text)
            else:
                value, origin = s.default_for(command), Origin(s, "default")
                if isinstance(value, tuple):
                    value = list(value)  # the table's defaults are immutable; a parsed list is not
            setattr(args, s.dest, value)
            origins.append(origin)
    args._origins = origins
    return args


def explain(message: str, args: argparse.Namespace | None) -> str:
    """A config check's ``message``, naming the variable too when the value it is about
    came from the environment, and the flag when it names only a file the flag gave."""
    origins: list[Origin] = getattr(args, "_origins", []) if args is not None else []

    def names(flag: str) -> bool:
        return bool(flag) and re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", message) is not None

    if not any(names(o.setting.flag) for o in origins):
        for o in origins:
            if o.setting.kind is FILE and o.text and o.text in message:
                message = f"{o.setting.flag}: {message}"
                break
    from_env = [o.setting.env for o in origins if o.source == "env" and names(o.setting.flag)]
    from_env = [env for env in from_env if env not in message]
    if from_env:
        message += f" (from {', '.join(from_env)})"
    return message


def unknown_variables(environ: Mapping[str, str], settings: Iterable[Setting]) -> dict[str, list[str]]:
    """``FANROUTE_*`` variables that are no setting, each with the variables of the
    settings that have the flag it looks like (a renamed ``FANROUTE_RATE`` suggests
    ``FANROUTE_DEMO_FEED_RATE``, ``FANROUTE_BENCH_FANOUT_RATE``...)."""
    settings = list(settings)
    known = {s.env for s in settings}
    out = {}
    for name in sorted(environ):
        if name.startswith(PREFIX) and name not in known:
            flag = "--" + name[len(PREFIX):].lower().replace("_", "-")
            out[name] = sorted({s.env for s in settings if s.flag == flag})
    return out


# --- the reference --------------------------------------------------------------------

REFERENCE_PATH = "cluster/SETTINGS.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _default_cell(s: Setting, commands: Sequence[str]) -> str:
    main = s.default_for(commands[0])
    cell = _code(s.kind.show(main)) or "*none*"
    others = [f"{c}: {_code(s.kind.show(s.default_for(c))) or '*none*'}" for c in commands[1:] if s.default_for(c) != main]
    return cell + (f" ({', '.join(others)})" if others else "")


def _table(rows: Iterable[Setting], commands: Sequence[str], with_commands: bool) -> list[str]:
    head = ["flag", "variable", "value", "default", *(["commands"] if with_commands else []), "what it sets"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        mine = [c for c in commands if c in s.commands] or list(s.commands)
        cells = [
            _code(s.flag) if s.flag else "*(none)*",
            _code(s.env),
            _cell(s.kind.metavar or "TEXT"),
            _default_cell(s, mine),
            *([", ".join(mine)] if with_commands else []),
            _cell(s.help),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def reference(settings: Sequence[Setting]) -> str:
    """``cluster/SETTINGS.md``: every setting with its flag, variable, value and default."""
    out = [
        "# Settings",
        "",
        "<!-- Generated from cluster/settings.py: fanroute --list-settings > cluster/SETTINGS.md",
        "     (tests/unit/test_settings.py checks that this file is up to date). -->",
        "",
        "Every setting is a flag of the commands that have it and a `FANROUTE_*` environment",
        "variable; a flag on the command line wins over the variable, the variable over the",
        "default. A command reads only its own settings' variables. One variable is one",
        "setting with one kind of value everywhere: the servers' variables are named like",
        "their flags (`--ping-interval`, `FANROUTE_PING_INTERVAL`); a tool's flag that means",
        "something else elsewhere, and every flag `demo-feed` and `bench` register themselves,",
        "carry their command in the variable (`local-cluster --routers` is",
        "`FANROUTE_LOCAL_CLUSTER_ROUTERS`, `bench fanout --rate` is",
        "`FANROUTE_BENCH_FANOUT_RATE`). A value that cannot work stops start-up with one",
        "sentence that names the flag (and the variable it came from), and exit status 2;",
        "a `FANROUTE_*` variable that is no setting is named in a warning at start-up.",
        "",
        "## Every command",
        "",
        "Given before the command: `fanroute --log-level debug standalone`.",
        "",
        *_table(of_command(TOP, settings), [TOP], False),
        "",
        "## Servers: standalone, gateway, router",
        "",
        *_table([s for s in settings if set(s.commands) & set(SERVERS)], SERVERS, True),
        "",
    ]
    tools = []
    for s in settings:
        for c in s.commands:
            if c not in (TOP, *SERVERS) and c not in tools:
                tools.append(c)
    for command in tools:
        rows = of_command(command, settings)
        out += [f"## {command}", "", *_table(rows, [command], False), ""]
    return "\n".join(out)
