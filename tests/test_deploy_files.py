"""The files that deploy abproxy (compose, Dockerfile, Prometheus, Grafana) and the examples:
validated against the running proxy, since no container engine runs here."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import pytest
import yaml
from flushkit import artifact_text, drive, flush, runs_by_name
from helpers import free_port
from outside_tools import REQUIRE_ENV, require_tool
from prometheus_client.parser import text_string_to_metric_families

from abproxy.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_VARIABLE = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_environment(service: str, shell: dict[str, str]) -> dict[str, str]:
    """A service's environment as compose fills in ``${NAME:-default}`` from the ``shell`` it runs in."""
    environment = compose()["services"][service]["environment"]
    return {name: COMPOSE_VARIABLE.sub(lambda m: shell.get(m[1]) or m[2], value) for name, value in environment.items()}


def compose_proxy_config(shell: dict[str, str]) -> Config:
    """What a replica serves: config/abproxy.compose.yaml read with its compose environment. Tests
    flush on demand, so the periodic flush is off."""
    config = load_config(ROOT / "config" / "abproxy.compose.yaml", environ=compose_environment("abproxy-1", shell))
    return config.model_copy(update={"mlflow": config.mlflow.model_copy(update={"flush_interval_s": 0})})


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def serving(command: list[str], ready_url: str, log: Path, env: dict[str, str]) -> Iterator[None]:
    """Run ``command`` until the block ends, from the moment ``ready_url`` answers 200."""
    with open(log, "ab") as output:
        process = subprocess.Popen(command, env=env, cwd=log.parent, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not answers(ready_url):
            assert process.poll() is None, f"{command[:3]} exited: {log.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, f"{ready_url} never answered: {log.read_text(errors='replace')[-3000:]}"
            time.sleep(0.2)
        yield
    finally:
        # MLflow's server forks workers: signal its whole process group, which is ours alone.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


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
    assert "--backend-store-uri=sqlite:////mlflow/db/mlflow.db" in mlflow["command"]
    assert {v.split(":")[1] for v in mlflow["volumes"]} == {"/mlflow/db", "/mlflow/artifacts"}
    # Every published port is on the host's loopback only.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    for volume in ("redis-data", "mlflow-db", "mlflow-artifacts", "prometheus-data", "grafana-data"):
        assert volume in compose()["volumes"]


def test_the_compose_config_is_valid_with_the_compose_environment():
    config = compose_proxy_config({"ABPROXY_METRICS_KEY": "scrape-secret"})
    assert config.redis_url == "redis://redis:6379/0"
    assert config.mlflow.tracking_uri == "http://mlflow:5000"
    assert config.server.metrics_key == "scrape-secret"
    assert set(config.experiments) == {"translation", "sentiment"}


def test_dockerfile_copies_what_exists_and_serves_the_compose_config():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert "config/abproxy.compose.yaml" in dockerfile and "--host\", \"0.0.0.0\"" in dockerfile


def test_prometheus_scrapes_both_replicas_and_its_config_is_valid(tmp_path):
    config = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == ["abproxy-1:8080", "abproxy-2:8080"]
    promtool = require_tool("promtool", "install Debian's prometheus package (.ci/run does)")
    # promtool insists that the credentials file exists; the prometheus service writes it at start.
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(ROOT / "config" / "prometheus.yml", etc / "prometheus.yml")
    (etc / config["scrape_configs"][0]["authorization"]["credentials_file"]).write_text("")
    result = subprocess.run(
        [promtool, "check", "config", str(etc / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def compose_cli() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return [require_tool("docker-compose", "apt-get install docker-compose (.ci/run does), or Docker's compose plugin")]


def test_docker_compose_accepts_the_file_and_hands_the_metrics_key_to_the_replicas_and_prometheus():
    result = subprocess.run([*compose_cli(), "--file", str(ROOT / "docker-compose.yml"), "config"],
                            env={**os.environ, "ABPROXY_METRICS_KEY": "scrape-secret"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in ("abproxy-1", "abproxy-2", "prometheus"):
        assert services[name]["environment"]["ABPROXY_METRICS_KEY"] == "scrape-secret", name
    for name in ("abproxy-1", "abproxy-2"):
        assert services[name]["depends_on"]["mlflow"]["condition"] == "service_healthy", name
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])


# --- The mlflow service, run here as compose would run it ------------------------------------


def option(command: list[str], name: str) -> str:
    return next(arg.partition("=")[2] for arg in command if arg.startswith(f"{name}="))


def mlflow_service_command(root: Path, port: int) -> list[str]:
    """The mlflow service's command from docker-compose.yml, its volumes under ``root``, listening
    on ``port`` of the loopback."""
    service = compose()["services"]["mlflow"]
    mounts = [volume.split(":")[1] for volume in service["volumes"]]
    for mount in mounts:
        (root / mount.lstrip("/")).mkdir(parents=True)
    command = []
    for arg in service["command"]:
        if arg.startswith("--host="):
            arg = "--host=127.0.0.1"
        elif arg.startswith("--port="):
            arg = f"--port={port}"
        for mount in mounts:
            arg = arg.replace(mount, f"{root}{mount}")
        command.append(arg)
    assert command[:2] == ["mlflow", "server"]
    return [sys.executable, "-m", "mlflow", *command[1:]]


@contextmanager
def mlflow_service(root: Path, command: list[str]) -> Iterator[int]:
    port = int(option(command, "--port"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # Job workers have nothing to do with Host checks and only slow the start on a shared machine.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with serving(command, f"http://127.0.0.1:{port}/health", root / "mlflow.log", env):
        yield port


def replicas_mlflow_host() -> str:
    """The Host header the replicas send to MLflow: their tracking URI's host and port."""
    return urlsplit(compose_environment("abproxy-1", {})["MLFLOW_TRACKING_URI"]).netloc


def status_with_host(port: int, host: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
        return connection.getresponse().status
    finally:
        connection.close()


def mlflow_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The mlflow service's healthcheck as docker runs it inside the container, aimed at ``port``."""
    service = compose()["services"]["mlflow"]
    kind, program, *arguments = service["healthcheck"]["test"]
    assert (kind, program) == ("CMD", "python")
    listening = f"127.0.0.1:{option(service['command'], '--port')}/"
    assert any(listening in arg for arg in arguments), "the healthcheck must probe the port MLflow listens on"
    arguments = [arg.replace(listening, f"127.0.0.1:{port}/") for arg in arguments]
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, timeout=60)


HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "content-length"}


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ComposeNetwork

    def _forward(self) -> None:
        self.server.hosts.add(self.headers["Host"])
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        target = urlsplit(self.path)
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
        try:
            upstream.request(self.command, target.path + (f"?{target.query}" if target.query else ""), body, headers)
            response = upstream.getresponse()
            payload = response.read()
        finally:
            upstream.close()
        self.send_response_only(response.status)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ComposeNetwork(ThreadingHTTPServer):
    """Stands in for the compose network, where the name ``mlflow`` reaches the MLflow container:
    an HTTP forward proxy that sends every request to the server on ``port`` with its Host header
    as the client wrote it, and notes which hosts it saw."""

    daemon_threads = True

    def __init__(self, port: int):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.port = port
        self.hosts: set[str] = set()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def reached_as_in_compose(port: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[ComposeNetwork]:
    """MLflow's client (requests) in this process goes through a ComposeNetwork to ``port``; loopback stays direct."""
    network = ComposeNetwork(port)
    threading.Thread(target=network.serve_forever, daemon=True).start()
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, network.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        yield network
    finally:
        mlflow.set_tracking_uri(None)
        network.shutdown()
        network.server_close()


def replica_flush(start_proxy: Any, upstream_url: str) -> tuple[int, Any]:
    """A replica as compose configures it, with a little traffic and feedback, flushed once."""
    proxy = start_proxy(compose_proxy_config({"OPENAI_BASE_URL": upstream_url}), socket=True)
    drive(proxy, {"basic": 2, "professional": 2}, "compose")
    return flush(proxy)


@pytest.mark.slow
def test_the_mlflow_service_takes_the_replicas_flush_by_its_compose_name_and_passes_its_healthcheck(
    start_proxy, upstream, upstream_url, tmp_path, monkeypatch
):
    tracking_uri = compose_environment("abproxy-1", {})["MLFLOW_TRACKING_URI"]
    published = compose()["services"]["mlflow"]["ports"][0].split(":")[1]
    with mlflow_service(tmp_path, mlflow_service_command(tmp_path, free_port())) as port:
        assert status_with_host(port, replicas_mlflow_host()) == 200
        # A browser on the published port is let in; an arbitrary name (DNS rebinding) is not.
        assert status_with_host(port, f"localhost:{published}") == 200
        assert status_with_host(port, f"127.0.0.1:{published}") == 200
        assert status_with_host(port, f"rebound.example:{published}") == 403
        healthcheck = mlflow_healthcheck(port)
        assert healthcheck.returncode == 0, healthcheck.stderr

        with reached_as_in_compose(port, monkeypatch) as network:
            status, report = replica_flush(start_proxy, upstream_url)
            assert status == 200, report
            runs = runs_by_name(tracking_uri)
            assert {"basic", "professional", "summary"} <= set(runs)
            # Artifacts travel through the server too (--serve-artifacts).
            assert "translation" in artifact_text(tracking_uri, runs["summary"].info.run_id, "report.md")
        assert network.hosts == {replicas_mlflow_host()}


@pytest.mark.slow
def test_without_allowed_hosts_the_mlflow_service_refuses_the_replicas_and_every_flush_fails(
    start_proxy, upstream, upstream_url, tmp_path, monkeypatch
):
    """The issue as users met it, which shows the test above can fail."""
    command = [arg for arg in mlflow_service_command(tmp_path, free_port()) if not arg.startswith("--allowed-hosts=")]
    with mlflow_service(tmp_path, command) as port:
        assert status_with_host(port, replicas_mlflow_host()) == 403
        assert mlflow_healthcheck(port).returncode == 0  # /health is exempt from the Host check
        with reached_as_in_compose(port, monkeypatch):
            status, body = replica_flush(start_proxy, upstream_url)
    assert status == 502 and body["error"]["code"] == "mlflow_unavailable", body


def test_the_mlflow_healthcheck_fails_when_nothing_answers():
    assert mlflow_healthcheck(free_port()).returncode != 0


# --- The prometheus service, run here as compose would run it --------------------------------

PROMETHEUS_PATH = re.compile(r"(?<![\w./-])(/etc/prometheus|/bin/prometheus|/prometheus)\b")


def prometheus_service_command(root: Path, port: int) -> list[str]:
    """The prometheus service's entrypoint and command from docker-compose.yml, with the image's
    paths under ``root``, Debian's prometheus for the image's, listening on ``port`` of the loopback."""
    binary = require_tool("prometheus", "install Debian's prometheus package (.ci/run does)")
    places = {"/etc/prometheus": root / "etc", "/prometheus": root / "data", "/bin/prometheus": Path(binary)}

    def here(arg: str) -> str:
        return PROMETHEUS_PATH.sub(lambda m: str(places[m[1]]), arg.replace("$$", "$"))  # $$ is compose's $

    service = compose()["services"]["prometheus"]
    return [*map(here, service["entrypoint"]), *map(here, service["command"]), f"--web.listen-address=127.0.0.1:{port}"]


def write_prometheus_config(etc: Path, target: str) -> str:
    """config/prometheus.yml scraping ``target`` every second; returns the credentials file it names."""
    config = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    job = config["scrape_configs"][0]
    job["static_configs"] = [{"targets": [target]}]
    etc.mkdir()
    (etc / "prometheus.yml").write_text(yaml.safe_dump(config))
    return job["authorization"]["credentials_file"]


def first_scrape(prometheus_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{prometheus_url}/api/v1/targets", timeout=10) as response:
            targets = json.load(response)["data"]["activeTargets"]
        if targets and targets[0]["health"] != "unknown":
            return targets[0]
        time.sleep(0.2)
    raise AssertionError(f"Prometheus never scraped its target: {targets}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("replicas_shell", "prometheus_shell", "health"),
    [
        ({"ABPROXY_METRICS_KEY": "scrape-secret"}, {"ABPROXY_METRICS_KEY": "scrape-secret"}, "up"),
        ({"ABPROXY_METRICS_KEY": "scrape-secret"}, {"ABPROXY_METRICS_KEY": "wrong-key"}, "down"),
        ({}, {}, "up"),  # no key anywhere: /metrics is open and ignores the bare Bearer Prometheus sends
        ({"ABPROXY_ADMIN_KEY": "admin-secret"}, {"ABPROXY_ADMIN_KEY": "admin-secret"}, "down"),
    ],
    ids=["metrics-key", "wrong-key", "no-keys", "admin-key-alone"],
)
def test_prometheus_scrapes_a_replica_with_the_key_compose_hands_both(
    replicas_shell, prometheus_shell, health, start_proxy, upstream_url, tmp_path
):
    proxy = start_proxy(compose_proxy_config({"OPENAI_BASE_URL": upstream_url, **replicas_shell}), socket=True)  # Prometheus scrapes it
    credentials = write_prometheus_config(tmp_path / "etc", urlsplit(proxy.url).netloc)
    port = free_port()
    env = {"PATH": os.environ["PATH"], **compose_environment("prometheus", prometheus_shell)}
    command = prometheus_service_command(tmp_path, port)
    with serving(command, f"http://127.0.0.1:{port}/-/ready", tmp_path / "prometheus.log", env):
        assert (tmp_path / "etc" / credentials).read_text() == prometheus_shell.get("ABPROXY_METRICS_KEY", "")
        target = first_scrape(f"http://127.0.0.1:{port}")
    assert target["health"] == health, target
    if health == "down":
        assert "401" in target["lastError"], target


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


@pytest.mark.slow
def test_dashboard_queries_use_metrics_the_proxy_exports(start_proxy, upstream, tmp_path, monkeypatch):
    """Every metric name in the dashboard's queries exists in a live /metrics exposition."""
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts under ./mlruns
    proxy = start_proxy(mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "flush_interval_s": 0}, socket=True)
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


@pytest.mark.slow
def test_examples_run_against_the_proxy_and_read_the_winner_back_from_mlflow(start_proxy, upstream, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proxy = start_proxy(mlflow={"tracking_uri": tracking_uri, "flush_interval_s": 0}, socket=True)  # the examples are other processes
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


# --- the tests above on a machine without the programs they run --------------------------------

NEEDS_TOOLS = (
    "test_prometheus_scrapes_both_replicas_and_its_config_is_valid",
    "test_docker_compose_accepts_the_file_and_hands_the_metrics_key_to_the_replicas_and_prometheus",
)


def _run_without_tools(tmp_path: Path, **environ: str) -> subprocess.CompletedProcess[str]:
    """The README's test command for the tests that need outside programs, on a PATH that has none."""
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ENV}
    env.update(PATH=str(Path(sys.executable).parent), **environ)
    nodes = [f"{Path(__file__).name}::{name}" for name in NEEDS_TOOLS]
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rsf", "-p", "no:cacheprovider", *nodes],
        cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_on_a_fresh_machine_tests_needing_outside_programs_skip_saying_why_and_in_ci_they_fail(tmp_path):
    fresh = _run_without_tools(tmp_path)
    assert fresh.returncode == 0, fresh.stdout[-3000:]
    assert "2 skipped" in fresh.stdout, fresh.stdout[-3000:]
    assert "promtool is missing: install Debian's prometheus package" in fresh.stdout
    assert "docker-compose is missing: apt-get install docker-compose" in fresh.stdout

    ci = _run_without_tools(tmp_path, **{REQUIRE_ENV: "1"})
    assert ci.returncode == 1, ci.stdout[-3000:]
    assert "2 failed" in ci.stdout and "promtool is missing" in ci.stdout, ci.stdout[-3000:]

    # .ci/run installs the programs and requires them for the README's test command
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    command = script.index("pip install -e '.[test]' && python -m pytest")
    assert f"export {REQUIRE_ENV}=1" in script[:command]
