"""The files that deploy abproxy (compose, Dockerfile, Prometheus, Grafana) and the examples:
validated against the running proxy, since no container engine runs here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from abproxy.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_two_replicas_on_one_redis_with_mlflow_prometheus_and_grafana():
    services = compose()["services"]
    assert {"redis", "mlflow", "abproxy-1", "abproxy-2", "prometheus", "grafana"} <= set(services)
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    replicas = [services["abproxy-1"], services["abproxy-2"]]
    assert replicas[0]["environment"] == replicas[1]["environment"]
    assert replicas[0]["environment"]["ABPROXY_REDIS_URL"] == "redis://redis:6379/0"
    assert replicas[0]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mlflow = services["mlflow"]
    assert "--backend-store-uri sqlite:////mlflow/db/mlflow.db" in " ".join(mlflow["command"].split())
    assert {v.split(":")[1] for v in mlflow["volumes"]} == {"/mlflow/db", "/mlflow/artifacts"}
    # Every published port is on the host's loopback only.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    for volume in ("redis-data", "mlflow-db", "mlflow-artifacts", "prometheus-data", "grafana-data"):
        assert volume in compose()["volumes"]


def test_the_compose_config_is_valid_with_the_compose_environment():
    environ = {"ABPROXY_REDIS_URL": "redis://redis:6379/0", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    config = load_config(ROOT / "config" / "abproxy.compose.yaml", environ=environ)
    assert config.redis_url == "redis://redis:6379/0"
    assert set(config.experiments) == {"translation", "sentiment"}


def test_dockerfile_copies_what_exists_and_serves_the_compose_config():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert "config/abproxy.compose.yaml" in dockerfile and "--host\", \"0.0.0.0\"" in dockerfile


def test_prometheus_scrapes_both_replicas_and_its_config_is_valid():
    config = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == ["abproxy-1:8080", "abproxy-2:8080"]
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (CI installs Debian's prometheus package)")
    result = subprocess.run(["promtool", "check", "config", str(ROOT / "config" / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard() -> dict:
    return json.loads((ROOT / "config" / "grafana" / "dashboards" / "abproxy.json").read_text())


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_folder():
    datasource = yaml.safe_load((ROOT / "config/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    uid = datasource["datasources"][0]["uid"]
    provider = yaml.safe_load((ROOT / "config/grafana/provisioning/dashboards/abproxy.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert "./config/grafana/dashboards:/var/lib/grafana/dashboards:ro" in compose()["services"]["grafana"]["volumes"]
    for panel in dashboard()["panels"]:
        assert panel["datasource"]["uid"] == uid
    # The committed JSON is what the generator writes.
    generated = subprocess.run([sys.executable, str(ROOT / "config/grafana/make_dashboard.py")],
                               capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert generated.returncode == 0
    assert json.loads((ROOT / "config/grafana/dashboards/abproxy.json").read_text()) == dashboard()


def test_dashboard_queries_use_metrics_the_proxy_exports(start_proxy, upstream, tmp_path, monkeypatch):
    """Every metric name in the dashboard's queries exists in a live /metrics exposition."""
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts under ./mlruns
    proxy = start_proxy(mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "flush_interval_s": 0})
    client = proxy.client()
    raw = client.chat.completions.with_raw_response.create(
        model="translation", messages=[{"role": "user", "content": "hi"}], user="u1", stream=False
    )
    client.chat.completions.create(model="translation", messages=[{"role": "user", "content": "hi"}], user="u2", stream=True)
    client.post("/feedback", body={"request_id": raw.headers["x-abproxy-request-id"], "score": 4}, cast_to=object)
    proxy.settle()
    request = urllib.request.Request(f"{proxy.url}/abproxy/flush", method="POST")
    urllib.request.urlopen(request, timeout=120).read()
    text = urllib.request.urlopen(f"{proxy.url}/metrics", timeout=10).read().decode()
    exported = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    for family in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = family
        exported |= {name, f"{name}_total"} if kind == "counter" else {name}
    titles = {panel["title"] for panel in dashboard()["panels"]}
    for wanted in ("Requests per second by variant", "Latency p95 (to last byte)", "Time to first token p50 / p95",
                   "Error rate by variant", "Feedback mean by variant", "Latest p-values versus the control"):
        assert wanted in titles
    used = set()
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(abproxy_[a-z_]+)", target["expr"]))
    missing = {name for name in used if name not in exported}
    assert not missing, f"the dashboard queries metrics the proxy does not export: {missing}"


def test_examples_run_against_the_proxy_and_read_the_winner_back_from_mlflow(start_proxy, upstream, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proxy = start_proxy(mlflow={"tracking_uri": tracking_uri, "flush_interval_s": 0})
    environment = {**os.environ, "ABPROXY_BASE_URL": proxy.base_url, "OPENAI_API_KEY": "sk-example"}
    app = subprocess.run([sys.executable, str(ROOT / "examples" / "app_with_feedback.py")],
                         capture_output=True, text=True, timeout=120, env=environment, cwd=tmp_path)
    assert app.returncode == 0, app.stderr
    assert app.stdout.count("'status': 'recorded'") == 3, app.stdout
    proxy.settle()
    urllib.request.urlopen(urllib.request.Request(f"{proxy.url}/abproxy/flush", method="POST"), timeout=120).read()
    compare = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compare_from_mlflow.py"), "translation", "--tracking-uri", tracking_uri],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert compare.returncode == 0, compare.stderr
    for variant in ("[basic] (control)", "[professional]"):
        assert variant in compare.stdout, compare.stdout
    assert "satisfaction:" in compare.stdout and "tokens/req:" in compare.stdout and "cost/req:" in compare.stdout
