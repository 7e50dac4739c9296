"""Builds the fanroute Grafana dashboard from the panel list below.

    python ops/grafana/build_dashboard.py          # writes the JSON files
    python ops/grafana/build_dashboard.py --check  # exit 1 if they are stale

The dashboard is code so that every query sits in one readable list, a test can run
each of them against a real Prometheus, and the Helm chart's copy
(helm/fanroute/dashboards/fanroute.json, shipped in a ConfigMap for Grafana's
sidecar) can never drift from ops/grafana/fanroute.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = [ROOT / "ops/grafana/fanroute.json", ROOT / "helm/fanroute/dashboards/fanroute.json"]

DS = {"type": "prometheus", "uid": "${datasource}"}
# Every query is narrowed by the namespace, instance and pod variables. "All" is the
# regex .*, which also matches a series without the label (a hand-written scrape
# config on a laptop has no pod or namespace).
FILTER = 'namespace=~"$namespace", instance=~"$instance", pod=~"$pod"'
GW = f'job="fanroute-gateway", {FILTER}'
RT = f'job="fanroute-router", {FILTER}'
RATE = "$__rate_interval"


@dataclass
class Query:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    queries: list[Query]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    description: str = ""
    width: int = 8
    height: int = 8
    stack: bool = False
    extra: dict = field(default_factory=dict)


def q(expr: str, legend: str = "") -> Query:
    return Query(" ".join(expr.split()), legend)


def stat(title: str, expr: str, unit: str = "short", description: str = "") -> Panel:
    return Panel(title, [q(expr)], unit, "stat", description, width=4, height=4)


def quantiles(metric: str, sel: str, by: str = "") -> list[Query]:
    group = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [
        q(f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RATE}])))", f"p{int(p * 100)}{suffix}")
        for p in (0.5, 0.99)
    ]


ROWS: list[tuple[str, list[Panel]]] = [
    ("Overview", [
        stat("Open connections", f"sum(fanroute_gateway_connections{{{GW}}})"),
        stat("Gateways up", f'sum(up{{{GW}}})', description="Gateways Prometheus scrapes successfully."),
        stat("Routers up", f'sum(up{{{RT}}})', description="Router shards Prometheus scrapes successfully."),
        stat("Publications / s", f"sum(rate(fanroute_router_publications_total{{{RT}}}[{RATE}]))", "ops"),
        stat("Messages out / s", f"sum(rate(fanroute_gateway_messages_out_total{{{GW}}}[{RATE}]))", "ops"),
        stat("p99 delivery latency",
             f"histogram_quantile(0.99, sum by (le) (rate(fanroute_gateway_delivery_latency_seconds_bucket{{{GW}}}[{RATE}])))",
             "s"),
    ]),
    ("Connections", [
        Panel("Open connections by pod", [q(f"sum by (pod, instance) (fanroute_gateway_connections{{{GW}}})", "{{pod}} {{instance}}")],
              stack=True),
        Panel("Connection churn", [
            q(f"sum(rate(fanroute_gateway_connections_opened_total{{{GW}}}[{RATE}]))", "opened"),
            q(f"sum(rate(fanroute_gateway_connections_closed_total{{{GW}}}[{RATE}]))", "closed"),
        ], "cps", description="Connections opened and closed per second; a spike of both is a reconnect storm."),
        Panel("Closes by reason", [
            q(f"sum by (reason, code) (rate(fanroute_gateway_connections_closed_total{{{GW}}}[{RATE}]))", "{{reason}} ({{code}})"),
        ], "cps", stack=True),
        Panel("Handshakes rejected", [
            q(f"sum by (reason) (rate(fanroute_gateway_connections_rejected_total{{{GW}}}[{RATE}]))", "{{reason}}"),
        ], "cps", description="Refused before the WebSocket opened: auth failures, limits, bad requests."),
        Panel("Heartbeat timeouts", [
            q(f"sum by (pod, instance) (rate(fanroute_gateway_heartbeat_timeouts_total{{{GW}}}[{RATE}]))", "{{pod}} {{instance}}"),
        ], "cps", description="Clients that stayed silent past the ping timeout."),
        Panel("Connection lifetime", quantiles("fanroute_gateway_connection_lifetime_seconds", GW), "s"),
    ]),
    ("Messages", [
        Panel("Publications", [
            q(f"sum(rate(fanroute_gateway_publishes_total{{{GW}}}[{RATE}]))", "forwarded by gateways"),
            q(f"sum(rate(fanroute_router_publications_total{{{RT}}}[{RATE}]))", "sequenced by shards"),
        ], "ops"),
        Panel("Deliveries", [
            q(f"sum(rate(fanroute_router_fanout_sends_total{{{RT}}}[{RATE}]))", "shard → gateway"),
            q(f"sum(rate(fanroute_gateway_deliveries_received_total{{{GW}}}[{RATE}]))", "received by gateways"),
            q(f"sum(rate(fanroute_gateway_messages_out_total{{{GW}}}[{RATE}]))", "frames to subscribers"),
        ], "ops"),
        Panel("Bytes to clients", [
            q(f"sum by (pod, instance) (rate(fanroute_gateway_bytes_out_total{{{GW}}}[{RATE}]))", "{{pod}} {{instance}}"),
        ], "Bps", stack=True),
        Panel("Commands by type", [
            q(f"sum by (type) (rate(fanroute_gateway_commands_total{{{GW}}}[{RATE}]))", "{{type}}"),
        ], "ops", stack=True),
        Panel("Subscriptions and topics", [
            q(f"sum(fanroute_gateway_subscriptions{{{GW}}})", "subscriptions"),
            q(f"sum(fanroute_gateway_topics{{{GW}}})", "topics (gateways)"),
            q(f"sum(fanroute_router_topics{{{RT}}})", "topics (shards)"),
        ]),
        Panel("Error frames by code", [
            q(f"sum by (code) (rate(fanroute_gateway_errors_total{{{GW}}}[{RATE}]))", "{{code}}"),
        ], "ops", stack=True),
    ]),
    ("Latency", [
        Panel("Publish-to-delivery latency", quantiles("fanroute_gateway_delivery_latency_seconds", GW), "s", width=12,
              description="From the publishing gateway to the delivering one, across the shard."),
        Panel("Latency p99 by delivering pod",
              quantiles("fanroute_gateway_delivery_latency_seconds", GW, by="pod")[1:], "s", width=12),
    ]),
    ("Recovery", [
        Panel("Recoveries (gateways)", [
            q(f"sum by (outcome) (rate(fanroute_gateway_recoveries_total{{{GW}}}[{RATE}]))", "{{outcome}}"),
            q(f"sum(rate(fanroute_gateway_resumes_total{{{GW}}}[{RATE}]))", "resume requests"),
        ], "ops", description="not_recovered: the history no longer held what a client missed."),
        Panel("Recoveries by shard", [
            q(f"sum by (shard, outcome) (rate(fanroute_router_recoveries_total{{{RT}}}[{RATE}]))", "{{shard}} {{outcome}}"),
        ], "ops"),
        Panel("Sequence gaps seen by gateways", [
            q(f"sum(rate(fanroute_gateway_seq_gaps_total{{{GW}}}[{RATE}]))", "gaps"),
        ], "ops", description="Deliveries whose seq did not follow the previous one; clients recover them."),
    ]),
    ("Shards", [
        Panel("Shard links up (worst gateway)", [
            q(f"min by (shard) (fanroute_gateway_shard_link_up{{{GW}}})", "{{shard}}"),
        ], description="1 when every gateway reaches the shard.", extra={"min": 0, "max": 1}),
        Panel("Shard link changes", [
            q(f"sum by (shard, state) (increase(fanroute_gateway_shard_link_changes_total{{{GW}}}[{RATE}]))", "{{shard}} {{state}}"),
        ]),
        Panel("Load skew (busiest shard / average)", [
            q(f"max(sum by (shard) (rate(fanroute_router_fanout_sends_total{{{RT}}}[{RATE}]))) "
              f"/ avg(sum by (shard) (rate(fanroute_router_fanout_sends_total{{{RT}}}[{RATE}])))", "fan-out skew"),
            q(f"max(sum by (shard) (fanroute_router_topics{{{RT}}})) / avg(sum by (shard) (fanroute_router_topics{{{RT}}}))",
              "topic skew"),
        ], description="1 is perfectly even; the alert fires above 2 under real traffic."),
        Panel("Fan-out sends by shard", [
            q(f"sum by (shard) (rate(fanroute_router_fanout_sends_total{{{RT}}}[{RATE}]))", "{{shard}}"),
        ], "ops", stack=True),
        Panel("Publications by shard", [
            q(f"sum by (shard) (rate(fanroute_router_publications_total{{{RT}}}[{RATE}]))", "{{shard}}"),
        ], "ops", stack=True),
        Panel("Topics and interest by shard", [
            q(f"sum by (shard) (fanroute_router_topics{{{RT}}})", "{{shard}} topics"),
            q(f"sum by (shard) (fanroute_router_interest_entries{{{RT}}})", "{{shard}} interest"),
        ]),
        Panel("History held by shard", [
            q(f"sum by (shard) (fanroute_router_history_messages{{{RT}}})", "{{shard}}"),
        ]),
        Panel("Gateways known by shard", [
            q(f"sum by (shard) (fanroute_router_gateways{{{RT}}})", "{{shard}}"),
            q(f"sum by (shard) (increase(fanroute_router_gateways_forgotten_total{{{RT}}}[{RATE}]))", "{{shard}} forgotten"),
        ]),
        Panel("Batch size (frames per nng message)", quantiles("fanroute_router_batch_frames", RT), "short"),
    ]),
    # Each topic's stream lives on `copies` routers (router/REPLICATION.md). In a healthy
    # cluster nothing is on a single copy, nothing is behind or refused, and every router
    # shows the same view number and is ready.
    ("Replication", [
        Panel("Topics on a single copy", [
            q(f"sum by (shard) (fanroute_router_topics_single_copy{{{RT}}})", "{{shard}}"),
        ], stack=True, description="Topics whose current view has one copy: losing that router starts them "
                                   "in a new epoch. Zero unless routers are missing or --copies is 1."),
        Panel("Copies behind", [
            q(f"sum by (shard) (fanroute_router_copies_behind{{{RT}}})", "{{shard}}"),
        ], stack=True, description="Appends a leader is still waiting for a copy to hold; publications "
                                   "are acknowledged only once every copy has them."),
        Panel("Publications refused for safety", [
            q(f"sum by (shard) (rate(fanroute_router_refused_unsafe_total{{{RT}}}[{RATE}]))", "{{shard}}"),
        ], "ops", stack=True, description="Answered unavailable because the router had no lease or no view. "
                                          "A blip during a failover; sustained, a majority of routers is missing."),
        Panel("Failovers and hand-offs", [
            q(f"sum by (shard) (rate(fanroute_router_failovers_total{{{RT}}}[{RATE}]))", "{{shard}} failovers"),
            q(f"sum by (shard) (rate(fanroute_router_handoffs_total{{{RT}}}[{RATE}]))", "{{shard}} hand-offs"),
        ], "ops", width=12, description="Failovers: views that moved topics away from a router that vanished "
                                        "(crash, cut off). Hand-offs: views after a router left on SIGTERM "
                                        "(rolling upgrade, drain)."),
        Panel("Re-sync bytes", [
            q(f"sum by (shard) (rate(fanroute_router_resync_bytes_total{{{RT}}}[{RATE}]))", "{{shard}}"),
        ], "Bps", width=12, stack=True, description="Stream bytes sent to copies catching up after a view change."),
        Panel("View number by router", [
            q(f"max by (shard) (fanroute_router_view{{{RT}}})", "{{shard}}"),
        ], width=12, description="The installed view; every router shows the same number once a view "
                                 "change is over. A router lower than the others has not joined it."),
        Panel("Ready by router", [
            q(f"min by (shard) (fanroute_router_ready{{{RT}}})", "{{shard}}"),
        ], width=12, description="1 once the router is a member of the installed view and caught up "
                                 "(its /readyz); a rolling upgrade waits for it.", extra={"min": 0, "max": 1}),
    ]),
    ("Slow consumers and drops", [
        Panel("Slow-consumer closes", [
            q(f"sum by (pod, instance) (rate(fanroute_gateway_slow_consumer_closes_total{{{GW}}}[{RATE}]))", "{{pod}} {{instance}}"),
        ], "cps", description="Closed with 4008: the connection's outbound buffer overflowed."),
        Panel("Bytes waiting in outbound buffers", [
            q(f"sum by (pod, instance) (fanroute_gateway_outbox_bytes{{{GW}}})", "{{pod}} {{instance}}"),
        ], "bytes", stack=True),
        Panel("Dropped or rejected", [
            q(f"sum(rate(fanroute_gateway_deliveries_unrouted_total{{{GW}}}[{RATE}]))", "unrouted deliveries"),
            q(f"sum(rate(fanroute_gateway_wire_frames_rejected_total{{{GW}}}[{RATE}]))", "bad frames at gateways"),
            q(f"sum(rate(fanroute_router_wire_frames_rejected_total{{{RT}}}[{RATE}]))", "bad frames at shards"),
            q(f"sum(rate(fanroute_router_gateway_overflows_total{{{RT}}}[{RATE}]))", "gateway queue overflows"),
        ], "ops", description="Every drop is counted; all of these are zero in a healthy cluster."),
    ]),
    ("Clients: reconnects, auth and limits", [
        Panel("Reconnects", [
            q(f"sum(rate(fanroute_gateway_resumes_total{{{GW}}}[{RATE}]))", "subscriptions resumed (since)"),
            q(f"sum(rate(fanroute_gateway_connections_opened_total{{{GW}}}[{RATE}]))", "connections opened"),
        ], "ops", description="Clients coming back: connections opened, and subscriptions resumed from a seq. "
                              "The closes that send them back are under Closes by reason (1012 drain, 1013 limits, 4008 slow)."),
        Panel("Auth failures", [
            q(f"sum by (kind) (rate(fanroute_gateway_auth_failures_total{{{GW}}}[{RATE}]))", "{{kind}}"),
        ], "ops", stack=True),
        Panel("Limit hits", [
            q(f"sum by (limit) (rate(fanroute_gateway_limit_hits_total{{{GW}}}[{RATE}]))", "{{limit}}"),
        ], "ops", stack=True, description="Commands or connections refused by a rate or size limit."),
        Panel("HTTP publish API", [
            q(f"sum by (status) (rate(fanroute_gateway_api_requests_total{{{GW}}}[{RATE}]))", "{{status}}"),
        ], "reqps", stack=True),
    ]),
]


def _variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


VARIABLES = [
    {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "refresh": 1,
        "hide": 0,
    },
    _variable("namespace", "Namespace", 'label_values(up{job=~"fanroute-.*"}, namespace)'),
    _variable("instance", "Instance", 'label_values(up{job=~"fanroute-.*", namespace=~"$namespace"}, instance)'),
    _variable("pod", "Pod", 'label_values(up{job=~"fanroute-.*", namespace=~"$namespace"}, pod)'),
]


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict:
    targets = [
        {"datasource": DS, "expr": t.expr, "legendFormat": t.legend or "__auto", "refId": chr(ord("A") + i)}
        for i, t in enumerate(panel.queries)
    ]
    defaults: dict = {"unit": panel.unit, **panel.extra}
    out: dict = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
    }
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 10,
            "lineWidth": 1,
            "showPoints": "never",
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
        out["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    return out


def build() -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for panel in row:
            if x + panel.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(_panel_json(panel, pid, x, y))
            pid, x, row_h = pid + 1, x + panel.width, max(row_h, panel.height)
        y += row_h
    return {
        "uid": "fanroute-overview",
        "title": "fanroute",
        "description": "fanroute gateways and router shards: connections, messages, latency, shards, replication, slow consumers.",
        "tags": ["fanroute", "websocket", "pubsub"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": VARIABLES},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        stale = [str(p.relative_to(ROOT)) for p in OUTPUTS if not p.exists() or p.read_text() != text]
        if stale:
            print("stale dashboard JSON (run python ops/grafana/build_dashboard.py): " + ", ".join(stale), file=sys.stderr)
            return 1
        return 0
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
