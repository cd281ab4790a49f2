"""LLM judges on live traffic (docs/reference.md, "LLM judges"): a sample of answers scored by a
judge model through abproxy's own upstream client, counted per arm like feedback, deciding an
experiment on their own; judges failing in every way a judge can, and clients never noticing.
The judge model is the project's simulated one (``fake-judge``: it scores an answer by its
sentences); Redis is real, clients use the real openai SDK."""

from __future__ import annotations

import copy
from typing import Any

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from redis.asyncio import Redis
from scipy import stats

from abproxy.analysis.live import experiment_results
from abproxy.analysis.report import terminal
from abproxy.catalog import Catalog
from abproxy.config import ConfigError, parse_config
from abproxy.recording import store
from abproxy.recording.record import RequestRecord
from abproxy.recording.scores import ScoreWriter
from abproxy.simulation.fake_upstream import FakeUpstream
from abproxy.simulation.server import serve_in_thread
from abproxy.tracking.prompts import resolve_prompts
from flushkit import flush, users_for
from helpers import free_port, http_json, metrics_text, sample, wait_until
from proxykit import BASE_EXPERIMENTS, make_config, run

JUDGE_PROMPT = (
    "Rate how helpful the answer is, from 1 to 5.\n<question>{{input}}</question>\n"
    "<answer>{{output}}</answer>\nReply with JSON: {\"score\": <1-5>, \"rationale\": \"...\"}"
)


def judge(model: str = "fake-judge", **settings: Any) -> dict[str, Any]:
    return {"model": model, "prompt": JUDGE_PROMPT, "min": 1, "max": 5, "sample_rate": 1.0, "max_per_minute": 60_000, **settings}


def judged_experiment(*judges: str, **settings: Any) -> dict[str, Any]:
    """The translation experiment without user feedback, decided by its first judge: the
    professional variant's answers carry two more sentences (the fake upstream echoes them)."""
    experiment = copy.deepcopy(BASE_EXPERIMENTS["translation"])
    experiment.update(feedback={}, judges=list(judges), primary_metric=f"judge.{judges[0]}", **settings)
    experiment["variants"]["basic"]["user_template"] = "{{input}}"
    experiment["variants"]["professional"]["user_template"] = "{{input}} Mind the tone. Keep names as they are."
    return experiment


def judged_config(upstream_url: str, judges: dict[str, Any], experiment: dict[str, Any] | None = None, **overrides: Any) -> Any:
    return make_config(
        upstream_url,
        judges=judges,
        experiments={"translation": experiment or judged_experiment(*judges)},
        prices={"gpt-4o-mini": {"input": 0.15, "output": 0.60}, "fake-judge": {"input": 1.0, "output": 2.0}},
        **overrides,
    )


def ask(proxy: Any, users: list[str], stream: bool = False, **headers: str) -> list[str]:
    """One request per user (one or two sentences, alternately); the answers' texts."""
    client = proxy.client()
    answers = []
    for i, user in enumerate(users):
        content = "Say hello." if i % 2 else "Say hello. Then say goodbye."
        if stream:
            chunks = client.chat.completions.create(
                model="translation", messages=[{"role": "user", "content": content}], user=user, stream=True, extra_headers=headers
            )
            answers.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        else:
            answer = client.chat.completions.create(
                model="translation", messages=[{"role": "user", "content": content}], user=user, extra_headers=headers
            )
            answers.append(answer.choices[0].message.content)
    return answers


def live(proxy: Any) -> dict[str, Any]:
    status, body = http_json("GET", f"{proxy.url}/abproxy/experiments/translation")
    assert status == 200, body
    return body


def judge_metric(results: dict[str, Any], variant: str, metric: str = "judge.helpfulness") -> dict[str, Any] | None:
    found = next(v for v in results["variants"] if v["name"] == variant)
    return found["metrics"].get(metric)


def scored(proxy: Any, count: int) -> None:
    wait_until(lambda: proxy.app.judges.scored >= count, timeout=60)


def test_a_judge_alone_decides_the_experiment(start_proxy: Any, upstream_url: str, upstream: FakeUpstream) -> None:
    proxy = start_proxy(judged_config(upstream_url, {"helpfulness": judge()}))
    plan = proxy.app.catalog.plans["translation"]
    answers = ask(proxy, users_for(plan, "basic", 40, "jb") + users_for(plan, "professional", 40, "jp"))
    assert all(answer.startswith("Echo: Say hello.") for answer in answers), "clients get their answers as ever"
    scored(proxy, 80)
    results = live(proxy)
    basic, professional = judge_metric(results, "basic"), judge_metric(results, "professional")
    assert basic is not None and professional is not None
    # basic echoes one or two sentences (scores 1, 2), professional two more (3, 4)
    assert (basic["n"], professional["n"]) == (40, 40)
    assert basic["mean"] == pytest.approx(1.5) and professional["mean"] == pytest.approx(3.5)
    assert results["winner"] == "professional"
    assert results["primary_metric"] == "judge.helpfulness"
    text = metrics_text(proxy.url)
    assert sample(text, "abproxy_judge_requests_total", judge="helpfulness", status="scored") == 80
    assert sample(text, "abproxy_judge_cost_usd_total", judge="helpfulness") > 0
    # the judge saw the client's input and the answer, never the variant's instructions
    judged = [r.json for r in upstream.received if r.json and r.json.get("model") == "fake-judge"]
    assert len(judged) == 80
    assert all(r["temperature"] == 0 and r["response_format"] == {"type": "json_object"} for r in judged)
    prompts = [r["messages"][0]["content"] for r in judged]
    assert not any("ten years of experience" in p for p in prompts)
    assert all("<question>Say hello." in p and "</question>" in p for p in prompts)
    # judge calls are the judge's cost, not an arm's
    proxied = [r.json for r in upstream.received if r.json and r.json.get("model") == "gpt-4o-mini"]
    arm_cost = sum(sample(text, "abproxy_cost_usd_total", experiment="translation", variant=v) for v in ("basic", "professional"))
    usage_cost = sum(
        (len(" ".join(m["content"] for m in r["messages"]).split()) * 0.15 + len(("Echo: " + r["messages"][-1]["content"]).split()) * 0.60) / 1e6
        for r in proxied
    )
    assert arm_cost == pytest.approx(usage_cost)


def test_streams_are_judged_on_their_assembled_text_and_forced_requests_not_at_all(
    start_proxy: Any, upstream_url: str, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(judged_config(upstream_url, {"helpfulness": judge()}))
    plan = proxy.app.catalog.plans["translation"]
    ask(proxy, users_for(plan, "professional", 6, "js"), stream=True)
    scored(proxy, 6)
    ask(proxy, users_for(plan, "basic", 4, "jf"), **{"x-abproxy-variant": "professional"})
    proxy.settle()
    assert judge_metric(live(proxy), "professional")["mean"] == pytest.approx(3.5)
    judged = [r.json for r in upstream.received if r.json and r.json.get("model") == "fake-judge"]
    assert len(judged) == 6, "forced requests are not judged"
    assert all("Mind the tone. Keep names as they are.</answer>" in r["messages"][0]["content"] for r in judged)


def test_the_per_minute_cap_thins_the_sample(start_proxy: Any, upstream_url: str) -> None:
    proxy = start_proxy(judged_config(upstream_url, {"helpfulness": judge(max_per_minute=120)}))
    plan = proxy.app.catalog.plans["translation"]
    ask(proxy, users_for(plan, "basic", 12, "jc"))
    proxy.settle()
    # 120 a minute paced: two at once, then one every half second; 12 requests in much less
    # than that get their two (a slow machine a few more), and the rest are counted as over the
    # cap. A request's judge is counted when its call returns: wait for the last one.

    def taken_and_over() -> tuple[float, float] | None:
        text = metrics_text(proxy.url)
        taken = sample(text, "abproxy_judge_requests_total", judge="helpfulness", status="scored")
        over = sample(text, "abproxy_judge_failures_total", judge="helpfulness", reason="over_cap")
        return (taken, over) if taken + over == 12 and not proxy.app.judges.busy else None

    taken, over = wait_until(taken_and_over, timeout=60)
    assert 2 <= taken < 12 and over == 12 - taken


def test_a_sample_rate_judges_a_share_of_the_requests(start_proxy: Any, upstream_url: str) -> None:
    proxy = start_proxy(judged_config(upstream_url, {"helpfulness": judge(sample_rate=0.25)}))
    plan = proxy.app.catalog.plans["translation"]
    ask(proxy, users_for(plan, "basic", 200, "jr"))
    proxy.settle()
    wait_until(lambda: proxy.app.judges.scored and not proxy.app.judges.busy, timeout=60)
    n = judge_metric(live(proxy), "basic")
    assert n is not None and 25 <= n["n"] <= 80  # binomial(200, 0.25): 50 ± 6σ


@pytest.fixture
def slow_upstream() -> Any:
    running = serve_in_thread(FakeUpstream(latency_ms=3000))
    yield f"{running.url}/v1"
    running.stop()


def test_failing_judges_are_counted_never_recorded_and_never_felt(start_proxy: Any, upstream_url: str, slow_upstream: str) -> None:
    judges = {
        "helpfulness": judge("fake-judge-error"),
        "prose": judge("fake-judge-nonsense"),
        "generous": judge("fake-judge-out-of-range"),
        "away": judge(upstream="down"),
        "slow": judge(upstream="slow", timeout_s=0.3),
    }
    upstreams = {
        "fake": {"base_url": upstream_url, "timeout_s": 5},
        "down": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "timeout_s": 5},
        "slow": {"base_url": slow_upstream, "timeout_s": 10},
    }
    proxy = start_proxy(judged_config(upstream_url, judges, upstreams=upstreams))
    plan = proxy.app.catalog.plans["translation"]
    answers = ask(proxy, users_for(plan, "basic", 4, "jx"))
    assert all(answer.startswith("Echo: Say hello.") for answer in answers)
    expected = {"helpfulness": "http_5xx", "prose": "bad_answer", "generous": "out_of_range", "away": "unreachable", "slow": "timeout"}

    def failures() -> dict[str, float]:
        text = metrics_text(proxy.url)
        return {name: sample(text, "abproxy_judge_failures_total", judge=name, reason=reason) for name, reason in expected.items()}

    wait_until(lambda: all(count == 4 for count in failures().values()), timeout=60)
    results = live(proxy)
    for name in expected:
        metric = judge_metric(results, "basic", f"judge.{name}")
        assert metric is None or not metric.get("n"), f"{name}: a failed judgement is never a score"
    assert proxy.app.judges.scored == 0


def test_a_judged_answer_is_scored_once_however_often_it_is_written(redis_client: Any, redis_server: Any, upstream_url: str) -> None:
    """A score written again (a reply lost, a retry) replaces itself: counted once per request and judge."""
    config = judged_config(upstream_url, {"helpfulness": judge()})
    plan = Catalog(config).plans["translation"]
    arm = plan.arms["basic"].arm_id
    record = RequestRecord("translation", "basic", arm, "unit-1", False)

    async def write_twice() -> Any:
        redis = Redis.from_url(redis_server.url, decode_responses=True)
        writer = ScoreWriter(redis, config)
        first = await writer.write(plan, "req-1", record, plan.stored("judge.helpfulness"), "judge.helpfulness", 4.0)
        again = await writer.write(plan, "req-1", record, plan.stored("judge.helpfulness"), "judge.helpfulness", 4.0)
        counters = await store.read_arms(redis, "translation", [arm], plan.stored_names)
        await redis.aclose()
        return first, again, counters[arm].metrics["judge.helpfulness"].moments

    first, again, moments = run(write_twice())
    assert (first, again) == (1, 2)
    assert (moments.n, moments.mean) == (1, 4.0)


def test_an_edited_judge_starts_its_count_afresh(redis_client: Any, redis_server: Any, upstream_url: str) -> None:
    """An edited judge prompt is a new judge version: its scores are not mixed with the old one's."""
    old = judged_config(upstream_url, {"helpfulness": judge()})
    new = judged_config(upstream_url, {"helpfulness": judge(prompt=JUDGE_PROMPT + "\nBe strict.")})
    old_plan, new_plan = Catalog(old).plans["translation"], Catalog(new).plans["translation"]
    assert old_plan.stored("judge.helpfulness") != new_plan.stored("judge.helpfulness")
    same_sampling = judged_config(upstream_url, {"helpfulness": judge(sample_rate=0.5, max_per_minute=10)})
    assert Catalog(same_sampling).plans["translation"].stored("judge.helpfulness") == old_plan.stored("judge.helpfulness")
    arm = old_plan.arms["basic"].arm_id

    async def score_then_read() -> Any:
        redis = Redis.from_url(redis_server.url, decode_responses=True)
        record = RequestRecord("translation", "basic", arm, "unit-2", False)
        await ScoreWriter(redis, old).write(old_plan, "req-2", record, old_plan.stored("judge.helpfulness"), "judge.helpfulness", 5.0)
        read = [await store.read_arms(redis, "translation", [arm], plan.stored_names) for plan in (old_plan, new_plan)]
        await redis.aclose()
        return [counters[arm].metrics.get("judge.helpfulness") for counters in read]

    as_old, as_new = run(score_then_read())
    assert as_old is not None and as_old.moments.n == 1
    assert as_new is None


def test_judges_in_the_config_are_checked() -> None:
    base = {
        "upstreams": {"u": {"base_url": "http://127.0.0.1:1/v1"}},
        "default_upstream": "u",
        "judges": {"helpfulness": judge()},
        "experiments": {"e": {"judges": ["helpfulness"], "primary_metric": "judge.helpfulness", "variants": {"a": {}, "b": {}}}},
    }
    config = parse_config(base, environ={})
    assert config.experiments["e"].metric_names[-1] == "judge.helpfulness"
    assert config.experiments["e"].higher_is_better("judge.helpfulness")
    cases = [
        (("experiments", "e", "judges"), ["nobody"], "experiments.e.judges.0: unknown judge 'nobody'"),
        (("judges", "helpfulness", "prompt"), "Rate it: {{input}}", "judges.helpfulness.prompt: must contain {{output}}"),
        (("judges", "helpfulness", "max"), 0, "judges.helpfulness: max must be greater than min"),
        (("judges", "helpfulness", "sample_rate"), 2, "judges.helpfulness.sample_rate: must be <= 1"),
        (("judges", "helpfulness", "upstream"), "nowhere", "judges.helpfulness.upstream: unknown upstream 'nowhere'"),
        (("experiments", "e", "judges"), "helpfulness", "experiments.e.judges: must be a list of judge names"),
    ]
    for path, value, message in cases:
        data = copy.deepcopy(base)
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(ConfigError) as raised:
            parse_config(data, environ={})
        assert str(raised.value).startswith(message), str(raised.value)


@pytest.mark.slow
def test_judged_requests_are_traced_with_the_judges_assessment_beside_the_users(
    start_proxy: Any, upstream_url: str, tmp_path: Any
) -> None:
    """Tracing samples 0.1% of requests, yet every judged one is traced, and its score is an
    LLM_JUDGE assessment with the judge's rationale on that trace, next to the user's own
    feedback; the arms' MLflow runs carry judge.<name>, the experiment says which judge it was."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = judged_experiment("helpfulness")
    experiment["feedback"] = {"satisfaction": {"min": 1, "max": 5}}
    config = judged_config(
        upstream_url,
        {"helpfulness": judge(sample_rate=0.5)},
        experiment,
        mlflow={"tracking_uri": uri, "flush_interval_s": 0, "trace_sample_rate": 0.001},
    )
    proxy = start_proxy(config, app_options={"trace_options": {"interval_s": 0.1}})
    plan = proxy.app.catalog.plans["translation"]
    client = proxy.client()
    request_ids = {}
    for user in users_for(plan, "basic", 20, "jm") + users_for(plan, "professional", 20, "jm2"):
        raw = client.chat.completions.with_raw_response.create(
            model="translation", messages=[{"role": "user", "content": "Say hello."}], user=user
        )
        request_ids[raw.headers["x-abproxy-request-id"]] = raw.headers["x-abproxy-variant"]
    proxy.settle()
    wait_until(lambda: proxy.app.judges.scored >= 5 and not proxy.app.judges.busy, timeout=60)
    judged = proxy.app.judges.scored
    for request_id in request_ids:
        status, body = http_json("POST", f"{proxy.url}/v1/feedback", {"request_id": request_id, "name": "satisfaction", "score": 4})
        assert status == 200, body
    assert flush(proxy)[0] == 200  # lays the experiment out in MLflow; traces and scores wait for it
    tracking = MlflowClient(uri)
    experiment_id = tracking.get_experiment_by_name("translation").experiment_id

    def judged_traces() -> list[Any]:
        found = tracking.search_traces(locations=[experiment_id])
        with_judge = [t for t in found if any(a.source.source_type == "LLM_JUDGE" for a in t.info.assessments)]
        return with_judge if len(with_judge) == judged else []

    traces = wait_until(judged_traces, timeout=60)
    for trace in traces:
        variant = request_ids[trace.info.tags["abproxy.request_id"]]
        assert trace.info.tags["abproxy.variant"] == variant
        by_source = {a.source.source_type: a for a in trace.info.assessments}
        verdict = by_source["LLM_JUDGE"]
        assert verdict.name == "helpfulness" and verdict.source.source_id == "fake-judge"
        assert verdict.value == (1 if variant == "basic" else 3)
        assert verdict.rationale.startswith("The answer gives")
        assert verdict.metadata["abproxy.judge_version"] == plan.judge_version("helpfulness")
    wait_until(lambda: all(len(tracking.get_trace(t.info.trace_id).info.assessments) == 2 for t in traces), timeout=60)
    # the judge's scores filter traces as MLflow's search does: the answers it rated above 2
    rated_high = tracking.search_traces(locations=[experiment_id], filter_string="feedback.helpfulness > 2")
    assert rated_high and {t.info.tags["mlflow.traceName"] for t in rated_high} == {"translation/professional"}
    runs = {r.data.tags["abproxy.variant"]: r for r in tracking.search_runs([experiment_id]) if "abproxy.variant" in r.data.tags}
    assert runs["professional"].data.metrics["judge.helpfulness.mean"] == 3
    assert runs["basic"].data.metrics["judge.helpfulness.mean"] == 1
    tags = tracking.get_experiment(experiment_id).tags
    assert tags["abproxy.judge.helpfulness"].startswith("fake-judge, version ")


def test_scores_given_while_redis_is_away_are_written_once_it_is_back(
    start_proxy: Any, upstream_url: str, redis_server: Any
) -> None:
    proxy = start_proxy(judged_config(upstream_url, {"helpfulness": judge()}), app_options={"judge_options": {"retry_s": 0.1}})
    plan = proxy.app.catalog.plans["translation"]
    ask(proxy, users_for(plan, "basic", 2, "jo-before"))  # the scripts are loaded before the outage
    scored(proxy, 2)
    redis_server.stop()
    try:
        answers = ask(proxy, users_for(plan, "basic", 6, "jo"))
        assert len(answers) == 6, "clients are served while Redis is away"
        wait_until(lambda: proxy.app.judges.unwritten == 6, timeout=60)  # judged, waiting for Redis
        assert proxy.app.judges.scored == 2
    finally:
        redis_server.start()
    scored(proxy, 8)
    proxy.settle()
    basic = judge_metric(live(proxy), "basic")
    assert basic is not None and basic["n"] == 8
    assert sample(metrics_text(proxy.url), "abproxy_judge_failures_total", judge="helpfulness", reason="not_recorded") == 0


def test_agreement_between_a_judge_and_the_users_is_measured_where_both_scored(
    start_proxy: Any, upstream_url: str
) -> None:
    """Users rate the answers as the judge does on most requests: the live results, the report
    and the gauge show how far the judge orders answers as the users do (Spearman's ρ, checked
    against scipy on the same pairs), counted once per request however often a score is posted."""
    experiment = judged_experiment("helpfulness")
    experiment["feedback"] = {"satisfaction": {"min": 1, "max": 5}}
    proxy = start_proxy(judged_config(upstream_url, {"helpfulness": judge()}, experiment))
    plan = proxy.app.catalog.plans["translation"]
    client = proxy.client()
    pairs = []
    users = users_for(plan, "basic", 15, "ja") + users_for(plan, "professional", 15, "ja2")
    for i, user in enumerate(users):
        content = "Say hello." if i % 2 else "Say hello. Then say goodbye."
        raw = client.chat.completions.with_raw_response.create(
            model="translation", messages=[{"role": "user", "content": content}], user=user
        )
        sentences = (1 if i % 2 else 2) + (2 if raw.headers["x-abproxy-variant"] == "professional" else 0)
        user_score = min(5, sentences + (1 if i % 3 == 0 else 0))  # mostly as the judge sees it
        for score in (1, user_score):  # a first score, then the one that counts
            status, body = http_json(
                "POST", f"{proxy.url}/v1/feedback", {"request_id": raw.headers["x-abproxy-request-id"], "name": "satisfaction", "score": score}
            )
            assert status == 200, body
        pairs.append((sentences, user_score))
    scored(proxy, 30)
    agreement = live(proxy)["agreement"]
    expected = stats.spearmanr([j for j, _ in pairs], [u for _, u in pairs])
    assert agreement == [
        {"judge": "helpfulness", "feedback": "satisfaction", "n": 30,
         "spearman": pytest.approx(expected.statistic, abs=1e-6), "p_value": pytest.approx(expected.pvalue, rel=1e-5)}
    ]  # fmt: skip

    async def report() -> str:
        async with Redis.from_url(proxy.app.redis_url, decode_responses=True) as redis:
            return terminal(await experiment_results(redis, proxy.app.config, plan))

    assert f"judge helpfulness against feedback satisfaction: Spearman rank correlation {expected.statistic:+.2f}" in run(report())


@pytest.mark.slow
def test_a_judges_prompt_from_the_prompt_registry_is_loaded_and_versioned(tmp_path: Any, upstream_url: str) -> None:
    """A judge's prompt may live in MLflow's Prompt Registry: loaded when the config loads, its URI
    and version recorded, and another version of it is another judge version."""
    uri = f"sqlite:///{tmp_path}/registry.db"
    mlflow.set_tracking_uri(uri)
    try:
        v1 = mlflow.genai.register_prompt(name="judge-helpfulness", template=JUDGE_PROMPT)
        v2 = mlflow.genai.register_prompt(name="judge-helpfulness", template=JUDGE_PROMPT + "\nBe strict.")
        mlflow.genai.register_prompt(name="judge-blind", template="Rate {{input}} from 1 to 5.")
        mlflow.genai.register_prompt(name="judge-chat", template=[{"role": "user", "content": "{{output}}"}])
    finally:
        mlflow.set_tracking_uri(None)

    def loaded(prompt: str) -> Any:
        return resolve_prompts(
            judged_config(upstream_url, {"helpfulness": judge(prompt=prompt)}, mlflow={"tracking_uri": uri})
        )

    first, second = loaded("prompts:/judge-helpfulness/1"), loaded(f"prompts:/judge-helpfulness/{v2.version}")
    assert first.judges["helpfulness"].prompt == JUDGE_PROMPT
    assert first.experiments["translation"].judges["helpfulness"].prompt == JUDGE_PROMPT
    assert f"prompts:/judge-helpfulness/1 (name=judge-helpfulness, version={v1.version})" == first.judges["helpfulness"].prompt_source
    versions = [Catalog(c).plans["translation"].judge_version("helpfulness") for c in (first, second)]
    assert versions[0] != versions[1]
    assert versions[0] == Catalog(judged_config(upstream_url, {"helpfulness": judge()})).plans["translation"].judge_version("helpfulness")
    for prompt, problem in (("prompts:/judge-blind/1", "must contain {{output}}"), ("prompts:/judge-chat/1", "is a chat prompt")):
        with pytest.raises(ConfigError) as raised:
            loaded(prompt)
        assert str(raised.value).startswith("judges.helpfulness.prompt: ") and problem in str(raised.value)
