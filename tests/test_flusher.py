"""The flush to MLflow (SPEC §2 ``POST /abproxy/flush``, §4 MLflow layout, §5 flush metrics):
everything is read back the way a prompt engineer would, with ``mlflow.search_runs`` and
``MlflowClient`` on the tracking URI the proxy wrote to."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import redis
import yaml
from proxykit import BASE_EXPERIMENTS, make_config
from flushkit import EXP, MlflowServer, artifact_text, drive, flush, history, live, runs_by_name, search
from helpers import assert_error_shape, free_port, http_json, metrics_text, sample, wait_until
from mlflow.tracking import MlflowClient

from abproxy.recording import layout
from abproxy.app import open_redis
from abproxy.catalog import Catalog
from abproxy.tracking.prompts import resolve_prompts
from abproxy.config import ConfigError, load_config, parse_config
from abproxy.tracking.flusher import FlushBusy, Flusher, FlushReport
from abproxy.recording.layout import FLUSH_FENCE_KEY as FENCE_KEY, FLUSH_INTERVAL_KEY as INTERVAL_KEY, FLUSH_LOCK_KEY as LOCK_KEY
from abproxy.recording.layout import LEGACY_FLUSH_FENCE_KEY
from abproxy.metrics import ProxyMetrics
from abproxy.recording.outcome import ExperimentRoute, Outcome
from abproxy.recording.recorder import Recorder

VARIANT_METRICS = (
    "requests",
    "error_rate",
    "latency_ms_mean",
    "latency_ms_p50",
    "latency_ms_p95",
    "response_chars_mean",
    "total_tokens_mean",
    "cost_usd_sum",
    "cost_usd_mean",
    "feedback.satisfaction.n",
    "feedback.satisfaction.mean",
)
TREATMENT_METRICS = ("feedback.satisfaction.lift", "feedback.satisfaction.p_value", "prob_best")


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """MLflow's local stores put artifacts under ``./mlruns`` of the working directory: keep them
    in the test's directory, and leave no global tracking URI behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def mlflow_settings(uri: str, interval: float = 0) -> dict[str, Any]:
    return {"tracking_uri": uri, "flush_interval_s": interval}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- 1. end to end -------------------------------------------------------------------------------



def flush_once(redis_url: str, config: Any, **options: Any) -> FlushReport:
    """One flush by a fresh flusher with a Redis client of its own."""

    async def flush() -> FlushReport:
        client = open_redis(redis_url)
        try:
            return await Flusher(client, config, Catalog(config), **options).flush()
        finally:
            await client.aclose()

    return run(flush())


@pytest.mark.slow
def test_flush_writes_the_mlflow_layout_and_tags_the_winner(start_proxy: Any, uri: str) -> None:
    proxy = start_proxy(mlflow=mlflow_settings(uri))
    drive(proxy, {"basic": 60, "professional": 60}, "e2e")
    # forced traffic is served but kept out of the statistics
    forced = proxy.client().chat.completions.with_raw_response.create(
        model="translation",
        messages=[{"role": "user", "content": "qa"}],
        extra_headers={"X-ABProxy-Variant": "basic"},
    )
    assert forced.headers["x-abproxy-variant"] == "basic"
    proxy.settle()
    before = live(proxy)
    assert before["status"] == "winner" and before["winner"] == "professional", before

    status, body = flush(proxy)
    assert status == 200, body
    assert body["step"] == 1
    assert set(body["experiments"]) == {"translation", "sentiment"}
    outcome = body["experiments"]["translation"]
    assert outcome["status"] == "winner" and outcome["winner"] == "professional"
    assert set(outcome["runs"]) == {"basic", "professional"}

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("translation")
    assert experiment is not None and experiment.experiment_id == outcome["mlflow_experiment_id"]
    assert client.get_experiment_by_name("sentiment") is not None

    runs = runs_by_name(uri)
    assert set(runs) == {"summary", "basic", "professional"}
    summary = runs["summary"]
    assert summary.info.run_id == outcome["summary_run_id"]
    assert summary.data.tags["abproxy.role"] == "summary"
    assert summary.data.tags["abproxy.status"] == "winner"
    assert summary.data.tags["abproxy.winner"] == "professional"
    assert summary.data.tags["abproxy.warnings"] == "none"
    assert "srm_p_value" in summary.data.metrics
    assert summary.data.metrics["srm_p_value"] == pytest.approx(before["srm"]["p_value"], rel=5e-3)  # 3 digits

    config = proxy.app.config.experiments["translation"]
    for name in ("basic", "professional"):
        run_ = runs[name]
        assert run_.info.run_id == outcome["runs"][name]
        tags, params, metrics = run_.data.tags, run_.data.params, run_.data.metrics
        assert tags["abproxy.experiment"] == "translation"
        assert tags["abproxy.variant"] == name
        assert tags["abproxy.role"] == "variant"
        assert tags["abproxy.control"] == ("true" if name == "basic" else "false")
        assert tags["abproxy.variant_hash"] == proxy.app.catalog.plans[EXP].arms[name].definition_hash
        assert "mlflow.parentRunId" not in tags  # beside the summary run: MLflow's table shows every arm
        assert params["model"] == "gpt-4o-mini"
        assert params["upstream"] == "fake"
        assert float(params["weight"]) == 1.0
        for metric in VARIANT_METRICS:
            assert metric in metrics, f"{name} run lacks metric {metric}: {sorted(metrics)}"
        variant = next(v for v in before["variants"] if v["name"] == name)
        assert metrics["requests"] == 60
        assert metrics["error_rate"] == 0
        assert metrics["feedback.satisfaction.n"] == 60
        # the live numbers, to the 4 significant digits MLflow is given
        assert metrics["feedback.satisfaction.mean"] == pytest.approx(variant["metrics"]["feedback.satisfaction"]["mean"], rel=5e-4)
        assert metrics["latency_ms_p95"] == pytest.approx(variant["metrics"]["latency_ms"]["p95"], rel=5e-4)
        assert metrics["cost_usd_sum"] == pytest.approx(
            variant["metrics"]["cost_usd"]["mean"] * variant["metrics"]["cost_usd"]["n"], rel=5e-4
        )
        assert metrics["cost_usd_sum"] > 0 and metrics["total_tokens_mean"] > 0 and metrics["response_chars_mean"] > 0
        artifacts = {a.path for a in client.list_artifacts(run_.info.run_id, "prompt")}
        assert "prompt/user_template.txt" in artifacts
        assert artifact_text(uri, run_.info.run_id, "prompt/user_template.txt") == config.variants[name].user_template
        assert params["user_template"] == config.variants[name].user_template
    basic, pro = runs["basic"].data, runs["professional"].data
    assert basic.params["params.temperature"] == "0.7" and basic.params["params.max_tokens"] == "100"
    assert pro.params["system_prompt"] == config.variants["professional"].system_prompt
    assert artifact_text(uri, runs["professional"].info.run_id, "prompt/system_prompt.txt") == (
        config.variants["professional"].system_prompt
    )
    for metric in TREATMENT_METRICS:
        assert metric in pro.metrics, f"professional run lacks {metric}"
    assert pro.metrics["feedback.satisfaction.mean"] > basic.metrics["feedback.satisfaction.mean"]
    assert pro.metrics["feedback.satisfaction.lift"] > 0
    assert pro.metrics["feedback.satisfaction.p_value"] < 0.05
    assert pro.metrics["prob_best"] > 0.95
    assert "feedback.satisfaction.lift" not in basic.metrics  # the control is not compared with itself
    assert basic.tags["abproxy.winner"] == "false" and pro.tags["abproxy.winner"] == "true"

    report = json.loads(artifact_text(uri, summary.info.run_id, "report.json"))
    assert report["winner"] == "professional" and report["status"] == "winner"
    assert [v["name"] for v in report["variants"]] == ["basic", "professional"]
    table = artifact_text(uri, summary.info.run_id, "report.md")
    assert "professional" in table and "basic" in table and "|" in table

    winners = search(uri, "tags.`abproxy.winner` = 'true'")
    assert [r.info.run_id for r in winners] == [runs["professional"].info.run_id]
    arms = search(uri, "tags.`abproxy.role` = 'variant'")
    assert {r.info.run_name for r in arms} == {"basic", "professional"}

    text = metrics_text(proxy.url)
    assert (sample(text, "abproxy_flush_last_success_timestamp_seconds") or 0) > 0
    assert (sample(text, "abproxy_flush_duration_seconds_count") or 0) == 1


# -- 2. cumulative numbers, step = flush number ------------------------------------------------------


@pytest.mark.slow
def test_flushes_relog_cumulative_numbers_on_the_same_runs(start_proxy: Any, uri: str) -> None:
    proxy = start_proxy(mlflow=mlflow_settings(uri))
    drive(proxy, {"basic": 40, "professional": 40}, "cum-a")
    status, first = flush(proxy)
    assert status == 200, first
    ids_after_first = {r.info.run_id for r in search(uri)}
    assert len(ids_after_first) == 3

    drive(proxy, {"basic": 7, "professional": 11}, "cum-b")
    status, second = flush(proxy)
    assert status == 200, second
    assert second["step"] > first["step"]
    assert second["experiments"][EXP]["runs"] == first["experiments"][EXP]["runs"]
    assert {r.info.run_id for r in search(uri)} == ids_after_first

    status, third = flush(proxy)  # no new traffic: nothing new to show, so no new step
    assert status == 200, third
    assert third["step"] > second["step"]
    assert {r.info.run_id for r in search(uri)} == ids_after_first

    steps = [first["step"], second["step"]]
    for name, totals in {"basic": (40, 47), "professional": (40, 51)}.items():
        run_id = first["experiments"][EXP]["runs"][name]
        assert history(uri, run_id, "requests") == [(steps[0], totals[0]), (steps[1], totals[1])]
        assert history(uri, run_id, "feedback.satisfaction.n") == [(steps[0], totals[0]), (steps[1], totals[1])]
        costs = [value for _, value in history(uri, run_id, "cost_usd_sum")]
        assert len(costs) == 2 and costs[0] < costs[1]
    summary_id = first["experiments"][EXP]["summary_run_id"]
    assert [step for step, _ in history(uri, summary_id, "srm_p_value")] == steps


# -- 3. an edited variant is a new arm and a new run ---------------------------------------------------


@pytest.mark.slow
def test_editing_a_variant_starts_a_new_run_and_keeps_the_old_one(start_proxy: Any, upstream_url: str, uri: str) -> None:
    proxy = start_proxy(mlflow=mlflow_settings(uri))
    drive(proxy, {"basic": 60, "professional": 60}, "edit-a")
    status, first = flush(proxy)
    assert status == 200, first
    assert first["experiments"][EXP]["winner"] == "professional"
    old_pro = first["experiments"][EXP]["runs"]["professional"]
    old_basic = first["experiments"][EXP]["runs"]["basic"]
    assert [r.info.run_id for r in search(uri, "tags.`abproxy.winner` = 'true'")] == [old_pro]
    proxy.stop()

    experiments = copy.deepcopy(BASE_EXPERIMENTS)
    experiments[EXP]["variants"]["professional"]["system_prompt"] = "You are a literary translator. Keep the tone."
    edited = start_proxy(make_config(upstream_url, mlflow=mlflow_settings(uri), experiments=experiments))
    drive(edited, {"basic": 5, "professional": 5}, "edit-b")
    status, second = flush(edited)
    assert status == 200, second
    runs = second["experiments"][EXP]["runs"]
    assert runs["basic"] == old_basic  # basic is unchanged: same arm, same run
    assert runs["professional"] != old_pro

    client = MlflowClient(uri)
    everything = search(uri)
    assert len(everything) == 4  # summary, basic, old professional, new professional
    pros = [r for r in everything if r.info.run_name == "professional"]
    assert {r.info.run_id for r in pros} == {old_pro, runs["professional"]}
    old, new = client.get_run(old_pro), client.get_run(runs["professional"])
    assert old.info.lifecycle_stage == "active"
    assert old.data.tags["abproxy.variant_hash"] != new.data.tags["abproxy.variant_hash"]
    assert new.data.tags["abproxy.variant_hash"] == edited.app.catalog.plans[EXP].arms["professional"].definition_hash
    assert new.data.params["system_prompt"] == "You are a literary translator. Keep the tone."
    assert old.data.params["system_prompt"] == BASE_EXPERIMENTS[EXP]["variants"]["professional"]["system_prompt"]
    assert old.data.tags["abproxy.winner"] == "false"
    # the old arm's numbers are kept, not mixed into the new arm
    assert old.data.metrics["requests"] == 60
    assert new.data.metrics["requests"] == 5
    assert client.get_run(old_basic).data.metrics["requests"] == 65
    assert history(uri, old_pro, "requests") == [(first["step"], 60)]
    assert new.data.tags["abproxy.experiment"] == EXP and "mlflow.parentRunId" not in new.data.tags
    assert search(uri, "tags.`abproxy.winner` = 'true'") == []


# -- 4. one flush at a time ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_held_lock_makes_manual_flush_409_and_periodic_flush_skip(
    start_proxy: Any, redis_client: redis.Redis, redis_server: Any, uri: str
) -> None:
    proxy = start_proxy(mlflow=mlflow_settings(uri))
    redis_client.set(LOCK_KEY, "someone-else", px=60_000)
    status, body = flush(proxy)
    assert status == 409, body
    assert_error_shape(body)
    assert redis_client.get(LOCK_KEY) == "someone-else"  # nobody else's lock is released

    config = proxy.app.config

    async def periodic() -> Any:
        client = open_redis(redis_server.url)
        try:
            return await Flusher(client, config, Catalog(config)).flush_if_due()
        finally:
            await client.aclose()

    assert run(periodic()) is None
    assert MlflowClient(uri).get_experiment_by_name("translation") is None  # nothing was written

    redis_client.delete(LOCK_KEY, INTERVAL_KEY)
    status, body = flush(proxy)
    assert status == 200, body
    assert redis_client.get(LOCK_KEY) is None  # released after the flush


@pytest.mark.slow
def test_two_concurrent_flushes_one_wins_the_other_is_busy(
    redis_client: redis.Redis, redis_server: Any, upstream_url: str, uri: str
) -> None:
    config = make_config(upstream_url, mlflow=mlflow_settings(uri))

    async def main() -> list[Any]:
        clients = [open_redis(redis_server.url), open_redis(redis_server.url)]
        try:
            for client in clients:
                await client.ping()
            flushers = [Flusher(client, config, Catalog(config)) for client in clients]
            return await asyncio.gather(*(f.flush() for f in flushers), return_exceptions=True)
        finally:
            for client in clients:
                await client.aclose()

    results = run(main())
    reports = [r for r in results if isinstance(r, FlushReport)]
    busy = [r for r in results if isinstance(r, FlushBusy)]
    assert len(reports) == 1 and len(busy) == 1, results
    assert reports[0].step == 1
    assert len(search(uri)) == 3  # one set of runs, not two
    assert redis_client.get(LOCK_KEY) is None


@pytest.mark.slow
def test_two_replicas_flushing_periodically_in_one_interval_flush_once(
    redis_client: redis.Redis, redis_server: Any, upstream_url: str, uri: str
) -> None:
    config = make_config(upstream_url, mlflow=mlflow_settings(uri, interval=3600))  # the round is well within it

    async def replica_round() -> list[Any]:
        clients = [open_redis(redis_server.url), open_redis(redis_server.url)]
        try:
            flushers = [Flusher(client, config, Catalog(config)) for client in clients]
            together = await asyncio.gather(*(f.flush_if_due() for f in flushers))
            later = await flushers[1].flush_if_due()  # still the same interval
            return [*together, later]
        finally:
            for client in clients:
                await client.aclose()

    results = run(replica_round())
    assert sum(1 for r in results if r is not None) == 1, results
    assert [r for r in results if r is not None][0].step == 1
    assert redis_client.get(FENCE_KEY) == "1"
    assert 0 < redis_client.pttl(INTERVAL_KEY) <= 3_600_000
    summary = next(r for r in search(uri) if r.info.run_name == "summary")
    assert len(history(uri, summary.info.run_id, "srm_p_value")) <= 1
    pro = next(r for r in search(uri) if r.info.run_name == "professional")
    assert [step for step, _ in history(uri, pro.info.run_id, "requests")] == [1]


def test_steps_go_on_from_the_fencing_token_kept_before_the_flush_keys_shared_a_hash_tag(
    redis_client: redis.Redis, redis_server: Any, upstream_url: str, uri: str
) -> None:
    """Upgrading abproxy moves the fencing token to a key of the ``{flush}`` tag: MLflow's
    steps carry on from the old count instead of starting again at 1."""
    redis_client.set(LEGACY_FLUSH_FENCE_KEY, "41")
    config = make_config(upstream_url, mlflow=mlflow_settings(uri))
    assert flush_once(redis_server.url, config).step == 42
    assert flush_once(redis_server.url, config).step == 43
    assert redis_client.get(FENCE_KEY) == "43" and redis_client.get(LEGACY_FLUSH_FENCE_KEY) is None


# -- 5. MLflow away ------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_unreachable_answers_5xx_counts_the_error_and_loses_nothing(
    start_proxy: Any, upstream_url: str, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = start_proxy(mlflow=mlflow_settings(dead))
    drive(proxy, {"basic": 40, "professional": 40}, "down")
    status, body = flush(proxy)
    assert 500 <= status < 600, body
    assert_error_shape(body)
    assert sample(metrics_text(proxy.url), "abproxy_flush_errors_total") == 1
    assert not sample(metrics_text(proxy.url), "abproxy_flush_last_success_timestamp_seconds")

    # the proxy keeps serving, and keeps counting
    drive(proxy, {"basic": 3, "professional": 2}, "down-more")
    status, body = flush(proxy)  # the lock was released: a retry fails the same way, not 409
    assert 500 <= status < 600 and status != 409, body
    assert sample(metrics_text(proxy.url), "abproxy_flush_errors_total") == 2
    proxy.stop()

    healed = start_proxy(mlflow=mlflow_settings(uri))
    status, body = flush(healed)
    assert status == 200, body
    runs = runs_by_name(uri)
    assert set(runs) == {"summary", "basic", "professional"}
    assert runs["basic"].data.metrics["requests"] == 43
    assert runs["professional"].data.metrics["requests"] == 42
    assert runs["professional"].data.metrics["feedback.satisfaction.n"] == 42
    assert runs["summary"].data.tags["abproxy.winner"] == "professional"
    assert runs["professional"].data.tags["abproxy.winner"] == "true"


# -- 4b. a crash mid-flush, a flush that lost its lock ------------------------------------------------


@pytest.mark.slow
def test_run_ids_lost_before_reaching_redis_are_found_again_not_duplicated(
    start_proxy: Any, redis_client: redis.Redis, uri: str
) -> None:
    """A crash between writing MLflow and saving the run ids in Redis: the next flush finds the
    runs by their tags and goes on logging into them."""
    proxy = start_proxy(mlflow=mlflow_settings(uri))
    drive(proxy, {"basic": 30, "professional": 30}, "crash")
    status, first = flush(proxy)
    assert status == 200, first
    redis_client.delete(layout.runs_key(EXP))

    drive(proxy, {"basic": 2, "professional": 2}, "crash-b")
    status, second = flush(proxy)
    assert status == 200, second
    assert second["experiments"][EXP]["runs"] == first["experiments"][EXP]["runs"]
    assert second["experiments"][EXP]["summary_run_id"] == first["experiments"][EXP]["summary_run_id"]
    assert len(search(uri)) == 3
    pro = first["experiments"][EXP]["runs"]["professional"]
    assert history(uri, pro, "requests") == [(first["step"], 30), (second["step"], 32)]


@pytest.mark.slow
def test_a_flush_that_lost_its_lock_keeps_no_run_ids(
    redis_client: redis.Redis, redis_server: Any, upstream_url: str, uri: str
) -> None:
    """Its run ids are not kept (a later flush may have written others); the always-valid state
    was kept by the look itself, before MLflow was written, as every look's is."""
    from abproxy.tracking.writer import MlflowWriter

    class SlowWriter(MlflowWriter):
        """Writes, and meanwhile the flush's lock expired and a later flusher took it."""

        def write(self, *args: Any, **kwargs: Any) -> Any:
            written = super().write(*args, **kwargs)
            redis_client.set(LOCK_KEY, "a-later-flusher", px=60_000)
            return written

    config = make_config(upstream_url, mlflow=mlflow_settings(uri))
    for name, mean in (("basic", 3.0), ("professional", 3.2)):
        arm = Catalog(config).plans[EXP].arms[name].arm_id
        q = 99 + 100 * mean * mean  # one request per user, sd 1
        moments = {"n": 100, "s": 100 * mean, "q": q, "uk": 100, "uyy": q, "unn": 100, "uyn": 100 * mean}
        redis_client.hset(layout.stats_key(EXP, arm), mapping={f"feedback.satisfaction|{k}": v for k, v in moments.items()})
    report = flush_once(redis_server.url, config, writer_factory=SlowWriter)
    assert report.experiments[EXP]["kept"] is False
    assert redis_client.hgetall(layout.runs_key(EXP)) == {}
    assert redis_client.hlen(layout.sequential_key(EXP)) > 0
    assert redis_client.get(LOCK_KEY) == "a-later-flusher"  # not released by the one that lost it

    redis_client.delete(LOCK_KEY)
    again = flush_once(redis_server.url, config)
    assert "kept" not in again.experiments[EXP]
    assert len(search(uri)) == 3  # the runs of the unkept flush are found again, not duplicated


@pytest.mark.slow
def test_warnings_reach_the_summary_run_as_a_tag(
    redis_client: redis.Redis, redis_server: Any, upstream_url: str, uri: str
) -> None:
    config = make_config(upstream_url, mlflow=mlflow_settings(uri))
    arm = Catalog(config).plans[EXP].arms["professional"].arm_id
    redis_client.hset(layout.stats_key(EXP, arm), mapping={"requests": 5, "feedback.satisfaction|n": "nan"})
    report = flush_once(redis_server.url, config)
    assert report.experiments[EXP]["status"] == "collecting"
    summary = runs_by_name(uri)["summary"]
    assert summary.data.tags["abproxy.warnings"] == "corrupt_counters"
    assert json.loads(artifact_text(uri, summary.info.run_id, "report.json"))["corrupt"] == [
        "professional/feedback.satisfaction|n"
    ]


# -- 5b. the MLflow side changed under the flusher ----------------------------------------------------


@pytest.mark.slow
def test_pointing_at_a_new_tracking_store_writes_complete_runs_there(
    start_proxy: Any, tmp_path: Path, uri: str
) -> None:
    """Same Redis, another MLflow (e.g. moving from a local sqlite file to the team's server):
    the new store must get the whole layout; run ids of the old store mean nothing there."""
    proxy = start_proxy(mlflow=mlflow_settings(uri))
    drive(proxy, {"basic": 40, "professional": 40}, "move")
    status, body = flush(proxy)
    assert status == 200, body
    proxy.stop()

    other = f"sqlite:///{tmp_path}/other.db"
    moved = start_proxy(mlflow=mlflow_settings(other))
    status, body = flush(moved)
    assert status == 200, body
    runs = runs_by_name(other)
    assert set(runs) == {"summary", "basic", "professional"}
    assert runs["basic"].data.metrics["requests"] == 40
    assert runs["professional"].data.tags["abproxy.winner"] == "true"
    assert len(search(uri)) == 3  # the old store is left as it was


@pytest.mark.slow
def test_a_run_deleted_in_the_mlflow_ui_does_not_wedge_the_flush(start_proxy: Any, uri: str) -> None:
    proxy = start_proxy(mlflow=mlflow_settings(uri))
    drive(proxy, {"basic": 40, "professional": 40}, "del-run")
    status, first = flush(proxy)
    assert status == 200, first
    MlflowClient(uri).delete_run(first["experiments"][EXP]["runs"]["professional"])

    drive(proxy, {"basic": 1, "professional": 1}, "del-run-b")
    status, body = flush(proxy)
    assert status == 200, body  # not "flush to MLflow failed" on every interval from now on
    active = [r for r in search(uri) if r.info.run_name == "professional"]
    assert len(active) == 1
    assert active[0].data.metrics["requests"] == 41


@pytest.mark.slow
def test_an_experiment_deleted_in_the_mlflow_ui_does_not_wedge_the_flush(start_proxy: Any, uri: str) -> None:
    proxy = start_proxy(mlflow=mlflow_settings(uri))
    drive(proxy, {"basic": 40, "professional": 40}, "del-exp")
    status, first = flush(proxy)
    assert status == 200, first
    MlflowClient(uri).delete_experiment(first["experiments"][EXP]["mlflow_experiment_id"])

    status, body = flush(proxy)
    assert status == 200, body
    runs = runs_by_name(uri)
    assert set(runs) == {"summary", "basic", "professional"}
    assert runs["professional"].data.metrics["requests"] == 40


@pytest.mark.slow
def test_mlflow_experiment_override_and_admin_key(start_proxy: Any, upstream_url: str, uri: str) -> None:
    experiments = copy.deepcopy(BASE_EXPERIMENTS)
    experiments[EXP]["mlflow_experiment"] = "abproxy/translation-v2"
    proxy = start_proxy(
        make_config(upstream_url, mlflow=mlflow_settings(uri), experiments=experiments, server={"admin_key": "adm"})
    )
    status, body = flush(proxy)
    assert status == 401, body
    assert_error_shape(body)
    status, body = http_json("POST", f"{proxy.url}/abproxy/flush", headers={"authorization": "Bearer adm"})
    assert status == 200, body
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("translation") is None
    renamed = client.get_experiment_by_name("abproxy/translation-v2")
    assert renamed is not None and renamed.experiment_id == body["experiments"][EXP]["mlflow_experiment_id"]
    names = {r.info.run_name for r in search(uri, experiment="abproxy/translation-v2")}
    assert names == {"summary", "basic", "professional"}


# -- 6. a real MLflow tracking server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a free port (sqlite backend, local artifacts), stopped at teardown."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        print(f"\nmlflow server healthy after {server.start():.1f}s")
        yield server.url
    finally:
        server.stop()


@pytest.mark.slow
def test_flush_through_a_real_mlflow_server(start_proxy: Any, mlflow_server: str) -> None:
    proxy = start_proxy(mlflow=mlflow_settings(mlflow_server))
    drive(proxy, {"basic": 60, "professional": 60}, "server")
    status, first = flush(proxy)
    assert status == 200, first
    drive(proxy, {"basic": 2, "professional": 3}, "server-b")
    status, second = flush(proxy)
    assert status == 200, second

    winners = search(mlflow_server, "tags.`abproxy.winner` = 'true'")
    assert [r.info.run_name for r in winners] == ["professional"]
    assert winners[0].info.run_id == first["experiments"][EXP]["runs"]["professional"]
    assert winners[0].data.metrics["requests"] == 63
    assert history(mlflow_server, winners[0].info.run_id, "requests") == [(first["step"], 60), (second["step"], 63)]
    runs = runs_by_name(mlflow_server)
    assert set(runs) == {"summary", "basic", "professional"}
    assert runs["summary"].data.tags["abproxy.winner"] == "professional"
    assert "mlflow.parentRunId" not in runs["professional"].data.tags
    report = json.loads(artifact_text(mlflow_server, runs["summary"].info.run_id, "report.json"))
    assert report["winner"] == "professional"
    assert artifact_text(mlflow_server, runs["professional"].info.run_id, "prompt/system_prompt.txt") == (
        BASE_EXPERIMENTS[EXP]["variants"]["professional"]["system_prompt"]
    )


# -- 7. periodic flush --------------------------------------------------------------------------------


@pytest.mark.slow
def test_periodic_flush_writes_runs_without_a_manual_call(start_proxy: Any, uri: str) -> None:
    proxy = start_proxy(mlflow=mlflow_settings(uri, interval=1))
    drive(proxy, {"basic": 4, "professional": 4}, "tick")

    def flushed_once() -> float:
        # set once a whole periodic flush (both experiments) is done; nobody asked for one
        return sample(metrics_text(proxy.url), "abproxy_flush_last_success_timestamp_seconds")

    last_success = wait_until(flushed_once, timeout=120, interval=0.1)  # MLflow's store is made by then
    assert last_success == pytest.approx(time.time(), abs=120)

    def runs_with_every_request() -> dict[str, Any] | None:
        # a flush may have looked while the requests were still arriving: the next one has them
        runs = {r.info.run_name: r for r in search(uri)}
        counted = {name: run.data.metrics.get("requests") for name, run in runs.items() if name != "summary"}
        return runs if counted == {"basic": 4, "professional": 4} else None

    runs = wait_until(runs_with_every_request, timeout=120, interval=0.5)
    assert set(runs) == {"summary", "basic", "professional"}
    assert MlflowClient(uri).get_experiment_by_name("sentiment") is not None


# -- 9. Prompt Registry ---------------------------------------------------------------------------


def _registry_config(tmp_path: Path, uri: str, upstream_url: str, system_prompts: dict[str, str]) -> Path:
    experiments = copy.deepcopy(BASE_EXPERIMENTS)
    for variant, reference in system_prompts.items():
        experiments[EXP]["variants"][variant]["system_prompt"] = reference
    data = {
        "upstreams": {"fake": {"base_url": upstream_url, "timeout_s": 5}},
        "default_upstream": "fake",
        "mlflow": mlflow_settings(uri),
        "experiments": experiments,
    }
    path = tmp_path / "abproxy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.slow
def test_prompt_registry_uris_resolve_at_load_and_reach_the_run(
    tmp_path: Path, uri: str, upstream_url: str, redis_client: redis.Redis, redis_server: Any
) -> None:
    mlflow.set_tracking_uri(uri)
    v1 = mlflow.genai.register_prompt(name="translator", template="You translate into Korean. {{input}}")
    v2 = mlflow.genai.register_prompt(name="translator", template="You translate into polite Korean. {{input}}")
    mlflow.genai.set_prompt_alias("translator", alias="production", version=v2.version)
    mlflow.set_tracking_uri(None)

    path = _registry_config(
        tmp_path, uri, upstream_url, {"basic": "prompts:/translator/1", "professional": "prompts:/translator@production"}
    )
    config = resolve_prompts(load_config(path, environ={}))
    basic = config.experiments[EXP].variants["basic"]
    pro = config.experiments[EXP].variants["professional"]
    assert basic.system_prompt == "You translate into Korean. {{input}}"
    assert pro.system_prompt == "You translate into polite Korean. {{input}}"
    assert "prompts:/translator/1" in basic.prompt_sources["system_prompt"]
    assert f"version={v1.version}" in basic.prompt_sources["system_prompt"]
    assert "prompts:/translator@production" in pro.prompt_sources["system_prompt"]
    assert f"version={v2.version}" in pro.prompt_sources["system_prompt"]

    report = flush_once(redis_server.url, config)
    runs = report.experiments[EXP]["runs"]
    client = MlflowClient(uri)
    basic_run, pro_run = client.get_run(runs["basic"]), client.get_run(runs["professional"])
    assert "prompts:/translator/1" in basic_run.data.params["prompt_registry.system_prompt"]
    assert f"version={v1.version}" in basic_run.data.params["prompt_registry.system_prompt"]
    assert "prompts:/translator@production" in pro_run.data.params["prompt_registry.system_prompt"]
    assert f"version={v2.version}" in pro_run.data.params["prompt_registry.system_prompt"]
    assert pro_run.data.params["system_prompt"] == "You translate into polite Korean. {{input}}"
    assert artifact_text(uri, runs["professional"], "prompt/system_prompt.txt") == pro.system_prompt


@pytest.mark.slow
def test_an_unknown_registry_prompt_is_a_config_error_naming_the_key(tmp_path: Path, uri: str, upstream_url: str) -> None:
    mlflow.set_tracking_uri(uri)
    mlflow.genai.register_prompt(name="translator", template="You translate into Korean. {{input}}")
    mlflow.set_tracking_uri(None)
    path = _registry_config(tmp_path, uri, upstream_url, {"professional": "prompts:/no-such-prompt/1"})
    with pytest.raises(ConfigError) as caught:
        resolve_prompts(load_config(path, environ={}))
    assert "experiments.translation.variants.professional.system_prompt" in str(caught.value)
    assert "no-such-prompt" in str(caught.value)
    path = _registry_config(tmp_path, uri, upstream_url, {"basic": "prompts:/translator/7"})
    with pytest.raises(ConfigError) as caught:
        resolve_prompts(load_config(path, environ={}))
    assert "experiments.translation.variants.basic.system_prompt" in str(caught.value)

    # `abproxy check-config` on it: exit 2 and the key's path on stderr
    checked = subprocess.run(
        [sys.executable, "-m", "abproxy", "check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 2, checked
    assert "experiments.translation.variants.basic.system_prompt" in checked.stderr


# -- 10. flush timing -------------------------------------------------------------------------------


def _big_config(upstream_url: str, uri: str) -> Any:
    experiments = {
        f"exp{e:02d}": {
            "match": {"model": f"model-{e:02d}"},
            "unit": "user",
            "feedback": {"satisfaction": {"min": 1, "max": 5}},
            "variants": {
                f"v{v}": {
                    "model": "gpt-4o-mini",
                    "params": {"temperature": v / 10},
                    "system_prompt": f"Variant {v} of experiment {e}: be helpful.",
                    "user_template": f"({v}) {{{{input}}}}",
                }
                for v in range(5)
            },
        }
        for e in range(20)
    }
    return parse_config(
        {
            "upstreams": {"fake": {"base_url": upstream_url}},
            "default_upstream": "fake",
            "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.60}},
            "mlflow": mlflow_settings(uri),
            "experiments": experiments,
        },
        environ={},
    )


async def _record_traffic(redis_url: str, config: Any, catalog: Catalog, per_arm: int, first: int = 0) -> None:
    """Counters written through the real recorder (no HTTP): ``per_arm`` requests per arm with
    a satisfaction score each, posted through the real feedback service."""
    from prometheus_client import CollectorRegistry

    from abproxy.recording.feedback import FeedbackService

    client = open_redis(redis_url)
    metrics = ProxyMetrics(CollectorRegistry())
    recorder = Recorder(client, config, catalog, metrics)
    feedback = FeedbackService(client, config, catalog, recorder.flush, metrics)
    try:
        scored: list[tuple[str, int]] = []
        for plan in catalog.plans.values():
            for index, (name, arm) in enumerate(plan.arms.items()):
                for i in range(first, first + per_arm):
                    request_id = f"{plan.name}-{name}-{i}"
                    body = {
                        "id": f"chatcmpl-{request_id}",
                        "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Echo: hello there"}}],
                        "usage": {"prompt_tokens": 12, "completion_tokens": 3 + i % 4, "total_tokens": 15 + i % 4},
                    }
                    recorder.record(
                        Outcome(
                            request_id=request_id,
                            endpoint="chat",
                            upstream="fake",
                            model="gpt-4o-mini",
                            started_at=time.time(),
                            route=ExperimentRoute(plan.name, name, arm.arm_id, f"user-{request_id}", False),
                            status=200,
                            latency_s=0.05 + 0.01 * (i % 7),
                            body=json.dumps(body).encode(),
                        )
                    )
                    scored.append((request_id, 1 + (i + index) % 5))
        assert await recorder.flush()
        for request_id, score in scored:
            await feedback.submit({"request_id": request_id, "score": score})
    finally:
        await client.aclose()


@pytest.mark.slow
def test_flush_of_20_experiments_by_5_variants_is_fast_in_steady_state(
    redis_client: redis.Redis, redis_server: Any, upstream_url: str, uri: str
) -> None:
    config = _big_config(upstream_url, uri)
    catalog = Catalog(config)
    run(_record_traffic(redis_server.url, config, catalog, per_arm=12))

    async def flushes() -> list[FlushReport]:
        client = open_redis(redis_server.url)
        try:
            flusher = Flusher(client, config, catalog)
            reports = [await flusher.flush()]
            await _record_traffic(redis_server.url, config, catalog, per_arm=3, first=12)
            reports.append(await flusher.flush())  # every arm changed: a new step on every run
            reports.append(await flusher.flush())  # nothing changed: nothing written
            return reports
        finally:
            await client.aclose()

    first, second, third = run(flushes())
    print(
        f"\nflush of 20 experiments x 5 variants to sqlite: first {first.duration_s:.2f}s, "
        f"after new traffic {second.duration_s:.2f}s, unchanged {third.duration_s:.2f}s"
    )
    assert len(first.experiments) == 20
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("exp07")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 6
    for run_ in runs:
        if run_.data.tags["abproxy.role"] == "variant":
            assert run_.data.metrics["requests"] == 15
            assert run_.data.metrics["feedback.satisfaction.n"] == 15
            assert [step for step, _ in history(uri, run_.info.run_id, "requests")] == [1, 2]


@pytest.mark.slow
def test_a_sqlite_folder_removed_after_start_is_not_created_again_by_the_flush(
    start_proxy: Any, tmp_path: Path
) -> None:
    """MLflow creates a missing folder of a sqlite database: a volume not mounted, or a folder
    removed, would then get an empty store of its own and the numbers would go there unseen."""
    folder = tmp_path / "store"
    folder.mkdir()
    proxy = start_proxy(mlflow=mlflow_settings(f"sqlite:///{folder}/mlflow.db"))
    folder.rmdir()
    status, body = flush(proxy)
    assert status == 502, body
    error = assert_error_shape(body)["message"]
    assert f"the folder {folder} of the sqlite database does not exist" in error, error
    assert not folder.exists()


# -- issue 18: MLflow's steps never go backwards, whatever Redis lost ---------------------------------


def _snapshot(url: str) -> dict[bytes, tuple[bytes, int]]:
    """Every key as Redis would restore it from an RDB file taken now: value and TTL."""
    raw = redis.Redis.from_url(url)
    try:
        return {key: (raw.dump(key), raw.pttl(key)) for key in raw.keys("*")}
    finally:
        raw.close()


def _restore(url: str, snapshot: dict[bytes, tuple[bytes, int]]) -> None:
    """Redis started again from that older RDB file: what it held then, and nothing since."""
    raw = redis.Redis.from_url(url)
    try:
        raw.flushall()
        for key, (value, ttl) in snapshot.items():
            raw.restore(key, max(ttl, 0), value, replace=True)
    finally:
        raw.close()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["flushall", "older_rdb"])
def test_after_redis_lost_data_the_next_flush_logs_after_the_last_step_in_mlflow(
    loss: str, start_proxy: Any, uri: str, redis_server: Any, redis_client: redis.Redis
) -> None:
    proxy = start_proxy(mlflow=mlflow_settings(uri))
    drive(proxy, {"basic": 3, "professional": 3}, "first")
    status, body = flush(proxy)
    assert status == 200, body
    older = _snapshot(redis_server.url)
    for round in range(3):
        drive(proxy, {"basic": 2, "professional": 2}, f"more-{round}")
        status, body = flush(proxy)
        assert status == 200, body
    last = body["step"]
    runs = body["experiments"][EXP]["runs"]
    assert history(uri, runs["basic"], "requests")[-1] == (last, 9)

    if loss == "flushall":
        redis_client.flushall()
        held = {"basic": 0, "professional": 0}
    else:
        _restore(redis_server.url, older)
        assert int(redis_client.get(FENCE_KEY)) < last
        held = {"basic": 3, "professional": 3}

    def latest_steps_show(step: int, requests: dict[str, int]) -> None:
        for name, count in requests.items():
            assert history(uri, runs[name], "requests")[-1] == (step, count), history(uri, runs[name], "requests")
            assert runs_by_name(uri)[name].data.metrics["requests"] == count  # what MLflow shows as latest

    # Nothing new since the loss: MLflow's latest numbers become what Redis holds now.
    status, body = flush(proxy)
    assert status == 200, body
    assert body["step"] > last, body
    assert body["experiments"][EXP]["runs"] == runs  # the same runs, found again by their tags
    latest_steps_show(body["step"], held)

    # New traffic after the loss: logged after it, and the fencing token caught up with MLflow.
    drive(proxy, {"basic": 4, "professional": 6}, "after")
    status, after = flush(proxy)
    assert status == 200, after
    assert after["step"] == body["step"] + 1
    latest_steps_show(after["step"], {"basic": held["basic"] + 4, "professional": held["professional"] + 6})
