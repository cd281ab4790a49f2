"""What a prompt engineer finds in MLflow 3's pages after a flush, read back through MLflow's own
client: the verdict at a glance (experiment tags and description), one LoggedModel per arm,
sampled requests as traces per variant, feedback on them as assessments, the numbers the verdict
used, and no new step when nothing changed. Real MLflow stores (sqlite; an ``mlflow server`` in
the slow lane), real Redis, the real openai SDK."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import openai
import pytest
from proxykit import BASE_EXPERIMENTS, make_config
from flushkit import EXP, MlflowServer, drive, flush, history, live, search
from helpers import http_json, metrics_text, sample, wait_until
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient



@pytest.fixture
def uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def traced_config(upstream_url: str, uri: str, rate: float = 1.0, **overrides: Any) -> Any:
    mlflow = {"tracking_uri": uri, "flush_interval_s": 0, "trace_sample_rate": rate}
    return make_config(upstream_url, mlflow=mlflow, **overrides)


def traced_proxy(start_proxy: Any, upstream_url: str, uri: str, **overrides: Any) -> Any:
    return start_proxy(traced_config(upstream_url, uri, **overrides), app_options={"trace_options": {"interval_s": 0.1}})


def experiment_id(uri: str, name: str = EXP) -> str:
    experiment = MlflowClient(uri).get_experiment_by_name(name)
    assert experiment is not None
    return str(experiment.experiment_id)


def traces(uri: str, filter_string: str | None = None) -> list[Any]:
    """The traces written whole (spans and trace record are two writes; a look may fall between)."""
    found = MlflowClient(uri).search_traces(locations=[experiment_id(uri)], filter_string=filter_string)
    return [trace for trace in found if "abproxy.request_id" in trace.info.tags]


@pytest.mark.slow
def test_the_verdict_is_on_the_experiment_and_each_arm_is_a_logged_model(start_proxy: Any, upstream_url: str, uri: str) -> None:
    proxy = start_proxy(make_config(upstream_url, mlflow={"tracking_uri": uri, "flush_interval_s": 0}))
    drive(proxy, {"basic": 40, "professional": 40}, "glance")
    status, body = flush(proxy)
    assert status == 200, body
    client = MlflowClient(uri)
    experiment = client.get_experiment(experiment_id(uri))
    assert experiment.tags["abproxy.status"] == "winner"
    assert experiment.tags["abproxy.winner"] == "professional"
    note = experiment.tags["mlflow.note.content"]
    assert note.startswith("**Winner: professional: feedback.satisfaction")
    assert "| professional * |" in note and "| basic (control) |" in note  # the comparison table below it
    assert f"Field *Trace name* = `{EXP}/professional`" in note  # how to read the winner's answers

    runs = {run.info.run_name: run for run in search(uri)}
    assert runs["summary"].data.tags["mlflow.note.content"] == note
    # each variant run carries its own verdict only: no experiment-wide status on a losing row
    assert "abproxy.status" not in runs["basic"].data.tags
    assert runs["basic"].data.tags["abproxy.winner"] == "false"
    assert runs["professional"].data.tags["abproxy.winner"] == "true"

    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert sorted(model.name for model in models) == ["basic", "professional"]
    by_name = {model.name: model for model in models}
    professional = by_name["professional"]
    assert professional.tags["abproxy.winner"] == "true" and by_name["basic"].tags["abproxy.winner"] == "false"
    assert professional.tags["abproxy.experiment"] == EXP
    assert professional.tags["abproxy.variant_hash"] == proxy.app.catalog.plans[EXP].arms["professional"].definition_hash
    assert professional.source_run_id == runs["professional"].info.run_id
    assert professional.params["system_prompt"] == BASE_EXPERIMENTS[EXP]["variants"]["professional"]["system_prompt"]
    assert professional.params["model"] == "gpt-4o-mini"
    assert professional.status == LoggedModelStatus.READY

    # each arm's prompt is a version of a registry prompt named after the experiment, listed on
    # the experiment's Prompts page and linked to the arm's run and LoggedModel
    (prompt,) = client.search_prompts(filter_string=f"experiment_id = '{experiment.experiment_id}'")
    assert prompt.name == EXP
    versions = {v.tags["abproxy.variant"]: v for v in client.search_prompt_versions(EXP)}
    assert sorted(versions) == ["basic", "professional"]
    assert versions["professional"].template[0] == {"role": "system", "content": professional.params["system_prompt"]}
    assert versions["professional"].model_config["model_name"] == "gpt-4o-mini"
    for name, version in versions.items():
        linked = [{"name": EXP, "version": str(version.version)}]
        assert json.loads(runs[name].data.tags["mlflow.linkedPrompts"]) == linked
        assert json.loads(by_name[name].tags["mlflow.linkedPrompts"]) == linked

    drive(proxy, {"basic": 2}, "glance-more")
    assert flush(proxy)[0] == 200  # a later flush registers nothing again
    assert len(client.search_prompt_versions(EXP)) == 2


@pytest.mark.slow
def test_mlflow_shows_the_p_values_the_verdict_used_and_no_step_without_news(start_proxy: Any, upstream_url: str, uri: str) -> None:
    proxy = start_proxy(make_config(upstream_url, mlflow={"tracking_uri": uri, "flush_interval_s": 0}))
    drive(proxy, {"basic": 40, "professional": 40}, "numbers")
    status, first = flush(proxy)
    assert status == 200, first
    result = live(proxy)
    primary = next(v for v in result["variants"] if v["name"] == "professional")["metrics"]["feedback.satisfaction"]
    run_id = first["experiments"][EXP]["runs"]["professional"]
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    # the live numbers, rounded: p-values to 3 significant digits, the rest to 4
    assert metrics["feedback.satisfaction.p_value"] == pytest.approx(primary["adjusted_p_value"], rel=5e-3)
    assert metrics["feedback.satisfaction.p_value_raw"] == pytest.approx(primary["p_value"], rel=5e-3)
    assert [metrics["feedback.satisfaction.ci_low"], metrics["feedback.satisfaction.ci_high"]] == pytest.approx(
        primary["difference_ci"], rel=5e-4
    )

    status, again = flush(proxy)  # nothing new since: no new step on any run
    assert status == 200, again
    summary = first["experiments"][EXP]["summary_run_id"]
    for run in (run_id, first["experiments"][EXP]["runs"]["basic"], summary):
        metric = "srm_p_value" if run == summary else "requests"
        assert [step for step, _ in history(uri, run, metric)] == [first["step"]]

    drive(proxy, {"basic": 1}, "numbers-more")  # news again: a new step
    status, third = flush(proxy)
    assert status == 200, third
    # professional's own count did not move, but its comparison with the control did
    assert [s for s, _ in history(uri, run_id, "feedback.satisfaction.p_value")] == [first["step"], third["step"]]


@pytest.mark.slow
def test_sampled_requests_become_traces_per_variant_with_feedback_as_assessments(
    start_proxy: Any, upstream_url: str, uri: str
) -> None:
    proxy = traced_proxy(start_proxy, upstream_url, uri)
    client = proxy.client()
    raws = {}
    for user in ("ann", "bob", "cy", "dee", "eve", "fay"):
        raw = client.chat.completions.with_raw_response.create(
            model="translation", messages=[{"role": "user", "content": f"Good morning, {user}."}], user=user
        )
        raws[user] = raw
    stream = client.chat.completions.create(
        model="translation", messages=[{"role": "user", "content": "A streamed sentence."}], user="ann", stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="translation", messages=[{"role": "user", "content": "fails"}], user="bob", extra_headers={"x-fake-status": "500"}
        )
    proxy.settle()
    assert flush(proxy)[0] == 200  # lays the experiment out; the traces were waiting for it
    wait_until(lambda: len(traces(uri)) == 8, timeout=120)

    by_request = {t.info.tags["abproxy.request_id"]: t for t in traces(uri)}
    for user, raw in raws.items():
        trace = by_request[raw.headers["x-abproxy-request-id"]]
        variant = raw.headers["x-abproxy-variant"]
        assert trace.info.tags["abproxy.variant"] == variant and trace.info.tags["abproxy.experiment"] == EXP
        assert trace.info.trace_metadata["mlflow.trace.user"] == user
        assert trace.info.state.value == "OK"
        span = trace.data.spans[0]
        sent = span.inputs["messages"]
        template = BASE_EXPERIMENTS[EXP]["variants"][variant]
        if "system_prompt" in template:
            assert sent[0] == {"role": "system", "content": template["system_prompt"]}  # as sent upstream
        assert span.outputs["choices"][0]["message"]["content"] == raw.parse().choices[0].message.content
        model_id = trace.info.trace_metadata["mlflow.modelId"]
        assert MlflowClient(uri).get_logged_model(model_id).name == variant
    streamed_trace = next(t for t in traces(uri) if t.data.spans[0].inputs.get("stream"))
    assert streamed_trace.data.spans[0].outputs["choices"][0]["message"]["content"] == streamed
    failed = [t for t in traces(uri) if t.info.state.value == "ERROR"]
    assert len(failed) == 1

    variants = {raw.headers["x-abproxy-variant"] for raw in raws.values()}
    for variant in variants:  # a variant's samples, by tag and by the trace's name (the list's first column)
        found = traces(uri, f"tags.`abproxy.variant` = '{variant}'")
        assert found and all(t.info.tags["abproxy.variant"] == variant for t in found)
        named = traces(uri, f"trace.name = '{EXP}/{variant}'")
        assert {t.info.trace_id for t in named} == {t.info.trace_id for t in found}
        assert all(t.info.tags["mlflow.traceName"] == f"{EXP}/{variant}" for t in named)
        # and by the arm's Prompt Registry version, as the version's page finds them
        (version,) = [v for v in MlflowClient(uri).search_prompt_versions(EXP) if v.tags["abproxy.variant"] == variant]
        by_prompt = traces(uri, f"prompt = '{EXP}/{version.version}'")
        assert {t.info.trace_id for t in by_prompt} == {t.info.trace_id for t in found}
        assert all(json.loads(t.info.tags["mlflow.linkedPrompts"]) == [{"name": EXP, "version": str(version.version)}] for t in found)

    rated = raws["cy"].headers["x-abproxy-request-id"]
    for score in (2, 5):  # the second score replaces the first, in the statistics and on the trace
        status, body = http_json("POST", f"{proxy.url}/v1/feedback", {"request_id": rated, "name": "satisfaction", "score": score})
        assert status == 200, body

    def assessed() -> Any:
        found = MlflowClient(uri).get_trace(by_request[rated].info.trace_id).info.assessments
        return found if found and found[-1].value == 5 else None

    assessments = wait_until(assessed, timeout=120)
    assert [(a.name, a.value, a.source.source_type, a.source.source_id) for a in assessments] == [
        ("satisfaction", 5, "HUMAN", "cy")
    ]


CUT = re.compile(r" … \[abproxy: cut to its first [\d,]+ of ([\d,]+) bytes\]$")


def whole_length(text: str) -> int:
    """How long a trace's cut input or output was, by its note."""
    match = CUT.search(text)
    assert match is not None, text[-200:]
    return int(match.group(1).replace(",", ""))


@pytest.mark.slow
def test_a_trace_keeps_a_mib_of_a_big_request_and_answer_and_the_waiting_ones_64_mib(
    start_proxy: Any, upstream_url: str, uri: str
) -> None:
    """A trace is for reading, and traces wait in the replica's memory until MLflow has their
    experiment: of a 3 MB prompt and its 3 MB answer a trace keeps a MiB each, the messages'
    shape whole and the long text cut with how long it was, and what waits is bounded by all it
    holds (it counted only the requests, so 60 MB answers stayed in memory)."""
    mlflow = {"tracking_uri": uri, "flush_interval_s": 0, "trace_sample_rate": 1.0, "max_traces_per_minute": 100_000}
    proxy = start_proxy(make_config(upstream_url, mlflow=mlflow), app_options={"trace_options": {"interval_s": 0.1}})
    client = proxy.client()
    big = [{"role": "user", "content": " ".join(["y" * 100_000] * 30)}]  # 30 words: the fake streams a word an event
    stream = client.chat.completions.create(model="translation", messages=big, user="ann", stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    raws = [client.chat.completions.with_raw_response.create(model="translation", messages=big, user="ann") for _ in range(24)]
    assert all(raw.parse().choices[0].message.content == streamed for raw in raws) and len(streamed) > 3_000_000
    proxy.settle()
    # waiting: the stream's 2 MiB (request and answer), then 3 MiB each (the JSON response too),
    # while they fit in 64 MiB: 20 of the 24
    assert sample(metrics_text(proxy.url), "abproxy_traces_dropped_total", reason="queue_full") == 4
    assert flush(proxy)[0] == 200
    wait_until(lambda: sum(1 for trace in traces(uri) if trace.data.spans) == 21, timeout=120)

    streamed_trace = next(t for t in traces(uri) if t.data.spans[0].inputs.get("stream"))
    assert streamed_trace.info.tags["abproxy.cut"] == "inputs,outputs"
    sent = streamed_trace.data.spans[0].inputs
    assert sent["model"] == "gpt-4o-mini" and sent["stream"] is True
    user_message = sent["messages"][-1]["content"]
    assert user_message.startswith("Translate") and whole_length(user_message) > 3_000_000
    answer = streamed_trace.data.spans[0].outputs["choices"][0]["message"]["content"]
    assert answer.startswith(streamed[:1000]) and whole_length(answer) == len(streamed)
    kept = next(t for t in traces(uri) if t.info.tags["abproxy.request_id"] == raws[0].headers["x-abproxy-request-id"])
    assert kept.info.tags["abproxy.cut"] == "inputs,outputs"
    response = kept.data.spans[0].outputs
    assert response["usage"]["completion_tokens"] == raws[0].parse().usage.completion_tokens  # the upstream's own JSON
    assert whole_length(response["choices"][0]["message"]["content"]) == len(streamed)
    assert kept.info.request_preview == user_message[:1000] and kept.info.response_preview == streamed[:1000]


@pytest.mark.slow
def test_traces_are_sampled_and_bounded_per_minute(start_proxy: Any, upstream_url: str, uri: str) -> None:
    mlflow = {"tracking_uri": uri, "flush_interval_s": 0, "trace_sample_rate": 1.0, "max_traces_per_minute": 5}
    proxy = start_proxy(make_config(upstream_url, mlflow=mlflow), app_options={"trace_options": {"interval_s": 0.1}})
    client = proxy.client()
    for i in range(12):
        client.chat.completions.create(model="translation", messages=[{"role": "user", "content": f"n{i}"}], user=f"u{i}")
    proxy.settle()
    assert flush(proxy)[0] == 200
    # 5 a minute, paced: a burst of one at once, then one every 15 s (12 requests in a burst: 1)
    wait_until(lambda: len(traces(uri)) >= 1, timeout=120)
    assert len(traces(uri)) == 1
    assert sample(metrics_text(proxy.url), "abproxy_traces_dropped_total", reason="rate_limited") == 11

    untraced = start_proxy(make_config(upstream_url, mlflow={"tracking_uri": uri, "flush_interval_s": 0, "trace_sample_rate": 0}))
    assert untraced.app.traces is None  # 0 turns tracing off: no writer, nothing kept per request


@pytest.mark.slow
def test_an_sqlite_stores_artifacts_sit_beside_it_whatever_the_working_directory(
    start_proxy: Any, upstream_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's default for an sqlite store is ./mlruns of whichever process creates the
    experiment: traces would follow the proxy's working directory around."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    proxy = traced_proxy(start_proxy, upstream_url, uri)
    proxy.client().chat.completions.create(model="translation", messages=[{"role": "user", "content": "hello"}], user="ann")
    proxy.settle()
    assert flush(proxy)[0] == 200
    (trace,) = wait_until(lambda: traces(uri), timeout=120)
    assert trace.data.spans  # its spans are read back from the artifact store
    location = MlflowClient(uri).get_experiment_by_name(EXP).artifact_location
    assert location == (tmp_path / "store" / "mlartifacts" / EXP).as_uri()
    assert (tmp_path / "store" / "mlartifacts" / EXP).is_dir()
    assert list(elsewhere.iterdir()) == []


def _writer_processes() -> list[int]:
    """This process's children that run MLflow's trace writes (multiprocessing's spawn)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_local_store_is_written_by_a_process_of_its_own_that_may_die(start_proxy: Any, upstream_url: str, uri: str) -> None:
    """sqlite's writes cost ~9 ms of CPU per trace: not in the proxy's process. Killed, the
    writer loses the batch it was given (counted) and the next one gets a new process."""
    others = set(_writer_processes())  # an earlier test's, still ending
    proxy = traced_proxy(start_proxy, upstream_url, uri)
    client = proxy.client()

    def send(prefix: str) -> None:
        for i in range(3):
            client.chat.completions.create(model="translation", messages=[{"role": "user", "content": f"{prefix}{i}"}], user=f"{prefix}{i}")
        proxy.settle()

    send("a")
    assert flush(proxy)[0] == 200
    wait_until(lambda: len(traces(uri)) == 3, timeout=120)
    (writer,) = set(_writer_processes()) - others
    os.kill(writer, signal.SIGKILL)
    send("b")

    def dropped() -> float:
        return sample(metrics_text(proxy.url), "abproxy_traces_dropped_total", reason="mlflow_unavailable")

    # The three may reach the writer as one batch or several (it wakes every 0.1 s): the first
    # batch goes to the dead process and is lost, any later one to a new process.
    wait_until(lambda: dropped() >= 1 and dropped() + len(traces(uri)) == 6, timeout=120)
    send("c")
    wait_until(lambda: len(traces(uri)) == 9 - dropped(), timeout=120)
    users = {t.info.trace_metadata["mlflow.trace.user"] for t in traces(uri)}
    assert {"a0", "a1", "a2", "c0", "c1", "c2"} <= users
    assert len(users - {"a0", "a1", "a2", "c0", "c1", "c2"}) == 3 - dropped()
    assert set(_writer_processes()) - others - {writer}, "a new writer process"


@pytest.mark.slow
def test_traces_waiting_behind_a_flush_at_shutdown_are_written_not_lost(start_proxy: Any, upstream_url: str, uri: str) -> None:
    """Shutdown stops the trace writer while it waits for MLflow (a flush holds it): the traces
    it had taken go back to the queue, and the last write at shutdown has them."""
    proxy = traced_proxy(start_proxy, upstream_url, uri)
    client = proxy.client()
    client.chat.completions.create(model="translation", messages=[{"role": "user", "content": "first"}], user="w0")
    proxy.settle()
    assert flush(proxy)[0] == 200
    wait_until(lambda: len(traces(uri)) == 1, timeout=120)

    mlflow_busy = proxy.app.flusher._mlflow_lock  # as a flush holds it while it writes
    proxy.running.run(mlflow_busy.acquire())
    for i in range(1, 4):
        client.chat.completions.create(model="translation", messages=[{"role": "user", "content": f"m{i}"}], user=f"w{i}")
    proxy.settle()
    wait_until(lambda: proxy.app.traces._writing == 3)  # taken from the queue, waiting for MLflow
    writer_task = next(task for task in proxy.app._background if task.get_name() == "abproxy-traces")
    stopping = threading.Thread(target=proxy.stop)
    stopping.start()
    wait_until(writer_task.done)  # shutdown stopped it as it waited
    assert proxy.app.traces.queued == 3
    proxy.running.loop.call_soon_threadsafe(mlflow_busy.release)  # the flush is done
    stopping.join(120)
    assert not stopping.is_alive()
    assert sorted(t.info.trace_metadata["mlflow.trace.user"] for t in traces(uri)) == ["w0", "w1", "w2", "w3"]


@pytest.mark.slow
def test_traces_are_dropped_and_counted_when_mlflow_is_away_and_requests_never_wait(
    start_proxy: Any, upstream_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    proxy = traced_proxy(start_proxy, upstream_url, server.url)
    client = proxy.client()
    client.chat.completions.create(model="translation", messages=[{"role": "user", "content": "first"}], user="u1")
    proxy.settle()
    assert flush(proxy)[0] == 200
    wait_until(lambda: len(traces(server.url)) == 1, timeout=120)
    server.kill()
    for i in range(5):  # answered as usual while MLflow is down
        assert client.chat.completions.create(model="translation", messages=[{"role": "user", "content": f"m{i}"}], user=f"v{i}")
    proxy.settle()
    wait_until(lambda: sample(metrics_text(proxy.url), "abproxy_traces_dropped_total", reason="mlflow_unavailable") == 5, timeout=120)


@pytest.mark.slow
def test_traces_and_models_through_an_mlflow_server(start_proxy: Any, upstream_url: str, tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        experiments = copy.deepcopy(BASE_EXPERIMENTS)
        proxy = traced_proxy(start_proxy, upstream_url, server.url, experiments=experiments)
        drive(proxy, {"basic": 3, "professional": 3}, "server")
        assert flush(proxy)[0] == 200
        wait_until(lambda: len(traces(server.url)) == 6, timeout=120)
        assert len(traces(server.url, "tags.`abproxy.variant` = 'professional'")) == 3
        models = MlflowClient(server.url).search_logged_models(experiment_ids=[experiment_id(server.url)])
        assert sorted(m.name for m in models) == ["basic", "professional"]

        def scored() -> bool:
            return all(t.info.assessments for t in traces(server.url))

        wait_until(scored, timeout=120)  # every request in drive() was rated
    finally:
        server.kill()
