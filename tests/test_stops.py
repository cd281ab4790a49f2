"""Harm stops an arm (issue 19): a treatment whose always-valid interval shows harm beyond a
guardrail's margin gets no new traffic on any replica — its users are served by the control and
kept out of the statistics — until an operator resumes it; the live results, Prometheus and MLflow
say so. Black-box through two replicas with the real SDK: the harmful variant's upstream is down,
so every request it serves fails."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml
from proxykit import BASE_EXPERIMENTS, make_config
from flushkit import live, users_for
from helpers import free_port, http_json, metrics_text, sample, wait_until
from mlflow.tracking import MlflowClient

from abproxy.recording import layout
from abproxy.stats.guardrails import harm_shown

EXP = "translation"


def test_harm_is_shown_only_when_the_whole_interval_lies_beyond_the_margin():
    # error_rate: lower is better, margin 1 point
    assert harm_shown((0.02, 0.09), 0.01, higher_is_better=False)
    assert not harm_shown((0.005, 0.09), 0.01, higher_is_better=False), "harm of less than the margin still possible"
    assert not harm_shown(None, 0.01, higher_is_better=False), "no interval (drift, too little data)"
    assert not harm_shown((0.02, 0.09), None, higher_is_better=False)
    # a satisfaction score: higher is better, margin 0.3
    assert harm_shown((-0.9, -0.4), 0.3, higher_is_better=True)
    assert not harm_shown((-0.9, -0.2), 0.3, higher_is_better=True)


def harmful_config(upstream_url: str, tmp_path: Path, **overrides: Any) -> Any:
    """``professional`` goes to an upstream nobody listens on: every request it serves fails,
    and ``error_rate`` is a guardrail (margin 1 point)."""
    experiments = copy.deepcopy(BASE_EXPERIMENTS)
    experiments[EXP]["guardrails"] = ["error_rate"]
    experiments[EXP]["variants"]["professional"]["upstream"] = "dead"
    experiments[EXP].update(overrides.pop("experiment", {}))
    return make_config(
        upstream_url,
        upstreams={"fake": {"base_url": upstream_url, "timeout_s": 5}, "dead": {"base_url": f"http://127.0.0.1:{free_port()}/v1"}},
        experiments=experiments,
        stats={"min_samples": 10},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "flush_interval_s": 0},
        **overrides,
    )


def ask(client: openai.OpenAI, user: str) -> tuple[int, str]:
    """One request as ``user``: its status and the variant that served it."""
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=EXP, messages=[{"role": "user", "content": "hello"}], user=user
        )
        return 200, raw.headers["x-abproxy-variant"]
    except openai.APIStatusError as error:
        return error.status_code, error.response.headers["x-abproxy-variant"]


def arm_requests(redis_client: redis.Redis, proxy: Any, variant: str) -> int:
    arm = proxy.app.catalog.plans[EXP].arms[variant].arm_id
    return int(redis_client.hget(layout.stats_key(EXP, arm), "requests") or 0)


@pytest.mark.slow
def test_a_harmful_arm_is_stopped_on_both_replicas_and_resumed(
    start_proxy: Any, redis_client: redis.Redis, upstream_url: str, tmp_path: Path
) -> None:
    config = harmful_config(upstream_url, tmp_path)
    first = start_proxy(config, app_options={"look_every_s": 0.5})
    second = start_proxy(config, app_options={"look_every_s": 3600})
    plan = first.app.catalog.plans[EXP]
    harmed = users_for(plan, "professional", 30, "harmed")
    others = users_for(plan, "basic", 30, "fine")
    client = first.client()
    for user in harmed + others:
        ask(client, user)
    first.settle()

    # nobody reads the results: the first replica's own look stops the arm, the second follows
    assert wait_until(lambda: arm_id(first, "professional") in first.app.overrides.stopped(EXP), timeout=60)
    assert wait_until(lambda: arm_id(second, "professional") in second.app.overrides.stopped(EXP), timeout=60)
    served = arm_requests(redis_client, first, "professional")
    for proxy in (first, second):
        for user in harmed[:10]:
            assert ask(proxy.client(), user) == (200, "basic"), "the control serves a stopped arm's users"
    first.settle()
    second.settle()
    assert arm_requests(redis_client, first, "professional") == served
    assert arm_requests(redis_client, first, "basic") == len(others), "and they are kept out of the statistics"

    results = live(second)
    assert results["status"] != "srm", "the stopped arm left the sample-ratio test"
    (stop,) = results["stopped"]
    assert (stop["variant"], stop["reason"]) == ("professional", "error_rate") and stop["at"].endswith("Z")
    text = metrics_text(first.url)  # the replica whose periodic look refreshes its gauges
    assert sample(text, "abproxy_variant_stopped", experiment=EXP, variant="professional") == 1
    assert sample(text, "abproxy_variant_stopped", experiment=EXP, variant="basic") == 0

    status, body = http_json("DELETE", f"{second.url}/abproxy/experiments/{EXP}/stopped/professional")
    assert status == 200 and body["resumed"] == "professional", body
    assert ask(second.client(), harmed[0]) == (502, "professional"), "at once on the replica that resumed it"
    assert wait_until(lambda: ask(first.client(), harmed[1])[1] == "professional", timeout=60), "and on the other"
    assert live(first)["stopped"] == [], "the evidence stays, but a resumed arm is not stopped again"
    status, body = http_json("DELETE", f"{second.url}/abproxy/experiments/{EXP}/stopped/professional")
    assert status == 409 and body["error"]["code"] == "not_stopped"
    status, body = http_json("DELETE", f"{second.url}/abproxy/experiments/{EXP}/stopped/nobody")
    assert status == 404


def arm_id(proxy: Any, variant: str) -> str:
    return proxy.app.catalog.plans[EXP].arms[variant].arm_id


def serve_both_arms(proxy: Any) -> tuple[Any, openai.OpenAI]:
    """30 users of each arm, each one request; the plan and the client used."""
    plan, client = proxy.app.catalog.plans[EXP], proxy.client()
    for user in users_for(plan, "professional", 30, "harmed") + users_for(plan, "basic", 30, "fine"):
        ask(client, user)
    proxy.settle()
    return plan, client


def test_stop_on_harm_false_keeps_the_arm_running(start_proxy: Any, upstream_url: str, tmp_path: Path) -> None:
    proxy = start_proxy(harmful_config(upstream_url, tmp_path, experiment={"stop_on_harm": False}))
    plan, client = serve_both_arms(proxy)
    results = live(proxy)
    assert results["stopped"] == []
    professional = next(v for v in results["variants"] if v["name"] == "professional")
    assert professional["metrics"]["error_rate"]["non_inferior"] is False
    assert ask(client, users_for(plan, "professional", 1, "later")[0]) == (502, "professional")


@pytest.mark.slow
def test_a_stopped_arm_is_tagged_in_mlflow_and_the_cli_resumes_it(
    start_proxy: Any, redis_client: redis.Redis, redis_server: Any, upstream_url: str, tmp_path: Path
) -> None:
    config = harmful_config(upstream_url, tmp_path)
    proxy = start_proxy(config)
    serve_both_arms(proxy)
    assert [stop["variant"] for stop in live(proxy)["stopped"]] == ["professional"]
    status, _ = http_json("POST", f"{proxy.url}/abproxy/flush", timeout=120)
    assert status == 200
    mlflow = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.get_experiment_by_name(EXP)
    (run,) = mlflow.search_runs([experiment.experiment_id], "tags.`abproxy.variant` = 'professional'")
    assert run.data.tags["abproxy.stopped"] == "error_rate"
    (model,) = [m for m in mlflow.search_logged_models([experiment.experiment_id]) if m.name == "professional"]
    assert model.tags["abproxy.stopped"] == "error_rate"
    assert "Stopped for harm: professional (on error_rate)" in experiment.tags["mlflow.note.content"]

    path = tmp_path / "abproxy.yaml"
    path.write_text(yaml.safe_dump({**config.model_dump(mode="json"), "redis_url": redis_server.url}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABPROXY_", "MLFLOW_TRACKING"))}
    done = subprocess.run(
        [sys.executable, "-m", "abproxy", "resume", EXP, "professional", "--config", str(path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "professional resumed" in done.stdout
    again = subprocess.run(
        [sys.executable, "-m", "abproxy", "resume", EXP, "professional", "--config", str(path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 1 and "is not stopped" in again.stderr
    assert live(proxy)["stopped"] == []
    status, _ = http_json("POST", f"{proxy.url}/abproxy/flush", timeout=120)
    assert status == 200
    (run,) = mlflow.search_runs([experiment.experiment_id], "tags.`abproxy.variant` = 'professional'")
    assert "abproxy.stopped" not in run.data.tags
    (model,) = [m for m in mlflow.search_logged_models([experiment.experiment_id]) if m.name == "professional"]
    assert "abproxy.stopped" not in model.tags
