"""nng I/O for gateways and shards, kept off the trio thread.

Measured on this project's machines (pynng 0.9, nng over loopback TCP):

* ``Socket.send(block=False)`` from the trio thread is not free: nng completes even a
  non-blocking send through an aio that the calling thread waits on, and under load
  that wait sat at ~19 % of a gateway's samples (py-spy) at fan-out 1;
* ``asend``/``arecv`` complete through an nng callback thread and a trio wake-up:
  about 100 µs of the trio thread's CPU per message;
* a non-blocking ``recv`` on a Pull0 returns one message at a time, and then
  ``TryAgain`` although more are on their way: a loop that "takes what is queued"
  that way gets one message per turn and pays an ``arecv`` for each of the others;
* a plain blocking ``send``/``recv`` in a thread of its own costs 2 to 13 µs of CPU
  and releases the GIL while it waits.

So each socket gets one thread that does nothing but the blocking call: a
:class:`Sender` takes whole messages from a queue and sends them (nng's flow control
blocks that thread, never the event loop), and a :class:`Receiver` receives into a
queue and wakes the trio loop once per batch, which then takes *every* message that
has arrived before it checkpoints. Both are bounded.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

import pynng
import trio

_STOP = None


class Sender:
    """Sends whole messages on ``sock`` from a thread of its own.

    :meth:`send` only queues; :attr:`pending` is what is queued and not yet taken by
    nng. A caller that must not queue more waits in :meth:`room` until the thread
    has caught up below ``limit``. After :meth:`close` (or the socket's) what is
    still queued is dropped, as a closed nng socket drops what it holds.
    """

    def __init__(self, sock: pynng.Socket, name: str, *, limit: int = 8) -> None:
        self.sock = sock
        self.limit = limit
        self._token = trio.lowlevel.current_trio_token()
        self._queue: SimpleQueue[bytes | None] = SimpleQueue()
        self._queued = 0  # written by the trio thread only
        self._sent = 0  # written by the sending thread only
        self._room: trio.Event | None = None
        self.closed = False
        self._thread = threading.Thread(target=self._run, name=f"fanroute-send-{name}", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._queued - self._sent

    def send(self, data: bytes) -> None:
        self._queued += 1
        self._queue.put(data)

    async def room(self) -> None:
        """Return once fewer than ``limit`` messages wait (or the sender is closed)."""
        while self.pending >= self.limit and not self.closed:
            self._room = event = trio.Event()
            if self.pending < self.limit:  # the thread caught up meanwhile
                break
            await event.wait()
        self._room = None
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        self.closed = True
        self._queue.put(_STOP)
        self._wake_room()

    def _wake_room(self) -> None:
        event = self._room
        if event is not None:
            event.set()

    def _run(self) -> None:
        sock, queue = self.sock, self._queue
        while True:
            data = queue.get()
            if data is _STOP:
                return
            try:
                sock.send(data)
            except pynng.NNGException:
                self.closed = True
            self._sent += 1
            if self.closed:
                self._notify()
                return
            if self._room is not None and self.pending < self.limit:
                self._notify()

    def _notify(self) -> None:
        try:
            self._token.run_sync_soon(self._wake_room)
        except trio.RunFinishedError:
            pass


class Receiver:
    """Receives on ``sock`` in a thread of its own; :meth:`batch` hands trio every
    message that has arrived, at most ``limit`` waiting at a time."""

    def __init__(self, sock: pynng.Socket, name: str, *, limit: int = 4096) -> None:
        self.sock = sock
        self._token = trio.lowlevel.current_trio_token()
        self._arrived: deque[bytes] = deque()
        self._space = threading.Semaphore(limit)
        self._event = trio.Event()
        self._scheduled = False
        self.closed = False
        self._thread = threading.Thread(target=self._run, name=f"fanroute-recv-{name}", daemon=True)
        self._thread.start()

    async def batch(self) -> list[bytes]:
        """Every message received so far (at least one); a checkpoint either way.

        Raises :class:`trio.ClosedResourceError` once the socket is closed and
        everything received before was taken.
        """
        arrived = self._arrived
        if arrived:
            await trio.lowlevel.checkpoint()
        while not arrived:
            if self.closed:
                raise trio.ClosedResourceError("the nng socket was closed")
            await self._event.wait()
            self._event = trio.Event()
        out = []
        while arrived:
            out.append(arrived.popleft())
        self._space.release(len(out))
        return out

    def _wake(self) -> None:
        self._scheduled = False
        self._event.set()

    def _run(self) -> None:
        sock, arrived, space = self.sock, self._arrived, self._space
        while True:
            space.acquire()
            try:
                data = sock.recv()
            except pynng.NNGException:
                self.closed = True
                data = None
            if data is not None:
                arrived.append(data)
            # Appended before the flag is read: a wake-up already scheduled will
            # find this message too (see batch); otherwise schedule one.
            if not self._scheduled or data is None:
                self._scheduled = True
                try:
                    self._token.run_sync_soon(self._wake)
                except trio.RunFinishedError:
                    return
            if data is None:
                return



MESSAGE_BYTES = 4 << 20  # one nng message at most, when a batch is large (well under wire's 64 MiB)


def pack_all(pack: Callable[[list[Any]], bytes], frames: list[Any], most: int = MESSAGE_BYTES) -> list[bytes]:
    """``frames`` in as few messages as hold them: one, unless it would pass ``most`` bytes.

    Packing once and splitting only what turned out too large costs nothing in the
    common case; the sizes of frames are not known before they are packed.
    """
    data = pack(frames)
    if len(data) <= most or len(frames) == 1:
        return [data]
    half = len(frames) // 2
    return pack_all(pack, frames[:half], most) + pack_all(pack, frames[half:], most)
