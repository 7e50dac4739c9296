"""Properties of private topics and grant patterns, over subjects and patterns Hypothesis picks.

The example tests in test_access_rules.py show the rules; these check that no subject,
however it is spelled, can reach another's private topic, and that no grant pattern
reaches past a separator or past a private, api or nobody rule.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from hypothesis import assume, example, given
from hypothesis import strategies as st

from fanroute.auth import API, Identity
from fanroute.permissions import (
    Namespace,
    Policy,
    Rule,
    escape_subject,
    grant_matches,
    namespace_of,
    private_owner,
    private_topic,
)
from fanroute.protocol import MAX_TOPIC_LENGTH, ProtocolError, check_topic

TOPIC_CHARS = "abcXYZ019._:-/@=+,#~"
SEGMENT_CHARS = "abcXYZ019_-/@=+,#~"  # topic characters without the separators

# Subjects rich in what breaks naive schemes: separators, the escape character itself,
# spaces, hex digits after '~', non-ASCII, and short alphabets so that collisions and
# prefixes turn up often.
tricky = st.text(alphabet=st.sampled_from("aj.:~ 2E3Aé日\U0001f600@_-"), min_size=1, max_size=12)
subjects = st.one_of(tricky, st.text(min_size=1, max_size=40))
suffixes = st.one_of(st.just(""), st.text(alphabet=TOPIC_CHARS, min_size=1, max_size=20))
topic_tails = st.text(alphabet=TOPIC_CHARS, max_size=30)

POLICY = Policy(
    {
        "user": Namespace("user", Rule("authenticated"), Rule("api"), private=True),
        "open": Namespace("open", Rule("anyone"), Rule("anyone")),
        "staff": Namespace("staff", Rule("claim", "role", "staff"), Rule("claim", "role", "staff")),
        "feed": Namespace("feed", Rule("anyone"), Rule("api")),
        "closed": Namespace("closed", Rule("nobody"), Rule("nobody")),
    },
    allow_unknown=False,
)


def who(subject: str, subscribe: list[str] | None = None, publish: list[str] | None = None) -> Identity:
    claims: dict = {"sub": subject}
    if subscribe is not None or publish is not None:
        claims["fanroute"] = {"subscribe": subscribe or [], "publish": publish or []}
    return Identity(subject, claims)


def own_topic(subject: str, suffix: str = "") -> str | None:
    try:
        return private_topic("user", subject, suffix)
    except ValueError:
        return None


@given(subjects, subjects, suffixes)
@example("john", "john.smith", "")
@example("john", "john.smith", "inbox")
@example("a", "a~2E", "")
@example("a.b", "a~2Eb", "")
def test_no_subject_reads_another_subjects_private_topic(mine: str, theirs: str, suffix: str) -> None:
    assume(mine != theirs)
    topic = own_topic(theirs, suffix)
    assume(topic is not None)
    assert POLICY.can_subscribe(who(mine), topic) is not None
    assert POLICY.can_subscribe(who(mine, subscribe=[">", "user:*", "user:>", topic]), topic) is not None


@given(subjects, suffixes)
def test_every_subject_reads_its_own_private_topics(subject: str, suffix: str) -> None:
    topic = own_topic(subject, suffix)
    if len("user:" + escape_subject(subject) + ("." + suffix if suffix else "")) <= MAX_TOPIC_LENGTH:
        assert topic is not None
    if topic is not None:
        assert POLICY.can_subscribe(who(subject), topic) is None


@given(subjects, subjects, topic_tails)
@example("john", "john.smith", ".smith")
def test_any_topic_of_a_private_namespace_has_at_most_one_reader(a: str, b: str, tail: str) -> None:
    """Topics built by extending someone's topic (the prefix attack) or from nothing."""
    assume(a != b)
    for base in (own_topic(a) or "user:", "user:"):
        topic = base + tail
        try:
            check_topic(topic)
        except ProtocolError:
            continue
        readers = [s for s in (a, b) if POLICY.can_subscribe(who(s), topic) is None]
        assert len(readers) <= 1
        owner = private_owner("user", topic)
        assert readers == ([owner] if owner in (a, b) else [])


@given(subjects, subjects)
def test_escaping_is_injective_topic_safe_and_invertible(a: str, b: str) -> None:
    ea, eb = escape_subject(a), escape_subject(b)
    assert (ea == eb) == (a == b)
    assert "." not in ea and ":" not in ea
    topic = own_topic(a)
    if topic is not None:
        assert check_topic(topic) == topic
        assert private_owner("user", topic) == a
        assert private_owner("user", topic + ".x") == a


@given(st.text(alphabet=st.sampled_from("abcXYZ0189_-@"), min_size=1, max_size=40))
def test_safe_subjects_map_to_themselves(subject: str) -> None:
    assert private_topic("user", subject) == "user:" + subject


def test_lone_surrogates_are_subjects_too() -> None:
    # A JSON "sub" may carry an unpaired surrogate; it still gets one topic of its own.
    odd = "a\ud800"
    assert private_owner("user", private_topic("user", odd)) == odd
    assert escape_subject(odd) != escape_subject("a\ud801")


# --- grant patterns -------------------------------------------------------------------

segments = st.text(alphabet=SEGMENT_CHARS, max_size=6)
pattern_segments = st.text(alphabet=st.sampled_from(SEGMENT_CHARS + "**"), max_size=6)
separators = st.sampled_from(".:")


@st.composite
def dotted(draw: st.DrawFn, parts: st.SearchStrategy[str]) -> str:
    first = draw(parts)
    rest = draw(st.lists(st.tuples(separators, parts), max_size=4))
    return first + "".join(sep + part for sep, part in rest)


def cut(text: str) -> list[str]:
    return re.split(r"([.:])", text)


def reference_match(pattern: str, topic: str) -> bool:
    """Segment by segment with fnmatch: exact here, since no segment holds ? or [.

    An empty pattern matches nothing (a missing grant must not become a match).
    """
    p, t = cut(pattern), cut(topic)
    return bool(pattern) and len(p) == len(t) and all(
        (a == b) if i % 2 else fnmatchcase(b, a) for i, (a, b) in enumerate(zip(p, t, strict=True))
    )


@given(dotted(pattern_segments), dotted(segments))
@example("prices.*", "prices.AAPL.bid")
@example("a*", "ab:c")
def test_star_never_matches_across_a_separator(pattern: str, topic: str) -> None:
    matched = grant_matches(pattern, topic)
    assert matched == reference_match(pattern, topic)
    if matched:
        assert [c for c in topic if c in ".:"] == [c for c in pattern if c in ".:"]


@given(dotted(segments))
def test_a_star_pattern_matches_the_topic_it_was_made_from(topic: str) -> None:
    # Replace the topic's segments by * one by one: still a match, with the same cut.
    parts = cut(topic)
    for i in range(0, len(parts), 2):
        starred = "".join("*" if j == i else part for j, part in enumerate(parts))
        assert grant_matches(starred, topic)


@given(dotted(pattern_segments), separators, dotted(segments), separators, dotted(segments))
def test_greater_than_takes_the_rest_and_only_the_rest(head: str, sep: str, mid: str, sep2: str, tail: str) -> None:
    topic_head = head.replace("*", "x")
    assert grant_matches(head, topic_head) == bool(head)
    assert grant_matches(head + sep + ">", topic_head + sep + mid + sep2 + tail)
    assert not grant_matches(head + sep + ">", topic_head)
    assert not grant_matches(head + sep + ">" + sep2 + tail, topic_head + sep + mid + sep2 + tail)


# --- grants against the namespace rules ------------------------------------------------

broad = st.sampled_from([">", "*", "user:>", "user:*", "user:*.*", "feed.*", "closed.>", "*.*", "*:*"])
grant_lists = st.lists(st.one_of(broad, dotted(pattern_segments)), max_size=6)
namespaced_topics = st.builds(
    lambda ns, sep, rest: ns + sep + rest,
    st.sampled_from(["user", "open", "staff", "feed", "closed", "other"]),
    separators,
    dotted(segments),
)


@given(subjects, grant_lists, grant_lists, namespaced_topics)
def test_grants_never_cross_private_api_or_nobody(
    subject: str, sub_grants: list[str], pub_grants: list[str], topic: str
) -> None:
    check_topic(topic)
    client = who(subject, sub_grants, pub_grants)
    plain = who(subject)
    may_sub = POLICY.can_subscribe(client, topic) is None
    may_pub = POLICY.can_publish(client, topic) is None
    ns = namespace_of(topic)
    if ns == "closed":
        assert not may_sub and not may_pub
    if ns in ("feed", "user"):
        assert not may_pub  # publish = "api": the HTTP API alone, whatever the token grants
        assert POLICY.can_publish(API, topic) is None
    if ns == "user" and private_owner("user", topic) != subject:
        assert not may_sub
    # A grant only ever adds: whatever the plain token may do, the granted one may too.
    if POLICY.can_subscribe(plain, topic) is None:
        assert may_sub
    if ns == "other":
        assert may_sub == any(grant_matches(p, topic) for p in sub_grants)
