"""The client side of the protocol as one sans-I/O state machine (*pure*).

Every fanroute client follows the same recovery rules: track each subscription's
``seq`` (drop duplicates, repair gaps, say where continuity broke), resubscribe with
``since`` after a reconnect, keep a dead-connection deadline, back off between
attempts and obey the close codes. They used to be written three times — in the trio
SDK (``fanroute.client``), in the benchmark's light client (``fanroute.bench.reconnect``)
and in the browser client (``gateway/static/fanroute.js``) — and had drifted. They are
written once here, and ``fanroute.js`` carries a line-for-line JavaScript twin
(``ClientCore`` there); ``tests/data/client_cases.json`` drives both with the same
cases.

The machine does no I/O, reads no clock and starts no timer, in the manner of h11 and
wsproto. The host (a trio task, an epoll loop, a browser) owns the socket and the
clock and reports what happened by calling one method per event; each returns the
actions to carry out, in order:

=======================================  =================================================
event (method)                           typical actions
=======================================  =================================================
``start(now)`` / ``connect(now)``        :class:`Connect` — open a socket to ``url`` (or
                                         first :class:`FetchToken`, with ``fetch_token``)
``give_token(token, now, ttl)``          :class:`Connect`, or :class:`Send` (``refresh``)
``token_failed(now)``                    :class:`ReconnectAt`; nothing during a refresh
``opened(now)``                          :class:`Send` — the ``connect`` frame (and, when
                                         ``eager``, the subscribes)
``received(frame, now)``                 :class:`Ready`, :class:`Send`, :data:`DELIVER`,
                                         :class:`Subscribed`, :class:`Unrecovered`,
                                         :class:`SubscribeError`, :class:`Answer`,
                                         :class:`Presence`, :class:`Refreshed`, :class:`Drop`
``message(topic, seq)`` + ``heard(now)``  the allocation-free path for message frames
``closed(code, now)``                    :class:`ReconnectAt` or :class:`Stop`    
``tick(now)``                            :data:`PING`, :class:`Drop`, :class:`Send` (a
                                         subscribe retried), :class:`FetchToken` (refresh)
``subscribe(topic, last=, presence=)``   :class:`Send` when a connection is up
``unsubscribe(topic)``
``publish(topic, payload, now, idem=)``  the held :class:`Outgoing` and its :class:`Send`
                                         (when a connection is up); later
                                         :class:`Published`, :class:`PublishRetry`,
                                         :class:`PublishFailed` from ``received``,
                                         ``tick`` and ``closed``
``abandon(publication)``                 :class:`PublishFailed` (the host's deadline)
=======================================  =================================================

``now`` is any monotonic clock in seconds; only differences matter. Frames are
decoded objects (dicts); the host encodes them. The host must call :meth:`tick` at
least every :attr:`ClientCore.check_period` while a connection is being opened or is
open, and :meth:`connect` once a :class:`ReconnectAt` is due.

The rules, each in one place:

* **Sequence** (:meth:`ClientCore.message`): a message whose ``seq`` is the next one
  is delivered; one at or below the last is a duplicate and dropped; one beyond is a
  gap, repaired at once by ``unsubscribe`` and ``subscribe`` with ``since``. A gap
  announced by ``skipped`` (conflation) is not a fault. While a subscribe is in flight,
  messages are ignored: its answer says where the stream stands, and what was missed
  follows it.
* **Latest messages** (``last``): a subscription that asked for ``last: N`` asks for it
  again on every resubscribe, together with ``since``; the gateway applies it only
  when recovery fails, so a ticker is never left blank after a reconnect. After a
  ``subscribed`` answer to which ``last`` applies (a first subscribe, or
  ``recovered:false``) the stream stands at ``seq - N`` (never below what it already
  had in the same epoch), and the first message may start higher — the history held
  fewer than N: on a first subscribe that is just where the stream begins; on a
  resubscribe the messages in between are lost, and an :class:`Unrecovered` marker
  says exactly which. So every ``seq`` is delivered or inside exactly one marker.
* **Presence** (``presence=True``): the subscribe asks for pushed counts, each an
  action :class:`Presence`; the answer to the host's own ``presence`` command is an
  :class:`Answer`.
* **Tokens** (``fetch_token``): the host holds a token source (a callback). Every
  connection attempt first asks it for a token (:class:`FetchToken` ``"connect"``), so
  a reconnect never presents a stale one. Given a token's lifetime (``ttl``, from its
  ``exp``: :func:`token_ttl`), the core asks again at :func:`refresh_delay` and sends
  ``refresh`` on the open connection, so a connection outlives any one token. A 4001
  close whose reason is :data:`~fanroute.codes.TOKEN_EXPIRED_REASON` (the token ran
  out first: a slow source, a paused tab) reconnects with a new token; any other 4001
  means a token was refused, and stops the client, as does a source that answers
  ``None``. A source that fails (raises) is asked again after a backoff delay.
* **Answers to subscribe** (``_on_subscribed``): ``recovered:true`` after ``since``
  continues from the last seq seen; ``recovered:false`` after ``since`` is an
  :class:`Unrecovered` marker and a jump to the reply's position; an unsolicited
  ``subscribed`` (no ``id``: the topic's stream restarted, usually with a new epoch) is
  the same, unless our own subscribe is in flight, whose answer is on its way.
* **Errors answering a subscribe** (``_refused``), first or resubscribe — the topic is
  never left waiting for an answer that will not come:

  - *transient* codes (``unavailable``, ``rate_limited``, ``internal``: the shard is away,
    a limit will pass) are retried on the same connection after a full-jitter delay on
    the client's backoff caps, growing per topic until a subscribe succeeds, and again
    at every reconnect; ``since`` is kept, so if history still covers the gap nothing
    is lost. Each failure is reported with its ``retry_at``; the subscribe goes out
    on the first :meth:`~ClientCore.tick` at or after it.
  - any other code (``forbidden``, ``unauthorized``, ``bad_request``, ``too_large``, …)
    cannot succeed by repetition: the subscription ends, reported with
    ``retry_at=None``, and is not resubscribed. So does a subscription the server
    withdraws (an unsolicited ``unsubscribed``), with the code ``unsubscribed``.
* **Publications** (:meth:`ClientCore.publish`): every publication the host wants
  acknowledged carries an ``idem`` key — the caller's, or one the core makes:
  ``<prefix>-<n>``, a random prefix of 16 URL-safe characters (96 bits) per client
  and a counter, so that no two clients, nor one client started again, share a key.
  The core holds it until it is answered for good, and sends it again, with the same
  key and a new ``id``, whenever its outcome is open:

  - on every new connection (one lost with the publication in flight, or before it
    went out at all), right after the resubscribes;
  - after an answer in :data:`PUBLISH_RETRY_ERRORS` — ``unavailable`` (not applied),
    ``outcome_unknown`` (maybe applied), ``internal`` — after a full-jitter delay on
    the backoff caps, growing per publication (:class:`PublishRetry`).

  The gateway answers a retry of a publication it applied with the original ``seq``
  (while that one is still in the topic's history), so what the host gets
  (:class:`Published`) is applied exactly once. The budget: at most
  ``publish_attempts`` sends, and no retry after the publication's deadline
  (``publish_timeout`` after :meth:`~ClientCore.publish`, or the host's ``timeout``);
  past it the publication fails (:class:`PublishFailed`) with the last code that left
  its outcome open — ``disconnected`` when the connection was lost with it in flight.
  The host keeps its own timer for the deadline and calls :meth:`~ClientCore.abandon`
  (``timeout`` when nothing was learnt). Any other code (``bad_request``,
  ``forbidden``, ``too_large``, ``rate_limited``: the caller must change something or
  slow down) fails it at once. A client that stops fails what it holds: ``closed``
  for what never went out, the open code for the rest. Retries may put a publication
  after later ones of the same client; a host that needs its own order waits for each.
* **Close codes** (:func:`reconnect_delay`): the rule of :func:`fanroute.codes.reconnect_rule`
  — ``never`` (4001 except an expired token with a token source, 4003, 1008) stops, ``prompt`` (1012) returns within
  ``restart_window`` with jitter, ``longest`` (4029) waits between ``max_delay`` and
  1.5 × ``max_delay``, anything else (a lost connection too) backs off.
* **Backoff**: :class:`fanroute.backoff.Backoff`; the attempt count resets only when the
  connection that ended had been up (since its ``connected`` frame) for
  ``backoff_reset`` seconds.
* **Heartbeat** (:meth:`ClientCore.tick`): the connection is dead when nothing was
  received for ``ping_interval + ping_timeout`` — the client's settings where given,
  else the ``connected`` frame's values, else 25 + 8 s — counted from the ``connected``
  frame. An application ``ping`` goes out every ``ping_interval`` (``app_ping``). Time
  the client itself was paused (a tick more than ``ping_interval`` late: a background
  browser tab whose timers are throttled, a stopped process) is not counted as the
  gateway's silence unless a ping of ours was already unanswered: the client pings
  and gives the gateway ``ping_timeout`` to answer.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from fanroute.backoff import Backoff
from fanroute.codes import TOKEN_EXPIRED_REASON, CloseCode, ErrorCode, Reconnect, reconnect_rule
from fanroute.protocol import MAX_IDEM_LENGTH

U = TypeVar("U")

DEFAULT_PING_INTERVAL: Final = 25.0  # what a gateway announces unless configured otherwise
DEFAULT_PING_TIMEOUT: Final = 8.0
RESTART_WINDOW: Final = 1.0  # 1012: come back within this many seconds
REFRESH_LEAD: Final = 30.0  # a token is refreshed at most this long before its exp

#: Errors answering a subscribe that may pass by themselves: the subscribe is retried.
TRANSIENT_ERRORS: Final = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED, ErrorCode.INTERNAL})

#: Errors answering a publish after which it is sent again with its ``idem`` key: the
#: shard was away (not applied), the outcome is unknown, or the gateway failed. A
#: retry is applied at most once, so each is safe. ``rate_limited`` is not among them:
#: it is the publisher's own rate, and the caller is told at once.
PUBLISH_RETRY_ERRORS: Final = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.OUTCOME_UNKNOWN, ErrorCode.INTERNAL})

# Codes of a PublishFailed that come from the client, not from the gateway.
DISCONNECTED: Final = "disconnected"  # the connection was lost with it in flight: maybe applied
TIMEOUT: Final = "timeout"  # the deadline passed with nothing learnt (not sent, or no answer)
CLOSED: Final = "closed"  # the client stopped before it was sent: not applied

IDEM_PREFIX_LENGTH: Final = 40  # longest idem_prefix: room for "-" and a counter within 64

#: Close codes after which a client stops reconnecting (derived from fanroute.codes).
TERMINAL_CLOSE_CODES: Final = frozenset(c for c in CloseCode if c.reconnect is Reconnect.NEVER)

# Phases of the connection.
IDLE: Final = "idle"  # no socket: not started, or waiting for a ReconnectAt to come due
CONNECTING: Final = "connecting"  # an attempt is under way (TCP, WebSocket handshake)
OPEN: Final = "open"  # the WebSocket is up, `connect` sent, no `connected` yet
READY: Final = "ready"  # `connected` received: subscribed topics are live
STOPPED: Final = "stopped"  # a terminal close code, or the application stopped it

# States of one subscription (Stream.state); WAITING, PENDING and RETRY are also those
# of a held publication (Outgoing.state).
WAITING: Final = "waiting"  # to be subscribed (sent) on the next ready connection
PENDING: Final = "pending"  # a subscribe (publish) is in flight
ACTIVE: Final = "active"  # confirmed: messages are tracked
RETRY: Final = "retry"  # refused for a transient reason: sent again at retry_at

_CONNECT_ID: Final = 0  # the id of the `connect` frame; commands count from 1

# What a FetchToken is for.
FOR_CONNECT: Final = "connect"  # the next connection attempt waits for it
FOR_REFRESH: Final = "refresh"  # the open connection's token runs out soon


# --- actions (the machine's output) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    """Where a stream stands: the last ``seq`` seen in ``epoch`` (a ``since`` cursor)."""

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Connect(Generic[U]):
    """Open a socket to ``url`` (one of the URLs the core was given, in rotation)."""

    url: U


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``frame`` (a decoded command) on the current connection."""

    frame: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Ping:
    """Send an application ``ping`` (``{"type":"ping","ts":<ms>}``, ``ts`` the host's)."""


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand the message just given to the subscription: it is the next in order.

    It carries nothing: the host holds the frame (and its payload) it passed in, so
    the hot path allocates nothing (:data:`DELIVERED` is one shared tuple)."""


@dataclass(frozen=True, slots=True)
class Message:
    """A delivered message, as the SDK hands it to the application."""

    topic: str
    payload: Any
    seq: int


@dataclass(frozen=True, slots=True)
class Unrecovered:
    """Messages before this point may be lost: the stream goes on from ``seq + 1``.

    Both an action (put it in the subscription's stream) and what the SDK yields.
    ``previous`` is where the subscription stood before (None if nowhere)."""

    topic: str
    epoch: str
    seq: int
    previous: Position | None = None


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The gateway confirmed a subscribe; ``resumed`` when it carried ``since``."""

    topic: str
    epoch: str
    seq: int
    recovered: bool
    resumed: bool


@dataclass(frozen=True, slots=True)
class SubscribeError:
    """A subscribe was refused (or the server withdrew the subscription).

    ``retry_at`` is when it will be sent again (transient codes); None means the
    subscription ended and the core forgot it."""

    topic: str
    code: str
    message: str
    retry_at: float | None


@dataclass(frozen=True, slots=True)
class Presence:
    """A pushed count of ``topic``'s subscribers across the cluster (``presence=True``)."""

    topic: str
    subscribers: int


@dataclass(frozen=True, slots=True)
class Published:
    """The gateway acknowledged ``publication`` with ``seq`` (for a retry of one it had
    applied: the original's). The core no longer holds it."""

    publication: Outgoing
    seq: Any


@dataclass(frozen=True, slots=True)
class PublishRetry:
    """``publication`` was answered ``code`` (one of :data:`PUBLISH_RETRY_ERRORS`): it
    goes out again, with its key, on the first :meth:`ClientCore.tick` at or after
    ``retry_at`` (or on the next connection)."""

    publication: Outgoing
    code: str
    message: str
    retry_at: float


@dataclass(frozen=True, slots=True)
class PublishFailed:
    """``publication`` will not be acknowledged: refused (the gateway's ``code``), or its
    budget ran out (the last open code, :data:`DISCONNECTED` or :data:`TIMEOUT`), or the
    client stopped (:data:`CLOSED`). The core no longer holds it."""

    publication: Outgoing
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class FetchToken:
    """Ask the token source for a token, then call :meth:`ClientCore.give_token` (or
    :meth:`ClientCore.token_failed`). ``reason`` is :data:`FOR_CONNECT` or :data:`FOR_REFRESH`."""

    reason: str


@dataclass(frozen=True, slots=True)
class Refreshed:
    """The gateway took the new token (``expires``: its exp, as the gateway sent it)."""

    expires: float | None


@dataclass(frozen=True, slots=True)
class Ready:
    """``connected`` arrived: the connection is up (``session`` from the gateway)."""

    session: str | None


@dataclass(frozen=True, slots=True)
class Answer:
    """A frame for the host: the answer to a command it sent itself (``id``, e.g. a
    publish), or an ``error`` tied to no command (``id`` None)."""

    id: int | None
    frame: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Drop:
    """Abandon the connection from this side (close it with ``code`` if it can take
    one), then report :meth:`ClientCore.closed` with that code."""

    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class ReconnectAt:
    """Call :meth:`ClientCore.connect` at ``at`` (``delay`` after the close)."""

    at: float
    delay: float
    code: int | None


@dataclass(frozen=True, slots=True)
class Stop:
    """Do not reconnect: the close ``code`` says it cannot help."""

    code: int | None
    reason: str


Action = (
    Connect | Send | Ping | Deliver | Unrecovered | Subscribed | SubscribeError | Ready | Answer | Drop | ReconnectAt
    | Stop | Presence | FetchToken | Refreshed | Published | PublishRetry | PublishFailed
)

NOTHING: Final[tuple[()]] = ()
PING: Final = Ping()
DELIVER: Final = Deliver()
#: What :meth:`ClientCore.message` returns for an in-order message (compare with ``is``).
DELIVERED: Final = (DELIVER,)


# --- settings and per-subscription state -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """What a client may choose; the rest comes from the gateway or the protocol."""

    min_delay: float = 0.05  # backoff: cap of the first draw
    max_delay: float = 10.0  # backoff: largest cap; 4029 waits 1 to 1.5 times this
    backoff_reset: float = 5.0  # a connection up this long resets the attempt count
    ping_interval: float | None = None  # None: the gateway's (`connected`), else 25
    ping_timeout: float | None = None  # None: the gateway's, else 8
    app_ping: float | None = None  # seconds between app pings; None: ping_interval; 0: none
    connect_timeout: float = 5.0  # from connect() to the `connected` frame
    restart_window: float = RESTART_WINDOW
    token: str | None = None  # sent in the `connect` frame
    # The host has a token source: ask it (FetchToken) before every attempt and
    # before the token's exp; `token` above is then only the first one's fallback.
    fetch_token: bool = False
    # Send the subscribes together with `connect`, before `connected` arrives. Only
    # for anonymous gateways (the standalone default), which accept commands at once;
    # it saves a round trip per reconnect, which a benchmark of thousands feels.
    eager: bool = False
    publish_timeout: float = 10.0  # a publication's deadline, unless publish() is given one
    publish_attempts: int = 10  # sends of one publication at most, the first included
    idem_prefix: str | None = None  # keys are "<prefix>-<n>"; None: 16 random characters


@dataclass(slots=True, eq=False)
class Stream:
    """One subscription's position and state."""

    topic: str
    last: int | None = None  # ask for the newest `last` messages (again on every resubscribe)
    presence: bool = False  # ask for pushed subscriber counts
    epoch: str | None = None  # None until the first `subscribed`
    seq: int = 0  # the last seq delivered (or the position the stream started from)
    state: str = WAITING
    request: int | None = None  # id of the subscribe in flight
    resuming: bool = False  # that subscribe carries `since`
    confirmed: bool = False  # a `subscribed` was received at least once
    retry_at: float | None = None
    tries: int = 0  # transient refusals since the last success
    duplicates: int = 0
    gaps: int = 0
    unrecovered: int = 0
    subscribers: int | None = None  # the last presence count received
    # After a `subscribed` to which `last` applied: its seq, while the first message
    # may still start above `floor` (the history held fewer than `last`).
    window: int | None = None
    floor: int = 0
    window_marks: bool = False  # a shortfall in the window is a loss (a resubscribe)

    def since(self) -> Position | None:
        """The ``since`` cursor to resubscribe with, or None before the first answer."""
        return None if self.epoch is None else Position(self.epoch, self.seq)


@dataclass(slots=True, eq=False)
class Outgoing:
    """One publication the core holds until it is acknowledged or fails."""

    topic: str
    payload: Any
    idem: str  # the same on every send
    deadline: float  # no retry at or after it
    state: str = WAITING  # WAITING (for a connection), PENDING (in flight), RETRY (at retry_at)
    request: int | None = None  # id of the send in flight
    attempts: int = 0  # sends so far
    tries: int = 0  # retryable answers so far (the backoff's attempt count)
    retry_at: float | None = None
    code: str | None = None  # what left the outcome open last (None: nothing yet)
    message: str = ""


@dataclass(slots=True)
class Stats:
    connects: int = 0
    duplicates: int = 0
    gaps: int = 0
    unrecovered: int = 0
    retries: int = 0  # publications sent again (same key)


def reconnect_delay(
    code: int | None, backoff: Backoff, rng: random.Random, restart_window: float = RESTART_WINDOW
) -> float | None:
    """Seconds to wait after a close with ``code`` before the next attempt, or None to stop.

    Every rule draws ``backoff.next_delay()`` first (so each attempt counts), then:
    ``prompt`` (1012, a draining gateway) comes back within ``restart_window``, spread
    so that a gateway's clients do not return at one instant; ``longest`` (4029, cut
    off for abuse) stays away for 1 to 1.5 × ``max_delay`` whatever the attempt count.
    """
    rule = reconnect_rule(code)
    if rule is Reconnect.NEVER:
        return None
    delay = backoff.next_delay()
    if rule is Reconnect.PROMPT:
        return min(delay, rng.uniform(0, restart_window))
    if rule is Reconnect.LONGEST:
        return rng.uniform(backoff.max_delay, 1.5 * backoff.max_delay)
    return delay


def token_ttl(token: str, wall: float) -> float | None:
    """Seconds from ``wall`` (Unix time) until the JWT ``token``'s ``exp``, or None.

    The claims are read, not verified: the client only needs to know when to ask for
    the next token; the gateway is the one that checks it."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) - wall if type(exp) in (int, float) else None


def refresh_delay(ttl: float) -> float:
    """When to refresh a token that expires in ``ttl`` seconds: a third of its life
    before then, and at most :data:`REFRESH_LEAD` before — room for a slow token
    source and for clocks that disagree by a little."""
    return max(0.0, ttl - min(ttl / 3, REFRESH_LEAD))


def _positive(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) and value > 0 else None


# --- the machine ---------------------------------------------------------------------------


class ClientCore(Generic[U]):
    """One client's connection and subscriptions: events in, actions out (see the module)."""

    def __init__(
        self, urls: Sequence[U], settings: Settings | None = None, *, rng: random.Random | None = None, first_url: int = 0
    ) -> None:
        if not urls:
            raise ValueError("a client needs at least one gateway URL")
        self.urls = list(urls)
        self.settings = s = settings or Settings()
        self.rng = rng or random.Random()
        self.backoff = Backoff(min_delay=s.min_delay, max_delay=s.max_delay, reset_after=s.backoff_reset, rng=self.rng)
        self.streams: dict[str, Stream] = {}
        self.stats = Stats()
        self.phase = IDLE
        self.url: U | None = None  # the URL of the current attempt or connection
        self.session: str | None = None
        self._next_url = first_url % len(self.urls)
        self._ids = 0
        self._requests: dict[int, Stream | None] = {}  # our own commands in flight (None: ignore the answer)
        self._attempt_at = 0.0
        self._ready_at = 0.0
        self.last_rx = 0.0
        self._last_ping = 0.0
        self._last_tick = 0.0
        self.interval = s.ping_interval or DEFAULT_PING_INTERVAL
        self.timeout = s.ping_timeout or DEFAULT_PING_TIMEOUT
        self._ping_every = 0.0
        self._due = float("inf")  # no tick needs a full look before this
        self._late = float("inf")  # a tick this long after the previous one means we were paused
        self.token: str | None = s.token  # what the next `connect` frame carries
        self._fetching: str | None = None  # a FetchToken out, and what for
        self._refresh_at: float | None = None  # when to ask for the next token
        self._refresh_id: int | None = None  # the `refresh` command in flight
        self._token_tries = 0  # failed refresh fetches in a row
        self._lead = float("inf")  # how long before its exp the token is refreshed
        prefix = s.idem_prefix if s.idem_prefix is not None else secrets.token_urlsafe(12)
        if not 0 < len(prefix) <= IDEM_PREFIX_LENGTH:
            raise ValueError(f"idem_prefix must be 1 to {IDEM_PREFIX_LENGTH} characters")
        self.idem_prefix = prefix
        self._idems = 0
        #: Publications held until answered for good, in the order they were made.
        self.publications: dict[Outgoing, None] = {}
        self._publishing: dict[int, Outgoing] = {}  # id of a publish in flight -> its publication

    # --- what the host reads ------------------------------------------------------------

    @property
    def deadline(self) -> float:
        """Silence after which the connection counts as dead: ping_interval + ping_timeout."""
        return self.interval + self.timeout

    @property
    def check_period(self) -> float:
        """How often the host should call :meth:`tick` (a quarter of the tightest timer,
        a token's refresh lead included)."""
        return max(0.01, min(self.interval, self.timeout, self.settings.connect_timeout, self._lead) / 4)

    def position(self, topic: str) -> Position | None:
        s = self.streams.get(topic)
        return None if s is None else s.since()

    def next_id(self) -> int:
        """An id for a command of the host's own (a presence query): never one the core uses."""
        self._ids += 1
        return self._ids

    def next_idem(self) -> str:
        """A fresh ``idem`` key: ``<prefix>-<n>``."""
        self._idems += 1
        return f"{self.idem_prefix}-{self._idems}"

    # --- the application's side ------------------------------------------------------------

    def subscribe(self, topic: str, last: int | None = None, presence: bool = False) -> Sequence[Action]:
        """Track ``topic`` from now on; sent at once when a connection is ready.

        ``last``: begin with the topic's newest ``last`` messages (and get them again
        whenever a reconnect cannot recover); ``presence``: pushed subscriber counts."""
        if topic in self.streams:
            return NOTHING
        if last is not None and (type(last) is not int or last < 1):
            raise ValueError("last must be an integer of at least 1")
        s = self.streams[topic] = Stream(topic, last, bool(presence))
        return [self._subscribe(s)] if self._can_send() else NOTHING

    def unsubscribe(self, topic: str) -> Sequence[Action]:
        """Forget ``topic``. The ``unsubscribed`` reply comes back as an :class:`Answer`."""
        if self.streams.pop(topic, None) is None or not self._can_send():
            return NOTHING
        return [Send({"type": "unsubscribe", "topic": topic, "id": self.next_id()})]

    def publish(
        self, topic: str, payload: Any, now: float, idem: str | None = None, timeout: float | None = None
    ) -> tuple[Outgoing, Sequence[Action]]:
        """Hold a publication until it is acknowledged; sent at once when a connection is
        ready. ``idem``: the caller's key (1 to 64 characters), else a fresh one;
        ``timeout``: seconds until its deadline (``publish_timeout``). Returns the held
        :class:`Outgoing` (the host's handle: the actions about it carry it) and the actions."""
        if idem is None:
            idem = self.next_idem()
        elif type(idem) is not str or not 0 < len(idem) <= MAX_IDEM_LENGTH:
            raise ValueError(f"idem must be a string of 1 to {MAX_IDEM_LENGTH} characters")
        pub = Outgoing(topic, payload, idem, now + (self.settings.publish_timeout if timeout is None else timeout))
        self.publications[pub] = None
        return pub, ([self._send_publication(pub, now)] if self._can_send() else NOTHING)

    def abandon(self, publication: Outgoing) -> Sequence[Action]:
        """The host gives up on ``publication`` (its deadline passed, or its caller went
        away): it is not sent again. A :class:`PublishFailed` with what was learnt last
        (:data:`TIMEOUT` if nothing), or nothing if it was already settled."""
        if publication not in self.publications:
            return NOTHING
        return [self._fail_publication(publication, publication.code or TIMEOUT, publication.message or "no answer in time")]

    def start(self, now: float) -> Sequence[Action]:
        """Begin (or, after :meth:`stop` or a terminal code, begin again) with a fresh backoff."""
        if self.phase not in (IDLE, STOPPED):
            return NOTHING
        self.backoff.attempt = 0
        self.phase = IDLE
        return self.connect(now)

    def stop(self) -> Sequence[Action]:
        """The application closes the client: no more reconnecting. Positions are kept,
        so a later :meth:`start` resumes every subscription with ``since``; the
        publications held fail (:class:`PublishFailed`)."""
        self._lose_connection()
        self.phase = STOPPED
        return self._fail_publications("the client was closed")

    # --- the connection ---------------------------------------------------------------------

    def connect(self, now: float) -> Sequence[Action]:
        """Start an attempt now, on the next URL in rotation."""
        if self.phase is not IDLE:
            return NOTHING
        self.phase = CONNECTING
        self._attempt_at = self._last_tick = now
        self._due = now + self.settings.connect_timeout
        if self.settings.fetch_token:
            self._fetching = FOR_CONNECT  # the connect timeout covers the token source too
            return [FetchToken(FOR_CONNECT)]
        return [self._connect_url()]

    def _connect_url(self) -> Connect[U]:
        self.url = self.urls[self._next_url]
        self._next_url = (self._next_url + 1) % len(self.urls)
        return Connect(self.url)

    def give_token(self, token: str | None, now: float, ttl: float | None = None) -> Sequence[Action]:
        """The token source answered a :class:`FetchToken`: ``token``, which expires in
        ``ttl`` seconds (None: unknown, never refreshed), or None — no token can be had
        (signed out): the client stops."""
        reason, self._fetching = self._fetching, None
        if reason is None:
            return NOTHING  # stale: the attempt timed out or the client stopped meanwhile
        if not token:
            if reason == FOR_REFRESH and self.phase is READY:
                return [Drop(int(CloseCode.UNAUTHORIZED), "the token source gave no token")]
            self._lose_connection()
            self.phase = STOPPED
            why = "the token source gave no token"
            return [*self._fail_publications(why), Stop(int(CloseCode.UNAUTHORIZED), why)]
        self.token = token
        self._token_tries = 0
        self._refresh_at = None if ttl is None else now + refresh_delay(ttl)
        if ttl is not None:
            self._lead = max(ttl - refresh_delay(ttl), 0.01)
        if reason == FOR_CONNECT:
            return [self._connect_url()] if self.phase is CONNECTING else NOTHING
        if self.phase is not READY:
            return NOTHING  # the connection went meanwhile; the next attempt fetches anew
        self._reschedule()
        self._refresh_id = self.next_id()
        return [Send({"type": "refresh", "token": token, "id": self._refresh_id})]

    def token_failed(self, now: float, reason: str = "") -> Sequence[Action]:
        """The token source failed (raised): try again after a backoff delay — the next
        attempt for a connection, or the refresh, while the current token lasts."""
        kind, self._fetching = self._fetching, None
        if kind == FOR_CONNECT and self.phase is CONNECTING:
            return self.closed(None, now, reason or "the token source failed")
        if kind == FOR_REFRESH and self.phase is READY:
            self._retry_refresh(now)
        return NOTHING

    def _retry_refresh(self, now: float) -> None:
        cap = self.backoff.cap(self._token_tries)
        self._token_tries += 1
        self._refresh_at = now + max(self.settings.min_delay, self.rng.uniform(0, cap))
        self._reschedule()

    def opened(self, now: float) -> Sequence[Action]:
        """The WebSocket is open: say ``connect`` (and subscribe, when eager)."""
        if self.phase is not CONNECTING:
            return NOTHING
        self.phase = OPEN
        hello: dict[str, Any] = {"type": "connect", "id": _CONNECT_ID}
        if self.token is not None:
            hello["token"] = self.token
        out: list[Action] = [Send(hello)]
        if self.settings.eager:
            out += self._subscribe_all()
            out += self._send_publications(now)
        return out

    def closed(self, code: int | None, now: float, reason: str = "") -> Sequence[Action]:
        """The connection (or the attempt) ended with close ``code`` (None: no close frame)."""
        if self.phase in (IDLE, STOPPED):
            return NOTHING
        if self.phase is READY:
            self.backoff.connection_lasted(now - self._ready_at)
        self._lose_connection()
        if code == CloseCode.UNAUTHORIZED and reason == TOKEN_EXPIRED_REASON and self.settings.fetch_token:
            delay: float | None = self.backoff.next_delay()  # a new token will do: back soon
        else:
            delay = reconnect_delay(code, self.backoff, self.rng, self.settings.restart_window)
        if delay is None:
            self.phase = STOPPED
            return [*self._fail_publications(reason or f"closed with {code}"), Stop(code, reason)]
        self.phase = IDLE
        return [ReconnectAt(now + delay, delay, code)]

    def heard(self, now: float) -> None:
        """Something arrived on the connection (call once per read, frames or not)."""
        self.last_rx = now

    def tick(self, now: float) -> Sequence[Action]:
        """Timers: the connect timeout, the heartbeat deadline, pings, subscribe retries."""
        previous, self._last_tick = self._last_tick, now
        if now < self._due and now - previous <= self._late:
            return NOTHING  # the common case, kept cheap: thousands of clients tick per loop
        return self._timers(now, now - previous > self._late)

    # --- frames from the gateway -----------------------------------------------------------

    def message(self, topic: str, seq: Any, skipped: Any = 0) -> Sequence[Action]:
        """A message frame (the hot path: no allocation unless there is a gap)."""
        s = self.streams.get(topic)
        if s is None or s.state is not ACTIVE or type(seq) is not int:
            return NOTHING  # not ours, or not confirmed yet: the `subscribed` answer sets where we stand
        last = s.seq
        if seq <= last:
            s.duplicates += 1
            self.stats.duplicates += 1
            return NOTHING
        if seq != last + 1 and (type(skipped) is not int or seq - skipped > last + 1):
            if s.window is not None and last == s.floor and seq <= s.window + 1:
                return self._window_start(s, seq)
            # A gap nobody announced: ask again from the last message we have.
            s.gaps += 1
            self.stats.gaps += 1
            return [Send({"type": "unsubscribe", "topic": topic, "id": self._own(None)}), self._subscribe(s)]
        s.seq = seq
        return DELIVERED

    def received(self, frame: Mapping[str, Any], now: float) -> Sequence[Action]:
        """Any decoded frame from the gateway."""
        self.last_rx = now
        kind = frame.get("type")
        if kind is None or kind == "message":
            topic = frame.get("topic")
            if type(topic) is not str:
                return NOTHING
            return self.message(topic, frame.get("seq"), frame.get("skipped", 0))
        if kind == "pong":
            return NOTHING
        id = frame.get("id")
        if type(id) is not int:
            id = None
        if kind == "connected":
            return self._on_connected(frame, now)
        if kind == "subscribed":
            return self._on_subscribed(frame, id)
        if kind == "unsubscribed":
            return self._on_unsubscribed(frame, id)
        if kind == "published" and id is not None and id in self._publishing:
            return self._on_published(frame, id)
        if kind == "error":
            return self._on_error(frame, id, now)
        if kind == "presence" and id is None:
            return self._on_presence(frame)
        if kind == "refreshed" and id is not None and id == self._refresh_id:
            self._refresh_id = None
            expires = frame.get("expires")
            return [Refreshed(float(expires) if type(expires) in (int, float) else None)]
        return [Answer(id, frame)] if id is not None else NOTHING

    # --- inside ---------------------------------------------------------------------------------

    def _can_send(self) -> bool:
        return self.phase is READY or (self.phase is OPEN and self.settings.eager)

    def _own(self, stream: Stream | None) -> int:
        id = self.next_id()
        self._requests[id] = stream
        return id

    def _subscribe(self, s: Stream) -> Send:
        s.request = id = self._own(s)
        s.state = PENDING
        s.retry_at = None
        s.window = None
        frame: dict[str, Any] = {"type": "subscribe", "topic": s.topic, "id": id}
        s.resuming = s.epoch is not None
        if s.resuming:
            frame["since"] = {"epoch": s.epoch, "seq": s.seq}
        if s.last is not None:
            frame["last"] = s.last  # with since: applies only if recovery fails
        if s.presence:
            frame["presence"] = True
        return Send(frame)

    def _subscribe_all(self) -> list[Action]:
        return [self._subscribe(s) for s in self.streams.values() if s.state is WAITING]

    def _lose_connection(self) -> None:
        """Whatever was in flight is asked again on the next connection."""
        self._requests.clear()
        for s in self.streams.values():
            s.state, s.request, s.resuming, s.retry_at = WAITING, None, False, None
        self._publishing.clear()
        for pub in self.publications:
            if pub.state is PENDING:  # it may have been applied: the retry says
                pub.code, pub.message = DISCONNECTED, "the connection was lost before the answer; it may have been applied"
            pub.state, pub.request, pub.retry_at = WAITING, None, None
        self.session = None
        self._due = self._late = float("inf")
        self._fetching = self._refresh_at = self._refresh_id = None

    def _on_connected(self, frame: Mapping[str, Any], now: float) -> Sequence[Action]:
        if self.phase is not OPEN:
            return NOTHING
        s = self.settings
        self.phase = READY
        self.session = frame.get("session") if isinstance(frame.get("session"), str) else None
        self.interval = s.ping_interval or _positive(frame.get("ping_interval")) or DEFAULT_PING_INTERVAL
        self.timeout = s.ping_timeout or _positive(frame.get("ping_timeout")) or DEFAULT_PING_TIMEOUT
        self._ping_every = self.interval if s.app_ping is None else s.app_ping
        self._ready_at = self.last_rx = self._last_ping = self._last_tick = now
        self._late = self.interval
        self.stats.connects += 1
        out: list[Action] = [Ready(self.session)]
        if not s.eager:
            out += self._subscribe_all()
            out += self._send_publications(now)
        self._reschedule()
        return out

    def _on_subscribed(self, frame: Mapping[str, Any], id: int | None) -> Sequence[Action]:
        epoch, seq, recovered = frame.get("epoch"), frame.get("seq"), frame.get("recovered") is True
        if type(epoch) is not str or type(seq) is not int:
            return NOTHING
        if id is None:
            # Unsolicited: the stream restarted (its shard lost every copy). While our
            # own subscribe is in flight, its answer will say where the stream stands.
            s = self.streams.get(frame.get("topic"))  # type: ignore[arg-type]
            if s is None or s.state is not ACTIVE:
                return NOTHING
            return [self._unrecovered(s, epoch, seq)]
        s = self._requests.pop(id, None)
        if s is None or self.streams.get(s.topic) is not s or s.request != id:
            return NOTHING  # stale: the topic was unsubscribed, or asked again since
        resumed = s.resuming
        s.state, s.request, s.resuming, s.tries, s.confirmed = ACTIVE, None, False, 0, True
        out: list[Action] = [Subscribed(s.topic, epoch, seq, recovered, resumed)]
        if resumed and recovered:
            s.epoch = epoch  # the missed messages follow, from s.seq + 1
        elif s.last is not None:
            self._open_window(s, epoch, seq, resumed, out)
        elif resumed:
            out.append(self._unrecovered(s, epoch, seq))
        else:
            s.epoch, s.seq = epoch, seq
        return out

    def _open_window(self, s: Stream, epoch: str, seq: int, resumed: bool, out: list[Action]) -> None:
        """``last`` applies: the newest messages up to ``seq`` follow, oldest first."""
        assert s.last is not None
        floor = max(seq - s.last, 0)
        if resumed and s.epoch == epoch:
            floor = min(max(floor, s.seq), seq)  # what we already have is not asked again
        if not resumed:
            s.epoch, s.seq = epoch, floor
        elif s.epoch != epoch or floor > s.seq:
            out.append(self._unrecovered(s, epoch, floor))
        s.window, s.floor, s.window_marks = seq, floor, resumed

    def _window_start(self, s: Stream, seq: int) -> Sequence[Action]:
        """The first message after a ``last`` answer starts above the floor: the
        history held fewer messages. On a resubscribe the ones in between are lost."""
        s.window = None
        assert s.epoch is not None
        if not s.window_marks:
            s.seq = seq
            return DELIVERED
        lost = self._unrecovered(s, s.epoch, seq - 1)
        s.seq = seq
        return [lost, DELIVER]

    def _on_presence(self, frame: Mapping[str, Any]) -> Sequence[Action]:
        count = frame.get("subscribers")
        s = self.streams.get(frame.get("topic"))  # type: ignore[arg-type]
        if s is None or type(count) is not int or count < 0:
            return NOTHING
        s.subscribers = count
        return [Presence(s.topic, count)]

    def _unrecovered(self, s: Stream, epoch: str, seq: int) -> Unrecovered:
        previous = s.since()
        s.epoch, s.seq = epoch, seq
        s.unrecovered += 1
        self.stats.unrecovered += 1
        return Unrecovered(s.topic, epoch, seq, previous)

    def _on_unsubscribed(self, frame: Mapping[str, Any], id: int | None) -> Sequence[Action]:
        if id is not None:
            if id in self._requests:
                del self._requests[id]  # the first half of a gap repair
                return NOTHING
            return [Answer(id, frame)]
        # Unsolicited: the server withdrew the subscription (a refresh that no longer
        # allows it, POST /api/unsubscribe). Resubscribing would be refused again.
        topic = frame.get("topic")
        s = self.streams.get(topic)  # type: ignore[arg-type]
        if s is None:
            return NOTHING
        del self.streams[s.topic]
        return [SubscribeError(s.topic, "unsubscribed", "the server ended the subscription", None)]

    def _on_error(self, frame: Mapping[str, Any], id: int | None, now: float) -> Sequence[Action]:
        code = str(frame.get("code", "error"))
        message = str(frame.get("message", ""))
        if id == _CONNECT_ID and self.phase is OPEN:
            if code == ErrorCode.UNAUTHORIZED:
                return [Drop(int(CloseCode.UNAUTHORIZED), message)]  # the gateway closes with 4001 too
            return [Answer(id, frame)]
        if id is not None and id == self._refresh_id:
            self._refresh_id = None
            if code == ErrorCode.UNAUTHORIZED:
                # The new token was refused: that is final (the gateway closes with 4001).
                return [Drop(int(CloseCode.UNAUTHORIZED), f"token refused: {message}")]
            self._retry_refresh(now)  # a limit, say: ask again a little later
            return NOTHING
        if id is not None and id in self._publishing:
            return self._publish_refused(self._publishing.pop(id), id, code, message, now)
        if id is None or id not in self._requests:
            return [Answer(id, frame)]
        s = self._requests.pop(id)
        if s is None or self.streams.get(s.topic) is not s or s.request != id:
            return NOTHING
        return [self._refused(s, code, message, now)]

    def _refused(self, s: Stream, code: str, message: str, now: float) -> SubscribeError:
        """A subscribe was answered with an error: retry later, or end the subscription."""
        s.request, s.resuming = None, False
        if code in TRANSIENT_ERRORS:
            delay = max(self.settings.min_delay, self.rng.uniform(0, self.backoff.cap(s.tries)))
            s.tries += 1
            s.state, s.retry_at = RETRY, now + delay
            self._due = min(self._due, s.retry_at)
            return SubscribeError(s.topic, code, message, s.retry_at)
        del self.streams[s.topic]
        return SubscribeError(s.topic, code, message, None)

    # --- publications ---------------------------------------------------------------------------

    def _send_publication(self, pub: Outgoing, now: float) -> Action:
        """Send ``pub`` (again, with its key and a new id), or fail it: out of budget."""
        if pub.attempts >= self.settings.publish_attempts or now >= pub.deadline:
            return self._fail_publication(pub, pub.code or TIMEOUT, pub.message or "no answer in time")
        if pub.attempts:
            self.stats.retries += 1
        pub.attempts += 1
        pub.request = id = self.next_id()
        pub.state, pub.retry_at = PENDING, None
        self._publishing[id] = pub
        return Send({"type": "publish", "topic": pub.topic, "payload": pub.payload, "id": id, "idem": pub.idem})

    def _send_publications(self, now: float) -> list[Action]:
        """A new connection: every publication held goes out (again), oldest first."""
        return [self._send_publication(pub, now) for pub in list(self.publications) if pub.state is WAITING]

    def _fail_publication(self, pub: Outgoing, code: str, message: str) -> PublishFailed:
        del self.publications[pub]
        pub.state, pub.request, pub.retry_at = WAITING, None, None
        return PublishFailed(pub, code, message)

    def _fail_publications(self, why: str) -> list[Action]:
        """The client stops: what was never sent was not applied; the rest may have been."""
        return [self._fail_publication(pub, pub.code or CLOSED, why) for pub in list(self.publications)]

    def _on_published(self, frame: Mapping[str, Any], id: int) -> Sequence[Action]:
        pub = self._publishing.pop(id)
        if pub not in self.publications or pub.request != id:
            return NOTHING  # abandoned meanwhile
        del self.publications[pub]
        pub.state, pub.request = WAITING, None
        return [Published(pub, frame.get("seq"))]

    def _publish_refused(self, pub: Outgoing, id: int, code: str, message: str, now: float) -> Sequence[Action]:
        """A publish was answered with an error: send it again later, or fail it."""
        if pub not in self.publications or pub.request != id:
            return NOTHING  # abandoned meanwhile
        pub.request = None
        if code in PUBLISH_RETRY_ERRORS:
            pub.code, pub.message = code, message
            if pub.attempts < self.settings.publish_attempts:
                delay = max(self.settings.min_delay, self.rng.uniform(0, self.backoff.cap(pub.tries)))
                at = now + delay
                if at < pub.deadline:
                    pub.tries += 1
                    pub.state, pub.retry_at = RETRY, at
                    self._due = min(self._due, at)
                    return [PublishRetry(pub, code, message, at)]
        return [self._fail_publication(pub, code, message)]

    def _timers(self, now: float, late: bool) -> Sequence[Action]:
        if self.phase in (CONNECTING, OPEN):
            if now - self._attempt_at > self.settings.connect_timeout:
                self._due = float("inf")
                self._fetching = None  # a token that comes now is for an attempt given up
                return [Drop(None, "connect timeout")]
            return NOTHING
        if self.phase is not READY:
            self._due = float("inf")
            return NOTHING
        if self._refresh_at is not None and self._refresh_at <= now and self._fetching is None:
            self._refresh_at = None
            self._fetching = FOR_REFRESH
            self._reschedule()
            return [FetchToken(FOR_REFRESH), *self._timers(now, late)]
        grace = late and self._last_ping <= self.last_rx
        if grace:
            # We were paused, with nothing of ours unanswered: our pause is not the
            # gateway's silence. Ping now and give it ping_timeout to answer.
            self.last_rx = max(self.last_rx, now - self.interval)
        if now - self.last_rx > self.deadline:
            self._due = self._late = float("inf")  # once: the host closes, then reports closed()
            return [Drop(int(CloseCode.HEARTBEAT_TIMEOUT), "heartbeat timeout")]
        out: list[Action] = []
        if self._ping_every and (grace or now - self._last_ping >= self._ping_every):
            self._last_ping = now
            out.append(PING)
        for s in self.streams.values():
            if s.state is RETRY and s.retry_at is not None and s.retry_at <= now:
                out.append(self._subscribe(s))
        for pub in list(self.publications):
            if pub.state is RETRY and pub.retry_at is not None and pub.retry_at <= now:
                out.append(self._send_publication(pub, now))
        self._reschedule()
        return out

    def _reschedule(self) -> None:
        due = self.last_rx + self.deadline
        if self._ping_every:
            due = min(due, self._last_ping + self._ping_every)
        for s in self.streams.values():
            if s.retry_at is not None:
                due = min(due, s.retry_at)
        for pub in self.publications:
            if pub.retry_at is not None:
                due = min(due, pub.retry_at)
        if self._refresh_at is not None:
            due = min(due, self._refresh_at)
        self._due = due


__all__ = [
    "Action", "Answer", "CLOSED", "ClientCore", "Connect", "DELIVER", "DELIVERED", "DISCONNECTED", "Deliver", "Drop",
    "FOR_CONNECT", "FOR_REFRESH", "FetchToken", "Message", "NOTHING", "Outgoing", "PING", "PUBLISH_RETRY_ERRORS", "Ping",
    "Position", "Presence", "PublishFailed", "PublishRetry", "Published", "REFRESH_LEAD", "Ready", "ReconnectAt",
    "Refreshed", "Send", "Settings", "Stats", "Stop", "Stream", "SubscribeError", "Subscribed", "TERMINAL_CLOSE_CODES",
    "TIMEOUT", "TRANSIENT_ERRORS", "Unrecovered", "reconnect_delay", "refresh_delay", "token_ttl",
]
