"""The one place that reaches into trio-websocket's connection internals.

trio-websocket serializes every write under a per-connection lock and awaits the
socket for each message; fanning one delivery out that way costs an await and a
wsproto encode per subscriber. The gateway instead writes frames it has already
built straight to the socket (``gateway.outbox``), taking the same lock, so its
writes never interleave with the pongs and close frames trio-websocket sends itself.
It also needs to know when *any* bytes last arrived (pongs included) for heartbeats.
Both need the connection's stream and lock, which trio-websocket keeps private;
``pyproject.toml`` pins the minor version and ``tests/test_wsconn.py`` guards this.
"""

from __future__ import annotations

import trio
from trio_websocket import WebSocketConnection


class ActivityStream(trio.abc.HalfCloseableStream):
    """Wraps a connection's stream and records when bytes last arrived."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.last_rx = trio.current_time()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
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


def attach(conn: WebSocketConnection) -> tuple[trio.socket.SocketType, trio.StrictFIFOLock, ActivityStream]:
    """Return the connection's socket and write lock, and start tracking its activity."""
    stream = conn._stream  # noqa: SLF001 - see module docstring
    lock = conn._stream_lock  # noqa: SLF001
    if not isinstance(stream, trio.SocketStream) or not isinstance(lock, trio.StrictFIFOLock):
        raise RuntimeError("unsupported trio-websocket version: connection internals changed")
    activity = ActivityStream(stream)
    conn._stream = activity  # noqa: SLF001
    return stream.socket, lock, activity
