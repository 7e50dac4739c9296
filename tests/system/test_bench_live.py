"""``bench conflation`` and ``bench presence`` end to end, tiny, as real processes.

The commands run at once (each starts its own local cluster), with a handful of
subscribers for a couple of seconds; the conflation feed twice, on one gateway and
spread over two. What is checked is that the report parses and
that nothing was wrong — no slow-consumer close, every ``skipped`` exact, every
stalled subscriber caught up, no presence count that was never true — never how fast:
timings and memory belong in the benchmark's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CONFLATION = [
    "conflation", "--symbols", "10", "--rate", "100", "--subscribers", "20", "--stalled", "5",
    "--warmup", "1", "--stall", "2", "--after", "1",
    # A small threshold, so the stalled subscribers conflate within the short stall.
    "--threshold", "1024", "--timeout", "60",
]
# The same feed over 2 gateways and 1 router, its readers in a process of their own:
# each gateway gets half the subscribers and half the stalled ones.
CONFLATION_SPREAD = [
    "conflation", "--symbols", "10", "--rate", "100", "--subscribers", "20", "--stalled", "4",
    "--warmup", "1", "--stall", "2", "--after", "1", "--threshold", "1024", "--timeout", "60",
    "--gateways", "2", "--routers", "1", "--client-procs", "1",
]
PRESENCE = ["presence", "--subscribers", "40", "--rate", "40", "--timeout", "60"]
RUNS = {"conflation": CONFLATION, "conflation_spread": CONFLATION_SPREAD, "presence": PRESENCE}


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANROUTE_")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "fanroute.cli", "bench", *args, "--json"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, args in RUNS.items()
    }
    out = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=90)
            assert proc.returncode == 0, stderr[-3000:]
            out[name] = json.loads(stdout)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


def test_conflation_report(reports: dict[str, dict]) -> None:
    report = reports["conflation"]
    assert report["bench"] == "conflation"
    assert report["machine"]["nproc"] >= 1
    r = report["result"]
    assert (r["subscribers"], r["stalled"], r["symbols"]) == (20, 5, 10)
    pub = r["publications_per_s"]
    assert pub["errors"] == 0 and pub["acknowledged"] > 0 and pub["offered"] == 1000
    # One gateway: it received every publication the API acknowledged.
    assert r["gateway_messages"]["received"] == pub["acknowledged"]
    assert r["slow_consumer_closes"] == 0 and r["client_closes"] == {}
    assert r["skipped_violations"] == 0
    # The stalled subscribers fell behind, were told what they missed, and caught up.
    assert r["conflated"] > 0 and r["skipped_total"] > 0
    assert r["caught_up_s"]["stalled_measured"] == 5
    assert set(r["rss_mb"]) >= RSS_FIGURES
    assert set(r["cpu"]) == {"wall_s", "gateway_s", "routers_s", "bench_s", "gateway_us_per_subscriber_message"}
    goals = r["goals"]
    assert set(goals) == {"no_slow_consumer_close", "memory_flat", "newest_within_1s", "skipped_exact", "offered_rate_reached"}
    assert goals["no_slow_consumer_close"] and goals["skipped_exact"]
    assert (r["gateways"], r["routers"], r["client_procs"]) == (1, 2, 0)
    assert len(r["per_gateway"]) == 1


RSS_FIGURES = {"before_stall", "peak_during_stall", "end_of_stall", "after", "growth_during_stall", "conflation_bound"}


def test_conflation_over_two_gateways(reports: dict[str, dict]) -> None:
    """Spread over gateways, every figure is there for each, the sums add up, and
    what must hold on any machine holds: no close, ``skipped`` exact, and every
    stalled subscriber, whichever gateway it was on, caught up with the newest prices."""
    r = reports["conflation_spread"]["result"]
    assert (r["subscribers"], r["stalled"], r["gateways"], r["routers"], r["client_procs"]) == (20, 4, 2, 1, 1)
    pub = r["publications_per_s"]
    assert pub["errors"] == 0 and pub["acknowledged"] > 0
    gws = r["per_gateway"]
    assert [(g["subscribers"], g["stalled"]) for g in gws] == [(10, 2), (10, 2)]
    for g in gws:
        # Every gateway had subscribers to every symbol: it received each publication.
        assert g["received"] == pub["acknowledged"]
        assert g["publish_batches"] > 0 and g["slow_consumer_closes"] == 0
        assert set(g["rss_mb"]) >= RSS_FIGURES and g["rss_mb"]["before_stall"] > 0
        assert isinstance(g["memory_flat"], bool) and g["cpu_s"] >= 0
    assert r["gateway_messages"]["received"] == 2 * pub["acknowledged"]
    assert r["conflated"] == sum(g["conflated"] for g in gws) > 0
    assert r["goals"]["memory_flat"] == all(g["memory_flat"] for g in gws)
    # No subscriber was sent a publication twice (one still held by conflation when
    # the counters were read is in neither figure yet).
    assert r["gateway_messages"]["written"] + r["conflated"] <= 20 * pub["acknowledged"]
    assert r["slow_consumer_closes"] == 0 and r["client_closes"] == {}
    assert r["skipped_violations"] == 0 and r["skipped_total"] > 0
    assert r["caught_up_s"]["stalled_measured"] == 4
    assert r["goals"]["no_slow_consumer_close"] and r["goals"]["skipped_exact"]


def test_presence_report(reports: dict[str, dict]) -> None:
    report = reports["presence"]
    assert report["bench"] == "presence"
    r = report["result"]
    assert (r["subscribers"], r["gateways"]) == (40, 2)
    assert r["violations"] == 0
    watched = r["watched"]
    assert watched["wrong_counts"] == 0 and watched["unsettled"] == 0
    # Each watcher was pushed counts during the churn and settled on the final one.
    assert all(n > 0 for n in watched["pushes"].values())
    for kind in ("subscribe", "unsubscribe"):
        result = watched["results"][kind]
        assert result["changes"] == 40
        assert len(result["settled_after_last_change_s"]) == 2
        assert isinstance(result["cpu_us_per_change"], float)
        assert r["reference_unwatched"]["results"][kind]["settled_after_last_change_s"] is None
    assert set(r["goals"]) == {"count_right_within_2s"}
