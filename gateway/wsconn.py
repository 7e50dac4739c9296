"""The client port's front door, and each connection's sans-I/O WebSocket engine.

The gateway's client port serves both WebSocket clients and plain HTTP (the browser
client and demo pages), so the gateway accepts TCP connections itself, reads the
request head, and then either hands the stream to its HTTP app (:class:`ClientStream`
puts the head back in front) or runs the WebSocket protocol itself (:class:`WsConn`).

The protocol engine is the ``websockets`` package's sans-I/O layer: its
``ServerProtocol`` checks the handshake and builds the 101 response, and a plain
``Protocol`` parses the client's frames after it (frame parsing and unmasking in C
where ``websockets.speedups`` is built; about 3.5x faster than wsproto per frame, see
``ops/bench/wsengine.py``). Nothing here does I/O: the gateway's connection task feeds
the bytes it read and gets back the complete messages, and control frames the
protocol must send (pongs, the echo of a close) are taken out and written by the
connection's outbox, the only writer of its socket, so they never land inside a
frame that is partly written.

Per connection the engine keeps only the lean ``Protocol`` (about 1 KB), and only
while it has work: it is made at the first bytes after the handshake and let go
(:meth:`WsConn.rest`) once the connection has been quiet for a while between two
messages, to be made again by the next bytes. The handshake parser is dropped once
the handshake is answered, and fragments are held only while a fragmented message
is arriving. An idle connection, the most common kind, so keeps no parser at all.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import trio
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake
from websockets.frames import Close, Opcode
from websockets.headers import parse_subprotocol
from websockets.http11 import Request, Response
from websockets.protocol import CLOSED, OPEN, SERVER, Protocol
from websockets.server import ServerProtocol

from fanroute.codes import CloseCode

_MAX_HEAD = 16 * 1024

# websockets logs every open and close at INFO: on a gateway with 50 000 connections
# that is noise at best and a cost per reconnect storm. Warnings and errors still show.
_log = logging.getLogger("fanroute.gateway.websocket")
_log.setLevel(logging.WARNING)

_TEXT, _BINARY, _CONT, _CLOSE = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.CLOSE
_ABNORMAL = 1006  # no close frame: the connection just ended
_SEND_EOF = b""  # websockets' marker for "half-close the TCP stream now"

BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class ClientStream(trio.abc.HalfCloseableStream):
    """A client's TCP stream that replays the request head already read (plain HTTP)."""

    def __init__(self, inner: trio.SocketStream, prefix: bytes = b"") -> None:
        self.inner = inner
        self.socket = inner.socket
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def read_head(stream: trio.SocketStream) -> bytes | None:
    """Read up to the end of the HTTP request head; ``None`` if it never comes."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > _MAX_HEAD:
            return None
        data = await stream.receive_some(4096)
        if not data:
            return None
        buf += data
    return buf


def is_websocket_upgrade(head: bytes) -> bool:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


class Handshake:
    """A WebSocket upgrade request, parsed; answered once with :meth:`accept` or :meth:`reject`."""

    __slots__ = ("_proto", "request", "rest")

    def __init__(self, head: bytes) -> None:
        # Bytes after the head are the client's first frames (it need not wait for
        # the 101): they are kept for the connection's engine, not the handshake's.
        head, sep, self.rest = head.partition(b"\r\n\r\n")
        proto = ServerProtocol(logger=_log)
        proto.receive_data(head + sep)
        events = proto.events_received()
        self._proto = proto
        self.request: Request | None = events[0] if events and isinstance(events[0], Request) else None

    @property
    def origin(self) -> str | None:
        return self.request.headers.get("Origin") if self.request is not None else None

    @property
    def path(self) -> str:
        return self.request.path if self.request is not None else "/"

    def offered_subprotocols(self) -> list[str]:
        """The subprotocols the client offered, in its order (none for a malformed header)."""
        if self.request is None:
            return []
        offered: list[str] = []
        try:
            for value in self.request.headers.get_all("Sec-WebSocket-Protocol"):
                offered.extend(parse_subprotocol(value))
        except InvalidHandshake:
            return []
        return offered

    def accept(self, subprotocol: str | None) -> tuple[bytes, bool]:
        """The response to send and whether it opens the connection (a 101).

        The gateway has chosen the subprotocol already (``Encoding.for_subprotocols``);
        websockets checks the rest of the request (key, version, upgrade headers) and
        answers 400 or the like when it is not a valid upgrade.
        """
        proto, request = self._proto, self.request
        if request is None:
            return BAD_REQUEST, False
        response = proto.accept(request)
        if subprotocol is not None and response.status_code == 101:
            response.headers["Sec-WebSocket-Protocol"] = subprotocol
        proto.send_response(response)
        return _joined(proto.data_to_send()), response.status_code == 101

    def reject(self, status: int, body: bytes) -> bytes:
        response = Response(
            status,
            _reason(status),
            Headers([("Content-Length", str(len(body))), ("Connection", "close"), ("Content-Type", "text/plain")]),
            body,
        )
        return response.serialize()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _joined(chunks: list[bytes]) -> bytes:
    return b"".join(c for c in chunks if c is not _SEND_EOF)


class WsConn:
    """One open connection's WebSocket state: frames in, messages out.

    :meth:`receive` returns the complete messages in the bytes given (``str`` for
    text, ``bytes`` for binary); :meth:`replies` the control frames the protocol
    owes the peer. A text message that is not UTF-8 fails the connection with 1007,
    a message larger than ``max_size`` (all fragments together) with 1009, a protocol
    violation with 1002; :attr:`done` is then true and :meth:`replies` holds the close.
    """

    __slots__ = ("_proto", "_max_size", "_parts", "_text")

    def __init__(self, max_size: int) -> None:
        self._proto: Protocol | None = None  # made when bytes arrive, let go at rest
        self._max_size = max_size
        self._parts: list[bytes] | None = None  # fragments of the message arriving now
        self._text = False

    def _engine(self) -> Protocol:
        proto = self._proto
        if proto is None:
            proto = self._proto = Protocol(SERVER, state=OPEN, max_size=self._max_size, logger=_log)
        return proto

    def rest(self) -> None:
        """Let go of the protocol engine if it holds nothing: between two messages, open, nothing owed.

        A fresh engine in the open state is all a connection needs to go on from
        there (the gateway sends its pings itself, so the engine tracks none).
        """
        proto = self._proto
        if proto is not None and proto.state is OPEN and self._parts is None and not proto.reader.buffer and not proto.writes:
            # Its parser is a generator holding the engine: closed, the engine is
            # freed at once rather than by the next full garbage collection.
            proto.parser.close()
            self._proto = None

    @property
    def engine_held(self) -> bool:
        """Whether the connection holds a protocol engine now (it does not at rest)."""
        return self._proto is not None

    def receive(self, data: bytes) -> list[str | bytes]:
        proto = self._engine()
        proto.receive_data(data)
        messages: list[str | bytes] = []
        for frame in proto.events_received():
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY:
                if frame.fin:
                    payload: str | bytes = frame.data
                    if opcode is _TEXT:
                        try:
                            payload = payload.decode()  # type: ignore[union-attr]
                        except UnicodeDecodeError:
                            proto.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text frame")
                            return messages
                    messages.append(payload)
                else:
                    self._parts, self._text = [frame.data], opcode is _TEXT
            elif opcode is _CONT:
                parts = self._parts
                if parts is None:  # the protocol fails the connection first
                    continue
                parts.append(frame.data)
                if frame.fin:
                    self._parts = None
                    whole = b"".join(parts)
                    if self._text:
                        try:
                            messages.append(whole.decode())
                        except UnicodeDecodeError:
                            proto.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
                            return messages
                    else:
                        messages.append(whole)
            elif opcode is _CLOSE:
                break
        return messages

    def receive_eof(self) -> None:
        self._engine().receive_eof()

    def replies(self) -> list[bytes]:
        """Frames the protocol owes the peer (pongs, close): for the outbox to write."""
        proto = self._proto
        if proto is None or not proto.writes:
            return []
        return [c for c in proto.data_to_send() if c is not _SEND_EOF]

    def close_frame(self, code: int, reason: str = "") -> bytes:
        """Start the closing handshake with ``code``; the frame to write (none if it is under way)."""
        proto = self._engine()
        if proto.state is OPEN:
            proto.send_close(code, reason)
        return _joined(proto.data_to_send())

    @property
    def done(self) -> bool:
        """The peer closed, or the protocol failed: nothing more is read."""
        proto = self._proto
        return proto is not None and proto.state is not OPEN

    @property
    def close_received(self) -> bool:
        """The peer's close frame has arrived (or the stream ended)."""
        proto = self._proto
        return proto is not None and (proto.close_rcvd is not None or proto.state is CLOSED)

    @property
    def in_progress(self) -> bool:
        """Whether part of a message has arrived and the rest has not yet (for ``--message-timeout``)."""
        proto = self._proto
        return self._parts is not None or (proto is not None and bool(proto.reader.buffer))

    @property
    def close_code(self) -> int:
        """The code the connection closed with: the peer's, or the one this side sent; 1006 if none."""
        proto = self._proto
        if proto is None:
            return _ABNORMAL
        close: Close | None = proto.close_rcvd or proto.close_sent
        return close.code if close is not None else _ABNORMAL

    @property
    def failed(self) -> bool:
        """This side closed for a protocol reason (1002, 1007, 1009), not the peer."""
        proto = self._proto
        return proto is not None and proto.close_rcvd is None and proto.close_sent is not None

