"""The conflation buffer: every seq accounted for exactly once, the newest never lost."""

from hypothesis import given, settings
from hypothesis import strategies as st

from fanroute.gateway.conflation import Conflation

TOPICS = ["a", "b", "c"]

# A step: publish one message on a topic (with its frame size), or let the
# connection's buffer drain by some bytes and write what the conflation hands back.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from(TOPICS), st.integers(1, 300)),
        st.tuples(st.just("drain"), st.integers(0, 2000)),
    ),
    max_size=200,
)


def run(plan, threshold):
    c = Conflation(threshold)
    backlog = 0
    seqs = {t: 0 for t in TOPICS}
    written = {t: [] for t in TOPICS}  # (seq, skipped) in the order written

    def write(topic, seq, skipped, size):
        nonlocal backlog
        written[topic].append((seq, skipped))
        backlog += size

    def drain(n):
        nonlocal backlog
        backlog = max(0, backlog - n)
        for held in c.take(backlog):
            write(held.topic, held.seq, held.skipped, held.size)

    for step in plan:
        if step[0] == "push":
            _, topic, size = step
            seqs[topic] += 1
            if c.offer(topic, seqs[topic], None, size, backlog):
                write(topic, seqs[topic], 0, size)
        else:
            drain(step[1])
        # Memory: one held message per topic at most.
        assert len(c) <= len(TOPICS)
    while len(c):
        drain(10**9)
    return seqs, written, c


@settings(max_examples=300, deadline=None)
@given(steps, st.integers(0, 1500))
def test_written_seqs_and_skipped_account_for_every_seq_once(plan, threshold):
    seqs, written, c = run(plan, threshold)
    left_out = 0
    for topic in TOPICS:
        covered = []
        for seq, skipped in written[topic]:
            covered.extend(range(seq - skipped, seq + 1))  # the skipped ones just before it, then itself
            left_out += skipped
        assert covered == list(range(1, seqs[topic] + 1))
    assert c.conflated == left_out


@settings(max_examples=300, deadline=None)
@given(steps, st.integers(0, 1500))
def test_the_last_seq_of_every_topic_is_written(plan, threshold):
    seqs, written, _ = run(plan, threshold)
    for topic in TOPICS:
        if seqs[topic]:
            assert written[topic][-1][0] == seqs[topic]


@settings(max_examples=200, deadline=None)
@given(steps, st.integers(0, 1500))
def test_conflated_messages_enter_the_buffer_only_at_or_under_the_threshold(plan, threshold):
    c = Conflation(threshold)
    backlog, seq = 0, 0
    for step in plan:
        if step[0] == "push":
            seq += 1
            if c.offer(step[1], seq, None, step[2], backlog):
                assert backlog <= threshold
                backlog += step[2]
        else:
            backlog = max(0, backlog - step[1])
            before = backlog
            taken = c.take(backlog)
            if taken:
                assert before <= threshold
                # Each one was taken while the buffer was within the threshold.
                assert before + sum(h.size for h in taken[:-1]) <= threshold
            backlog += sum(h.size for h in taken)


def test_a_dropped_topic_is_not_written_and_is_counted():
    c = Conflation(0)
    assert c.offer("a", 1, None, 10, 0)
    assert not c.offer("a", 2, None, 10, 10)
    assert not c.offer("a", 3, None, 10, 10)
    assert c.drop("a") == 1  # the held one; the one it replaced was counted already
    assert c.conflated == 2 and c.take(0) == [] and c.bytes == 0
