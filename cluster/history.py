"""A topic's bounded history and the recovery rule built on it.

History is bounded twice: by count (memory) and by age (a client that was gone
longer than the window is better served by a fresh snapshot from the application
than by a replay). Recovery answers "what did a client that saw ``seq`` miss?" with
exactly the missing messages, or with ``None`` when the window does not reach back
that far, which the client sees as ``recovered: false``.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Entry:
    seq: int
    payload: Any
    ts: float  # publication time (wall clock), carried for latency metrics
    stored_at: float  # monotonic time, for age-based trimming


class History:
    def __init__(self, size: int, ttl: float) -> None:
        if size < 0 or ttl < 0:
            raise ValueError("history size and ttl must be >= 0")
        self.size = size
        self.ttl = ttl
        self._entries: deque[Entry] = deque(maxlen=size or None)

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> None:
        if self.size:
            self._entries.append(entry)

    def trim(self, now: float) -> None:
        """Drop entries older than ``ttl`` (``now`` is monotonic time)."""
        entries, horizon = self._entries, now - self.ttl
        while entries and entries[0].stored_at < horizon:
            entries.popleft()

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
