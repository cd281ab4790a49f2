"""Writes config/grafana/dashboards/abproxy.json (run it after changing the panels)."""

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
BY_VARIANT = "experiment, variant"
EXPERIMENT = 'experiment="$experiment"'


def panel(panel_id, title, expressions, x, y, unit="short", kind="timeseries", legend="{{variant}}", w=12, h=8):
    targets = [
        {"refId": chr(65 + i), "expr": expr, "legendFormat": fmt, "datasource": DATASOURCE}
        for i, (expr, fmt) in enumerate(expressions if isinstance(expressions, list) else [(expressions, legend)])
    ]
    return {
        "id": panel_id,
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": targets,
    }


def histogram_quantile(q, metric):
    return (
        f"histogram_quantile({q}, sum by (le, {BY_VARIANT}) "
        f"(rate({metric}_bucket{{{EXPERIMENT}}}[$__rate_interval])))"
    )


PANELS = [
    panel(1, "Requests per second by variant",
          f"sum by ({BY_VARIANT}) (rate(abproxy_requests_total{{{EXPERIMENT}}}[$__rate_interval]))", 0, 0, "reqps"),
    panel(2, "Error rate by variant",
          f'sum by ({BY_VARIANT}) (rate(abproxy_requests_total{{{EXPERIMENT},status!~"2..|499"}}[$__rate_interval]))'
          f" / sum by ({BY_VARIANT}) (rate(abproxy_requests_total{{{EXPERIMENT}}}[$__rate_interval]))",
          12, 0, "percentunit"),
    panel(3, "Latency p95 (to last byte)", histogram_quantile(0.95, "abproxy_request_duration_seconds"), 0, 8, "s"),
    panel(4, "Time to first token p50 / p95",
          [(histogram_quantile(0.5, "abproxy_time_to_first_token_seconds"), "{{variant}} p50"),
           (histogram_quantile(0.95, "abproxy_time_to_first_token_seconds"), "{{variant}} p95")], 12, 8, "s"),
    panel(5, "Feedback mean by variant",
          f"max by ({BY_VARIANT}, name) (abproxy_feedback_mean{{{EXPERIMENT}}})", 0, 16,
          legend="{{variant}} {{name}}"),
    panel(6, "Latest p-values versus the control",
          f"max by ({BY_VARIANT}, metric) (abproxy_experiment_p_value{{{EXPERIMENT}}})", 12, 16,
          kind="table", legend="{{variant}} {{metric}}"),
    panel(7, "Winner (1 = declared winner)",
          f"max by ({BY_VARIANT}) (abproxy_experiment_winner{{{EXPERIMENT}}})", 0, 24, kind="stat"),
    panel(8, "Cost per second (USD)",
          f"sum by ({BY_VARIANT}) (rate(abproxy_cost_usd_total{{{EXPERIMENT}}}[$__rate_interval]))", 12, 24, "currencyUSD"),
    panel(9, "Tokens per second by kind",
          f"sum by ({BY_VARIANT}, kind) (rate(abproxy_tokens_total{{{EXPERIMENT}}}[$__rate_interval]))", 0, 32,
          legend="{{variant}} {{kind}}"),
    panel(10, "Recorder and flush health",
          [("sum(abproxy_recorder_buffered)", "buffered measurements"),
           ("sum(increase(abproxy_recorder_dropped_total[1h]))", "dropped (1h)"),
           ("time() - max(abproxy_flush_last_success_timestamp_seconds)", "seconds since last flush"),
           ("sum(increase(abproxy_flush_errors_total[1h]))", "flush errors (1h)")], 12, 32),
    panel(11, "Upstream errors by reason",
          "sum by (upstream, reason) (rate(abproxy_upstream_errors_total[$__rate_interval]))", 0, 40,
          legend="{{upstream}} {{reason}}", w=24),
]

DASHBOARD = {
    "uid": "abproxy",
    "title": "abproxy — prompt experiments",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "tags": ["abproxy"],
    "templating": {
        "list": [
            {
                "name": "experiment",
                "type": "query",
                "datasource": DATASOURCE,
                "query": 'label_values(abproxy_requests_total{experiment!=""}, experiment)',
                "refresh": 2,
                "current": {},
            }
        ]
    },
    "panels": PANELS,
}

if __name__ == "__main__":
    target = Path(__file__).parent / "dashboards" / "abproxy.json"
    target.write_text(json.dumps(DASHBOARD, indent=2) + "\n")
    print(f"wrote {target}")
