"""A connection's bounded outbound buffer and the one writer of its socket.

Frames arrive already built (``fanroute.codec``). The fan-out path only appends;
after each batch the gateway calls :meth:`SocketOutbox.flush`, which writes every
queued frame with one non-blocking ``writev`` — several frames per syscall under
bursts. Only when the socket is full is a writer task started (in the gateway's
nursery, through ``spawn``) to await writability and finish the job; it ends as soon
as the buffer is empty, so an idle or keeping-up connection has no task, no event
and no buffer of its own here: the list of waiting frames exists only while frames
wait. When more than ``limit`` bytes are waiting, the client is not keeping up: the
buffer is dropped and the connection is closed as a slow consumer (4008), which is
counted.

Everything the gateway sends on a connection goes through here — deliveries,
replies, WebSocket pongs and the close frame (:meth:`finish`) — so one frame is
never written into the middle of another.

Conflated topics (latest value wins) are decided above this buffer: for each
message of such a topic the hub (``gateway/hub.py``) asks the connection's
``Conflation`` (``gateway/conflation.py``) whether it is written now or held as its
topic's newest, judging by :attr:`size` against ``--conflate-threshold``. Held
messages come back through :meth:`push` like any other frame once the buffer has
drained to the threshold; since they enter only while it holds at most the
threshold (below ``limit``), conflated traffic never closes a connection with 4008.
The ``pending`` attribute is not used by any of this and stays ``None``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

_IOV_MAX = 512


class SocketOutbox:
    __slots__ = (
        "_sock",
        "limit",
        "_on_overflow",
        "_spawn",
        "_chunks",
        "size",
        "bytes_sent",
        "overflowed",
        "broken",
        "finished",
        "_writing",
        "_idle",
        "pending",
    )

    def __init__(
        self,
        sock: trio.socket.SocketType,
        limit: int,
        on_overflow: Callable[[], None],
        spawn: Callable[[Callable[[], Awaitable[Any]]], None],
    ) -> None:
        self._sock = sock
        self.limit = limit
        self._on_overflow = on_overflow
        self._spawn = spawn
        self._chunks: list[bytes | memoryview] | None = None  # only while frames wait
        self.size = 0
        self.bytes_sent = 0
        self.overflowed = False
        self.broken = False
        self.finished = False  # the close frame is queued: nothing follows it
        self._writing = False  # a writer task owns the socket until the buffer is empty
        self._idle: trio.Event | None = None  # set when the writer ends, for drain()
        # Unused: held conflated messages live in each session's Conflation (module doc).
        self.pending: dict[str, bytes] | None = None

    def push(self, frame: bytes) -> None:
        if self.overflowed or self.broken or self.finished:
            return
        chunks = self._chunks
        if chunks is None:
            self._chunks = [frame]
        else:
            chunks.append(frame)
        self.size += len(frame)
        if self.size > self.limit:
            self.overflowed = True
            self._drop_whole_frames()
            self._on_overflow()

    def finish(self, frame: bytes) -> None:
        """Queue the last frame (a close): after an overflow too, never inside another frame."""
        if self.broken or self.finished:
            return
        self.finished = True
        if frame:
            if self._chunks is None:
                self._chunks = [frame]
            else:
                self._chunks.append(frame)
            self.size += len(frame)

    def _drop_whole_frames(self) -> None:
        # A frame already partly on the wire must be finished, or the close frame
        # that follows would land inside it and the client would see garbage.
        chunks = self._chunks
        head = chunks[0] if chunks and isinstance(chunks[0], memoryview) else None
        self._chunks = [head] if head is not None else None
        self.size = len(head) if head is not None else 0

    def flush(self) -> None:
        """Write what is queued without blocking; leave the rest to a writer task."""
        if self._chunks is None or self._writing:
            return
        self._write_nowait()
        if self._chunks is not None:
            self._writing = True
            self._spawn(self._write_when_writable)

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
                    n = os.writev(fd, chunks[:_IOV_MAX])
            except BlockingIOError:
                return
            except OSError:
                self._fail()
                return
            self.size -= n
            self.bytes_sent += n
            done = 0
            for head in chunks:
                size = len(head)
                if n >= size:
                    n -= size
                    done += 1
                    if not n:
                        break
                else:
                    chunks[done] = memoryview(head)[n:]
                    break
            del chunks[:done]
        self._chunks = None

    def _fail(self) -> None:
        self.broken = True
        self._chunks = None
        self.size = 0

    async def _write_when_writable(self) -> None:
        """The writer, started only when the socket was full: ends once the buffer is empty."""
        try:
            while self._chunks is not None and not self.broken:
                await trio.lowlevel.wait_writable(self._sock)
                self._write_nowait()
        except (trio.ClosedResourceError, trio.BusyResourceError, OSError):
            self._fail()
        finally:
            self._writing = False
            idle, self._idle = self._idle, None
            if idle is not None:
                idle.set()

    async def drain(self) -> None:
        """Wait until everything queued is written (before a close), or the socket broke."""
        self.flush()
        while self._writing:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
