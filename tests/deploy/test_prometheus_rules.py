"""The alert rules in ops/prometheus: promtool's own checks and unit tests, and the
Helm chart's copy kept identical."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "ops/prometheus"
RULES = RULES_DIR / "fanroute-rules.yml"
CHART_COPY = ROOT / "helm/fanroute/files/fanroute-rules.yml"
PROMTOOL = shutil.which("promtool")


# The alerts the operations guide promises; a rule dropped by mistake fails here.
EXPECTED_ALERTS = {
    "FanrouteGatewayDown",
    "FanrouteRouterDown",
    "FanrouteShardUnreachable",
    "FanrouteReconnectStorm",
    "FanrouteDeliveryLatencyHigh",
    "FanrouteSlowConsumerCloses",
    "FanrouteShardLoadSkew",
    "FanrouteInterNodeMessagesRefused",
    "FanrouteHistoryEvicting",
    "FanrouteTopicsOnSingleCopy",
    "FanroutePublicationsRefusedUnsafe",
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is missing: run ops/setup-prometheus.sh as root"
    return subprocess.run([PROMTOOL, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules():
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_promtool_test_rules():
    tests = sorted(str(p.relative_to(RULES_DIR)) for p in (RULES_DIR / "tests").glob("*.test.yml"))
    assert tests
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_both_ways():
    """Each alert has a promtool case where it fires and one where it stays quiet."""
    fired, quiet = set(), set()
    for path in (RULES_DIR / "tests").glob("*.test.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


def test_alerts_are_documented_and_graded():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == EXPECTED_ALERTS
    for a in alerts:
        assert a["labels"]["severity"] in ("critical", "warning", "info"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
        assert "for" in a, a["alert"]  # nothing pages on a single scrape


def test_chart_ships_the_same_rules():
    assert CHART_COPY.read_text() == RULES.read_text(), "copy ops/prometheus/fanroute-rules.yml to helm/fanroute/files/"
