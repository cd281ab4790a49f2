"""MLflow going away under the flusher (SPEC §4: "a crash mid-flush, a retry, or MLflow being
down for a while loses nothing and doubles nothing"): a real ``mlflow server`` process is
SIGKILLed in the middle of a flush, or is not there yet, and the next flush must write the whole
layout — one run per arm, with its params, prompt artifacts and the numbers Redis holds."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import redis
from flushkit import EXP, MlflowServer, artifact_text, drive, flush, history, runs_by_name, search
from mlflow.tracking import MlflowClient
from helpers import assert_error_shape, wait_until

from abproxy.recording import layout


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # MLflow's client retries a refused connection with backoff for minutes by default; a
    # deployment that wants a flush to fail fast (and retry at the next interval) sets these.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A server of this test's own, not started yet: the test starts and kills it."""
    root = tmp_path / "mlflow-server"
    root.mkdir()
    server = MlflowServer(root)
    yield server
    server.stop()


def counters(client: redis.Redis, proxy: Any) -> dict[str, dict[str, str]]:
    """Every arm's counters and histogram, as Redis holds them."""
    state = {}
    for plan in proxy.app.catalog.plans.values():
        for arm in plan.arms.values():
            state[layout.stats_key(plan.name, arm.arm_id)] = client.hgetall(layout.stats_key(plan.name, arm.arm_id))
            state[layout.hist_key(plan.name, arm.arm_id)] = client.hgetall(layout.hist_key(plan.name, arm.arm_id))
    return state


def variant_runs_in(db: Path) -> int:
    """Variant runs the server has committed, read straight from its sqlite store."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05) as connection:
            row = connection.execute(
                "SELECT count(*) FROM tags WHERE key = 'abproxy.role' AND value = 'variant'"
            ).fetchone()
    except sqlite3.Error:  # tables not created yet, or a write holds the lock this instant
        return 0
    return int(row[0])


def assert_failed_cleanly(status: int, body: Any) -> None:
    assert 500 <= status < 600, (status, body)
    assert_error_shape(body)
    assert "MLflow" in body["error"]["message"], body


def assert_complete(uri: str, proxy: Any, client: redis.Redis, report: dict[str, Any]) -> None:
    """The whole SPEC §4 layout, once, for every experiment of the proxy, with Redis's numbers
    logged at this flush's step."""
    mlflow_client = MlflowClient(uri)
    for name, plan in proxy.app.catalog.plans.items():
        outcome = report["experiments"][name]
        assert "error" not in outcome, outcome
        settings = plan.settings
        runs = runs_by_name(uri, name)  # asserts that no run name is there twice
        assert set(runs) == {"summary", *plan.arms}, sorted(runs)
        summary = runs["summary"]
        assert summary.info.run_id == outcome["summary_run_id"]
        assert summary.data.tags["abproxy.role"] == "summary"
        assert summary.data.tags["abproxy.status"] == outcome["status"]
        assert summary.data.tags["abproxy.winner"] == (outcome["winner"] or "none")
        summary_files = {a.path for a in mlflow_client.list_artifacts(summary.info.run_id)}
        assert {"report.json", "report.md"} <= summary_files, summary_files
        for variant, arm in plan.arms.items():
            found = search(uri, f"tags.`abproxy.variant` = '{variant}'", experiment=name)
            assert len(found) == 1, f"{name}/{variant} has {len(found)} runs"
            run = found[0]
            assert run.info.run_id == outcome["runs"][variant]
            tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
            assert tags["abproxy.experiment"] == name
            assert tags["abproxy.role"] == "variant"
            assert tags["abproxy.control"] == ("true" if variant == settings.control_name else "false")
            assert tags["abproxy.variant_hash"] == arm.definition_hash
            assert tags["abproxy.winner"] == ("true" if outcome["winner"] == variant else "false")
            assert "mlflow.parentRunId" not in tags
            definition = settings.variants[variant]
            assert params.get("model") == definition.model, f"{name}/{variant} lacks its params: {params}"
            assert params.get("upstream") == arm.upstream
            assert float(params["weight"]) == definition.weight
            for key, value in definition.params.items():
                assert params[f"params.{key}"] == str(value)
            prompts = {
                field: text
                for field, text in (
                    ("system_prompt", definition.system_prompt),
                    ("user_template", definition.user_template),
                )
                if text is not None
            }
            files = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "prompt")}
            assert files == {f"prompt/{field}.txt" for field in prompts}, f"{name}/{variant} artifacts: {files}"
            for field, text in prompts.items():
                assert params[field] == text
                assert artifact_text(uri, run.info.run_id, f"prompt/{field}.txt") == text
            held = client.hgetall(layout.stats_key(name, arm.arm_id))
            requests = int(held.get("requests", 0))
            assert metrics["requests"] == requests
            assert history(uri, run.info.run_id, "requests")[-1] == (report["step"], requests)
            for feedback in settings.feedback:
                assert metrics[f"feedback.{feedback}.n"] == float(held.get(f"feedback.{feedback}|n", 0))


@pytest.mark.slow
def test_mlflow_server_killed_mid_flush_then_the_next_flush_is_complete(
    start_proxy: Any, redis_client: redis.Redis, mlflow_server: MlflowServer
) -> None:
    mlflow_server.start()
    proxy = start_proxy(mlflow={"tracking_uri": mlflow_server.url, "flush_interval_s": 0})
    posted = drive(proxy, {"basic": 40, "professional": 40}, "killed")
    assert posted == {"basic": 40, "professional": 40}
    before = counters(redis_client, proxy)

    answer: list[tuple[int, Any]] = []
    flushing = threading.Thread(target=lambda: answer.append(flush(proxy)))
    flushing.start()
    # SIGKILL as soon as the first variant run is committed: the summary run and one variant
    # run exist, the rest of the layout (its params and artifacts, the other runs) does not yet.
    deadline = time.monotonic() + 120
    while variant_runs_in(mlflow_server.db) == 0:
        assert flushing.is_alive(), f"the flush ended before it created a run: {answer}"
        assert time.monotonic() < deadline, "no variant run within 120 s"
        time.sleep(0.001)
    mlflow_server.kill()
    flushing.join(60)
    assert not flushing.is_alive()
    assert_failed_cleanly(*answer[0])
    assert counters(redis_client, proxy) == before  # nothing lost, nothing counted twice
    assert redis_client.hgetall(layout.runs_key(EXP)) == {}  # no run ids of a flush that failed

    print(f"\nmlflow server restarted in {mlflow_server.start():.1f}s")
    status, report = flush(proxy)
    assert status == 200, report
    assert report["experiments"][EXP]["winner"] == "professional"
    assert_complete(mlflow_server.url, proxy, redis_client, report)
    winners = search(mlflow_server.url, "tags.`abproxy.winner` = 'true'")
    assert [r.info.run_id for r in winners] == [report["experiments"][EXP]["runs"]["professional"]]
    assert counters(redis_client, proxy) == before


@pytest.mark.slow
def test_an_mlflow_server_that_comes_up_later_gets_the_whole_layout_from_the_same_proxy(
    start_proxy: Any, redis_client: redis.Redis, mlflow_server: MlflowServer
) -> None:
    proxy = start_proxy(mlflow={"tracking_uri": mlflow_server.url, "flush_interval_s": 0})
    drive(proxy, {"basic": 35, "professional": 35}, "later")
    before = counters(redis_client, proxy)
    assert_failed_cleanly(*flush(proxy))
    assert counters(redis_client, proxy) == before

    mlflow_server.start()
    status, report = flush(proxy)
    assert status == 200, report
    assert report["experiments"][EXP]["winner"] == "professional"
    assert_complete(mlflow_server.url, proxy, redis_client, report)


@pytest.mark.slow
def test_credentials_in_the_tracking_uri_are_used_but_never_stored_or_shown(
    start_proxy: Any, redis_client: redis.Redis, mlflow_server: MlflowServer
) -> None:
    mlflow_server.start()
    with_credentials = mlflow_server.url.replace("http://", "http://flusher:s3cret-token@")
    proxy = start_proxy(mlflow={"tracking_uri": with_credentials, "flush_interval_s": 0})
    drive(proxy, {"basic": 20, "professional": 20}, "creds")
    status, report = flush(proxy)
    assert status == 200, report
    assert_complete(mlflow_server.url, proxy, redis_client, report)
    assert "s3cret" not in str(report)
    address = redis_client.connection_pool.connection_kwargs
    raw = redis.Redis(host=address["host"], port=address["port"])  # bytes: per-unit totals are MessagePack
    for key in raw.scan_iter(b"abproxy:*"):
        kind = raw.type(key)
        stored = raw.hgetall(key) if kind == b"hash" else raw.get(key) if kind == b"string" else b""
        assert b"s3cret" not in repr(stored).encode(), key
    runs = redis_client.hgetall(layout.runs_key(EXP))
    assert runs["tracking_uri"] == mlflow_server.url.replace("http://", "http://***@")


@pytest.mark.slow
def test_the_periodic_flush_logs_one_line_per_failure_with_the_reason(
    tmp_path: Path, redis_server: Any, redis_client: Any, upstream_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxykit import BASE_EXPERIMENTS
    from helpers import ServeProcess, free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{free_port()}"
    config = {
        "redis_url": redis_server.url,
        "mlflow": {"tracking_uri": dead, "flush_interval_s": 0.3, "trace_sample_rate": 0},
        "upstreams": {"fake": {"base_url": upstream_url}},
        "default_upstream": "fake",
        "experiments": BASE_EXPERIMENTS,
    }
    serve = ServeProcess(tmp_path, config)

    def failed_flushes() -> list[str]:
        return [line for line in serve.log().splitlines() if "abproxy.tracking" in line]

    try:
        lines = wait_until(lambda: len(failed_flushes()) >= 3 and failed_flushes(), timeout=60, interval=0.2)
    finally:
        serve.kill()
    assert "Traceback" not in serve.log()
    for line in lines:  # one per failed flush, whatever the number of experiments
        assert "flush to MLflow failed: " in line and line.endswith("; retrying next interval"), line
        assert "Connection refused" in line or "Max retries" in line, line


def test_a_trace_writer_stuck_at_shutdown_is_ended_not_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    """A write to a local store runs in a child process, and giving up on it at shutdown does not
    stop it there: the proxy's exit would wait for however long the store takes. The child is
    given a moment, then ended, and the log says so."""
    import multiprocessing
    import multiprocessing.connection
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from abproxy.tracking.traces import _end_child

    child = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    stuck = child.submit(time.sleep, 3600)  # a write that never returns
    queued = child.submit(time.sleep, 0)
    while not stuck.running():
        time.sleep(0.05)
    (process,) = child._processes.values()
    _end_child(child, 0.2)
    # gone (its sentinel says so: is_alive() can say "alive" of a process the executor reaped)
    assert multiprocessing.connection.wait([process.sentinel], 0)
    # The executor settles its futures in a thread of its own. (Not concurrent.futures.wait: a
    # future cancelled by the shutdown is never "notified", and wait() would sit out its timeout.)
    wait_until(queued.done)
    assert queued.cancelled() or isinstance(queued.exception(), BrokenProcessPool)  # never run
    assert "did not finish within 0.2s of shutdown: ended" in caplog.text
