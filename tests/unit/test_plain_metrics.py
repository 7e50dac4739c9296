"""The hot path's lock-free metrics expose what prometheus-client's own would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fanroute.metrics import PlainCounter, PlainHistogram

BOUNDS = (0.001, 0.01, 0.1)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) + ((s.labels["le"],) if "le" in s.labels else ())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_a_plain_histogram_exposes_the_same_buckets_count_and_sum_as_prometheus_clients():
    values = [0.0005, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.2, 3.0]  # bounds themselves included: le is <=
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    plain = PlainHistogram("x_seconds", "x", BOUNDS, "kind")
    ours.register(plain)
    reference = Histogram("x_seconds", "x", ["kind"], buckets=BOUNDS, registry=theirs)
    for v in values:
        plain.labels("a").observe(v)
        reference.labels("a").observe(v)
    assert samples(ours) == samples(theirs)


def test_an_unlabelled_histogram_and_a_counter():
    registry = CollectorRegistry()
    latency = PlainHistogram("lat_seconds", "latency", BOUNDS)
    commands = PlainCounter("commands", "commands", "type")
    registry.register(latency)
    registry.register(commands)
    series = latency.labels()
    assert latency.labels() is series
    series.observe(0.005)
    commands.labels("publish").inc()
    commands.labels("publish").inc(2)
    commands.labels("ping")
    got = samples(registry)
    assert got[("lat_seconds_bucket", ("0.01",))] == 1 and got[("lat_seconds_bucket", ("0.001",))] == 0
    assert got[("lat_seconds_count", ())] == 1 and got[("lat_seconds_sum", ())] == 0.005
    assert got[("commands_total", (("type", "publish"),))] == 3
    assert got[("commands_total", (("type", "ping"),))] == 0
