import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanroute.backoff import Backoff


@given(
    st.floats(0.001, 1), st.floats(1, 60), st.floats(1, 4), st.integers(0, 200), st.integers(0, 2**32)
)
def test_delay_is_within_the_exponential_cap(min_delay, max_delay, factor, attempts, seed):
    b = Backoff(min_delay=min_delay, max_delay=max_delay, factor=factor, rng=random.Random(seed))
    for attempt in range(attempts % 40):
        cap = b.cap(attempt)
        assert cap <= max_delay
        assert 0 <= b.next_delay() <= cap


def test_cap_grows_then_saturates():
    b = Backoff(min_delay=0.1, max_delay=5, factor=2)
    caps = [b.cap(i) for i in range(10)]
    assert caps[:4] == [0.1, 0.2, 0.4, 0.8]
    assert caps[-1] == 5


def test_full_jitter_spreads_delays():
    b = Backoff(min_delay=1, max_delay=1, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(1000)]
    assert min(delays) < 0.1 and max(delays) > 0.9


def test_reset_only_after_a_healthy_connection():
    b = Backoff(min_delay=0.1, max_delay=10, reset_after=5)
    for _ in range(5):
        b.next_delay()
    b.connection_lasted(0.5)  # accepted, then dropped at once: keep backing off
    assert b.attempt == 5
    b.connection_lasted(6)
    assert b.attempt == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Backoff(min_delay=2, max_delay=1)
    with pytest.raises(ValueError):
        Backoff(factor=0.5)
