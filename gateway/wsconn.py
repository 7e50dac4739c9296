"""The client port's streams, and the one place that reaches into trio-websocket.

The gateway's client port serves both WebSocket clients and plain HTTP (the browser
client and demo pages), so the gateway accepts TCP connections itself, reads the
request head, and then hands the stream either to its HTTP app or to trio-websocket
with the head put back in front (:class:`ClientStream`).

trio-websocket serializes every write under a per-connection lock and awaits the
socket for each message; fanning one delivery out that way costs an await and a
wsproto encode per subscriber. The gateway instead writes frames it has already
built straight to the socket (``gateway.outbox``) while holding that same lock, so its
writes never interleave with the pongs and close frames trio-websocket sends itself.
The lock, the per-connection entry point and the partial-message buffer are
private to trio-websocket;
``pyproject.toml`` pins its minor version and ``tests/integration/test_wsconn.py`` guards both.
"""

from __future__ import annotations

import trio
from trio_websocket import WebSocketConnection, WebSocketServer

_MAX_HEAD = 16 * 1024


class ClientStream(trio.abc.HalfCloseableStream):
    """A client's TCP stream: replays bytes already read, records when bytes arrive.

    ``last_rx`` feeds the heartbeat sweep: any bytes count as life, WebSocket pongs
    included, which trio-websocket would otherwise consume unseen.
    """

    def __init__(self, inner: trio.SocketStream, prefix: bytes = b"") -> None:
        self.inner = inner
        self.socket = inner.socket
        self._prefix = prefix
        self.last_rx = trio.current_time()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        data = await self.inner.receive_some(max_bytes)
        self.last_rx = trio.current_time()
        return data

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


async def serve_connection(server: WebSocketServer, stream: ClientStream) -> None:
    """Run trio-websocket's handshake and our handler on an accepted stream."""
    await server._handle_connection(stream)  # noqa: SLF001 - see module docstring


def write_lock(conn: WebSocketConnection) -> trio.StrictFIFOLock:
    """The lock trio-websocket holds while it writes to the connection's stream."""
    lock = conn._stream_lock  # noqa: SLF001 - see module docstring
    if not isinstance(lock, trio.StrictFIFOLock):
        raise RuntimeError("unsupported trio-websocket version: its write lock changed")
    return lock


def message_in_progress(conn: WebSocketConnection) -> bool:
    """Whether part of a client message has arrived and the rest has not yet.

    trio-websocket assembles fragments (and frames that arrive in pieces) into
    ``_message_parts``; the gateway's sweep closes a connection whose message stays
    unfinished past ``--message-timeout``, since pongs between fragments would
    otherwise keep its buffer alive for ever.
    """
    return bool(conn._message_parts)  # noqa: SLF001 - see module docstring


def stream_of(conn: WebSocketConnection) -> ClientStream:
    stream = conn._stream  # noqa: SLF001 - see module docstring
    if not isinstance(stream, ClientStream):
        raise RuntimeError("connection was not accepted through the gateway's front door")
    return stream
