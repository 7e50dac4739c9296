"""Access rules with no sockets: tokens, namespace permissions, token buckets, config errors."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fanroute.auth import ANONYMOUS, API, AuthError, Authenticator, Identity
from fanroute.config import ConfigError
from fanroute.permissions import Policy, grant_matches, load_policy, namespace_of, private_owner, private_topic
from fanroute.ratelimit import Strikes, TokenBucket

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def hs(claims: dict, secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def test_hs256_token_gives_an_identity():
    auth = Authenticator(secret=SECRET)
    who = auth.verify(hs({"sub": "alice", "exp": time.time() + 3600, "role": "staff"}))
    assert who.subject == "alice" and who.claims["role"] == "staff" and who.expires


@pytest.mark.parametrize(
    "claims,why",
    [
        ({"sub": "a", "exp": time.time() - 60}, "expired"),
        ({"sub": "a", "exp": time.time() + 900, "nbf": time.time() + 600}, "not yet valid"),
        ({"exp": time.time() + 3600}, "sub"),
        ({"sub": "a", "exp": time.time() + 3600, "aud": "other", "iss": "https://auth.example"}, "(?i)audience"),
        ({"sub": "a", "exp": time.time() + 3600, "aud": "fanroute", "iss": "evil"}, "issuer"),
        ({"sub": "a", "aud": "fanroute", "iss": "https://auth.example"}, "no exp claim"),
    ],
)
def test_bad_claims_are_refused(claims, why):
    auth = Authenticator(secret=SECRET, audience="fanroute", issuer="https://auth.example")
    with pytest.raises(AuthError, match=why):
        auth.verify(hs(claims))


def test_wrong_secret_and_junk_are_refused():
    auth = Authenticator(secret=SECRET)
    with pytest.raises(AuthError):
        auth.verify(hs({"sub": "a"}, secret="another-secret-another-secret-xx"))
    with pytest.raises(AuthError):
        auth.verify("not.a.token")
    with pytest.raises(AuthError, match="no JWT key"):
        Authenticator().verify(hs({"sub": "a"}))


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
def test_public_key_tokens(kind, tmp_path):
    private = rsa.generate_private_key(65537, 2048) if kind == "RS256" else ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem)
    auth = Authenticator.from_settings(
        secret=None, public_key_file=str(key_file), audience=None, issuer=None, allow_anonymous=False, api_key=None
    )
    token = jwt.encode({"sub": "bob", "exp": time.time() + 60}, private, algorithm=kind)
    assert auth.verify(token).subject == "bob"
    # With only a public key configured, HS256 tokens are refused outright, so the
    # public key can never be used as an HMAC secret (algorithm confusion).
    with pytest.raises(AuthError, match="not accepted"):
        auth.verify(hs({"sub": "bob", "exp": time.time() + 60}))


def test_exp_is_required_by_default():
    """A token without exp would be valid as long as the key: refused unless configured."""
    forever = hs({"sub": "alice"})
    with pytest.raises(AuthError, match="no exp claim"):
        Authenticator(secret=SECRET).verify(forever)
    settings = dict(secret=SECRET, public_key_file=None, audience=None, issuer=None, allow_anonymous=False, api_key=None)
    assert Authenticator.from_settings(**settings).require_exp is True
    with pytest.raises(AuthError, match="no exp claim"):
        Authenticator.from_settings(**settings).verify(forever)


def test_exp_can_be_made_optional():
    auth = Authenticator.from_settings(
        secret=SECRET, public_key_file=None, audience=None, issuer=None, allow_anonymous=False, api_key=None, require_exp=False
    )
    who = auth.verify(hs({"sub": "alice"}))
    assert who.subject == "alice" and who.expires is None
    # Optional means "may be absent", not "unchecked": a past exp is still refused.
    with pytest.raises(AuthError, match="expired"):
        auth.verify(hs({"sub": "alice", "exp": time.time() - 60}))
    with pytest.raises(AuthError):
        auth.verify(hs({"sub": "alice", "exp": "tomorrow"}))


def test_unreadable_or_bad_key_file_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        Authenticator.from_settings(secret=None, public_key_file=str(tmp_path / "none.pem"), audience=None, issuer=None, allow_anonymous=True, api_key=None)
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    with pytest.raises(ConfigError, match="PEM"):
        Authenticator.from_settings(secret=None, public_key_file=str(bad), audience=None, issuer=None, allow_anonymous=True, api_key=None)


def test_api_key_check():
    auth = Authenticator(api_key="k1")
    assert auth.check_api_key("k1") and not auth.check_api_key("k2") and not auth.check_api_key(None)
    assert not Authenticator().check_api_key("anything")


CONFIG = """
allow_unknown_namespaces = false
[namespaces.public]
[namespaces.members]
subscribe = "authenticated"
publish = "authenticated"
[namespaces.staff]
subscribe = "claim:role=staff"
publish = "claim:role=staff"
[namespaces.feed]
publish = "api"
history_size = 5
history_ttl = 30
[namespaces.user]
private = true
subscribe = "authenticated"
publish = "api"
[namespaces.closed]
subscribe = "nobody"
publish = "nobody"
"""


@pytest.fixture
def policy(tmp_path) -> Policy:
    f = tmp_path / "ns.toml"
    f.write_text(CONFIG)
    return load_policy(str(f))


ALICE = Identity("alice", {"sub": "alice"})
BOB = Identity("bob", {"sub": "bob"})
CAROL = Identity("carol", {"sub": "carol", "role": "staff", "fanroute": {"subscribe": ["vip.*"], "publish": ["vip.lounge"]}})
ROLES = {"anonymous": ANONYMOUS, "alice": ALICE, "bob": BOB, "claims": CAROL, "api": API}

# (topic, role) -> (may subscribe, may publish)
MATRIX = {
    "public.x": {"anonymous": (1, 1), "alice": (1, 1), "bob": (1, 1), "claims": (1, 1), "api": (1, 1)},
    "members.x": {"anonymous": (0, 0), "alice": (1, 1), "bob": (1, 1), "claims": (1, 1), "api": (1, 1)},
    "staff.x": {"anonymous": (0, 0), "alice": (0, 0), "bob": (0, 0), "claims": (1, 1), "api": (1, 1)},
    "feed.x": {"anonymous": (1, 0), "alice": (1, 0), "bob": (1, 0), "claims": (1, 0), "api": (1, 1)},
    "user:alice": {"anonymous": (0, 0), "alice": (1, 0), "bob": (0, 0), "claims": (0, 0), "api": (0, 1)},
    "closed.x": {"anonymous": (0, 0), "alice": (0, 0), "bob": (0, 0), "claims": (0, 0), "api": (0, 0)},
    "unknown.x": {"anonymous": (0, 0), "alice": (0, 0), "bob": (0, 0), "claims": (0, 0), "api": (0, 0)},
    "vip.x": {"anonymous": (0, 0), "alice": (0, 0), "bob": (0, 0), "claims": (1, 0), "api": (0, 0)},
    "vip.lounge": {"anonymous": (0, 0), "alice": (0, 0), "bob": (0, 0), "claims": (1, 1), "api": (0, 0)},
    # A grant's * stays inside one segment: carol's vip.* does not reach vip.x.y.
    "vip.x.y": {"anonymous": (0, 0), "alice": (0, 0), "bob": (0, 0), "claims": (0, 0), "api": (0, 0)},
    # Private topics are <ns>:<subject>; with a '.' instead of ':' the topic is nobody's.
    "user.alice": {"anonymous": (0, 0), "alice": (0, 0), "bob": (0, 0), "claims": (0, 0), "api": (0, 1)},
}


@pytest.mark.parametrize("topic", list(MATRIX))
@pytest.mark.parametrize("role", list(ROLES))
def test_permission_matrix(policy, topic, role):
    may_sub, may_pub = MATRIX[topic][role]
    assert (policy.can_subscribe(ROLES[role], topic) is None) == bool(may_sub)
    assert (policy.can_publish(ROLES[role], topic) is None) == bool(may_pub)


def test_private_sub_topics_and_history_overrides(policy):
    assert policy.can_subscribe(ALICE, "user:alice.inbox") is None
    assert policy.can_subscribe(ALICE, "user:alice.inbox.2:x") is None
    assert policy.can_subscribe(ALICE, "user:alicex") is not None
    assert policy.can_subscribe(ALICE, "user:alice:inbox") is not None  # owner ends at '.', never ':'
    assert policy.can_subscribe(ALICE, "user:alice.") is not None
    assert policy.history_for("feed.x") == (5, 30.0)
    assert policy.history_for("public.x") == (None, None)


JOHN = Identity("john", {"sub": "john"})
JOHN_SMITH = Identity("john.smith", {"sub": "john.smith"})


def test_a_subject_that_is_a_prefix_gets_no_other_subjects_topic(policy):
    """The reported leak: john could read john.smith's private topic."""
    theirs = private_topic("user", "john.smith")
    assert theirs == "user:john~2Esmith"
    assert policy.can_subscribe(JOHN_SMITH, theirs) is None
    assert policy.can_subscribe(JOHN, theirs) is not None
    assert policy.can_subscribe(JOHN, private_topic("user", "john.smith", "inbox")) is not None
    # user:john.smith parses as john's own topic "smith"; john.smith may not read it.
    assert private_owner("user", "user:john.smith") == "john"
    assert policy.can_subscribe(JOHN, "user:john.smith") is None
    assert policy.can_subscribe(JOHN_SMITH, "user:john.smith") is not None


@pytest.mark.parametrize(
    "subject,topic",
    [
        ("alice", "user:alice"),
        ("ann@example.com", "user:ann@example~2Ecom"),
        ("a:b", "user:a~3Ab"),
        ("x~2E", "user:x~7E2E"),
        ("two words", "user:two~20words"),
        ("Zoë", "user:Zo~C3~AB"),
        ("we_-@", "user:we_-@"),
    ],
)
def test_private_topic_escaping(subject, topic):
    assert private_topic("user", subject) == topic
    assert private_owner("user", topic) == subject
    assert private_owner("user", topic + ".inbox") == subject


@pytest.mark.parametrize(
    "topic",
    ["user.alice", "user:", "user:.x", "user:~61lice", "user:a~2e", "user:a~2", "user:~C3", "user:~C0~AE", "users:alice", "user:a b"],
)
def test_non_canonical_private_topics_belong_to_nobody(topic):
    assert private_owner("user", topic) is None


def test_private_topic_refuses_what_cannot_be_a_topic():
    assert len(private_topic("user", "a" * 251)) == 256
    with pytest.raises(ValueError, match="not be a valid topic"):
        private_topic("user", "a" * 252)
    with pytest.raises(ValueError, match="not be a valid topic"):
        private_topic("user", "." * 84)  # 84 * 3 characters escaped
    with pytest.raises(ValueError):
        private_topic("user", "")
    with pytest.raises(ValueError):
        private_topic("us.er", "alice")
    with pytest.raises(ValueError):
        private_topic("user", "alice", "no spaces")


@pytest.mark.parametrize(
    "pattern,topic,matches",
    [
        ("prices.*", "prices.AAPL", True),
        ("prices.*", "prices.AAPL.bid", False),
        ("prices.*", "prices:AAPL", False),  # separators match only themselves
        ("prices.*", "prices", False),
        ("room-*", "room-7", True),
        ("room-*", "room-7.x", False),
        ("a*b*c", "aXbYbZc", True),
        ("a*b*c", "aXbYc.c", False),
        ("user:alice*", "user:alice2", True),  # matches; privacy refuses it anyway
        ("prices.>", "prices.AAPL.bid:x", True),
        ("prices.>", "prices", False),
        ("prices.>", "prices.", False),
        (">", "anything.at:all", True),
        ("prices.>.x", "prices.a.x", False),  # > only as the whole last segment
        ("prices.a>", "prices.a>", False),
        ("PRICES.x", "prices.x", False),
        ("prices.x", "prices.x", True),
        ("", "", False),
    ],
)
def test_grant_patterns(pattern, topic, matches):
    assert grant_matches(pattern, topic) is matches


def test_many_stars_do_not_backtrack():
    # Would take astronomically long with naive backtracking; the atomic scan is linear.
    assert not grant_matches("*a" * 40 + "*b", "a" * 250)


GREEDY = Identity(
    "alice",
    {"sub": "alice", "fanroute": {"subscribe": [">", "user:*", "user:*.*", "closed.*"], "publish": [">", "user:>", "feed.*", "closed.*"]}},
)


def test_grants_never_cross_private_api_or_nobody(policy):
    for topic in ("user:bob", "user:bob.inbox", "user:alice2", "user.alice", private_topic("user", "alice.x")):
        assert policy.can_subscribe(GREEDY, topic) is not None, topic
    assert policy.can_subscribe(GREEDY, "user:alice.inbox") is None
    assert policy.can_publish(GREEDY, "feed.x") is not None  # publish = "api"
    assert policy.can_publish(GREEDY, "user:alice") is not None  # publish = "api", even on her own
    assert policy.can_subscribe(GREEDY, "closed.x") is not None and policy.can_publish(GREEDY, "closed.x") is not None
    # What grants are for: rules that depend on the client, and unlisted namespaces.
    assert policy.can_subscribe(GREEDY, "staff.x") is None and policy.can_publish(GREEDY, "staff.x") is None
    assert policy.can_subscribe(GREEDY, "unknown.x") is None and policy.can_publish(GREEDY, "unknown.x") is None


def test_grants_in_private_namespaces_help_only_the_owner(tmp_path):
    f = tmp_path / "ns.toml"
    f.write_text('[namespaces.inbox]\nprivate = true\nsubscribe = "claim:beta"\npublish = "claim:beta"\n')
    policy = load_policy(str(f))
    granted = Identity("alice", {"sub": "alice", "fanroute": {"subscribe": ["inbox:>"], "publish": ["inbox:>"]}})
    assert policy.can_subscribe(granted, "inbox:alice") is None and policy.can_publish(granted, "inbox:alice.x") is None
    assert policy.can_subscribe(granted, "inbox:bob") is not None and policy.can_publish(granted, "inbox:bob") is not None
    beta = Identity("carol", {"sub": "carol", "beta": True})  # the rule itself lets carol write to anyone's inbox
    assert policy.can_publish(beta, "inbox:bob") is None and policy.can_subscribe(beta, "inbox:bob") is not None


def test_revoked_after_a_refresh(policy):
    before = ["staff.x", "vip.a", "user:carol", "public.x", "vip.b.c"]
    assert policy.revoked(CAROL, before[:4]) == []
    weaker = Identity("carol", {"sub": "carol", "fanroute": {"subscribe": ["vip.a"]}})
    assert policy.revoked(weaker, before) == ["staff.x", "vip.b.c"]
    assert Policy().revoked(ANONYMOUS, before) == []


def test_no_config_means_open():
    assert Policy().can_subscribe(ANONYMOUS, "anything.at.all") is None
    assert Policy().can_publish(ANONYMOUS, "x") is None


def test_namespace_is_the_prefix():
    assert namespace_of("chat.room1") == "chat"
    assert namespace_of("user:42") == "user"
    assert namespace_of("plain") == ""


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[namespaces.chat]\nsubscribe = 'everyone'", "namespaces.chat.subscribe"),
        ("[namespaces.chat]\nhistory_size = -1", "namespaces.chat.history_size"),
        ("[namespaces.chat]\ncolour = 'red'", "unknown key 'colour'"),
        ("allow_unknown_namespaces = 'yes'", "allow_unknown_namespaces"),
        ("[namespaces.chat\n", "not valid TOML"),
        ("names = 1", "unknown key 'names'"),
        ("[namespaces.'a.b']", "cannot contain"),
    ],
)
def test_bad_config_names_file_key_and_problem(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_policy(str(f))
    assert str(f) in str(err.value) and needle in str(err.value)


def test_yaml_config(tmp_path):
    f = tmp_path / "ns.yaml"
    f.write_text("namespaces:\n  chat:\n    publish: authenticated\n")
    policy = load_policy(str(f))
    assert policy.can_publish(ANONYMOUS, "chat.x") is not None and policy.can_publish(ALICE, "chat.x") is None


def test_token_bucket():
    b = TokenBucket(rate=10, burst=3)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.1) is True  # one token back after 0.1 s
    assert b.take(0.1) is False
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]  # never above burst


def test_strikes_window():
    s = Strikes(limit=3, window=10)
    assert [s.hit(t) for t in (0, 1, 2)] == [False, False, False]
    assert s.hit(3) is True
    assert s.hit(30) is False  # old strikes age out
