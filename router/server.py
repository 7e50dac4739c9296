"""The router shard process: an nng inbox in, one nng link out per gateway.

The I/O shell around :class:`router.shard.Shard`. The inbox is a Pull0 listener that
every gateway pushes to, received by a thread of its own
(:class:`fanroute.nngio.Receiver`). Each turn takes every message that has arrived,
applies them all, then sends each gateway one batched message. Each
gateway has its own Push0 link with a bounded queue and its own sender task, so a
slow or dead gateway never holds up the others: when its queue overflows the shard
forgets it, and the gateway, finding itself unknown at its next heartbeat, introduces
itself again and recovers from history.

With replicated streams (``--copies``, default 2; ``router/REPLICATION.md``) the
router also dials every other router (the list comes from ``--peers`` or from the
gateways' ROUTERS frame) and feeds what they say to its
:class:`fanroute.router.replication.Replica`, which is ticked every beat; a router is
ready only once it is caught up in an installed view, and on SIGTERM it hands its
topics over (:meth:`RouterServer.leave`) before it exits.

Every message in is opened with the cluster secret (``fanroute.wire.ReplayGuard``)
before anything in it is acted on, and the shard dials only inboxes that
authenticated gateways named: an outsider can make it do nothing. The receive loop
survives any single message: a failure is counted and the loop goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynng
import trio
from prometheus_client import CollectorRegistry

from fanroute import logs, wire
from fanroute.config import ConfigError, RouterConfig, is_nng_url
from fanroute.metrics import RouterMetrics
from fanroute.nngio import Receiver, Sender, pack_all
from fanroute.permissions import load_policy
from fanroute.ring import Ring
from fanroute.router import presence
from fanroute.router.replication import Replica
from fanroute.router.shard import Shard

log = logging.getLogger("fanroute.router")

_QUEUE_MESSAGES = 1024
_SWEEP_INTERVAL = 1.0
_LEAVE_TIMEOUT = 5.0  # seconds a stopping router waits for the others to take its topics
_ANNOUNCE_INTERVAL = 1.0  # seconds between announcements of this router's list to its peers


class _LinkQueue:
    """A link's bounded queue, as the shard's code uses it: ``send_nowait`` raises
    :class:`trio.WouldBlock` when ``_QUEUE_MESSAGES`` messages already wait."""

    def __init__(self, sender: Sender) -> None:
        self._sender = sender

    def send_nowait(self, data: bytes) -> None:
        sender = self._sender
        if sender.pending >= _QUEUE_MESSAGES or sender.closed:
            raise trio.WouldBlock
        sender.send(data)

    def statistics(self) -> SimpleNamespace:
        """What is waiting, as ``current_buffer_used`` (a memory channel's name for it)."""
        return SimpleNamespace(current_buffer_used=self._sender.pending, max_buffer_size=_QUEUE_MESSAGES)


class GatewayLink:
    """One Push0 link out, sent from a thread of its own (:class:`fanroute.nngio.Sender`):
    a slow peer blocks that thread, never the receive loop or the other links."""

    def __init__(self, inbox: str) -> None:
        self.inbox = inbox
        self.sock = pynng.Push0(send_buffer_size=64, reconnect_time_min=50, reconnect_time_max=1000)
        try:
            self.sock.dial(inbox, block=False)
        except BaseException:
            self.sock.close()
            raise
        self.sender = Sender(self.sock, inbox[-40:], limit=_QUEUE_MESSAGES)
        self.send_q = _LinkQueue(self.sender)

    async def run(self) -> None:
        """Nothing to run: the sending thread does the work (kept for callers)."""

    def close(self) -> None:
        self.sender.close()
        self.sock.close()


class RouterServer:
    def __init__(self, config: RouterConfig, registry: CollectorRegistry | None = None) -> None:
        config.check()
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = RouterMetrics.for_registry(self.registry)
        self.shard = Shard(
            config.name,
            history_size=config.history_size,
            history_ttl=config.history_ttl,
            history_bytes=config.history_bytes,
            gateway_timeout=config.gateway_timeout,
            history_for=load_policy(config.config_file).history_for,
            replicated=config.copies > 1,
        )
        key = wire.LinkKey(config.cluster_secret, encrypt=config.cluster_encrypt)
        self.sealer = wire.Sealer(key)
        self.guard = wire.ReplayGuard(key)
        self.metrics.watch(self.shard)
        # Series exist from the start (at 0), so dashboards and alerts see them.
        self.metrics.gateway_overflows.labels(config.name)
        for reason in ("mac", "replay", "malformed"):
            self.metrics.wire_rejected.labels(config.name, reason)
        self.metrics.internal_errors.labels(config.name)
        self.metrics.dial_failures.labels(config.name)
        for outcome in ("ok", "failed"):
            self.metrics.config_reloads.labels(config.name, outcome)
        self._namespaces_bytes = Path(config.config_file).read_bytes() if config.config_file else b""
        self.links: dict[str, GatewayLink] = {}
        self.peer_links: dict[str, GatewayLink] = {}  # other routers, by name
        self._announced = float("-inf")
        self._logged_view: tuple[int, bool, bool] | None = None
        self._nursery: trio.Nursery | None = None
        self._sock: pynng.Pull0 | None = None
        self._in_process = False

    def listen(self) -> None:
        """Bind the inbox (separately from :meth:`run`, so a bad address fails early)."""
        sock = pynng.Pull0(recv_buffer_size=128)
        try:
            sock.listen(self.config.listen)
        except pynng.NNGException as exc:
            sock.close()
            raise ConfigError(f"--listen {self.config.listen} cannot be listened on: {exc}") from None
        self._sock = sock

    @property
    def in_process(self) -> bool:
        """Whether this shard serves a gateway in the same process (standalone)."""
        return self._in_process

    def ready(self) -> tuple[bool, str]:
        ok = self._sock is not None or self._in_process
        if not ok:
            return False, "starting"
        if self.shard.replicated:
            replica = self.shard.replica
            if replica is None:
                return False, f"shard {self.shard.name}: waiting for the router list (--peers, or a gateway)"
            if replica.leaving:
                return False, f"shard {self.shard.name}: handing its topics over"
            if not replica.ready or replica.view is None:
                return False, f"shard {self.shard.name}: catching up (view {replica.promised})"
            if not replica.serving(trio.current_time()):
                return False, f"shard {self.shard.name}: no lease in view {replica.view.number} (cut off from a majority?)"
            return True, f"shard {self.shard.name} view {replica.view.number} of {len(replica.view.members)} routers"
        return True, f"shard {self.shard.name} epoch {self.shard.epoch}"

    # --- replication ----------------------------------------------------------------

    def _start_replica(self, routers: list[tuple[str, str]], name: str) -> None:
        """Join the other routers: a replica of our streams, and a link to each peer."""
        cfg, shard = self.config, self.shard
        names = [n for n, _ in routers]
        if name not in names or len(set(names)) != len(names):
            log.warning("router list %s does not name this router (%s) once; not replicating yet", names, name)
            shard.router_list = None
            return
        shard.replica = Replica(
            name, names, Ring(names).order, copies=cfg.copies, timeout=cfg.peer_timeout,
            beat_interval=cfg.peer_timeout / 6, history=shard.new_history,
        )
        shard.replica.batch_acks = True  # flushed after each batch (_on_peer)
        self.metrics.watch_replica(shard)
        for peer, url in routers:
            if peer == name:
                continue
            try:
                self.peer_links[peer] = GatewayLink(url)
            except pynng.NNGException as exc:
                log.warning("cannot dial router %s at %s: %s", peer, url, exc)
        logs.event(log, logging.INFO, "replication_started", f"router {name} replicating with {names}", shard=shard.name)

    def _send_peers(self) -> None:
        replica = self.shard.replica
        if replica is None or not replica.out:
            return
        out, replica.out = replica.out, []
        by_peer: dict[str, list[list[Any]]] = {}
        for to, msg in out:
            by_peer.setdefault(to, []).append(msg)
        for peer, frames in by_peer.items():
            link = self.peer_links.get(peer)
            if link is None:
                continue
            for data in pack_all(lambda chunk: self.sealer.pack(replica.name, chunk), frames):
                try:
                    link.send_q.send_nowait(data)
                except trio.WouldBlock:
                    self.metrics.peer_overflows.labels(self.shard.name).inc()  # lost, as on a cut link

    def _announce(self) -> None:
        """Tell every peer this router's list: how a router added to the cluster is taken up."""
        replica, routers = self.shard.replica, self.shard.router_list
        if replica is None or routers is None:
            return
        frame = [wire.PEER_ROUTERS, [[n, u] for n, u in routers]]
        replica.out.extend((peer, frame) for peer in self.peer_links)

    def _on_new_router(self, sender: str, frames: list[Any]) -> None:
        """An authenticated router not in the list announced itself: add it, if it is one more.

        Taken only when its list is ours with itself appended (one router at a time,
        the same order everywhere, so ranks and majorities agree); anything else is
        counted and ignored. Gateways are told, so they link to it too.
        """
        shard, replica = self.shard, self.shard.replica
        own = shard.router_list or []
        for frame in frames:
            try:
                if wire.check_peer_frame(frame) != wire.PEER_ROUTERS:
                    continue
            except wire.WireError:
                shard.stats.frames_rejected += 1
                continue
            listed = [(str(n), str(u)) for n, u in frame[1]]
            if len(listed) != len(own) + 1 or listed[:-1] != own or listed[-1][0] != sender or not is_nng_url(listed[-1][1]):
                self.metrics.peer_lists_rejected.labels(shard.name).inc()
                continue
            url = listed[-1][1]
            try:
                link = GatewayLink(url)
            except pynng.NNGException as exc:
                log.warning("cannot dial router %s at %s: %s", sender, url, exc)
                continue
            replica.add_router(sender, Ring([n for n, _ in listed]).order)
            self.peer_links[sender] = link
            shard.router_list = listed
            shard.announce_routers()
            logs.event(log, logging.INFO, "router_added", f"router {sender} ({url}) joined the cluster", shard=shard.name, router=sender)

    def _on_peer(self, sender: str, frames: list[Any]) -> None:
        replica, now = self.shard.replica, trio.current_time()
        for frame in frames:
            try:
                wire.check_peer_frame(frame)
            except wire.WireError:
                self.shard.stats.frames_rejected += 1
                continue
            replica.receive(sender, frame, now)
        replica.flush_acks()

    async def _replicate(self) -> None:
        """Tick the replica (beats, views, leases, re-sends) and carry out what it says."""
        while True:
            replica = self.shard.replica
            if replica is None:
                if self.shard.router_list is not None:
                    self._start_replica(self.shard.router_list, self.shard.own_name)
                await trio.sleep(0.02)
                continue
            await trio.sleep(replica.beat_interval)
            now = trio.current_time()
            if now - self._announced >= _ANNOUNCE_INTERVAL:
                self._announced = now
                self._announce()
            replica.tick(trio.current_time())
            self.shard.pump(trio.current_time())
            self._flush()
            self._log_view(replica)

    def _log_view(self, replica: Replica) -> None:
        """One log event per change of view or readiness (operators follow failovers by them)."""
        state = (replica.view.number if replica.view is not None else 0, replica.ready, replica.serving(trio.current_time()))
        if state == self._logged_view:
            return
        self._logged_view = state
        members = list(replica.view.members) if replica.view is not None else []
        logs.event(
            log, logging.INFO, "view", f"router {replica.name}: view {state[0]} {members}, ready {state[1]}, serving {state[2]}",
            shard=self.shard.name, view=state[0], members=members, ready=state[1] and state[2],
        )

    async def leave(self) -> None:
        """Hand the topics this router leads to their other copies, then return (SIGTERM).

        Bounded by ``_LEAVE_TIMEOUT``: a router whose peers are all gone stops anyway.
        """
        replica = self.shard.replica
        if replica is None:
            return
        replica.leave(trio.current_time())
        self.shard.pump(trio.current_time())
        self._flush()
        logs.event(log, logging.INFO, "router_leaving", f"router {replica.name} is handing its topics over", shard=self.shard.name)
        with trio.move_on_after(_LEAVE_TIMEOUT):
            while not replica.handed_off(trio.current_time()):
                await trio.sleep(0.02)
                replica.tick(trio.current_time())
                self._flush()
        # What was queued for the peers and gateways gets out before the process ends.
        with trio.move_on_after(1.0):
            while any(link.sender.pending for link in [*self.links.values(), *self.peer_links.values()]):
                await trio.sleep(0.01)

    async def run(self, *, task_status: trio.TaskStatus[RouterServer] = trio.TASK_STATUS_IGNORED) -> None:
        if self._sock is None:
            self.listen()
        sock = self._sock
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._sweep)
                nursery.start_soon(self._presence)
                if self.shard.replicated:
                    if self.config.peers:
                        self.shard.router_list = list(self.config.peers)
                        self.shard.own_name = self.config.name
                    nursery.start_soon(self._replicate)
                log.info("shard %s (epoch %s) listening on %s", self.shard.name, self.shard.epoch, self.config.listen)
                task_status.started(self)
                # Every message that has arrived, then one batch out per gateway.
                receiver = Receiver(sock, f"router-{self.shard.name}")
                while True:
                    for data in await receiver.batch():
                        self._on_message(data)
                    self._flush()
        finally:
            for link in [*self.links.values(), *self.peer_links.values()]:
                link.close()
            sock.close()

    async def run_in_process(
        self, *, task_status: trio.TaskStatus[RouterServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The shard without an inbox, for a gateway in this process (standalone).

        The gateway's :class:`fanroute.gateway.locallink.LocalShardLink` calls
        :attr:`shard` directly, and drives its presence pushes too (they go to that
        link alone); only forgetting silent gateways and idle topics runs here. No
        nng socket is opened.
        """
        self._in_process = True
        log.info("shard %s (epoch %s) in process", self.shard.name, self.shard.epoch)
        task_status.started(self)
        await self._sweep()

    def _on_message(self, data: bytes) -> None:
        try:
            env = self.guard.open(data)
        except wire.WireError as exc:
            self.metrics.wire_rejected.labels(self.shard.name, exc.reason).inc()
            return
        try:
            replica = self.shard.replica
            if replica is not None and env.sender in replica.rank:
                self._on_peer(env.sender, env.frames)
            elif replica is not None and not is_nng_url(env.sender):
                self._on_new_router(env.sender, env.frames)  # a router's name, not a gateway's inbox
            else:
                self.shard.receive(env.sender, env.frames, trio.current_time(), env.reply_as)
            self.shard.pump(trio.current_time())
        except Exception:
            log.exception("a message from %s could not be handled", env.sender[:80])
            self.metrics.internal_errors.labels(self.shard.name).inc()

    def _flush(self) -> None:
        try:
            self._send_outbound()
            self._send_peers()
        except Exception:
            log.exception("sending to gateways failed")
            self.metrics.internal_errors.labels(self.shard.name).inc()

    def _send_outbound(self) -> None:
        shard = self.shard
        batch_size = self.metrics.batch_size.labels(shard.name)
        for inbox, frames in shard.take_outbound().items():
            gw = shard.gateways.get(inbox)
            if gw is None:
                continue
            link = self.links.get(inbox)
            if link is None:
                try:
                    link = GatewayLink(inbox)
                except pynng.NNGException as exc:
                    logs.event(
                        log, logging.WARNING, "gateway_forgotten", f"cannot dial gateway inbox {inbox[:80]}: {exc}; forgetting it",
                        shard=shard.name, gateway=inbox[:80], reason="dial",
                    )
                    self.metrics.dial_failures.labels(shard.name).inc()
                    shard.forget(inbox)
                    continue
                self.links[inbox] = link
                self._nursery.start_soon(link.run)
                logs.event(
                    log, logging.INFO, "gateway_joined", f"gateway {inbox} joined", shard=shard.name, gateway=inbox
                )
            messages = pack_all(lambda chunk: self.sealer.pack(gw.reply_as, chunk), frames)
            for data in messages:
                batch_size.observe(len(frames) // len(messages))
                try:
                    link.send_q.send_nowait(data)
                except trio.WouldBlock:
                    logs.event(
                        log, logging.WARNING, "gateway_forgotten", f"gateway {inbox} is not keeping up; forgetting it",
                        shard=shard.name, gateway=inbox, reason="overflow",
                    )
                    self.metrics.gateway_overflows.labels(shard.name).inc()
                    shard.forget(inbox)
                    self._drop_link(inbox)
                    break

    def _drop_link(self, inbox: str) -> None:
        link = self.links.pop(inbox, None)
        if link is not None:
            link.close()

    async def _presence(self) -> None:
        """Push the subscriber totals that are due (``router.presence`` paces them)."""
        while True:
            await trio.sleep(presence.TICK)
            self.shard.presence_tick(trio.current_time())
            self._flush()

    def _reload_namespaces(self) -> None:
        """Take up an edited namespaces file (new topics get its history sizes and ages).

        Routers read the file only for history, so an edit needs no restart, and a
        restart would move topics: the file is read again at each sweep and applied
        when its bytes changed. A file that no longer parses is logged and counted,
        and the last good one stays in force.
        """
        path = self.config.config_file
        if not path:
            return
        try:
            data = Path(path).read_bytes()
        except OSError:
            data = b""
        if data == self._namespaces_bytes:
            return
        self._namespaces_bytes = data
        try:
            self.shard.history_for = load_policy(path).history_for
        except ConfigError as exc:
            log.warning("namespaces file not reloaded: %s", exc)
            self.metrics.config_reloads.labels(self.shard.name, "failed").inc()
            return
        log.info("namespaces file %s reloaded", path)
        self.metrics.config_reloads.labels(self.shard.name, "ok").inc()

    async def _sweep(self) -> None:
        interval = min(_SWEEP_INTERVAL, max(0.05, self.config.gateway_timeout / 4))
        while True:
            await trio.sleep(interval)
            self._reload_namespaces()
            for inbox in self.shard.sweep(trio.current_time()):
                logs.event(
                    log, logging.INFO, "gateway_forgotten", f"forgot gateway {inbox} (silent past {self.config.gateway_timeout:g}s)",
                    shard=self.shard.name, gateway=inbox, reason="silent",
                )
                self._drop_link(inbox)
            for inbox in [i for i in self.links if i not in self.shard.gateways]:
                self._drop_link(inbox)
