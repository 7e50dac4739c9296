"""Reconnect delays: exponential backoff with full jitter.

Full jitter (a uniform draw between 0 and the exponential cap) spreads thousands
of clients that lost the same gateway over the whole window instead of letting them
return in synchronized waves. The attempt count resets only after a connection has
stayed healthy for ``reset_after`` seconds, so a gateway that accepts and then drops
at once cannot pull clients into a tight reconnect loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    min_delay: float = 0.05
    max_delay: float = 10.0
    factor: float = 2.0
    reset_after: float = 5.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_delay <= self.max_delay:
            raise ValueError("backoff needs 0 <= min_delay <= max_delay")
        if self.factor < 1:
            raise ValueError("backoff factor must be at least 1")

    def cap(self, attempt: int) -> float:
        """The upper bound of the draw for the given attempt number."""
        # Avoid float overflow for absurd attempt counts.
        return min(self.max_delay, self.min_delay * self.factor ** min(attempt, 64))

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more attempt."""
        delay = self.rng.uniform(0, self.cap(self.attempt))
        self.attempt += 1
        return delay

    def connection_lasted(self, seconds: float) -> None:
        """Tell the policy how long the last connection stayed healthy."""
        if seconds >= self.reset_after:
            self.attempt = 0
