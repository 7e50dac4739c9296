"""The router shard's state machine, driven frame by frame."""

import msgpack

from fanroute import wire
from fanroute.router.shard import Shard

GW_A, GW_B = "tcp://127.0.0.1:7201", "tcp://127.0.0.1:7202"


def P(value):
    """A payload as it travels between nodes."""
    return msgpack.packb(value)


def pub(topic, value, req=0, ts=0.0, idem=None):
    return [wire.PUB, topic, P(value), req, ts, idem]


def shard(**kw):
    return Shard("router-0", epoch="E", **kw)


def frames_for(sh, inbox):
    return sh.take_outbound().get(inbox, [])


def hello(sh, inbox, instance="i1", interest=(), now=0.0):
    sh.receive(inbox, [[wire.HELLO, inbox, instance, [list(x) for x in interest]]], now)
    return sh.take_outbound().get(inbox, [])


def test_publish_reaches_each_interested_gateway_once_and_no_other():
    sh = shard()
    hello(sh, GW_A)
    hello(sh, GW_B)
    sh.receive(GW_A, [[wire.SUB, "t", 1, None, 0]], 0)
    sh.take_outbound()
    sh.receive(GW_B, [pub("t", {"x": 1}, 0, 1.0), pub("u", 2, 0, 1.0)], 0)
    out = sh.take_outbound()
    assert out == {GW_A: [[wire.MSG, "t", 1, P({"x": 1}), 1.0]]}
    assert sh.stats.fanout_sends == 1 and sh.stats.publications == 2


def test_seq_rises_by_one_per_publication_and_acks_carry_it():
    sh = shard()
    sh.receive(GW_A, [pub("t", i, i + 1, 0.0) for i in range(3)], 0)
    acks = frames_for(sh, GW_A)
    assert [f[3] for f in acks if f[0] == wire.PUBOK] == [1, 2, 3]


def test_subscribe_answers_with_epoch_and_last_seq():
    sh = shard()
    sh.receive(GW_A, [pub("t", i, 0, 0.0) for i in range(5)], 0)
    sh.receive(GW_A, [[wire.SUB, "t", 9, None, 0]], 0)
    (ok,) = frames_for(sh, GW_A)
    assert ok == [wire.SUBOK, "t", 9, "E-1", 5, False, []]


def test_recovery_returns_exactly_what_was_missed():
    sh = shard()
    sh.receive(GW_A, [pub("t", i, 0, 0.0) for i in range(1, 11)], 0)
    sh.receive(GW_A, [[wire.SUB, "t", 1, "E-1", 7]], 0)
    (ok,) = frames_for(sh, GW_A)
    assert ok[5] is True
    assert [m[0] for m in ok[6]] == [8, 9, 10]
    assert [msgpack.unpackb(m[1]) for m in ok[6]] == [8, 9, 10]


def test_recovery_fails_on_a_changed_epoch_or_short_history():
    sh = shard(history_size=3)
    sh.receive(GW_A, [pub("t", i, 0, 0.0) for i in range(10)], 0)
    sh.receive(GW_A, [[wire.SUB, "t", 1, "other", 7], [wire.SUB, "t", 2, "E-1", 2]], 0)
    a, b = frames_for(sh, GW_A)
    assert a[5] is False and a[6] == [] and b[5] is False
    assert sh.stats.not_recovered == 2


def test_hello_replaces_interest_and_resyncs_each_topic():
    sh = shard()
    sh.receive(GW_A, [[wire.SUB, "old", 1, None, 0]], 0)
    sh.receive(GW_B, [pub("t", i, 0, 0.0) for i in range(4)], 0)
    sh.take_outbound()
    out = hello(sh, GW_A, interest=[("t", "E-2", 2), ("fresh", None, 0)])
    assert out[0] == [wire.WELCOME, "E", "i1"]
    assert out[1] == [wire.SUBOK, "t", 0, "E-2", 4, True, [[3, P(2), 0.0], [4, P(3), 0.0]]]
    assert len(out) == 2  # no epoch for "fresh": nothing to resync yet
    assert sh.gateways[GW_A].topics == {"t", "fresh"}
    assert GW_A not in sh.topics["old"].gateways


def test_a_restarted_gateway_on_the_same_inbox_loses_the_old_interest():
    sh = shard()
    hello(sh, GW_A, "first", [("t", None, 0)])
    hello(sh, GW_A, "second", [])
    sh.receive(GW_B, [pub("t", 1, 0, 0.0)], 0)
    assert GW_A not in sh.take_outbound()


def test_heartbeat_tells_the_gateway_which_instance_the_shard_knows():
    sh = shard()
    sh.receive(GW_A, [[wire.BEAT]], 0)
    assert frames_for(sh, GW_A) == [[wire.WELCOME, "E", ""]]
    hello(sh, GW_A, "i1")
    sh.receive(GW_A, [[wire.BEAT]], 0)
    assert frames_for(sh, GW_A) == [[wire.WELCOME, "E", "i1"]]


def test_silent_gateways_are_forgotten():
    sh = shard(gateway_timeout=5)
    hello(sh, GW_A, interest=[("t", None, 0)], now=0)
    hello(sh, GW_B, now=4)
    assert sh.sweep(now=6) == [GW_A]
    assert "t" not in sh.topics  # no interest and no history left: evicted
    assert sh.stats.gateways_forgotten == 1 and sh.stats.topics_evicted == 1


def test_idle_topics_are_evicted_and_come_back_with_a_new_epoch():
    sh = shard(history_ttl=10)
    sh.receive(GW_A, [pub("t", 1, 0, 0.0)], 0)
    sh.sweep(now=5)
    assert "t" in sh.topics  # history still holds a message
    sh.gateways[GW_A].last_seen = 20
    sh.sweep(now=20)
    assert "t" not in sh.topics
    sh.receive(GW_A, [[wire.SUB, "t", 1, None, 0]], 21)
    (ok,) = frames_for(sh, GW_A)
    assert ok[3] == "E-2" and ok[4] == 0


def test_bad_frames_are_counted_and_skipped():
    sh = shard()
    sh.receive(GW_A, [["junk"], [wire.PUB, 5], pub("t", 1, 0, 0.0)], 0)
    assert sh.stats.frames_rejected == 2 and sh.stats.publications == 1


def test_replies_go_back_under_the_name_the_gateway_uses():
    sh = shard()
    sh.receive(GW_A, [[wire.BEAT]], 0, reply_as="r0")
    assert sh.gateways[GW_A].reply_as == "r0"


def test_a_publication_with_a_known_idem_key_is_answered_with_its_seq_and_not_applied():
    sh = shard()
    hello(sh, GW_B, interest=[("t", None, 0)])
    sh.receive(GW_B, [[wire.SUB, "t", 1, None, 0]], 0)
    sh.take_outbound()
    sh.receive(GW_A, [pub("t", "a", 1, idem="k1"), pub("t", "b", 2, idem="k2"), pub("t", "a again", 3, idem="k1")], 0)
    acks = [f for f in frames_for(sh, GW_A) if f[0] == wire.PUBOK]
    assert [(f[2], f[3]) for f in acks] == [(1, 1), (2, 2), (3, 1)]
    assert sh.topics["t"].seq == 2 and sh.stats.duplicates == 1


def test_an_idem_key_is_forgotten_with_its_history_entry():
    sh = shard(history_size=2)
    sh.receive(GW_A, [pub("t", 0, 1, idem="k"), pub("t", 1, 2), pub("t", 2, 3), pub("t", 3, 4, idem="k")], 0)
    acks = [f[3] for f in frames_for(sh, GW_A) if f[0] == wire.PUBOK]
    assert acks == [1, 2, 3, 4]  # the key's entry was evicted: a new publication


def test_history_bytes_are_capped_across_topics_oldest_first():
    from fanroute.history import ENTRY_OVERHEAD

    cost = 1000 + 3 + ENTRY_OVERHEAD  # msgpack str8 header is 2 bytes; bin/str of 1000 -> 3
    sh = shard(history_bytes=10 * cost)
    for i in range(30):
        sh.receive(GW_A, [pub(f"t{i % 3}", "x" * 1000)], 0)
    assert sh.history_bytes <= 10 * cost
    assert sh.stats.history_evicted == 30 - sh.history_messages()
    # The newest messages stayed; a cursor into what was evicted is not recovered.
    sh.receive(GW_A, [[wire.SUB, "t0", 1, "E-1", 1]], 0)
    (ok,) = frames_for(sh, GW_A)
    assert ok[5] is False
    last = sh.topics["t2"].seq
    sh.receive(GW_A, [[wire.SUB, "t2", 2, "E-3", last - 2]], 0)
    (ok,) = frames_for(sh, GW_A)
    assert ok[5] is True and [m[0] for m in ok[6]] == [last - 1, last]


def test_the_cap_order_is_compacted_when_entries_leave_by_count():
    sh = shard(history_size=1)
    for i in range(5000):
        sh.receive(GW_A, [pub("t", i)], 0)
    sh.sweep(now=0)
    assert len(sh._order) <= 2 * sh.history_messages() + 1024
    assert sh.history_bytes == sum(t.history.bytes for t in sh.topics.values())


def test_records_that_left_history_are_dropped_from_the_front_at_each_sweep():
    sh = shard(history_size=1)
    for i in range(100):
        sh.receive(GW_A, [pub("t", i)], 0)
    sh.sweep(now=0)
    assert list(sh._order) == [("t", sh.topics["t"].history.first_seq)]  # well below the full pass's threshold
    # A live record in front stops the cheap drop; the full pass still bounds the order.
    sh = shard(history_size=1)
    sh.receive(GW_A, [pub("slow", 0)], 0)
    for i in range(100):
        sh.receive(GW_A, [pub("fast", i)], 0)
    sh.sweep(now=0)
    assert len(sh._order) == 101
    for i in range(100, 5000):
        sh.receive(GW_A, [pub("fast", i)], 0)
    sh.sweep(now=0)
    assert sorted(sh._order) == [("fast", sh.topics["fast"].history.first_seq), ("slow", 1)]
    assert sh.history_bytes == sum(t.history.bytes for t in sh.topics.values())


def test_a_sender_that_is_not_an_inbox_address_is_ignored_and_never_dialed():
    sh = shard()
    sh.receive("x", [[wire.BEAT]], 0)
    assert sh.take_outbound() == {} and "x" not in sh.gateways
    assert sh.stats.senders_rejected == 1


def test_a_frame_whose_handling_raises_is_counted_and_the_batch_goes_on(monkeypatch):
    sh = shard()

    def boom(*args):
        raise RuntimeError("bug")

    monkeypatch.setattr(sh, "unsubscribe", boom)
    sh.receive(GW_A, [[wire.UNSUB, "t"], pub("t", 1)], 0)
    assert sh.stats.frames_failed == 1 and sh.stats.publications == 1
