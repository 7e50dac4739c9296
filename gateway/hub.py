"""The gateway's routing rules: local index, interest, requests and fan-out.

The hub does no I/O. Client commands and shard frames come in as method calls; what
must go out is left in two places the I/O shell drains:

* :attr:`Hub.to_shards` — inter-node frames per shard name, batched by the link task;
* each :class:`Session`'s outbox, with the session added to :attr:`Hub.dirty` so the
  shell flushes every touched socket once per batch rather than once per frame.

Ordering rests on one property of the shard link: a shard answers a subscribe (SUBOK)
on the same ordered channel as its deliveries (MSG). So a subscriber waiting for its
SUBOK is simply skipped by live deliveries; every message it missed meanwhile has a seq
at or below the SUBOK's seq and comes inside the SUBOK's history, and every later
delivery comes after it. No buffering, no gap, no duplicate.

Payloads are checked once, on the way in (:func:`fanroute.codec.pack_payload`: a JSON
value every encoding can carry, within the size limit), and again when they come
back from a shard (:func:`fanroute.codec.unpack_payload`), so nothing a shard holds
can make the fan-out fail. A frame whose handling raises anyway is counted and
skipped; the rest of its batch goes on.

An answer is never false. A publication refused before it left for its shard was
not applied (``unavailable``); one that was handed to the link when the link was
lost may or may not have been (``outcome_unknown``), and a retry with the same
``idem`` key is then safe.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Protocol

from fanroute import protocol as p
from fanroute.codes import ErrorCode
from fanroute import wire
from fanroute.codec import Encoding, FrameCache, pack_payload, unpack_payload
from fanroute.ring import Ring

_kind = itemgetter(0)  # a frame's kind, for frames that need no check (see ``checked``)
from fanroute.gateway.conflation import Conflation
from fanroute.gateway.presence import GatewayPresence


class Outbox(Protocol):
    size: int  # bytes waiting to be written (what conflation watches)

    def push(self, frame: bytes) -> None: ...


PENDING, ACTIVE = 0, 1


@dataclass(eq=False, slots=True)
class Session:
    """One client connection as the hub sees it."""

    id: str
    encoding: Encoding
    outbox: Outbox
    topics: dict[str, int] = field(default_factory=dict)  # topic -> PENDING | ACTIVE
    closed: bool = False
    # Held messages of conflated topics, made the first time this connection falls
    # behind on one (fanroute.gateway.conflation).
    conflation: Conflation[FrameCache] | None = None

    def send(self, event: dict[str, Any]) -> None:
        self.outbox.push(self.encoding.encode(event))


@dataclass(slots=True)
class TopicEntry:
    """A topic with local subscribers: who they are and where the stream stands."""

    subscribers: dict[Session, None] = field(default_factory=dict)  # ordered set
    pending: dict[Session, int] = field(default_factory=dict)  # session -> request
    epoch: str | None = None
    seq: int = 0
    synced: bool = False  # epoch/seq confirmed by the shard since the link last came up
    conflate: bool = False  # its namespace says conflate = true
    resyncing: bool = False  # a resynchronisation (SUB with since, req 0) is on its way


@dataclass(slots=True)
class Request:
    kind: int  # wire.SUB, wire.PUB or wire.COUNTQ
    shard: str
    session: Session
    client_id: int | None
    topic: str
    since: p.Since | None = None
    last: int = 0
    presence: bool = False


@dataclass(slots=True)
class HubStats:
    """Hot-path counters, read by the metrics collector at scrape time."""

    deliveries_received: int = 0  # MSG frames from shards
    deliveries_unrouted: int = 0  # MSG frames for topics with no local subscriber
    deliveries_sent: int = 0  # frames written to subscribers (one per subscriber)
    gaps: int = 0
    duplicates_dropped: int = 0  # deliveries at or below a topic's position (already sent)
    publishes: int = 0
    subscribes: int = 0
    unsubscribes: int = 0
    resumes: int = 0
    recovered: int = 0
    not_recovered: int = 0
    frames_rejected: int = 0
    frames_failed: int = 0  # shard frames whose handling raised (dropped)
    conflated: int = 0  # messages of conflated topics left out for a subscriber behind
    payloads_rejected: int = 0  # deliveries whose payload failed the check (dropped)
    errors: dict[str, int] = field(default_factory=dict)


class Hub:
    def __init__(
        self,
        ring: Ring,
        *,
        inbox: str,
        instance: str,
        observe_latency: Callable[[float], None] = lambda seconds: None,
        max_payload: int = 64 * 1024,
        clock: Callable[[], float] = time.monotonic,
        conflates: Callable[[str], bool] = lambda topic: False,
        conflate_threshold: int = 64 * 1024,
    ) -> None:
        self.ring = ring
        self.max_payload = max_payload
        self.inbox = inbox
        self.instance = instance
        self.topics: dict[str, TopicEntry] = {}
        self.requests: dict[int, Request] = {}
        self.to_shards: dict[str, list[list[Any]]] = {name: [] for name in ring.shards}
        self.shard_up: dict[str, bool] = {name: False for name in ring.shards}
        self.dirty: set[Session] = set()
        self.stats = HubStats()
        self._observe_latency = observe_latency
        self._clock = clock
        self._conflates = conflates
        self.conflate_threshold = conflate_threshold
        self.conflating: set[Session] = set()  # sessions holding conflated messages back
        # Subscriber counts: this gateway's own, and the pushes to its watchers.
        self.presence_counts = GatewayPresence()
        self._req_ids = itertools.count(1)
        self._hello_pending: set[str] = set()
        # The server API's frames from shards (RELAY, INFO), for the shell to carry
        # out: they act on connections, which the hub does not own (gateway.control).
        self.on_control: Callable[[str, list[Any]], None] = lambda shard, frame: None
        # Per shard, the newest publish request queued, and the newest handed to the
        # link (request ids only grow): what a lost link leaves unknown, see link_down.
        self._queued_pub: dict[str, int] = {name: 0 for name in ring.shards}
        self._sent_pub: dict[str, int] = {name: 0 for name in ring.shards}
        # Replicated streams (router/REPLICATION.md): the routers of the newest view
        # any router announced. A topic's shard is the first of them in its rendezvous
        # order; with no view yet, the ring's owner.
        self.view_number = 0
        self.view_members: frozenset[str] | None = None
        self._view_listed: tuple[str, ...] = ()  # the view's members as announced (some maybe not linked yet)
        # Routers added to the cluster after this gateway started (shard → gateway
        # ROUTERS): the shell links to them (set by the server).
        self.on_routers: Callable[[list[tuple[str, str]]], None] = lambda routers: None
        self._view_synced: set[str] = set()  # routers whose VIEW of view_number was acted on
        self._owners: dict[str, str] = {}
        # The ROUTERS frame sent after HELLO, so routers learn each other (set by the server).
        self.routers_frame: list[Any] | None = None

    def owner(self, topic: str) -> str:
        """The shard that serves ``topic`` now."""
        members = self.view_members
        if members is None:
            return self.ring.owner(topic)
        shard = self._owners.get(topic)
        if shard is None:
            order = self.ring.order(topic)
            shard = next((r for r in order if r in members), order[0])
            if len(self._owners) > 65536:
                self._owners.clear()
            self._owners[topic] = shard
        return shard

    # --- helpers -------------------------------------------------------------------

    def _error(self, session: Session, code: str, message: str, id: int | None) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        session.send(p.error_event(code, message, id))
        self.dirty.add(session)

    def _reply(self, session: Session, event: dict[str, Any]) -> None:
        session.send(event)
        self.dirty.add(session)

    def reject(self, session: Session, err: p.ProtocolError) -> None:
        """Answer a command that failed validation."""
        self._error(session, err.code, err.message, err.id)

    def _shard_for(self, session: Session, topic: str, id: int | None) -> str | None:
        shard = self.owner(topic)
        if not self.shard_up[shard]:
            self._error(session, ErrorCode.UNAVAILABLE, f"the shard for {topic!r} is unreachable", id)
            return None
        return shard

    def backlog(self, shard: str) -> int:
        return len(self.to_shards[shard])

    # --- client commands -----------------------------------------------------------

    def subscribe(self, session: Session, cmd: p.Subscribe) -> None:
        topic, since = cmd.topic, cmd.since
        if topic in session.topics:
            self._error(session, ErrorCode.BAD_REQUEST, f"already subscribed to {topic!r}", cmd.id)
            return
        shard = self._shard_for(session, topic, cmd.id)
        if shard is None:
            return
        self.stats.subscribes += 1
        if since is not None:
            self.stats.resumes += 1
        entry = self.topics.get(topic)
        if entry is None:
            entry = self.topics[topic] = TopicEntry(conflate=self._conflates(topic))
        elif entry.synced and (
            (since is None and not cmd.last) or (since is not None and since.epoch == entry.epoch and since.seq == entry.seq)
        ):
            # The gateway already follows this topic and knows where it stands:
            # answer here, without a round trip to the shard. A subscribe that asks
            # for ``last`` (and cannot be recovered here) always goes to the shard:
            # its SUBOK carries the newest messages on the ordered channel of the
            # deliveries, which is what makes them end exactly where the live
            # stream goes on (see the module docstring); a copy kept here could not
            # promise that without a second ordering rule.
            recovered = since is not None
            if recovered:
                self.stats.recovered += 1
            session.send(p.subscribed_event(topic, entry.epoch, entry.seq, recovered, cmd.id))
            self._activate(session, topic, entry, cmd.presence)
            return
        req = next(self._req_ids)
        self.requests[req] = Request(wire.SUB, shard, session, cmd.id, topic, since, cmd.last, cmd.presence)
        entry.pending[session] = req
        session.topics[topic] = PENDING
        self.to_shards[shard].append(_sub_frame(topic, req, since, cmd.last))

    def _activate(self, session: Session, topic: str, entry: TopicEntry, presence: bool) -> None:
        """``session`` now gets ``topic``'s live messages: count it, and start its presence pushes."""
        entry.subscribers[session] = None
        session.topics[topic] = ACTIVE
        counts = self.presence_counts
        counts.joined(topic)
        if presence:
            count = counts.watch(topic, session, self._clock())
            if count is not None:
                session.send(p.presence_event(topic, count))
            else:
                self._ask_count(topic)
        self.dirty.add(session)

    def presence(self, session: Session, cmd: p.Presence) -> None:
        """Answer ``session`` with the cluster-wide subscriber count of ``cmd.topic``.

        The one way to read a count (the ``presence`` command and ``GET
        /api/presence`` both come here): from the total this gateway keeps up to date
        when it has watchers for the topic, else by asking the topic's shard. The
        answer is a ``presence`` event with the command's ``id`` in the session's
        outbox (``unavailable`` if the shard cannot be reached).
        """
        known = self.presence_counts.known(cmd.topic)
        if known is not None:
            self._reply(session, p.presence_event(cmd.topic, known, cmd.id))
            return
        shard = self._shard_for(session, cmd.topic, cmd.id)
        if shard is None:
            return
        req = next(self._req_ids)
        self.requests[req] = Request(wire.COUNTQ, shard, session, cmd.id, cmd.topic)
        self.to_shards[shard].append([wire.COUNTQ, cmd.topic, req])

    def _ask_count(self, topic: str) -> None:
        """Ask the shard for a watched topic's total (the answer feeds every watcher)."""
        shard = self.owner(topic)
        if self.shard_up[shard]:
            self.to_shards[shard].append([wire.COUNTQ, topic, 0])

    def tick(self) -> None:
        """What is due a few times a second: presence reports and pushes, held conflated messages."""
        self.presence_tick()
        self.release_conflated()

    def presence_tick(self) -> None:
        """Report changed counts to the shards and push counts to watchers (a few times a second)."""
        counts = self.presence_counts
        by_shard: dict[str, list[list[Any]]] = {}
        owner = self.owner
        for topic, local, watching in counts.reports():
            by_shard.setdefault(owner(topic), []).append([topic, local, watching])
        for shard, items in by_shard.items():
            self.to_shards[shard].append([wire.COUNTS, items])
        self._push_counts()

    def _push_counts(self) -> None:
        for topic, count, watchers in self.presence_counts.due(self._clock()):
            frames = FrameCache(p.presence_event(topic, count))
            self._fan_out(watchers, frames, count_deliveries=False)

    def unsubscribe(self, session: Session, cmd: p.Unsubscribe) -> None:
        self._leave(session, cmd.topic)
        self.stats.unsubscribes += 1
        self._reply(session, p.unsubscribed_event(cmd.topic, cmd.id))

    def publish(self, session: Session, cmd: p.Publish) -> None:
        try:
            payload = pack_payload(cmd.payload, self.max_payload)
        except p.ProtocolError as err:
            self._error(session, err.code, err.message, cmd.id)
            return
        shard = self._shard_for(session, cmd.topic, cmd.id)
        if shard is None:
            return
        self.stats.publishes += 1
        req = 0
        if cmd.id is not None:
            req = next(self._req_ids)
            self.requests[req] = Request(wire.PUB, shard, session, cmd.id, cmd.topic)
            self._queued_pub[shard] = req
        self.to_shards[shard].append([wire.PUB, cmd.topic, payload, req, time.time(), cmd.idem])

    def handed_off(self, shard: str) -> None:
        """The link took everything queued for ``shard``: it may now be applied."""
        self._sent_pub[shard] = self._queued_pub[shard]

    def revoke(self, session: Session, topic: str) -> None:
        """End a subscription the server withdrew: an unsolicited ``unsubscribed``."""
        if topic in session.topics:
            self._leave(session, topic)
            self._reply(session, p.unsubscribed_event(topic))

    def ping(self, session: Session, cmd: p.Ping) -> None:
        self._reply(session, p.pong_event(cmd.ts, cmd.id))

    def close_session(self, session: Session) -> None:
        """Withdraw everything a closed connection held."""
        session.closed = True
        for topic in list(session.topics):
            self._leave(session, topic)
        self.dirty.discard(session)

    def _leave(self, session: Session, topic: str) -> None:
        state = session.topics.pop(topic, None)
        if state is None:
            return
        entry = self.topics[topic]
        if state == ACTIVE:
            self.presence_counts.left(topic)
            self.presence_counts.unwatch(topic, session)
            if session.conflation is not None:
                self.stats.conflated += session.conflation.drop(topic)
        entry.subscribers.pop(session, None)
        entry.pending.pop(session, None)
        if not entry.subscribers and not entry.pending:
            # Last local subscriber out: the shard stops sending this topic here.
            del self.topics[topic]
            shard = self.owner(topic)
            if self.shard_up[shard]:
                self.to_shards[shard].append([wire.UNSUB, topic])

    # --- shard links ---------------------------------------------------------------

    def link_up(self, shard: str) -> None:
        """A shard link (re)connected: introduce this gateway with its whole interest.

        Topics with subscribers are listed with the position this gateway reached, so
        the shard can send what was missed (or say it cannot); subscribes still
        waiting for an answer are sent again.
        """
        interest = []
        for topic, entry in self.topics.items():
            if entry.subscribers and self.owner(topic) == shard:
                interest.append([topic, entry.epoch, entry.seq])
        self._fail_publications(shard)
        frames: list[list[Any]] = [[wire.HELLO, self.inbox, self.instance, interest]]
        if self.routers_frame is not None:
            frames.append(self.routers_frame)
        for req, r in self.requests.items():
            if r.kind == wire.SUB and r.shard == shard:
                frames.append(_sub_frame(r.topic, req, r.since, r.last))
            elif r.kind == wire.COUNTQ and r.shard == shard:
                frames.append([wire.COUNTQ, r.topic, req])
        self.to_shards[shard] = frames
        self._hello_pending.add(shard)
        # After the HELLO the shard knows none of this gateway's counts: report them all.
        self.presence_counts.lost(lambda topic: self.owner(topic) == shard)

    def link_down(self, shard: str) -> None:
        """A shard became unreachable: fail what cannot be answered any more."""
        self.shard_up[shard] = False
        self._fail_publications(shard)
        self.to_shards[shard] = []
        self.presence_counts.lost(lambda topic: self.owner(topic) == shard)
        for req in [req for req, r in self.requests.items() if r.kind == wire.COUNTQ and r.shard == shard]:
            r = self.requests.pop(req)
            if not r.session.closed:
                self._error(r.session, ErrorCode.UNAVAILABLE, f"lost the shard for {r.topic!r}", r.client_id)
        for topic, entry in self.topics.items():
            if self.owner(topic) == shard:
                entry.synced = entry.resyncing = False

    def _fail_publications(self, shard: str) -> None:
        """Answer every publication still waiting on ``shard``, truthfully.

        Those still queued here are dropped with the queue: not applied. Those
        already handed to the link may have been applied: the client is told the
        outcome is unknown, and retries with its ``idem`` key.
        """
        sent = self._sent_pub[shard]
        lost = [req for req, r in self.requests.items() if r.kind == wire.PUB and r.shard == shard]
        for req in lost:
            r = self.requests.pop(req)
            if r.session.closed:
                continue
            if req <= sent:
                self._error(
                    r.session,
                    ErrorCode.OUTCOME_UNKNOWN,
                    f"lost the shard for {r.topic!r} after sending: the publication may have been applied",
                    r.client_id,
                )
            else:
                self._error(
                    r.session, ErrorCode.UNAVAILABLE, f"lost the shard for {r.topic!r}; the publication was not applied", r.client_id
                )
        self._sent_pub[shard] = self._queued_pub[shard]

    def on_shard_frames(self, shard: str, frames: list[Any], *, checked: bool = True) -> None:
        """Apply one batch of frames from a shard; a frame that fails is counted and skipped.

        ``checked=False`` is for frames that crossed no wire (a shard in this process,
        :mod:`fanroute.gateway.locallink`): the shard built them, nobody else could.
        """
        check = wire.check_shard_frame if checked else _kind
        for frame in frames:
            try:
                kind = check(frame)
            except wire.WireError:
                self.stats.frames_rejected += 1
                continue
            try:
                self._on_shard_frame(shard, kind, frame)
            except Exception:
                self.stats.frames_failed += 1

    def _on_shard_frame(self, shard: str, kind: int, frame: list[Any]) -> None:
        if kind == wire.MSG:
            self._deliver(frame[1], frame[2], frame[3], frame[4])
        elif kind == wire.SUBOK:
            if frame[2]:
                self._subscribed(frame)
            else:
                self._resynced(frame)
        elif kind == wire.PUBOK:
            r = self.requests.pop(frame[2], None)
            if r is not None and not r.session.closed:
                self._reply(r.session, p.published_event(r.topic, frame[3], r.client_id))
        elif kind == wire.WELCOME:
            if frame[2] == self.instance:
                self.shard_up[shard] = True
                self._hello_pending.discard(shard)
            elif shard not in self._hello_pending:
                # The shard does not know this gateway (it restarted, or forgot
                # it after missed heartbeats): introduce ourselves again.
                self.shard_up[shard] = False
                self.link_up(shard)
        elif kind == wire.NACK:
            r = self.requests.get(frame[1])
            if r is None or r.shard != shard:
                return  # the request moved to another shard meanwhile
            del self.requests[frame[1]]
            if r.session.closed:
                return
            if r.kind == wire.SUB and r.session.topics.get(r.topic) == PENDING:
                self._leave(r.session, r.topic)
            self._error(r.session, frame[2], frame[3], r.client_id)
        elif kind == wire.VIEW:
            self._view(shard, frame[1], frame[2])
        elif kind == wire.ROUTERS:
            added = [(str(n), str(u)) for n, u in frame[1] if n not in self.to_shards]
            if added:
                self.on_routers(added)
        elif kind == wire.RELAY or kind == wire.INFO:
            self.on_control(shard, frame)
        elif kind == wire.TOTALS:
            totals = self.presence_counts.totals
            for topic, total, yours in frame[1]:
                totals(topic, total, yours)
            self._push_counts()
        elif kind == wire.COUNTA:
            _, topic, req, total, yours = frame
            self.presence_counts.totals(topic, total, yours)
            r = self.requests.pop(req, None) if req else None
            if r is not None and not r.session.closed:
                local = self.presence_counts.topics.get(topic)
                count = max(0, total - yours + (local.local if local is not None else 0))
                self._reply(r.session, p.presence_event(topic, count, r.client_id))
            self._push_counts()

    def _resync(self, topic: str, entry: TopicEntry) -> None:
        """Ask the topic's shard for everything after this gateway's position, once."""
        if entry.resyncing:
            return
        shard = self.owner(topic)
        if self.shard_up[shard]:
            entry.resyncing = True
            self.to_shards[shard].append([wire.SUB, topic, 0, entry.epoch, entry.seq])

    def _view(self, shard: str, number: int, members: list[str]) -> None:
        """A router is ready in view ``number``: move topics to their new shards.

        Interest in a topic whose shard changed is sent to the new one with this
        gateway's position (``since``), so whatever the gateway missed in flight
        arrives by the ordinary recovery path; subscribes and count queries still
        waiting move with it. The router that announced the view is sent the
        position of every topic it serves: it may have taken over streams, or held
        interest it could not serve before it was ready.
        """
        if number < self.view_number:
            return
        if number > self.view_number:
            self.view_number, self._view_listed = number, tuple(members)
            self._view_synced = set()
            self._adopt_view()
        if shard in self._view_synced or shard not in self.to_shards:
            return
        self._view_synced.add(shard)
        queue = self.to_shards[shard]
        for topic, entry in self.topics.items():
            if entry.subscribers and entry.epoch is not None and self.owner(topic) == shard:
                queue.append([wire.SUB, topic, 0, entry.epoch, entry.seq])

    def add_shard(self, name: str) -> bool:
        """A router joined the cluster: route to it (the shell links to it)."""
        if name in self.to_shards:
            return False
        self.ring = Ring((*self.ring.shards, name))
        self.to_shards[name] = []
        self.shard_up[name] = False
        self._queued_pub[name] = self._sent_pub[name] = 0
        if name in self._view_listed:
            self._adopt_view()  # the view named it before this gateway knew where it was
        return True

    def _adopt_view(self) -> None:
        """Route by the current view's members that this gateway links to; move what moved."""
        before = {topic: self.owner(topic) for topic in self.topics}
        known = frozenset(m for m in self._view_listed if m in self.to_shards)
        self.view_members = known or None
        self._owners.clear()
        moved = set()
        for topic, old in before.items():
            if self.owner(topic) != old:
                moved.add(topic)
                entry = self.topics[topic]
                entry.synced = entry.resyncing = False
                if self.shard_up.get(old):
                    self.to_shards[old].append([wire.UNSUB, topic])
                if entry.subscribers and entry.epoch is not None:
                    self._resync(topic, entry)
        for req, r in self.requests.items():
            if r.kind == wire.SUB and self.owner(r.topic) != r.shard:
                r.shard = self.owner(r.topic)
                self.to_shards[r.shard].append(_sub_frame(r.topic, req, r.since, r.last))
            elif r.kind == wire.COUNTQ and self.owner(r.topic) != r.shard:
                r.shard = self.owner(r.topic)
                self.to_shards[r.shard].append([wire.COUNTQ, r.topic, req])
        if moved:
            self.presence_counts.lost(moved.__contains__)

    def _deliver(self, topic: str, seq: int, payload: Any, ts: float) -> None:
        self.stats.deliveries_received += 1
        entry = self.topics.get(topic)
        if entry is None or not entry.subscribers:
            self.stats.deliveries_unrouted += 1
            return
        if seq != entry.seq + 1 and entry.epoch is not None:
            # Out of order: a delivery lost in flight (or one that overtook the answer
            # to a move of the topic). Subscribers are never shown a gap or a repeat:
            # what is missing comes in order from the shard's history (``since``).
            if seq > entry.seq:
                self.stats.gaps += 1
                self._resync(topic, entry)
            else:
                self.stats.duplicates_dropped += 1
            return
        entry.seq = seq
        event = self._message(topic, payload, seq)
        if event is None:
            return
        self._observe_latency(time.time() - ts)
        if entry.conflate:
            self._fan_out_conflated(topic, seq, entry.subscribers, FrameCache(event))
        else:
            self._fan_out(entry.subscribers, FrameCache(event))

    def _message(self, topic: str, payload: bytes, seq: int) -> dict[str, Any] | None:
        """A message event from a shard's payload bytes, or ``None`` (counted) if they fail the check."""
        try:
            return p.message_event(topic, unpack_payload(payload), seq)
        except p.ProtocolError:
            self.stats.payloads_rejected += 1
            return None

    def _fan_out(self, sessions: Any, frames: FrameCache, count_deliveries: bool = True) -> None:
        dirty = self.dirty
        json_frame = None
        for session in sessions:
            if session.encoding is Encoding.JSON:
                if json_frame is None:
                    json_frame = frames.get(Encoding.JSON)
                session.outbox.push(json_frame)
            else:
                session.outbox.push(frames.get(session.encoding))
            dirty.add(session)
        if count_deliveries:
            self.stats.deliveries_sent += len(sessions)

    def _fan_out_conflated(self, topic: str, seq: int, sessions: Any, frames: FrameCache) -> None:
        """Fan out a message of a conflated topic: at once, or held as the newest of its topic.

        A subscriber whose buffer is within the threshold, with nothing of this topic
        held, gets the frame as every other does; otherwise its conflation keeps it
        as the topic's newest and counts what it replaced (``gateway.conflation``).
        """
        threshold, dirty, sent = self.conflate_threshold, self.dirty, 0
        for session in sessions:
            frame = frames.get(session.encoding)
            outbox = session.outbox
            c = session.conflation
            if c is None:
                if outbox.size <= threshold:
                    outbox.push(frame)
                    dirty.add(session)
                    sent += 1
                    continue
                c = session.conflation = Conflation(threshold)
            before = c.conflated
            if c.offer(topic, seq, frames, len(frame), outbox.size):
                outbox.push(frame)
                dirty.add(session)
                sent += 1
            else:
                self.stats.conflated += c.conflated - before
                self.conflating.add(session)
        self.stats.deliveries_sent += sent

    def release_conflated(self) -> None:
        """Write the held messages of every subscriber whose buffer drained to the threshold.

        Called a few times a second (and cheap when nobody is behind): a subscriber
        that reads again gets the newest message of each conflated topic within a tick.
        """
        done = []
        for session in self.conflating:
            c = session.conflation
            if session.closed or c is None:
                done.append(session)
                continue
            for held in c.take(session.outbox.size):
                event = held.item.event
                if held.skipped:
                    session.send({**event, "skipped": held.skipped})
                else:
                    session.outbox.push(held.item.get(session.encoding))
                self.stats.deliveries_sent += 1
                self.dirty.add(session)
            if not len(c):
                done.append(session)
        for session in done:
            self.conflating.discard(session)

    def _subscribed(self, frame: list[Any]) -> None:
        _, topic, req, epoch, seq, recovered, missed = frame
        r = self.requests.pop(req, None)
        entry = self.topics.get(topic)
        if entry is None:
            return
        if entry.subscribers and entry.epoch != epoch:
            self._epoch_changed(topic, entry, epoch, seq)
        entry.epoch, entry.seq, entry.synced = epoch, seq, True
        if r is None or r.session.closed or entry.pending.get(r.session) != req:
            return  # answered already, or the subscriber left meanwhile
        session = r.session
        del entry.pending[session]
        if r.since is not None:
            if recovered:
                self.stats.recovered += 1
            else:
                self.stats.not_recovered += 1
        session.send(p.subscribed_event(topic, epoch, seq, recovered, r.client_id))
        for m_seq, payload, _ts in missed:
            if (event := self._message(topic, payload, m_seq)) is not None:
                if entry.conflate:
                    self._fan_out_conflated(topic, m_seq, (session,), FrameCache(event))
                else:
                    session.send(event)
        self._activate(session, topic, entry, r.presence)

    def _resynced(self, frame: list[Any]) -> None:
        """The answer to HELLO for one topic: fill the gap, or say it cannot be filled."""
        _, topic, _, epoch, seq, recovered, missed = frame
        entry = self.topics.get(topic)
        if entry is None:
            return
        entry.resyncing = False
        if recovered and epoch == entry.epoch:
            self._fan_out_missed(topic, entry, [m for m in missed if m[0] > entry.seq])
        elif entry.subscribers:
            # A new epoch. When the shard could send it whole (``missed`` from seq
            # 1), subscribers are told where it starts and get every message of it.
            start = missed[0][0] - 1 if missed else seq
            self._epoch_changed(topic, entry, epoch, start)
            self._fan_out_missed(topic, entry, missed)
        entry.epoch, entry.seq, entry.synced = epoch, seq, True

    def _fan_out_missed(self, topic: str, entry: TopicEntry, missed: list[list[Any]]) -> None:
        """Send every subscriber of ``topic`` the messages a resynchronisation brought, in order."""
        for m_seq, payload, _ts in missed:
            if (event := self._message(topic, payload, m_seq)) is None:
                continue
            if entry.conflate:
                self._fan_out_conflated(topic, m_seq, entry.subscribers, FrameCache(event))
            else:
                self._fan_out(entry.subscribers, FrameCache(event))

    def _epoch_changed(self, topic: str, entry: TopicEntry, epoch: str, seq: int) -> None:
        # The stream these subscribers followed is gone (the shard restarted or the
        # gap outgrew its history). Each is told with an unsolicited `subscribed`
        # carrying the new epoch and recovered:false, then the stream goes on.
        self.stats.not_recovered += len(entry.subscribers)
        for session in entry.subscribers:
            # What was held of the old stream must not follow the new epoch's answer.
            if session.conflation is not None:
                self.stats.conflated += session.conflation.drop(topic)
        self._fan_out(entry.subscribers, FrameCache(p.subscribed_event(topic, epoch, seq, False)))


def _sub_frame(topic: str, req: int, since: p.Since | None, last: int = 0) -> list[Any]:
    frame: list[Any] = [wire.SUB, topic, req, None, 0] if since is None else [wire.SUB, topic, req, since.epoch, since.seq]
    if last:
        frame.append(last)
    return frame
