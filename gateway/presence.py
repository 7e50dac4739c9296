"""A gateway's side of presence counts: its own count per topic, and its watchers.

The count a client sees is cluster-wide. It is built in two steps so that a join
costs the same however many subscribers a topic has:

* each gateway counts its own subscribers per topic and reports to the topic's
  shard only the counts that changed since the last tick, as absolute numbers
  (:meth:`GatewayPresence.reports`); many joins between two ticks are one report;
* the shard sums them (``fanroute.router.presence``) and pushes the total to the
  gateways that have watchers, at most once a second per topic.

The shard's total carries the share it holds for the receiving gateway
(``yours``); the gateway swaps in its own current count, so a client's own
subscribe shows in the count it is sent at once, not a report later.

Watchers (subscribers that asked for ``presence: true``) are each sent a count once
when they start watching and then only when it differs from the last one they were
sent, never sooner than :attr:`GatewayPresence.interval` after it: a topic that
churns costs each watcher one event a second at most. Counts go out when a total
arrives from the shard, so watchers follow the shard's pace (one total a second at
most) and a change reaches them within that second plus a tick or two; holding one
back here happens only right after its first count, or when two totals arrive
closer together than they were sent.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

INTERVAL = 1.0  # seconds: at most one pushed count per watcher and topic per interval


@dataclass(slots=True)
class Watch:
    sent: int | None = None  # the count last sent to this watcher, None before the first
    at: float = float("-inf")  # when it was sent


@dataclass(slots=True)
class TopicPresence:
    local: int = 0  # this gateway's subscribers to the topic
    total: int | None = None  # the cluster-wide total as the shard last said, None: unknown
    yours: int = 0  # this gateway's share in ``total``, as the shard counted it
    watchers: dict[Hashable, Watch] = field(default_factory=dict)

    def count(self) -> int | None:
        """The cluster-wide count with this gateway's share brought up to date."""
        if self.total is None:
            return None
        return max(0, self.total - self.yours + self.local)


class GatewayPresence:
    def __init__(self, *, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.topics: dict[str, TopicPresence] = {}
        self._changed: set[str] = set()  # to report to the shard at the next tick
        self._pending: set[str] = set()  # topics with watchers that may be owed a count

    def _topic(self, topic: str) -> TopicPresence:
        entry = self.topics.get(topic)
        if entry is None:
            entry = self.topics[topic] = TopicPresence()
        return entry

    def _tidy(self, topic: str, entry: TopicPresence) -> None:
        if not entry.local and not entry.watchers and topic not in self._changed:
            del self.topics[topic]

    # --- what the hub tells it -------------------------------------------------------

    def joined(self, topic: str) -> None:
        """A local connection became a subscriber of ``topic``.

        Watchers are not pushed a count for it here: the change reaches them with
        the shard's next total (which comes within about a second), so that every
        watcher's counts follow the shard's pace. A push of its own here would spend
        the watcher's one-a-second budget and hold back the next total by up to
        another second.
        """
        self._topic(topic).local += 1
        self._changed.add(topic)

    def left(self, topic: str) -> None:
        entry = self.topics.get(topic)
        if entry is None or entry.local <= 0:
            return
        entry.local -= 1
        self._changed.add(topic)

    def watch(self, topic: str, watcher: Hashable, now: float) -> int | None:
        """Start pushing counts to ``watcher``; returns the first one to send now, if known.

        When the total is not known yet, the watcher gets its first count as soon as
        the shard's answer arrives (:meth:`totals`, then :meth:`due`).
        """
        entry = self._topic(topic)
        first = not entry.watchers
        watch = entry.watchers[watcher] = Watch()
        if first:
            self._changed.add(topic)  # the shard learns that this gateway watches
        count = entry.count()
        if count is not None:
            watch.sent, watch.at = count, now
        return count

    def unwatch(self, topic: str, watcher: Hashable) -> None:
        entry = self.topics.get(topic)
        if entry is None or entry.watchers.pop(watcher, None) is None:
            return
        if not entry.watchers:
            entry.total = None  # no longer kept up to date by the shard
            self._changed.add(topic)

    def totals(self, topic: str, total: int, yours: int) -> None:
        """The shard's total for ``topic`` (pushed, or the answer to a query)."""
        entry = self.topics.get(topic)
        if entry is None or not entry.watchers:
            return
        entry.total, entry.yours = total, yours
        self._pending.add(topic)

    def known(self, topic: str) -> int | None:
        """The count, if this gateway keeps it up to date (it has watchers), else None."""
        entry = self.topics.get(topic)
        return None if entry is None or not entry.watchers else entry.count()

    def lost(self, is_lost: Callable[[str], bool]) -> None:
        """A shard link went down: forget the totals of its topics, report all again."""
        for topic, entry in self.topics.items():
            if is_lost(topic):
                entry.total = None
                self._changed.add(topic)

    # --- what the hub asks for at each tick -------------------------------------------

    def reports(self) -> list[tuple[str, int, bool]]:
        """``(topic, local count, watching)`` for each topic that changed since the last call."""
        out = []
        changed, self._changed = self._changed, set()
        for topic in changed:
            entry = self.topics.get(topic)
            if entry is None:
                continue
            out.append((topic, entry.local, bool(entry.watchers)))
            self._tidy(topic, entry)
        return out

    def due(self, now: float) -> list[tuple[str, int, list[Hashable]]]:
        """``(topic, count, watchers)``: the counts to push now.

        A watcher is sent the count when it differs from what it was sent last, and
        at least :attr:`interval` has passed since then (or it was never sent one);
        a topic with a watcher held back stays pending for the next tick.
        """
        out = []
        held: set[str] = set()
        interval = self.interval
        for topic in self._pending:
            entry = self.topics.get(topic)
            if entry is None or not entry.watchers:
                continue
            count = entry.count()
            if count is None:
                continue
            to = []
            for watcher, watch in entry.watchers.items():
                if watch.sent == count:
                    continue
                if watch.sent is not None and now - watch.at < interval:
                    held.add(topic)
                    continue
                watch.sent, watch.at = count, now
                to.append(watcher)
            if to:
                out.append((topic, count, to))
        self._pending = held
        return out
