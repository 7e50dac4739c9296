"""The gateway process: WebSocket clients on one side, shard links on the other.

This is the I/O shell around two pure cores: :class:`gateway.admission.Admission`
decides what happens to each new connection and each command (forward it, answer
with an error, close, wait for room), and :class:`gateway.hub.Hub` carries out what
is forwarded. The shell accepts connections (trio-websocket), decodes frames, asks
the admission rules, hands commands to the hub, receives shard batches from its nng
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
import resource
import secrets
import time
from urllib.parse import parse_qs
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import pynng
import trio
from prometheus_client import CollectorRegistry
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer

from fanroute import protocol as p
from fanroute.codes import CloseCode, ErrorCode, close_code_label
from fanroute.admin import HttpApp
from fanroute.auth import Authenticator
from fanroute.permissions import load_policy
from fanroute import wire
from fanroute.codec import PING_FRAME, Encoding
from fanroute.config import ConfigError, GatewayConfig
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
from fanroute.gateway.hub import Hub, Session
from fanroute.gateway.links import ShardLink
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
_Publish = p.Publish
_PRESENCE_TICK = 0.1  # seconds between presence reports and pushes
_CLOSE_TIMEOUT = 5.0  # for the close frame to get through to a client that is slow
_HEAD_TIMEOUT = 10.0
_FD_RESERVE = 256  # descriptors kept free for the admin port, nng links and files
_SHED_RESPONSE = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BACKOFF = 0.1
STATIC_DIR = Path(__file__).parent / "static"


@dataclass(eq=False)
class Conn:
    """The I/O side of one client connection; ``state`` is what the admission rules know of it."""

    session: Session
    ws: WebSocketConnection
    activity: wsconn.ClientStream
    outbox: SocketOutbox
    opened: float
    state: ConnState
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    close_code: int | None = None
    close_reason: str = ""
    why: str = "client"

    def kill(self, close: Close) -> None:
        """Close from the server side as ``close`` says; safe to call from synchronous code."""
        if self.close_code is None:
            self.close_code, self.close_reason, self.why = close.code, close.reason, close.why
        self.cancel.cancel()


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


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
        self.conns: dict[Session, Conn] = {}
        self.client_sockets = 0  # TCP connections open on the client port, of any kind
        self.port: int | None = None
        self._inbox_sock: pynng.Pull0 | None = None
        self.hub: Hub | None = None
        self.links: dict[str, ShardLink | LocalShardLink] = {}
        self._bytes_closed = 0  # bytes written by connections that are gone
        self._ws_server: WebSocketServer | None = None
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
                nursery.start_soon(self._presence_ticks)
                try:
                    listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
                except OSError as exc:
                    raise ConfigError(f"--port {cfg.port} on {cfg.host} cannot be listened on: {exc.strerror}") from None
                self._ws_server = WebSocketServer(
                    self._handle,
                    listeners,
                    message_queue_size=4,
                    max_message_size=cfg.max_frame,
                    receive_buffer_size=65536,
                )
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

    def ready(self) -> tuple[bool, str]:
        if self.hub is None:
            return False, "starting"
        if self.draining:
            return False, "draining"
        down = [name for name, up in self.hub.shard_up.items() if not up]
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
                deliver=self._on_shard_batch,
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
        sock = self._inbox_sock
        while True:
            self._on_inbox(await sock.arecv())
            # Take whatever else is already queued before flushing, so a burst
            # becomes one write per socket instead of one per delivery.
            for _ in range(63):
                try:
                    data = sock.recv(block=False)
                except pynng.TryAgain:
                    break
                self._on_inbox(data)
            self.flush()
            # arecv returns a queued message without checkpointing.
            await trio.lowlevel.checkpoint()

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

    def _on_shard_batch(self, shard: str, frames: list[Any]) -> None:
        """Hand one batch from ``shard`` to the hub (from the nng inbox or a local link)."""
        try:
            self.hub.on_shard_frames(shard, frames)
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
                due = sweep(conn.state, now, wall, conn.activity.last_rx, wsconn.message_in_progress(conn.ws))
                if due is None:
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

        A connection past the cap by more than the slack is closed at once, before
        anything is read: the cheapest answer there is.
        """
        last_logged = -1e9
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    self.metrics.accept_errors.inc()
                    now = trio.current_time()
                    if now - last_logged > 10:
                        last_logged = now
                        log.error("accept failed: %s; backing off (counted in fanroute_gateway_accept_errors_total)", exc.strerror)
                    await trio.sleep(_ACCEPT_BACKOFF)
                    continue
                if (refused := self.admission.shed(self.client_sockets)) is not None:
                    self.count(refused.counts)
                    try:
                        stream.socket.send(_SHED_RESPONSE)
                    except OSError:
                        pass
                    stream.socket.close()
                    continue
                # Counted here, not in the task: a burst of accepts must see itself.
                self.client_sockets += 1
                nursery.start_soon(self._accept, stream)

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
            client = wsconn.ClientStream(stream, head)
            if wsconn.is_websocket_upgrade(head):
                await wsconn.serve_connection(self._ws_server, client)
            elif (refused := self.admission.http_request(self.client_sockets)) is not None:
                self.count(refused.counts)
                await stream.send_all(_SHED_RESPONSE)
            else:
                await self.http.handle(client)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away; nothing to answer
        except Exception:
            log.exception("a client connection failed")
            self.metrics.connections_rejected.labels("internal_error").inc()
        finally:
            self.client_sockets -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _handle(self, request: WebSocketRequest) -> None:
        refused = self.admission.handshake(
            _header(request.headers, b"origin"), self.client_sockets, trio.current_time()
        )
        if type(refused) is Refuse:
            self.count(refused.counts)
            await request.reject(refused.status, body=refused.body)
            return
        encoding = Encoding.for_subprotocols(request.proposed_subprotocols)
        ws = await request.accept(subprotocol=encoding.subprotocol)
        if refused is not None:  # a Close: accepted, then told to try again later
            self.count(refused.counts)
            with trio.move_on_after(_CLOSE_TIMEOUT):
                await ws.aclose(refused.code, refused.reason)
            return
        activity = wsconn.stream_of(ws)
        sock, lock = activity.socket, wsconn.write_lock(ws)
        now = trio.current_time()
        conn: Conn
        outbox = SocketOutbox(
            sock,
            lock,
            self.config.outbox_limit,
            on_overflow=lambda: self._overflow(conn),
        )
        session = Session(secrets.token_hex(8), encoding, outbox)
        state = self.admission.connection(session.topics, now)
        conn = Conn(session, ws, activity, outbox, opened=now, state=state)
        token = _query_param(request.path, "token")
        if token is not None:
            self._authenticated(conn, self.admission.authenticate(state, token), None)
        self.conns[session] = conn
        self.metrics.connections.inc()
        self.metrics.connections_opened.inc()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outbox.run)
                with conn.cancel:
                    await self._read_loop(conn)
                nursery.cancel_scope.cancel()
        finally:
            self.hub.close_session(session)
            del self.conns[session]
            self._bytes_closed += outbox.bytes_sent
            self.flush()
            code = conn.close_code
            if code is not None:
                # A peer that stopped answering will not read a close frame either:
                # do not hold its socket and buffer for long.
                patience = 0.5 if code == CloseCode.HEARTBEAT_TIMEOUT else _CLOSE_TIMEOUT
                with trio.move_on_after(patience) as scope:
                    scope.shield = True
                    await outbox.drain()
                    await ws.aclose(code, conn.close_reason)
            else:
                reason = ws.closed
                code = reason.code if reason is not None else 1006
            self.metrics.connections.dec()
            self.metrics.connections_closed.labels(conn.why, close_code_label(code)).inc()
            self.metrics.connection_lifetime.observe(trio.current_time() - conn.opened)

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
            self._refuse(conn, decision, id)
            return False
        for topic in decision.revoked:
            self.count((decision.count_each,))
            self.hub.revoke(conn.session, topic)
        return True

    def _overflow(self, conn: Conn) -> None:
        self.count(SLOW_CONSUMER.counts)
        conn.kill(SLOW_CONSUMER)

    async def _read_loop(self, conn: Conn) -> None:
        hub, session, ws, state = self.hub, conn.session, conn.ws, conn.state
        admit, room, clock = self.admission.command, self.admission.room, trio.current_time
        encoding = session.encoding
        # Label children bound once: a labels() lookup per command takes a lock.
        counted = {kind: self.metrics.commands.labels(name) for kind, name in _COMMAND_NAMES.items()}
        invalid = self.metrics.commands.labels("invalid")
        failed = self.metrics.internal_errors.labels("command")
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                return
            try:
                cmd = p.parse_command(encoding.decode(message))
            except p.ProtocolError as err:
                invalid.inc()
                hub.reject(session, err)
                self.flush()
                continue
            kind = type(cmd)
            counted[kind].inc()
            shard = None
            try:
                decision = admit(state, cmd, clock())
                if decision is not FORWARD:
                    self._decided(conn, cmd, decision)
                elif kind is _Publish:  # the hot path, kept to one call into the hub
                    hub.publish(session, cmd)
                    shard = hub.ring.owner(cmd.topic)
                else:
                    self._forward(conn, cmd)
            except Exception:
                log.exception("a %s command could not be handled", kind.__name__.lower())
                failed.inc()
                hub.reject(session, p.ProtocolError(ErrorCode.INTERNAL, "the command failed inside the gateway", cmd.id))
                shard = None
            self.flush()
            while shard is not None and (wait := room(shard, hub.backlog(shard))) is not None:
                # The shard link is behind: stop reading this client until it
                # catches up (TCP pushes back on the publisher).
                await self.links[wait.shard].room.wait()

    def _forward(self, conn: Conn, cmd: p.Command) -> None:
        """Carry out a command the admission rules let through (a publish is carried out inline)."""
        hub, session, kind = self.hub, conn.session, type(cmd)
        if kind is p.Subscribe:
            hub.subscribe(session, cmd)
        elif kind is p.Presence:
            hub.presence(session, cmd)
        elif kind is p.Ping:
            hub.ping(session, cmd)
        elif kind is p.Unsubscribe:
            hub.unsubscribe(session, cmd)
        elif kind is p.Connect:
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
