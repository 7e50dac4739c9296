"""The capacity planner (fanroute.capacity): the model grows with every input and
shrinks with the cores per pod, names the bottleneck a constructed load has, refuses
bad input with one sentence and exit status 2 through the command line, and the
reshard simulation moves no more than the new router's share (and says how many
history bytes the new copies are sent when topics have several)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fanroute import capacity, cli
from fanroute.capacity import Load, Pods, Profile, Shape
from fanroute.errors import ConfigError
from tests.support import ROOT

# Round figures of the size this machine measures: the tests hold the model's rules,
# not one run's constants.
CONSTANTS = {
    "gateway_us_per_delivery": 1.5,
    "gateway_us_per_delivered_kib": 1.0,
    "gateway_us_per_publication_in": 100.0,
    "gateway_us_per_publication_out": 45.0,
    "gateway_us_per_handshake": 900.0,
    "gateway_us_per_subscribe": 130.0,
    "gateway_us_per_heartbeat": 90.0,
    "gateway_base_bytes": 50 * 2**20,
    "gateway_bytes_per_connection": 28_000.0,
    "gateway_bytes_per_subscription": 420.0,
    "router_publications_per_core": 12_000.0,
    "router_us_per_extra_gateway": 50.0,
    "router_base_bytes": 50 * 2**20,
    "router_bytes_per_topic": 1900.0,
    "router_rss_per_history_byte": 1.1,
    # Measured since replicated streams: a further copy's CPU per publication, a router's at rest.
    "router_us_per_copy": 30.0,
    "router_idle_cores": 0.05,
}
BEFORE_REPLICATION = {k: v for k, v in CONSTANTS.items() if k not in capacity.OPTIONAL}
LATENCY = [
    {"fanout_per_gateway": 1, "utilisation": 0.01, "p99_ms": 4.0},
    {"fanout_per_gateway": 1, "utilisation": 0.75, "p99_ms": 40.0},
    {"fanout_per_gateway": 100, "utilisation": 0.05, "p99_ms": 20.0},
    {"fanout_per_gateway": 100, "utilisation": 0.75, "p99_ms": 200.0},
]


def profile(base: dict = CONSTANTS, **constants: float) -> Profile:
    return Profile.from_dict(
        {
            "constants": {**base, **constants}, "latency": LATENCY, "machine": {"nproc": 2, "cpu": "test"}, "date": "2026-01-01",
            "command": "test", "router_copies": 2,
        },
        "the test profile",
    )


PROFILE = profile()


def write_profile(tmp_path, **constants: float) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"constants": {**CONSTANTS, **constants}, "latency": LATENCY}))
    return str(path)


def counts(load: Load, pods: Pods = Pods(), p: Profile = PROFILE) -> tuple[int, int]:
    pl = capacity.plan(p, load, pods)
    return pl.gateways.replicas, pl.routers.replicas


# -- monotonic in every input ------------------------------------------------------------

loads = st.builds(
    Load,
    connections=st.integers(1_000, 2_000_000),
    publications=st.floats(1, 200_000),
    fanout=st.floats(1, 1_000),
    topics=st.integers(1, 200_000),
    payload=st.integers(1, 16_384),
    copies=st.integers(1, 3),
    burst=st.floats(1, 5),
    churn=st.floats(0, 0.2),
)
MONOTONIC = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
GROWS = ["connections", "publications", "fanout", "topics", "payload", "copies", "burst", "churn"]


def planned(load: Load, pods: Pods = Pods()) -> capacity.Plan:
    try:
        return capacity.plan(PROFILE, load, pods)
    except ConfigError:
        assume(False)  # a load the gateways' limits refuse (too many subscriptions per connection...)
        raise


def grown(load: Load, name: str, factor: float) -> Load:
    value = getattr(load, name)
    if name == "churn":
        return replace(load, churn=value * factor + 0.001)
    new = value * factor
    return replace(load, **{name: math.ceil(new) if isinstance(value, int) else new})


@MONOTONIC
@given(loads, st.sampled_from(GROWS), st.floats(1.01, 4))
def test_more_of_any_load_never_needs_fewer_pods_nor_less_cpu(load, name, factor):
    before = planned(load)
    bigger = grown(load, name, factor)
    assume(bigger.fanout <= bigger.connections)
    after = planned(bigger)
    assert after.gateways.replicas >= before.gateways.replicas, name
    if name != "topics":  # more topics at the same rate spread more evenly over routers: see below
        assert after.routers.replicas >= before.routers.replicas, name
    # The CPU the load costs, at the same gateway count, grows too.
    g = before.gateways.replicas
    assert sum(capacity.gateway_terms(PROFILE, bigger, Pods(), g).values()) >= sum(capacity.gateway_terms(PROFILE, load, Pods(), g).values()) * (1 - 1e-9)


@MONOTONIC
@given(loads, st.floats(0.1, 1), st.floats(1.01, 4), st.sampled_from(["gateway_cpu", "router_cpu"]))
def test_more_cores_per_pod_never_needs_more_pods(load, cores, factor, name):
    small = Pods(**{name: cores})
    big = Pods(**{name: cores * factor})
    a, b = planned(load, small), planned(load, big)
    assert b.gateways.replicas <= a.gateways.replicas
    assert b.routers.replicas <= a.routers.replicas


@MONOTONIC
@given(loads)
def test_a_plan_keeps_its_promises(load):
    pl = planned(load)
    g, r, pods = pl.gateways, pl.routers, pl.pods
    assert g.replicas >= 2 and r.replicas >= load.copies
    assert g.utilisation_one_lost <= pods.cpu_target + 1e-9 or "hot" in " ".join(pl.notes)
    assert load.connections / (g.replicas - 1) <= pods.max_connections
    uneven = any(n.startswith(("hot topics", "balance")) for n in pl.notes)  # the busiest router, named
    assert r.utilisation <= pods.cpu_target + 1e-9 or uneven
    assert g.memory_limit >= g.memory_request > 0 and r.memory_limit >= r.memory_request > 0


# -- the bottleneck named ------------------------------------------------------------------


def test_idle_connections_are_bounded_by_the_connections_per_pod():
    pl = capacity.plan(PROFILE, Load(connections=1_000_000, publications=1, fanout=1, topics=1000))
    assert pl.gateways.bottleneck.startswith("connections per pod")
    assert pl.gateways.replicas == 1_000_000 // 50_000 + 1
    assert pl.routers.bottleneck.startswith("none")


def test_a_wide_fanout_is_bounded_by_the_gateways_cpu_for_deliveries():
    pl = capacity.plan(PROFILE, Load(connections=200_000, publications=50, fanout=100_000, topics=2))
    assert pl.gateways.bottleneck.startswith("CPU: deliveries"), pl.gateways.bottleneck
    assert pl.routers.replicas == 1


def test_many_topics_each_on_few_gateways_are_bounded_by_the_publications():
    pl = capacity.plan(PROFILE, Load(connections=100_000, publications=20_000, fanout=2, topics=50_000))
    assert pl.gateways.bottleneck.startswith("CPU: publications"), pl.gateways.bottleneck


def test_expensive_handshakes_make_the_reconnect_storm_the_bottleneck():
    p = profile(gateway_us_per_handshake=20_000.0)
    pl = capacity.plan(p, Load(connections=200_000, publications=10, fanout=10, topics=1000))
    assert pl.gateways.bottleneck.startswith("the reconnect storm"), pl.gateways.bottleneck


def test_a_high_publication_rate_is_bounded_by_the_routers():
    p = profile(router_publications_per_core=1000.0)
    pl = capacity.plan(p, Load(connections=10_000, publications=20_000, fanout=1, topics=100_000))
    assert pl.routers.bottleneck.startswith("CPU: publications"), pl.routers.bottleneck
    assert pl.routers.replicas >= math.ceil(20_000 / 1000 / 0.7)


def test_few_topics_make_the_busiest_router_the_bound():
    """20 topics over routers hash unevenly: the busiest router sets the count."""
    p = profile(router_publications_per_core=1000.0)
    even = capacity.plan(p, Load(connections=10_000, publications=5_000, fanout=1, topics=1_000_000))
    few = capacity.plan(p, Load(connections=10_000, publications=5_000, fanout=1, topics=20))
    assert few.routers.replicas > even.routers.replicas
    assert "busiest" in few.routers.bottleneck


@MONOTONIC
@given(loads, st.floats(1.01, 4))
def test_more_topics_at_the_same_rate_need_more_router_memory_and_no_more_than_the_mean_needs(load, factor):
    """More topics at the same rate: each is lighter and they spread more evenly, so
    the routers' count may fall, never below what the mean load needs; the topics'
    own memory (interest and history kept) grows."""
    before, after = planned(load), planned(grown(load, "topics", factor))
    mean_needs = math.ceil(after.routers.terms["publications"] / (Pods().cpu_target * 1e6))
    assert after.routers.replicas >= min(mean_needs, before.routers.replicas)
    held = lambda pl: pl.routers.replicas * (pl.routers.figures["working_set_bytes"] - PROFILE.router_base_bytes)  # noqa: E731
    assert held(after) >= held(before) * (1 - 1e-9) or after.routers.figures["history_bytes_wanted_each"] > Pods().history_bytes


def test_copies_bound_the_routers_of_a_light_load():
    pl = capacity.plan(PROFILE, Load(connections=1000, publications=10, fanout=10, topics=100, copies=3))
    assert pl.routers.replicas == 3 and pl.routers.bottleneck.startswith("copies")
    assert any("30.0 µs per publication (measured with --copies 2)" in n for n in pl.notes), pl.notes


def test_replicated_streams_need_three_routers_so_that_a_majority_survives_one_lost():
    pl = capacity.plan(PROFILE, Load(connections=1000, publications=10, fanout=10, topics=100, copies=2))
    assert pl.routers.replicas == 3 and pl.routers.bottleneck.startswith("views"), pl.routers.bottleneck
    assert capacity.plan(PROFILE, Load(connections=1000, publications=10, fanout=10, topics=100)).routers.replicas == 1


def test_each_further_copy_costs_the_measured_copy_figure_and_routers_spend_their_rest():
    load = Load(connections=10_000, publications=20_000, fanout=1, topics=100_000, copies=2)
    pl = capacity.plan(PROFILE, load)
    leader = 1e6 / CONSTANTS["router_publications_per_core"]
    assert pl.routers.terms["publications"] == pytest.approx(20_000 * (leader + 30.0))
    # The CPU at rest is taken off each router's budget: (0.7 − 0.05) core for publications.
    mean = pl.routers.terms["publications"] / (pl.routers.replicas - 1)  # with one lost
    assert mean <= (0.7 - 0.05) * 1e6 < pl.routers.terms["publications"] / (pl.routers.replicas - 2)
    assert pl.routers.figures["mean_utilisation"] == pytest.approx((pl.routers.terms["publications"] / pl.routers.replicas + 0.05e6) / 1e6)


def test_a_profile_from_before_replication_costs_a_copy_as_a_publication():
    old = profile(BEFORE_REPLICATION)
    assert old.router_us_per_copy == pytest.approx(1e6 / CONSTANTS["router_publications_per_core"]) and old.router_idle_cores == 0
    pl = capacity.plan(old, Load(connections=1000, publications=10, fanout=10, topics=100, copies=3))
    assert any("no replication figure" in n for n in pl.notes), pl.notes
    with pytest.raises(ConfigError, match="router_idle_cores"):
        profile(router_idle_cores=1.0)
    with pytest.raises(ConfigError, match="nothing for publications"):
        capacity.plan(PROFILE, Load(connections=1000, publications=10, fanout=10), Pods(router_cpu=0.05))


def test_one_hot_topic_is_named_instead_of_planning_routers_without_end():
    p = profile(router_publications_per_core=1000.0)
    pl = capacity.plan(p, Load(connections=10_000, publications=5_000, fanout=1, topics=1))
    assert any(n.startswith("hot topics") for n in pl.notes)


def test_the_ceiling_of_two_gateways_is_what_their_cpu_and_memory_hold():
    c = capacity.ceiling(PROFILE, Shape(fanout=100), gateways=2, routers=3, gateway_cpu=0.5, router_cpu=1, gateway_memory=256 * 2**20)
    per_pub = 100 + 2 * 45 + 100 * (1.5 + 64 / 1024)  # in once, out at both gateways, 100 deliveries
    assert c.deliveries_limited_by == "gateway CPU"
    assert c.deliveries_per_s == pytest.approx(100 * (2 * 0.5e6 - 100 * 2 / 25 * 90) / per_pub, rel=1e-6)
    assert c.connections == pytest.approx(2 * (256 * 2**20 - 50 * 2**20) / (28_000 + 420), rel=1e-6)
    assert c.connections_limited_by == "memory"


def test_the_ceiling_of_pods_sharing_one_core_is_one_core_over_every_process_cost():
    """What fanroute bench profile --check measures: every server process of 2
    gateways and 3 routers pinned to one core, one topic held by 2 copies."""
    c = capacity.ceiling(PROFILE, Shape(fanout=100, copies=2), gateways=2, routers=3, gateway_cpu=1, router_cpu=1, gateway_memory=256 * 2**20)
    gateways = 100 + 2 * 45 + 100 * (1.5 + 64 / 1024)
    routers = 1e6 / 12_000 + 50.0 + 30.0  # the leader (two interested gateways), one further copy
    spare = 1e6 - 3 * 0.05e6 - 100 * 2 / 25 * 90  # the routers at rest, the subscribers' heartbeats
    assert c.figures["deliveries_per_s_shared"] == pytest.approx(100 * spare / (gateways + routers), rel=1e-6)
    # Each pod on its own core carries more than all of them on one.
    assert c.deliveries_per_s > c.figures["deliveries_per_s_shared"]
    assert c.figures["publications_per_s_by_routers"] == pytest.approx((1e6 - 0.05e6) / (1e6 / 12_000 + 50.0), rel=1e-6)


# -- latency only where a figure supports it ----------------------------------------------


def test_latency_is_interpolated_between_measured_figures_and_never_extrapolated():
    inside = capacity.p99(PROFILE, 10, 0.4)
    assert inside["p99_ms"] is not None and 4 < inside["p99_ms"] < 200
    assert capacity.p99(PROFILE, 1000, 0.4)["p99_ms"] is None  # beyond the measured fan-outs
    assert capacity.p99(PROFILE, 10, 0.9)["p99_ms"] is None  # more loaded than measured
    assert capacity.p99(PROFILE, 1, 0.75)["p99_ms"] == pytest.approx(40.0)


# -- the reshard simulation -------------------------------------------------------------------


def test_growing_from_8_to_9_routers_moves_at_most_the_new_routers_share():
    s = capacity.simulate_reshard(8, 9, 100_000)
    assert s.moved_fraction <= 1 / 9 + 0.01
    assert s.max_over_mean_after < 1.05
    assert sum(s.per_router_after.values()) == 100_000
    assert s.history_bytes_moved is None  # one copy: the history stays behind


def test_with_copies_the_history_the_new_copies_are_sent_is_counted():
    s = capacity.simulate_reshard(8, 9, 20_000, copies=2, payload=100, publications=2_000)
    assert s.copies_moved_fraction <= 1 / 9 + 0.01
    per_topic = min(1000, 2_000 / 20_000 * 300) * (100 + capacity.MSGPACK_HEADER + capacity.ENTRY_OVERHEAD)
    assert s.history_bytes_per_topic == pytest.approx(per_topic)
    assert s.history_bytes_moved == pytest.approx(s.copies_moved * per_topic)
    assert s.topics_left_without_copy == 0
    assert sum(s.per_router_after.values()) == 2 * 20_000


def test_rendezvous_order_starts_with_the_gateways_owner():
    names = capacity.router_names(5)
    ring = capacity.Ring(names)
    rings: dict = {}
    for i in range(200):
        order = capacity.rendezvous_order(rings, names, f"t{i}", 3)
        assert order[0] == ring.owner(f"t{i}") and len(set(order)) == 3


# -- the command line ---------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["capacity", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--connections", "0", "--publications", "10", "--fanout", "1"], "--connections"),
        (["--connections", "-5", "--publications", "10", "--fanout", "1"], "--connections"),
        (["--connections", "100", "--publications", "-1", "--fanout", "1"], "--publications"),
        (["--connections", "100", "--publications", "10", "--fanout", "0"], "--fanout"),
        (["--connections", "100", "--publications", "10", "--fanout", "101"], "--fanout"),
        (["--connections", "100", "--publications", "10", "--fanout", "1", "--copies", "0"], "--copies"),
        (["--connections", "100", "--publications", "10", "--fanout", "1", "--gateway-cpu", "0"], "--gateway-cpu"),
        (["--connections", "100", "--publications", "10", "--fanout", "1", "--payload", "-1"], "--payload"),
        (["--connections", "many"], "--connections"),
        (["--publications", "10", "--fanout", "1"], "--connections"),
        (["--simulate-reshard", "8"], "--simulate-reshard"),
        (["--simulate-reshard", "8:8"], "--simulate-reshard"),
    ],
)
def test_bad_input_is_one_sentence_naming_it_and_exit_2(capsys, tmp_path, argv, names):
    rc, out, err = run_cli(capsys, *argv, "--profile", write_profile(tmp_path))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fanroute: ") and names in err, err


@pytest.mark.parametrize("content", [None, "not json", "[]", '{"constants": {"gateway_us_per_delivery": 1}}', b"\xff\xfe"])
def test_an_unreadable_profile_is_one_sentence_and_exit_2(capsys, tmp_path, content):
    path = tmp_path / "p.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    rc, out, err = run_cli(capsys, "--connections", "1000", "--publications", "10", "--fanout", "5", "--profile", str(path))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fanroute: ") and "profile" in err, err


def test_a_directory_is_no_profile(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--connections", "1000", "--publications", "10", "--fanout", "5", "--profile", str(tmp_path))
    assert rc == 2 and err.count("\n") == 1 and "cannot be read" in err


def test_bad_input_from_a_variable_names_the_variable(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FANROUTE_CAPACITY_CONNECTIONS", "0")
    rc, _, err = run_cli(capsys, "--publications", "10", "--fanout", "1", "--profile", write_profile(tmp_path))
    assert rc == 2 and "FANROUTE_CAPACITY_CONNECTIONS" in err and "--connections" in err


def test_the_million_viewer_plan_prints_the_figures_it_used_and_chart_values(capsys):
    """The checked-in profile, as a user runs it."""
    rc, out, err = run_cli(capsys, "--connections", "1000000", "--publications", "50000", "--fanout", "200")
    assert rc == 0, err
    prof = capacity.load_profile()
    assert prof.machine and prof.date and prof.command.startswith("fanroute bench profile --save-profile ops/capacity-profile.json")
    assert "gateways: " in out and "routers: " in out and "bottleneck: " in out and "headroom: " in out
    assert "p99 delivery latency" in out and "requests: cpu" in out
    assert f"figures used: {capacity.DEFAULT_PROFILE}" in out and prof.date in out
    for what, _ in capacity.CONSTANTS.values():
        assert f"  {what}: " in out
    fragment = yaml.safe_load(out.split("\n---\n", 1)[1])
    assert fragment["gateway"]["replicas"] == fragment["gateway"]["autoscaling"]["minReplicas"] >= 2


def test_the_values_fragment_uses_the_charts_names(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "--connections", "100000", "--publications", "1000", "--fanout", "50", "--profile", write_profile(tmp_path))
    assert rc == 0
    fragment = yaml.safe_load(out.split("\n---\n", 1)[1])
    chart = yaml.safe_load((ROOT / "helm/fanroute/values.yaml").read_text())

    def same_shape(ours, theirs, path=""):
        for key, value in ours.items():
            assert key in theirs, f"{path}{key} is not a value of the chart"
            if isinstance(value, dict) and key not in ("requests", "limits") or key == "limits" and "maxConnections" in value:
                same_shape(value, theirs[key], f"{path}{key}.")

    same_shape(fragment, chart)
    assert fragment["router"]["replicas"] >= 1
    assert fragment["gateway"]["autoscaling"]["maxReplicas"] > fragment["gateway"]["autoscaling"]["minReplicas"]


def test_the_reshard_command_reports_the_goal(capsys):
    rc, out, _ = run_cli(capsys, "--simulate-reshard", "8:9")
    assert rc == 0 and "goal ≤ 12.11%: met" in out and "busiest ÷ mean" in out
    rc, out, _ = run_cli(capsys, "--simulate-reshard", "8:9", "--copies", "2", "--topics", "10000")
    assert rc == 0 and "history bytes moved: " in out and "MiB" in out


def test_json_output_is_the_plan(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "--connections", "10000", "--publications", "100", "--fanout", "10", "--json", "--profile", write_profile(tmp_path))
    assert rc == 0
    data = json.loads(out)
    assert data["gateways"]["replicas"] >= 2 and data["load"]["connections"] == 10000 and "values" in data
