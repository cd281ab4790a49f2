"""Live results keep their word (analysis/live.py, analysis/state.py, scripts.SAVE_STATE_LUA):
every look saves its always-valid state and its winner in Redis, MLflow or not, and answers from
what Redis keeps; the Lua merge is the Python one; a write Redis refuses still gets an answer;
corrupt counters are reported. Black-box, through the proxy with the real SDK: a guardrail-harmed
treatment is not crowned, a declared winner keeps its name, and with ``flush_interval_s: 0`` a
winner seen at one look is still the winner at the next."""

from __future__ import annotations

import asyncio
import copy
import itertools
import random
from collections.abc import Iterable
from typing import Any

import openai
import pytest
import redis
from proxykit import BASE_EXPERIMENTS, make_config
from flushkit import live, users_for
from helpers import free_port, http_json

from abproxy.analysis import state
from abproxy.analysis.analyse import analyse, decision_context, policy_for
from abproxy.analysis.live import take_snapshot
from abproxy.app import open_redis
from abproxy.catalog import Catalog
from abproxy.recording import layout, store
from abproxy.recording.counters import parse_arm
from abproxy.stats.sequential import RunningState

EXP = "translation"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _random_state(rng: random.Random) -> RunningState:
    """Intervals that often contradict each other (the sequence starts again), some of a later
    sequence already."""
    low = rng.uniform(-2, 1)
    lift = (rng.uniform(-1, 0), rng.uniform(0, 1)) if rng.random() < 0.6 else (None, None)
    return RunningState(rng.uniform(0, 1), low, low + rng.uniform(-0.3, 3), *lift, rng.choice([0, 0, 0, 1]))


def test_the_lua_merge_is_the_python_merge_whatever_the_order(redis_server: Any, redis_client: redis.Redis) -> None:
    rng = random.Random(20241201)
    fields = ["b|a|m1", "b|a|m2", "c|a|m1"]
    looks = [
        state.StateUpdate(
            {f: _random_state(rng) for f in fields if rng.random() < 0.8}, tuple(fields), expected_generation=0
        )
        for _ in range(6)
    ]

    async def merge_all(order: Iterable[int], experiment: str) -> state.KeptState:
        client = open_redis(redis_server.url)
        try:
            kept = state.KeptState()
            for index in order:
                look = looks[index]
                states = [(f, look.running[f].encode() if f in look.running else "") for f in look.fields]
                raw_states, raw_winner = await store.save_state(client, experiment, states, 0, None)
                kept = state.decode(raw_states, raw_winner)
            return kept
        finally:
            await client.aclose()

    orders = [list(range(6)), list(reversed(range(6)))] + [rng.sample(range(6), 6) for _ in range(3)]
    for number, order in enumerate(orders):
        expected = state.KeptState()
        for index in order:
            expected = state.apply(expected, looks[index])
        kept = run(merge_all(order, f"merge{number}"))
        assert kept.running == expected.running, order
        stored = redis_client.hgetall(layout.sequential_key(f"merge{number}"))
        assert {f: RunningState.decode(v) for f, v in stored.items()} == expected.running


def test_the_winner_is_declared_once_against_the_generation_read(redis_server: Any, redis_client: redis.Redis) -> None:
    async def declare(winner: str, generation: int) -> state.KeptState:
        client = open_redis(redis_server.url)
        try:
            return state.decode(*await store.save_state(client, "cas", [], generation, winner))
        finally:
            await client.aclose()

    assert run(declare("b@1", 0)).winner == state.Winner("b@1", 1)
    assert run(declare("c@1", 0)).winner == state.Winner("b@1", 1), "a rival that read generation 0 is too late"
    assert run(declare("c@1", 1)).winner == state.Winner("c@1", 2), "one that read generation 1 replaces it"
    assert redis_client.hgetall(layout.verdict_key("cas")) == {"winner": "c@1", "generation": "2", "context": ""}


def _seed(redis_client: redis.Redis, plan: Any, scores: dict[str, tuple[float, float, int]]) -> None:
    """Counters for ``feedback.satisfaction`` (mean, sd, n per arm, one request per user) straight
    into Redis, as the recorder would leave them."""
    for name, (mean, sd, n) in scores.items():
        key = layout.stats_key(plan.name, plan.arms[name].arm_id)
        metric = "feedback.satisfaction"
        redis_client.hset(
            key,
            mapping={
                "requests": n, "units": n, f"{metric}|n": n, f"{metric}|s": n * mean,
                f"{metric}|q": (n - 1) * sd * sd + n * mean * mean,
                f"{metric}|uk": n, f"{metric}|uyy": (n - 1) * sd * sd + n * mean * mean, f"{metric}|unn": n,
                f"{metric}|uyn": n * mean,
            },
        )  # fmt: skip


def _three_arm_config(upstream_url: str, **overrides: Any) -> Any:
    experiments = copy.deepcopy(BASE_EXPERIMENTS)
    experiments[EXP]["variants"]["context_aware"] = {
        "model": "gpt-4o-mini",
        "system_prompt": "Match register and politeness.",
        "user_template": "Translate into Korean:\n{{input}}",
    }
    return make_config(upstream_url, experiments=experiments, **overrides)


def test_a_look_answers_with_the_winner_redis_keeps(redis_server: Any, redis_client: redis.Redis, upstream_url: str) -> None:
    """Another replica declared context_aware a moment ago; this look, which on its own would
    pick professional (the better mean), answers with context_aware, and keeps it."""
    config = _three_arm_config(upstream_url)
    plan = Catalog(config).plans[EXP]
    _seed(redis_client, plan, {"basic": (3.0, 1.0, 2000), "professional": (3.62, 1.0, 2000), "context_aware": (3.6, 1.0, 2000)})
    context = decision_context(plan, policy_for(plan, config))
    redis_client.hset(layout.verdict_key(EXP), mapping={"winner": plan.arms["context_aware"].arm_id, "generation": 1, "context": context})

    async def look() -> Any:
        client = open_redis(redis_server.url)
        try:
            return await take_snapshot(client, config, plan)
        finally:
            await client.aclose()

    fresh = analyse(plan, config, {arm.arm_id: parse_arm(arm.arm_id, redis_client.hgetall(layout.stats_key(EXP, arm.arm_id)), {}) for arm in plan.arms.values()})
    assert fresh.verdict.winner == "professional"
    snapshot = run(look())
    assert (snapshot.result.status, snapshot.result.winner) == ("winner", "context_aware")
    assert snapshot.kept.winner == state.Winner(plan.arms["context_aware"].arm_id, 1, context)
    assert redis_client.hlen(layout.sequential_key(EXP)) > 0, "the look kept its state"


def test_every_look_keeps_its_state_with_mlflow_unreachable_and_p_never_goes_up(start_proxy: Any, redis_client: redis.Redis) -> None:
    proxy = start_proxy(mlflow={"tracking_uri": f"http://127.0.0.1:{free_port()}", "flush_interval_s": 0})
    plan = proxy.app.catalog.plans[EXP]
    _seed(redis_client, plan, {"basic": (3.0, 1.0, 300), "professional": (3.4, 1.0, 300)})
    first = live(proxy)
    p_first = first["variants"][1]["metrics"]["feedback.satisfaction"]["p_value"]
    field = layout.sequential_field(plan.arms["professional"].arm_id, plan.arms["basic"].arm_id, "feedback.satisfaction")
    assert RunningState.decode(redis_client.hget(layout.sequential_key(EXP), field)).p_value == pytest.approx(p_first, rel=1e-6)
    # more data that on its own says less: the kept p-value does not go back up
    _seed(redis_client, plan, {"basic": (3.1, 1.0, 600), "professional": (3.2, 1.0, 600)})
    second = live(proxy)
    p_second = second["variants"][1]["metrics"]["feedback.satisfaction"]["p_value"]
    assert p_second <= p_first
    assert second["variants"][1]["metrics"]["feedback.satisfaction"]["welch_p_value"] > p_first


def test_two_replicas_looking_in_turn_extend_one_sequence(start_proxy: Any, redis_client: redis.Redis) -> None:
    """Looks alternate between two replicas on one Redis, while the evidence grows, then weakens:
    the p-value each shows never goes back up, and the winner, once shown, stays (with the
    warning that its effect faded once what came after it is shown below the MDE)."""
    first, second = start_proxy(), start_proxy()
    plan = first.app.catalog.plans[EXP]
    stages = [(3.0, 3.15, 200), (3.0, 3.25, 600), (3.0, 3.2, 1200), (3.05, 3.15, 2400), (3.1, 3.17, 4800)]
    shown, welch, warned = [], [], []
    for index, (control, treatment, n) in enumerate(stages):
        _seed(redis_client, plan, {"basic": (control, 1.0, n), "professional": (treatment, 1.0, n)})
        body = live(first if index % 2 == 0 else second)
        metric = body["variants"][1]["metrics"]["feedback.satisfaction"]
        shown.append((metric["p_value"], body["winner"]))
        welch.append(metric["welch_p_value"])
        warned.append(body["warnings"])
    assert welch[-1] > welch[2], "the evidence weakens: a fresh look's p-value would go back up"
    assert warned[-1] == ["effect_faded"] and not any(warned[:3]), (
        "what came after the declaration is shown below the MDE, and said so"
    )
    since = body["since_declared"]
    recent = since["metrics"]["feedback.satisfaction"]
    assert since["variant"] == "professional" and 0 < recent["n"] < 4800
    assert recent["lift"] < body["variants"][1]["metrics"]["feedback.satisfaction"]["lift"], "the recent effect beside the whole"
    assert recent["difference_ci"][1] < 0.05 * 3.1, "its interval's best case short of the MDE"
    p_values = [p for p, _ in shown]
    assert p_values == sorted(p_values, reverse=True), shown
    winners = [w for _, w in shown]
    assert "professional" in winners
    assert all(w == "professional" for w in winners[winners.index("professional"):]), shown


def test_a_write_redis_refuses_still_answers_from_the_state_saved_before(start_proxy: Any, redis_client: redis.Redis) -> None:
    proxy = start_proxy()
    plan = proxy.app.catalog.plans[EXP]
    _seed(redis_client, plan, {"basic": (3.0, 1.0, 300), "professional": (3.2, 1.0, 300)})
    saved = live(proxy)
    assert saved["warnings"] == [] and saved["status"] == "collecting"
    _seed(redis_client, plan, {"basic": (3.0, 1.0, 3000), "professional": (3.25, 1.0, 3000)})
    before = redis_client.config_get("maxmemory*")
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", "1")
    try:
        refused = live(proxy)
    finally:
        redis_client.config_set("maxmemory", before["maxmemory"])
        redis_client.config_set("maxmemory-policy", before["maxmemory-policy"])
    assert refused["warnings"] == ["state_not_saved"]
    assert (refused["status"], refused["winner"]) == ("collecting", None), "not from evidence the next look would not have"
    metric = refused["variants"][1]["metrics"]["feedback.satisfaction"]
    assert metric["welch_p_value"] < 1e-10 and metric["p_value"] == saved["variants"][1]["metrics"]["feedback.satisfaction"]["p_value"]
    healed = live(proxy)
    assert healed["warnings"] == [] and healed["winner"] == "professional"


def test_counters_that_are_not_numbers_are_reported_not_decided(start_proxy: Any, redis_client: redis.Redis) -> None:
    proxy = start_proxy()
    plan = proxy.app.catalog.plans[EXP]
    _seed(redis_client, plan, {"basic": (3.0, 1.0, 3000), "professional": (3.5, 1.0, 3000)})
    redis_client.hset(layout.stats_key(EXP, plan.arms["professional"].arm_id), "feedback.satisfaction|q", "nan")
    body = live(proxy)
    assert (body["status"], body["winner"]) == ("collecting", None)
    assert body["corrupt"] == ["professional/feedback.satisfaction|q"]
    assert body["warnings"] == ["corrupt_counters"]
    status, report = http_json("GET", f"{proxy.url}/abproxy/experiments")
    assert status == 200 and report["experiments"][0]["corrupt"] == body["corrupt"]


# -- black-box, through the proxy ---------------------------------------------------------------------


def send(proxy: Any, variant: str, count: int, prefix: str, scores: Iterable[int], errors: float = 0.0) -> None:
    """``count`` requests from fresh users of ``variant``; a share ``errors`` of them fail upstream
    (500), the others get the next of ``scores`` as feedback."""
    plan = proxy.app.catalog.plans[EXP]
    client = proxy.client()
    cycle = itertools.cycle(scores)
    failed = 0
    for index, user in enumerate(users_for(plan, variant, count, f"{prefix}-{variant}")):
        fail = failed < errors * (index + 1)
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="translation", messages=[{"role": "user", "content": f"sentence {index}"}], user=user,
                extra_headers={"x-fake-status": "500"} if fail else None,
            )  # fmt: skip
        except openai.InternalServerError:
            failed += 1
            continue
        assert raw.headers["x-abproxy-variant"] == variant
        status, body = http_json(
            "POST", f"{proxy.url}/v1/feedback",
            {"request_id": raw.headers["x-abproxy-request-id"], "name": "satisfaction", "score": next(cycle)},
        )  # fmt: skip
        assert status == 200, body
    client.close()
    proxy.settle()


GOOD, BAD = (5, 4, 5, 5, 4), (2, 3, 2, 1, 3)


@pytest.mark.slow
def test_black_box_a_treatment_that_harms_the_guardrail_is_not_crowned(start_proxy: Any, upstream_url: str) -> None:
    experiments = copy.deepcopy(BASE_EXPERIMENTS)
    experiments[EXP]["guardrails"] = ["error_rate"]
    proxy = start_proxy(experiments=experiments)
    send(proxy, "basic", 60, "gb", BAD)
    send(proxy, "professional", 80, "gb", GOOD, errors=0.25)
    body = live(proxy)
    pro = next(v for v in body["variants"] if v["name"] == "professional")
    assert pro["metrics"]["feedback.satisfaction"]["p_value"] < 1e-6, "far better on the primary metric"
    assert pro["errors"] >= 15
    assert (body["status"], body["winner"]) == ("collecting", None)
    assert pro["held_back_by"] == ["error_rate"]
    assert pro["metrics"]["error_rate"]["non_inferior"] is False and pro["metrics"]["error_rate"]["margin"] == 0.01
    # more of the same changes nothing
    send(proxy, "basic", 20, "gb2", BAD)
    send(proxy, "professional", 20, "gb2", GOOD, errors=0.25)
    assert live(proxy)["winner"] is None


@pytest.mark.slow
def test_black_box_a_declared_winner_keeps_its_name(start_proxy: Any, upstream_url: str) -> None:
    proxy = start_proxy(_three_arm_config(upstream_url))
    send(proxy, "basic", 40, "keep", BAD)
    send(proxy, "professional", 40, "keep", (5, 4, 5, 5, 4))  # 4.6
    send(proxy, "context_aware", 40, "keep", (3, 4, 3, 3, 4))  # 3.4: shown not better than professional
    first = live(proxy)
    assert (first["status"], first["winner"]) == ("winner", "professional")
    # context_aware now scores better than professional, but not significantly so head to head
    send(proxy, "basic", 40, "keep2", BAD)  # every arm as many users: no sample-ratio mismatch
    send(proxy, "context_aware", 40, "keep2", (5,))
    send(proxy, "professional", 40, "keep2", (4, 3))
    second = live(proxy)
    means = {v["name"]: v["metrics"]["feedback.satisfaction"]["mean"] for v in second["variants"]}
    assert means["context_aware"] > means["professional"]
    assert second["winner"] == "professional"
    third = live(proxy)
    assert third["winner"] == "professional"


@pytest.mark.slow
def test_black_box_with_flush_interval_0_a_winner_stays_the_winner_at_the_next_look(start_proxy: Any, redis_client: redis.Redis) -> None:
    proxy = start_proxy(mlflow={"tracking_uri": "sqlite:///:memory:", "flush_interval_s": 0})
    plan = proxy.app.catalog.plans[EXP]
    send(proxy, "basic", 40, "fi0", (3, 4, 3, 3, 4))  # 3.4
    send(proxy, "professional", 40, "fi0", (4, 4, 3, 4, 5))  # 4.0
    first = live(proxy)
    assert first["winner"] == "professional"
    # then a run of data in which professional is hardly better
    send(proxy, "basic", 40, "fi0b", (3, 4, 4, 3, 4))  # 3.6
    send(proxy, "professional", 40, "fi0b", (3, 3, 4, 4, 3))  # 3.4
    counters = {arm.arm_id: parse_arm(arm.arm_id, redis_client.hgetall(layout.stats_key(EXP, arm.arm_id)), {}) for arm in plan.arms.values()}
    fresh = analyse(plan, proxy.app.config, counters)
    assert fresh.verdict.winner is None, "a look without the kept state would have taken the winner back"
    second = live(proxy)
    assert (second["status"], second["winner"]) == ("winner", "professional")


def test_a_sample_ratio_mismatch_stays_flagged_in_redis_until_the_weights_change(
    redis_server: Any, redis_client: redis.Redis, upstream_url: str
) -> None:
    """The sequential sample-ratio test keeps its running p-value in Redis beside the winner: a
    mismatch shown at one look is still shown once the counts even out, by any replica, and a
    change of weights starts the test afresh."""
    config = make_config(upstream_url)
    plan = Catalog(config).plans[EXP]

    def look(config: Any = config) -> Any:
        async def once() -> Any:
            client = open_redis(redis_server.url)
            try:
                return await take_snapshot(client, config, Catalog(config).plans[EXP])
            finally:
                await client.aclose()

        return run(once()).result

    def assigned(basic: int, professional: int) -> None:
        for name, units in (("basic", basic), ("professional", professional)):
            redis_client.hset(layout.stats_key(EXP, plan.arms[name].arm_id), mapping={"requests": units, "units": units})

    assigned(5_400, 4_600)
    flagged = look()
    assert flagged.status == "srm" and flagged.srm.p_value < 0.001
    assigned(100_400, 99_600)  # evened out: on its own, no mismatch
    again = look()
    assert again.status == "srm" and again.srm.p_value == flagged.srm.p_value
    experiments = copy.deepcopy(BASE_EXPERIMENTS)
    experiments[EXP]["variants"]["professional"]["weight"] = 2  # the arms stay, their shares change
    assigned(66_700, 133_300)
    reweighted = look(make_config(upstream_url, experiments=experiments))
    assert reweighted.status != "srm" and reweighted.srm.p_value > 0.001


def test_a_revoked_winner_is_kept_in_redis_and_promote_refuses_it(start_proxy: Any, redis_client: redis.Redis, upstream_url: str) -> None:
    experiments = copy.deepcopy(BASE_EXPERIMENTS)
    experiments[EXP]["guardrails"] = ["error_rate"]
    proxy = start_proxy(make_config(upstream_url, experiments=experiments, mlflow={"flush_interval_s": 0}))
    plan = proxy.app.catalog.plans[EXP]
    config = proxy.app.config
    basic, professional = plan.arms["basic"].arm_id, plan.arms["professional"].arm_id
    _seed(redis_client, plan, {"basic": (3.0, 1.0, 4000), "professional": (3.4, 1.0, 4000)})
    def errors_of(arm: str, errors: int) -> None:  # one request per user, as _seed's counters
        fields = {"n": 4000, "s": errors, "q": errors, "uk": 4000, "uyy": errors, "unn": 4000, "uyn": errors}
        redis_client.hset(layout.stats_key(EXP, arm), mapping={f"error_rate|{k}": v for k, v in fields.items()})

    errors_of(basic, 80)
    errors_of(professional, 320)
    context = decision_context(plan, policy_for(plan, config))
    redis_client.hset(layout.verdict_key(EXP), mapping={"winner": professional, "generation": 1, "context": context})

    first = live(proxy)
    assert first["status"] == "revoked" and first["winner"] is None
    assert first["revoked"] == {"variant": "professional", "reason": "error_rate"}
    assert redis_client.hget(layout.verdict_key(EXP), "revoked") == "error_rate"
    for arm in (basic, professional):  # the harm no longer shows: still revoked
        errors_of(arm, 80)
    assert live(proxy)["status"] == "revoked"

    status, body = http_json("POST", f"{proxy.url}/abproxy/experiments/{EXP}/promote", {})
    assert status == 409 and body["error"]["code"] == "winner_revoked", body
    assert "professional" in body["error"]["message"]


@pytest.mark.slow
def test_promoting_a_winner_whose_effect_faded_says_so(
    start_proxy: Any, redis_client: redis.Redis, upstream_url: str, tmp_path: Any
) -> None:
    """Declared on a strong lead; what came after it shows an effect below the MDE: the winner
    stands (the whole still favours it), and promote ships it with the recent effect beside the
    whole experiment's."""
    proxy = start_proxy(make_config(upstream_url, mlflow={"tracking_uri": f"sqlite:///{tmp_path}/m.db", "flush_interval_s": 0}))
    plan = proxy.app.catalog.plans[EXP]
    _seed(redis_client, plan, {"basic": (3.0, 1.0, 600), "professional": (3.25, 1.0, 600)})
    declared = live(proxy)
    assert declared["winner"] == "professional" and declared["warnings"] == [] and declared["since_declared"] is None
    _seed(redis_client, plan, {"basic": (3.1, 1.0, 4800), "professional": (3.17, 1.0, 4800)})
    faded = live(proxy)
    assert faded["winner"] == "professional" and faded["warnings"] == ["effect_faded"]
    status, promotion = http_json("POST", f"{proxy.url}/abproxy/experiments/{EXP}/promote", {})
    assert status == 200 and promotion["promoted"] == "professional", promotion
    (caution,) = promotion["cautions"]
    assert caution.startswith("effect_faded: since professional was declared") and "over the whole experiment" in caution
