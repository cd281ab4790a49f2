"""``abproxy flush`` and ``abproxy report`` (SPEC §6) as a user runs them: subprocesses on a
YAML config that points at the suite's Redis, next to a running proxy on the same config."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from abproxy.config import load_config
from proxykit import BASE_EXPERIMENTS
from flushkit import EXP, drive, live, runs_by_name, search


@pytest.fixture(autouse=True)
def _no_global_tracking_uri() -> Iterator[None]:
    yield
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def config_file(tmp_path: Path, redis_server: Any, upstream_url: str) -> Path:
    data = {
        "redis_url": redis_server.url,
        "data_dir": str(tmp_path / "data"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "flush_interval_s": 0},
        "upstreams": {"fake": {"base_url": upstream_url, "timeout_s": 5}},
        "default_upstream": "fake",
        "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.60}, "gpt-4o": {"input": 2.5, "output": 10.0}},
        "experiments": copy.deepcopy(BASE_EXPERIMENTS),
    }
    path = tmp_path / "abproxy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def abproxy(*args: str, cwd: Path, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ABPROXY_"))}
    return subprocess.run(
        [sys.executable, "-m", "abproxy", *args], cwd=cwd, env={**env, **(environ or {})}, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_flush_and_report_match_the_live_results(
    start_proxy: Any, config_file: Path, tmp_path: Path, redis_client: Any
) -> None:
    proxy = start_proxy(load_config(config_file, environ={}))
    drive(proxy, {"basic": 60, "professional": 60}, "cli")
    expected = live(proxy)
    assert expected["winner"] == "professional"

    # report before and after the flush: the verdict must not depend on having flushed
    report = abproxy("report", "--config", str(config_file), EXP, "--json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout) == expected

    flushed = abproxy("flush", "--config", str(config_file), cwd=tmp_path)
    assert flushed.returncode == 0, flushed.stderr
    lines = flushed.stdout.splitlines()
    assert "translation: status=winner winner=professional" in lines
    assert any(line.startswith("sentiment: status=") for line in lines)
    assert any(line.startswith("flushed 2 experiment(s)") and "(step 1," in line for line in lines), lines
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = runs_by_name(uri)
    assert set(runs) == {"summary", "basic", "professional"}
    assert [r.info.run_name for r in search(uri, "tags.`abproxy.winner` = 'true'")] == ["professional"]
    assert runs["professional"].data.metrics["requests"] == 60

    report = abproxy("report", EXP, "--config", str(config_file), "--json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    result = json.loads(report.stdout)
    assert result == live(proxy)
    assert result["status"] == "winner" and result["winner"] == "professional"
    by_name = {v["name"]: v for v in result["variants"]}
    assert set(by_name) == {"basic", "professional"}
    for name, variant in by_name.items():
        satisfaction = variant["metrics"]["feedback.satisfaction"]
        assert satisfaction["n"] == 60
        assert satisfaction["mean"] == pytest.approx(runs[name].data.metrics["feedback.satisfaction.mean"], rel=5e-4)  # MLflow: 4 digits
    assert by_name["professional"]["metrics"]["feedback.satisfaction"]["mean"] > by_name["basic"]["metrics"][
        "feedback.satisfaction"
    ]["mean"]

    table = abproxy("report", "--config", str(config_file), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    text = table.stdout
    for name in ("basic (control)", "professional *", "simple", "detailed"):
        assert name in text, text
    assert "translation: status=winner, winner=professional" in text
    assert "sentiment:" in text
    row = next(line for line in text.splitlines() if line.startswith("professional"))
    assert " 60 " in row

    everything = abproxy("report", "--json", "--config", str(config_file), cwd=tmp_path)
    assert everything.returncode == 0, everything.stderr
    assert [e["experiment"] for e in json.loads(everything.stdout)["experiments"]] == ["translation", "sentiment"]


@pytest.mark.slow
def test_cli_report_unknown_experiment_exits_1(config_file: Path, tmp_path: Path, redis_client: Any) -> None:
    result = abproxy("report", "nope", "--config", str(config_file), cwd=tmp_path)
    assert result.returncode == 1
    assert "nope" in result.stderr and "translation" in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_cli_flush_while_another_flush_runs_exits_nonzero(config_file: Path, tmp_path: Path, redis_client: Any) -> None:
    from abproxy.recording.layout import FLUSH_LOCK_KEY as LOCK_KEY

    redis_client.set(LOCK_KEY, "a-replica", px=60_000)
    result = abproxy("flush", "--config", str(config_file), cwd=tmp_path)
    assert result.returncode == 1
    assert "another flush" in result.stderr
    assert redis_client.get(LOCK_KEY) == "a-replica"


@pytest.mark.slow
def test_cli_report_and_flush_say_when_redis_is_unreachable(tmp_path):
    import subprocess
    import sys

    from helpers import free_port

    config = tmp_path / "abproxy.yaml"
    config.write_text(
        f"redis_url: redis://127.0.0.1:{free_port()}/0\n"
        "upstreams: {fake: {base_url: 'http://127.0.0.1:9/v1'}}\n"
        "default_upstream: fake\n"
        "experiments:\n"
        "  e: {variants: {a: {}, b: {}}}\n"
    )
    for verb in ("report", "flush"):
        result = subprocess.run(
            [sys.executable, "-m", "abproxy", verb, "--config", str(config)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
        assert result.returncode == 1, (verb, result.stderr)
        assert "Redis failed" in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("store", ["database", "server"])
def test_a_flush_that_mlflow_fails_says_why_in_one_line(
    store: str, config_file: Path, tmp_path: Path, redis_client: Any
) -> None:
    """A database MLflow cannot open (its driver missing, or nothing listening) fails while the
    client is built; a tracking server that is down fails each experiment. Either way the user
    reads one line with the reason, not a traceback, and not one line per experiment."""
    from helpers import free_port

    uri = {
        "database": f"postgresql://abproxy:pa55word@127.0.0.1:{free_port()}/mlflow",
        "server": f"http://127.0.0.1:{free_port()}",
    }[store]
    data = yaml.safe_load(config_file.read_text())
    data["mlflow"]["tracking_uri"] = uri
    config_file.write_text(yaml.safe_dump(data, sort_keys=False))
    result = abproxy(
        "flush", "--config", str(config_file), cwd=tmp_path, environ={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    failures = [line for line in result.stderr.splitlines() if "fail" in line.lower()]
    assert len(failures) == 1, result.stderr
    assert failures[0].startswith("abproxy: flush to MLflow failed: "), failures
    assert len(failures[0]) < 400 and "pa55word" not in result.stderr, failures
