from fanroute.history import Entry, History


def fill(h: History, n: int, t0: float = 0.0, step: float = 1.0) -> None:
    for seq in range(1, n + 1):
        h.append(Entry(seq, {"n": seq}, 0.0, t0 + seq * step))


def test_recovers_exactly_the_missed_messages():
    h = History(100, 1000)
    fill(h, 10)
    got = h.after(6, 10, now=11)
    assert [e.seq for e in got] == [7, 8, 9, 10]


def test_cursor_at_the_head_needs_nothing():
    h = History(100, 1000)
    fill(h, 10)
    assert h.after(10, 10, now=11) == []


def test_count_bound_loses_the_oldest():
    h = History(5, 1000)
    fill(h, 10)
    assert len(h) == 5
    assert h.after(4, 10, now=11) is None  # 5 is gone
    assert [e.seq for e in h.after(5, 10, now=11)] == [6, 7, 8, 9, 10]


def test_age_bound_loses_old_entries():
    h = History(100, ttl=5)
    fill(h, 10)  # stored at t=1..10
    assert h.after(3, 10, now=12) is None  # entries older than t=7 expired
    assert [e.seq for e in h.after(6, 10, now=12)] == [7, 8, 9, 10]


def test_cursor_from_the_future_is_not_recoverable():
    h = History(100, 1000)
    fill(h, 3)
    assert h.after(7, 3, now=4) is None


def test_disabled_history_recovers_only_a_current_cursor():
    h = History(0, 1000)
    fill(h, 3)
    assert len(h) == 0
    assert h.after(3, 3, now=4) == []
    assert h.after(2, 3, now=4) is None
