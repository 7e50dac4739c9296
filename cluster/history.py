"""A topic's bounded history and the recovery rule built on it.

History is bounded three ways: by count and by age per topic (a client that was
gone longer than the window is better served by a fresh snapshot from the
application than by a replay), and by bytes across the whole router (the shard
evicts the oldest entries of any topic first, see ``router.shard``). Recovery answers
"what did a client that saw ``seq`` miss?" with exactly the missing messages, or with
``None`` when the window does not reach back that far, which the client sees as
``recovered: false``.

Every entry's ``idem`` key stays findable while the entry is in history, so a
retried publication is recognised for as long as it could be recovered.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

# What an entry costs beyond its payload bytes (the Entry object, its deque slot and
# its idem index slot), so that a flood of tiny messages is bounded too.
ENTRY_OVERHEAD = 160


@dataclass(slots=True)
class Entry:
    seq: int
    payload: bytes  # packed as it travels (fanroute.codec.pack_payload)
    ts: float  # publication time (wall clock), carried for latency metrics
    stored_at: float  # monotonic time, for age-based trimming
    idem: str | None = None

    @property
    def cost(self) -> int:
        return len(self.payload) + ENTRY_OVERHEAD


class History:
    def __init__(
        self,
        size: int,
        ttl: float,
        on_evict: Callable[[Entry], None] = lambda e: None,
        on_append: Callable[[Entry], None] = lambda e: None,
    ) -> None:
        """``on_evict`` and ``on_append`` are told of every entry that leaves or joins
        (a router keeps its byte cap across all histories with them)."""
        if size < 0 or ttl < 0:
            raise ValueError("history size and ttl must be >= 0")
        self.size = size
        self.ttl = ttl
        self.bytes = 0
        self._on_evict = on_evict
        self._on_append = on_append
        self._entries: deque[Entry] = deque()
        self._idem: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def first_seq(self) -> int | None:
        return self._entries[0].seq if self._entries else None

    def append(self, entry: Entry) -> None:
        if not self.size:
            return
        if len(self._entries) >= self.size:
            self.evict_oldest()
        self._entries.append(entry)
        self.bytes += entry.cost
        if entry.idem is not None:
            self._idem[entry.idem] = entry.seq
        self._on_append(entry)

    def evict_oldest(self) -> Entry:
        entry = self._entries.popleft()
        self.bytes -= entry.cost
        if entry.idem is not None and self._idem.get(entry.idem) == entry.seq:
            del self._idem[entry.idem]
        self._on_evict(entry)
        return entry

    def seq_of(self, idem: str) -> int | None:
        """The seq of the publication in history that carried ``idem``, if any."""
        return self._idem.get(idem)

    def trim(self, now: float) -> None:
        """Drop entries older than ``ttl`` (``now`` is monotonic time)."""
        entries, horizon = self._entries, now - self.ttl
        while entries and entries[0].stored_at < horizon:
            self.evict_oldest()

    def after(self, seq: int, last_seq: int, now: float) -> list[Entry] | None:
        """Every entry with a seq above ``seq``, or ``None`` if some are gone.

        ``last_seq`` is the topic's current seq: a cursor equal to it needs nothing.
        """
        if seq == last_seq:
            return []
        if seq > last_seq:
            return None
        self.trim(now)
        entries = self._entries
        if not entries or entries[0].seq > seq + 1:
            return None
        start = seq + 1 - entries[0].seq
        return list(islice(entries, start, None))

    def newest(self, n: int, now: float) -> list[Entry]:
        """The newest ``n`` entries still in history (fewer if fewer are kept), oldest first."""
        self.trim(now)
        entries = self._entries
        if n <= 0 or not entries:
            return []
        return list(islice(entries, max(0, len(entries) - n), None))
