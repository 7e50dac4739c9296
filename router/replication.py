"""Replicated topic streams: views, leases, appends and syncs, with no I/O.

The design and the argument for it are in ``router/REPLICATION.md``. In short: the
routers install numbered *views* (sets of live routers, always a majority, every
member having promised the view's number); in a view the copies of a topic are the
first ``copies`` members in the topic's rendezvous order and the first copy leads;
an entry is committed (acknowledged, delivered) only when every copy holds it and
the leader holds a *lease* (a majority acknowledged one of its heartbeats of the
view within ``timeout``); a new view is installed only after every lease of an older
one has run out, and each stream is taken from one copy that was ready in the last
ready view (its *source*) before anyone serves it.

:class:`Replica` is one router's side. The I/O shell feeds it router messages
(:meth:`Replica.receive`), publications (:meth:`Replica.publish`) and the time
(:meth:`Replica.tick`), and drains two lists: :attr:`Replica.out` — messages for
other routers, ``(name, message)``, each message a short list whose first item is
its kind (``fanroute.wire``'s ``PEER_*`` frames, checked there) — and :attr:`Replica.events`
— what happened to publications (:class:`Committed`, :class:`Refused`) and to the
router (:class:`Ready`, :class:`StreamDropped`).

Messages between routers, all numbered by view (``n``):

    BEAT     [60, n, beat_id, incarnation, promised]   heartbeat; renews the sender's lease
    BEATOK   [61, n, beat_id]                   the receiver has not promised anything above n
    PROPOSE  [62, n, members]
    PROMISE  [63, n, ready_n, ready_members]    the last view the sender was ready in
    REFUSE   [64, n, promised]                  n is too low; propose above ``promised``
    INSTALL  [65, n, members, q, q_members, sources]
    SYNC     [66, n, topic, epoch, seq, [[seq, payload, ts, idem], ...]]
    SYNCDONE [67, n, count]                     ``count`` syncs were sent to the receiver
    APPEND   [68, n, topic, epoch, seq, payload, ts, idem]
    APPENDED [69, n, topic, seq]
    LEAVE    [70]                               the sender stopped serving and is going
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fanroute.history import Entry, History

from fanroute.wire import (  # the frame kinds live with the other inter-node frames
    PEER_APPEND as APPEND,
    PEER_APPENDED as APPENDED,
    PEER_BEAT as BEAT,
    PEER_BEATOK as BEATOK,
    PEER_INSTALL as INSTALL,
    PEER_LEAVE as LEAVE,
    PEER_PROMISE as PROMISE,
    PEER_PROPOSE as PROPOSE,
    PEER_REFUSE as REFUSE,
    PEER_SYNC as SYNC,
    PEER_SYNCDONE as SYNCDONE,
)

_RANK_SPACE = 4096  # view numbers are round * _RANK_SPACE + rank + 1: unique per proposer
LOSS_GRACE = 10  # timeouts to wait for a missing copy before a view can lose every copy of a topic
DRIFT = 0.1  # clock rate margin: a lease holder counts L, a proposer waits L * (1 + DRIFT)


@dataclass(frozen=True, slots=True)
class View:
    number: int
    members: tuple[str, ...]


@dataclass(slots=True)
class Stream:
    """A topic's stream on one router: what moves when its copies change."""

    epoch: str
    history: History  # on the leader: committed entries only, what subscribers may see
    seq: int = 0  # the last seq assigned (leader) or held (copy)
    committed: int = 0  # the last seq every copy holds (on the leader)
    # On the leader: entries assigned a seq but not yet held by every copy.
    pending: dict[int, Entry] = field(default_factory=dict)
    pending_idem: dict[str, int] = field(default_factory=dict)
    # Whether every copy holds the stream (its epoch): a stream a leader starts is
    # announced to its copies (an append of seq 0) and shown to no subscriber before
    # they all hold it, so losing the leader right after cannot change its epoch.
    created: bool = True

    def entry(self, seq: int, now: float) -> Entry | None:
        """Entry ``seq``, pending or still in history."""
        pending = self.pending.get(seq)
        if pending is not None:
            return pending
        last = self.seq - len(self.pending)  # pending entries are the newest seqs
        if not 1 <= seq <= last:
            return None
        entries = self.history.after(seq - 1, last, now)
        return entries[0] if entries else None

    def commit(self, seq: int) -> Entry | None:
        """Move pending entry ``seq`` into history (every copy holds it now)."""
        self.committed = max(self.committed, seq)
        entry = self.pending.pop(seq, None)
        if entry is not None:
            if entry.idem is not None:
                self.pending_idem.pop(entry.idem, None)
            self.history.append(entry)
        return entry

    def seq_of(self, idem: str) -> int | None:
        seq = self.pending_idem.get(idem)
        return seq if seq is not None else self.history.seq_of(idem)

    def everything(self, now: float) -> list[list[Any]]:
        """History and pending entries, as a sync carries them."""
        entries = [[e.seq, e.payload, e.ts, e.idem] for e in self.history.newest(len(self.history), now)]
        entries.extend([e.seq, e.payload, e.ts, e.idem] for _, e in sorted(self.pending.items()))
        return entries


@dataclass(slots=True)
class Committed:
    """Entry ``seq`` of ``topic`` is held by every copy: acknowledge ``tokens``.

    ``deliver`` is true on the leader that should send it to interested gateways now;
    an entry committed while its stream moved is delivered by the new leader through
    the ``since`` path instead.
    """

    topic: str
    epoch: str
    seq: int
    payload: bytes
    ts: float
    tokens: list[Any]
    deliver: bool


@dataclass(slots=True)
class Refused:
    """A publication this router will not apply.

    ``reason``: ``"moved"`` (``leader`` leads the topic now: send it there; nothing
    was applied), ``"unavailable"`` (no view or lease: nothing was applied) or
    ``"outcome_unknown"`` (it was appended here but the stream moved before it was
    known to be held by every copy: retry with its ``idem`` key).
    """

    token: Any
    topic: str
    reason: str
    leader: str | None = None


@dataclass(slots=True)
class Ready:
    view: View


@dataclass(slots=True)
class Created:
    """Every copy holds the new stream of ``topic``: its epoch may be shown to subscribers."""

    topic: str


@dataclass(slots=True)
class StreamDropped:
    """This router no longer holds ``topic`` (it is not one of its copies now)."""

    topic: str


@dataclass(slots=True)
class ReplicaStats:
    views_installed: int = 0
    failovers: int = 0  # views installed without a router that did not say goodbye
    handoffs: int = 0  # views installed without a router that left (SIGTERM)
    resync_bytes: int = 0  # payload bytes sent in syncs
    syncs_sent: int = 0
    refused_unsafe: int = 0  # publications refused: no view, no lease
    duplicates: int = 0  # publications recognised by their idem key
    stale_rejected: int = 0  # messages of an older view or from a non-leader


@dataclass(slots=True)
class _Proposal:
    number: int
    members: tuple[str, ...]
    started: float
    promises: dict[str, tuple[int, tuple[str, ...]]] = field(default_factory=dict)
    complete_at: float | None = None


@dataclass(slots=True)
class _Beat:
    sent: float
    view: int
    acks: set[str]


class Replica:
    def __init__(
        self,
        name: str,
        routers: Sequence[str],
        order: Callable[[str], Sequence[str]],
        *,
        copies: int = 2,
        timeout: float = 0.3,
        beat_interval: float = 0.05,
        hold: float = 1.0,
        history: Callable[[str], History] = lambda topic: History(1000, 300.0),
        new_epoch: Callable[[], str] = lambda: secrets.token_hex(4),
    ) -> None:
        if name not in routers:
            raise ValueError(f"{name!r} is not in the router list")
        self.name = name
        self.routers = tuple(routers)
        self.rank = {r: i for i, r in enumerate(self.routers)}
        self.majority = len(self.routers) // 2 + 1
        self.order = order  # topic -> every router, in the topic's rendezvous order
        self.copies = max(1, copies)
        self.timeout = timeout
        self.beat_interval = beat_interval
        self.hold = hold
        self.new_history = history
        self.new_epoch = new_epoch
        self.incarnation = secrets.token_hex(4)

        self.promised = 0
        self.view: View | None = None
        self.ready = False
        self.ready_view: View | None = None
        self.leaving = False
        self.lease_until = float("-inf")
        self.streams: dict[str, Stream] = {}
        # Confirmations of appends held until flush_acks (the shell calls it after each
        # batch of messages): one per (leader, view, topic) instead of one per entry.
        self.batch_acks = False
        self._acks: dict[tuple[str, int, str], int] = {}
        self._copies_view: View | None = None  # the view ``_copies`` was computed for
        self._copies: dict[str, list[str]] = {}
        self.out: list[tuple[str, list[Any]]] = []
        self.events: list[Any] = []
        self.stats = ReplicaStats()

        self._heard: dict[str, float] = {}
        self._incarnations: dict[str, str] = {}
        self._left: set[str] = set()
        self._beats: dict[int, _Beat] = {}
        self._beat_id = 0
        self._last_beat = float("-inf")
        self._proposal: _Proposal | None = None
        self._mismatch_since: float | None = None
        # Per view being synced: what each member said it sent, and what arrived.
        self._syncs_expected: dict[str, int] = {}
        self._syncs_received: dict[str, int] = {}
        # Leader side: per topic, per tentative seq, the copies still to confirm and
        # the publications waiting for it.
        self._waiting: dict[str, dict[int, set[str]]] = {}
        self._tokens: dict[str, dict[int, list[Any]]] = {}
        # Leader side: streams started here, and the copies that have not said they hold them.
        self._creating: dict[str, set[str]] = {}
        # Tentative entries of streams this router was the source of at the last
        # install: committed once the view is ready.
        self._carried: list[tuple[str, Stream, list[tuple[int, list[Any]]], bool]] = []
        self._held: list[tuple[float, str, bytes, float, str | None, Any]] = []
        self._early: list[tuple[str, list[Any]]] = []
        self._fresh: set[str] = set()  # streams vouched for in the view being synced
        self._highest_seen = 0  # the highest view number heard of
        self._joined = self.majority == 1  # heard from a majority since this process started
        self._reform = False  # a member restarted: the view must be formed again
        self._installed_at = float("-inf")
        self._unserving_since: float | None = None  # when this router last stopped serving
        self._last_resend = float("-inf")
        self._promised_other_at = float("-inf")

    # --- the router list --------------------------------------------------------------

    def add_router(self, name: str, order: Callable[[str], Sequence[str]]) -> bool:
        """``name`` joins the end of the router list (scaling out), with the new order.

        One router at a time: any majority of the old list and any majority of the
        new one share a router, so a view of either kind is still installed only with
        a router that promised it, and views stay one line. The next view includes the
        new router once it is heard from; its sources then send it the streams whose
        copies it became, with their epoch, seq and history.
        """
        if name in self.rank:
            return False
        self.routers = (*self.routers, name)
        self.rank[name] = len(self.routers) - 1
        self.majority = len(self.routers) // 2 + 1
        self.order = order
        self._copies_view = None
        return True

    # --- who does what -------------------------------------------------------------

    def copies_of(self, topic: str, members: Sequence[str] | None = None) -> list[str]:
        if members is None:
            view = self.view
            if view is None:
                return []
            # Asked several times per publication: kept per topic for the current view.
            if self._copies_view is not view:
                self._copies_view, self._copies = view, {}
            copies = self._copies.get(topic)
            if copies is None:
                inside = set(view.members)
                copies = self._copies[topic] = [r for r in self.order(topic) if r in inside][: self.copies]
                if len(self._copies) > 65536:
                    self._copies.clear()
            return copies
        inside = set(members)
        return [r for r in self.order(topic) if r in inside][: self.copies]

    def leader_of(self, topic: str) -> str | None:
        copies = self.copies_of(topic)
        return copies[0] if copies else None

    def serving(self, now: float) -> bool:
        """Whether this router may commit and answer now (view, readiness, lease)."""
        return (
            self.view is not None
            and self.ready
            and not self.leaving
            and self.promised == self.view.number
            and now < self.lease_until
        )

    def alive(self, now: float) -> set[str]:
        seen = {r for r, t in self._heard.items() if now - t <= self.timeout and r not in self._left}
        if not self.leaving:
            seen.add(self.name)
        return seen

    def behind(self) -> int:
        """Appends still waiting for a copy to confirm them."""
        return sum(len(w) for w in self._waiting.values())

    def single_copy_topics(self) -> int:
        if self.view is None:
            return 0
        return sum(1 for t in self.streams if len(self.copies_of(t)) < 2 and self.leader_of(t) == self.name)

    def _send(self, to: str, msg: list[Any]) -> None:
        if to == self.name:
            return
        self.out.append((to, msg))

    # --- time ----------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self.flush_acks()
        self._give_up_waiting(now)
        if now - self._last_beat >= self.beat_interval:
            self._last_beat = now
            self._beat(now)
        self._maybe_propose(now)
        p = self._proposal
        if p is not None and p.complete_at is not None and now >= p.complete_at:
            self._install_proposal(p, now)
        self._release_held(now)
        if (self._waiting or self._creating) and now - self._last_resend >= self.timeout:
            self._last_resend = now
            self._resend(now)

    def _give_up_waiting(self, now: float) -> None:
        """Answer ``outcome_unknown`` for publications a leader can no longer commit.

        A leader cut off from its copy and from the majority keeps its appends
        waiting, and no view it could install will come while it is cut off. After
        ``hold`` seconds without serving, the publications waiting on it are told
        their fate is unknown: clients retry them with their ``idem`` key, and a
        retry is answered with the original seq if the entry was committed after all.
        """
        if self.serving(now):
            self._unserving_since = None
            return
        if self._unserving_since is None:
            self._unserving_since = now
            return
        if self._tokens and now - self._unserving_since > self.hold:
            tokens, self._tokens = self._tokens, {}
            for topic, t in tokens.items():
                self._unknown(topic, t)

    def _resend(self, now: float) -> None:
        """Send again the appends a copy has not confirmed (a link may have lost them).

        nng drops what was queued on a connection that breaks; a view change repairs
        that, but a link that breaks and comes back within the timeout does not make
        one. Copies take an append they already hold as a confirmation request.
        """
        if not self.serving(now) or self.view is None:
            return
        for topic, copies in self._creating.items():
            stream = self.streams.get(topic)
            if stream is not None:
                for r in copies:
                    self._send(r, [APPEND, self.view.number, topic, stream.epoch, 0, b"", 0.0, None])
        for topic, waiting in self._waiting.items():
            stream = self.streams.get(topic)
            if stream is None:
                continue
            for seq in sorted(waiting):
                entry = stream.pending.get(seq)
                if entry is None:
                    continue
                for r in waiting[seq]:
                    self._send(r, [APPEND, self.view.number, topic, stream.epoch, seq, entry.payload, entry.ts, entry.idem])

    def _beat(self, now: float) -> None:
        if self.leaving:
            return
        number = self.view.number if self.view is not None else 0
        self._beat_id += 1
        acks = {self.name} if self.promised == number and number else set()
        self._beats[self._beat_id] = _Beat(now, number, acks)
        for old in [b for b in self._beats if b <= self._beat_id - 64]:
            del self._beats[old]
        if number and len(acks) >= self.majority:
            # A majority of one (a cluster of one router): its own beat is the lease.
            lapsed = now >= self.lease_until
            self.lease_until = max(self.lease_until, now + self.timeout)
            if lapsed:
                self._renew(now)
        for r in self.routers:
            self._send(r, [BEAT, number, self._beat_id, self.incarnation, self.promised])

    def _maybe_propose(self, now: float) -> None:
        if self.leaving or not self._joined:
            return
        alive = self.alive(now)
        current = set(self.view.members) if self.view is not None else None
        stuck = self.view is not None and not self.ready and now - self._installed_at > 3 * self.timeout
        if current == alive and self.promised == self.view.number and not self._reform and not stuck:
            self._mismatch_since = None
            return
        if self._mismatch_since is None:
            self._mismatch_since = now
        if len(alive) < self.majority:
            return
        p = self._proposal
        if p is not None and now - p.started < 3 * self.timeout:
            return
        if now - self._promised_other_at < 3 * self.timeout:
            return  # another router's proposal is on its way to being installed
        # The lowest-ranked live router proposes; the others step in, one after the
        # other, only when it has not managed to for a while (it may see another set).
        position = sorted(alive, key=self.rank.__getitem__).index(self.name)
        if position and now - self._mismatch_since < 4 * self.timeout * position:
            return
        self._propose(tuple(sorted(alive, key=self.rank.__getitem__)), now)

    def _propose(self, members: tuple[str, ...], now: float) -> None:
        above = max(self.promised, self._highest_seen)
        number = (above // _RANK_SPACE + 1) * _RANK_SPACE + self.rank[self.name] + 1
        self._proposal = _Proposal(number, members, now)
        for r in members:
            if r == self.name:
                self._on_propose(self.name, number, list(members), now)
            else:
                self._send(r, [PROPOSE, number, list(members)])

    # --- messages ------------------------------------------------------------------

    def receive(self, sender: str, msg: list[Any], now: float) -> None:
        """Apply one message from router ``sender`` (already authenticated)."""
        if sender not in self.rank or sender == self.name:
            return
        self._heard[sender] = now
        kind = msg[0]
        if kind == BEAT:
            _, number, beat_id, incarnation, promised = msg
            known = self._incarnations.get(sender)
            if known != incarnation:
                self._incarnations[sender] = incarnation
                self._left.discard(sender)
                if known is not None and self.view is not None and sender in self.view.members:
                    self._reform = True  # it restarted: it holds nothing of this view
                if self._proposal is not None and sender in self._proposal.promises:
                    self._proposal = None  # that promise was made by a process that is gone
            self._highest_seen = max(self._highest_seen, number, promised)
            if not self._joined and len(self._incarnations) + 1 >= self.majority:
                # A process that starts has forgotten what it promised before; it
                # takes part only once a majority told it the highest number in use.
                self._joined = True
                self.promised = max(self.promised, self._highest_seen)
            if self._joined and number >= self.promised:
                self._send(sender, [BEATOK, number, beat_id])
        elif kind == BEATOK:
            self._on_beatok(sender, msg[1], msg[2], now)
        elif kind == PROPOSE:
            self._on_propose(sender, msg[1], msg[2], now)
        elif kind == PROMISE:
            self._on_promise(sender, msg[1], msg[2], tuple(msg[3]), now)
        elif kind == REFUSE:
            self._highest_seen = max(self._highest_seen, msg[2])
            p = self._proposal
            if p is not None and p.number == msg[1]:
                self._proposal = None
        elif kind == INSTALL:
            self._on_install(sender, msg[1], tuple(msg[2]), msg[3], tuple(msg[4]), tuple(msg[5]), now)
        elif kind in (SYNC, SYNCDONE) and msg[1] == self.promised and (self.view is None or self.view.number != msg[1]):
            # A member installed the view before this router heard of it: keep what
            # it sent until the INSTALL arrives (links are ordered, not each other).
            self._early.append((sender, msg))
        elif kind == SYNC:
            self._on_sync(sender, msg, now)
        elif kind == SYNCDONE:
            self._on_syncdone(sender, msg[1], msg[2], now)
        elif kind == APPEND:
            self._on_append(sender, msg, now)
        elif kind == APPENDED:
            self._on_appended(sender, msg[1], msg[2], msg[3], now)
        elif kind == LEAVE:
            self._left.add(sender)
            self._heard.pop(sender, None)

    def _on_beatok(self, sender: str, number: int, beat_id: int, now: float) -> None:
        beat = self._beats.get(beat_id)
        if beat is None or self.view is None or beat.view != number or number != self.view.number:
            return
        beat.acks.add(sender)
        if len(beat.acks) >= self.majority and beat.sent + self.timeout > self.lease_until:
            lapsed = now >= self.lease_until
            self.lease_until = beat.sent + self.timeout
            if lapsed:
                self._renew(now)

    def _on_propose(self, sender: str, number: int, members: list[str], now: float) -> None:
        unknown = any(m not in self.rank for m in members)  # a router list this one has not taken yet
        if number <= self.promised or self.name not in members or self.leaving or not self._joined or unknown:
            self._send(sender, [REFUSE, number, self.promised])
            return
        self.promised = number
        if sender != self.name:
            self._promised_other_at = now
            self._proposal = None
        ready_n = self.ready_view.number if self.ready_view is not None else 0
        ready_members = list(self.ready_view.members) if self.ready_view is not None else []
        if sender == self.name:
            self._on_promise(self.name, number, ready_n, tuple(ready_members), now)
        else:
            self._send(sender, [PROMISE, number, ready_n, ready_members])

    def _on_promise(self, sender: str, number: int, ready_n: int, ready_members: tuple[str, ...], now: float) -> None:
        p = self._proposal
        if p is None or p.number != number or sender not in p.members:
            return
        p.promises[sender] = (ready_n, ready_members)
        if p.complete_at is None and len(p.promises) == len(p.members):
            q = max(rn for rn, _ in p.promises.values())
            q_members = next((rm for rn, rm in p.promises.values() if rn == q), ())
            sources = {r for r, (rn, _) in p.promises.items() if rn == q}
            lost_all = len(set(q_members) - sources) >= self.copies if q else len(p.members) < len(self.routers)
            if lost_all and now - (self._mismatch_since or now) < LOSS_GRACE * self.timeout:
                # Every copy of some topics may be missing (or, with no view known,
                # the routers that hold them): a slow router is likelier than two
                # lost at once, so wait for it a while before starting those topics
                # again in a new epoch.
                self._proposal = None
                return
            outside = set(self.routers) - set(p.members) - self._left
            wait = self.timeout * (1 + DRIFT) if outside else 0.0
            p.complete_at = now + wait
            if not wait:
                self._install_proposal(p, now)

    def _install_proposal(self, p: _Proposal, now: float) -> None:
        self._proposal = None
        if self.promised != p.number:
            return  # a higher proposal came meanwhile
        q = max(rn for rn, _ in p.promises.values())
        q_members: tuple[str, ...] = ()
        sources = []
        for r in p.members:
            rn, rm = p.promises[r]
            if rn == q and q:
                sources.append(r)
                q_members = rm
        msg = [INSTALL, p.number, list(p.members), q, list(q_members), sources]
        for r in p.members:
            self._send(r, msg)
        self._on_install(self.name, p.number, p.members, q, q_members, tuple(sources), now)

    def _on_install(
        self,
        sender: str,
        number: int,
        members: tuple[str, ...],
        q: int,
        q_members: tuple[str, ...],
        sources: tuple[str, ...],
        now: float,
    ) -> None:
        if number != self.promised or self.name not in members or any(m not in self.rank for m in members):
            self.stats.stale_rejected += 1
            return
        old = self.view
        self.view = View(number, tuple(members))
        self._installed_at = now
        self._reform = False
        self.ready = False
        self.lease_until = float("-inf")
        self.stats.views_installed += 1
        if old is not None:
            gone = set(old.members) - set(members)
            if gone - self._left:
                self.stats.failovers += 1
            elif gone:
                self.stats.handoffs += 1
        self._syncs_expected = {}
        self._syncs_received = {r: 0 for r in members}
        self._fresh = set()
        carried: list[tuple[str, Stream, list[tuple[int, list[Any]]], bool]] = []
        # Publications that were waiting here lose their place: either they ride
        # along with a stream this router is the source of, or their fate is unknown.
        tokens, self._tokens, self._waiting = self._tokens, {}, {}
        self._creating = {}  # the view's syncs carry every stream to its copies
        for topic, _, carried_tokens, _ in self._carried:  # a view that never got ready
            for seq, ts in carried_tokens:
                tokens.setdefault(topic, {}).setdefault(seq, []).extend(ts)
        sent_to: dict[str, int] = {r: 0 for r in members}
        for topic in list(self.streams):
            stream = self.streams[topic]
            old_copies = self.copies_of(topic, q_members) if q else []
            source = next((r for r in old_copies if r in sources), None)
            new_copies = self.copies_of(topic, members)
            topic_tokens = tokens.pop(topic, {})
            if source != self.name:
                # Kept (not served) until the view is ready: if it never gets ready,
                # this copy may be the source of the next one.
                self._unknown(topic, topic_tokens)
                continue
            self._fresh.add(topic)
            entries = stream.everything(now)
            for r in new_copies:
                if r != self.name:
                    self._send(r, [SYNC, number, topic, stream.epoch, stream.seq, entries])
                    sent_to[r] += 1
                    self.stats.syncs_sent += 1
                    self.stats.resync_bytes += sum(len(e[1]) for e in entries)
            carried.append((topic, stream, sorted(topic_tokens.items()), old_copies[:1] == [self.name]))
        self._carried = carried
        for topic, t in tokens.items():
            self._unknown(topic, t)
        for r in members:
            if r == self.name:
                self._syncs_expected[r] = 0
            else:
                self._send(r, [SYNCDONE, number, sent_to[r]])
        early, self._early = self._early, []
        for r, msg in early:
            if msg[1] == number:
                self.receive(r, msg, now)
        self._check_ready(now)

    def _unknown(self, topic: str, tokens: dict[int, list[Any]]) -> None:
        for ts in tokens.values():
            for token in ts:
                self.events.append(Refused(token, topic, "outcome_unknown"))

    def _on_sync(self, sender: str, msg: list[Any], now: float) -> None:
        _, number, topic, epoch, seq, entries = msg
        if self.view is None or number != self.view.number or number != self.promised or self.ready:
            self.stats.stale_rejected += 1
            return
        history = self.new_history(topic)
        for e_seq, payload, ts, idem in entries:
            history.append(Entry(e_seq, payload, ts, now, idem))
        self.streams[topic] = Stream(epoch, history, seq, seq)
        self._fresh.add(topic)
        self._syncs_received[sender] = self._syncs_received.get(sender, 0) + 1
        self._check_ready(now)

    def _on_syncdone(self, sender: str, number: int, count: int, now: float) -> None:
        if self.view is None or number != self.view.number or number != self.promised:
            self.stats.stale_rejected += 1
            return
        self._syncs_expected[sender] = count
        self._check_ready(now)

    def _check_ready(self, now: float) -> None:
        view = self.view
        if self.ready or view is None:
            return
        for r in view.members:
            expected = self._syncs_expected.get(r)
            if expected is None or self._syncs_received.get(r, 0) != expected:
                return
        self.ready = True
        self.ready_view = view
        # Only what this view's sources vouched for is served: every other stream
        # held here is stale or belongs to other copies now.
        for topic in [t for t in self.streams if t not in self._fresh or self.name not in self.copies_of(t)]:
            del self.streams[topic]
            self.events.append(StreamDropped(topic))
        for topic, stream in self.streams.items():
            if not stream.created:
                stream.created = True
                self.events.append(Created(topic))
        self.events.append(Ready(view))
        self._last_beat = now
        self._beat(now)  # a lease of the new view at once, not at the next beat
        # Every copy of the view now holds what the sources sent, tentative entries
        # included: they are committed, and their publications answered. Only a
        # leader that stays leader delivers them; when leadership moved, gateways
        # fetch them from the new leader with ``since`` as they move their interest.
        for topic, stream, tokens, was_leader in self._carried:
            deliver = was_leader and self.leader_of(topic) == self.name
            waiting = dict(tokens)
            for seq in range(stream.committed + 1, stream.seq + 1):
                entry = stream.commit(seq) or stream.entry(seq, now)
                ts = waiting.pop(seq, [])
                if entry is None:
                    for token in ts:
                        self.events.append(Refused(token, topic, "outcome_unknown"))
                elif ts or deliver:
                    self.events.append(Committed(topic, stream.epoch, seq, entry.payload, entry.ts, ts, deliver))
            for seq, ts in waiting.items():  # duplicates of entries committed before
                entry = stream.entry(seq, now)
                for token in ts:
                    if entry is None:
                        self.events.append(Refused(token, topic, "outcome_unknown"))
                    else:
                        self.events.append(Committed(topic, stream.epoch, seq, entry.payload, entry.ts, [token], False))
            stream.committed = stream.seq
        self._carried = []
        self._release_held(now)

    # --- publications --------------------------------------------------------------

    def stream(self, topic: str) -> Stream | None:
        """The stream of a topic this router leads and serves (a new one if it has none)."""
        if self.leader_of(topic) != self.name or not self.ready:
            return None
        stream = self.streams.get(topic)
        if stream is None:
            stream = self.streams[topic] = Stream(self.new_epoch(), self.new_history(topic))
            others = [r for r in self.copies_of(topic) if r != self.name]
            if others and self.view is not None:
                stream.created = False
                self._creating[topic] = set(others)
                for r in others:
                    self._send(r, [APPEND, self.view.number, topic, stream.epoch, 0, b"", 0.0, None])
        return stream

    def publish(self, topic: str, payload: bytes, ts: float, idem: str | None, token: Any, now: float) -> None:
        """Apply a publication; its fate comes back in :attr:`events`.

        While a view is being installed the publication is held (up to ``hold``
        seconds) rather than refused, so a failover looks like a short delay.
        """
        if self.leaving:
            # Nothing was applied, and the next view has another leader for it.
            self.events.append(Refused(token, topic, "moved"))
            return
        if not self.serving(now):
            if self.hold <= 0:
                self._refuse_unsafe(token, topic)
                return
            self._held.append((now + self.hold, topic, payload, ts, idem, token))
            return
        leader = self.leader_of(topic)
        if leader != self.name:
            self.events.append(Refused(token, topic, "moved", leader))
            return
        stream = self.stream(topic)
        if idem is not None:
            seq = stream.seq_of(idem)
            if seq is not None:
                self.stats.duplicates += 1
                if seq <= stream.committed:
                    entry = stream.entry(seq, now)
                    self.events.append(Committed(topic, stream.epoch, seq, entry.payload, entry.ts, [token], False))
                else:
                    self._tokens.setdefault(topic, {}).setdefault(seq, []).append(token)
                return
        stream.seq += 1
        seq = stream.seq
        stream.pending[seq] = Entry(seq, payload, ts, now, idem)
        if idem is not None:
            stream.pending_idem[idem] = seq
        self._tokens.setdefault(topic, {}).setdefault(seq, []).append(token)
        others = [r for r in self.copies_of(topic) if r != self.name]
        self._waiting.setdefault(topic, {})[seq] = set(others)
        for r in others:
            self._send(r, [APPEND, self.view.number, topic, stream.epoch, seq, payload, ts, idem])
        self._advance(topic, stream, now)

    def _refuse_unsafe(self, token: Any, topic: str) -> None:
        self.stats.refused_unsafe += 1
        self.events.append(Refused(token, topic, "unavailable"))

    def _release_held(self, now: float) -> None:
        if not self._held:
            return
        held, self._held = self._held, []
        for deadline, topic, payload, ts, idem, token in held:
            if self.serving(now) or self.leaving:
                self.publish(topic, payload, ts, idem, token, now)
            elif now >= deadline:
                self._refuse_unsafe(token, topic)
            else:
                self._held.append((deadline, topic, payload, ts, idem, token))

    def _on_append(self, sender: str, msg: list[Any], now: float) -> None:
        _, number, topic, epoch, seq, payload, ts, idem = msg
        view = self.view
        if (
            view is None
            or number != view.number
            or number != self.promised
            or not self.ready
            or self.leader_of(topic) != sender
            or self.name not in self.copies_of(topic)
        ):
            self.stats.stale_rejected += 1
            return
        stream = self.streams.get(topic)
        if seq == 0:
            # The leader started this stream: hold it (an empty one), and say so.
            if stream is None or (stream.epoch != epoch and stream.seq == 0):
                self.streams[topic] = Stream(epoch, self.new_history(topic))
            elif stream.epoch != epoch:
                self.stats.stale_rejected += 1
                return
            self._confirm(sender, number, topic, 0)
            return
        if stream is None:
            if seq != 1:
                self.stats.stale_rejected += 1
                return
            stream = self.streams[topic] = Stream(epoch, self.new_history(topic))
        if stream.epoch != epoch:
            self.stats.stale_rejected += 1
            return
        if seq == stream.seq + 1:
            stream.seq = seq
            stream.committed = seq - 1
            stream.history.append(Entry(seq, payload, ts, now, idem))
        elif seq > stream.seq:
            self.stats.stale_rejected += 1  # a gap: the leader's next view fixes it
            return
        self._confirm(sender, number, topic, seq)

    def _confirm(self, leader: str, number: int, topic: str, seq: int) -> None:
        """Tell ``leader`` this copy holds ``topic`` up to ``seq`` (now, or at flush_acks)."""
        if self.batch_acks:
            key = (leader, number, topic)
            if self._acks.get(key, -1) < seq:
                self._acks[key] = seq
        else:
            self._send(leader, [APPENDED, number, topic, seq])

    def flush_acks(self) -> None:
        """Send the confirmations held back with ``batch_acks``: one per topic, its highest seq.

        A confirmation covers every seq up to it (appends are taken in seq order), so
        a batch of appends to one topic costs the leader one confirmation to handle.
        """
        if not self._acks:
            return
        acks, self._acks = self._acks, {}
        for (sender, number, topic), seq in acks.items():
            self._send(sender, [APPENDED, number, topic, seq])

    def _on_appended(self, sender: str, number: int, topic: str, seq: int, now: float) -> None:
        if self.view is None or number != self.view.number:
            return
        creating = self._creating.get(topic)
        if creating is not None:
            creating.discard(sender)  # any confirmation says the copy holds the stream
            if not creating:
                del self._creating[topic]
                stream = self.streams.get(topic)
                if stream is not None and not stream.created:
                    stream.created = True
                    self.events.append(Created(topic))
        waiting = self._waiting.get(topic)
        if not waiting:
            return
        for s, copies in waiting.items():  # in seq order: confirmations come in order
            if s > seq:
                break
            copies.discard(sender)
        stream = self.streams.get(topic)
        if stream is not None:
            self._advance(topic, stream, now)

    def _advance(self, topic: str, stream: Stream, now: float) -> None:
        """Commit, in seq order, every entry every copy holds — under a lease."""
        if now >= self.lease_until:
            return
        waiting = self._waiting.get(topic, {})
        tokens = self._tokens.get(topic, {})
        while stream.committed < stream.seq:
            seq = stream.committed + 1
            if waiting.get(seq):
                break
            waiting.pop(seq, None)
            entry = stream.commit(seq)
            if entry is not None:
                self.events.append(Committed(topic, stream.epoch, seq, entry.payload, entry.ts, tokens.pop(seq, []), True))

    def _renew(self, now: float) -> None:
        """The lease came back: commit what was held back for it, apply what was held."""
        for topic in list(self._waiting):
            stream = self.streams.get(topic)
            if stream is not None:
                self._advance(topic, stream, now)
        self._release_held(now)

    # --- leaving -------------------------------------------------------------------

    def leave(self, now: float) -> None:
        """Stop serving and tell every router (SIGTERM): the others take over at once."""
        self.leaving = True
        self.ready = False
        for r in self.routers:
            self._send(r, [LEAVE])
        tokens, self._tokens, self._waiting = self._tokens, {}, {}
        for topic, t in tokens.items():
            self._unknown(topic, t)
        for topic, _, carried_tokens, _ in self._carried:
            self._unknown(topic, dict(carried_tokens))
        self._carried = []
        self._release_held(now)

    def handed_off(self, now: float) -> bool:
        """After :meth:`leave`: whether the others formed a view without this router."""
        if not self.leaving:
            return False
        mine = self.view.number if self.view is not None else 0
        return self._highest_seen > max(mine, self.promised) or not (self.alive(now) - {self.name})
