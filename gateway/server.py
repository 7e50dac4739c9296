"""The gateway process: WebSocket clients on one side, shard links on the other.

This is the I/O shell around two pure cores: :class:`gateway.admission.Admission`
decides what happens to each new connection and each command (forward it, answer
with an error, close, wait for room), and :class:`gateway.hub.Hub` carries out what
is forwarded. The shell accepts connections and runs the WebSocket protocol of each
itself (``gateway.wsconn``, a sans-I/O engine): one task per connection reads what
the socket has, takes every complete message in it, asks the admission rules, hands
the commands to the hub, receives shard batches from its nng
inbox (Pull0) and hands them to the hub, and after every command or batch flushes
each touched socket once. It counts the metric each decision names and does what
it says; it holds no rule of its own. One task sweeps all connections for the
timing rules (auth deadline, token expiry, unfinished messages, heartbeats); there
is no timer task per connection.

No single input stops the process: a command or inter-node message whose handling
raises is answered (``internal``) or dropped, counted, and the loop goes on. Every
TCP connection on the client port, WebSocket or plain HTTP, counts against
``--max-connections``, and that limit is kept below the process's file descriptor
limit so that the admin port (``/healthz``) always has descriptors to answer with.
"""

from __future__ import annotations

import errno
import logging
import os
from functools import partial
import resource
import secrets
import socket
import time
from time import perf_counter
from urllib.parse import parse_qs
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import pynng
import trio
from prometheus_client import CollectorRegistry

from fanroute import logs
from fanroute import protocol as p
from fanroute.codes import CloseCode, ErrorCode, close_code_label
from fanroute.admin import HttpApp
from fanroute.auth import Authenticator
from fanroute.permissions import load_policy
from fanroute import wire
from fanroute.codec import PING_FRAME, Encoding
from fanroute.config import ConfigError, GatewayConfig, is_nng_url
from fanroute.metrics import GatewayMetrics
from fanroute.ring import Ring
from fanroute.gateway import wsconn
from fanroute.gateway.admission import (
    FORWARD,
    RESTART,
    SEND_PING,
    SHED_SLACK,
    SLOW_CONSUMER,
    Admission,
    Answer,
    Authenticated,
    Close,
    ConnState,
    Count,
    Decision,
    Refuse,
)
from fanroute.gateway.control import DISCONNECT, Command, Control, own_counts
from fanroute.gateway.hub import Hub, Session
from fanroute.gateway.links import ShardLink
from fanroute.nngio import Receiver
from fanroute.gateway.locallink import LocalShardLink
from fanroute.router.shard import Shard
from fanroute.gateway.outbox import SocketOutbox

log = logging.getLogger("fanroute.gateway")

_COMMAND_NAMES = {
    p.Publish: "publish",
    p.Subscribe: "subscribe",
    p.Unsubscribe: "unsubscribe",
    p.Ping: "ping",
    p.Presence: "presence",
    p.Connect: "connect",
    p.Refresh: "refresh",
}
_PRESENCE_TICK = 0.1  # seconds between presence reports and pushes
_CLOSE_TIMEOUT = 5.0  # for the close frame to get through to a client that is slow
_READ_SIZE = 65536  # bytes taken from a client socket per read
_REST_AFTER = 1.0  # seconds a connection is quiet before its protocol engine is let go
_HEAD_TIMEOUT = 10.0
_FD_RESERVE = 256  # descriptors kept free for the admin port, nng links and files
_SHED_RESPONSE = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BACKOFF = 0.1
_ACCEPT_BATCH = 256  # connections taken from the listen queue per wakeup, at most
# What trio's own accept passes over: one connection's trouble (reset or aborted while
# it waited in the queue, refused by a firewall rule, its network gone), not the listener's.
_ACCEPT_PEER_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
                 "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH")
    if hasattr(errno, name)
)
STATIC_DIR = Path(__file__).parent / "static"


@dataclass(eq=False, slots=True)
class Conn:
    """The I/O side of one client connection; ``state`` is what the admission rules know of it.

    ``last_rx`` (when bytes last arrived, pongs included) and ``ws.in_progress`` (a
    message partly arrived) are what the heartbeat sweep needs from the engine.
    """

    session: Session
    ws: wsconn.WsConn
    stream: trio.SocketStream
    outbox: SocketOutbox
    opened: float
    state: ConnState
    last_rx: float
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    close_code: int | None = None
    close_reason: str = ""
    why: str = "client"

    def kill(self, close: Close) -> None:
        """Close from the server side as ``close`` says; safe to call from synchronous code."""
        if self.close_code is None:
            self.close_code, self.close_reason, self.why = close.code, close.reason, close.why
        self.cancel.cancel()


def _query_param(target: str, name: str) -> str | None:
    _, _, query = target.partition("?")
    values = parse_qs(query).get(name)
    return values[0] if values else None


class GatewayServer:
    def __init__(
        self,
        config: GatewayConfig,
        registry: CollectorRegistry | None = None,
        *,
        local_shards: dict[str, Shard] | None = None,
    ) -> None:
        config.check()
        # Shards in this process (standalone): linked by direct calls, no nng inbox.
        self.local_shards = local_shards or {}
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.instance = secrets.token_hex(6)
        # The server API's side here: connections by user, relayed commands (gateway.control).
        self.control = Control(self.instance)
        self.conns: dict[Session, Conn] = {}
        self.client_sockets = 0  # TCP connections open on the client port, of any kind
        self.port: int | None = None
        self._inbox_sock: pynng.Pull0 | None = None
        self.hub: Hub | None = None
        self.links: dict[str, ShardLink | LocalShardLink] = {}
        self._bytes_closed = 0  # bytes written by connections that are gone
        self._nursery: trio.Nursery | None = None  # where blocked connections' writers run
        self._dispatch: dict[type, Any] = {}  # command type -> its handler, once admitted
        self.policy = load_policy(config.config_file)
        self.auth = Authenticator.from_settings(
            secret=config.jwt_secret,
            public_key_file=config.jwt_public_key_file,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            allow_anonymous=False,
            api_key=config.api_key,
            require_exp=config.jwt_require_exp,
        )
        key = wire.LinkKey(config.cluster_secret, encrypt=config.cluster_encrypt)
        self.sealer = wire.Sealer(key)
        self.guard = wire.ReplayGuard(key)
        anonymous = config.anonymous
        self.auth.allow_anonymous = anonymous == "allow" or (anonymous == "auto" and not self.auth.tokens_enabled)
        if not self.auth.allow_anonymous and not self.auth.tokens_enabled:
            raise ConfigError("--anonymous deny needs a JWT key (--jwt-secret or --jwt-public-key-file)")
        self.admission = Admission(
            config, policy=self.policy, auth=self.auth, max_connections=_connection_cap(config.max_connections)
        )
        self._counters: dict[Count, Any] = {}  # metric children by decision count, bound once
        # Per-command metric children, bound once: a labels() lookup takes a lock.
        metrics = self.metrics
        self._counted = {kind: metrics.commands.labels(name) for kind, name in _COMMAND_NAMES.items()}
        times = metrics.watch_commands(_COMMAND_NAMES.values())
        self._command_times = {kind: times.labels(name) for kind, name in _COMMAND_NAMES.items()}
        self._invalid = metrics.commands.labels("invalid")
        self._failed = metrics.internal_errors.labels("command")
        # Plain HTTP on the client port: the browser client and the demo pages.
        self.http = HttpApp()
        self.http.add_static(STATIC_DIR)

    @property
    def max_connections(self) -> int:
        return self.admission.max_connections

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.admission.draining = value

    def count(self, counts: tuple[Count, ...]) -> None:
        """Count what a decision names (a labels() lookup takes a lock: each child is bound once)."""
        for count in counts:
            child = self._counters.get(count)
            if child is None:
                family = getattr(self.metrics, count.metric)
                child = self._counters[count] = family if count.label is None else family.labels(count.label)
            child.inc()

    # --- start-up ------------------------------------------------------------------

    def _open_inbox(self) -> str:
        cfg = self.config
        if self.local_shards:
            # Shards in this process call back directly: the inbox is only a name.
            return cfg.inbox
        sock = pynng.Pull0(recv_buffer_size=128)
        try:
            listener = sock.listen(cfg.inbox)
        except pynng.NNGException as exc:
            sock.close()
            raise ConfigError(f"--inbox {cfg.inbox} cannot be listened on: {exc}") from None
        self._inbox_sock = sock
        if cfg.advertise:
            return cfg.advertise
        if cfg.inbox.startswith("tcp") and cfg.inbox.endswith(":0"):
            # pynng's InAddr.port is in network byte order; its str() is right.
            port = int(str(listener.local_address).rsplit(":", 1)[1])
            return cfg.inbox[: -len(":0")] + f":{port}"
        return cfg.inbox

    async def run(self, *, task_status: trio.TaskStatus[GatewayServer] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        inbox = self._open_inbox()
        self.hub = hub = Hub(
            Ring(name for name, _ in cfg.routers),
            inbox=inbox,
            instance=self.instance,
            observe_latency=self.metrics.latency.observe,
            max_payload=cfg.max_frame,
            conflates=self.policy.conflates,
            conflate_threshold=cfg.conflate_threshold,
        )
        self.metrics.watch(hub, self._outbox_bytes, self._bytes_out)
        hub.on_control = self._on_control
        hub.on_routers = self._add_routers
        if not self.local_shards:
            # Routers find each other through the gateways' list (router/REPLICATION.md).
            hub.routers_frame = [wire.ROUTERS, [[name, url] for name, url in cfg.routers]]
        for name, url in cfg.routers:
            self.metrics.shard_link_up.labels(name).set(0)
            self.links[name] = self._link(hub, name, url)
        try:
            async with trio.open_nursery() as nursery:
                for link in self.links.values():
                    nursery.start_soon(link.run)
                if self._inbox_sock is not None:
                    nursery.start_soon(self._receive_from_shards)
                nursery.start_soon(self._sweep)
                nursery.start_soon(self._report)
                nursery.start_soon(self._presence_ticks)
                try:
                    listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host, backlog=cfg.backlog)
                except OSError as exc:
                    raise ConfigError(f"--port {cfg.port} on {cfg.host} cannot be listened on: {exc.strerror}") from None
                self._nursery = nursery
                self._dispatch = {
                    kind: handler
                    for kind, name in _COMMAND_NAMES.items()
                    if (handler := getattr(self, f"_on_{name}", None)) is not None
                }
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                self.port = listeners[0].socket.getsockname()[1]
                log.info("gateway %s listening on ws://%s:%d/", self.instance, cfg.host, self.port)
                if self.auth.allow_anonymous:
                    log.info("anonymous access is allowed%s", "" if self.auth.tokens_enabled else " (no JWT key configured)")
                else:
                    log.info("clients must present a valid token")
                task_status.started(self)
        finally:
            if self._inbox_sock is not None:
                self._inbox_sock.close()

    async def drain(self, window: float | None = None) -> None:
        """Close every client with 1012, spread evenly over ``window`` seconds.

        Readiness turns false and new connections are refused first, so a load
        balancer stops sending clients here; spreading the closes means a rolling
        update moves clients over gradually instead of in one reconnect storm.
        """
        window = self.config.drain_window if window is None else window
        self.draining = True
        conns = list(self.conns.values())
        log.info("draining %d connections over %.1fs", len(conns), window)
        start = trio.current_time()
        for i, conn in enumerate(conns):
            await trio.sleep_until(start + window * i / max(1, len(conns)))
            conn.kill(RESTART)
        with trio.move_on_after(_CLOSE_TIMEOUT + 1):
            while self.conns:
                await trio.sleep(0.02)

    def _link_state(self, shard: str, up: bool) -> None:
        self.metrics.shard_link_up.labels(shard).set(1 if up else 0)
        self.metrics.shard_link_changes.labels(shard, "up" if up else "down").inc()
        if up:
            logs.event(log, logging.INFO, "shard_link_up", f"shard {shard} is up", shard=shard)
        else:
            logs.event(log, logging.WARNING, "shard_link_down", f"shard {shard} is down", shard=shard)

    # --- the server API (gateway.control; the HTTP side is gateway.api) ---------------

    def carry_out(self, cmd: Command) -> int:
        """A server API command on this gateway's connections; how many it acted on.

        ``disconnect`` closes each of the user's connections (4003, or 1012 to
        reconnect); ``unsubscribe`` ends the user's subscriptions to the topic with
        an unsolicited ``unsubscribed``, after which no message of it is sent.
        """
        targets = self.control.targets(cmd)
        self.metrics.api_commands.labels(cmd.kind).inc()
        if cmd.kind == DISCONNECT:
            close = self.admission.disconnect(cmd.reconnect)
            for session in targets:
                conn = self.conns.get(session)
                if conn is not None:
                    conn.kill(close)
                logs.event(
                    log, logging.INFO, "api_disconnect", "connection closed by the server API",
                    connection=session.id, user=cmd.user, code=int(close.code), reason=close.reason,
                )
        else:
            for session in targets:
                self.hub.revoke(session, cmd.topic)
                logs.event(
                    log, logging.INFO, "api_unsubscribe", "subscription ended by the server API",
                    connection=session.id, user=cmd.user, topic=cmd.topic,
                )
            self.flush()
        self.metrics.api_command_targets.labels(cmd.kind).inc(len(targets))
        return len(targets)

    def _on_control(self, shard: str, frame: list[Any]) -> None:
        """A server API frame from a shard (see :attr:`Hub.on_control`)."""
        if frame[0] == wire.RELAY:
            cmd = self.control.relayed(frame)
            if cmd is not None:
                self.carry_out(cmd)
        else:
            request = self.control.info_answer(shard, frame)
            if request is not None and request.done:
                request.on_done()

    async def _report(self) -> None:
        """Tell every shard this gateway's counts, once a heartbeat, for ``GET /api/info``."""
        while True:
            await trio.sleep(self.config.shard_beat)
            hub = self.hub
            frame = self.control.report_frame(own_counts(self.conns, len(hub.topics)))
            for name, up in hub.shard_up.items():
                if up:
                    hub.to_shards[name].append(frame)
            self.flush()

    def ready(self) -> tuple[bool, str]:
        if self.hub is None:
            return False, "starting"
        if self.draining:
            return False, "draining"
        # With replicated streams, only the routers of the current view serve topics: a
        # router that is down and out of the view costs this gateway nothing.
        needed = self.hub.view_members or self.hub.shard_up.keys()
        down = [name for name in needed if not self.hub.shard_up[name]]
        if down:
            return False, "unreachable shards: " + ", ".join(sorted(down))
        return True, f"ready: {len(self.hub.shard_up)} shards"

    def _outbox_bytes(self) -> int:
        return sum(c.outbox.size for c in self.conns.values())

    def _bytes_out(self) -> int:
        return self._bytes_closed + sum(c.outbox.bytes_sent for c in self.conns.values())

    # --- moving bytes --------------------------------------------------------------

    def flush(self) -> None:
        """Write out what the hub queued: client frames, then shard frames."""
        hub = self.hub
        for session in hub.dirty:
            session.outbox.flush()
        hub.dirty.clear()
        for name, frames in hub.to_shards.items():
            if frames:
                self.links[name].wake.set()

    def _add_routers(self, routers: list[tuple[str, str]]) -> None:
        """Routers added to the cluster since this gateway started: link to each, route to it."""
        hub, nursery = self.hub, self._nursery
        if nursery is None or self.local_shards:
            return
        for name, url in routers:
            if not is_nng_url(url) or not hub.add_shard(name):
                continue
            link = self.links[name] = self._link(hub, name, url)
            self.metrics.shard_link_up.labels(name).set(0)
            nursery.start_soon(link.run)
            if hub.routers_frame is not None:
                hub.routers_frame[1].append([name, url])
            logs.event(log, logging.INFO, "router_added", f"linking to router {name} at {url}", shard=name)

    def _link(self, hub: Hub, name: str, url: str) -> ShardLink | LocalShardLink:
        """The link to shard ``name``: direct calls if it lives here, else nng to ``url``."""
        cfg = self.config
        shard = self.local_shards.get(name)
        if shard is not None:
            return LocalShardLink(
                hub,
                name,
                shard,
                beat_interval=cfg.shard_beat,
                deliver=partial(self._on_shard_batch, checked=False),
                flush=self.flush,
                on_state=self._link_state,
            )
        return ShardLink(
            hub,
            name,
            url,
            beat_interval=cfg.shard_beat,
            timeout=cfg.shard_timeout,
            sealer=self.sealer,
            on_state=self._link_state,
        )

    async def _receive_from_shards(self) -> None:
        # A thread of its own receives (fanroute.nngio.Receiver); each turn takes
        # every message that has arrived before flushing, so a burst becomes one
        # write per socket instead of one per delivery.
        receiver = Receiver(self._inbox_sock, "inbox")
        while True:
            for data in await receiver.batch():
                self._on_inbox(data)
            self.flush()

    def _on_inbox(self, data: bytes) -> None:
        try:
            env = self.guard.open(data)
        except wire.WireError as exc:
            self.metrics.inter_node_rejected.labels(exc.reason).inc()
            return
        if env.sender not in self.links:
            self.metrics.inter_node_rejected.labels("sender").inc()
            return
        self._on_shard_batch(env.sender, env.frames)

    def _on_shard_batch(self, shard: str, frames: list[Any], checked: bool = True) -> None:
        """Hand one batch from ``shard`` to the hub (from the nng inbox or a local link)."""
        try:
            self.hub.on_shard_frames(shard, frames, checked=checked)
        except Exception:
            log.exception("a message from shard %s could not be handled", shard)
            self.metrics.internal_errors.labels("inbox").inc()
        self.links[shard].heard()

    async def _presence_ticks(self) -> None:
        """The hub's periodic work: presence counts, and conflated messages held back."""
        while True:
            await trio.sleep(_PRESENCE_TICK)
            self.hub.tick()
            self.flush()

    async def _sweep(self) -> None:
        """The timing rules of every connection (:meth:`Admission.sweep`), from one task."""
        cfg, sweep = self.config, self.admission.sweep
        interval = max(0.02, min(1.0, cfg.ping_interval / 4, cfg.ping_timeout / 4))
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            wall = time.time()
            for conn in list(self.conns.values()):
                due = sweep(conn.state, now, wall, conn.last_rx, conn.ws.in_progress)
                if due is None:
                    if now - conn.last_rx > _REST_AFTER:
                        conn.ws.rest()  # quiet: its protocol engine is made again by the next bytes
                    continue
                if due is SEND_PING:
                    conn.outbox.push(PING_FRAME)
                    conn.outbox.flush()
                else:
                    self.count(due.counts)
                    conn.kill(due)

    # --- one client connection -----------------------------------------------------

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept client connections; out of descriptors or memory, back off and count.

        Each wakeup takes every connection waiting in the listen queue (up to
        ``_ACCEPT_BATCH``), not one: trio's ``accept`` yields to the scheduler after
        each connection, so on a gateway whose tasks are busy (thousands of
        heartbeats a second) a reconnect storm was taken at one connection per
        scheduler pass, about a hundred a second, while the kernel's queue
        overflowed and clients timed out in it. The queue is read through a
        duplicate of the listening descriptor (same socket, same queue), whose
        ``accept`` returns at once when the queue is empty.

        A connection past the cap by more than the slack is closed at once, before
        anything is read: the cheapest answer there is.
        """
        last_logged = -1e9
        async with listener:
            fd = listener.socket.fileno()
            with socket.socket(fileno=os.dup(fd)) as queue:
                queue.setblocking(False)
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    for _ in range(_ACCEPT_BATCH):
                        try:
                            sock, _ = queue.accept()
                        except BlockingIOError:
                            break
                        except OSError as exc:
                            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                                if exc.errno in _ACCEPT_PEER_ERRNOS:
                                    continue  # that connection was gone before it was taken
                                raise
                            self.metrics.accept_errors.inc()
                            now = trio.current_time()
                            if now - last_logged > 10:
                                last_logged = now
                                log.error("accept failed: %s; backing off (counted in fanroute_gateway_accept_errors_total)", exc.strerror)
                            await trio.sleep(_ACCEPT_BACKOFF)
                            break
                        if (refused := self.admission.shed(self.client_sockets)) is not None:
                            self.count(refused.counts)
                            try:
                                sock.setblocking(False)
                                sock.send(_SHED_RESPONSE)
                            except OSError:
                                pass
                            sock.close()
                            continue
                        # Counted here, not in the task: a burst of accepts must see itself.
                        self.client_sockets += 1
                        nursery.start_soon(self._accept, trio.SocketStream(trio.socket.from_stdlib_socket(sock)))

    async def _accept(self, stream: trio.SocketStream) -> None:
        """The client port's front door: WebSocket upgrades, or plain HTTP.

        Whatever one connection does — hang up mid-handshake, reset while being
        refused — ends that connection only: an exception escaping here would stop
        the listener, and with it the gateway.
        """
        try:
            head = None
            with trio.move_on_after(_HEAD_TIMEOUT):
                head = await wsconn.read_head(stream)
            if head is None:
                return
            if wsconn.is_websocket_upgrade(head):
                serving = self._serve_websocket(stream, head)
                head = None  # an open connection's task keeps nothing of its request head
                await serving
            elif (refused := self.admission.http_request(self.client_sockets)) is not None:
                self.count(refused.counts)
                await stream.send_all(_SHED_RESPONSE)
            else:
                await self.http.handle(wsconn.ClientStream(stream, head))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away; nothing to answer
        except Exception:
            log.exception("a client connection failed")
            self.metrics.connections_rejected.labels("internal_error").inc()
        finally:
            self.client_sockets -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_websocket(self, stream: trio.SocketStream, head: bytes) -> None:
        """One WebSocket connection on this task, from its upgrade request to its close.

        The handshake is answered here (the admission rules decide Origin, draining
        and the caps; ``fanroute.codec`` the subprotocol); the connection then has no
        task but this one, which reads, and no writer unless its socket fills up.
        """
        shake = wsconn.Handshake(head)
        del head
        if not shake.parsed:
            await stream.send_all(wsconn.BAD_REQUEST)
            return
        now = trio.current_time()
        refused = self.admission.handshake(shake.origin, self.client_sockets, now)
        if type(refused) is Refuse:
            self.count(refused.counts)
            await stream.send_all(shake.reject(refused.status, refused.body))
            return
        encoding = Encoding.for_subprotocols(shake.offered_subprotocols())
        response, opened = shake.accept(encoding.subprotocol)
        await stream.send_all(response)
        del response
        if not opened:
            return  # not a valid upgrade: websockets answered it (400, 426, ...)
        cfg = self.config
        ws = wsconn.WsConn(cfg.max_frame)
        conn: Conn
        outbox = SocketOutbox(
            stream.socket,
            cfg.outbox_limit,
            on_overflow=lambda: self._overflow(conn),
            spawn=self._nursery.start_soon,
        )
        if refused is not None:  # a Close: accepted, then told to try again later
            self.count(refused.counts)
            outbox.finish(ws.close_frame(refused.code, refused.reason))
            with trio.move_on_after(_CLOSE_TIMEOUT):
                await self._linger(stream, ws, outbox)
            return
        session = Session(secrets.token_hex(8), encoding, outbox)
        state = self.admission.connection(session.topics, now)
        conn = Conn(session, ws, stream, outbox, opened=now, state=state, last_rx=now)
        token = _query_param(shake.path, "token")
        first = shake.rest
        del shake  # the handshake's parser is not kept for the connection's life
        if token is not None:
            self._authenticated(conn, self.admission.authenticate(state, token), None)
        self.conns[session] = conn
        self.metrics.connections.inc()
        self.metrics.connections_opened.inc()
        logs.event(
            log, logging.DEBUG, "connection_opened", "connection opened",
            connection=session.id, user=self.control.users.user_of(session),
        )
        del token
        try:
            with conn.cancel:
                reading = self._read_loop(conn, first)
                first = b""  # the bytes that came with the handshake are the read loop's alone
                await reading
        finally:
            self.hub.close_session(session)
            user = self.control.users.user_of(session)
            self.control.users.remove(session)
            del self.conns[session]
            self.flush()
            code = conn.close_code
            if code is not None:
                # A peer that stopped answering will not read a close frame either:
                # do not hold its socket and buffer for long.
                patience = 0.5 if code == CloseCode.HEARTBEAT_TIMEOUT else _CLOSE_TIMEOUT
                outbox.finish(ws.close_frame(code, conn.close_reason))
            else:
                # The peer closed (its close is echoed already), or broke the
                # protocol (1002, 1007, 1009: the engine's close is queued).
                patience = _CLOSE_TIMEOUT
                code = ws.close_code
                if ws.failed:
                    conn.why = "protocol"
                outbox.finish(b"")
            with trio.move_on_after(patience) as scope:
                scope.shield = True
                await self._linger(stream, ws, outbox)
            self._bytes_closed += outbox.bytes_sent
            self.metrics.connections.dec()
            self.metrics.connections_closed.labels(conn.why, close_code_label(code)).inc()
            self.metrics.connection_lifetime.observe(trio.current_time() - conn.opened)
            logs.event(
                log, logging.DEBUG, "connection_closed", "connection closed",
                connection=session.id, user=user, code=code, reason=conn.why,
            )

    @staticmethod
    async def _linger(stream: trio.SocketStream, ws: wsconn.WsConn, outbox: SocketOutbox) -> None:
        """Finish a close: write what is queued (the close frame last), then wait for the peer's close.

        The server ends the TCP connection once both close frames have crossed
        (RFC 6455 7.1.1); clients wait for that. What the peer sends meanwhile is
        read and dropped, so no unread data makes the kernel answer with a reset
        that could overtake the close frame. The caller bounds the wait.
        """
        await outbox.drain()
        if outbox.broken:
            return
        try:
            while not ws.close_received:
                data = await stream.receive_some(65536)
                if not data:
                    return
                ws.receive(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def _refuse(self, conn: Conn, decision: Answer | Close, id: int | None) -> None:
        """Carry out a refusal: count it, answer with an ``error`` frame, close if it says so."""
        self.count(decision.counts)
        if type(decision) is Answer:
            self.hub.reject(conn.session, p.ProtocolError(decision.code, decision.reason, id))
            return
        if decision.answer is not None:
            self.hub.reject(conn.session, p.ProtocolError(decision.answer.code, decision.answer.reason, id))
        conn.kill(decision)

    def _authenticated(self, conn: Conn, decision: Authenticated | Close, id: int | None) -> bool:
        """A token was judged (:meth:`Admission.authenticate`): end what it revoked, or refuse."""
        if type(decision) is not Authenticated:
            if decision.code == CloseCode.UNAUTHORIZED:
                why = decision.answer.reason if decision.answer is not None else decision.reason
                logs.event(log, logging.INFO, "auth_failed", "token refused", connection=conn.session.id, code=int(decision.code), reason=why)
            self._refuse(conn, decision, id)
            return False
        subject, users = decision.identity.subject, self.control.users
        if subject is not None and users.user_of(conn.session) is None:
            # The connection's first identity (a subject never changes afterwards).
            refused = self.admission.user_connection(decision.identity, users.count(subject))
            if refused is not None:
                self._refuse(conn, refused, id)
                return False
            users.add(subject, conn.session)
        for topic in decision.revoked:
            self.count((decision.count_each,))
            self.hub.revoke(conn.session, topic)
        return True

    def _overflow(self, conn: Conn) -> None:
        self.count(SLOW_CONSUMER.counts)
        conn.kill(SLOW_CONSUMER)

    async def _read_loop(self, conn: Conn, data: bytes) -> None:
        """Read what the socket has, handle every complete message in it, flush once; repeat.

        Control frames the protocol owes the peer (pongs, the echo of a close) are
        queued after the replies to the commands before them. A publisher whose
        shard link is behind is not read again until the link catches up, so TCP
        pushes back on it.

        The socket is read through its descriptor (``os.read`` and trio's
        ``wait_readable``, with the checkpoints trio's own ``recv`` takes): trio's
        socket wrapper would add two coroutine frames to every waiting connection,
        about 0.8 KB of each idle connection's memory. Nothing read is kept while
        the loop waits.
        """
        ws, outbox, hub = conn.ws, conn.outbox, self.hub
        fd = conn.stream.socket.fileno()
        read, wait_readable = os.read, trio.lowlevel.wait_readable
        if_cancelled, shielded = trio.lowlevel.checkpoint_if_cancelled, trio.lowlevel.cancel_shielded_checkpoint
        clock, bytes_in, command = trio.current_time, self.metrics.bytes_in, self._command
        room = self.admission.room
        while True:
            if data:
                now = conn.last_rx = clock()
                bytes_in.inc(len(data))
                waits = None
                for message in ws.receive(data):
                    shard = command(conn, message, now)
                    if shard is not None:
                        waits = {shard} if waits is None else waits | {shard}
                    if conn.close_code is not None:
                        break  # closed by a rule: the rest of the batch is not handled
                replies = ws.replies()
                for frame in replies:
                    outbox.push(frame)
                self.flush()
                if ws.done:
                    return
                if waits is not None:
                    for shard in waits:
                        while (wait := room(shard, hub.backlog(shard))) is not None:
                            await self.links[wait.shard].room.wait()
            # A read that filled the buffer likely left more behind: read again at
            # once. Otherwise wait first: a read that fails with EAGAIN raises, and
            # an exception would give this frame a frame object for good (0.4 KB).
            more, data = data is not None and len(data) >= _READ_SIZE, None
            if more:
                await if_cancelled()
                try:
                    data = read(fd, _READ_SIZE)
                except BlockingIOError:
                    pass
                else:
                    await shielded()
            while data is None:
                await wait_readable(fd)  # the wait is the checkpoint
                try:
                    data = read(fd, _READ_SIZE)
                except BlockingIOError:
                    pass  # woken with nothing to read after all
            if not data:
                ws.receive_eof()
                return

    def _command(self, conn: Conn, message: str | bytes, now: float) -> str | None:
        """Decode, admit and carry out one client message; the shard of a publication, else ``None``."""
        session = conn.session
        try:
            cmd = p.parse_command(session.encoding.decode(message))
        except p.ProtocolError as err:
            self._invalid.inc()
            self.hub.reject(session, err)
            return None
        kind = type(cmd)
        self._counted[kind].inc()
        started = perf_counter()
        shard = None
        try:
            decision = self.admission.command(conn.state, cmd, now)
            if decision is FORWARD:
                shard = self._dispatch[kind](conn, cmd)
            else:
                self._decided(conn, cmd, decision)
        except Exception:
            log.exception("a %s command could not be handled", kind.__name__.lower())
            self._failed.inc()
            self.hub.reject(session, p.ProtocolError(ErrorCode.INTERNAL, "the command failed inside the gateway", cmd.id))
            shard = None
        self._command_times[kind].observe(perf_counter() - started)
        return shard

    # What each admitted command does (a table: ``_COMMAND_NAMES`` maps a command type
    # to its name, and ``_on_<name>`` carries it out). A publication returns its shard,
    # for back-pressure.

    def _on_publish(self, conn: Conn, cmd: p.Publish) -> str:
        hub = self.hub
        hub.publish(conn.session, cmd)
        return hub.owner(cmd.topic)

    def _on_subscribe(self, conn: Conn, cmd: p.Subscribe) -> None:
        self.hub.subscribe(conn.session, cmd)

    def _on_unsubscribe(self, conn: Conn, cmd: p.Unsubscribe) -> None:
        self.hub.unsubscribe(conn.session, cmd)

    def _on_ping(self, conn: Conn, cmd: p.Ping) -> None:
        self.hub.ping(conn.session, cmd)

    def _on_presence(self, conn: Conn, cmd: p.Presence) -> None:
        self.hub.presence(conn.session, cmd)

    def _on_connect(self, conn: Conn, cmd: p.Connect) -> None:
        self._connected(conn, cmd.id)

    def _decided(self, conn: Conn, cmd: p.Command, decision: Decision) -> None:
        """Carry out a decision other than :data:`FORWARD`: a token accepted, or a refusal."""
        if type(decision) is not Authenticated:
            self._refuse(conn, decision, cmd.id)  # type: ignore[arg-type]
        elif self._authenticated(conn, decision, cmd.id):
            if type(cmd) is p.Refresh:
                conn.session.send(p.refreshed_event(decision.identity.expires, cmd.id))
                self.hub.dirty.add(conn.session)
            else:
                self._connected(conn, cmd.id)

    def _connected(self, conn: Conn, id: int | None) -> None:
        cfg = self.config
        conn.session.send(p.connected_event(conn.session.id, cfg.ping_interval, cfg.ping_timeout, id))
        self.hub.dirty.add(conn.session)


def _connection_cap(configured: int) -> int:
    """``--max-connections``, kept below what the descriptor limit allows.

    The soft descriptor limit is raised to the hard one first (containers often
    start at 1024 with far more allowed). Whatever remains too small lowers the cap,
    with one line saying so, rather than letting accept() fail with EMFILE.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return configured
    allowed = max(1, soft - _FD_RESERVE - SHED_SLACK)
    if allowed < configured:
        log.warning("--max-connections %d lowered to %d: the descriptor limit is %d", configured, allowed, soft)
        return allowed
    return configured
