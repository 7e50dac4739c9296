"""What the gateway lets through: every admission rule for connections and commands.

This module does no I/O and reads no clock: the time is passed in (``now``, trio's
monotonic clock; ``wall``, Unix time, for token expiry), so each rule is tested
directly, with a fake clock. The I/O shells — the WebSocket server
(:mod:`fanroute.gateway.server`) and the HTTP publish API
(:mod:`fanroute.gateway.api`) — ask :class:`Admission` what to do and carry the
answer out: they read, write, count the metric the decision names, and close.

A question gets a decision, one small frozen dataclass in the manner of h11's and
wsproto's events:

* :data:`FORWARD` — carry the command out (hand it to the hub);
* :class:`Answer` — refuse it with an ``error`` frame carrying an :class:`ErrorCode`;
  the connection stays open;
* :class:`Close` — close the connection with a :class:`CloseCode` (after an ``error``
  frame, when the decision holds an :attr:`Close.answer`);
* :class:`Refuse` — refuse a WebSocket handshake (or a plain HTTP request) with an HTTP
  status, before any WebSocket exists;
* :class:`Authenticated` — a token was accepted; lists the subscriptions it no longer
  allows;
* :class:`Wait` — a publisher waits for room: its shard's backlog is over the limit;
* :data:`SEND_PING` — the heartbeat is due.

Each refusal names what to count as :class:`Count` values (a metric of
:class:`fanroute.metrics.GatewayMetrics` and its label), so the shells count
without knowing why. Decisions made by fixed rules are built once, here; the hot
path of a command that goes through allocates nothing.

A connection's rule state is a :class:`ConnState`. The module updates it as it
decides (a token bucket spends a token, an accepted token sets the identity, a
ping that is due is recorded as sent), so that the shell never has to.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import ClassVar

import orjson

from fanroute import protocol as p
from fanroute.auth import API, ANONYMOUS, AuthError, Authenticator, Identity
from fanroute.codes import CloseCode, ErrorCode
from fanroute.config import GatewayConfig
from fanroute.errors import ProtocolError
from fanroute.permissions import Policy
from fanroute.ratelimit import Strikes, TokenBucket

STRIKE_WINDOW = 10.0  # seconds over which rate-limit refusals are counted toward 4029
# Connections past the cap still get an answer (1013, or HTTP 503) from the handshake
# path; past this many more they are closed at accept, before anything is read.
SHED_SLACK = 64
API_BODY_FACTOR = 16  # an HTTP publish request may be this many --max-frame long


# --- decisions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Count:
    """One increment of ``metric`` (a :class:`GatewayMetrics` attribute), with ``label`` if it has one."""

    metric: str
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Forward:
    """Carry the command out: hand it to the hub (or, for ``connect``, answer ``connected``)."""

    counts: tuple[Count, ...] = ()


@dataclass(frozen=True, slots=True)
class Answer:
    """Refuse the command with an ``error`` frame; the connection stays open."""

    code: ErrorCode
    reason: str
    counts: tuple[Count, ...] = ()


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with ``code``; ``answer``, if any, is sent first as an ``error``.

    ``why`` is the ``reason`` label of ``fanroute_gateway_connections_closed_total``.
    """

    code: CloseCode
    reason: str
    why: str
    counts: tuple[Count, ...] = ()
    answer: Answer | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuse a handshake or an HTTP request with ``status`` (no WebSocket is opened)."""

    status: int
    body: bytes
    counts: tuple[Count, ...] = ()


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A token was accepted (the state now holds ``identity``).

    ``revoked`` are the subscriptions the new token no longer allows, in order; the
    shell ends each with an unsolicited ``unsubscribed`` and counts
    :attr:`count_each` once per topic.
    """

    identity: Identity
    revoked: tuple[str, ...] = ()
    count_each: ClassVar[Count] = Count("auth_failures", "revoked")


@dataclass(frozen=True, slots=True)
class Wait:
    """Stop taking publications until ``shard``'s backlog is back under the limit."""

    shard: str


@dataclass(frozen=True, slots=True)
class SendPing:
    """The connection's heartbeat is due: send a ping (the state already records it)."""


FORWARD = Forward()
SEND_PING = SendPing()
# Command classes as module globals: one lookup each on the per-command path.
_PUBLISH, _PING, _CONNECT, _REFRESH, _SUBSCRIBE = p.Publish, p.Ping, p.Connect, p.Refresh, p.Subscribe
_PRESENCE = p.Presence

Decision = Forward | Answer | Close | Authenticated


# --- decisions of fixed rules, built once ----------------------------------------------


def _limited(limit: str) -> tuple[Answer, Close]:
    counts = (Count("limit_hits", limit),)
    answer = Answer(ErrorCode.RATE_LIMITED, f"too many {limit}: slow down", counts)
    abuse = Close(CloseCode.RATE_LIMIT, "rate limit exceeded repeatedly", "rate_limit", counts, Answer(answer.code, answer.reason))
    return answer, abuse


def _too_many(limit: str) -> Close:
    return Close(
        CloseCode.TRY_AGAIN, "try again later", limit, (Count("limit_hits", limit), Count("connections_rejected", limit))
    )


COMMANDS_LIMITED, COMMANDS_ABUSE = _limited("commands")
PUBLISHES_LIMITED, PUBLISHES_ABUSE = _limited("publishes")
NOT_AUTHENTICATED = Answer(ErrorCode.UNAUTHORIZED, "send a connect frame with a valid token first")
TOKEN_REQUIRED = Answer(ErrorCode.UNAUTHORIZED, "a token is required")
AUTH_TIMEOUT = Close(CloseCode.UNAUTHORIZED, "no valid token in time", "unauthorized", (Count("auth_failures", "timeout"),))
TOKEN_EXPIRED = Close(CloseCode.UNAUTHORIZED, "token expired", "unauthorized", (Count("auth_failures", "expired"),))
MESSAGE_TIMEOUT = Close(
    CloseCode.MESSAGE_TIMEOUT, "message not completed in time", "message_timeout", (Count("limit_hits", "message_timeout"),)
)
HEARTBEAT_TIMEOUT = Close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", "heartbeat_timeout", (Count("heartbeat_timeouts"),))
SLOW_CONSUMER = Close(CloseCode.SLOW_CONSUMER, "slow consumer", "slow_consumer", (Count("slow_consumer_closes"),))
RESTART = Close(CloseCode.RESTART, "service restart", "drain")
DRAINING = Refuse(503, b"draining\n", (Count("connections_rejected", "draining"),))
ORIGIN_REFUSED = Refuse(403, b"origin not allowed\n", (Count("connections_rejected", "origin"),))
TOO_MANY_CONNECTIONS = _too_many("connections")
CONNECTION_RATE = _too_many("connection_rate")
TOO_MANY_FOR_USER = Close(
    CloseCode.TRY_AGAIN,
    "too many connections for this user",
    "user_connections",
    (Count("limit_hits", "user_connections"), Count("connections_rejected", "user_connections")),
)
# POST /api/disconnect: 4003 (do not reconnect), or 1012 with "reconnect": true.
DISCONNECTED = Close(CloseCode.DISCONNECTED, "disconnected by the server", "api_disconnect")
DISCONNECTED_RECONNECT = Close(CloseCode.RESTART, "disconnected by the server: reconnect", "api_disconnect")
SHED = Refuse(503, b"", TOO_MANY_CONNECTIONS.counts)
API_BODY_TOO_LARGE = Answer(ErrorCode.TOO_LARGE, "request body too large")
_FORBIDDEN = (Count("auth_failures", "forbidden"),)
_AUTH_FAILED = {False: (Count("auth_failures", "token"),), True: (Count("auth_failures", "refresh"),)}


def forbidden(why: str) -> Answer:
    """A permission refusal, with the policy's reason."""
    return Answer(ErrorCode.FORBIDDEN, why, _FORBIDDEN)


def no_room(topic: str) -> Answer:
    """A publication its request's deadline caught still waiting for room in its shard's backlog: not sent, not applied."""
    return Answer(
        ErrorCode.UNAVAILABLE, f"no room in the backlog of the shard for {topic!r} in time; the publication was not applied"
    )


# --- a connection's rule state ------------------------------------------------------


@dataclass(slots=True, eq=False)
class ConnState:
    """What the rules know of one connection.

    ``topics`` is the connection's subscriptions as the hub holds them (the hub
    session's own mapping, shared rather than copied, so it is never stale).
    """

    topics: Collection[str]
    identity: Identity | None = None  # None: a token is required and not yet given
    auth_deadline: float | None = None  # when a connection with no identity is closed
    commands: TokenBucket | None = None
    publishes: TokenBucket | None = None
    strikes: Strikes | None = None
    last_ping: float = 0.0  # when the last ping was sent (or the connection opened)
    ping_sent_at: float | None = None  # the last ping sent; None before the first
    partial_since: float | None = None  # when the message now arriving began

    @property
    def subject(self) -> str | None:
        return self.identity.subject if self.identity is not None else None

    @property
    def subscriptions(self) -> int:
        return len(self.topics)


# --- the rules ----------------------------------------------------------------------


class Admission:
    """The gateway's admission rules, with the settings they read from the config.

    ``max_connections`` is the connection cap in force (the configured one, lowered
    by the shell to what the descriptor limit allows). ``draining`` is set when the
    gateway drains: new connections are then refused.
    """

    def __init__(
        self, config: GatewayConfig, *, policy: Policy, auth: Authenticator, max_connections: int | None = None
    ) -> None:
        self.policy = policy
        self.auth = auth
        self.max_connections = config.max_connections if max_connections is None else max_connections
        self.max_connections_per_user = config.max_connections_per_user
        self.max_subscriptions = config.max_subscriptions
        self.command_rate = config.command_rate
        self.publish_rate = config.publish_rate
        self.abuse_limit = config.abuse_limit
        self.auth_timeout = config.auth_timeout
        self.allowed_origins = frozenset(config.allowed_origins)
        self.backlog_limit = config.backlog_limit
        self.max_frame = config.max_frame
        self.ping_interval = config.ping_interval
        self.ping_timeout = config.ping_timeout
        self.message_timeout = config.message_timeout
        rate = config.connection_rate
        self.accepts = TokenBucket(rate, max(1.0, rate)) if rate else None
        self.draining = False
        self.too_many_subscriptions = Answer(
            ErrorCode.TOO_LARGE,
            f"at most {self.max_subscriptions} subscriptions per connection",
            (Count("limit_hits", "subscriptions"),),
        )
        self.api_state = ConnState((), identity=API)  # the HTTP API: no limits of a connection

    # --- new connections -------------------------------------------------------------

    def shed(self, sockets: int) -> Refuse | None:
        """At accept, with ``sockets`` already open: refuse before reading anything, far past the cap."""
        return SHED if sockets >= self.max_connections + SHED_SLACK else None

    def http_request(self, sockets: int) -> Refuse | None:
        """A plain HTTP request on the client port: 503 past the cap (it holds a descriptor too)."""
        return SHED if sockets > self.max_connections else None

    def handshake(self, origin: str | None, sockets: int, now: float) -> Refuse | Close | None:
        """A WebSocket handshake, with ``sockets`` open on the client port (this one included).

        ``None`` lets it in. A :class:`Refuse` answers the handshake with an HTTP
        status; a :class:`Close` accepts it and closes at once (``1013``), the
        WebSocket way of saying "not now".
        """
        if self.draining:
            return DRAINING
        if self.allowed_origins and origin is not None and origin not in self.allowed_origins:
            # Cross-site WebSocket hijacking: a page from another site is refused.
            return ORIGIN_REFUSED
        if sockets > self.max_connections:
            return TOO_MANY_CONNECTIONS
        if self.accepts is not None and not self.accepts.take(now):
            return CONNECTION_RATE
        return None

    def connection(self, topics: Collection[str], now: float) -> ConnState:
        """The rule state of a connection just opened, before any token.

        Where anonymous access is allowed it may send commands at once; where a token
        is required it has until the auth deadline to present one (a token in the
        URL is then given to :meth:`authenticate` at once).
        """
        state = ConnState(topics, last_ping=now)
        if self.command_rate:
            state.commands = TokenBucket(self.command_rate, self.command_rate)
        if self.publish_rate:
            state.publishes = TokenBucket(self.publish_rate, self.publish_rate)
        state.strikes = Strikes(self.abuse_limit, STRIKE_WINDOW)
        if self.auth.allow_anonymous:
            state.identity = ANONYMOUS
        else:
            state.auth_deadline = now + self.auth_timeout
        return state

    def user_connection(self, identity: Identity, open_for_user: int) -> Close | None:
        """A connection has just been given its identity; ``open_for_user`` other
        connections of that subject are open on this gateway.

        Past ``--max-connections-per-user`` the new connection is closed with 1013;
        the ones already open stay. The count is per gateway (each knows only its own
        connections), so a user may hold up to that many on every gateway. Anonymous
        connections have no subject and are not counted.
        """
        limit = self.max_connections_per_user
        if limit and identity.subject is not None and open_for_user >= limit:
            return TOO_MANY_FOR_USER
        return None

    @staticmethod
    def disconnect(reconnect: bool) -> Close:
        """How ``POST /api/disconnect`` closes a user's connections."""
        return DISCONNECTED_RECONNECT if reconnect else DISCONNECTED

    # --- commands -------------------------------------------------------------------

    def command(self, state: ConnState, cmd: p.Command, now: float) -> Decision:
        """What to do with one command from a connection in ``state``, at ``now``.

        The order is part of the protocol: the command rate counts every command;
        ``ping``, ``connect`` and ``refresh`` need no identity; everything else does;
        then the publish rate and permissions, or permissions and the subscription cap.
        """
        kind = type(cmd)
        bucket = state.commands
        if bucket is not None and not bucket.take(now):
            return self._limited(state, COMMANDS_LIMITED, COMMANDS_ABUSE, now)
        if kind is _PUBLISH:
            identity = state.identity
            if identity is None:
                return NOT_AUTHENTICATED
            bucket = state.publishes
            if bucket is not None and not bucket.take(now):
                return self._limited(state, PUBLISHES_LIMITED, PUBLISHES_ABUSE, now)
            why = self.policy.can_publish(identity, cmd.topic)
            return FORWARD if why is None else forbidden(why)
        if kind is _PING:
            return FORWARD
        if kind is _CONNECT:
            if cmd.token is not None:
                return self.authenticate(state, cmd.token)
            return FORWARD if state.identity is not None else TOKEN_REQUIRED
        if kind is _REFRESH:
            return self.authenticate(state, cmd.token, refresh=True)
        identity = state.identity
        if identity is None:
            return NOT_AUTHENTICATED
        if kind is _PRESENCE:
            # A count says who is watching: it is for those who may watch too.
            why = self.policy.can_subscribe(identity, cmd.topic)
            return FORWARD if why is None else forbidden(why)
        if kind is _SUBSCRIBE:
            why = self.policy.can_subscribe(identity, cmd.topic)
            if why is not None:
                return forbidden(why)
            topics = state.topics
            if len(topics) >= self.max_subscriptions and cmd.topic not in topics:
                return self.too_many_subscriptions
        return FORWARD

    def _limited(self, state: ConnState, answer: Answer, abuse: Close, now: float) -> Answer | Close:
        """A rate limit refused a command: ``rate_limited``, or 4029 once it keeps happening."""
        strikes = state.strikes
        return abuse if strikes is not None and strikes.hit(now) else answer

    def authenticate(self, state: ConnState, token: str, refresh: bool = False) -> Authenticated | Close:
        """Verify a token (from the URL, ``connect`` or ``refresh``) for this connection.

        A connection's subject is set once: a later token must be for the same
        subject. A failure closes with 4001 after an ``unauthorized`` answer. A token
        that grants less than the one before returns the subscriptions it no longer
        allows (:meth:`Policy.revoked`).
        """
        try:
            identity = self.auth.verify(token)
            before = state.subject
            if before is not None and identity.subject != before:
                raise AuthError("a connection's subject cannot change: the token is for another subject")
        except AuthError as exc:
            answer = Answer(ErrorCode.UNAUTHORIZED, str(exc))
            return Close(CloseCode.UNAUTHORIZED, "unauthorized", "unauthorized", _AUTH_FAILED[refresh], answer)
        had_identity = state.identity is not None
        state.identity, state.auth_deadline = identity, None
        revoked: Iterable[str] = ()
        if had_identity and state.topics:
            revoked = self.policy.revoked(identity, list(state.topics))
        return Authenticated(identity, tuple(revoked))

    # --- back-pressure --------------------------------------------------------------

    def room(self, shard: str, backlog: int) -> Wait | None:
        """A publisher to ``shard``, whose link has ``backlog`` frames queued: wait, or go on.

        Frames for a shard wait in the hub until its link takes them; past the limit
        the publisher stops (a WebSocket is not read, so TCP pushes back; an HTTP
        batch holds its next item) instead of piling more on.
        """
        return Wait(shard) if backlog > self.backlog_limit else None

    # --- timers, swept --------------------------------------------------------------

    def sweep(self, state: ConnState, now: float, wall: float, last_rx: float, receiving: bool) -> Close | SendPing | None:
        """Every timing rule of one connection, in order, at ``now`` (``wall``: Unix time).

        ``last_rx`` is when anything last arrived from the peer; ``receiving``
        whether a message is arriving now, unfinished. Returns the close that is due,
        :data:`SEND_PING` if a ping is, else ``None``.
        """
        if state.auth_deadline is not None and now > state.auth_deadline:
            return AUTH_TIMEOUT
        identity = state.identity
        expires = identity.expires if identity is not None else None
        if expires is not None and wall > expires:
            return TOKEN_EXPIRED
        if receiving:
            # Every fragment of a message must arrive within --message-timeout of the
            # first; pongs in between do not count (they keep only the heartbeat alive).
            if state.partial_since is None:
                state.partial_since = now
            elif now - state.partial_since > self.message_timeout:
                return MESSAGE_TIMEOUT
        else:
            state.partial_since = None
        return self.heartbeat(state, last_rx, now)

    def heartbeat(self, state: ConnState, last_rx: float, now: float) -> Close | SendPing | None:
        """Ping every ``ping_interval``; close if nothing arrives within ``ping_timeout`` of a ping."""
        sent = state.ping_sent_at
        outstanding = sent is not None and last_rx < sent
        if outstanding and now - sent > self.ping_timeout:  # type: ignore[operator]
            return HEARTBEAT_TIMEOUT
        if not outstanding and now - state.last_ping >= self.ping_interval:
            state.last_ping = state.ping_sent_at = now
            return SEND_PING
        return None

    # --- the HTTP publish API --------------------------------------------------------

    def api_body(self, size: int) -> Answer | None:
        """An HTTP publish request's body of ``size`` bytes: refused past ``--max-frame`` × 16."""
        return API_BODY_TOO_LARGE if size > self.max_frame * API_BODY_FACTOR else None

    def api_publication(self, item: object, id: int, now: float) -> p.Publish | Answer:
        """One item of an HTTP publish request, as a publication (with ``id``) or its refusal.

        The item is held to a WebSocket publish's rules: topic, ``idem`` and payload
        size as a frame would be, then the permissions of the ``api`` role.
        """
        try:
            if not isinstance(item, dict) or "payload" not in item:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "each publication needs topic and payload")
            topic = p.check_topic(item.get("topic"))
            idem = p.check_idem(item.get("idem"))
            # Over a WebSocket, a frame past --max-frame never arrives (1009).
            if len(orjson.dumps(item["payload"])) > self.max_frame:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"payload larger than {self.max_frame} bytes")
        except ProtocolError as exc:
            return Answer(ErrorCode(exc.code), exc.message)
        except TypeError as exc:
            return Answer(ErrorCode.BAD_REQUEST, str(exc))
        cmd = p.Publish(topic, item["payload"], id, idem)
        decision = self.command(self.api_state, cmd, now)
        return cmd if decision is FORWARD else decision  # type: ignore[return-value]
