"""Failed attempts per client address, for throttling guesses at a secret.

Each wrong API key costs the address it came from one token of a
:class:`~fanroute.ratelimit.TokenBucket`. An address that has run out is refused
without its key being looked at, until the bucket has refilled enough for one more
try, so guessing is held to the refill rate however fast the requests come.

Only addresses that have failed are kept, and at most ``capacity`` of them: when
the table is full the address that failed least recently is forgotten. A flood from
many addresses can therefore cost an old entry its memory of failures, but never
grow the table. IPv6 addresses are grouped by /64, the block one subscriber usually
holds, so that stepping through one's own prefix does not buy fresh budgets.

No I/O: the clock is passed in, so the rule is tested without waiting.
"""

from __future__ import annotations

import ipaddress

from fanroute.ratelimit import TokenBucket


def address_key(host: str) -> str:
    """The key a client's budget is kept under: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an IP address (unknown peer): keyed as given
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AttemptThrottle:
    """A bounded table of per-address budgets for failed attempts."""

    def __init__(self, burst: float = 10.0, rate: float = 1.0, capacity: int = 10_000) -> None:
        if rate <= 0 or burst < 1 or capacity < 1:
            raise ValueError("an attempt throttle needs rate > 0, burst >= 1 and capacity >= 1")
        self.burst = burst
        self.rate = rate
        self.capacity = capacity
        # Insertion order is recency order: a failing address is moved to the end.
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after(self, host: str, now: float) -> float | None:
        """``None`` if ``host`` may try now, else the seconds until it may try again.

        Asking spends nothing: only :meth:`failed` does, so a refused request does
        not push the address's next chance further away.
        """
        key = address_key(host)
        bucket = self._buckets.get(key)
        if bucket is None:
            return None
        bucket.take(now, 0)  # taking nothing brings the bucket up to date
        if bucket.tokens >= bucket.burst:
            del self._buckets[key]  # fully refilled: nothing left to remember
            return None
        if bucket.tokens >= 1:
            return None
        return (1 - bucket.tokens) / bucket.rate

    def failed(self, host: str, now: float) -> None:
        """Charge one failed attempt to ``host``."""
        key = address_key(host)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            if len(self._buckets) >= self.capacity:
                del self._buckets[next(iter(self._buckets))]
            bucket = TokenBucket(self.rate, self.burst, updated=now)
        self._buckets[key] = bucket
        bucket.take(now)
