"""The server API on the admin port: ``POST /api/publish`` for back-end feeds, and
``POST /api/disconnect``, ``POST /api/unsubscribe`` and ``GET /api/info`` for operators.
Every call needs the API key (``X-API-Key``, or ``Authorization: Bearer``; one
wrong-key budget per client address for all of them) and is counted in
``fanroute_gateway_api_calls_total{endpoint, outcome}``, both from fixed sets.

A market-data handler or a moderation tool publishes without holding a WebSocket:

    POST /api/publish            X-API-Key: <key>
    {"topic": "prices.AAPL", "payload": {"price": 189.5}}
    → 200 {"topic": "prices.AAPL", "seq": 42}

    {"items": [{"topic": "a.1", "payload": 1, "idem": "feed-7731"}, {"topic": "b.2", "payload": 2}]}
    → 200 {"results": [{"topic": "a.1", "seq": 7}, {"topic": "b.2", "error": {"code": ..., "message": ...}}]}

Each item goes through the same admission rules as a WebSocket publish
(:meth:`fanroute.gateway.admission.Admission.api_publication`: topic, ``idem``,
payload size, the permissions of the ``api`` role) and through the same hub: the
request is a short-lived session whose replies are collected instead of written to
a socket. It meets the same back-pressure too: while the shard of the next item has
more frames waiting than ``--backlog-limit`` (:meth:`Admission.room`), the batch
waits for the link to catch up instead of piling frames on. All waiting — for room,
then for the shards' answers — shares the request's one deadline; an item not sent
by then (still waiting for room) fails with ``unavailable``: it was not applied.

A wrong API key costs the client address one try of a small budget
(:class:`fanroute.attempts.AttemptThrottle`); an address that has spent it gets 429
with ``Retry-After`` for every request that carries a key, right or wrong, until
the budget refills, so a key cannot be guessed faster than the refill rate.

An item the shard did not answer in time fails with ``outcome_unknown`` (HTTP 504):
the publication may have been sequenced and delivered even though no answer came.
An item may carry an ``idem`` key (1 to 64 characters), as a WebSocket publish may,
so that retrying it after such an answer does not publish it twice.

Disconnect, unsubscribe and info act on the whole cluster through the shard links
(:mod:`fanroute.gateway.control`):

    POST /api/disconnect   {"user": "alice"}                  → 200 {"disconnected": 2}
    POST /api/disconnect   {"user": "alice", "reconnect": true}
    POST /api/unsubscribe  {"user": "alice", "topic": "chat.room1"}  → 200 {"unsubscribed": 1}
    GET  /api/info         → 200 {"gateways": [...], "routers": [...]}

The counts in the answers are this gateway's: the command is carried out here at
once and reaches the others through every shard that is up, each carrying it out
within a link's delay (well inside 2 seconds), unanswered. With no shard up it could
reach no other gateway: the answer is then 503 ``unavailable`` (what it did here
stands; calling again is harmless).
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any
from weakref import WeakKeyDictionary
from urllib.parse import parse_qs

import orjson
import trio

from fanroute import logs
from fanroute import protocol as p
from fanroute.codes import ErrorCode
from fanroute.admin import Request, Response
from fanroute.attempts import AttemptThrottle
from fanroute.codec import Encoding, ws_payload
from fanroute.errors import ProtocolError
from fanroute.gateway import control
from fanroute.gateway.admission import Answer, no_room
from fanroute.gateway.hub import Session

MAX_ITEMS = 1000
_TIMEOUT = 10.0  # the request's deadline: room in the shards' backlogs, then their answers
# Wrong keys allowed per client address: a burst, then one more per second.
KEY_ATTEMPT_BURST = 10
KEY_ATTEMPT_RATE = 1.0
KEY_ATTEMPT_ADDRESSES = 10_000  # addresses remembered at most; the least recent goes
INFO_TIMEOUT = 2.0  # seconds GET /api/info waits for the shards' answers
log = logging.getLogger("fanroute.gateway.api")
_THROTTLES: WeakKeyDictionary[Any, AttemptThrottle] = WeakKeyDictionary()
_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.OUTCOME_UNKNOWN: 504,
}


class _Replies:
    """An outbox that keeps the hub's replies for the HTTP handler."""

    def __init__(self) -> None:
        self.events: dict[int, dict[str, Any]] = {}
        self.changed = trio.Event()

    def push(self, frame: bytes) -> None:
        self.keep(orjson.loads(ws_payload(frame)))

    def keep(self, event: dict[str, Any]) -> None:
        if "id" in event:
            self.events[event["id"]] = event
            self.changed.set()

    def flush(self) -> None:
        pass


class _ApiSession(Session):
    """A batch request as the hub's session: its replies are kept as events.

    A WebSocket session's replies are encoded into frames; this one's would only be
    decoded again, at a cost per publication that the batch path cannot afford.
    """

    __slots__ = ()

    def send(self, event: dict[str, Any]) -> None:
        self.outbox.keep(event)  # type: ignore[attr-defined]


def _json(status: int, body: Any) -> Response:
    return Response(status, orjson.dumps(body), "application/json")


def _error(status: int, code: str, message: str) -> Response:
    return _json(status, {"error": {"code": code, "message": message}})


def _presented_key(request: Request) -> str | None:
    """The API key from ``X-API-Key`` or ``Authorization: Bearer``, if any."""
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if key is None and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key


def key_throttle(gateway: Any) -> AttemptThrottle:
    """The gateway's wrong-key budget per client address, one for all its endpoints.

    Kept per gateway (not per endpoint), so that trying keys on two endpoints does
    not double the guessing rate.
    """
    throttle = _THROTTLES.get(gateway)
    if throttle is None:
        throttle = _THROTTLES[gateway] = AttemptThrottle(KEY_ATTEMPT_BURST, KEY_ATTEMPT_RATE, KEY_ATTEMPT_ADDRESSES)
    return throttle


def install_server_api(app: Any, gateway: Any) -> None:
    """``POST /api/disconnect``, ``POST /api/unsubscribe`` and ``GET /api/info`` on ``app``, the gateway's admin port."""
    server = ServerApi(gateway)
    app.route("POST", "/api/disconnect", server.disconnect)
    app.route("POST", "/api/unsubscribe", server.unsubscribe)
    app.route("GET", "/api/info", server.info)


# What an answer's HTTP status says, as the `outcome` label: a fixed set.
OUTCOMES = {
    200: "ok", 400: "bad_request", 401: "unauthorized", 403: "forbidden", 413: "too_large",
    429: "rate_limited", 503: "unavailable", 504: "outcome_unknown",
}


def count_call(gateway: Any, endpoint: str, status: int) -> None:
    """One call in ``fanroute_gateway_api_calls_total{endpoint, outcome}`` (and the older ``api_requests{status}``)."""
    metrics = gateway.metrics
    metrics.api_calls.labels(endpoint, OUTCOMES.get(status, "error")).inc()
    metrics.api_requests.labels(str(status)).inc()


def authenticate(gw: Any, attempts: AttemptThrottle, request: Request) -> Response | None:
    """``None`` if the request carries the API key, else the answer refusing it (401, or 429 when throttled)."""
    key = _presented_key(request)
    now = trio.current_time()
    if key is not None:
        wait = attempts.retry_after(request.client, now)
        if wait is not None:
            gw.metrics.limit_hits.labels("api_key_attempts").inc()
            message = "too many wrong API keys from this address; try again after Retry-After seconds"
            response = _error(429, ErrorCode.RATE_LIMITED, message)
            response.headers.append(("retry-after", str(max(1, math.ceil(wait)))))
            return response
    # Header values reach us decoded as latin-1, and a key is ASCII: anything
    # else is wrong without comparing (the comparison accepts only ASCII text).
    if key is not None and key.isascii() and gw.auth.check_api_key(key):
        return None
    gw.metrics.auth_failures.labels("api_key").inc()
    if key is not None:
        attempts.failed(request.client, now)
        # Wrong keys are few per address (the budget above); requests with no key at
        # all are not limited, so they are logged only at debug.
        logs.event(log, logging.INFO, "auth_failed", "API request with a wrong key", reason="api_key")
    else:
        logs.event(log, logging.DEBUG, "auth_failed", "API request without a key", reason="api_key")
    return _error(401, ErrorCode.UNAUTHORIZED, "a valid X-API-Key header is required")


class PublishApi:
    def __init__(self, gateway: Any, attempts: AttemptThrottle | None = None) -> None:
        self.gateway = gateway
        self._ids = itertools.count(1)
        self.attempts = key_throttle(gateway) if attempts is None else attempts

    async def handle(self, request: Request) -> Response:
        response = await self._handle(request)
        count_call(self.gateway, "publish", response.status)
        return response

    async def _handle(self, request: Request) -> Response:
        gw = self.gateway
        refused = self._authenticate(request)
        if refused is not None:
            return refused
        if (refused := gw.admission.api_body(len(request.body))) is not None:
            return _error(_STATUS[refused.code], refused.code, refused.reason)
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            return _error(400, ErrorCode.BAD_REQUEST, f"malformed JSON: {exc}")
        if isinstance(body, dict) and "items" in body:
            items = body["items"]
            if not isinstance(items, list) or not 0 < len(items) <= MAX_ITEMS:
                return _error(400, ErrorCode.BAD_REQUEST, f"items must be a list of 1 to {MAX_ITEMS} publications")
            results = await self._publish_all(items)
            return _json(200, {"results": results})
        (result,) = await self._publish_all([body])
        if "error" in result:
            return _json(_STATUS.get(result["error"]["code"], 500), result)
        return _json(200, result)

    def _authenticate(self, request: Request) -> Response | None:
        return authenticate(self.gateway, self.attempts, request)

    async def _publish_all(self, items: list[Any]) -> list[dict[str, Any]]:
        """Every item judged and queued in one pass, then every answer awaited at once.

        The whole batch reaches its shards' links before the first wait, so a link
        carries it in a few turns (one per shard when it fits the backlog limit).
        The room rule is asked synchronously and awaited only when it says wait.
        """
        gw, hub, admission = self.gateway, self.gateway.hub, self.gateway.admission
        now = trio.current_time()
        deadline = now + _TIMEOUT
        replies = _Replies()
        session = _ApiSession(f"api-{next(self._ids)}", Encoding.JSON, replies)
        results: list[dict[str, Any] | None] = [None] * len(items)
        waiting: dict[int, int] = {}
        judge, room, backlog, owner, publish = admission.api_publication, admission.room, hub.backlog, hub.owner, hub.publish
        for i, item in enumerate(items):
            decision = judge(item, i + 1, now)
            if type(decision) is Answer:
                gw.count(decision.counts)
                topic = item.get("topic") if isinstance(item, dict) else None
                results[i] = {"topic": topic, "error": {"code": decision.code, "message": decision.reason}}
                continue
            cmd: p.Publish = decision  # type: ignore[assignment]
            shard = owner(cmd.topic)
            if room(shard, backlog(shard)) is not None:
                if not await self._room(shard, deadline):
                    refused = no_room(cmd.topic)
                    results[i] = {"topic": cmd.topic, "error": {"code": refused.code, "message": refused.reason}}
                    continue
                now = trio.current_time()
            waiting[cmd.id] = i  # type: ignore[index]
            publish(session, cmd)
        gw.flush()
        events = replies.events
        with trio.move_on_at(deadline):
            while len(events) < len(waiting):
                await replies.changed.wait()
                replies.changed = trio.Event()
        session.closed = True
        for id, i in waiting.items():
            event = events.get(id)
            topic = items[i]["topic"]
            if event is None:
                message = "no answer from the shard in time; the publication may or may not have been applied"
                results[i] = {"topic": topic, "error": {"code": ErrorCode.OUTCOME_UNKNOWN, "message": message}}
            elif event["type"] == "published":
                results[i] = {"topic": topic, "seq": event["seq"]}
            else:
                results[i] = {"topic": topic, "error": {"code": event["code"], "message": event["message"]}}
        return results  # type: ignore[return-value]

    async def presence(self, request: Request) -> Response:
        """``GET /api/presence?topic=T`` → ``{"topic": T, "subscribers": n}``.

        The same count as the ``presence`` command (:meth:`Hub.presence`), read
        with the API key: ``401`` without it, ``400`` (one sentence) for a missing or
        invalid topic, ``503`` when the topic's shard cannot be reached.
        """
        response = await self._presence(request)
        count_call(self.gateway, "presence", response.status)
        return response

    async def _presence(self, request: Request) -> Response:
        refused = self._authenticate(request)
        if refused is not None:
            return refused
        topics = parse_qs(request.query).get("topic", [])
        if len(topics) != 1:
            return _error(400, ErrorCode.BAD_REQUEST, "give exactly one topic: /api/presence?topic=NAME")
        try:
            topic = p.check_topic(topics[0])
        except p.ProtocolError as err:
            return _error(400, err.code, err.message)
        event = await query_presence(self.gateway, topic, next(self._ids))
        if event.get("type") != "presence":
            code = event.get("code", ErrorCode.UNAVAILABLE)
            return _error(_STATUS.get(code, 503), code, event.get("message", "no answer from the shard in time"))
        return _json(200, {"topic": topic, "subscribers": event["subscribers"]})

    async def _room(self, shard: str, deadline: float) -> bool:
        """Wait while ``shard``'s backlog is over the limit; ``False`` if the deadline came first.

        Past the deadline nothing more is sent: its answer could not be waited for.
        """
        gw = self.gateway
        if trio.current_time() >= deadline:
            return False
        while (wait := gw.admission.room(shard, gw.hub.backlog(shard))) is not None:
            gw.flush()  # hand the link what this batch queued so far
            with trio.move_on_at(deadline) as scope:
                await gw.links[wait.shard].room.wait()
            if scope.cancelled_caught:
                return False
        return True


async def query_presence(gateway: Any, topic: str, id: int = 1, timeout: float = _TIMEOUT) -> dict[str, Any]:
    """The ``presence`` event (or ``error`` event) the hub answers for ``topic``.

    For server-side callers: a short-lived session asks :meth:`Hub.presence` and
    waits for its answer, as a WebSocket client would.
    """
    replies = _Replies()
    session = Session(f"api-presence-{id}", Encoding.JSON, replies)
    gateway.hub.presence(session, p.Presence(topic, id))
    gateway.flush()
    with trio.move_on_after(timeout):
        while id not in replies.events:
            await replies.changed.wait()
            replies.changed = trio.Event()
    session.closed = True
    return replies.events.get(id, {"type": "error", "code": ErrorCode.UNAVAILABLE, "message": "no answer from the shard in time"})


class ServerApi:
    """``POST /api/disconnect``, ``POST /api/unsubscribe`` and ``GET /api/info`` (see the module docstring).

    The rules are :mod:`fanroute.gateway.control`'s; the gateway carries a command
    out on its own connections (:meth:`GatewayServer.carry_out`) and its links take
    the frames to the shards.
    """

    def __init__(self, gateway: Any, attempts: AttemptThrottle | None = None) -> None:
        self.gateway = gateway
        self.attempts = key_throttle(gateway) if attempts is None else attempts

    async def disconnect(self, request: Request) -> Response:
        return await self._authenticated(control.DISCONNECT, request, self._command)

    async def unsubscribe(self, request: Request) -> Response:
        return await self._authenticated(control.UNSUBSCRIBE, request, self._command)

    async def info(self, request: Request) -> Response:
        return await self._authenticated("info", request, self._info)

    async def _authenticated(self, endpoint: str, request: Request, serve: Any) -> Response:
        response = authenticate(self.gateway, self.attempts, request)
        if response is None:
            response = await serve(endpoint, request)
        count_call(self.gateway, endpoint, response.status)
        return response

    async def _command(self, kind: str, request: Request) -> Response:
        gw = self.gateway
        if (refused := gw.admission.api_body(len(request.body))) is not None:
            return _error(_STATUS[refused.code], refused.code, refused.reason)
        try:
            call = control.parse_request(kind, orjson.loads(request.body))
        except orjson.JSONDecodeError as exc:
            return _error(400, ErrorCode.BAD_REQUEST, f"malformed JSON: {exc}")
        except ProtocolError as exc:
            return _error(400, exc.code, exc.message)
        hub = gw.hub
        if hub is None:
            return _error(503, ErrorCode.UNAVAILABLE, "the gateway is starting")
        cmd = gw.control.command(call)
        up = [name for name, is_up in hub.shard_up.items() if is_up]
        frame = cmd.frame()
        for name in up:
            hub.to_shards[name].append(frame)
        done = gw.carry_out(cmd)
        gw.flush()
        if not up:
            message = f"no shard is reachable: carried out on this gateway only ({done} here)"
            return _error(503, ErrorCode.UNAVAILABLE, message)
        return _json(200, {"disconnected" if kind == control.DISCONNECT else "unsubscribed": done})

    async def _info(self, _: str, request: Request) -> Response:
        gw = self.gateway
        hub = gw.hub
        if hub is None:
            return _error(503, ErrorCode.UNAVAILABLE, "the gateway is starting")
        up = [name for name, is_up in hub.shard_up.items() if is_up]
        asked, frame = gw.control.ask_info(up)
        answered = trio.Event()
        asked.on_done = answered.set
        for name in up:
            hub.to_shards[name].append(frame)
        gw.flush()
        try:
            with trio.move_on_after(INFO_TIMEOUT):
                if not asked.done:
                    await answered.wait()
        finally:
            gw.control.end_info(asked)
        own = control.own_counts(gw.conns, len(hub.topics))
        body = control.merge_info(gw.instance, hub.inbox, own, hub.ring.shards, asked.answers)
        return _json(200, body)
