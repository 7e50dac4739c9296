"""Capacity planning: how many gateways and routers a load needs, and what each pod
should request (pure: no sockets, no processes; the profile is one JSON file).

The model is a handful of per-process costs measured on real processes by
``fanroute bench profile --save-profile ops/capacity-profile.json`` (the *profile*:
machine, date, command and constants) and a few rules about how fanroute spends
them. For a load of N connections, R publications/s cluster-wide, a mean fan-out F
(subscribers per publication), T topics of B-byte payloads and K copies of each
topic's stream, with G gateways and S = T × F subscriptions (every topic at the mean
fan-out):

* **Interested gateways** per topic, ``g(G) = G × (1 − (1 − 1/G)^F)``: subscribers
  land on gateways evenly and independently (a load balancer), and a router sends a
  publication once to each gateway that has a subscriber of it.
* **Gateway CPU** (µs per second, cluster-wide), at the peak rate ``R × burst``::

      R·(in + g(G)·out)                     publications: in at one gateway, out at each interested one
    + R·F·(delivery + B/1024·per_kib)       deliveries: one frame per subscriber (encoded once per gateway)
    + N·2/ping_interval·heartbeat           the gateway's ping and the client's, each answered
    + N·churn/60·(handshake + S/N·subscribe) reconnections, each resubscribing

  A gateway is one Python process: it uses at most ``PROCESS_CORES`` (1) core,
  whatever its pod is given. The plan has the **smallest G ≥ 2** such that, with one
  gateway lost or draining: the other G − 1 run at most at the CPU target (70 %:
  the chart's HPA target) and hold at most ``--max-connections`` each (the chart's
  ``gateway.limits.maxConnections``); and the lost gateway's N/G clients, each
  costing a handshake and its resubscriptions, come back onto the other G − 1 within
  ``--reconnect-window`` seconds of their spare CPU (up to the whole core).
* **Gateway memory**: ``base + connections·per_connection + subscriptions·per_subscription``,
  for the connections of G − 1 gateways (after a loss, the others hold everyone);
  requested with 15 % margin, limited at twice the working set (outboxes of slow
  clients fill under bursts, up to ``--outbox-limit`` each).
* **Router CPU**: each publication costs ``1/publications_per_core + (g(G) − 1)·per_extra_gateway``
  on its topic's leader and ``per_copy`` on each of the K − 1 further routers
  holding its stream (both measured with the routers' ``--copies``, which the
  profile records; a profile written before replication costs a copy as a
  publication), and every router spends ``idle_cores`` at rest (heartbeats and
  leases between copies), taken off the CPU it has. The plan has the smallest count
  ≥ K at which every router runs at most at the CPU target (with K ≥ 2, also with
  one router lost: its topics go to the next router in rendezvous order), and with
  K ≥ 2 at least 3, so that a majority of them, which views need, remains with one
  lost. With K = 1 a lost router's topics wait for its restart.
* **Router memory**: ``base + topics·per_topic + history``, history being
  ``min(--history-bytes, topics × min(history_size, R/T × history_ttl) × (B + 165))``
  bytes as the router accounts them (payload, msgpack header, ``ENTRY_OVERHEAD``),
  times the profile's RSS per history byte.
* **Latency**: the profile holds p99 figures measured by fan-out per gateway at a
  light rate and at 75 % of saturation. A plan quotes one only when it was measured
  at least as loaded as the plan's gateways and the plan's fan-out per gateway lies
  in the measured range (log-interpolated); otherwise it says no figure supports it.

``ceiling()`` answers the converse: what a given number of pods carries at 100 %
of their usable CPU, and how many connections fit in a given pod memory; also what
they carry when all of them share one core, which ``fanroute bench profile --check``
measures on a local cluster.
``simulate_reshard()`` hashes synthetic topics with :class:`fanroute.ring.Ring` to
show what growing the router StatefulSet moves.

``fanroute capacity`` (:mod:`fanroute.cli` registers :func:`add_arguments` and calls
:func:`run`) is the thin shell: it reads the profile and prints what these functions
return.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fanroute.errors import ConfigError
from fanroute.history import ENTRY_OVERHEAD
from fanroute.ring import Ring
from fanroute.settings import BOOL, FILE, NUMBER, Kind, setting

DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "ops" / "capacity-profile.json"
REFRESH = "fanroute bench profile --save-profile ops/capacity-profile.json"
PROCESS_CORES = 1.0  # one Python process, one thread holding the GIL (nng's threads add little)
MSGPACK_HEADER = 5  # a msgpack str of up to 4 GiB: 1 + 4 bytes
FRAME_OVERHEAD = 40  # a delivery's frame header and {"topic":…,"payload":…,"seq":…} around the payload
MEMORY_MARGIN = 1.15
GATEWAY_LIMIT_FACTOR = 2.0
ROUTER_LIMIT_FACTOR = 1.5
MIB = 1 << 20
_MAX_PODS = 1 << 20

DEFAULT_TOPICS = 10_000
DEFAULT_PAYLOAD = 256
RESHARD_TOPICS = 100_000

# name: (what it is, unit) — every constant a profile must have.
CONSTANTS: dict[str, tuple[str, str]] = {
    "gateway_us_per_delivery": ("gateway CPU per delivery", "µs"),
    "gateway_us_per_delivered_kib": ("gateway CPU per delivery per KiB of payload", "µs"),
    "gateway_us_per_publication_in": ("gateway CPU per publication taken in from a client", "µs"),
    "gateway_us_per_publication_out": ("gateway CPU per publication received from a router", "µs"),
    "gateway_us_per_handshake": ("gateway CPU per WebSocket handshake", "µs"),
    "gateway_us_per_subscribe": ("gateway CPU per subscribe", "µs"),
    "gateway_us_per_heartbeat": ("gateway CPU per heartbeat (ping in, pong out)", "µs"),
    "gateway_base_bytes": ("gateway RSS with no connection", "B"),
    "gateway_bytes_per_connection": ("gateway RSS per idle connection", "B"),
    "gateway_bytes_per_subscription": ("gateway RSS per subscription", "B"),
    "router_publications_per_core": ("router publications/s per core (one interested gateway)", "/s"),
    "router_us_per_extra_gateway": ("router CPU per publication per further interested gateway", "µs"),
    "router_base_bytes": ("router RSS with no topic", "B"),
    "router_bytes_per_topic": ("router RSS per topic (with its interest)", "B"),
    "router_rss_per_history_byte": ("router RSS per byte of history it accounts", "×"),
}
# name: (what it is, unit, the value a profile without it is read with) — constants a
# profile written before replicated streams lacks: a further copy was then costed as
# one router publication, and a router at rest as nothing.
OPTIONAL: dict[str, tuple[str, str, Callable[[Mapping[str, float]], float]]] = {
    "router_us_per_copy": (
        "router CPU per publication on each further copy of its topic", "µs",
        lambda c: 1e6 / c["router_publications_per_core"],
    ),
    "router_idle_cores": ("router CPU at rest (heartbeats and leases between copies)", "cores", lambda c: 0.0),
}


# --- the profile ----------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyPoint:
    fanout_per_gateway: float
    utilisation: float  # the latency phase's rate ÷ the same cell's saturation rate
    p99_ms: float
    p50_ms: float | None = None


@dataclass(frozen=True)
class Profile:
    """The measured constants, and where they were measured."""

    constants: Mapping[str, float]
    machine: Mapping[str, Any] = field(default_factory=dict)
    date: str = ""
    command: str = ""
    latency: tuple[LatencyPoint, ...] = ()
    source: str = ""
    measured_optional: tuple[str, ...] = ()  # the OPTIONAL constants the file has (the others are their fallbacks)
    router_copies: int | None = None  # the routers' --copies when the profile was measured

    def __getattr__(self, name: str) -> float:
        try:
            return self.constants[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the profile") -> Profile:
        if not isinstance(data, Mapping) or not isinstance(data.get("constants"), Mapping):
            raise ConfigError(f"{source} is not a capacity profile (no constants): write one with {REFRESH}")
        given = data["constants"]
        constants: dict[str, float] = {}
        for name in CONSTANTS:
            value = given.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{source} lacks the constant {name} (a number, not negative): write it again with {REFRESH}")
            constants[name] = float(value)
        if constants["router_publications_per_core"] <= 0:
            raise ConfigError(f"{source} has router_publications_per_core {constants['router_publications_per_core']:g}, which must be positive")
        measured = []
        for name, (_, _, fallback) in OPTIONAL.items():
            value = given.get(name)
            if value is None:
                constants[name] = fallback(constants)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{source} has {name} {value!r}, which must be a number, not negative: write it again with {REFRESH}")
            constants[name] = float(value)
            measured.append(name)
        if constants["router_idle_cores"] >= PROCESS_CORES:
            raise ConfigError(f"{source} has router_idle_cores {constants['router_idle_cores']:g}: a router at rest would use its whole core")
        points = []
        for p in data.get("latency") or ():
            try:
                points.append(LatencyPoint(float(p["fanout_per_gateway"]), float(p["utilisation"]), float(p["p99_ms"]), p.get("p50_ms")))
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{source} has a latency point without fanout_per_gateway, utilisation and p99_ms") from None
        copies = data.get("router_copies")
        return cls(
            constants, dict(data.get("machine") or {}), str(data.get("date", "")), str(data.get("command", "")), tuple(points), source,
            tuple(measured), int(copies) if isinstance(copies, int) and not isinstance(copies, bool) and copies >= 1 else None,
        )


def load_profile(path: str | Path | None = None) -> Profile:
    """The profile in ``path`` (default: ``ops/capacity-profile.json`` of this checkout)."""
    p = Path(path) if path else DEFAULT_PROFILE
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"there is no capacity profile at {p}: give --profile FILE, written by {REFRESH}") from None
    except OSError as exc:
        raise ConfigError(f"the capacity profile {p} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the capacity profile {p} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise ConfigError(f"the capacity profile {p} is not JSON") from None
    return Profile.from_dict(data, str(p))


# --- inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What the cluster must carry."""

    connections: int
    publications: float  # per second, cluster-wide
    fanout: float  # mean subscribers per publication
    topics: int = DEFAULT_TOPICS
    payload: int = DEFAULT_PAYLOAD  # bytes
    copies: int = 1  # routers holding each topic's stream (the routers and the chart default to 2)
    burst: float = 1.0  # peak publication rate ÷ the mean
    churn: float = 0.01  # fraction of the connections that reconnect per minute

    @property
    def subscriptions(self) -> float:
        return self.topics * self.fanout

    @property
    def peak(self) -> float:
        return self.publications * self.burst


@dataclass(frozen=True)
class Pods:
    """What each pod gets and the settings that bound it. The servers' settings take
    their defaults from the one table (:mod:`fanroute.settings`), which the chart's
    values follow, so a plan for an untouched deployment needs none of them."""

    gateway_cpu: float = 1.0
    router_cpu: float = 1.0
    cpu_target: float = 0.70  # the chart's gateway.autoscaling.targetCPUUtilizationPercentage
    max_connections: int = setting("max-connections").default
    max_subscriptions: int = setting("max-subscriptions").default
    max_frame: int = setting("max-frame").default
    ping_interval: float = setting("ping-interval").default
    reconnect_window: float = 10.0
    history_size: int = setting("history-size").default
    history_ttl: float = setting("history-ttl").default
    history_bytes: int = setting("history-bytes").default
    outbox_limit: int = setting("outbox-limit").default

    @property
    def gateway_cores(self) -> float:
        return min(self.gateway_cpu, PROCESS_CORES)

    @property
    def router_cores(self) -> float:
        return min(self.router_cpu, PROCESS_CORES)


def _n(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 or x == int(x) else f"{x:,.3g}"


def check(load: Load, pods: Pods) -> None:
    """ConfigError (one sentence naming the input) for a load that cannot be planned."""
    positive = [
        ("--connections", load.connections), ("--publications", load.publications), ("--fanout", load.fanout),
        ("--topics", load.topics), ("--payload", load.payload), ("--copies", load.copies),
        ("--gateway-cpu", pods.gateway_cpu), ("--router-cpu", pods.router_cpu),
        ("--ping-interval", pods.ping_interval), ("--reconnect-window", pods.reconnect_window),
        ("--max-connections", pods.max_connections), ("--history-size", pods.history_size),
    ]
    for name, value in positive:
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, not {value:g}" if isinstance(value, (int, float)) else f"{name} must be a positive number")
    for name, value in (("--connections", load.connections), ("--topics", load.topics), ("--payload", load.payload), ("--copies", load.copies)):
        if value != int(value):
            raise ConfigError(f"{name} must be a whole number, not {value:g}")
    if load.fanout > load.connections:
        raise ConfigError(
            f"--fanout ({_n(load.fanout)}) cannot be above --connections ({_n(load.connections)}): "
            "a publication reaches each connection at most once"
        )
    if load.burst < 1:
        raise ConfigError(f"--burst is the peak rate over the mean and must be at least 1, not {load.burst:g}")
    if load.churn < 0:
        raise ConfigError(f"--churn must not be negative, not {load.churn * 100:g} %")
    if not 0 < pods.cpu_target <= 1:
        raise ConfigError(f"--cpu-target must be above 0 and at most 100 %, not {pods.cpu_target * 100:g} %")
    if pods.history_ttl < 0 or pods.history_bytes < 0:
        raise ConfigError("--history-ttl and --history-bytes must not be negative")
    if load.payload > pods.max_frame:
        raise ConfigError(f"--payload ({_n(load.payload)} bytes) is above the gateways' --max-frame ({_n(pods.max_frame)}): such a publication is refused")
    per_connection = load.subscriptions / load.connections
    if per_connection > pods.max_subscriptions:
        raise ConfigError(
            f"--topics × --fanout is {_n(load.subscriptions)} subscriptions, {_n(per_connection)} per connection, "
            f"above the gateways' --max-subscriptions ({pods.max_subscriptions})"
        )


# --- the model ------------------------------------------------------------------------


def interested_gateways(gateways: float, fanout: float) -> float:
    """Gateways expected to hold at least one of a topic's ``fanout`` subscribers."""
    if gateways <= 1:
        return 1.0
    return max(1.0, gateways * (1.0 - (1.0 - 1.0 / gateways) ** fanout))


def delivery_us(p: Profile, payload: float) -> float:
    return p.gateway_us_per_delivery + p.gateway_us_per_delivered_kib * payload / 1024


def reconnect_us(p: Profile, load: Load) -> float:
    """Gateway CPU for one client coming back: the handshake and its resubscriptions."""
    return p.gateway_us_per_handshake + load.subscriptions / load.connections * p.gateway_us_per_subscribe


def gateway_terms(p: Profile, load: Load, pods: Pods, gateways: int) -> dict[str, float]:
    """Gateway CPU, µs per second over all ``gateways``, by what it is spent on."""
    g = interested_gateways(gateways, load.fanout)
    return {
        "deliveries": load.peak * load.fanout * delivery_us(p, load.payload),
        "publications": load.peak * (p.gateway_us_per_publication_in + g * p.gateway_us_per_publication_out),
        "heartbeats": load.connections * 2 / pods.ping_interval * p.gateway_us_per_heartbeat,
        "handshakes": load.connections * load.churn / 60 * reconnect_us(p, load),
    }


def router_us_per_publication(p: Profile, interested: float) -> float:
    return 1e6 / p.router_publications_per_core + max(0.0, interested - 1) * p.router_us_per_extra_gateway


def _smallest(ok: Callable[[int], bool], lo: int) -> int:
    """The smallest n ≥ lo with ok(n), for an ok that stays true once true."""
    if ok(lo):
        return lo
    hi = max(lo + 1, 2 * lo)
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > _MAX_PODS:
            raise ConfigError(f"this load needs more than {_MAX_PODS:,} pods of one role: check the inputs")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


@dataclass
class Role:
    """The plan for gateways or routers."""

    replicas: int
    bottleneck: str
    cpu_request: float  # cores
    memory_request: int  # bytes
    memory_limit: int
    utilisation: float  # CPU of the usable cores, all replicas up
    utilisation_one_lost: float
    terms: dict[str, float]  # µs/s over the role
    figures: dict[str, Any]


@dataclass
class Plan:
    load: Load
    pods: Pods
    gateways: Role
    routers: Role
    latency: dict[str, Any]
    notes: list[str]
    profile: Profile = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = {"load": asdict(self.load), "pods": asdict(self.pods), "gateways": asdict(self.gateways), "routers": asdict(self.routers), "latency": self.latency, "notes": self.notes}
        out["profile"] = {"source": self.profile.source, "machine": dict(self.profile.machine), "date": self.profile.date, "command": self.profile.command, "constants": dict(self.profile.constants)}
        out["values"] = values_fragment(self)
        return out


def _memory(working: float, factor: float) -> int:
    """Bytes rounded up to whole 16 MiB."""
    step = 16 * MIB
    return int(math.ceil(working * factor / step) * step)


def _dominant(terms: Mapping[str, float]) -> tuple[str, float]:
    total = sum(terms.values())
    name = max(terms, key=lambda k: terms[k])
    return name, (terms[name] / total if total else 0.0)


def plan(p: Profile, load: Load, pods: Pods = Pods()) -> Plan:
    """Gateways and routers for ``load``, each pod with ``pods``' cores."""
    check(load, pods)
    usable = pods.gateway_cores * 1e6
    budget = pods.cpu_target * usable

    def per_gateway(carrying: int) -> float:
        return sum(gateway_terms(p, load, pods, carrying).values()) / carrying

    def cpu_ok(g: int) -> bool:
        return per_gateway(g - 1) <= budget

    def conn_ok(g: int) -> bool:
        return load.connections / (g - 1) <= pods.max_connections

    def storm_ok(g: int) -> bool:
        spare = (usable - per_gateway(g - 1)) * (g - 1) * pods.reconnect_window
        return load.connections / g * reconnect_us(p, load) <= spare

    need = {"cpu": _smallest(cpu_ok, 2), "connections": _smallest(conn_ok, 2), "storm": _smallest(storm_ok, 2)}
    g = max(need.values())
    terms = gateway_terms(p, load, pods, g)
    if g == 2 and max(need.values()) == min(need.values()):
        why = "none: the minimum of 2 gateways (one may be lost) carries it"
    elif need["cpu"] == g:
        term, share = _dominant(gateway_terms(p, load, pods, g - 1))
        why = f"CPU: {term} ({share:.0%} of the gateways' CPU)"
    elif need["connections"] == g:
        why = f"connections per pod (--max-connections {pods.max_connections:,}, the chart's gateway.limits.maxConnections)"
    else:
        why = f"the reconnect storm: a lost gateway's clients must come back within {pods.reconnect_window:g} s"
    util = per_gateway(g) / usable
    util_lost = per_gateway(g - 1) / usable
    conns_lost = load.connections / (g - 1)
    subs_lost = load.subscriptions / (g - 1)
    working = p.gateway_base_bytes + conns_lost * p.gateway_bytes_per_connection + subs_lost * p.gateway_bytes_per_subscription
    interested = interested_gateways(g, load.fanout)
    deliveries_each = load.peak * load.fanout / g
    storm_s = load.connections / g * reconnect_us(p, load) / ((usable - per_gateway(g - 1)) * (g - 1))
    gateways = Role(
        replicas=g,
        bottleneck=why,
        cpu_request=pods.gateway_cores,
        memory_request=_memory(working, MEMORY_MARGIN),
        memory_limit=_memory(working, GATEWAY_LIMIT_FACTOR),
        utilisation=util,
        utilisation_one_lost=util_lost,
        terms=terms,
        figures={
            "needed_for": need,
            "connections_each": load.connections / g,
            "connections_each_one_lost": conns_lost,
            "subscriptions_each": load.subscriptions / g,
            "deliveries_per_s_each": deliveries_each,
            "egress_mbit_s_each": deliveries_each * (load.payload + FRAME_OVERHEAD) * 8 / 1e6,
            "interested_gateways_per_topic": interested,
            "fanout_per_gateway": load.fanout / interested,
            "working_set_bytes_one_lost": working,
            "reconnect_storm_s": storm_s,
        },
    )
    routers = _routers(p, load, pods, interested)
    notes = []
    if pods.gateway_cpu > PROCESS_CORES:
        notes.append(f"a gateway is one Python process and uses at most {PROCESS_CORES:g} core: the plan counts {PROCESS_CORES:g} of its {pods.gateway_cpu:g}")
    if pods.router_cpu > PROCESS_CORES:
        notes.append(f"a router is one Python process and uses at most {PROCESS_CORES:g} core: the plan counts {PROCESS_CORES:g} of its {pods.router_cpu:g}")
    notes += routers.figures.pop("notes")
    return Plan(load, pods, gateways, routers, p99(p, gateways.figures["fanout_per_gateway"], util), notes, p)


def _routers(p: Profile, load: Load, pods: Pods, interested: float) -> Role:
    """Routers for ``load``: the smallest count at which the mean router stays within
    the CPU target and the *busiest* holds no more topics than the target allows.
    Topics land on routers by rendezvous hashing, like balls in bins: with few topics
    per router the busiest holds well above the mean (:func:`busiest_topics`), and no
    router count splits one topic. So more topics at the same rate can need fewer
    routers; more publications, fan-out or copies never do. A count set by the
    busiest router is held to at most ``UNEVEN_LIMIT`` times the mean's (a note says
    how loaded the busiest then is). A topic's leader sequences it and sends it to
    every interested gateway; each further copy costs one router publication (storing
    it: the profile's ``router_us_per_copy``, measured on the copies of the cells'
    topics, or one router publication in a profile written before replication). Every
    router also spends ``router_idle_cores`` at rest, taken off the CPU it has."""
    usable = pods.router_cores * 1e6
    idle = p.router_idle_cores * 1e6  # spent at rest whatever the load: heartbeats and leases between copies
    if pods.cpu_target * usable <= idle:
        raise ConfigError(
            f"--router-cpu {pods.router_cpu:g} at the {pods.cpu_target:.0%} target leaves nothing for publications: "
            f"a router uses {p.router_idle_cores:g} cores at rest"
        )
    budget = pods.cpu_target * usable - idle  # what publications may use on each router
    per_pub = router_us_per_publication(p, interested)
    follower = p.router_us_per_copy
    total = load.peak * (per_pub + (load.copies - 1) * follower)
    spare = 1 if load.copies >= 2 else 0  # with copies, a lost router's topics move to the next
    hottest = total / load.topics  # topics equally busy; one topic's leader is one router
    allowed = max(1, math.floor(budget / hottest)) if hottest else load.topics  # topics a router may hold

    def busiest(up: int) -> float:
        """CPU of the busiest of ``up`` routers, µs/s."""
        return busiest_topics(load.topics, up) * hottest

    # Replicated streams need views, and a view a majority of the routers
    # (router/REPLICATION.md): with one of them lost, a majority remains from 3 on.
    views = VIEW_ROUTERS if load.copies > 1 else 1
    lo = max(1, load.copies, 1 + spare, views)
    need_mean = _smallest(lambda r: total / (r - spare) <= budget, lo)
    need_cpu = _smallest(
        lambda r: r >= need_mean and (busiest_topics(load.topics, r - spare) <= allowed or r >= UNEVEN_LIMIT * need_mean), lo
    )
    need = {"cpu": need_cpu, "copies": load.copies, "views": views}
    r = max(need.values())
    if need["cpu"] > lo:
        why = "CPU: publications, sequenced and sent to every interested gateway"
        if need_cpu > need_mean:
            why += " (the busiest router: topics hash unevenly over routers)"
    elif load.copies > 1 and r == load.copies:
        why = f"copies: each topic is held by {load.copies} routers"
    elif load.copies > 1:
        why = f"views: with replicated streams a majority of the routers must remain when one is lost, so at least {views}"
    else:
        why = "none: one router carries it"
    notes: list[str] = []
    topics_each = load.topics * load.copies / r
    per_topic_rate = load.publications / load.topics
    entries = min(pods.history_size, per_topic_rate * pods.history_ttl)
    entry_bytes = load.payload + MSGPACK_HEADER + ENTRY_OVERHEAD
    wanted = topics_each * entries * entry_bytes
    history = min(float(pods.history_bytes), wanted)
    if wanted > pods.history_bytes:
        held_s = pods.history_bytes / (load.publications * load.copies / r * entry_bytes)
        notes.append(
            f"history: each router would keep {wanted / MIB:,.0f} MiB but --history-bytes caps it at "
            f"{pods.history_bytes / MIB:,.0f} MiB, about {held_s:,.0f} s of publications instead of {pods.history_ttl:g} s "
            "(raise it, and the routers' memory, for longer recovery)"
        )
    working = p.router_base_bytes + topics_each * p.router_bytes_per_topic + history * p.router_rss_per_history_byte
    if hottest > budget:
        notes.append(
            f"hot topics: at {_n(load.peak / load.topics)} publications/s per topic (topics equally busy) one topic needs "
            f"{hottest / 1e6:.2f} cores of its router, above the {pods.cpu_target:.0%} target of one: spread it over more topics"
        )
    elif busiest(r - spare) > budget:
        notes.append(
            f"balance: {_n(load.topics)} topics over {r} routers — the busiest is expected to hold "
            f"{busiest_topics(load.topics, r - spare)} of them, at {(busiest(r - spare) + idle) / usable:.0%} CPU: more, smaller topics even it out"
        )
    if load.copies > 1:
        further = "a topic's further copy" if load.copies == 2 else f"each of a topic's {load.copies - 1} further copies"
        if "router_us_per_copy" in p.measured_optional:
            at = f" with --copies {p.router_copies}" if p.router_copies else ""
            notes.append(f"copies: {further} costs its router {follower:.1f} µs per publication (measured{at}), the leader {per_pub:.1f} µs")
        else:
            notes.append(f"copies: {further} is costed as one router publication ({follower:.0f} µs); the profile has no replication figure")
    elif p.router_copies and p.router_copies > 1:
        notes.append(
            f"copies: this plan has one copy per topic; the routers default to --copies 2 (router/REPLICATION.md) and the "
            f"chart to replication.copies 2: plan those with --copies 2"
        )
    return Role(
        replicas=r,
        bottleneck=why,
        cpu_request=pods.router_cores,
        memory_request=_memory(working, MEMORY_MARGIN),
        memory_limit=_memory(working, ROUTER_LIMIT_FACTOR),
        utilisation=(busiest(r) + idle) / usable,
        utilisation_one_lost=(busiest(max(1, r - 1)) + idle) / usable,
        terms={"publications": total},
        figures={
            "needed_for": need,
            "publications_per_s_each": load.peak * load.copies / r,
            "us_per_publication": per_pub,
            "us_per_copy": follower,
            "idle_cores": p.router_idle_cores,
            "mean_utilisation": (total / r + idle) / usable,
            "busiest_over_mean": busiest(r) / (total / r) if total else 1.0,
            "topics_each": topics_each,
            "busiest_topics": busiest_topics(load.topics, r),
            "history_entries_per_topic": entries,
            "history_bytes_wanted_each": wanted,
            "history_bytes_each": history,
            "working_set_bytes": working,
            "notes": notes,
        },
    )


UNEVEN_LIMIT = 3  # at most this many times the routers the mean load needs, for the busiest
VIEW_ROUTERS = 3  # the fewest routers of which a majority remains with one lost (replicated streams)


def busiest_topics(items: int, bins: int) -> int:
    """Topics the busiest of ``bins`` routers holds when ``items`` topics hash onto
    them at random: the smallest k with bins × P(Binomial(items, 1/bins) > k) ≤ ½
    (by the union bound, the maximum is at most k at least half the time), exact
    below a mean of 1000 topics per router and from the normal approximation above;
    at least 1, at most ``items``."""
    if bins <= 1 or items <= 1:
        return max(1, items)
    mean = items / bins
    if mean > 1000:
        z = statistics.NormalDist().inv_cdf(1 - 0.5 / bins)
        return min(items, max(1, math.ceil(mean + z * math.sqrt(mean * (1 - 1 / bins)) + 0.5)))
    log_p, log_q = -math.log(bins), math.log1p(-1 / bins)
    log_n = math.lgamma(items + 1)

    def tail(k: int) -> float:
        """P(X ≥ k), summing the pmf upward in log space (no underflow) until it is negligible."""
        total = 0.0
        for j in range(k, items + 1):
            term = math.exp(log_n - math.lgamma(j + 1) - math.lgamma(items - j + 1) + j * log_p + (items - j) * log_q)
            total += term
            if j > mean and term < 1e-18:
                break
        return total

    k = max(1, math.floor(mean))
    while k < items and bins * tail(k + 1) > 0.5:
        k += 1
    return k


def p99(p: Profile, fanout_per_gateway: float, utilisation: float) -> dict[str, Any]:
    """The p99 the measured figures support for this per-gateway fan-out and
    utilisation, or why none. For each measured fan-out the figure is interpolated
    linearly between the utilisations measured around the plan's (below the lightest
    one measured, that one's figure: an upper bound); a fan-out measured only below
    the plan's utilisation supports nothing. Between fan-outs it is interpolated on
    a log scale; outside the measured fan-outs no figure is quoted."""
    groups: dict[float, list[LatencyPoint]] = {}
    for pt in p.latency:
        groups.setdefault(pt.fanout_per_gateway, []).append(pt)
    at: dict[float, tuple[float, float, float]] = {}  # fan-out: (p99, lowest and highest utilisation used)
    for f, pts in groups.items():
        pts.sort(key=lambda q: q.utilisation)
        if utilisation > pts[-1].utilisation:
            continue
        if utilisation <= pts[0].utilisation:
            at[f] = (pts[0].p99_ms, pts[0].utilisation, pts[0].utilisation)
            continue
        lo = max((q for q in pts if q.utilisation <= utilisation), key=lambda q: q.utilisation)
        hi = min((q for q in pts if q.utilisation >= utilisation), key=lambda q: q.utilisation)
        w = 0.0 if hi.utilisation == lo.utilisation else (utilisation - lo.utilisation) / (hi.utilisation - lo.utilisation)
        at[f] = (lo.p99_ms + w * (hi.p99_ms - lo.p99_ms), lo.utilisation, hi.utilisation)
    if not at:
        top = max((pt.utilisation for pt in p.latency), default=0.0)
        return {"p99_ms": None, "why": f"the profile's latency figures were measured at up to {top:.0%} of saturation, below this plan's {utilisation:.0%}"}
    xs = sorted(at)
    if not xs[0] <= fanout_per_gateway <= xs[-1]:
        return {
            "p99_ms": None,
            "why": f"{_n(fanout_per_gateway)} subscribers per gateway per publication is outside the {_n(xs[0])}–{_n(xs[-1])} "
            f"measured at this plan's utilisation ({utilisation:.0%})",
        }
    lo_f = max(x for x in xs if x <= fanout_per_gateway)
    hi_f = min(x for x in xs if x >= fanout_per_gateway)
    a, b = at[lo_f], at[hi_f]
    if hi_f == lo_f:
        value = a[0]
    else:
        w = (math.log(fanout_per_gateway) - math.log(lo_f)) / (math.log(hi_f) - math.log(lo_f))
        value = a[0] + w * (b[0] - a[0])
    u_lo, u_hi = min(a[1], b[1]), max(a[2], b[2])
    return {
        "p99_ms": value,
        "why": f"interpolated from the figures measured at {_n(lo_f)}" + ("" if hi_f == lo_f else f" and {_n(hi_f)}")
        + f" subscribers per gateway, at {u_lo:.0%}" + ("" if u_hi == u_lo else f"–{u_hi:.0%}")
        + f" of saturation (this plan: {utilisation:.0%} CPU), on the profile's machine",
    }


# --- the converse: what given pods carry ------------------------------------------------


@dataclass(frozen=True)
class Shape:
    fanout: float
    payload: int = 64
    topics: int = 1
    subscriptions_per_connection: float = 1.0
    copies: int = 1
    churn: float = 0.01


@dataclass
class Ceiling:
    gateways: int
    routers: int
    publications_per_s: float
    deliveries_per_s: float
    deliveries_limited_by: str
    connections: float
    connections_limited_by: str
    figures: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ceiling(
    p: Profile, shape: Shape, *, gateways: int, routers: int, gateway_cpu: float, router_cpu: float,
    gateway_memory: float, pods: Pods = Pods(), shared_cpu: float = 1.0,
) -> Ceiling:
    """At 100 % of the usable CPU (no target, no spare): the publications and
    deliveries/s ``gateways`` and ``routers`` carry at ``shape``'s fan-out, and the
    connections the gateways hold in ``gateway_memory`` bytes each (or their CPU, or
    the per-pod connection limit, whichever is first).

    Routers: a topic's leader spends ``router_us_per_publication`` on each of its
    publications and each further copy ``router_us_per_copy``, every router
    ``router_idle_cores`` at rest; with fewer topics than routers only the leaders'
    routers bound the rate. The figures also hold what the same pods carry when they
    all share ``shared_cpu`` cores (each still at most one) instead of each having
    its own: the measure of a bench machine, where ``fanroute bench profile --check``
    pins every server process to the same core."""
    if min(gateways, routers) < 1:
        raise ConfigError("--ceiling needs at least one gateway and one router, as GATEWAYS:ROUTERS")
    if min(gateway_cpu, router_cpu, shape.fanout, shape.payload, shape.topics, gateway_memory, shared_cpu) <= 0:
        raise ConfigError("--ceiling needs a positive --fanout, --payload, --topics, --gateway-cpu, --router-cpu and --gateway-memory")
    g_cores = min(gateway_cpu, PROCESS_CORES) * 1e6
    r_cores = min(router_cpu, PROCESS_CORES) * 1e6
    idle = p.router_idle_cores * 1e6
    interested = interested_gateways(gateways, shape.fanout)
    heartbeat = 2 / pods.ping_interval * p.gateway_us_per_heartbeat
    per_pub_gw = p.gateway_us_per_publication_in + interested * p.gateway_us_per_publication_out + shape.fanout * delivery_us(p, shape.payload)
    by_gateways = (gateways * g_cores - shape.fanout * heartbeat) / per_pub_gw
    leader = router_us_per_publication(p, interested)
    copies = min(shape.copies, routers)
    per_pub_routers = leader + (copies - 1) * p.router_us_per_copy  # over every copy of the topic
    free = max(0.0, r_cores - idle)
    by_routers = min(routers * free / per_pub_routers, min(routers, shape.topics) * free / leader)
    rate = max(0.0, min(by_gateways, by_routers))
    # Every pod on the same shared_cpu cores: the cores left after the routers' rest and
    # the subscribers' heartbeats, over the CPU of one publication on every process.
    spare = shared_cpu * 1e6 - routers * idle - shape.fanout * heartbeat
    one = PROCESS_CORES * 1e6
    shared = max(0.0, min(
        spare / (per_pub_gw + per_pub_routers),
        (gateways * one - shape.fanout * heartbeat) / per_pub_gw,
        min(routers, shape.topics) * (one - idle) / leader,
    ))
    per_conn_bytes = p.gateway_bytes_per_connection + shape.subscriptions_per_connection * p.gateway_bytes_per_subscription
    by_memory = max(0.0, gateway_memory - p.gateway_base_bytes) / per_conn_bytes
    reconnect = p.gateway_us_per_handshake + shape.subscriptions_per_connection * p.gateway_us_per_subscribe
    by_cpu = g_cores / (heartbeat + shape.churn / 60 * reconnect)
    per_gateway = min(by_memory, by_cpu, pods.max_connections)
    limited = "memory" if per_gateway == by_memory else "CPU (heartbeats and reconnections)" if per_gateway == by_cpu else "the per-pod connection limit"
    return Ceiling(
        gateways=gateways,
        routers=routers,
        publications_per_s=rate,
        deliveries_per_s=rate * shape.fanout,
        deliveries_limited_by="gateway CPU" if by_gateways <= by_routers else "router CPU",
        connections=gateways * per_gateway,
        connections_limited_by=limited,
        figures={
            "gateway_us_per_publication": per_pub_gw,
            "router_us_per_publication": leader,
            "router_us_per_copy": p.router_us_per_copy,
            "router_us_per_publication_all_copies": per_pub_routers,
            "router_idle_cores": p.router_idle_cores,
            "copies": copies,
            "publications_per_s_by_gateways": by_gateways,
            "publications_per_s_by_routers": by_routers,
            "shared_cpu": shared_cpu,
            "publications_per_s_shared": shared,
            "deliveries_per_s_shared": shared * shape.fanout,
            "connections_each_by_memory": by_memory,
            "connections_each_by_cpu": by_cpu,
            "bytes_per_connection": per_conn_bytes,
        },
    )


# --- growing the router StatefulSet ------------------------------------------------------


@dataclass
class Reshard:
    """What changing the router count from ``before`` to ``after`` moves. With one
    copy per topic a topic moves when its owner changes; with K copies a topic's
    copies are the first K routers of its rendezvous order, and a copy moves when a
    router joins or leaves that set: the new copy is sent the whole stream by a
    surviving one (``router/REPLICATION.md``, sync before ready)."""

    before: int
    after: int
    topics: int
    copies: int
    moved: int  # topics whose first copy (the only one, or the leader) changes
    copies_moved: int  # copies that land on a router that did not hold the topic
    ideal: float  # the fraction of copies rendezvous hashing moves at best
    max_over_mean_before: float  # copies held by the busiest router ÷ the mean
    max_over_mean_after: float
    per_router_after: dict[str, int]
    history_bytes_per_topic: float
    history_bytes_moved: float | None  # None with one copy: the history stays behind
    topics_left_without_copy: int  # every copy was on a removed router: a new epoch
    history_basis: str = ""

    @property
    def moved_fraction(self) -> float:
        return self.moved / self.topics

    @property
    def copies_moved_fraction(self) -> float:
        return self.copies_moved / (self.topics * self.copies)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "moved_fraction": self.moved_fraction, "copies_moved_fraction": self.copies_moved_fraction}


def router_names(n: int) -> list[str]:
    """The chart's shard names: router-0 … router-(n-1)."""
    return [f"router-{i}" for i in range(n)]


def rendezvous_order(rings: dict[frozenset[str], Ring], names: list[str], topic: str, k: int) -> list[str]:
    """The first ``k`` of ``names`` in ``topic``'s rendezvous order: the owner, then the
    owner among the rest, and so on (with highest-random-weight hashing the owner of
    a subset is the best-scoring member of it). ``rings`` caches one :class:`Ring`
    per subset, each with its own lookup cache."""
    out: list[str] = []
    rest = frozenset(names)
    for _ in range(min(k, len(names))):
        ring = rings.get(rest)
        if ring is None:
            ring = rings[rest] = Ring([n for n in names if n in rest])
        first = ring.owner(topic)
        out.append(first)
        rest = rest - {first}
    return out


def history_per_topic(pods: Pods, payload: int, rate_per_topic: float | None) -> float:
    """Bytes of history one topic holds as the router accounts them: ``history_size``
    entries, or what ``history_ttl`` keeps at the topic's rate if that is fewer."""
    entries = float(pods.history_size) if rate_per_topic is None else min(pods.history_size, rate_per_topic * pods.history_ttl)
    return entries * (payload + MSGPACK_HEADER + ENTRY_OVERHEAD)


def simulate_reshard(
    before: int, after: int, topics: int = RESHARD_TOPICS, copies: int = 1, *,
    pods: Pods = Pods(), payload: int = DEFAULT_PAYLOAD, publications: float | None = None,
) -> Reshard:
    """Copies of ``topics`` synthetic topic names under ``before`` and ``after`` routers
    (the chart's names, the gateways' own :class:`Ring`): what moves, how even it is,
    and with ``copies`` > 1 how many history bytes the new copies are sent — each
    topic's history taken as full (``history_size`` entries of ``payload`` bytes), or
    as ``publications``/s spread over the topics keep it, within the routers'
    ``history_bytes``."""
    if before < 1 or after < 1 or before == after:
        raise ConfigError(f"--simulate-reshard needs two different router counts, each at least 1, as FROM:TO, not {before}:{after}")
    if topics < 1:
        raise ConfigError(f"--topics must be a positive number, not {topics}")
    if copies < 1:
        raise ConfigError(f"--copies must be a positive number, not {copies}")
    old_names, new_names = router_names(before), router_names(after)
    k_old, k_new = min(copies, before), min(copies, after)
    rings: dict[frozenset[str], Ring] = {}
    moved = copies_moved = orphaned = 0
    count_old: Counter[str] = Counter()
    count_new: Counter[str] = Counter()
    for i in range(topics):
        t = f"topic.{i}"
        a = rendezvous_order(rings, old_names, t, k_old)
        b = rendezvous_order(rings, new_names, t, k_new)
        count_old.update(a)
        count_new.update(b)
        moved += a[0] != b[0]
        copies_moved += len(set(b) - set(a))
        orphaned += not set(a) & set(b)
    wanted = history_per_topic(pods, payload, None if publications is None else publications / topics)
    cap = pods.history_bytes * before / (topics * k_old)  # the routers' --history-bytes, shared by their topics
    per_topic = min(wanted, cap)
    entries = min(pods.history_size, publications / topics * pods.history_ttl) if publications else pods.history_size
    basis = f"{entries:,.0f} messages of {payload} bytes per topic" + (f" at {_n(publications)} publications/s" if publications else "")
    if wanted > cap:
        basis += f", cut to {cap / 1024:,.1f} KiB by each router's --history-bytes {pods.history_bytes / MIB:,.0f} MiB"
    ideal = abs(after - before) / max(after, before)
    return Reshard(
        before, after, topics, copies, moved, copies_moved, ideal,
        max(count_old.values()) / (topics * k_old / before),
        max(count_new.values()) / (topics * k_new / after),
        {name: count_new[name] for name in new_names},
        per_topic,
        copies_moved * per_topic if copies > 1 else None,
        orphaned if copies > 1 else 0,
        basis,
    )


# --- the chart's values -------------------------------------------------------------------


def _cpu(cores: float) -> str:
    return f"{max(1, round(cores * 1000))}m"


def _mi(b: int) -> str:
    return f"{b // MIB}Mi"


def values_fragment(pl: Plan) -> str:
    """A values.yaml fragment for helm/fanroute: replicas, resources, HPA bounds."""
    g, r = pl.gateways, pl.routers
    lo = g.replicas
    hi = max(lo + 1, 2 * lo)
    target = round(pl.pods.cpu_target * 100)
    per_pod = math.ceil(pl.load.connections / (lo - 1))
    return "\n".join(
        [
            "gateway:",
            f"  replicas: {lo}",
            "  limits:",
            f"    maxConnections: {pl.pods.max_connections}",
            "  resources:",
            f"    requests: {{cpu: {_cpu(g.cpu_request)}, memory: {_mi(g.memory_request)}}}",
            f"    limits: {{memory: {_mi(g.memory_limit)}}}",
            "  autoscaling:",
            "    enabled: true",
            f"    minReplicas: {lo}  # the planned load, peaks included: a new gateway only takes new connections",
            f"    maxReplicas: {hi}  # room for the connections to double",
            f"    targetCPUUtilizationPercentage: {target}",
            "    connections:",
            "      enabled: false  # true with a custom-metrics adapter (prometheus-adapter)",
            f"      averageValue: {min(per_pod, pl.pods.max_connections)}",
            "router:",
            f"  replicas: {r.replicas}  # changing it moves topics: plan it (--simulate-reshard)",
            f"  historySize: {pl.pods.history_size}",
            f"  historyTtl: {pl.pods.history_ttl:g}",
            "  resources:",
            f"    requests: {{cpu: {_cpu(r.cpu_request)}, memory: {_mi(r.memory_request)}}}",
            f"    limits: {{memory: {_mi(r.memory_limit)}}}",
        ]
    ) + "\n"


# --- text ----------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x:.0%}"


def render_plan(pl: Plan, command: str, given: set[str] | None = None) -> str:
    L, P, g, r, p = pl.load, pl.pods, pl.gateways, pl.routers, pl.profile
    given = given if given is not None else set(CONSTANTS) | {"topics", "payload", "burst", "churn"}

    def d(name: str) -> str:
        return "" if name in given else " (default)"

    gf, rf = g.figures, r.figures
    lines = [
        f"fanroute capacity: {_n(L.connections)} connections, {_n(L.publications)} publications/s, fan-out {_n(L.fanout)} "
        f"→ {_n(L.peak * L.fanout)} deliveries/s at the peak",
        f"  inputs: {_n(L.topics)} topics{d('topics')}, {_n(L.payload)}-byte payloads{d('payload')}, {L.copies} "
        f"cop{'y' if L.copies == 1 else 'ies'} per topic{d('copies')}, peak {L.burst:g}× the mean{d('burst')}, "
        f"{L.churn * 100:g} % of connections reconnecting per minute{d('churn')}",
        f"  pods: gateway {P.gateway_cpu:g} core{d('gateway_cpu')}, router {P.router_cpu:g} core{d('router_cpu')}; CPU target {_pct(P.cpu_target)}, "
        f"at most {P.max_connections:,} connections per gateway, pings every {P.ping_interval:g} s, lost gateway's clients back within {P.reconnect_window:g} s",
        "",
        f"gateways: {g.replicas} — with one lost or draining, the other {g.replicas - 1} stay within the target",
        f"  bottleneck: {g.bottleneck}",
        f"  headroom: {_pct(g.utilisation)} CPU each with all up, {_pct(g.utilisation_one_lost)} with one lost (target {_pct(P.cpu_target)}); "
        f"{_n(gf['connections_each'])} connections each ({_n(gf['connections_each_one_lost'])} with one lost, limit {P.max_connections:,})",
        f"  each: {_n(gf['deliveries_per_s_each'])} deliveries/s ({gf['egress_mbit_s_each']:,.0f} Mbit/s out), "
        f"{_n(gf['subscriptions_each'])} subscriptions; a topic reaches {gf['interested_gateways_per_topic']:.1f} gateways, "
        f"{_n(gf['fanout_per_gateway'])} subscribers on each",
        f"  a lost gateway's {_n(gf['connections_each'])} clients reconnect onto the others in about {gf['reconnect_storm_s']:.1f} s of their spare CPU",
        f"  requests: cpu {_cpu(g.cpu_request)}, memory {_mi(g.memory_request)} (limit {_mi(g.memory_limit)}; working set with one lost "
        f"{gf['working_set_bytes_one_lost'] / MIB:,.0f} MiB)",
        f"  CPU by use: " + ", ".join(f"{k} {v / 1e6:,.2f} cores" for k, v in g.terms.items()),
        "",
        f"routers: {r.replicas}" + ("" if L.copies > 1 else " — one copy per topic (--copies 1): a lost router's topics wait for its restart"),
        f"  bottleneck: {r.bottleneck}",
        f"  headroom: the busiest router at {_pct(r.utilisation)} CPU" + (f", {_pct(r.utilisation_one_lost)} with one lost" if L.copies > 1 else "")
        + f" (target {_pct(P.cpu_target)}; the mean {_pct(rf['mean_utilisation'])}, the busiest {rf['busiest_over_mean']:.2f}× it as topics hash)",
        f"  each: {_n(rf['publications_per_s_each'])} publications/s at {rf['us_per_publication']:.1f} µs"
        + (f" leading, {rf['us_per_copy']:.1f} µs as a further copy" if L.copies > 1 else "")
        + (f", {rf['idle_cores']:.2f} cores at rest" if rf["idle_cores"] else "") + f", {_n(rf['topics_each'])} topics, "
        f"history {rf['history_bytes_each'] / MIB:,.0f} MiB ({_n(rf['history_entries_per_topic'])} messages per topic)",
        f"  requests: cpu {_cpu(r.cpu_request)}, memory {_mi(r.memory_request)} (limit {_mi(r.memory_limit)}; working set {rf['working_set_bytes'] / MIB:,.0f} MiB)",
        "",
    ]
    lat = pl.latency
    if lat["p99_ms"] is None:
        lines.append(f"p99 delivery latency: no measured figure supports one here — {lat['why']}")
    else:
        lines.append(f"p99 delivery latency: about {lat['p99_ms']:.1f} ms, {lat['why']}")
    for note in pl.notes:
        lines.append(f"note: {note}")
    lines += ["", f"figures used: {p.source} — {p.machine.get('nproc', '?')} × {p.machine.get('cpu', '?')}, {p.date}, `{p.command}`"]
    shown_constants = [(name, what, unit, "") for name, (what, unit) in CONSTANTS.items()]
    shown_constants += [
        (name, what, unit, "" if name in p.measured_optional else " (not in the profile: taken as " + ("a publication's" if unit == "µs" else "0") + ")")
        for name, (what, unit, _) in OPTIONAL.items()
    ]
    for name, what, unit, why in shown_constants:
        v = p.constants[name]
        shown = f"{v / MIB:,.1f} MiB" if unit == "B" and v >= MIB else f"{v:,.0f} {unit}" if v >= 100 else f"{v:,.3g} {unit}"
        lines.append(f"  {what}: {shown}{why}")
    if p.router_copies:
        lines.append(f"  (routers measured with --copies {p.router_copies})")
    lines += ["", "values.yaml for helm/fanroute (helm install … -f this-file):", "---", f"# {command}", values_fragment(pl).rstrip()]
    return "\n".join(lines) + "\n"


def render_ceiling(c: Ceiling, shape: Shape, memory: float, p: Profile) -> str:
    f = c.figures
    return "\n".join(
        [
            f"fanroute capacity ceiling: {c.gateways} gateways, {c.routers} routers, at 100 % of their usable CPU",
            f"  deliveries/s at fan-out {_n(shape.fanout)} ({shape.payload}-byte payloads, {shape.topics} topic{'s' if shape.topics != 1 else ''}): "
            f"{_n(c.deliveries_per_s)} ({_n(c.publications_per_s)} publications/s), limited by {c.deliveries_limited_by}",
            f"    gateways: {f['gateway_us_per_publication']:.1f} µs per publication → {_n(f['publications_per_s_by_gateways'])}/s; "
            f"routers: {f['router_us_per_publication']:.1f} µs leading"
            + (f" + {f['router_us_per_copy']:.1f} µs per further copy ({f['copies']} copies)" if f["copies"] > 1 else "")
            + (f", {f['router_idle_cores']:.3f} cores each at rest" if f["router_idle_cores"] else "")
            + f" → {_n(f['publications_per_s_by_routers'])}/s",
            f"  all {c.gateways + c.routers} pods sharing {f['shared_cpu']:g} core{'s' if f['shared_cpu'] != 1 else ''} (a bench machine): "
            f"{_n(f['deliveries_per_s_shared'])} deliveries/s ({_n(f['publications_per_s_shared'])} publications/s at "
            f"{f['gateway_us_per_publication'] + f['router_us_per_publication_all_copies']:.1f} µs each over every process)",
            f"  connections ({shape.subscriptions_per_connection:g} subscription each, {memory / MIB:g} MiB per gateway): {_n(c.connections)}, limited by {c.connections_limited_by}",
            f"    per gateway: {_n(f['connections_each_by_memory'])} by memory ({f['bytes_per_connection']:,.0f} bytes each), "
            f"{_n(f['connections_each_by_cpu'])} by CPU",
            f"  figures: {p.source} ({p.date})",
        ]
    ) + "\n"


def render_reshard(s: Reshard) -> str:
    grow = s.after > s.before
    goal = s.ideal + 0.01
    share = "only the new router's share moves" if grow else "only the removed router's topics move"
    lines = [
        f"fanroute capacity: {s.before} → {s.after} routers, {s.topics:,} topics, {s.copies} "
        f"cop{'y' if s.copies == 1 else 'ies'} each (synthetic names, rendezvous hashing with xxh64)",
    ]
    if s.copies == 1:
        lines.append(
            f"  topics that move: {s.moved:,} = {s.moved_fraction:.2%} (ideal {s.ideal:.2%}: {share}; "
            f"goal ≤ {goal:.2%}: {'met' if s.moved_fraction <= goal else 'NOT met'})"
        )
    else:
        lines += [
            f"  copies that move: {s.copies_moved:,} of {s.topics * s.copies:,} = {s.copies_moved_fraction:.2%} "
            f"(ideal {s.ideal:.2%}: {share}; goal ≤ {goal:.2%}: {'met' if s.copies_moved_fraction <= goal else 'NOT met'})",
            f"  topics whose leader changes: {s.moved:,} = {s.moved_fraction:.2%}",
        ]
    lines += [
        f"  load evenness, busiest ÷ mean {'topics' if s.copies == 1 else 'copies'} per router: "
        f"{s.max_over_mean_before:.3f} before, {s.max_over_mean_after:.3f} after",
        "  per router after: " + ", ".join(f"{k} {v:,}" for k, v in s.per_router_after.items()),
    ]
    if s.history_bytes_moved is None:
        lines += [
            f"  history bytes moved: none — with one copy a moved topic's history ({s.history_bytes_per_topic / 1024:,.0f} KiB each, "
            f"{s.history_basis}) stays behind",
            "  on its old router: clients resuming a moved topic get recovered:false. Plan the change as a maintenance step,",
            "  or run with --copies 2 or more once shards are replicated.",
        ]
    else:
        lines.append(
            f"  history bytes moved: {s.history_bytes_moved / MIB:,.1f} MiB ({s.copies_moved:,} copies × "
            f"{s.history_bytes_per_topic / 1024:,.1f} KiB, {s.history_basis}), sent by a surviving copy before the new view is ready"
        )
        if s.topics_left_without_copy:
            lines.append(f"  topics left without any copy (every one was on a removed router): {s.topics_left_without_copy:,} — they start a new epoch")
    return "\n".join(lines) + "\n"


# --- the command line ------------------------------------------------------------------------


def _pair(text: str) -> tuple[int, int]:
    a, sep, b = text.partition(":")
    if not sep:
        raise ValueError(text)
    return int(a), int(b)


def _percent(text: str) -> float:
    value = float(text.strip().rstrip("%"))
    if not math.isfinite(value):
        raise ValueError(text)
    return value / 100


PAIR = Kind("two counts as A:B (8:9)", "A:B", _pair)
PERCENT = Kind("a percentage", "PERCENT", _percent, lambda v: f"{v * 100:g}")

FlagFn = Callable[[argparse.ArgumentParser, str, Callable[[str], Any], Any, str], None]


def add_arguments(parser: argparse.ArgumentParser, flag: FlagFn) -> None:
    """The flags of ``fanroute capacity``, declared through ``flag(parser, name, kind,
    default, help)`` (:func:`fanroute.settings.scoped_flag`: each is a setting, with
    its ``FANROUTE_CAPACITY_*`` variable, listed in ``cluster/SETTINGS.md``). The
    servers' settings the plan depends on default to the servers' own defaults."""
    d = Pods()
    flag(parser, "--connections", int, None, "connections to plan for (required for a plan)")
    flag(parser, "--publications", NUMBER, None, "publications per second, cluster-wide (required for a plan)")
    flag(parser, "--fanout", NUMBER, None, "mean subscribers per publication (required for a plan or a ceiling)")
    flag(parser, "--topics", int, None, f"topics (none: {DEFAULT_TOPICS:,} for a plan, 1 for a ceiling, {RESHARD_TOPICS:,} for a reshard)")
    flag(parser, "--payload", int, None, f"payload bytes (none: {DEFAULT_PAYLOAD} for a plan, 64 for a ceiling)")
    flag(parser, "--copies", int, 2, "routers holding each topic's stream (the routers' --copies; 2 by default, as they run)")
    flag(parser, "--gateway-cpu", NUMBER, d.gateway_cpu, "cores per gateway pod")
    flag(parser, "--router-cpu", NUMBER, d.router_cpu, "cores per router pod")
    flag(parser, "--burst", NUMBER, 1.0, "peak publication rate over the mean")
    flag(parser, "--churn", PERCENT, 0.01, "percent of the connections that reconnect per minute")
    flag(parser, "--cpu-target", PERCENT, d.cpu_target, "percent of a pod's usable CPU planned for (the chart's HPA target)")
    flag(parser, "--max-connections", int, d.max_connections, "connections per gateway pod (the gateways' --max-connections)")
    flag(parser, "--ping-interval", NUMBER, d.ping_interval, "seconds between heartbeats (the gateways' --ping-interval)")
    flag(parser, "--reconnect-window", NUMBER, d.reconnect_window, "seconds a lost gateway's clients may take to come back")
    flag(parser, "--history-size", int, d.history_size, "messages kept per topic (the routers' --history-size)")
    flag(parser, "--history-ttl", NUMBER, d.history_ttl, "seconds a message stays in history (the routers' --history-ttl)")
    flag(parser, "--history-bytes", int, d.history_bytes, "bytes of history per router (the routers' --history-bytes)")
    flag(parser, "--profile", FILE, None, "the capacity profile (none: ops/capacity-profile.json)")
    flag(parser, "--ceiling", PAIR, None, "GATEWAYS:ROUTERS: what those pods carry at 100 % CPU, instead of a plan")
    flag(parser, "--gateway-memory", NUMBER, 512.0, "with --ceiling: MiB per gateway pod (the chart's memory limit)")
    flag(parser, "--subscriptions-per-connection", NUMBER, 1.0, "with --ceiling: subscriptions per connection")
    flag(parser, "--simulate-reshard", PAIR, None, "FROM:TO routers: which topics move (8:9), instead of a plan")
    flag(parser, "--json", BOOL, False, "print the result as JSON")


def _get(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def _given(args: argparse.Namespace) -> set[str]:
    """The inputs the user set (a flag or its variable), by attribute name."""
    origins = getattr(args, "_origins", None)
    if origins is None:  # a Namespace built by hand: what it holds was given
        return {k for k, v in vars(args).items() if v is not None}
    return {o.setting.dest for o in origins if o.source != "default"}


def _pods(args: argparse.Namespace) -> Pods:
    d = Pods()
    return Pods(
        gateway_cpu=_get(args, "gateway_cpu", d.gateway_cpu),
        router_cpu=_get(args, "router_cpu", d.router_cpu),
        cpu_target=_get(args, "cpu_target", d.cpu_target),
        max_connections=_get(args, "max_connections", d.max_connections),
        ping_interval=_get(args, "ping_interval", d.ping_interval),
        reconnect_window=_get(args, "reconnect_window", d.reconnect_window),
        history_size=_get(args, "history_size", d.history_size),
        history_ttl=_get(args, "history_ttl", d.history_ttl),
        history_bytes=_get(args, "history_bytes", d.history_bytes),
    )


def run(args: argparse.Namespace) -> int:
    """``fanroute capacity``: a plan, a ceiling or a reshard simulation (ConfigError
    — one sentence — for input that cannot be planned)."""
    given = _given(args)
    as_json = bool(getattr(args, "json", False))
    if getattr(args, "simulate_reshard", None):
        a, b = args.simulate_reshard
        s = simulate_reshard(
            a, b, _get(args, "topics", RESHARD_TOPICS), _get(args, "copies", 2), pods=_pods(args),
            payload=_get(args, "payload", DEFAULT_PAYLOAD), publications=getattr(args, "publications", None),
        )
        print(json.dumps(s.as_dict(), indent=2) if as_json else render_reshard(s), end="\n" if as_json else "")
        return 0
    pods = _pods(args)
    if getattr(args, "ceiling", None):
        if getattr(args, "fanout", None) is None:
            raise ConfigError("--ceiling needs --fanout, the fan-out whose deliveries/s it computes")
        shape = Shape(
            fanout=args.fanout, payload=_get(args, "payload", 64), topics=_get(args, "topics", 1),
            subscriptions_per_connection=_get(args, "subscriptions_per_connection", 1.0), copies=_get(args, "copies", 2),
            churn=_get(args, "churn", 0.01),
        )
        prof = load_profile(getattr(args, "profile", None))
        memory = _get(args, "gateway_memory", 512.0) * MIB
        c = ceiling(prof, shape, gateways=args.ceiling[0], routers=args.ceiling[1], gateway_cpu=pods.gateway_cpu,
                    router_cpu=pods.router_cpu, gateway_memory=memory, pods=pods)
        print(json.dumps(c.as_dict(), indent=2) if as_json else render_ceiling(c, shape, memory, prof), end="\n" if as_json else "")
        return 0
    missing = [f"--{n}" for n in ("connections", "publications", "fanout") if getattr(args, n, None) is None]
    if missing:
        raise ConfigError(f"a plan needs {', '.join(missing)} (or give --ceiling or --simulate-reshard)")
    load = Load(
        connections=args.connections, publications=args.publications, fanout=args.fanout,
        topics=_get(args, "topics", DEFAULT_TOPICS), payload=_get(args, "payload", DEFAULT_PAYLOAD),
        copies=_get(args, "copies", 2), burst=_get(args, "burst", 1.0), churn=_get(args, "churn", 0.01),
    )
    check(load, pods)  # before reading the profile: bad input is named first
    pl = plan(load_profile(getattr(args, "profile", None)), load, pods)
    command = "fanroute capacity " + " ".join(getattr(args, "argv", None) or _argv(args))
    print(json.dumps(pl.as_dict(), indent=2) if as_json else render_plan(pl, command, given), end="\n" if as_json else "")
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The flags given (on the command line or by their variables), as they would be
    typed: the comment at the top of the values fragment says what produced it."""
    out = []
    for o in getattr(args, "_origins", ()):
        if o.source == "default" or o.setting.commands != ("capacity",) or o.setting.flag == "--json":
            continue
        value = getattr(args, o.setting.dest, None)
        if value is not None:
            out += [o.setting.flag, o.setting.kind.show(value) if not isinstance(value, tuple) else ":".join(map(str, value))]
    return out
