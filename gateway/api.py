"""The HTTP publish API for back-end feeds: ``POST /api/publish`` on the admin port.

A market-data handler or a moderation tool publishes without holding a WebSocket:

    POST /api/publish            X-API-Key: <key>
    {"topic": "prices.AAPL", "payload": {"price": 189.5}}
    → 200 {"topic": "prices.AAPL", "seq": 42}

    {"items": [{"topic": "a.1", "payload": 1}, {"topic": "b.2", "payload": 2}]}
    → 200 {"results": [{"topic": "a.1", "seq": 7}, {"topic": "b.2", "error": {"code": ..., "message": ...}}]}

Each item goes through the same validation, permission rules (as the ``api`` role)
and limits as a WebSocket publish, and through the same hub: the request is a
short-lived session whose replies are collected instead of written to a socket.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import trio

from cluster import protocol as p
from cluster.admin import Request, Response
from cluster.auth import API
from cluster.codec import Encoding, ws_payload
from gateway.hub import Session

MAX_ITEMS = 1000
_TIMEOUT = 10.0
_STATUS = {
    p.BAD_REQUEST: 400,
    p.UNAUTHORIZED: 401,
    p.FORBIDDEN: 403,
    p.TOO_LARGE: 413,
    p.RATE_LIMITED: 429,
    p.UNAVAILABLE: 503,
}


class _Replies:
    """An outbox that keeps the hub's replies for the HTTP handler."""

    def __init__(self) -> None:
        self.events: dict[int, dict[str, Any]] = {}
        self.changed = trio.Event()

    def push(self, frame: bytes) -> None:
        event = orjson.loads(ws_payload(frame))
        if "id" in event:
            self.events[event["id"]] = event
            self.changed.set()

    def flush(self) -> None:
        pass


def _json(status: int, body: Any) -> Response:
    return Response(status, orjson.dumps(body), "application/json")


def _error(status: int, code: str, message: str) -> Response:
    return _json(status, {"error": {"code": code, "message": message}})


class PublishApi:
    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self._ids = itertools.count(1)

    async def handle(self, request: Request) -> Response:
        response = await self._handle(request)
        self.gateway.metrics.api_requests.labels(str(response.status)).inc()
        return response

    async def _handle(self, request: Request) -> Response:
        gw = self.gateway
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if not gw.auth.check_api_key(key):
            gw.metrics.auth_failures.labels("api_key").inc()
            return _error(401, p.UNAUTHORIZED, "a valid X-API-Key header is required")
        if len(request.body) > gw.config.max_frame * 16:
            return _error(413, p.TOO_LARGE, "request body too large")
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            return _error(400, p.BAD_REQUEST, f"malformed JSON: {exc}")
        if isinstance(body, dict) and "items" in body:
            items = body["items"]
            if not isinstance(items, list) or not 0 < len(items) <= MAX_ITEMS:
                return _error(400, p.BAD_REQUEST, f"items must be a list of 1 to {MAX_ITEMS} publications")
            results = await self._publish_all(items)
            return _json(200, {"results": results})
        (result,) = await self._publish_all([body])
        if "error" in result:
            return _json(_STATUS.get(result["error"]["code"], 500), result)
        return _json(200, result)

    async def _publish_all(self, items: list[Any]) -> list[dict[str, Any]]:
        gw, hub = self.gateway, self.gateway.hub
        replies = _Replies()
        session = Session(f"api-{next(self._ids)}", Encoding.JSON, replies)
        results: list[dict[str, Any] | None] = [None] * len(items)
        waiting: dict[int, int] = {}
        for i, item in enumerate(items):
            topic = item.get("topic") if isinstance(item, dict) else None
            try:
                if not isinstance(item, dict) or "payload" not in item:
                    raise p.ProtocolError(p.BAD_REQUEST, "each publication needs topic and payload")
                p.check_topic(topic)
                if len(orjson.dumps(item["payload"])) > gw.config.max_frame:
                    raise p.ProtocolError(p.TOO_LARGE, f"payload larger than {gw.config.max_frame} bytes")
                why = gw.policy.can_publish(API, topic)
                if why is not None:
                    raise p.ProtocolError(p.FORBIDDEN, why)
            except (p.ProtocolError, TypeError) as exc:
                code = exc.code if isinstance(exc, p.ProtocolError) else p.BAD_REQUEST
                results[i] = {"topic": topic, "error": {"code": code, "message": str(exc)}}
                continue
            id = i + 1
            waiting[id] = i
            hub.publish(session, p.Publish(topic, item["payload"], id))
        gw.flush()
        with trio.move_on_after(_TIMEOUT):
            while len(replies.events) < len(waiting):
                await replies.changed.wait()
                replies.changed = trio.Event()
        session.closed = True
        for id, i in waiting.items():
            event = replies.events.get(id)
            topic = items[i]["topic"]
            if event is None:
                results[i] = {"topic": topic, "error": {"code": p.UNAVAILABLE, "message": "no answer from the shard in time"}}
            elif event.get("type") == "published":
                results[i] = {"topic": topic, "seq": event["seq"]}
            else:
                results[i] = {"topic": topic, "error": {"code": event["code"], "message": event["message"]}}
        return results  # type: ignore[return-value]
