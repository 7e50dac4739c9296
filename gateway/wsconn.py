"""The client port's front door, and each connection's sans-I/O WebSocket engine.

The gateway's client port serves both WebSocket clients and plain HTTP (the browser
client and demo pages), so the gateway accepts TCP connections itself, reads the
request head, and then either hands the stream to its HTTP app (:class:`ClientStream`
puts the head back in front) or runs the WebSocket protocol itself (:class:`WsConn`).

The protocol engine is the ``websockets`` package's sans-I/O layer: its
``ServerProtocol`` checks the handshake and builds the 101 response, and a plain
``Protocol`` parses the client's frames after it (about 3.5x faster than wsproto per
frame, see ``ops/bench/wsengine.py``). Two fast paths stand in front of it for what
nearly every client sends, each checked against it by a property test: the plain
upgrade request (:class:`Handshake`) and complete unfragmented data frames between
messages (:class:`WsConn`); everything else is websockets'. Nothing here does I/O:
the gateway's connection task feeds the bytes it read and gets back the complete
messages, and control frames the protocol must send (pongs, the echo of a close)
are taken out and written by the connection's outbox, the only writer of its
socket, so they never land inside a frame that is partly written.

A connection holds the engine (about 1 KB) only while it has work: it is made by the
first frame the fast path leaves to it and let go (:meth:`WsConn.rest`) once the
connection has been quiet for a while between two frames, to be made again when
needed. The handshake parser is dropped once the handshake is answered, and
fragments are held only while a fragmented message is arriving. An idle connection,
the most common kind, so keeps no parser at all.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import logging
import re
import time
from dataclasses import dataclass
from http import HTTPStatus

import trio
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake
from websockets.frames import Close, Opcode
from websockets.headers import parse_connection, parse_subprotocol, parse_upgrade
from websockets.http11 import Request, Response
from websockets.protocol import CLOSED, OPEN, SERVER, Protocol
from websockets.server import ServerProtocol
from websockets.utils import accept_key

try:  # websockets' C unmasking, where it was built (it is in the wheels)
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - a pure-Python websockets
    from websockets.utils import apply_mask as _apply_mask

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
    """A WebSocket upgrade request, parsed; answered once with :meth:`accept` or :meth:`reject`.

    Nearly every client sends the same plain request: ``GET``, HTTP/1.1, printable
    ASCII, each of the headers that must appear once appearing once, and a valid
    upgrade. :func:`_plain_upgrade` recognises exactly that form and the 101 is
    written here (the accept key by ``websockets.utils.accept_key``, the header
    lists by ``websockets.headers``' parsers), which costs about a fifth of running
    websockets' ``ServerProtocol``. Anything else — a malformed or unusual request,
    a wrong version, a missing key — goes to ``ServerProtocol``, which checks it and
    writes its own answer (400, 405, 426, ...), so every refusal stays websockets'.
    In a reconnect storm the handshake was about a third of a gateway's CPU
    (``fanroute bench accept``, profiled).
    """

    __slots__ = ("_proto", "request", "rest", "_plain")

    def __init__(self, head: bytes) -> None:
        # Bytes after the head are the client's first frames (it need not wait for
        # the 101): they are kept for the connection's engine, not the handshake's.
        head, sep, self.rest = head.partition(b"\r\n\r\n")
        self._plain = _plain_upgrade(head)
        self._proto: ServerProtocol | None = None
        self.request: Request | None = None
        if self._plain is not None:
            return
        proto = ServerProtocol(logger=_log)
        proto.receive_data(head + sep)
        events = proto.events_received()
        self._proto = proto
        self.request = events[0] if events and isinstance(events[0], Request) else None

    @property
    def plain(self) -> bool:
        """Whether the request took the fast path (a plain, valid upgrade)."""
        return self._plain is not None

    @property
    def parsed(self) -> bool:
        """Whether the head is an HTTP request at all (if not, the answer is a plain 400)."""
        return self._plain is not None or self.request is not None

    @property
    def origin(self) -> str | None:
        if self._plain is not None:
            return self._plain.headers.get("origin")
        return self.request.headers.get("Origin") if self.request is not None else None

    @property
    def path(self) -> str:
        if self._plain is not None:
            return self._plain.path
        return self.request.path if self.request is not None else "/"

    def offered_subprotocols(self) -> list[str]:
        """The subprotocols the client offered, in its order (none for a malformed header)."""
        if self._plain is not None:
            return list(self._plain.protocols)
        if self.request is not None:
            values = self.request.headers.get_all("Sec-WebSocket-Protocol")
        else:
            return []
        offered: list[str] = []
        try:
            for value in values:
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
        plain = self._plain
        if plain is not None:
            protocol = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol is not None else ""
            return (
                f"HTTP/1.1 101 Switching Protocols\r\nDate: {_http_date()}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_key(plain.key)}\r\n{protocol}\r\n"
            ).encode(), True
        proto, request = self._proto, self.request
        if proto is None or request is None:
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


@dataclass(frozen=True, slots=True)
class _PlainUpgrade:
    """What the gateway needs of a plain, valid upgrade request."""

    path: str
    key: str
    headers: dict[str, str]  # lower-cased names of the headers sent once
    protocols: list[str]  # the subprotocols offered, in order


_PRINTABLE = re.compile(r"[\t\x20-\x7e]*")  # the whole head: printable ASCII and tabs
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")  # a header name
# Headers a valid upgrade has once (websockets refuses two keys or versions; one
# Origin is what the Origin check reads); a request repeating one is left to websockets.
_ONCE = frozenset({"upgrade", "sec-websocket-key", "sec-websocket-version", "origin", "content-length"})
_MAX_HEADERS = 128  # as websockets: a request with more is its to refuse


def _plain_upgrade(head: bytes) -> _PlainUpgrade | None:
    """The request's parts if it is a plain, valid WebSocket upgrade; ``None`` for websockets to judge."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    if len(lines) > _MAX_HEADERS + 1 or not _PRINTABLE.fullmatch(text.replace("\r\n", "")):
        return None
    method, _, rest = lines[0].partition(" ")
    path, _, protocol = rest.partition(" ")
    if method != "GET" or protocol != "HTTP/1.1" or not path or " " in path:
        return None
    once: dict[str, str] = {}
    lists: dict[str, list[str]] = {"connection": [], "sec-websocket-protocol": [], "transfer-encoding": []}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            return None
        name, value = name.lower(), value.strip(" \t")
        if name in lists:
            lists[name].append(value)
        elif name in _ONCE:
            if name in once:
                return None
            once[name] = value
    if lists["transfer-encoding"] or once.get("content-length", "0") != "0":
        return None
    if once.get("sec-websocket-version") != "13":
        return None
    key = once.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key.encode(), validate=True)) != 16:
            return None
        connection = [option for value in lists["connection"] for option in parse_connection(value)]
        upgrade = parse_upgrade(once.get("upgrade", ""))
        # websockets refuses a malformed subprotocol list (400) even when it offers none.
        protocols = [p for value in lists["sec-websocket-protocol"] for p in parse_subprotocol(value)]
    except (binascii.Error, InvalidHandshake):
        return None
    if not any(option.lower() == "upgrade" for option in connection):
        return None
    if not (len(upgrade) == 1 and upgrade[0].lower() == "websocket"):
        return None
    return _PlainUpgrade(path, key, once, protocols)


_date_second = -1
_date_text = ""


def _http_date() -> str:
    """The ``Date`` header's value, formatted once a second, not once a handshake."""
    global _date_second, _date_text
    now = time.time()
    if int(now) != _date_second:
        _date_second, _date_text = int(now), email.utils.formatdate(now, usegmt=True)
    return _date_text


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _joined(chunks: list[bytes]) -> bytes:
    return b"".join(c for c in chunks if c is not _SEND_EOF)


_EXTENDED_LENGTH = {126: 2, 127: 8}  # bytes of a frame's extended payload length, by its 7-bit length


def _whole_frames(data: bytes, max_size: int) -> tuple[list[str | bytes], int, bool]:
    """The messages of the complete, unfragmented, masked text and binary frames at the
    start of ``data``; how many bytes they took; and whether what is left is the start
    of one more such frame (to wait for) rather than a frame for the engine.

    Only frames every rule allows are taken: FIN set, no RSV bit, a 7- or 16-bit
    length within ``max_size``, masked, text that is UTF-8. Anything else is left
    for the engine, which answers it as RFC 6455 says (1002, 1007, 1009, pongs, the
    close).
    """
    out: list[str | bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        first = data[pos]
        if first != 0x81 and first != 0x82:
            return out, pos, False
        if end - pos < 2:
            return out, pos, True
        second = data[pos + 1]
        if not second & 0x80:
            return out, pos, False
        length = second & 0x7F
        if length < 126:
            head = pos + 6
        elif length == 126:
            if end - pos < 4:
                return out, pos, True
            length = (data[pos + 2] << 8) | data[pos + 3]
            head = pos + 8
        else:
            return out, pos, False
        if length > max_size:
            return out, pos, False
        stop = head + length
        if stop > end:
            return out, pos, True
        payload = _apply_mask(data[head:stop], data[head - 4 : head])
        if first == 0x81:
            try:
                out.append(payload.decode())
            except UnicodeDecodeError:
                return out, pos, False
        else:
            out.append(payload)
        pos = stop
    return out, pos, False


class WsConn:
    """One open connection's WebSocket state: frames in, messages out.

    :meth:`receive` returns the complete messages in the bytes given (``str`` for
    text, ``bytes`` for binary); :meth:`replies` the control frames the protocol
    owes the peer. A text message that is not UTF-8 fails the connection with 1007,
    a message larger than ``max_size`` (all fragments together) with 1009, a protocol
    violation with 1002; :attr:`done` is then true and :meth:`replies` holds the close.

    Between messages, complete unfragmented text and binary frames are read by
    :func:`_whole_frames` (the header by hand, the unmasking by websockets' C
    ``apply_mask``); from the first frame that is anything else — a control frame,
    a fragment, an incomplete or oversized frame, one that breaks a rule — the bytes
    go to the engine, which applies every rule of RFC 6455 as before. At fan-out 1
    websockets' generator-based frame parser was a fifth of a gateway's CPU
    (``fanroute bench fanout --subscribers 1``, profiled). ``whole_frames=False``
    sends everything to the engine: the reference the property tests compare with.
    """

    __slots__ = ("_proto", "_max_size", "_parts", "_text", "_whole_frames", "_tail", "_skip", "_head")

    def __init__(self, max_size: int, *, whole_frames: bool = True) -> None:
        self._proto: Protocol | None = None  # made when bytes arrive, let go at rest
        self._whole_frames = whole_frames
        self._tail = b""  # the start of a whole frame not all arrived yet (read here, not by the engine)
        # Where the engine is in the frames it was given (:meth:`_follow`): bytes of
        # the current frame still to come, and a frame header begun but not complete.
        self._skip = 0
        self._head = b""
        self._max_size = max_size
        self._parts: list[bytes] | None = None  # fragments of the message arriving now
        self._text = False

    def _engine(self) -> Protocol:
        proto = self._proto
        if proto is None:
            proto = self._proto = Protocol(SERVER, state=OPEN, max_size=self._max_size, logger=_log)
        return proto

    def _follow(self, data: bytes) -> None:
        """Walk the frame headers of the bytes the engine was given, to know whether it
        stands between two frames (its parser may hold a header it has read in full, so
        its buffer alone cannot tell)."""
        skip, head, pos, end = self._skip, self._head, 0, len(data)
        while True:
            if skip:
                taken = min(skip, end - pos)
                skip -= taken
                pos += taken
            if pos >= end:
                break
            header = head + data[pos : pos + 14]
            size = 2
            if len(header) >= 2:
                second = header[1]
                size += (4 if second & 0x80 else 0) + _EXTENDED_LENGTH.get(second & 0x7F, 0)
            if len(header) < size:
                head, pos = header, end
                break
            second = header[1]
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(header[2:4], "big")
            elif length == 127:
                length = int.from_bytes(header[2:10], "big")
            pos += size - len(head)
            head, skip = b"", length
        self._skip, self._head = skip, head

    def rest(self) -> None:
        """Let go of the protocol engine if it holds nothing: between two messages, open, nothing owed.

        A fresh engine in the open state is all a connection needs to go on from
        there (the gateway sends its pings itself, so the engine tracks none).
        """
        proto = self._proto
        between = not self._skip and not self._head and self._parts is None
        if proto is not None and proto.state is OPEN and between and not proto.reader.buffer and not proto.writes:
            # Its parser is a generator holding the engine: closed, the engine is
            # freed at once rather than by the next full garbage collection.
            proto.parser.close()
            self._proto = None

    @property
    def engine_held(self) -> bool:
        """Whether the connection holds a protocol engine now (it does not at rest)."""
        return self._proto is not None

    def receive(self, data: bytes) -> list[str | bytes]:
        messages: list[str | bytes] = []
        if self._tail:
            data, self._tail = self._tail + data, b""
        proto = self._proto
        if self._whole_frames and self._parts is None and not self._skip and not self._head and (
            proto is None or proto.state is OPEN
        ):
            messages, used, waiting = _whole_frames(data, self._max_size)
            if waiting:
                self._tail = data[used:]
                return messages
            if used == len(data):
                return messages
            data = data[used:]
        proto = self._engine()
        proto.receive_data(data)
        self._follow(data)
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
        proto = self._engine()
        if self._tail:  # a frame cut short: the engine ends it as it would have
            proto.receive_data(self._tail)
            self._tail = b""
        proto.receive_eof()

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
        return self._parts is not None or bool(self._tail or self._skip or self._head) or (
            proto is not None and bool(proto.reader.buffer)
        )

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

