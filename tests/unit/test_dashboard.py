"""The Grafana dashboard: generated from ops/grafana/build_dashboard.py, the chart's
copy identical, every query filtered by the dashboard's variables and every panel on
the datasource variable. (tests/deploy/test_prometheus_scrape.py runs every query.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops/grafana/fanroute.json"
CHART_COPY = ROOT / "helm/fanroute/dashboards/fanroute.json"
DS = {"type": "prometheus", "uid": "${datasource}"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def test_json_is_what_the_builder_writes():
    result = subprocess.run(
        [sys.executable, "ops/grafana/build_dashboard.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert CHART_COPY.read_text() == DASHBOARD.read_text()


def test_variables_datasource_namespace_instance_pod():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "instance", "pod"):
        v = variables[name]
        assert v["datasource"] == DS and v["includeAll"] and v["multi"]
        # "All" must match series without the label too (a scrape config without pods).
        assert v["allValue"] == ".*"


def test_every_panel_uses_the_datasource_variable_and_the_filters():
    for p in panels():
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS
            selectors = re.findall(r"\b(?:fanroute_\w+|up)\{([^}]*)\}", t["expr"])
            assert selectors, t["expr"]
            for sel in selectors:
                for var in ("$namespace", "$instance", "$pod"):
                    assert var in sel, (p["title"], t["expr"])
                assert re.search(r'job="fanroute-(gateway|router)"', sel), t["expr"]


def test_covers_what_operators_look_at():
    text = " ".join(queries())
    for metric in (
        "fanroute_gateway_connections",
        "fanroute_gateway_connections_opened_total",
        "fanroute_gateway_connections_closed_total",
        "fanroute_gateway_messages_out_total",
        "fanroute_router_publications_total",
        "fanroute_gateway_delivery_latency_seconds_bucket",
        "fanroute_gateway_heartbeat_timeouts_total",
        "fanroute_gateway_recoveries_total",
        "fanroute_gateway_shard_link_up",
        "fanroute_router_fanout_sends_total",
        "fanroute_gateway_slow_consumer_closes_total",
    ):
        assert metric in text, metric
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.99," in text


def test_layout_has_unique_ids_and_no_overlaps():
    all_panels = dashboard()["panels"]
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in all_panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
