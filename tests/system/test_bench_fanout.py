"""``fanroute bench fanout`` end to end, at a tiny size, through the real command line.

It starts every target as real processes and drives them with the real load
generator; what it checks is the shape of the report and that the deliveries
happened — never how fast (timings belong in the benchmark's output, not in tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SUBSCRIBERS = [1, 10]
TARGETS = ["standalone", "cluster", "reference"]


@pytest.fixture(scope="module")
def report() -> dict:
    argv = [
        sys.executable, "-m", "fanroute.cli", "bench", "fanout",
        "--subscribers", ",".join(map(str, SUBSCRIBERS)),
        "--targets", ",".join(TARGETS),
        "--duration", "1", "--warmup", "0.2", "--rate", "50",
        "--json",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANROUTE_")}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_cell_is_reported(report: dict) -> None:
    assert report["benchmark"] == "fanout"
    assert report["machine"]["nproc"] >= 1
    assert report["config"]["payload"] == 64
    cells = {(r["target"], r["subscribers"]) for r in report["results"]}
    assert cells == {(t, n) for t in TARGETS for n in SUBSCRIBERS}
    ratios = {(r["target"], r["subscribers"]) for r in report["ratios"]}
    assert ratios == {(t, n) for t in ("standalone", "cluster") for n in SUBSCRIBERS}
    for r in report["ratios"]:
        assert set(r) == {"target", "subscribers", "throughput", "p50", "p99"}


@pytest.mark.parametrize("target", TARGETS)
def test_saturation_delivers_everything(report: dict, target: str) -> None:
    for r in (r for r in report["results"] if r["target"] == target):
        sat = r["saturation"]
        assert sat["published"] > 0
        assert sat["deliveries_per_s"] > 0
        assert sat["expected"] == sat["published"] * r["subscribers"]
        # The window keeps every subscriber within reach of the gateway's outbox
        # limit, so nothing is lost and nobody is closed as a slow consumer.
        assert sat["drained"], sat
        assert sat["lost"] == 0, sat
        assert sat["close_codes"] == {}, sat
        assert sat["server_cpu"] >= 0 and sat["loadgen_cpu"] >= 0


@pytest.mark.parametrize("target", TARGETS)
def test_nothing_lost_at_a_fixed_rate(report: dict, target: str) -> None:
    for r in (r for r in report["results"] if r["target"] == target):
        lat = r["latency"]
        assert lat["published"] == 50  # --rate 50 for --duration 1
        assert lat["expected"] == lat["published"] * r["subscribers"]
        assert lat["delivered"] == lat["expected"], lat
        assert lat["lost"] == 0 and lat["gaps"] == 0 and lat["duplicates"] == 0, lat
        assert lat["samples"] == lat["expected"]
        assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert lat["close_codes"] == {}


def test_bad_flag_is_one_sentence() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fanroute.cli", "bench", "fanout", "--targets", "nginx"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown target" in proc.stderr and "nginx" in proc.stderr
