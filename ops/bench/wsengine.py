"""The two sans-I/O WebSocket engines the gateway could run on, frame parsing side by side.

``python -m fanroute.bench.wsengine`` feeds both the same buffer of 64 masked text
frames (a 90-byte publish command each) again and again and prints the time per frame,
UTF-8 decoding included: websockets' ``Protocol`` (masking in C) and wsproto's
``Connection``. The gateway's engine (``gateway/wsconn.py``) is the faster one. wsproto
is imported only here, and only if it is installed.
"""

from __future__ import annotations

import argparse
import time

from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, SERVER, Protocol

_COMMAND = b'{"type":"publish","topic":"bench.t","payload":"' + b"x" * 40 + b'"}'


def per_frame_us(rounds: int) -> dict[str, float]:
    batch = Frame(Opcode.TEXT, _COMMAND).serialize(mask=True, extensions=[]) * 64
    out: dict[str, float] = {}
    proto = Protocol(SERVER, state=OPEN, max_size=65536)
    started = time.perf_counter()
    for _ in range(rounds):
        proto.receive_data(batch)
        for frame in proto.events_received():
            frame.data.decode()
    out["websockets"] = (time.perf_counter() - started) / (rounds * 64) * 1e6
    try:
        from wsproto import ConnectionType
        from wsproto.connection import Connection
    except ImportError:
        return out
    conn = Connection(ConnectionType.SERVER)
    started = time.perf_counter()
    for _ in range(rounds):
        conn.receive_data(batch)
        for _event in conn.events():
            pass
    out["wsproto"] = (time.perf_counter() - started) / (rounds * 64) * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000, help="buffers of 64 frames fed to each engine")
    args = parser.parse_args()
    for name, us in per_frame_us(args.rounds).items():
        print(f"{name}: {us:.2f} µs per frame")


if __name__ == "__main__":
    main()
