"""Which shard owns a topic: rendezvous (highest-random-weight) hashing.

Every gateway computes the owner from the topic and the shard names alone, so they
agree without talking. With HRW, adding a shard to N moves only the topics the new
shard now wins (about 1/(N+1) of them) and removing one moves only that shard's
topics. xxhash's xxh64 is stable across processes and machines (unlike Python's
salted ``hash()``) and fast enough to score 50 shards per lookup; lookups are cached
because a gateway routes the same hot topics over and over.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import xxhash


class Ring:
    """An immutable set of shard names with a topic → shard function."""

    def __init__(self, shards: Iterable[str]) -> None:
        names = list(dict.fromkeys(shards))
        if not names:
            raise ValueError("a ring needs at least one shard")
        self.shards: tuple[str, ...] = tuple(names)
        # Each shard scores topics with its own seed, derived from its name.
        self._seeds = tuple((xxhash.xxh64_intdigest(n.encode()), n) for n in names)
        self.owner = lru_cache(maxsize=65536)(self._owner)
        self.order = lru_cache(maxsize=65536)(self._order)

    def _owner(self, topic: str) -> str:
        key = topic.encode()
        best_score, best = -1, self.shards[0]
        for seed, name in self._seeds:
            score = xxhash.xxh64_intdigest(key, seed)
            if score > best_score:
                best_score, best = score, name
        return best

    def _order(self, topic: str) -> tuple[str, ...]:
        """Every shard, best score first: the owner, then who takes over from it.

        A topic's copies are the first few of these (``router.replication``); the
        order of the others does not change when one of them goes away, so a
        failover moves only the topics of the shard that went.
        """
        key = topic.encode()
        scored = sorted(((xxhash.xxh64_intdigest(key, seed), name) for seed, name in self._seeds), reverse=True)
        return tuple(name for _, name in scored)

    def __len__(self) -> int:
        return len(self.shards)

    def __repr__(self) -> str:
        return f"Ring({list(self.shards)!r})"
