"""The HTTP publish API for back-end feeds: ``POST /api/publish`` on the admin port.

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
"""

from __future__ import annotations

import itertools
import math
from typing import Any
from urllib.parse import parse_qs

import orjson
import trio

from fanroute import protocol as p
from fanroute.codes import ErrorCode
from fanroute.admin import Request, Response
from fanroute.attempts import AttemptThrottle
from fanroute.codec import Encoding, ws_payload
from fanroute.gateway.admission import Answer, no_room
from fanroute.gateway.hub import Session

MAX_ITEMS = 1000
_TIMEOUT = 10.0  # the request's deadline: room in the shards' backlogs, then their answers
# Wrong keys allowed per client address: a burst, then one more per second.
KEY_ATTEMPT_BURST = 10
KEY_ATTEMPT_RATE = 1.0
KEY_ATTEMPT_ADDRESSES = 10_000  # addresses remembered at most; the least recent goes
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


class PublishApi:
    def __init__(self, gateway: Any, attempts: AttemptThrottle | None = None) -> None:
        self.gateway = gateway
        self._ids = itertools.count(1)
        if attempts is None:
            attempts = AttemptThrottle(KEY_ATTEMPT_BURST, KEY_ATTEMPT_RATE, KEY_ATTEMPT_ADDRESSES)
        self.attempts = attempts

    async def handle(self, request: Request) -> Response:
        response = await self._handle(request)
        self.gateway.metrics.api_requests.labels(str(response.status)).inc()
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
        """``None`` if the request carries the API key, else the answer refusing it."""
        gw = self.gateway
        key = _presented_key(request)
        now = trio.current_time()
        if key is not None:
            wait = self.attempts.retry_after(request.client, now)
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
            self.attempts.failed(request.client, now)
        return _error(401, ErrorCode.UNAUTHORIZED, "a valid X-API-Key header is required")

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
        judge, room, backlog, owner, publish = admission.api_publication, admission.room, hub.backlog, hub.ring.owner, hub.publish
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
        self.gateway.metrics.api_requests.labels(str(response.status)).inc()
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

