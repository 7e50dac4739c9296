"""A gateway's link to a shard in the same process: direct calls, no nng.

In standalone the gateway and its shards share one trio loop, so there is no wire to
cross: the frames the hub queues for a shard are handed to its
:class:`fanroute.router.shard.Shard` as they are, and what the shard answers is handed
back to the hub the same way. Nothing is encoded, sealed or copied, and no thread
is woken; a turn costs two method calls however many frames it carries.

The link keeps :class:`fanroute.gateway.links.ShardLink`'s contract, so the hub and
the server cannot tell the two apart:

* it comes up at once → the hub queues HELLO (the whole interest), the shard answers
  WELCOME and the shard counts as up;
* ``wake`` is set when the hub queued frames; the link takes everything queued in one
  turn, lets the shard apply it, and hands the shard's answers to ``deliver`` (the
  server's shard-batch handler), then ``flush`` writes every touched socket once;
* frames are not checked on the way (``checked=False``): the hub and the shard built
  each other's frames, and no one else can reach them;
* ``room`` is set each time the backlog was taken, for publishers held back by
  :meth:`fanroute.gateway.admission.Admission.room`;
* the shard's own pushes (presence totals, which a router's ``_presence`` task
  paces over nng) are looked for every :data:`fanroute.router.presence.TICK` here,
  since this link is the only one that can carry them;
* heartbeats go on as over nng: the shard forgets a gateway it has not heard from,
  and its WELCOME tells the hub when it must introduce itself again.

The link never goes down (there is no connection to lose), and there is no MAC: the
cluster secret protects a wire, and here there is none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from fanroute import wire
from fanroute.gateway.hub import Hub
from fanroute.router import presence
from fanroute.router.shard import Shard

log = logging.getLogger("fanroute.gateway.link")


class LocalShardLink:
    """The hub's link to a :class:`Shard` living in this process."""

    def __init__(
        self,
        hub: Hub,
        name: str,
        shard: Shard,
        *,
        beat_interval: float,
        deliver: Callable[[str, list[Any]], None],
        flush: Callable[[], None],
        on_state: Callable[[str, bool], None] = lambda name, up: None,
    ) -> None:
        self.hub = hub
        self.name = name
        self.shard = shard
        self.url = f"in-process shard {shard.name}"
        self.beat_interval = beat_interval
        self.deliver = deliver
        self.flush = flush
        self.on_state = on_state
        self.connected = False
        self.last_heard = trio.current_time()
        self.wake = trio.Event()
        self.room = trio.Event()  # set when the hub's backlog for this shard was taken
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
        self.connected = True
        self.hub.link_up(self.name)
        self.wake.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._beater)
            nursery.start_soon(self._pushes)
            await self._carry()

    async def _beater(self) -> None:
        queue = self.hub.to_shards
        while True:
            await trio.sleep(self.beat_interval)
            queue[self.name].append([wire.BEAT])
            self.wake.set()

    async def _pushes(self) -> None:
        shard, inbox = self.shard, self.hub.inbox
        while True:
            await trio.sleep(presence.TICK)
            shard.presence_tick(trio.current_time())
            if shard.outbound.get(inbox):
                self.wake.set()

    async def _carry(self) -> None:
        hub, shard, name = self.hub, self.shard, self.name
        while True:
            await self.wake.wait()  # a checkpoint even when already set
            self.wake = trio.Event()
            self.turn()
            self.flush()
            if hub.to_shards[name]:
                self.wake.set()

    def turn(self) -> int:
        """Carry one turn: everything queued to the shard, then its answers back.

        Returns the number of frames carried to the shard (for tests and benches).
        """
        hub, name = self.hub, self.name
        frames = hub.to_shards[name]
        inbox = hub.inbox
        if not frames:
            # Nothing to carry there; the shard may still have pushed something on
            # its own (presence totals, see router.presence).
            if not self.shard.outbound.get(inbox):
                return 0
        else:
            hub.to_shards[name] = []
            hub.handed_off(name)
            try:
                self.shard.receive(inbox, frames, trio.current_time(), name, checked=False)
            except Exception:
                # Shard.receive survives any single frame; this is a bug in the shard
                # itself. The frames are lost, as a lost nng message would be.
                log.exception("shard %s failed on a batch", name)
        out = self.shard.take_outbound()
        answers = out.pop(inbox, None)
        if answers:
            self.deliver(name, answers)
        self.room.set()
        self.room = trio.Event()
        return len(frames)
