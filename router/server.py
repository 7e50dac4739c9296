"""The router shard process: an nng inbox in, one nng link out per gateway.

The I/O shell around :class:`router.shard.Shard`. The inbox is a Pull0 listener that
every gateway pushes to, received by a thread of its own
(:class:`fanroute.nngio.Receiver`). Each turn takes every message that has arrived,
applies them all, then sends each gateway one batched message. Each
gateway has its own Push0 link with a bounded queue and its own sender task, so a
slow or dead gateway never holds up the others: when its queue overflows the shard
forgets it, and the gateway, finding itself unknown at its next heartbeat, introduces
itself again and recovers from history.

Every message in is opened with the cluster secret (``fanroute.wire.ReplayGuard``)
before anything in it is acted on, and the shard dials only inboxes that
authenticated gateways named: an outsider can make it do nothing. The receive loop
survives any single message: a failure is counted and the loop goes on.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pynng
import trio
from prometheus_client import CollectorRegistry

from fanroute import logs, wire
from fanroute.config import ConfigError, RouterConfig
from fanroute.metrics import RouterMetrics
from fanroute.nngio import Receiver, Sender, pack_all
from fanroute.permissions import load_policy
from fanroute.router import presence
from fanroute.router.shard import Shard

log = logging.getLogger("fanroute.router")

_QUEUE_MESSAGES = 1024
_SWEEP_INTERVAL = 1.0


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
        self.links: dict[str, GatewayLink] = {}
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

    def ready(self) -> tuple[bool, str]:
        ok = self._sock is not None or self._in_process
        return ok, f"shard {self.shard.name} epoch {self.shard.epoch}" if ok else "starting"

    async def run(self, *, task_status: trio.TaskStatus[RouterServer] = trio.TASK_STATUS_IGNORED) -> None:
        if self._sock is None:
            self.listen()
        sock = self._sock
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._sweep)
                nursery.start_soon(self._presence)
                log.info("shard %s (epoch %s) listening on %s", self.shard.name, self.shard.epoch, self.config.listen)
                task_status.started(self)
                # Every message that has arrived, then one batch out per gateway.
                receiver = Receiver(sock, f"router-{self.shard.name}")
                while True:
                    for data in await receiver.batch():
                        self._on_message(data)
                    self._flush()
        finally:
            for link in self.links.values():
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
            self.shard.receive(env.sender, env.frames, trio.current_time(), env.reply_as)
        except Exception:
            log.exception("a message from %s could not be handled", env.sender[:80])
            self.metrics.internal_errors.labels(self.shard.name).inc()

    def _flush(self) -> None:
        try:
            self._send_outbound()
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

    async def _sweep(self) -> None:
        interval = min(_SWEEP_INTERVAL, max(0.05, self.config.gateway_timeout / 4))
        while True:
            await trio.sleep(interval)
            for inbox in self.shard.sweep(trio.current_time()):
                logs.event(
                    log, logging.INFO, "gateway_forgotten", f"forgot gateway {inbox} (silent past {self.config.gateway_timeout:g}s)",
                    shard=self.shard.name, gateway=inbox, reason="silent",
                )
                self._drop_link(inbox)
            for inbox in [i for i in self.links if i not in self.shard.gateways]:
                self._drop_link(inbox)
