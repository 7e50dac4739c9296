"""Who may subscribe and publish where: namespace rules from a config file.

A topic's namespace is its prefix up to the first ``.`` or ``:`` (``chat.room1`` is in
``chat``; a topic with neither is in the namespace ``""``). Each namespace says who may
subscribe, who may publish, whether its topics are user-private, and how much history
its topics keep.

Without a config file every topic is open to everyone (the standalone default). With
one, namespaces it does not list are refused unless ``allow_unknown_namespaces = true``
(then they are open to everyone), except where a token's grant opens them (below).

The config file is TOML (or YAML, by its suffix)::

    allow_unknown_namespaces = false

    [namespaces.chat]
    subscribe = "anyone"          # anyone | authenticated | claim:NAME | claim:NAME=VALUE | nobody
    publish = "authenticated"     # the same, or "api" (only the HTTP publish API)
    history_size = 100
    history_ttl = 60

    [namespaces.user]
    private = true                # each topic readable by its one owner (see below)
    subscribe = "authenticated"
    publish = "api"

    [namespaces.prices]
    conflate = true               # a subscriber that falls behind gets the newest of each topic

Conflation
----------
In a namespace with ``conflate = true``, a subscriber whose outbound buffer holds
more than ``--conflate-threshold`` bytes is sent only the newest pending message of
each of the namespace's topics, marked with how many were left out (``skipped``),
instead of being closed as a slow consumer: right for prices and scores, where only
the latest value matters; wrong for chat, where every message does
(``fanroute.gateway.conflation``).

Private topics
--------------
In a namespace with ``private = true``, a topic is subscribable only by the subject (the
token's ``sub``) that owns it; ``publish`` stays governed by the namespace's publish rule,
so ``publish = "authenticated"`` makes each private topic an inbox anyone may write to.
A subject may be any non-empty string, so it is escaped before it goes into a topic:
ASCII letters, digits, ``_``, ``-`` and ``@`` stay as they are, and every other character
becomes its UTF-8 bytes written ``~XX`` (two upper-case hex digits), ``~`` itself
included. The escaped subject therefore never holds ``.`` or ``:``, and no two subjects
escape alike. The private topics of a subject whose escaped form is ``E`` are exactly
``user:E`` and ``user:E.<suffix>`` (a non-empty suffix, any topic characters)::

    alice            -> user:alice            (and user:alice.inbox, ...)
    john.smith       -> user:john~2Esmith
    ann@example.com  -> user:ann@example~2Ecom
    Zoë              -> user:Zo~C3~AB

The owner is found by parsing the topic, never by comparing prefixes: ``user:john.smith``
is john's topic ``smith``, not john.smith's. Every other topic of the namespace
(``user.alice``, ``user:alice:x``, ``user:alice.``, a lower-case or needless escape such
as ``user:~61lice``) belongs to nobody, and nobody may subscribe to it. A subject whose
``user:E`` would exceed the 256-character topic limit owns no private topic.
:func:`private_topic` builds these names and :func:`private_owner` reads them back;
back-ends that publish to users use the former.

Grants
------
A token may grant topic patterns in a ``fanroute`` claim::

    {"sub": "alice", "fanroute": {"subscribe": ["prices.*"], "publish": ["chat.room1"]}}

A pattern is cut into segments at ``.`` and ``:`` just as topics are, and matches a topic
with the same separators in the same places (matching is case-sensitive):

- any character other than ``*`` and ``>`` matches itself;
- ``*`` matches any run of characters, the empty one included, inside one segment and
  never a ``.`` or ``:`` (``prices.*`` matches ``prices.AAPL``, not ``prices.AAPL.bid``;
  ``room-*`` matches ``room-7``);
- ``>`` as the whole last segment matches the rest of the topic, one character or more,
  separators included (``prices.>`` matches ``prices.AAPL`` and ``prices.AAPL.bid``, not
  ``prices``). It is the only wildcard that spans segments; a ``>`` anywhere else makes
  the pattern match nothing, as do empty and non-string patterns.

A grant lets its token do what a namespace's ``anyone``, ``authenticated`` or ``claim:``
rule would refuse. It never overrides ``nobody`` or ``api``, and in a private namespace it
counts only on the token's own private topics: no grant opens one subject's private
topic to another. In a namespace the file does not list (``allow_unknown_namespaces =
false``), grants are the only way in: what a grant matches is allowed, nothing else.
"""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fanroute.auth import Identity
from fanroute.config import ConfigError
from fanroute.protocol import ProtocolError, check_topic

_SEPARATORS = ".:"
_KINDS = ("anyone", "authenticated", "claim", "api", "nobody")
# Rules a grant can never override: they do not depend on who the client is.
_UNGRANTABLE = frozenset({"api", "nobody"})
# Subject characters written into a private topic as they are. Everything else,
# ``.`` and ``:`` above all, is escaped, so a subject cannot forge a separator.
_SAFE = frozenset(string.ascii_letters + string.digits + "_-@")
_HEX = frozenset("0123456789ABCDEF")


def namespace_of(topic: str) -> str:
    for i, c in enumerate(topic):
        if c in _SEPARATORS:
            return topic[:i]
    return ""


# --- private topics -----------------------------------------------------------------


def escape_subject(subject: str) -> str:
    """A subject in topic characters, one-to-one: safe characters kept, the rest ``~XX``.

    Lone surrogates (which a JSON ``sub`` can carry) are escaped as their surrogate
    bytes rather than refused, so that every string has exactly one escaped form.
    """
    out: list[str] = []
    for ch in subject:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"~{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _unescape_subject(text: str) -> str | None:
    """The subject whose escaped form is exactly ``text``, or None.

    Only the canonical form is accepted (upper-case hex, no needless escapes, valid
    UTF-8): otherwise one subject would have several topic names, and a check that
    compares names could be walked around.
    """
    raw = bytearray()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _SAFE:
            raw.append(ord(c))
            i += 1
        elif c == "~" and i + 2 < n and text[i + 1] in _HEX and text[i + 2] in _HEX:
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            return None
    try:
        subject = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    return subject if subject and escape_subject(subject) == text else None


def _is_topic(topic: str) -> bool:
    try:
        check_topic(topic)
    except ProtocolError:
        return False
    return True


def private_topic(namespace: str, subject: str, suffix: str = "") -> str:
    """The private topic of ``subject`` in ``namespace``: ``ns:E`` or ``ns:E.suffix``.

    Raises ValueError when there is no such topic: an empty subject, a namespace holding
    a separator, a suffix with characters topics cannot hold, or a result longer than
    the topic limit (a subject that long owns no private topic at all).
    """
    if not isinstance(subject, str) or not subject:
        raise ValueError("a subject is a non-empty string")
    if any(c in _SEPARATORS for c in namespace):
        raise ValueError(f"namespace {namespace!r} cannot contain '.' or ':'")
    topic = f"{namespace}:{escape_subject(subject)}" + (f".{suffix}" if suffix else "")
    if not _is_topic(topic):
        raise ValueError(
            f"the private topic of {subject[:40]!r} in {namespace!r} would not be a valid topic"
            " (at most 256 letters, digits and . _ : - / @ = + , # ~)"
        )
    return topic


def private_owner(namespace: str, topic: str) -> str | None:
    """The one subject that owns ``topic`` as a private topic of ``namespace``, or None.

    The inverse of :func:`private_topic`: the escaped subject runs from the ``:`` after
    the namespace to the first ``.`` (it can contain neither), and must be canonical.
    """
    prefix = namespace + ":"
    if not topic.startswith(prefix) or not _is_topic(topic):
        return None
    escaped, dot, suffix = topic[len(prefix) :].partition(".")
    if dot and not suffix:
        return None
    return _unescape_subject(escaped)


# --- grant patterns -----------------------------------------------------------------

_SPLIT = re.compile(r"([.:])")
_SEGMENT = "[^.:]"


@lru_cache(maxsize=4096)
def _compile_grant(pattern: str) -> re.Pattern[str] | None:
    """A grant pattern as a regex, or None when it can match nothing.

    Cached because the same few patterns come with every token of an issuer. Each
    ``*`` between literals is an atomic lazy scan, so a pattern full of stars costs
    linear time per segment instead of backtracking exponentially.
    """
    if not pattern:
        return None
    parts = _SPLIT.split(pattern)  # segments at even indexes, separators at odd ones
    out: list[str] = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(re.escape(part))
        elif part == ">" and i == len(parts) - 1:
            out.append("(?s:.+)")
        elif ">" in part:
            return None
        elif "*" not in part:
            out.append(re.escape(part))
        else:
            first, *middle, last = part.split("*")
            out.append(re.escape(first))
            out.extend(f"(?>{_SEGMENT}*?{re.escape(m)})" for m in middle if m)
            out.append(f"{_SEGMENT}*{re.escape(last)}")
    return re.compile("".join(out))


def grant_matches(pattern: str, topic: str) -> bool:
    """Whether a grant pattern covers ``topic`` (syntax in the module docstring)."""
    compiled = _compile_grant(pattern) if isinstance(pattern, str) else None
    return compiled is not None and compiled.fullmatch(topic) is not None


def _granted(who: Identity, action: str, topic: str) -> bool:
    grants = who.claims.get("fanroute")
    if not isinstance(grants, dict):
        return False
    patterns = grants.get(action)
    return isinstance(patterns, list) and any(grant_matches(p, topic) for p in patterns)


# --- rules --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    kind: str
    claim: str | None = None
    value: str | None = None

    @classmethod
    def parse(cls, text: Any, where: str) -> Rule:
        if not isinstance(text, str):
            raise ConfigError(f"{where} must be a string such as \"anyone\" or \"claim:role=admin\"")
        kind, _, rest = text.partition(":")
        if kind not in _KINDS or (kind == "claim") != bool(rest):
            raise ConfigError(f"{where} = {text!r} is not one of anyone, authenticated, claim:NAME[=VALUE], api, nobody")
        claim, _, value = rest.partition("=")
        return cls(kind, claim or None, value or None)

    def allows(self, who: Identity) -> bool:
        if self.kind == "anyone":
            return True
        if self.kind == "authenticated":
            return who.authenticated
        if self.kind == "api":
            return who.api
        if self.kind == "claim":
            if who.api:
                return True  # the server's own API is trusted with every claim rule
            have = who.claims.get(self.claim)
            if self.value is None:
                return bool(have)
            return have == self.value or (isinstance(have, list) and self.value in have)
        return False


@dataclass(frozen=True)
class Namespace:
    name: str
    subscribe: Rule = Rule("anyone")
    publish: Rule = Rule("anyone")
    private: bool = False
    history_size: int | None = None
    history_ttl: float | None = None
    conflate: bool = False


OPEN = Namespace("*")


@dataclass
class Policy:
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    allow_unknown: bool = True
    source: str | None = None  # the config file, for messages

    def namespace(self, topic: str) -> Namespace | None:
        ns = self.namespaces.get(namespace_of(topic))
        if ns is None and self.allow_unknown:
            return OPEN
        return ns

    @property
    def open(self) -> bool:
        """No rules at all (no config file): everything is allowed to everyone."""
        return not self.namespaces and self.allow_unknown

    def can_subscribe(self, who: Identity, topic: str) -> str | None:
        """``None`` when allowed, else the reason for a ``forbidden`` error.

        Privacy is checked before anything else, grants included, so that no rule
        and no grant can hand one subject's private topic to another.
        """
        if self.open:
            return None
        ns = self.namespace(topic)
        if ns is None:
            return None if _granted(who, "subscribe", topic) else _unlisted(topic)
        if ns.private and not _owns(who, ns.name, topic):
            return f"{topic!r} is not your private topic (yours are {ns.name}:<your escaped subject>[.…])"
        return _judge(who, ns, ns.subscribe, "subscribe", topic)

    def can_publish(self, who: Identity, topic: str) -> str | None:
        """``None`` when allowed, else the reason for a ``forbidden`` error.

        In a private namespace the publish rule alone decides for non-owners (a rule may
        make private topics inboxes); a grant helps only on the holder's own topics.
        """
        if self.open:
            return None
        ns = self.namespace(topic)
        if ns is None:
            return None if _granted(who, "publish", topic) else _unlisted(topic)
        if ns.private and not ns.publish.allows(who) and not _owns(who, ns.name, topic):
            return f"publishing in {ns.name!r} needs {_describe(ns.publish)}"
        return _judge(who, ns, ns.publish, "publish", topic)

    def revoked(self, who: Identity, topics: Iterable[str]) -> list[str]:
        """The topics among ``topics`` that ``who`` may no longer subscribe to, in order.

        The gateway calls this after a token refresh: the new token keeps the subject
        but may carry fewer claims or grants than the one the subscriptions were made
        under, and a subscription must not outlive the right to it. The gateway ends
        each topic returned with an unsolicited ``unsubscribed``.
        """
        if self.open:
            return []
        return [topic for topic in topics if self.can_subscribe(who, topic) is not None]

    def conflates(self, topic: str) -> bool:
        """Whether ``topic``'s namespace says ``conflate = true``."""
        ns = self.namespaces.get(namespace_of(topic))
        return ns is not None and ns.conflate

    def history_for(self, topic: str) -> tuple[int | None, float | None]:
        ns = self.namespaces.get(namespace_of(topic))
        return (ns.history_size, ns.history_ttl) if ns is not None else (None, None)


def _judge(who: Identity, ns: Namespace, rule: Rule, action: str, topic: str) -> str | None:
    """The namespace rule, then the token's grants where the rule depends on the client."""
    if rule.allows(who) or (rule.kind not in _UNGRANTABLE and _granted(who, action, topic)):
        return None
    verb = "subscribing" if action == "subscribe" else "publishing"
    return f"{verb} in {ns.name!r} needs {_describe(rule)}"


def _unlisted(topic: str) -> str:
    return f"namespace {namespace_of(topic)!r} is not configured"


def _owns(who: Identity, ns: str, topic: str) -> bool:
    return who.subject is not None and private_owner(ns, topic) == who.subject


def _describe(rule: Rule) -> str:
    if rule.kind == "claim":
        return f"the token claim {rule.claim}" + (f"={rule.value}" if rule.value else "")
    return {"authenticated": "a token", "api": "the HTTP publish API", "nobody": "(nobody may)"}.get(rule.kind, rule.kind)


def load_policy(path: str | None) -> Policy:
    """Read a namespaces file; a bad one raises ConfigError naming file, key and problem."""
    if not path:
        return Policy()
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:  # tomllib and yaml raise their own parse errors
        raise ConfigError(f"config file {path} is not valid {'YAML' if file.suffix in ('.yaml', '.yml') else 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table at the top level")
    known = {"allow_unknown_namespaces", "namespaces"}
    for key in data:
        if key not in known:
            raise ConfigError(f"config file {path}: unknown key {key!r} (expected allow_unknown_namespaces, namespaces)")
    allow_unknown = data.get("allow_unknown_namespaces", False)
    if not isinstance(allow_unknown, bool):
        raise ConfigError(f"config file {path}: allow_unknown_namespaces must be true or false")
    spaces = data.get("namespaces", {})
    if not isinstance(spaces, dict):
        raise ConfigError(f"config file {path}: namespaces must be a table of tables")
    namespaces = {name: _namespace(path, name, spec) for name, spec in spaces.items()}
    return Policy(namespaces, allow_unknown, path)


def _namespace(path: str, name: str, spec: Any) -> Namespace:
    where = f"config file {path}: namespaces.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a table")
    if any(c in name for c in _SEPARATORS):
        raise ConfigError(f"{where}: a namespace name cannot contain '.' or ':'")
    allowed = {"subscribe", "publish", "private", "history_size", "history_ttl", "conflate"}
    for key in spec:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (expected {', '.join(sorted(allowed))})")
    private = spec.get("private", False)
    if not isinstance(private, bool):
        raise ConfigError(f"{where}.private must be true or false")
    conflate = spec.get("conflate", False)
    if not isinstance(conflate, bool):
        raise ConfigError(f"{where}.conflate must be true or false")
    size, ttl = spec.get("history_size"), spec.get("history_ttl")
    if size is not None and (type(size) is not int or size < 0):
        raise ConfigError(f"{where}.history_size must be a whole number >= 0")
    if ttl is not None and (type(ttl) not in (int, float) or ttl < 0):
        raise ConfigError(f"{where}.history_ttl must be a number of seconds >= 0")
    return Namespace(
        name,
        Rule.parse(spec.get("subscribe", "anyone"), f"{where}.subscribe"),
        Rule.parse(spec.get("publish", "anyone"), f"{where}.publish"),
        private,
        size,
        None if ttl is None else float(ttl),
        conflate,
    )
