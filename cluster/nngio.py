"""nng I/O helpers shared by gateways and shards."""

from __future__ import annotations

import pynng
import trio


async def send(sock: pynng.Socket, data: bytes) -> None:
    """Send on an nng socket, without a thread hand-off when its queue has room.

    pynng's ``asend`` completes through an nng callback thread and a trio wake-up
    (tens of microseconds); a non-blocking ``send`` that fits the queue costs none of
    that. Only a full queue falls back to awaiting (nng's flow control).
    """
    try:
        sock.send(data, block=False)
    except pynng.TryAgain:
        await sock.asend(data)
    else:
        await trio.lowlevel.checkpoint()
