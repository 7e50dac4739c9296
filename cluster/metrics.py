"""Prometheus metrics: one registry per process, names prefixed ``fanroute_``.

Counters on the per-message hot path (deliveries, publications, fan-out sends) are
plain integers in the pure core (``HubStats``, ``ShardStats``) and are read by a
collector only when Prometheus scrapes, so the hot path pays no lock per message.
Everything else uses prometheus-client's own metric types. Labels have bounded
values only: a reason, a close code, a command type, a shard name — never a topic
or a user.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary, WeakSet

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fanroute.gateway.hub import Hub
    from fanroute.router.shard import Shard

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
LIFETIME_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
# Handling one client command takes microseconds; a slow one (a token check) milliseconds.
COMMAND_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05)
_PROCESS_WIDE: WeakSet[CollectorRegistry] = WeakSet()


def version() -> str:
    """fanroute's installed version, or ``unknown`` when it runs from a tree that is not installed."""
    try:
        return metadata.version("fanroute")
    except metadata.PackageNotFoundError:
        return "unknown"


def process_wide(registry: CollectorRegistry) -> None:
    """What every process exposes once, whatever it runs: ``fanroute_build_info`` and
    the process's CPU, memory and descriptors (``process_*``, prometheus-client's
    ProcessCollector, read from /proc at scrape time).

    Standalone puts a gateway and shards on one registry; this registers once per registry.
    """
    if registry in _PROCESS_WIDE:
        return
    _PROCESS_WIDE.add(registry)
    build = Gauge("fanroute_build_info", "fanroute's version; always 1.", ["version"], registry=registry)
    build.labels(version()).set(1)
    ProcessCollector(registry=registry)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        process_wide(registry)
        self.connections = Gauge(
            "fanroute_gateway_connections", "Open client connections.", registry=registry
        )
        self.connections_opened = Counter(
            "fanroute_gateway_connections_opened_total",
            "Client connections accepted.",
            registry=registry,
        )
        self.connections_closed = Counter(
            "fanroute_gateway_connections_closed_total",
            "Client connections closed, by reason and close code.",
            ["reason", "code"],
            registry=registry,
        )
        self.connections_rejected = Counter(
            "fanroute_gateway_connections_rejected_total",
            "Handshakes refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self.connection_lifetime = Histogram(
            "fanroute_gateway_connection_lifetime_seconds",
            "How long client connections lasted.",
            buckets=LIFETIME_BUCKETS,
            registry=registry,
        )
        self.commands = PlainCounter("fanroute_gateway_commands", "Client commands received, by type.", "type")
        registry.register(self.commands)
        self.bytes_in = Counter(
            "fanroute_gateway_bytes_in",
            "Bytes read from client WebSocket connections (counted once per read).",
            registry=registry,
        )
        latency = PlainHistogram(
            "fanroute_gateway_delivery_latency_seconds",
            "Publish-to-delivery latency, from the publishing gateway to the delivering one.",
            LATENCY_BUCKETS,
        )
        registry.register(latency)
        self.latency = latency.labels()
        self.heartbeat_timeouts = Counter(
            "fanroute_gateway_heartbeat_timeouts_total",
            "Connections closed because nothing arrived within the ping timeout.",
            registry=registry,
        )
        self.slow_consumer_closes = Counter(
            "fanroute_gateway_slow_consumer_closes_total",
            "Connections closed because their outbound buffer overflowed.",
            registry=registry,
        )
        self.shard_link_up = Gauge(
            "fanroute_gateway_shard_link_up",
            "1 when this gateway reaches the shard, else 0.",
            ["shard"],
            registry=registry,
        )
        self.shard_link_changes = Counter(
            "fanroute_gateway_shard_link_changes_total",
            "Shard link state changes, by new state.",
            ["shard", "state"],
            registry=registry,
        )
        self.limit_hits = Counter(
            "fanroute_gateway_limit_hits_total",
            "Commands or connections refused by a limit, by limit.",
            ["limit"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "fanroute_gateway_auth_failures_total",
            "Authentication and authorization failures, by kind.",
            ["kind"],
            registry=registry,
        )
        self.api_requests = Counter(
            "fanroute_gateway_api_requests_total",
            "HTTP API requests, by status code.",
            ["status"],
            registry=registry,
        )
        self.api_calls = Counter(
            "fanroute_gateway_api_calls_total",
            "Server API calls on the admin port, by endpoint and outcome (ok, or the error code answered).",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.api_commands = Counter(
            "fanroute_gateway_api_commands_total",
            "Server API commands carried out on this gateway (from its own API or relayed by a shard), by kind.",
            ["kind"],
            registry=registry,
        )
        self.api_command_targets = Counter(
            "fanroute_gateway_api_command_targets_total",
            "Connections closed (disconnect) or subscriptions ended (unsubscribe) here by server API commands.",
            ["kind"],
            registry=registry,
        )
        self.inter_node_rejected = Counter(
            "fanroute_gateway_wire_rejected_total",
            "Inter-node messages refused and dropped, by reason (mac, replay, malformed, sender).",
            ["reason"],
            registry=registry,
        )
        self.internal_errors = Counter(
            "fanroute_gateway_internal_errors_total",
            "Commands or inter-node messages whose handling raised (answered or dropped; the process went on), by where.",
            ["where"],
            registry=registry,
        )
        self.accept_errors = Counter(
            "fanroute_gateway_accept_errors_total",
            "Accepts that failed for lack of resources (file descriptors, memory); the gateway backs off.",
            registry=registry,
        )
        for reason in ("mac", "replay", "malformed", "sender"):
            self.inter_node_rejected.labels(reason)
        for where in ("command", "inbox"):
            self.internal_errors.labels(where)
        for kind in ("disconnect", "unsubscribe"):
            self.api_commands.labels(kind)
            self.api_command_targets.labels(kind)

    def watch_commands(self, names: Iterable[str]) -> PlainHistogram:
        """``fanroute_gateway_command_seconds``, by command type: observed on the read path."""
        times = PlainHistogram(
            "fanroute_gateway_command_seconds",
            "Time to handle one client command in the gateway (admission and routing; not the shard's answer), by type.",
            COMMAND_BUCKETS,
            "command",
        )
        for name in names:
            times.labels(name)
        self.registry.register(times)
        return times

    def watch(self, hub: Hub, outbox_bytes: Callable[[], int], bytes_out: Callable[[], int]) -> None:
        self.registry.register(_HubCollector(hub, outbox_bytes, bytes_out))


class PlainHistogram(Collector):
    """A histogram observed on the hot path, kept as plain integers, by one label or none.

    A prometheus-client ``Histogram`` takes a lock and walks its buckets on each
    observation: about 1 µs, which at fan-out 1 (a delivery-latency observation per
    publication, a command time per command) was a tenth of what a publication cost
    in all. These series take no lock (a gateway observes from its one trio thread)
    and are summed only when Prometheus scrapes.
    """

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...], label: str | None = None) -> None:
        self.name, self.documentation, self.bounds, self.label = name, documentation, bounds, label
        self.series: dict[str, HistogramSeries] = {}

    def labels(self, value: str = "") -> HistogramSeries:
        """The series of label ``value`` (the only one when the histogram has no label)."""
        series = self.series.get(value)
        if series is None:
            series = self.series[value] = HistogramSeries(self.bounds)
        return series

    def collect(self) -> Iterator[Metric]:
        h = HistogramMetricFamily(self.name, self.documentation, labels=[self.label] if self.label else None)
        for value, series in self.series.items():
            cumulative, running = [], 0
            for bound, n in zip((*map(str, self.bounds), "+Inf"), series.counts):
                running += n
                cumulative.append((bound, running))
            h.add_metric([value] if self.label else [], cumulative, series.sum)
        yield h


class HistogramSeries:
    """One series of a :class:`PlainHistogram`: bucket counts (``le``: value <= bound) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class PlainCounter(Collector):
    """A counter incremented on the hot path (once per client command), by one label: plain integers, as :class:`PlainHistogram`."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.series: dict[str, CounterSeries] = {}

    def labels(self, value: str) -> CounterSeries:
        series = self.series.get(value)
        if series is None:
            series = self.series[value] = CounterSeries()
        return series

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, series in self.series.items():
            c.add_metric([value], series.value)
        yield c


class CounterSeries:
    """One series of a :class:`PlainCounter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _HubCollector(Collector):
    def __init__(self, hub: Hub, outbox_bytes: Callable[[], int], bytes_out: Callable[[], int]):
        self.hub = hub
        self.outbox_bytes = outbox_bytes
        self.bytes_out = bytes_out

    def collect(self) -> Iterator[Metric]:
        hub, s = self.hub, self.hub.stats
        counters = [
            ("deliveries_received", "Deliveries received from shards (one per publication).", s.deliveries_received),
            ("deliveries_unrouted", "Deliveries received for topics with no local subscriber (dropped).", s.deliveries_unrouted),
            ("messages_out", "Message frames written to subscribers.", s.deliveries_sent),
            ("publishes", "Publications forwarded to shards.", s.publishes),
            ("subscribes", "Subscribe commands accepted.", s.subscribes),
            ("unsubscribes", "Unsubscribe commands.", s.unsubscribes),
            ("resumes", "Subscribes that asked for recovery (with since).", s.resumes),
            ("seq_gaps", "Deliveries whose seq skipped ahead (held back; what was missing is fetched from history).", s.gaps),
            ("duplicates_dropped", "Deliveries at or below a topic's position (already sent; dropped).", s.duplicates_dropped),
            ("wire_frames_rejected", "Inter-node frames from shards that failed validation (dropped).", s.frames_rejected),
            ("wire_frames_failed", "Inter-node frames from shards whose handling raised (dropped).", s.frames_failed),
            ("payloads_rejected", "Deliveries whose payload could not be sent to every encoding (dropped; subscribers see a seq gap).", s.payloads_rejected),
            ("conflated", "Messages of conflated topics left out for subscribers that fell behind (each later one says how many: skipped).", s.conflated),
        ]
        for name, doc, value in counters:
            c = CounterMetricFamily(f"fanroute_gateway_{name}", doc)
            c.add_metric([], value)
            yield c
        rec = CounterMetricFamily(
            "fanroute_gateway_recoveries", "Recovery outcomes, by outcome.", labels=["outcome"]
        )
        rec.add_metric(["recovered"], s.recovered)
        rec.add_metric(["not_recovered"], s.not_recovered)
        yield rec
        err = CounterMetricFamily("fanroute_gateway_errors", "Error frames sent, by code.", labels=["code"])
        for code, value in sorted(s.errors.items()):
            err.add_metric([code], value)
        yield err
        b = CounterMetricFamily("fanroute_gateway_bytes_out", "Bytes written to client sockets.")
        b.add_metric([], self.bytes_out())
        yield b
        gauges = [
            ("topics", "Topics with local subscribers.", len(hub.topics)),
            ("subscriptions", "Subscriptions held by local connections.",
             sum(len(e.subscribers) + len(e.pending) for e in hub.topics.values())),
            ("pending_requests", "Requests waiting for a shard's answer.", len(hub.requests)),
            ("outbox_bytes", "Bytes waiting in connection outbound buffers.", self.outbox_bytes()),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(f"fanroute_gateway_{name}", doc)
            g.add_metric([], value)
            yield g


class RouterMetrics:
    """Router metrics; several shards in one process (standalone) share one set."""

    _by_registry: WeakKeyDictionary[CollectorRegistry, RouterMetrics] = WeakKeyDictionary()

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> RouterMetrics:
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls._by_registry[registry] = cls(registry)
        return metrics

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        process_wide(registry)
        self.collector = _ShardCollector()
        registry.register(self.collector)
        self.batch_size = Histogram(
            "fanroute_router_batch_frames",
            "Frames per inter-node message sent to gateways.",
            ["shard"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=registry,
        )
        self.gateway_overflows = Counter(
            "fanroute_router_gateway_overflows_total",
            "Gateways dropped because their send queue overflowed (they resynchronize).",
            ["shard"],
            registry=registry,
        )
        self.wire_rejected = Counter(
            "fanroute_router_wire_rejected_total",
            "Inter-node messages refused and dropped, by reason (mac, replay, malformed).",
            ["shard", "reason"],
            registry=registry,
        )
        self.internal_errors = Counter(
            "fanroute_router_internal_errors_total",
            "Inter-node messages whose handling raised (dropped; the process went on).",
            ["shard"],
            registry=registry,
        )
        self.dial_failures = Counter(
            "fanroute_router_dial_failures_total",
            "Gateway inboxes that could not be dialed.",
            ["shard"],
            registry=registry,
        )

        self.peer_lists_rejected = Counter(
            "fanroute_router_peer_lists_rejected_total",
            "Router lists announced by a router not in this one's list that were not one more router (ignored).",
            ["shard"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "fanroute_router_config_reloads_total",
            "Namespaces files read again after they changed, by outcome (ok, failed: the last good one stays).",
            ["shard", "outcome"],
            registry=registry,
        )
        self.peer_overflows = Counter(
            "fanroute_router_peer_overflows_total",
            "Messages to another router dropped because its link's queue was full (re-sent or re-synced).",
            ["shard"],
            registry=registry,
        )

    def watch(self, shard: Shard) -> None:
        self.collector.shards.append(shard)

    def watch_replica(self, shard: Shard) -> None:
        """Replication's series exist from when the shard has a replica (router/REPLICATION.md)."""
        self.peer_overflows.labels(shard.name)
        self.peer_lists_rejected.labels(shard.name)


class _ShardCollector(Collector):
    def __init__(self) -> None:
        self.shards: list[Shard] = []

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}

        def family(kind: type, name: str, doc: str, labels: list[str]) -> Metric:
            if name not in families:
                families[name] = kind(name, doc, labels=labels)
            return families[name]

        for sh in self.shards:
            self._collect_one(sh, family)
        yield from families.values()

    @staticmethod
    def _collect_one(sh: Shard, family: Callable[..., Metric]) -> None:
        s = sh.stats
        counters = [
            ("publications", "Publications sequenced by the shard.", s.publications),
            ("fanout_sends", "Deliveries sent to gateways (one per interested gateway per publication).", s.fanout_sends),
            ("subscribes", "Subscribe requests from gateways.", s.subscribes),
            ("wire_frames_rejected", "Inter-node frames from gateways that failed validation (dropped).", s.frames_rejected),
            ("gateways_forgotten", "Gateways forgotten (silent past the heartbeat deadline, or gone).", s.gateways_forgotten),
            ("topics_evicted", "Idle topics whose state was dropped.", s.topics_evicted),
            ("wire_frames_failed", "Inter-node frames whose handling raised (dropped).", s.frames_failed),
            ("senders_rejected", "Messages whose sender is not a gateway inbox address (dropped).", s.senders_rejected),
            ("duplicate_publications", "Publications recognised by their idem key and not applied again.", s.duplicates),
            ("history_evicted", "History entries evicted by the shard-wide byte cap (--history-bytes).", s.history_evicted),
            ("history_evicted_bytes", "Bytes of history evicted by the shard-wide byte cap.", s.history_evicted_bytes),
        ]
        for name, doc, value in counters:
            family(CounterMetricFamily, f"fanroute_router_{name}", doc, ["shard"]).add_metric([sh.name], value)
        rec = family(
            CounterMetricFamily, "fanroute_router_recoveries", "Recovery answers, by outcome.", ["shard", "outcome"]
        )
        rec.add_metric([sh.name, "recovered"], s.recovered)
        rec.add_metric([sh.name, "not_recovered"], s.not_recovered)
        gauges = [
            ("topics", "Topics the shard holds state for.", len(sh.topics)),
            ("interest_entries", "(topic, gateway) interest pairs.", sh.interest_entries()),
            ("history_messages", "Messages kept in history across topics.", sh.history_messages()),
            ("history_bytes", "Bytes of history held across topics (payloads and per-entry overhead).", sh.history_bytes),
            ("gateways", "Gateways the shard knows.", len(sh.gateways)),
        ]
        for name, doc, value in gauges:
            family(GaugeMetricFamily, f"fanroute_router_{name}", doc, ["shard"]).add_metric([sh.name], value)
        refused = family(
            CounterMetricFamily, "fanroute_router_publications_refused",
            "Publications the shard refused (no stream here may take them now), by whether anyone was told.",
            ["shard", "answered"],
        )
        refused.add_metric([sh.name, "yes"], s.refused - s.refused_silently)
        refused.add_metric([sh.name, "no"], s.refused_silently)
        replica = sh.replica
        if replica is None:
            return
        r = replica.stats
        for name, doc, value in (
            ("failovers", "Views installed without a router that vanished (its topics moved on).", r.failovers),
            ("handoffs", "Views installed after a router left on its own (SIGTERM).", r.handoffs),
            ("resync_bytes", "Payload bytes of streams sent to other copies when views changed.", r.resync_bytes),
            ("refused_unsafe", "Publications refused because no view or lease made them safe.", r.refused_unsafe),
            ("views_installed", "Views this router installed.", r.views_installed),
            ("replica_duplicates", "Publications recognised by their idem key in replicated streams.", r.duplicates),
            ("peer_messages_stale", "Router messages of an older view or from a router that does not lead (dropped).", r.stale_rejected),
        ):
            family(CounterMetricFamily, f"fanroute_router_{name}", doc, ["shard"]).add_metric([sh.name], value)
        view = replica.view
        for name, doc, value in (
            ("view", "The view this router is a member of (0: none yet).", view.number if view is not None else 0),
            ("ready", "1 when this router is caught up and serving in its view.", int(replica.ready and not replica.leaving)),
            ("view_members", "Routers in this router's view.", len(view.members) if view is not None else 0),
            ("topics_single_copy", "Topics led here that have one copy in the view (one more loss loses them).", replica.single_copy_topics()),
            ("copies_behind", "Appends sent to copies and not yet confirmed.", replica.behind()),
            ("streams", "Topic streams this router holds (as leader or copy).", len(replica.streams)),
        ):
            family(GaugeMetricFamily, f"fanroute_router_{name}", doc, ["shard"]).add_metric([sh.name], value)
