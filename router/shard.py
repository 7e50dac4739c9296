"""The state of one router shard, as a plain state machine with no I/O.

A shard owns a slice of the topic space. For each topic it keeps the sequence
counter and epoch, a bounded history, and the set of gateways that have at least one
subscriber for it. It turns frames from gateways (``fanroute.wire``) into frames for
gateways, collected per gateway in :attr:`Shard.outbound` so the I/O shell can send
each gateway one batched nng message per turn.

Gateways are known by their inbox address (where the shard sends to them); a gateway
that restarts on the same address introduces itself with a new instance id, and the
old instance's interest is dropped.

History is bounded per topic (count, age) and across the shard (``history_bytes``):
past the byte cap the oldest entries of any topic go first, in publication order,
and are counted; a client whose ``since`` falls into what was evicted gets
``recovered: false``. A publication whose ``idem`` key is still in its topic's
history is answered with its original seq and not applied again.

With replicated streams (``router/REPLICATION.md``) a topic's epoch, seq and history
live in :class:`fanroute.router.replication.Replica` instead, on every copy; the
shard keeps the gateways' interest and presence, hands publications to the replica,
serves subscribes only for topics it leads while it serves, and turns the replica's
events into frames (:meth:`Shard.pump`): acknowledgements and deliveries once every
copy holds an entry, refusals, and ``VIEW`` to every gateway when it is ready in a
new view.
"""

from __future__ import annotations

import secrets
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from fanroute import wire
from fanroute.config import is_nng_url
from fanroute.history import Entry, History

_kind = itemgetter(0)  # a frame's kind, for frames that need no check (see ``checked``)
from fanroute.router.presence import ShardPresence
from fanroute.router.replication import Committed, Created, Ready, Refused, Replica

_REFUSALS = {  # the replica's reasons, as the error codes gateways pass on
    "moved": "unavailable",
    "unavailable": "unavailable",
    "outcome_unknown": "outcome_unknown",
}


@dataclass(slots=True)
class Topic:
    epoch: str
    history: History
    seq: int = 0
    gateways: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Gateway:
    inbox: str
    instance: str
    last_seen: float
    reply_as: str = ""  # the name this gateway knows the shard by
    topics: set[str] = field(default_factory=set)
    # Its last REPORT: connections, subscriptions, topics (for GET /api/info).
    report: tuple[int, int, int] | None = None


@dataclass(slots=True)
class ShardStats:
    """Counters read by the metrics collector at scrape time (no locks on the hot path)."""

    publications: int = 0
    fanout_sends: int = 0
    subscribes: int = 0
    recovered: int = 0
    not_recovered: int = 0
    frames_rejected: int = 0
    frames_failed: int = 0  # frames that raised while being applied (a bug, not input)
    senders_rejected: int = 0  # messages whose sender is not a gateway inbox address
    gateways_forgotten: int = 0
    topics_evicted: int = 0
    duplicates: int = 0  # publications recognised by their idem key
    history_evicted: int = 0  # entries evicted by the shard-wide byte cap
    history_evicted_bytes: int = 0
    refused: int = 0  # publications refused (no stream here that may take them), answered NACK
    refused_silently: int = 0  # of those, publications with no ack wanted (nobody to tell)


class Shard:
    def __init__(
        self,
        name: str,
        *,
        history_size: int = 1000,
        history_ttl: float = 300.0,
        gateway_timeout: float = 10.0,
        epoch: str | None = None,
        history_bytes: int = 256 << 20,
        history_for: Callable[[str], tuple[int | None, float | None]] = lambda topic: (None, None),
        replicated: bool = False,
    ) -> None:
        self.name = name
        # The shard epoch changes on every start: a restarted shard has lost its
        # counters and history, and clients must be able to tell.
        self.epoch = epoch or secrets.token_hex(4)
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.gateway_timeout = gateway_timeout
        self.history_for = history_for  # per-namespace overrides of size and age
        self.history_bytes_limit = history_bytes
        self.history_bytes = 0
        # Every stored entry in publication order, for the shard-wide byte cap. Entries
        # that left history another way stay here until popped or compacted.
        self._order: deque[tuple[str, int]] = deque()
        self.topics: dict[str, Topic] = {}
        self.gateways: dict[str, Gateway] = {}
        self.outbound: defaultdict[str, list[list[Any]]] = defaultdict(list)
        self.stats = ShardStats()
        self._generation = 0
        # Subscriber counts per topic and gateway, summed (``router.presence``).
        self.presence = ShardPresence()
        # Replicated streams: ``replicated`` says the streams live in a replica;
        # until the router list is known (``--peers``, or ROUTERS from a gateway)
        # there is none, and nothing is served.
        self.replicated = replicated
        self.replica: Replica | None = None
        # Subscribes to streams started here and not yet held by every copy, per topic:
        # (inbox, req, since epoch, since seq, last).
        self._held_subs: dict[str, list[tuple[str, int, str | None, int, int]]] = {}
        self.router_list: list[tuple[str, str]] | None = None  # as a gateway sent it
        self.own_name = ""  # this router's name in that list (the gateway's reply_as)

    # --- entry point ---------------------------------------------------------------

    def receive(self, sender: str, frames: list[Any], now: float, reply_as: str = "", *, checked: bool = True) -> None:
        """Apply one batch of frames from the gateway whose inbox is ``sender``.

        ``now`` is monotonic time. Malformed frames are counted and skipped; the
        sender has been authenticated (``fanroute.wire.ReplayGuard``), but its inbox is
        still checked before the shard would ever dial it. ``checked=False`` is for
        frames that crossed no wire (a gateway in this process,
        :mod:`fanroute.gateway.locallink`): the hub built them, nobody else could.
        """
        check = wire.check_gateway_frame if checked else _kind
        gw = self.gateways.get(sender)
        if gw is None:
            if not is_nng_url(sender):
                self.stats.senders_rejected += 1
                return
            # Frames queued before a (re)connect can precede the HELLO; the inbox
            # is all the shard needs to answer them.
            gw = self.gateways[sender] = Gateway(sender, "", now)
        gw.last_seen = now
        gw.reply_as = reply_as or self.name
        for frame in frames:
            try:
                kind = check(frame)
            except wire.WireError:
                self.stats.frames_rejected += 1
                continue
            try:
                if kind == wire.PUB:
                    self.publish(gw, frame[1], frame[2], frame[3], frame[4], now, frame[5])
                elif kind == wire.SUB:
                    last = frame[5] if len(frame) > 5 else 0
                    self.subscribe(gw, frame[1], frame[2], frame[3], frame[4], now, last)
                elif kind == wire.UNSUB:
                    self.unsubscribe(gw, frame[1])
                elif kind == wire.BEAT:
                    self.outbound[gw.inbox].append([wire.WELCOME, self.epoch, gw.instance])
                elif kind == wire.HELLO:
                    self.hello(gw, frame[2], frame[3], now)
                elif kind == wire.CTRL:
                    self.relay(frame)
                elif kind == wire.REPORT:
                    gw.report = (frame[2], frame[3], frame[4])
                elif kind == wire.INFOQ:
                    self.info(gw, frame[1])
                elif kind == wire.COUNTS:
                    report = self.presence.report
                    for topic, count, watching in frame[1]:
                        report(gw.inbox, topic, count, watching)
                elif kind == wire.COUNTQ:
                    total, yours = self.presence.total(frame[1], gw.inbox)
                    self.outbound[gw.inbox].append([wire.COUNTA, frame[1], frame[2], total, yours])
                elif kind == wire.ROUTERS:
                    if self.router_list is None:
                        listed = [(n, u) for n, u in frame[1]]
                        if all(is_nng_url(u) for _, u in listed):
                            self.router_list, self.own_name = listed, gw.reply_as
                        else:
                            self.stats.frames_rejected += 1  # a list this router could never dial
            except Exception:
                # One frame that trips a bug must not take the others (or the
                # process) with it: it is counted, and the batch goes on.
                self.stats.frames_failed += 1

    def take_outbound(self) -> dict[str, list[list[Any]]]:
        """Everything to send, per gateway inbox, since the last call."""
        out, self.outbound = self.outbound, defaultdict(list)
        return out

    # --- commands ------------------------------------------------------------------

    def _topic(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is None:
            # A topic that was forgotten and comes back gets a new epoch: its seq
            # restarts, and cursors from before must not be taken for current ones.
            self._generation += 1
            topic = self.topics[name] = Topic(f"{self.epoch}-{self._generation}", self.new_history(name))
        return topic

    def _evicted(self, entry: Entry) -> None:
        self.history_bytes -= entry.cost

    def _stored(self, name: str, entry: Entry) -> None:
        """Count an entry that joined ``name``'s history, and keep the byte cap."""
        self.history_bytes += entry.cost
        self._order.append((name, entry.seq))
        order, history_of = self._order, self._history_of
        while self.history_bytes > self.history_bytes_limit and order:
            old_name, old_seq = order.popleft()
            old = history_of(old_name)
            if old is not None and old.first_seq == old_seq:
                gone = old.evict_oldest()
                self.stats.history_evicted += 1
                self.stats.history_evicted_bytes += gone.cost

    def _histories(self) -> dict[str, History]:
        """Every topic's history this shard holds: its topics', or its replicated streams'."""
        if self.replica is not None:
            return {name: st.history for name, st in self.replica.streams.items()}
        return {name: t.history for name, t in self.topics.items()}

    def _history_of(self, name: str) -> History | None:
        if self.replica is not None:
            stream = self.replica.streams.get(name)
            return stream.history if stream is not None else None
        topic = self.topics.get(name)
        return topic.history if topic is not None else None

    def new_history(self, name: str) -> History:
        """A history for ``name`` (a topic's, or a replicated stream's), held to the
        shard-wide byte cap.

        Replicated streams are replaced whole when views change (a sync), so the bytes
        of one that was dropped are taken off at the next :meth:`sweep`, which counts
        them again from the histories that are left.
        """
        size, ttl = self.history_for(name)
        return History(
            self.history_size if size is None else size,
            self.history_ttl if ttl is None else ttl,
            self._evicted,
            lambda entry: self._stored(name, entry),
        )

    def publish(
        self, gw: Gateway, name: str, payload: bytes, req: int, ts: float, now: float, idem: str | None = None
    ) -> None:
        if self.replicated:
            if self.replica is None:
                self._refuse(gw.inbox, req, "unavailable", f"router {self.name} does not know its peers yet")
                return
            self.replica.publish(name, payload, ts, idem, (gw.inbox, req), now)
            self.pump(now)
            return
        topic = self._topic(name)
        if idem is not None:
            seq = topic.history.seq_of(idem)
            if seq is not None:
                self.stats.duplicates += 1
                if req:
                    self.outbound[gw.inbox].append([wire.PUBOK, name, req, seq])
                return
        topic.seq += 1
        topic.history.append(Entry(topic.seq, payload, ts, now, idem))
        self.stats.publications += 1
        if topic.gateways:
            frame = [wire.MSG, name, topic.seq, payload, ts]
            outbound = self.outbound
            for inbox in topic.gateways:
                outbound[inbox].append(frame)
            self.stats.fanout_sends += len(topic.gateways)
        if req:
            self.outbound[gw.inbox].append([wire.PUBOK, name, req, topic.seq])

    def subscribe(
        self, gw: Gateway, name: str, req: int, since_epoch: str | None, since_seq: int, now: float, last: int = 0
    ) -> None:
        """Add interest and answer with SUBOK: what ``since`` missed, or else the newest ``last``.

        The answer travels on the same ordered channel as the deliveries, so what it
        carries ends exactly where the live stream to this gateway goes on.
        """
        topic = self._topic(name)
        topic.gateways.add(gw.inbox)
        gw.topics.add(name)
        self.stats.subscribes += 1
        epoch, head, history = self._stream(name, topic, now)
        if history is None:
            # Not served here now (another router leads it, or this one is not
            # ready): the interest is kept, and the gateway learns where to go from
            # the VIEW it is sent; a request is refused so the client can retry.
            if req:
                self.outbound[gw.inbox].append([wire.NACK, req, "unavailable", f"router {self.name} does not serve {name!r} now"])
            self._send_view(gw.inbox)
            return
        if self._unconfirmed(name):
            # A stream this router just started: answered once every copy holds it.
            self._held_subs.setdefault(name, []).append((gw.inbox, req, since_epoch, since_seq, last))
            return
        recovered, missed = self._recover(epoch, head, history, since_epoch, since_seq, now, whole_new_epoch=not req)
        if not recovered and last > 0:
            missed = [[e.seq, e.payload, e.ts] for e in history.newest(last, now)]
        self.outbound[gw.inbox].append([wire.SUBOK, name, req, epoch, head, recovered, missed])

    def unsubscribe(self, gw: Gateway, name: str) -> None:
        gw.topics.discard(name)
        topic = self.topics.get(name)
        if topic is not None:
            topic.gateways.discard(gw.inbox)

    def hello(self, gw: Gateway, instance: str, interest: list[list[Any]], now: float) -> None:
        """A gateway (re)connected: its interest is exactly what it lists now."""
        if gw.instance != instance:
            gw.instance = instance
        # Its counts start again from what it reports after this HELLO.
        self.presence.forget(gw.inbox)
        for name in gw.topics:
            topic = self.topics.get(name)
            if topic is not None:
                topic.gateways.discard(gw.inbox)
        gw.topics = set()
        out = self.outbound[gw.inbox]
        out.append([wire.WELCOME, self.epoch, instance])
        for name, epoch, seq in interest:
            topic = self._topic(name)
            topic.gateways.add(gw.inbox)
            gw.topics.add(name)
            if epoch is not None:
                t_epoch, head, history = self._stream(name, topic, now)
                if history is None:
                    continue  # not served here now: the VIEW below sends the gateway on
                if self._unconfirmed(name):
                    self._held_subs.setdefault(name, []).append((gw.inbox, 0, epoch, seq, 0))
                    continue
                recovered, missed = self._recover(t_epoch, head, history, epoch, seq, now, whole_new_epoch=True)
                out.append([wire.SUBOK, name, 0, t_epoch, head, recovered, missed])
        self.announce_routers(gw.inbox)
        self._send_view(gw.inbox)

    def _unconfirmed(self, name: str) -> bool:
        """Whether ``name``'s stream was started here and not every copy holds it yet."""
        replica = self.replica
        if replica is None:
            return False
        stream = replica.streams.get(name)
        return stream is not None and not stream.created

    def _answer_held(self, names: list[str], now: float) -> None:
        """Answer the subscribes held for streams now held by every copy (or whose router changed)."""
        for name in names:
            for inbox, req, since_epoch, since_seq, last in self._held_subs.pop(name, ()):
                gw = self.gateways.get(inbox)
                if gw is not None:
                    self.subscribe(gw, name, req, since_epoch, since_seq, now, last)

    def _stream(self, name: str, topic: Topic, now: float) -> tuple[str, int, History | None]:
        """``(epoch, last seq delivered, history)`` of the stream this shard serves for ``name``.

        History is ``None`` when the topic is not served here now (replicated: this
        router does not lead it, or is not ready in its view).
        """
        if not self.replicated:
            return topic.epoch, topic.seq, topic.history
        replica = self.replica
        stream = replica.stream(name) if replica is not None and replica.serving(now) else None
        if stream is None:
            return "", 0, None
        return stream.epoch, stream.committed, stream.history

    def _recover(
        self,
        epoch: str,
        head: int,
        history: History,
        since_epoch: str | None,
        since_seq: int,
        now: float,
        *,
        whole_new_epoch: bool = False,
    ) -> tuple[bool, list[list[Any]]]:
        """Whether ``since`` can be recovered, and the entries after it.

        ``whole_new_epoch`` is for a gateway's own resynchronisation (HELLO, and
        interest it moves): when its epoch is gone but history still holds the new
        epoch from seq 1, every entry is sent, so its subscribers get the new epoch
        whole rather than from wherever it stood when the gateway came back.
        """
        if since_epoch is None:
            return False, []
        entries = history.after(since_seq, head, now) if since_epoch == epoch else None
        if entries is None:
            self.stats.not_recovered += 1
            if whole_new_epoch and since_epoch != epoch and head and history.first_seq == 1:
                return False, [[e.seq, e.payload, e.ts] for e in history.after(0, head, now) or ()]
            return False, []
        self.stats.recovered += 1
        return True, [[e.seq, e.payload, e.ts] for e in entries]

    # --- replicated streams ---------------------------------------------------------

    def _refuse(self, inbox: str, req: int, reason: str, message: str) -> None:
        self.stats.refused += 1
        if req:
            self.outbound[inbox].append([wire.NACK, req, _REFUSALS.get(reason, "unavailable"), message])
        else:
            self.stats.refused_silently += 1

    def announce_routers(self, inbox: str | None = None) -> None:
        """The router list to one gateway (or all): gateways link to routers added since they started."""
        if not self.replicated or not self.router_list:
            return
        frame = [wire.ROUTERS, [[n, u] for n, u in self.router_list]]
        for to in [inbox] if inbox is not None else list(self.gateways):
            self.outbound[to].append(frame)

    def _send_view(self, inbox: str) -> None:
        replica = self.replica
        if replica is not None and replica.ready and replica.view is not None:
            self.outbound[inbox].append([wire.VIEW, replica.view.number, list(replica.view.members)])

    def pump(self, now: float) -> None:
        """Turn what the replica decided into frames for gateways."""
        replica = self.replica
        if replica is None or not replica.events:
            return
        events, replica.events = replica.events, []
        outbound, topics = self.outbound, self.topics
        for ev in events:
            kind = type(ev)
            if kind is Committed:
                self.stats.publications += 1 if ev.deliver else 0
                for inbox, req in ev.tokens:
                    if req and inbox in self.gateways:
                        outbound[inbox].append([wire.PUBOK, ev.topic, req, ev.seq])
                topic = topics.get(ev.topic)
                if ev.deliver and topic is not None and topic.gateways:
                    frame = [wire.MSG, ev.topic, ev.seq, ev.payload, ev.ts]
                    for inbox in topic.gateways:
                        outbound[inbox].append(frame)
                    self.stats.fanout_sends += len(topic.gateways)
            elif kind is Refused:
                inbox, req = ev.token
                where = f"; {ev.leader} leads it now" if ev.leader else ""
                self._refuse(inbox, req, ev.reason, f"router {self.name} could not apply a publication to {ev.topic!r} ({ev.reason}{where})")
            elif kind is Created:
                self._answer_held([ev.topic], now)
            elif kind is Ready:
                for inbox in self.gateways:
                    self._send_view(inbox)
                self._answer_held(list(self._held_subs), now)  # served here or sent on

    # --- the server API -------------------------------------------------------------

    def relay(self, frame: list[Any]) -> None:
        """Pass a server API command (CTRL) on to every gateway this shard knows.

        Every gateway says HELLO to every shard, so any one shard reaches the whole
        cluster; the gateway that sent it gets it back too, and each gateway acts on a
        command once (by its id), however many shards relay it.
        """
        relayed = [wire.RELAY, *frame[1:]]
        for inbox in self.gateways:
            self.outbound[inbox].append(relayed)

    def info(self, gw: Gateway, req: int) -> None:
        """Answer INFOQ: this shard's counts and the last report of every gateway it knows."""
        reports = [[g.instance, g.inbox, *g.report] for g in self.gateways.values() if g.report is not None and g.instance]
        counts = [len(self.topics), len(self.gateways), self.interest_entries()]
        self.outbound[gw.inbox].append([wire.INFO, req, counts, reports])

    # --- housekeeping --------------------------------------------------------------

    def forget(self, inbox: str) -> None:
        gw = self.gateways.pop(inbox, None)
        if gw is None:
            return
        self.stats.gateways_forgotten += 1
        self.presence.forget(inbox)
        for name in gw.topics:
            topic = self.topics.get(name)
            if topic is not None:
                topic.gateways.discard(inbox)
        self.outbound.pop(inbox, None)

    def presence_tick(self, now: float) -> None:
        """Push the subscriber totals that are due (call a few times a second)."""
        presence = self.presence
        presence.liveness({inbox: g.last_seen for inbox, g in self.gateways.items()}, now)
        for inbox, items in presence.due(now).items():
            if inbox in self.gateways:
                self.outbound[inbox].append([wire.TOTALS, items])

    def sweep(self, now: float) -> list[str]:
        """Forget silent gateways and idle topics; return the inboxes forgotten."""
        silent = [g.inbox for g in self.gateways.values() if now - g.last_seen > self.gateway_timeout]
        for inbox in silent:
            self.forget(inbox)
        idle = []
        for name, topic in self.topics.items():
            if not topic.gateways:
                topic.history.trim(now)
                if not len(topic.history):
                    idle.append(name)
        for name in idle:
            del self.topics[name]
        self.stats.topics_evicted += len(idle)
        if self.replica is not None:
            histories = self._histories().values()
            for history in histories:
                history.trim(now)
            self.history_bytes = sum(h.bytes for h in histories)
        self._compact_order()
        return silent

    def _compact_order(self) -> None:
        """Drop the byte cap's records of entries that already left history.

        Entries leave by count and age without touching the order (that would cost
        a search each); the records are dropped here: those at the front at each
        sweep, and the rest in one pass once they outnumber the live ones, so the
        order stays proportional to what is stored.
        """
        order, histories = self._order, self._histories()
        # Records leave history oldest first, mostly: those at the front go cheaply.
        while order:
            name, seq = order[0]
            history = histories.get(name)
            first = history.first_seq if history is not None else None  # None: nothing left in it
            if first is not None and seq >= first:
                break
            order.popleft()
        live = sum(len(h) for h in histories.values())
        if len(order) <= 2 * live + 1024:
            return
        firsts = {name: h.first_seq for name, h in histories.items()}
        self._order = deque(
            (name, seq) for name, seq in self._order if (first := firsts.get(name)) is not None and seq >= first
        )

    def interest_entries(self) -> int:
        return sum(len(t.gateways) for t in self.topics.values())

    def history_messages(self) -> int:
        return sum(len(h) for h in self._histories().values())
