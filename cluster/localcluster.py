"""Local clusters: gateways, routers and standalone servers as real processes on one host.

One implementation for everything that starts fanroute processes next to itself —
``fanroute local-cluster``, the benchmarks and the tests — in plain Python (subprocess
and urllib, no trio), so any caller can use it::

    with LocalCluster(gateways=2, routers=3) as cluster:   # started and ready
        cluster.gateways[0].url                            # ws://127.0.0.1:…/
        cluster.kill("router-1")                           # SIGKILL
        cluster.restart("router-1")                        # same name, same ports
        cluster.wait_ready()
        metric(cluster.gateways[0].metrics(), "fanroute_gateway_connections")

Every process is the same ``python -m fanroute.cli router|gateway|standalone`` command
a deployment runs. Ports are fixed runs from given base ports, or else found free on
loopback (:func:`free_port`), and a process keeps its ports when it is restarted; a
process that finds one of its found ports taken meanwhile (another program picked it
too) is started again on new ones while the cluster waits for readiness. The
processes share a cluster secret, handed to them in the environment
(``FANROUTE_CLUSTER_SECRET``, never on the command line where other users could read
it): the one given, else a fresh random one. Output goes to one log file per process
(appended to across restarts) or to the caller's own stdout and stderr.

``fanroute local-cluster`` (:func:`run_local_cluster`) prints every process with its
URLs and pid, and supervises them: a process that dies is reported and the rest keep
running; with ``--restart`` the dead process is started again under its name and
ports (after a growing pause if it keeps dying before it is ready). Ctrl-C or SIGTERM
stops all of them (SIGTERM to each, SIGKILL to any still running after 10 s).

This module also holds the one helper for reading Prometheus text, :func:`metric`
(``prometheus_client``'s parser, never patterns over the lines).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fanroute.errors import ConfigError, LocalClusterError

LOOPBACK = "127.0.0.1"
FANROUTE = (sys.executable, "-m", "fanroute.cli")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_PORT_TAKEN = "cannot be listened on"  # how a process says a port of its was taken
_PORT_RETRIES = 3


# --- ports ----------------------------------------------------------------------------


_handed_out: set[int] = set()  # ports this process gave out, never given twice


def free_port() -> int:
    """A TCP port that is free on loopback now, below the ephemeral range.

    The kernel's own pick (bind to port 0) comes from the ephemeral range, where an
    outgoing connection of any process (a router dialling its peers, say) may take it
    as a source port before the server that was given it binds it."""
    return free_port_run(1)


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive ports that are free on loopback now, below the
    ephemeral range (so no outgoing connection takes one of them meanwhile), and
    that this process has not handed out before."""
    for _ in range(200):
        base = random.randrange(10000, 32000 - n)
        run = range(base, base + n)
        if _handed_out.intersection(run):
            continue
        held = []
        try:
            for port in run:
                s = socket.socket()
                held.append(s)
                s.bind((LOOPBACK, port))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        _handed_out.update(run)
        return base
    raise LocalClusterError(f"no run of {n} free loopback ports found")


# --- Prometheus text ------------------------------------------------------------------

_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _label_filter(labels: str | Mapping[str, str] | None) -> dict[str, str]:
    """``'a="x",b="y"'`` (as labels are written in Prometheus text) or a mapping."""
    if labels is None:
        return {}
    if isinstance(labels, Mapping):
        return {str(k): str(v) for k, v in labels.items()}
    text = labels.strip().removeprefix("{").removesuffix("}")
    out, pos = {}, 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if not m:
            raise ValueError(f"not a label filter like 'reason=\"mac\"': {labels!r}")
        out[m.group(1)] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
    return out


def samples(text: str) -> Iterator[Any]:
    """Every sample in Prometheus text (``name``, ``labels``, ``value``)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        yield from family.samples


def metric(text: str, name: str, labels: str | Mapping[str, str] | None = None, default: float | None = None) -> float:
    """The sum of the samples called ``name`` in Prometheus text whose labels include
    ``labels`` (``'reason="mac"'``, several comma-separated, or a mapping).

    ``name`` is a sample's name as exposed (``fanroute_x_total`` for a counter). With
    no matching sample: ``default`` if one is given, else :class:`KeyError`.
    """
    want = _label_filter(labels)
    total, found = 0.0, False
    for sample in samples(text):
        if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
            total += sample.value
            found = True
    if not found:
        if default is not None:
            return default
        raise KeyError(name if not want else f"{name}{{{labels}}}")
    return total


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """Status and body of a GET (an HTTP error status is an answer, not an exception)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


# --- one process ----------------------------------------------------------------------


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


@dataclass(eq=False)
class Node:
    """One fanroute process: how to start it, where it listens, and the running one.

    ``url`` is where clients connect (``ws://host:port/``, gateways and standalone
    servers) or a router's nng address (``tcp://host:port``); ``admin`` is the admin
    port's base URL (``/metrics``, ``/healthz``, ``/readyz``); ``inbox`` is a gateway's
    nng address for deliveries. ``port`` is the client port, or a router's nng port.
    """

    name: str
    kind: str  # "router", "gateway" or "standalone"
    argv: list[str]
    url: str = ""
    admin: str = ""
    inbox: str = ""
    port: int | None = None
    admin_port: int | None = None
    inbox_port: int | None = None
    env: dict[str, str] | None = field(default=None, repr=False)  # holds the cluster secret
    cwd: str | None = None
    log: Path | None = None  # stdout and stderr, appended to; None: the caller's own
    extra: tuple[str, ...] = ()  # arguments of this process beyond the cluster's own
    popen: subprocess.Popen | None = None
    starts: int = 0
    started_at: float = 0.0

    # -- life --------------------------------------------------------------------------

    def start(self) -> Node:
        """Start the process (again, after it ended: same command, same ports)."""
        if self.running:
            raise LocalClusterError(f"{self.name} is already running (pid {self.pid})")
        if self.log is None:
            self.popen = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL)
        else:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "ab") as out:
                if self.starts:
                    out.write(f"--- {self.name} started again ---\n".encode())
                    out.flush()
                self.popen = subprocess.Popen(
                    self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
                )
        self.starts += 1
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process ended (negative: killed by that signal)."""
        return self.popen.poll() if self.popen is not None else None

    @property
    def dead(self) -> bool:
        """Started, and ended since."""
        return self.popen is not None and self.popen.poll() is not None

    def exit_text(self) -> str:
        return _describe_exit(self.returncode) if self.popen is not None else "not started"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL unless told; SIGSTOP/SIGCONT freeze and thaw)."""
        if self.running:
            self.popen.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        if self.popen is None:
            raise LocalClusterError(f"{self.name} was never started")
        return self.popen.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """``sig``, then SIGKILL if it is still running after ``timeout`` seconds."""
        if self.popen is None:
            return None
        if self.running:
            self.popen.send_signal(signal.SIGCONT)  # a frozen process cannot act on sig
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    # -- looking at it -----------------------------------------------------------------

    def ready(self, timeout: float = 1.0) -> bool:
        """Whether it runs and its ``/readyz`` answers 200."""
        if not self.running or not self.admin:
            return False
        try:
            return http_get(self.admin + "/readyz", timeout=timeout)[0] == 200
        except OSError:
            return False

    def metrics(self, timeout: float = 5.0) -> str:
        """Its ``/metrics`` as Prometheus text (OSError if it does not answer)."""
        return http_get(self.admin + "/metrics", timeout=timeout)[1]

    def metric(self, name: str, labels: str | Mapping[str, str] | None = None, default: float | None = None) -> float:
        return metric(self.metrics(), name, labels, default)

    def log_tail(self, lines: int = 20) -> str:
        if self.log is None:
            return ""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --- a cluster of them ----------------------------------------------------------------


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The last value given for ``flag`` in ``args`` (``--flag v`` or ``--flag=v``)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


class LocalCluster:
    """``routers`` routers, ``gateways`` gateways linked to all of them, and
    ``standalones`` standalone servers, as processes on ``host``.

    Ports: ``base_port`` + i for gateway i's clients (standalone servers follow the
    gateways), ``admin_base_port`` + i for its admin port (routers' at + 100 + i),
    ``router_base_port`` + i for router i's nng port, ``inbox_base_port`` + i for
    gateway i's inbox; any base not given means ports found free on loopback.

    ``env`` is added to this process's environment (``clean_env`` drops the inherited
    ``FANROUTE_*`` variables first). ``logdir`` holds ``<name>.log`` per process; by
    default a temporary directory removed by :meth:`stop`; ``inherit_output`` sends
    the output to this process's stdout and stderr instead.
    """

    def __init__(
        self,
        gateways: int = 1,
        routers: int = 1,
        *,
        standalones: int = 0,
        gateway_args: Iterable[str] = (),
        router_args: Iterable[str] = (),
        standalone_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        clean_env: bool = False,
        secret: str | None = None,
        host: str = LOOPBACK,
        base_port: int | None = None,
        admin_base_port: int | None = None,
        router_base_port: int | None = None,
        inbox_base_port: int | None = None,
        logdir: str | Path | None = None,
        inherit_output: bool = False,
        cwd: str | Path | None = None,
        ready_timeout: float = READY_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        if min(gateways, routers, standalones) < 0 or gateways + routers + standalones == 0:
            raise ValueError("a local cluster needs at least one process")
        if gateways and not routers:
            raise ValueError("gateways need at least one router")
        self.host = host
        self.gateway_args = list(gateway_args)
        self.router_args = list(router_args)
        self.standalone_args = list(standalone_args)
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.cwd = str(cwd) if cwd is not None else None
        self.inherit_output = inherit_output
        self._bases = {"client": base_port, "admin": admin_base_port, "nng": router_base_port, "inbox": inbox_base_port}
        self._given_logdir = Path(logdir) if logdir is not None else None
        self._tmp_logdir: Path | None = None
        self._taken: set[int] = set()
        self._port_retries: dict[str, int] = {}

        base_env = {k: v for k, v in os.environ.items() if not (clean_env and k.startswith("FANROUTE_"))}
        base_env.update(env or {})
        self.secret = secret or (env or {}).get("FANROUTE_CLUSTER_SECRET") or secrets.token_urlsafe(32)
        if len(self.secret) < 16:
            raise ConfigError("the cluster secret (FANROUTE_CLUSTER_SECRET) must be at least 16 characters")
        base_env.pop("FANROUTE_CLUSTER_SECRET_FILE", None)  # the secret below is the one
        base_env.update(PYTHONUNBUFFERED="1", FANROUTE_CLUSTER_SECRET=self.secret)
        self.env = base_env

        self.routers: list[Node] = []
        self.gateways: list[Node] = []
        self.standalones: list[Node] = []
        for _ in range(routers):
            self._add("router")
        for _ in range(gateways):
            self._add("gateway")
        for _ in range(standalones):
            self._add("standalone")

    # -- planning ----------------------------------------------------------------------

    def _port(self, kind: str, offset: int) -> int:
        base = self._bases[kind]
        if base is not None:
            return base + offset
        while True:
            port = free_port()
            if port not in self._taken:
                self._taken.add(port)
                return port

    def _ports(self, node: Node) -> None:
        """Give ``node`` its ports: from the bases, or found free."""
        if node.kind == "router":
            i = self.routers.index(node)
            node.port, node.admin_port = self._port("nng", i), self._port("admin", 100 + i)
        elif node.kind == "gateway":
            i = self.gateways.index(node)
            node.port, node.admin_port = self._port("client", i), self._port("admin", i)
            node.inbox_port = None if _flag_value([*self.gateway_args, *node.extra], "--inbox") else self._port("inbox", i)
        else:
            i = len(self.gateways) + self.standalones.index(node)
            node.port, node.admin_port = self._port("client", i), self._port("admin", i)

    def _command(self, node: Node) -> None:
        """``node``'s URLs and command line, from its ports (and the routers')."""
        host = self.host
        node.admin = f"http://{host}:{node.admin_port}"
        admin = ["--admin-host", host, "--admin-port", str(node.admin_port)]
        if node.kind == "router":
            node.url = f"tcp://{host}:{node.port}"
            # Every router is told the others (--peers), so they form their first
            # view and report ready before any gateway starts.
            peers = [] if _flag_value([*self.router_args, *node.extra], "--peers") else ["--peers", self.router_list]
            node.argv = [
                *FANROUTE, "router", "--listen", node.url, "--name", node.name, *peers, *admin, *self.router_args, *node.extra
            ]
            return
        node.url = f"ws://{host}:{node.port}/"
        client = ["--host", host, "--port", str(node.port)]
        if node.kind == "standalone":
            node.argv = [*FANROUTE, "standalone", *client, *admin, *self.standalone_args, *node.extra]
            return
        given = _flag_value([*self.gateway_args, *node.extra], "--inbox")
        if given is None:
            node.inbox = f"tcp://{host}:{node.inbox_port}"
            inbox = ["--inbox", node.inbox]
        else:  # the caller chose it
            node.inbox, inbox = given, []
            tail = given.rsplit(":", 1)[-1]
            node.inbox_port = int(tail) if tail.isdigit() else None
        node.argv = [
            *FANROUTE, "gateway", "--routers", self.router_list, *client, *admin, *inbox,
            *self.gateway_args, *node.extra,
        ]

    def _add(self, kind: str, extra: Sequence[str] = ()) -> Node:
        group = {"router": self.routers, "gateway": self.gateways, "standalone": self.standalones}[kind]
        i = len(group)
        name = "standalone" if kind == "standalone" and i == 0 else f"{kind}-{i}"
        node = Node(name, kind, [], env=self.env, cwd=self.cwd, extra=tuple(extra))
        group.append(node)
        self._ports(node)
        self._command(node)
        if kind == "router":
            for other in [*self.routers, *self.gateways]:
                self._command(other)  # every router and gateway names every router
        return node

    def _replan(self, node: Node) -> None:
        """New ports for ``node`` (a found one was taken meanwhile), and new commands
        for whoever names them (every gateway names every router)."""
        self._ports(node)
        self._command(node)
        if node.kind == "router":
            for other in [*self.routers, *self.gateways]:
                self._command(other)

    def _logs_for(self, nodes: Iterable[Node]) -> None:
        if self.inherit_output:
            return
        if self._given_logdir is not None:
            logdir = self._given_logdir
        else:
            if self._tmp_logdir is None:
                self._tmp_logdir = Path(tempfile.mkdtemp(prefix="fanroute-local-cluster-"))
            logdir = self._tmp_logdir
        for node in nodes:
            if node.log is None or node.log.parent != logdir:
                node.log = logdir / f"{node.name}.log"

    # -- looking up ----------------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        """Every process: routers, then gateways, then standalone servers."""
        return [*self.routers, *self.gateways, *self.standalones]

    def __getitem__(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    @property
    def router_list(self) -> str:
        """The ``--routers`` value every gateway is given: ``router-0=tcp://…,…``."""
        return ",".join(f"{r.name}={r.url}" for r in self.routers)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """(host, client port) of every gateway and standalone server."""
        return [(self.host, n.port) for n in (*self.gateways, *self.standalones) if n.port is not None]

    def dead(self) -> list[Node]:
        """The processes that were started and have ended since."""
        return [n for n in self.nodes if n.dead]

    def check_alive(self, skip: Iterable[str] = ()) -> None:
        """LocalClusterError for the first process (not named in ``skip``) that ended."""
        skipped = set(skip)
        for node in self.dead():
            if node.name not in skipped:
                raise LocalClusterError(self._death(node))

    def _death(self, node: Node) -> str:
        tail = node.log_tail(8)
        return f"{node.name} (pid {node.pid}) {node.exit_text()}" + (":\n  " + tail.replace("\n", "\n  ") if tail else "")

    # -- life ----------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Start every process that is not running (routers first); does not wait."""
        self._logs_for(self.nodes)
        for node in self.nodes:
            if not node.running:
                node.start()
        return self

    def wait_ready(self, timeout: float | None = None, nodes: Iterable[Node] | None = None) -> None:
        """Poll until every process (or those of ``nodes``) answers ``/readyz`` with 200.

        A process that ended raises :class:`LocalClusterError`, except one whose
        found port was taken meanwhile: that one gets new ports and starts again.
        """
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending = list(self.nodes if nodes is None else nodes)
        while pending:
            for node in list(pending):
                if node.dead and not self._retry_port(node, pending):
                    raise LocalClusterError(self._death(node) + "\n(before it was ready)")
                if node.ready():
                    pending.remove(node)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(n.name for n in pending)
                raise LocalClusterError(f"not ready within {timeout:g} s: {names}" + "".join(
                    f"\n{n.name}: " + (n.log_tail(3).replace("\n", "\n  ") or "(no output)") for n in pending
                ))
            time.sleep(0.05)  # polling processes that are starting

    def _retry_port(self, node: Node, pending: list[Node]) -> bool:
        """Start ``node`` on new ports if it died because a found port was taken."""
        if _PORT_TAKEN not in node.log_tail(5) or self._port_retries.get(node.name, 0) >= _PORT_RETRIES:
            return False
        kinds = {"router": ("nng", "admin"), "gateway": ("client", "admin", "inbox"), "standalone": ("client", "admin")}
        if all(self._bases[k] is not None for k in kinds[node.kind]):
            return False  # every port of it was given: nothing to choose anew
        self._port_retries[node.name] = self._port_retries.get(node.name, 0) + 1
        self._replan(node)
        node.start()
        if node.kind == "router":  # the gateways must be told the new address
            for gw in self.gateways:
                if gw.popen is not None:
                    gw.stop(signal.SIGKILL)
                    gw.start()
                    if gw not in pending:
                        pending.append(gw)
        return True

    def __enter__(self) -> LocalCluster:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> Node:
        """Send ``sig`` to one process (by name); does not wait."""
        node = self[name]
        node.kill(sig)
        return node

    def restart(self, name: str, sig: int = signal.SIGTERM) -> Node:
        """Stop one process if it runs (``sig``, SIGKILL after the stop timeout) and
        start it again under the same name, command and ports; does not wait for ready."""
        node = self[name]
        node.stop(sig, self.stop_timeout)
        self._logs_for([node])
        return node.start()

    def start_router(self, extra: Iterable[str] = ()) -> Node:
        """Add a router (the next number) and start it, with every router as its --peers;
        the running routers and gateways take it up from its announcement. Does not
        wait for ready. Gateways started later name it in their --routers."""
        node = self._add("router", list(extra))
        self._logs_for([node])
        return node.start()

    def start_gateway(self, extra: Iterable[str] = ()) -> Node:
        """Add a gateway (the next number, linked to every router) and start it;
        does not wait for ready."""
        node = self._add("gateway", list(extra))
        self._logs_for([node])
        return node.start()

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> None:
        """``sig`` to every process (after SIGCONT), SIGKILL to any still running after
        ``timeout`` seconds; then the temporary log directory is removed."""
        timeout = self.stop_timeout if timeout is None else timeout
        for node in self.nodes:
            if node.running:
                node.popen.send_signal(signal.SIGCONT)
                node.popen.send_signal(sig)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.popen is None:
                continue
            try:
                node.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.popen.kill()
                node.popen.wait()
        if self._tmp_logdir is not None:
            shutil.rmtree(self._tmp_logdir, ignore_errors=True)
            self._tmp_logdir = None


# --- fanroute local-cluster ------------------------------------------------------------

_RESTART_MIN, _RESTART_MAX = 0.5, 10.0


def _say(text: str) -> None:
    print(text, flush=True)


def _line(node: Node) -> str:
    admin = f"admin {node.admin}/metrics" if node.admin else ""
    return f"{node.name:<10} {node.url:<28} {admin:<40} pid {node.pid}"


def run_local_cluster(args: argparse.Namespace) -> int:
    if args.gateways < 1 or args.routers < 1:
        print("fanroute: --gateways and --routers must each be at least 1", file=sys.stderr)
        return 2
    restart = bool(getattr(args, "restart", False))
    cluster = LocalCluster(
        args.gateways,
        args.routers,
        gateway_args=("--ping-interval", str(args.ping_interval), "--ping-timeout", str(args.ping_timeout)),
        secret=os.environ.get("FANROUTE_CLUSTER_SECRET") or None,
        base_port=args.base_port,
        admin_base_port=args.admin_base_port,
        router_base_port=args.router_base_port,
        inherit_output=True,
    )
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        cluster.start()
        for node in cluster.nodes:
            _say(_line(node))
        then = "; a process that dies is started again" if restart else "; a process that dies is reported"
        _say(f"local cluster running (pid {os.getpid()}); Ctrl-C stops it{then}")
        return _supervise(cluster, restart, lambda: stopping)
    finally:
        cluster.stop()


def _supervise(cluster: LocalCluster, restart: bool, stopping: Any) -> int:
    """Report deaths and readiness; start dead processes again if ``restart``.

    A process that dies before it was ready waits twice as long before each next
    start (0.5 s up to 10 s); one that was ready is started again after 0.5 s.
    """
    announced: set[str] = set()  # ready since its last start
    reported: set[str] = set()  # dead, and said so
    due: dict[str, float] = {}  # when to start it again
    pause: dict[str, float] = {}
    while not stopping():
        now = time.monotonic()
        for node in cluster.nodes:
            if stopping():
                break
            if node.dead:
                if node.name not in reported:
                    reported.add(node.name)
                    was_ready = node.name in announced
                    announced.discard(node.name)
                    what = f"{node.name:<10} died: {node.exit_text()} (pid {node.pid}); the rest keep running"
                    if restart:
                        wait = _RESTART_MIN if was_ready else pause.get(node.name, _RESTART_MIN)
                        pause[node.name] = _RESTART_MIN if was_ready else min(_RESTART_MAX, wait * 2)
                        due[node.name] = now + wait
                        what += f"; starting it again in {wait:g} s"
                    _say(what)
                if node.name in due and now >= due[node.name]:
                    del due[node.name]
                    reported.discard(node.name)
                    cluster.restart(node.name)
                    _say(f"{node.name:<10} restarted: pid {node.pid}")
            elif node.name not in announced and node.ready(timeout=0.5):
                announced.add(node.name)
                _say(f"{node.name:<10} ready (pid {node.pid})")
        if not restart and not any(n.running for n in cluster.nodes):
            print("fanroute: every process of the local cluster has ended", file=sys.stderr)
            return 1
        time.sleep(0.2)  # the supervisor's poll interval
    return 0
