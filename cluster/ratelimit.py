"""Token buckets, for per-connection command and publish limits and the accept rate.

A bucket holds up to ``burst`` tokens and refills at ``rate`` per second; each
action takes one. The clock is passed in, so the rule is tested without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are enough; ``now`` is monotonic time."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


@dataclass(slots=True)
class Strikes:
    """Counts refusals in a sliding window; too many means abuse (close 4029)."""

    limit: int
    window: float
    _times: list[float] | None = None

    def hit(self, now: float) -> bool:
        """Record one refusal; True when the limit is exceeded within the window."""
        times = self._times if self._times is not None else []
        self._times = times = [t for t in times if now - t < self.window]
        times.append(now)
        return len(times) > self.limit
