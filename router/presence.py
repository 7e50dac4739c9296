"""Cluster-wide subscriber counts, summed on the shard that owns each topic.

Every gateway counts its own subscribers per topic and reports only the counts that
changed, as absolute numbers (``fanroute.gateway.presence``); the shard keeps one
number per gateway and topic and their sum. So a join costs one small update here
whatever the number of subscribers, and a report that arrives twice or late is
harmless: the newest number replaces the old one.

Totals are pushed only to the gateways that have presence watchers for a topic, at
most once per :attr:`ShardPresence.interval` per topic: the first change after a
quiet period goes out at the next tick, later ones are folded into one push when
the interval has passed. A gateway that starts watching is sent the total at the
next tick regardless, so its first watcher is not kept waiting.

A gateway's counts leave the totals as soon as it has been silent for
:attr:`ShardPresence.timeout` (gateways beat every second), well before the shard
forgets it altogether: a gateway that died takes its subscribers with it within
about two seconds. If it was only slow, its counts come back with its next frame.
Such a change is pushed at the next tick whatever the pacing: it is found
``timeout`` after the gateway's last frame, and waiting out the interval of a push
made meanwhile (one that carried a change from before the gateway went silent)
would put it past the two seconds. It is rare, and the gateways still send each
watcher one count a second at most.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

INTERVAL = 1.0  # seconds between pushes of one topic's total
TIMEOUT = 1.5  # seconds of gateway silence after which its counts are left out
TICK = 0.1  # seconds between two looks for totals that are due (Shard.presence_tick)


@dataclass(slots=True)
class TopicCount:
    by_gateway: dict[str, int] = field(default_factory=dict)  # inbox -> its local count
    watchers: set[str] = field(default_factory=set)  # gateways that want the total pushed
    pushed: float = float("-inf")  # when the total was last pushed
    fresh: set[str] = field(default_factory=set)  # watchers not yet sent any total


class ShardPresence:
    """Per-topic sums of the gateways' counts, and the pacing of their pushes."""

    def __init__(self, *, interval: float = INTERVAL, timeout: float = TIMEOUT) -> None:
        self.interval = interval
        self.timeout = timeout
        self.topics: dict[str, TopicCount] = {}
        self._by_gateway: dict[str, set[str]] = {}  # inbox -> topics it reports on
        self._dirty: set[str] = set()  # topics whose total changed since their last push
        self._urgent: set[str] = set()  # dirty topics not to hold back: a gateway fell silent or came back
        self._silent: set[str] = set()  # gateways whose counts are left out for now
        self._fresh: set[str] = set()  # topics with a watcher not yet sent any total
        self.reports = 0  # counters for the metrics collector
        self.pushes = 0

    def total(self, topic: str, exclude: str | None = None) -> tuple[int, int]:
        """``(total, yours)``: the topic's count over the gateways heard from lately,
        and the share of gateway ``exclude`` in it."""
        entry = self.topics.get(topic)
        if entry is None:
            return 0, 0
        silent = self._silent
        total = sum(n for inbox, n in entry.by_gateway.items() if inbox not in silent)
        yours = 0 if exclude is None or exclude in silent else entry.by_gateway.get(exclude, 0)
        return total, yours

    def report(self, inbox: str, topic: str, count: int, watching: bool) -> None:
        """Gateway ``inbox`` has ``count`` local subscribers to ``topic`` (absolute)."""
        self.reports += 1
        entry = self.topics.get(topic)
        if entry is None:
            if not count and not watching:
                return
            entry = self.topics[topic] = TopicCount()
        if entry.by_gateway.get(inbox, 0) != count:
            self._dirty.add(topic)
        if count:
            entry.by_gateway[inbox] = count
        else:
            entry.by_gateway.pop(inbox, None)
        if watching:
            if inbox not in entry.watchers:
                entry.watchers.add(inbox)
                entry.fresh.add(inbox)
                self._fresh.add(topic)
        else:
            entry.watchers.discard(inbox)
            entry.fresh.discard(inbox)
        if entry.by_gateway or entry.watchers:
            self._by_gateway.setdefault(inbox, set()).add(topic)
        else:
            del self.topics[topic]
            self._dirty.discard(topic)
            self._untrack(inbox, topic)

    def _untrack(self, inbox: str, topic: str) -> None:
        topics = self._by_gateway.get(inbox)
        if topics is not None:
            topics.discard(topic)
            if not topics:
                del self._by_gateway[inbox]

    def forget(self, inbox: str) -> None:
        """Drop everything gateway ``inbox`` reported (it is gone, or introduces itself anew)."""
        self._silent.discard(inbox)
        for topic in self._by_gateway.pop(inbox, ()):
            entry = self.topics.get(topic)
            if entry is None:
                continue
            if entry.by_gateway.pop(inbox, 0):
                self._dirty.add(topic)
            entry.watchers.discard(inbox)
            entry.fresh.discard(inbox)
            if not entry.by_gateway and not entry.watchers:
                del self.topics[topic]
                self._dirty.discard(topic)

    def liveness(self, last_seen: dict[str, float], now: float) -> None:
        """Leave out the counts of gateways silent past :attr:`timeout`; take back the others."""
        for inbox, topics in self._by_gateway.items():
            seen = last_seen.get(inbox)
            silent = seen is None or now - seen > self.timeout
            if silent != (inbox in self._silent):
                if silent:
                    self._silent.add(inbox)
                else:
                    self._silent.discard(inbox)
                changed = [t for t in topics if (e := self.topics.get(t)) is not None and inbox in e.by_gateway]
                self._dirty.update(changed)
                self._urgent.update(changed)

    def due(self, now: float) -> dict[str, list[list[object]]]:
        """The pushes to send now, per gateway inbox: ``[topic, total, yours]`` items."""
        out: dict[str, list[list[object]]] = {}
        held: set[str] = set()
        urgent, self._urgent = self._urgent, set()
        for topic in self._dirty:
            entry = self.topics.get(topic)
            if entry is None:
                continue
            if now - entry.pushed < self.interval and topic not in urgent:
                held.add(topic)
                continue
            entry.pushed = now
            entry.fresh.clear()
            self._push(topic, entry, entry.watchers, out)
        self._dirty = held
        for topic in self._fresh:
            entry = self.topics.get(topic)
            if entry is not None and entry.fresh:
                fresh, entry.fresh = entry.fresh, set()
                self._push(topic, entry, fresh, out)
        self._fresh = set()
        return out

    def _push(self, topic: str, entry: TopicCount, to: Iterable[str], out: dict[str, list[list[object]]]) -> None:
        total, _ = self.total(topic)
        silent = self._silent
        for inbox in to:
            if inbox in silent:
                continue
            yours = entry.by_gateway.get(inbox, 0)
            out.setdefault(inbox, []).append([topic, total, yours])
            self.pushes += 1
