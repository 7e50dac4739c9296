"""A gateway's link to one router shard (nng Push0, dialing the shard's inbox).

Push0 to a single peer is targeted and flow-controlled: when the shard is slow the
send waits; nothing is dropped on the way. The link's life:

* a pipe connects → the hub queues HELLO (the whole interest) ahead of anything else;
* the shard answers WELCOME → the shard counts as up (``/readyz``, publishes allowed);
* the pipe goes away, or the shard is silent past ``timeout`` (a frozen process keeps
  its TCP connection) → the hub fails what cannot be answered, and the socket is
  closed and made anew, so frames queued for the old connection are discarded rather
  than delivered after the new HELLO.

nng calls pipe callbacks on its own threads; they only schedule work on the trio
thread through the trio token. Messages are sent by a thread of the link's own
(:class:`fanroute.nngio.Sender`), so nng's flow control never blocks the event loop:
each turn the link packs everything the hub queued into as few messages as hold it,
and while its messages in flight are at the bound it takes nothing more, so the
hub's backlog grows and the admission rules hold publishers back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pynng
import trio

from fanroute import wire
from fanroute.nngio import Sender, pack_all
from fanroute.gateway.hub import Hub

log = logging.getLogger("fanroute.gateway.link")

_IN_FLIGHT = 4  # messages handed to the sending thread and not yet taken by nng


class ShardLink:
    def __init__(
        self,
        hub: Hub,
        name: str,
        url: str,
        *,
        beat_interval: float,
        timeout: float,
        sealer: wire.Sealer,
        on_state: Callable[[str, bool], None] = lambda name, up: None,
    ) -> None:
        self.hub = hub
        self.sealer = sealer
        self.name = name
        self.url = url
        self.beat_interval = beat_interval
        self.timeout = timeout
        self.on_state = on_state
        self.last_heard = trio.current_time()
        self.connected = False
        self.wake = trio.Event()
        self.room = trio.Event()  # set when the hub's backlog for this shard drained
        self._broken = trio.Event()
        self._sock: pynng.Push0 | None = None
        self._out: Sender | None = None
        self._generation = 0
        self._was_up = False

    @property
    def up(self) -> bool:
        return self.hub.shard_up[self.name]

    def heard(self) -> None:
        self.last_heard = trio.current_time()
        if self.up != self._was_up:
            self._was_up = self.up
            self.on_state(self.name, self.up)

    async def run(self) -> None:
        token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sender)
            nursery.start_soon(self._beater)
            while True:
                self._generation += 1
                gen = self._generation
                sock = pynng.Push0(
                    send_buffer_size=64, reconnect_time_min=50, reconnect_time_max=1000
                )
                sock.add_post_pipe_connect_cb(
                    lambda _pipe, g=gen: token.run_sync_soon(self._pipe_event, g, True)
                )
                sock.add_post_pipe_remove_cb(
                    lambda _pipe, g=gen: token.run_sync_soon(self._pipe_event, g, False)
                )
                self._sock = sock
                self._out = Sender(sock, f"shard-{self.name}", limit=_IN_FLIGHT)
                self._broken = trio.Event()
                sock.dial(self.url, block=False)
                try:
                    await self._broken.wait()
                finally:
                    self._sock = None
                    self.connected = False
                    self._out.close()
                    self._out = None
                    sock.close()
                self.hub.link_down(self.name)
                if self._was_up:
                    self._was_up = False
                    self.on_state(self.name, False)
                log.warning("link to shard %s (%s) lost; reconnecting", self.name, self.url)

    def _pipe_event(self, generation: int, connected: bool) -> None:
        if generation != self._generation:
            return
        if connected:
            self.connected = True
            self.last_heard = trio.current_time()
            self.hub.link_up(self.name)
            self.wake.set()
        else:
            self._broken.set()

    async def _beater(self) -> None:
        while True:
            await trio.sleep(self.beat_interval)
            if not self.connected:
                continue
            if trio.current_time() - self.last_heard > self.timeout:
                log.warning("shard %s silent for %.1fs", self.name, self.timeout)
                self._broken.set()
                continue
            self.hub.to_shards[self.name].append([wire.BEAT])
            self.wake.set()

    async def _sender(self) -> None:
        hub, name = self.hub, self.name
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            out = self._out
            if out is None or not self.connected:
                continue
            if out.pending >= out.limit:
                await out.room()  # nng is behind: frames wait in the hub meanwhile
                if out is not self._out or out.closed:
                    continue
            frames = hub.to_shards[name]
            if not frames:
                continue
            hub.to_shards[name] = []
            hub.handed_off(name)
            for data in pack_all(lambda chunk: self.sealer.pack(hub.inbox, chunk, name), frames):
                out.send(data)
            self.room.set()
            self.room = trio.Event()
            if hub.to_shards[name]:
                self.wake.set()
