"""A connection's bounded outbound buffer and the one writer that drains it.

Frames arrive already built (``fanroute.codec``). The fan-out path only appends;
after each batch the gateway calls :meth:`SocketOutbox.flush`, which writes every
queued frame with one non-blocking ``writev`` — several frames per syscall under
bursts. Only when the socket is full does the connection's writer task take over
and await writability, so a slow socket never delays anyone else. When more than
``limit`` bytes are waiting, the client is not keeping up: the buffer is dropped
and the connection is closed as a slow consumer (4008), which is counted.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from itertools import islice

import trio

_IOV_MAX = 512


class SocketOutbox:
    def __init__(
        self,
        sock: trio.socket.SocketType,
        lock: trio.StrictFIFOLock,
        limit: int,
        on_overflow: Callable[[], None],
    ) -> None:
        self._sock = sock
        self._lock = lock
        self.limit = limit
        self._on_overflow = on_overflow
        self._chunks: deque[bytes | memoryview] = deque()
        self.size = 0
        self.bytes_sent = 0
        self.overflowed = False
        self.broken = False
        self._busy = False  # the writer task holds the lock and owns the socket
        self._wake = trio.Event()

    def push(self, frame: bytes) -> None:
        if self.overflowed or self.broken:
            return
        self._chunks.append(frame)
        self.size += len(frame)
        if self.size > self.limit:
            self.overflowed = True
            self._drop_whole_frames()
            self._on_overflow()

    def _drop_whole_frames(self) -> None:
        # A frame already partly on the wire must be finished, or the close frame
        # that follows would land inside it and the client would see garbage.
        chunks = self._chunks
        head = chunks[0] if chunks and isinstance(chunks[0], memoryview) else None
        chunks.clear()
        self.size = 0
        if head is not None:
            chunks.append(head)
            self.size = len(head)

    def flush(self) -> None:
        """Write what is queued without blocking; leave the rest to the writer."""
        if not self._chunks or self._busy:
            return
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            self._wake.set()
            return
        try:
            self._write_nowait()
        finally:
            self._lock.release()
        if self._chunks:
            self._wake.set()

    def _write_nowait(self) -> None:
        chunks = self._chunks
        while chunks:
            fd = self._sock.fileno()
            if fd < 0:  # closed: never write to a descriptor number that may be reused
                self._fail()
                return
            try:
                if len(chunks) == 1:
                    n = os.write(fd, chunks[0])
                else:
                    n = os.writev(fd, list(islice(chunks, _IOV_MAX)))
            except BlockingIOError:
                return
            except OSError:
                self._fail()
                return
            self.size -= n
            self.bytes_sent += n
            while n:
                head = chunks[0]
                if n >= len(head):
                    n -= len(head)
                    chunks.popleft()
                else:
                    chunks[0] = memoryview(head)[n:]
                    n = 0

    def _fail(self) -> None:
        self.broken = True
        self._chunks.clear()
        self.size = 0

    async def drain(self) -> None:
        """Write everything still queued, waiting for the socket as needed (before a close)."""
        async with self._lock:
            while self._chunks and not self.broken:
                self._write_nowait()
                if self._chunks:
                    await trio.lowlevel.wait_writable(self._sock)

    async def run(self) -> None:
        """The writer: drains the buffer whenever a flush could not finish."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self._chunks:
                continue
            async with self._lock:
                self._busy = True
                try:
                    while self._chunks:
                        self._write_nowait()
                        if self._chunks:
                            await trio.lowlevel.wait_writable(self._sock)
                finally:
                    self._busy = False
