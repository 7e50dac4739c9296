"""HTTP for fanroute: the admin port (``/metrics``, ``/healthz``, ``/readyz``) and
the plain-HTTP side of the gateway's client port (``/fanroute.js`` and the demo pages).

A small HTTP/1.1 server on trio, with h11 doing the protocol (h11 is the sans-I/O
HTTP library wsproto itself is built on, so it is already installed). Routes are
plain async functions from a :class:`Request` to a :class:`Response`; the gateway
adds its own (the HTTP publish API) to the same table.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("fanroute.admin")

MAX_BODY = 1 << 20
_PHRASES = {s.value for s in HTTPStatus}
_IDLE_TIMEOUT = 30.0


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


def text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".md": "text/markdown; charset=utf-8",
}


class HttpApp:
    """A route table and the HTTP/1.1 connection loop that serves it."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    def add_static(self, directory: Path, index: str = "index.html") -> None:
        """Serve every file of ``directory`` (read once, at start) under ``/``."""
        if not directory.is_dir():
            return
        for file in sorted(directory.iterdir()):
            if not file.is_file():
                continue
            response = Response(
                200,
                file.read_bytes(),
                _CONTENT_TYPES.get(file.suffix, "application/octet-stream"),
                [("cache-control", "no-cache")],
            )
            self.route("GET", "/" + file.name, _constant(response))
            if file.name == index:
                self.route("GET", "/", _constant(response))

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            task_status.started(bound)

    async def handle(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Serve HTTP requests on one connection until it closes or idles out."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        try:
            while True:
                with trio.move_on_after(_IDLE_TIMEOUT) as idle:
                    request = await self._read_request(conn, stream)
                if idle.cancelled_caught or request is None:
                    return
                response = await self._dispatch(request)
                await self._send(conn, stream, response)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    async def _read_request(self, conn: h11.Connection, stream: trio.abc.HalfCloseableStream) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return None
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("body too large")
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                target = head.target.decode("latin-1")
                path, _, query = target.partition("?")
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
                return Request(head.method.decode(), path, query, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _dispatch(self, request: Request) -> Response:
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            if any(path == request.path for _, path in self.routes):
                return text(405, f"{request.method} is not allowed on {request.path}")
            return text(404, f"no such path: {request.path}")
        try:
            return await handler(request)
        except Exception:
            log.exception("admin handler for %s failed", request.path)
            return text(500, "internal error")

    async def _send(self, conn: h11.Connection, stream: trio.abc.HalfCloseableStream, response: Response) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        reason = HTTPStatus(response.status).phrase.encode() if response.status in _PHRASES else b""
        data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        data += conn.send(h11.Data(data=response.body)) + conn.send(h11.EndOfMessage())
        await stream.send_all(data)


def _constant(response: Response) -> Handler:
    async def handler(_: Request) -> Response:
        return response

    return handler


class AdminServer(HttpApp):
    """The admin port: metrics for Prometheus, liveness and readiness for Kubernetes."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]) -> None:
        super().__init__()
        self.registry = registry
        self.ready = ready
        self.route("GET", "/metrics", self._metrics)
        self.route("GET", "/healthz", self._healthz)
        self.route("GET", "/readyz", self._readyz)

    async def _metrics(self, _: Request) -> Response:
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    async def _healthz(self, _: Request) -> Response:
        return text(200, "ok")

    async def _readyz(self, _: Request) -> Response:
        ok, detail = self.ready()
        return text(200 if ok else 503, detail)
