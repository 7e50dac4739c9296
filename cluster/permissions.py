"""Who may subscribe and publish where: namespace rules from a config file.

A topic's namespace is its prefix up to the first ``.`` or ``:`` (``chat.room1`` is in
``chat``; a topic with neither is in the namespace ``""``). Each namespace says who may
subscribe, who may publish, whether its topics are user-private, and how much history
its topics keep. Tokens may also grant glob patterns of topics in a ``fanroute`` claim::

    {"sub": "alice", "fanroute": {"subscribe": ["prices.*"], "publish": ["chat.room1"]}}

Without a config file every topic is open to everyone (the standalone default). With
one, namespaces it does not list are denied unless ``allow_unknown_namespaces = true``.

The config file is TOML (or YAML, by its suffix)::

    allow_unknown_namespaces = false

    [namespaces.chat]
    subscribe = "anyone"          # anyone | authenticated | claim:NAME | claim:NAME=VALUE | nobody
    publish = "authenticated"     # the same, or "api" (only the HTTP publish API)
    history_size = 100
    history_ttl = 60

    [namespaces.user]
    private = true                # user:{sub} (and user:{sub}.*) readable by {sub} alone
    subscribe = "authenticated"
    publish = "api"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from cluster.auth import Identity
from cluster.config import ConfigError

_SEPARATORS = ".:"
_KINDS = ("anyone", "authenticated", "claim", "api", "nobody")


def namespace_of(topic: str) -> str:
    for i, c in enumerate(topic):
        if c in _SEPARATORS:
            return topic[:i]
    return ""


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
        """``None`` when allowed, else the reason for a ``forbidden`` error."""
        if self.open or _granted(who, "subscribe", topic):
            return None
        ns = self.namespace(topic)
        if ns is None:
            return f"namespace {namespace_of(topic)!r} is not configured"
        if ns.private and not _owns(who, ns.name, topic):
            return f"{topic!r} is private to another user"
        if not ns.subscribe.allows(who):
            return f"subscribing in {ns.name!r} needs {_describe(ns.subscribe)}"
        return None

    def can_publish(self, who: Identity, topic: str) -> str | None:
        if self.open or _granted(who, "publish", topic):
            return None
        ns = self.namespace(topic)
        if ns is None:
            return f"namespace {namespace_of(topic)!r} is not configured"
        if not ns.publish.allows(who):
            return f"publishing in {ns.name!r} needs {_describe(ns.publish)}"
        return None

    def history_for(self, topic: str) -> tuple[int | None, float | None]:
        ns = self.namespaces.get(namespace_of(topic))
        return (ns.history_size, ns.history_ttl) if ns is not None else (None, None)


def _granted(who: Identity, action: str, topic: str) -> bool:
    grants = who.claims.get("fanroute")
    if not isinstance(grants, dict):
        return False
    patterns = grants.get(action)
    return isinstance(patterns, list) and any(isinstance(p, str) and fnmatchcase(topic, p) for p in patterns)


def _owns(who: Identity, ns: str, topic: str) -> bool:
    if who.subject is None:
        return False
    rest = topic[len(ns) + 1 :]
    return rest == who.subject or rest.startswith(who.subject + ".")


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
    allowed = {"subscribe", "publish", "private", "history_size", "history_ttl"}
    for key in spec:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (expected {', '.join(sorted(allowed))})")
    private = spec.get("private", False)
    if not isinstance(private, bool):
        raise ConfigError(f"{where}.private must be true or false")
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
    )
