"""Latest value wins: what a subscriber that fell behind is sent on conflated topics.

A namespace with ``conflate = true`` (``fanroute.permissions``) carries data where
only the newest value matters, such as prices. For such a topic, a subscriber whose
outbound buffer holds more than ``--conflate-threshold`` bytes stops queueing every
message: :class:`Conflation` keeps just the newest pending message per topic, and
counts how many it replaced. When the buffer has drained to the threshold again the
pending messages go out, each carrying ``"skipped": K`` when K messages of its topic
were left out just before it — so the client can tell a gap it must repair from one
it was told about.

Why it holds: for each topic, every message offered is either written at once, or
becomes the pending one; a pending one that is replaced is counted in its
successor's ``skipped``. So the written seqs plus the ``skipped`` counts account for
every offered seq exactly once, and the newest message of a topic is never the one
left out. Memory is one message per conflated topic, whatever the rate; because
conflated messages enter the buffer only while it is at most at the threshold (below
``--outbox-limit``), they can never be what closes a connection as a slow consumer.

Messages are written per topic in seq order: once a topic has a pending message,
newer ones replace it rather than overtake it. Other topics on the same connection
are not touched here: they keep every message, or close the connection with 4008.

The module does no I/O: the caller says how full the buffer is and writes what it is
handed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class Pending(Generic[T]):
    """The newest message of one topic, held back; ``skipped`` counts those it replaced."""

    topic: str
    seq: int
    item: T  # what the caller needs to write it (frame bytes, the event)
    size: int  # its bytes in the buffer once written
    skipped: int = 0


class Conflation(Generic[T]):
    """One connection's pending conflated messages, newest per topic."""

    __slots__ = ("threshold", "pending", "conflated", "bytes")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.pending: dict[str, Pending[T]] = {}  # in the order topics were first held
        self.conflated = 0  # messages left out, over the connection's life
        self.bytes = 0  # bytes held in pending messages

    def offer(self, topic: str, seq: int, item: T, size: int, backlog: int) -> bool:
        """A new message of a conflated topic: ``True`` to write it now, ``False`` if held.

        ``backlog`` is the bytes already waiting in the connection's buffer.
        """
        held = self.pending.get(topic)
        if held is None:
            if backlog <= self.threshold:
                return True
            self.pending[topic] = Pending(topic, seq, item, size)
            self.bytes += size
            return False
        # The held message is replaced: one more skipped, counted in its successor.
        held.skipped += 1
        self.conflated += 1
        held.seq, held.item = seq, item
        self.bytes += size - held.size
        held.size = size
        return False

    def take(self, backlog: int) -> list[Pending[T]]:
        """The held messages to write now that the buffer holds ``backlog`` bytes.

        They are taken in order while the buffer stays within the threshold (at
        least one when it is at or under it), so that draining never overfills it.
        """
        out: list[Pending[T]] = []
        pending = self.pending
        while pending and backlog <= self.threshold:
            topic = next(iter(pending))
            held = pending.pop(topic)
            self.bytes -= held.size
            backlog += held.size
            out.append(held)
        return out

    def drop(self, topic: str) -> int:
        """Forget ``topic``'s held message (the subscription ended, or its stream did).

        Returns the messages this leaves out that were not counted yet: 1 if one was
        held (those it had replaced were counted when they were).
        """
        held = self.pending.pop(topic, None)
        if held is None:
            return 0
        self.bytes -= held.size
        self.conflated += 1
        return 1

    def __len__(self) -> int:
        return len(self.pending)
