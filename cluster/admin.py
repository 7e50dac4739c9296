"""HTTP for fanroute: the admin port (``/metrics``, ``/healthz``, ``/readyz``) and
the plain-HTTP side of the gateway's client port (``/fanroute.js`` and the demo pages).

A small HTTP/1.1 server on trio, with h11 doing the protocol (h11 is the sans-I/O
HTTP library wsproto itself is built on, so it is already installed). Routes are
plain async functions from a :class:`Request` to a :class:`Response`; the gateway
adds its own (the HTTP publish API) to the same table.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.exposition import gzip_accepted

log = logging.getLogger("fanroute.admin")

MAX_BODY = 1 << 20
_MAX_HEAD = 16384  # bytes of an unfinished request head h11 holds; past them, 431
_PHRASES = {s.value for s in HTTPStatus}
_REFUSAL_TIMEOUT = 2.0  # to write a refusal and let the client read it before closing


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    # The peer's IP address (no port), for limits kept per client address; empty
    # when the stream has no socket peer to ask (a test's in-memory stream).
    client: str = ""


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


class _Refused(Exception):
    """A request that is answered with an error and then the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpApp:
    """A route table and the HTTP/1.1 connection loop that serves it.

    Every connection is bounded in time, so open sockets cannot be held for free:
    between requests a keep-alive connection may sit idle for ``idle_timeout``
    seconds; a request must arrive in full within ``request_timeout`` seconds of its
    first byte (so trickling bytes does not keep it open), and its response must be
    taken by the client within ``request_timeout`` seconds too (so not reading does
    not either). Handlers run outside those limits: they bound their own work.
    """

    def __init__(self, *, idle_timeout: float = 10.0, request_timeout: float = 30.0) -> None:
        if idle_timeout <= 0 or request_timeout <= 0:
            raise ValueError("HTTP timeouts must be positive")
        self.routes: dict[tuple[str, str], Handler] = {}
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout

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
        """Serve HTTP requests on one connection until it closes or a limit ends it.

        Nothing the peer sends makes this raise: a malformed, oversized or too slow
        request is answered with one sentence where HTTP still allows an answer,
        and the connection closed; a peer that goes away just ends it.
        """
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        client = _peer_host(stream)
        try:
            while True:
                try:
                    request = await self._read_request(conn, stream, client)
                except _Refused as refused:
                    await self._refuse(conn, stream, refused)
                    return
                if request is None:
                    return
                response = await self._dispatch(request)
                with trio.move_on_after(self.request_timeout) as sending:
                    await self._send(conn, stream, response)
                if sending.cancelled_caught:
                    return  # the client does not read what it asked for
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return  # the peer went away
        except h11.LocalProtocolError:
            # A handler's response that HTTP cannot carry (a bad status or header);
            # h11 refuses to send anything more on this connection.
            log.exception("an HTTP response could not be sent")
        finally:
            await stream.aclose()

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.HalfCloseableStream, client: str
    ) -> Request | None:
        """The next request, or ``None`` when the connection is closed or idled out.

        Two clocks: waiting for a request's first byte is idleness; from that byte
        on, the whole request runs against one deadline that later bytes do not
        extend.
        """
        pending, closed = conn.trailing_data
        if not pending and not closed:
            with trio.move_on_after(self.idle_timeout):
                data = await stream.receive_some(65536)
                if not data:
                    return None
                conn.receive_data(data)
            if not conn.trailing_data[0]:
                return None  # idle too long: closed without an answer
        with trio.move_on_after(self.request_timeout):
            try:
                return await self._read_events(conn, stream, client)
            except h11.RemoteProtocolError as exc:
                raise _Refused(exc.error_status_hint, _describe(exc)) from None
        raise _Refused(408, f"the request did not arrive within {self.request_timeout:g} seconds")

    async def _read_events(
        self, conn: h11.Connection, stream: trio.abc.HalfCloseableStream, client: str
    ) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)  # b"" tells h11 the peer closed
                continue
            if isinstance(event, h11.Request):
                head = event
                length = _header(head.headers, b"content-length")
                if length is not None and int(length) > MAX_BODY:
                    raise _Refused(413, f"the request body is larger than {MAX_BODY} bytes")
                if conn.client_is_waiting_for_100_continue:
                    await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise _Refused(413, f"the request body is larger than {MAX_BODY} bytes")
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                target = head.target.decode("latin-1")
                path, _, query = target.partition("?")
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
                return Request(head.method.decode("ascii"), path, query, headers, bytes(body), client)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _refuse(self, conn: h11.Connection, stream: trio.abc.HalfCloseableStream, refused: _Refused) -> None:
        """Answer a refused request, if HTTP still allows it, then wind down.

        After the answer, the rest of what the client sends is read and dropped for
        a moment before closing: closing with unread data makes the kernel reset the
        connection, and a reset can destroy the answer before the client reads it.
        """
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response = text(refused.status, refused.message)
        response.headers.append(("connection", "close"))
        with trio.move_on_after(_REFUSAL_TIMEOUT):
            await self._send(conn, stream, response)
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass

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


def _describe(exc: h11.RemoteProtocolError) -> str:
    """One sentence for a request h11 refused, without the bytes h11 quotes.

    Those bytes are the client's own (up to a whole head): echoing them back costs
    bandwidth and tells the client nothing it does not know.
    """
    if exc.error_status_hint == 431:
        return f"the request head is longer than {_MAX_HEAD} bytes"
    reason = str(exc).partition(": bytearray(")[0].rstrip(".")
    return f"bad HTTP request: {reason[:200]}"


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:  # h11 gives header names in lower case
            return value.decode("latin-1")
    return None


def _peer_host(stream: trio.abc.Stream) -> str:
    """The IP address at the other end of ``stream``, or ``""`` if it has none.

    Both the admin port's trio ``SocketStream`` and the client port's
    ``ClientStream`` expose the socket as ``.socket``.
    """
    sock = getattr(stream, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:
        return ""  # already disconnected
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


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

    async def _metrics(self, request: Request) -> Response:
        """The exposition, gzipped when the scraper says it accepts gzip (Prometheus does).

        A gateway's exposition is tens of kilobytes of repetitive text; gzip makes it a
        few, at a fraction of a millisecond of CPU per scrape.
        """
        body = generate_latest(self.registry)
        headers = [("vary", "accept-encoding")]
        if gzip_accepted(request.headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=6)
            headers.append(("content-encoding", "gzip"))
        return Response(200, body, CONTENT_TYPE_LATEST, headers)

    async def _healthz(self, _: Request) -> Response:
        return text(200, "ok")

    async def _readyz(self, _: Request) -> Response:
        ok, detail = self.ready()
        return text(200 if ok else 503, detail)
