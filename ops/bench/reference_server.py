"""A minimal broadcast server written the way the ``websockets`` documentation shows.

It is the yardstick of ``fanroute bench fanout``: asyncio, one process, one set of
connections per topic and :func:`websockets.asyncio.server.broadcast` to fan a
publication out (the frame is built once per publication, written to every
subscriber's transport without awaiting). It speaks the subset of fanroute's JSON
protocol that the benchmark's load generator uses, so the same clients drive both:

- ``{"type":"subscribe","topic":T,"id":N}`` → ``{"type":"subscribed","topic":T,"id":N,"seq":S,...}``
- ``{"type":"publish","topic":T,"payload":P}`` (or the plain ``{"topic":T,"payload":P}``)
  → ``{"topic":T,"payload":P,"seq":n}`` to every subscriber of ``T``
  (and ``{"type":"published",...}`` to the publisher when the command had an ``id``)
- ``{"type":"ping","ts":X}`` → ``{"type":"pong","ts":X}``

It has none of fanroute's guarantees (no bounded buffers, no history, no auth):
that is the point of a reference, the least work a server can do for the same
deliveries.

    python ops/bench/reference_server.py --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from websockets.asyncio.server import ServerConnection, broadcast, serve

subscribers: dict[str, set[ServerConnection]] = {}
sequences: dict[str, int] = {}


def _reply(ws: ServerConnection, frame: dict) -> None:
    broadcast((ws,), json.dumps(frame, separators=(",", ":")))


async def handler(ws: ServerConnection) -> None:
    mine: set[str] = set()
    try:
        async for message in ws:
            try:
                cmd = json.loads(message)
                kind = cmd.get("type", "publish")
                topic = cmd.get("topic")
            except (ValueError, AttributeError):
                _reply(ws, {"type": "error", "code": "bad_request", "message": "not a JSON object"})
                continue
            if kind == "publish" and isinstance(topic, str):
                seq = sequences[topic] = sequences.get(topic, 0) + 1
                frame = json.dumps({"topic": topic, "payload": cmd.get("payload"), "seq": seq}, separators=(",", ":"))
                broadcast(subscribers.get(topic, ()), frame)
                if "id" in cmd:
                    _reply(ws, {"type": "published", "topic": topic, "id": cmd["id"], "seq": seq})
            elif kind == "subscribe" and isinstance(topic, str):
                subscribers.setdefault(topic, set()).add(ws)
                mine.add(topic)
                reply = {"type": "subscribed", "topic": topic, "epoch": "reference", "seq": sequences.get(topic, 0), "recovered": False}
                if "id" in cmd:
                    reply["id"] = cmd["id"]
                _reply(ws, reply)
            elif kind == "unsubscribe" and isinstance(topic, str):
                subscribers.get(topic, set()).discard(ws)
                mine.discard(topic)
                _reply(ws, {"type": "unsubscribed", "topic": topic, "id": cmd.get("id")})
            elif kind == "ping":
                _reply(ws, {"type": "pong", "ts": cmd.get("ts")})
            else:
                _reply(ws, {"type": "error", "code": "bad_request", "message": f"unknown command {kind!r}"})
    finally:
        for topic in mine:
            subscribers[topic].discard(ws)


async def main(host: str, port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set_result, None)
    # No permessage-deflate: fanroute does not compress either, and the benchmark
    # measures fan-out, not zlib.
    async with serve(handler, host, port, compression=None, max_size=64 * 1024) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"reference ws://{host}:{bound}/", flush=True)
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(130)
