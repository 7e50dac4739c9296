"""The gateway process: WebSocket clients on one side, shard links on the other.

This is the I/O shell around :class:`gateway.hub.Hub`. It accepts connections
(trio-websocket), decodes frames and hands commands to the hub, receives shard
batches from its nng inbox (Pull0) and hands them to the hub, and after every
command or batch flushes each touched socket once. One task sweeps all connections
for heartbeats, auth deadlines and unfinished messages; there is no timer task per
connection.

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

import pynng
import trio
from prometheus_client import CollectorRegistry
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer

from fanroute import protocol as p
from fanroute.codes import CloseCode, ErrorCode, close_code_label
from fanroute.admin import HttpApp
from fanroute.auth import ANONYMOUS, AuthError, Authenticator, Identity
from fanroute.permissions import load_policy
from fanroute.ratelimit import Strikes, TokenBucket
from fanroute import wire
from fanroute.codec import PING_FRAME, Encoding
from fanroute.config import ConfigError, GatewayConfig
from fanroute.metrics import GatewayMetrics
from fanroute.ring import Ring
from fanroute.gateway import wsconn
from fanroute.gateway.hub import Hub, Session
from fanroute.gateway.links import ShardLink
from fanroute.gateway.outbox import SocketOutbox

log = logging.getLogger("fanroute.gateway")

_COMMAND_NAMES = {
    p.Publish: "publish",
    p.Subscribe: "subscribe",
    p.Unsubscribe: "unsubscribe",
    p.Ping: "ping",
    p.Connect: "connect",
    p.Refresh: "refresh",
}
_CLOSE_TIMEOUT = 5.0  # for the close frame to get through to a client that is slow
_HEAD_TIMEOUT = 10.0
_FD_RESERVE = 256  # descriptors kept free for the admin port, nng links and files
# Connections past --max-connections still get an answer (1013, or HTTP 503) from the
# handshake path; past this many more they are closed at accept, before any read.
_SHED_SLACK = 64
_SHED_RESPONSE = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BACKOFF = 0.1
STATIC_DIR = Path(__file__).parent / "static"


@dataclass(eq=False)
class Conn:
    """The I/O side of one client connection."""

    session: Session
    ws: WebSocketConnection
    activity: wsconn.ClientStream
    outbox: SocketOutbox
    opened: float
    last_ping: float  # when the last ping was sent (or the connection opened)
    ping_sent_at: float | None = None  # the last ping sent; None before the first
    identity: Identity | None = None  # None: a token is required and not yet given
    auth_deadline: float | None = None
    commands: TokenBucket | None = None
    publishes: TokenBucket | None = None
    strikes: Strikes | None = None
    partial_since: float | None = None  # when the message now arriving began
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    close_code: int | None = None
    close_reason: str = ""
    why: str = "client"

    def kill(self, code: int, reason: str, why: str) -> None:
        """Close from the server side; safe to call from synchronous code."""
        if self.close_code is None:
            self.close_code, self.close_reason, self.why = code, reason, why
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
    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None) -> None:
        config.check()
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.instance = secrets.token_hex(6)
        self.conns: dict[Session, Conn] = {}
        self.client_sockets = 0  # TCP connections open on the client port, of any kind
        self.max_connections = _connection_cap(config.max_connections)
        self.draining = False
        self.port: int | None = None
        self._inbox_sock: pynng.Pull0 | None = None
        self.hub: Hub | None = None
        self.links: dict[str, ShardLink] = {}
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
        self._accepts = TokenBucket(config.connection_rate, max(1.0, config.connection_rate)) if config.connection_rate else None
        # Plain HTTP on the client port: the browser client and the demo pages.
        self.http = HttpApp()
        self.http.add_static(STATIC_DIR)

    # --- start-up ------------------------------------------------------------------

    def _open_inbox(self) -> str:
        cfg = self.config
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
        )
        self.metrics.watch(hub, self._outbox_bytes, self._bytes_out)
        for name, url in cfg.routers:
            self.metrics.shard_link_up.labels(name).set(0)
            self.links[name] = ShardLink(
                hub,
                name,
                url,
                beat_interval=cfg.shard_beat,
                timeout=cfg.shard_timeout,
                sealer=self.sealer,
                on_state=self._link_state,
            )
        try:
            async with trio.open_nursery() as nursery:
                for link in self.links.values():
                    nursery.start_soon(link.run)
                nursery.start_soon(self._receive_from_shards)
                nursery.start_soon(self._sweep)
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
            conn.kill(CloseCode.RESTART, "service restart", "drain")
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
        link = self.links.get(env.sender)
        if link is None:
            self.metrics.inter_node_rejected.labels("sender").inc()
            return
        try:
            self.hub.on_shard_frames(env.sender, env.frames)
        except Exception:
            log.exception("a message from shard %s could not be handled", env.sender)
            self.metrics.internal_errors.labels("inbox").inc()
        link.heard()

    async def _sweep(self) -> None:
        """Heartbeats for every connection, from one task."""
        cfg = self.config
        interval = max(0.02, min(1.0, cfg.ping_interval / 4, cfg.ping_timeout / 4))
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            wall = time.time()
            for conn in list(self.conns.values()):
                if conn.auth_deadline is not None and now > conn.auth_deadline:
                    self.metrics.auth_failures.labels("timeout").inc()
                    conn.kill(CloseCode.UNAUTHORIZED, "no valid token in time", "unauthorized")
                    continue
                expires = conn.identity.expires if conn.identity is not None else None
                if expires is not None and wall > expires:
                    self.metrics.auth_failures.labels("expired").inc()
                    conn.kill(CloseCode.UNAUTHORIZED, "token expired", "unauthorized")
                    continue
                if wsconn.message_in_progress(conn.ws):
                    if conn.partial_since is None:
                        conn.partial_since = now
                    elif now - conn.partial_since > cfg.message_timeout:
                        self.metrics.limit_hits.labels("message_timeout").inc()
                        conn.kill(CloseCode.MESSAGE_TIMEOUT, "message not completed in time", "message_timeout")
                        continue
                else:
                    conn.partial_since = None
                last_rx = conn.activity.last_rx
                sent = conn.ping_sent_at
                outstanding = sent is not None and last_rx < sent
                if outstanding and now - sent > cfg.ping_timeout:
                    self.metrics.heartbeat_timeouts.inc()
                    conn.kill(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", "heartbeat_timeout")
                elif not outstanding and now - conn.last_ping >= cfg.ping_interval:
                    conn.outbox.push(PING_FRAME)
                    conn.outbox.flush()
                    conn.last_ping = conn.ping_sent_at = now

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
                if self.client_sockets >= self.max_connections + _SHED_SLACK:
                    self.metrics.limit_hits.labels("connections").inc()
                    self.metrics.connections_rejected.labels("connections").inc()
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
            elif self.client_sockets > self.max_connections:
                self.metrics.limit_hits.labels("connections").inc()
                self.metrics.connections_rejected.labels("connections").inc()
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
        if self.draining:
            self.metrics.connections_rejected.labels("draining").inc()
            await request.reject(503, body=b"draining\n")
            return
        cfg = self.config
        if cfg.allowed_origins:
            origin = _header(request.headers, b"origin")
            if origin is not None and origin not in cfg.allowed_origins:
                # Cross-site WebSocket hijacking: a page from another site is refused.
                self.metrics.connections_rejected.labels("origin").inc()
                await request.reject(403, body=b"origin not allowed\n")
                return
        encoding = Encoding.for_subprotocols(request.proposed_subprotocols)
        ws = await request.accept(subprotocol=encoding.subprotocol)
        refusal = None
        if self.client_sockets > self.max_connections:
            refusal = "connections"
        elif self._accepts is not None and not self._accepts.take(trio.current_time()):
            refusal = "connection_rate"
        if refusal is not None:
            self.metrics.limit_hits.labels(refusal).inc()
            self.metrics.connections_rejected.labels(refusal).inc()
            with trio.move_on_after(_CLOSE_TIMEOUT):
                await ws.aclose(CloseCode.TRY_AGAIN, "try again later")
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
        conn = Conn(session, ws, activity, outbox, opened=now, last_ping=now)
        if cfg.command_rate:
            conn.commands = TokenBucket(cfg.command_rate, cfg.command_rate)
        if cfg.publish_rate:
            conn.publishes = TokenBucket(cfg.publish_rate, cfg.publish_rate)
        conn.strikes = Strikes(cfg.abuse_limit, 10.0)
        token = _query_param(request.path, "token")
        if token is not None:
            self._authenticate(conn, token, None)
        elif self.auth.allow_anonymous:
            conn.identity = ANONYMOUS
        else:
            conn.auth_deadline = now + cfg.auth_timeout
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

    def _connect(self, conn: Conn, cmd: p.Connect) -> None:
        if cmd.token is not None:
            if not self._authenticate(conn, cmd.token, cmd.id):
                return
        elif conn.identity is None:
            self.hub.reject(conn.session, p.ProtocolError(ErrorCode.UNAUTHORIZED, "a token is required", cmd.id))
            return
        conn.session.send(
            p.connected_event(conn.session.id, self.config.ping_interval, self.config.ping_timeout, cmd.id)
        )
        self.hub.dirty.add(conn.session)

    def _authenticate(self, conn: Conn, token: str, id: int | None, refresh: bool = False) -> bool:
        """Verify a token; on failure answer ``unauthorized`` and close with 4001.

        A connection's subject is set once: a later token (``connect`` or
        ``refresh``) must be for the same subject. A token that grants less than the
        one before ends the subscriptions it no longer allows, each with an
        unsolicited ``unsubscribed``.
        """
        try:
            identity = self.auth.verify(token)
            before = conn.identity.subject if conn.identity is not None else None
            if before is not None and identity.subject != before:
                raise AuthError("a connection's subject cannot change: the token is for another subject")
        except AuthError as exc:
            self.metrics.auth_failures.labels("refresh" if refresh else "token").inc()
            self.hub.reject(conn.session, p.ProtocolError(ErrorCode.UNAUTHORIZED, str(exc), id))
            conn.kill(CloseCode.UNAUTHORIZED, "unauthorized", "unauthorized")
            return False
        had_identity = conn.identity is not None
        conn.identity, conn.auth_deadline = identity, None
        if had_identity and conn.session.topics:
            for topic in self.policy.revoked(identity, list(conn.session.topics)):
                self.metrics.auth_failures.labels("revoked").inc()
                self.hub.revoke(conn.session, topic)
        if refresh:
            conn.session.send(p.refreshed_event(identity.expires, id))
            self.hub.dirty.add(conn.session)
        return True

    def _forbidden(self, session: Session, why: str, id: int | None) -> None:
        self.metrics.auth_failures.labels("forbidden").inc()
        self.hub.reject(session, p.ProtocolError(ErrorCode.FORBIDDEN, why, id))

    def _rate_limited(self, conn: Conn, id: int | None, limit: str, now: float) -> None:
        self.metrics.limit_hits.labels(limit).inc()
        self.hub.reject(conn.session, p.ProtocolError(ErrorCode.RATE_LIMITED, f"too many {limit}: slow down", id))
        if conn.strikes is not None and conn.strikes.hit(now):
            conn.kill(CloseCode.RATE_LIMIT, "rate limit exceeded repeatedly", "rate_limit")

    def _overflow(self, conn: Conn) -> None:
        self.metrics.slow_consumer_closes.inc()
        conn.kill(CloseCode.SLOW_CONSUMER, "slow consumer", "slow_consumer")

    async def _read_loop(self, conn: Conn) -> None:
        hub, session, ws = self.hub, conn.session, conn.ws
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
            counted[type(cmd)].inc()
            try:
                shard = self._command(conn, cmd)
            except Exception:
                log.exception("a %s command could not be handled", type(cmd).__name__.lower())
                failed.inc()
                hub.reject(session, p.ProtocolError(ErrorCode.INTERNAL, "the command failed inside the gateway", cmd.id))
                shard = None
            self.flush()
            while shard is not None and hub.backlog(shard) > self.config.backlog_limit:
                # The shard link is behind: stop reading this client until it
                # catches up (TCP pushes back on the publisher).
                await self.links[shard].room.wait()

    def _command(self, conn: Conn, cmd: p.Command) -> str | None:
        """Carry out one command; return the shard a publication went to, if any."""
        hub, session, kind = self.hub, conn.session, type(cmd)
        now = trio.current_time()
        if conn.commands is not None and not conn.commands.take(now):
            self._rate_limited(conn, cmd.id, "commands", now)
        elif kind is p.Ping:
            hub.ping(session, cmd)
        elif kind is p.Connect:
            self._connect(conn, cmd)
        elif kind is p.Refresh:
            self._authenticate(conn, cmd.token, cmd.id, refresh=True)
        elif conn.identity is None:
            hub.reject(session, p.ProtocolError(ErrorCode.UNAUTHORIZED, "send a connect frame with a valid token first", cmd.id))
        elif kind is p.Publish:
            if conn.publishes is not None and not conn.publishes.take(now):
                self._rate_limited(conn, cmd.id, "publishes", now)
            elif (why := self.policy.can_publish(conn.identity, cmd.topic)) is not None:
                self._forbidden(session, why, cmd.id)
            else:
                hub.publish(session, cmd)
                return hub.ring.owner(cmd.topic)
        elif kind is p.Subscribe:
            if (why := self.policy.can_subscribe(conn.identity, cmd.topic)) is not None:
                self._forbidden(session, why, cmd.id)
            elif len(session.topics) >= self.config.max_subscriptions and cmd.topic not in session.topics:
                self.metrics.limit_hits.labels("subscriptions").inc()
                hub.reject(session, p.ProtocolError(ErrorCode.TOO_LARGE, f"at most {self.config.max_subscriptions} subscriptions per connection", cmd.id))
            else:
                hub.subscribe(session, cmd)
        elif kind is p.Unsubscribe:
            hub.unsubscribe(session, cmd)
        return None


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
    allowed = max(1, soft - _FD_RESERVE - _SHED_SLACK)
    if allowed < configured:
        log.warning("--max-connections %d lowered to %d: the descriptor limit is %d", configured, allowed, soft)
        return allowed
    return configured
