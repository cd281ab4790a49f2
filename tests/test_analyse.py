"""One look at an experiment (analysis/analyse.py): the verdict, the estimates and the warnings a
prompt engineer reads, from counters as Redis holds them. Every arm's traffic is made as raw
per-request samples, turned into the hashes the recorder and the feedback script keep (sums about
a shift, per-user sums, histogram buckets), parsed back with ``parse_arm``, and every number the
look reports is checked against a brute-force computation over the same raw samples.

Pure: no Redis, no proxy (the conftest fixtures are not used)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from proxykit import BASE_EXPERIMENTS, make_config

from abproxy.analysis.analyse import CORRUPT_COUNTERS, analyse, policy_for, state_keys
from abproxy.analysis.summarise import summarise
from abproxy.catalog import Catalog, ExperimentPlan
from abproxy.config import Config
from abproxy.recording.counters import ArmCounters, parse_arm
from abproxy.stats.guardrails import Guardrail
from abproxy.stats.histogram import bucket_counts
from abproxy.stats.results import ExperimentResult
from abproxy.stats.verdict import COLLECTING, SRM, WINNER

EXP = "translation"  # unit: user, primary feedback.satisfaction (1..5), control "basic"
SATISFACTION = "feedback.satisfaction"
ERRORS = "error_rate"
LATENCY = "latency_ms"

GOOD = (0.0, 0.02, 0.05, 0.20, 0.73)
"""Probabilities of a satisfaction of 1..5: mean 4.64."""
BAD = (0.30, 0.45, 0.20, 0.05, 0.0)
"""Mean 2.0."""


def setup(
    guardrails: Any = None, variants: Mapping[str, dict[str, Any]] | None = None
) -> tuple[ExperimentPlan, Config]:
    """The ``translation`` experiment of the suite's realistic config, with guardrails or
    variants changed."""
    experiments = copy.deepcopy(BASE_EXPERIMENTS)
    if guardrails is not None:
        experiments[EXP]["guardrails"] = guardrails
    if variants is not None:
        experiments[EXP]["variants"] = dict(variants)
    config = make_config("http://127.0.0.1:9/v1", experiments=experiments)
    return Catalog(config).plans[EXP], config


@dataclass
class Traffic:
    """One arm's raw requests: the user of each, whether it failed, its latency and its
    satisfaction score (NaN: none)."""

    users: np.ndarray
    failed: np.ndarray
    latency: np.ndarray
    satisfaction: np.ndarray

    def values(self, metric: str) -> np.ndarray:
        """The metric's recorded values, in request order: what a brute-force mean is taken over."""
        column = {ERRORS: self.failed.astype(float), LATENCY: self.latency, SATISFACTION: self.satisfaction}[metric]
        return column[~np.isnan(column)]


def traffic(
    rng: np.random.Generator,
    requests: int,
    scores: tuple[float, ...],
    error_rate: float = 0.02,
    per_user: int = 2,
    slow_share: float = 0.0,
) -> Traffic:
    """``requests`` requests from users of ``per_user`` requests each; a failed request has no
    latency and no score; ``slow_share`` of the requests take a minute (a heavy tail)."""
    users = np.arange(requests) // per_user
    failed = rng.random(requests) < error_rate
    latency = rng.lognormal(np.log(400.0), 0.5, requests)
    latency[rng.random(requests) < slow_share] = 60_000.0
    latency[failed] = np.nan
    satisfaction = rng.choice(np.arange(1.0, 6.0), size=requests, p=scores)
    satisfaction[failed] = np.nan
    return Traffic(users, failed, latency, satisfaction)


def redis_hashes(plan: ExperimentPlan, arm: Traffic) -> tuple[dict[str, str], dict[str, str]]:
    """The arm's stats hash and histogram hash as the recording scripts leave them: per metric
    ``n``, ``s``, the shift ``k`` (the first value), ``t`` and ``q`` about it, the per-user sums
    (``uk``, ``uyy``, ``unn``, ``uyn``) of the metrics kept per user, and the histogram buckets."""
    users = arm.users
    stats = {
        "requests": str(len(users)),
        "errors": str(int(arm.failed.sum())),
        "units": str(len(np.unique(users)) if plan.per_unit else len(users)),
    }
    hist: dict[str, str] = {}
    for metric in (ERRORS, LATENCY, SATISFACTION):
        column = {ERRORS: arm.failed.astype(float), LATENCY: arm.latency, SATISFACTION: arm.satisfaction}[metric]
        present = ~np.isnan(column)
        x, owners = column[present], users[present]
        shift = float(x[0])
        y = x - shift
        stats |= {f"{metric}|n": str(x.size), f"{metric}|s": repr(float(x.sum())), f"{metric}|k": repr(shift)}
        if shift != 0:
            stats[f"{metric}|t"] = repr(float(y.sum()))
        stats[f"{metric}|q"] = repr(float(np.dot(y, y)))
        if metric in plan.per_user_metrics:
            ids, index = np.unique(owners, return_inverse=True)
            per_user_y = np.bincount(index, weights=y)
            per_user_n = np.bincount(index).astype(float)
            stats |= {
                f"{metric}|uk": str(ids.size),
                f"{metric}|uyy": repr(float(np.dot(per_user_y, per_user_y))),
                f"{metric}|unn": repr(float(np.dot(per_user_n, per_user_n))),
                f"{metric}|uyn": repr(float(np.dot(per_user_y, per_user_n))),
            }
        hist |= {f"{metric}|{bucket}": str(count) for bucket, count in bucket_counts(x).items()}
    return stats, hist


def counters_of(
    plan: ExperimentPlan, arms: Mapping[str, Traffic], edits: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, ArmCounters]:
    """Every arm's counters, parsed from its hashes; ``edits`` overwrite fields of a variant's
    stats hash (a hand edit, a bug)."""
    counters = {}
    for name, arm in plan.arms.items():
        stats, hist = redis_hashes(plan, arms[name])
        stats |= (edits or {}).get(name, {})
        counters[arm.arm_id] = parse_arm(arm.arm_id, stats, hist)
    return counters


def look(plan: ExperimentPlan, config: Config, counters: dict[str, ArmCounters], **options: Any) -> ExperimentResult:
    """The look's results as the live-results endpoint and the flush show them."""
    return summarise(plan, config, counters, analyse(plan, config, counters, **options))


def clearly_better(seed: int = 7, requests: int = 300, **treatment: Any) -> dict[str, Traffic]:
    rng = np.random.default_rng(seed)
    return {"basic": traffic(rng, requests, BAD), "professional": traffic(rng, requests, GOOD, **treatment)}


# -- no data ----------------------------------------------------------------------------------------


def test_with_no_data_the_experiment_is_collecting_has_no_winner_and_shows_no_numbers() -> None:
    plan, config = setup()
    empty = {arm.arm_id: parse_arm(arm.arm_id, {}, {}) for arm in plan.arms.values()}
    analysis = analyse(plan, config, empty)
    result = summarise(plan, config, empty, analysis)
    assert (result.status, result.winner) == (COLLECTING, None)
    assert analysis.update.winner is None, "nothing is proposed to Redis as a winner"
    assert result.warnings == () and result.corrupt == ()
    assert result.srm.ok is None, "too little data to call a sample-ratio mismatch"
    for variant in result.variants:
        assert variant.requests == 0 and variant.prob_best is None
        shown = variant.metric(SATISFACTION)
        assert (shown.n, shown.mean, shown.ci, shown.lift, shown.p_value) == (0, None, None, None, None)


# -- a clearly better treatment -----------------------------------------------------------------------


def test_a_clearly_better_treatment_wins_with_its_lift_and_p_value_and_means_match_the_raw_scores() -> None:
    plan, config = setup()
    arms = clearly_better()
    counters = counters_of(plan, arms)
    analysis = analyse(plan, config, counters)
    result = summarise(plan, config, counters, analysis)

    assert (result.status, result.winner) == (WINNER, "professional")
    assert analysis.update.winner == plan.arms["professional"].arm_id, "the winner is proposed to Redis by arm id"
    basic, pro = result.variant("basic").metric(SATISFACTION), result.variant("professional").metric(SATISFACTION)
    raw_basic, raw_pro = arms["basic"].values(SATISFACTION), arms["professional"].values(SATISFACTION)
    for shown, raw in ((basic, raw_basic), (pro, raw_pro)):
        assert shown.n == raw.size
        assert shown.mean == pytest.approx(raw.mean(), rel=1e-12)
        assert shown.std == pytest.approx(raw.std(ddof=1), rel=1e-9)
        assert shown.ci is not None and shown.ci[0] < raw.mean() < shown.ci[1]
    assert raw_pro.mean() > 4.4 and raw_basic.mean() < 2.2, "the samples are what the test means them to be"
    assert pro.lift == pytest.approx(raw_pro.mean() / raw_basic.mean() - 1, rel=1e-9)
    assert pro.lift is not None and pro.lift > 0
    assert pro.p_value is not None and pro.p_value < 1e-6
    assert pro.difference_ci is not None and pro.difference_ci[0] > 0
    assert basic.lift is None and basic.p_value is None, "the control is not compared with itself"
    assert result.variant("professional").prob_best == pytest.approx(1.0)
    for name in ("basic", "professional"):
        shown_errors = result.variant(name).metric(ERRORS).mean
        assert shown_errors == pytest.approx(arms[name].failed.mean(), rel=1e-12)
        assert result.variant(name).requests == arms[name].users.size
        assert result.variant(name).units == np.unique(arms[name].users).size


def test_users_not_requests_are_the_samples_and_their_correlated_scores_widen_the_interval() -> None:
    """``unit: user``: a user's requests are not independent; the interval is the delta
    method's on per-user totals, over as many samples as there are users."""
    plan, config = setup()
    rng = np.random.default_rng(3)
    arms = {name: traffic(rng, 600, BAD, error_rate=0.0, per_user=3) for name in plan.arms}
    for arm in arms.values():  # each user gives one score to all three of their requests
        arm.satisfaction = np.repeat(arm.satisfaction[::3], 3)
    analysis = analyse(plan, config, counters_of(plan, arms))
    estimate = analysis.estimates["basic"][SATISFACTION]
    scores, users = arms["basic"].satisfaction, arms["basic"].users
    per_user_total = np.bincount(users, weights=scores)
    per_user_n = np.bincount(users).astype(float)
    ratio = per_user_total.sum() / per_user_n.sum()
    k = per_user_n.size
    delta_method = np.sum((per_user_total - ratio * per_user_n) ** 2) / (k * (k - 1) * per_user_n.mean() ** 2)
    assert estimate is not None
    assert estimate.n == k == 200
    assert estimate.mean == pytest.approx(scores.mean(), rel=1e-12)
    assert estimate.variance_of_mean == pytest.approx(delta_method, rel=1e-9)
    naive = scores.var(ddof=1) / scores.size
    assert estimate.variance_of_mean > 2.5 * naive, "three identical scores per user are one sample, not three"


# -- corrupt counters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edits", "unreadable", "reported"),
    [
        ({f"{SATISFACTION}|q": "nan"}, None, f"professional/{SATISFACTION}|q"),
        ({"units": "150.5"}, None, "professional/units"),
        (
            {},
            "abproxy:{translation}:h:professional is not a hash",
            "professional/abproxy:{translation}:h:professional is not a hash",
        ),
    ],
    ids=["primary metric not a number", "units not an integer", "key redis cannot read"],
)
def test_a_corrupt_counter_a_verdict_rests_on_is_reported_and_no_winner_is_declared(
    edits: dict[str, str], unreadable: str | None, reported: str
) -> None:
    plan, config = setup()
    counters = counters_of(plan, clearly_better(), edits={"professional": edits})
    if unreadable is not None:
        counters[plan.arms["professional"].arm_id].unreadable.append(unreadable)
    analysis = analyse(plan, config, counters)
    result = summarise(plan, config, counters, analysis)
    assert result.corrupt == (reported,)
    assert CORRUPT_COUNTERS in result.warnings
    assert (result.status, result.winner, analysis.update.winner) == (COLLECTING, None, None)


def test_a_corrupt_counter_no_decision_rests_on_is_reported_but_the_winner_stands() -> None:
    plan, config = setup()
    edits = {"basic": {"response_chars|s": "inf"}, "professional": {"cancelled": "1.5"}}
    counters = counters_of(plan, clearly_better(), edits=edits)
    result = look(plan, config, counters)
    assert set(result.corrupt) == {"basic/response_chars|s", "professional/cancelled"}
    assert CORRUPT_COUNTERS in result.warnings
    assert (result.status, result.winner) == (WINNER, "professional")


# -- guardrails -----------------------------------------------------------------------------------------


def test_a_guardrail_the_treatment_harms_holds_it_back_and_says_by_which_metric() -> None:
    arms = clearly_better(error_rate=0.15)
    plan, config = setup(guardrails=[ERRORS])
    result = look(plan, config, counters_of(plan, arms))
    assert (result.status, result.winner) == (COLLECTING, None)
    pro = result.variant("professional")
    assert pro.held_back_by == (ERRORS,)
    guard = pro.metric(ERRORS)
    assert guard.margin == pytest.approx(0.01), "one percentage point: the default margin of a rate"
    assert guard.non_inferior is False
    assert guard.mean == pytest.approx(arms["professional"].failed.mean(), rel=1e-12)
    primary_p = pro.metric(SATISFACTION).p_value
    assert primary_p is not None and primary_p < 1e-6, "clearly better on the primary metric"
    assert result.variant("basic").held_back_by == ()

    unguarded, unguarded_config = setup()
    assert look(unguarded, unguarded_config, counters_of(unguarded, arms)).winner == "professional"


def test_no_error_in_a_few_dozen_users_is_not_proof_that_a_treatment_adds_none() -> None:
    """64 requests from 32 users per arm, no error in either: per user, the rate's interval must
    be as wide as per request (about what one more error would make it), not a point at 0 that
    lets the guardrail pass at once."""
    rng = np.random.default_rng(3)
    arms = {"basic": traffic(rng, 64, BAD, error_rate=0.0), "professional": traffic(rng, 64, GOOD, error_rate=0.0)}
    plan, config = setup(guardrails=[ERRORS])
    assert plan.per_unit
    result = look(plan, config, counters_of(plan, arms))
    guard = result.variant("professional").metric(ERRORS)
    assert guard.difference_ci is not None and guard.difference_ci[1] > guard.margin
    assert (result.status, result.winner) == (COLLECTING, None)
    assert result.variant("professional").held_back_by == (ERRORS,)


def test_a_latency_guardrail_compares_values_capped_at_the_controls_95th_percentile() -> None:
    """A few requests that take a minute count as slow as the control's p95, no slower: they do
    not hold back a winner whose latency is otherwise the control's; the shown mean is uncapped."""
    arms = clearly_better(seed=11, requests=6000, slow_share=0.02)
    plan, config = setup(guardrails=[LATENCY])
    counters = counters_of(plan, arms)
    analysis = analyse(plan, config, counters)
    result = summarise(plan, config, counters, analysis)

    control_latency, pro_latency = arms["basic"].values(LATENCY), arms["professional"].values(LATENCY)
    cap = analysis.caps[LATENCY]
    assert cap == pytest.approx(np.percentile(control_latency, 95, method="lower"), rel=0.011)
    capped = analysis.estimates["professional"][LATENCY]
    assert capped is not None and capped.mean == pytest.approx(np.minimum(pro_latency, cap).mean(), rel=0.011)
    shown = result.variant("professional").metric(LATENCY)
    assert shown.capped_at == cap
    assert shown.mean == pytest.approx(pro_latency.mean(), rel=1e-12), "the distribution columns are uncapped"
    assert pro_latency.mean() > 2 * control_latency.mean(), "uncapped, the tail would more than double the mean"
    assert shown.non_inferior is True
    assert (result.status, result.winner) == (WINNER, "professional")


# -- the sample-ratio check -------------------------------------------------------------------------------


def test_a_lopsided_split_is_a_sample_ratio_mismatch_unless_the_short_arm_was_stopped() -> None:
    """Equal weights but a third of the users in the treatment: assignment is broken and no winner
    can be trusted; the same counts are expected once the treatment was stopped for harm (the
    control served its users since)."""
    plan, config = setup()
    rng = np.random.default_rng(5)
    arms = {"basic": traffic(rng, 1800, BAD), "professional": traffic(rng, 600, GOOD)}
    counters = counters_of(plan, arms)
    lopsided = look(plan, config, counters)
    assert (lopsided.status, lopsided.winner) == (SRM, None)
    assert lopsided.srm.ok is False

    stopped = look(plan, config, counters, stopped=frozenset({plan.arms["professional"].arm_id}))
    assert stopped.status != SRM and stopped.srm.ok is not False


# -- what a look keeps, and its policy --------------------------------------------------------------------


def test_editing_one_treatments_prompt_restarts_only_its_own_running_comparisons() -> None:
    variants = copy.deepcopy(BASE_EXPERIMENTS[EXP]["variants"])
    variants["concise"] = {"model": "gpt-4o-mini", "user_template": "Korean, briefly: {{input}}"}
    plan, _ = setup(variants=variants)
    keys = state_keys(plan)
    metrics = plan.settings.metric_names
    assert len(keys) == 2 * len(metrics) + 1, (
        "each treatment against the control on every metric, the treatments head to head on the primary"
    )
    assert set(keys.values()) == {
        *((treatment, "basic", metric) for treatment in ("concise", "professional") for metric in metrics),
        ("professional", "concise", SATISFACTION),
    }

    edited = copy.deepcopy(variants)
    edited["concise"]["user_template"] = "Korean, in one line: {{input}}"
    edited_keys = state_keys(setup(variants=edited)[0])
    kept = {field for field in keys if field in edited_keys}
    assert {keys[field] for field in kept} == {("professional", "basic", metric) for metric in metrics}


def test_the_policy_takes_the_configured_statistics_and_guardrail_margins() -> None:
    experiments = copy.deepcopy(BASE_EXPERIMENTS)
    experiments[EXP]["guardrails"] = {
        ERRORS: None,
        "feedback.thumbs": None,
        LATENCY: {"relative_margin": 0.2},
        "cost_usd": {"margin": 0.001},
    }
    config = make_config(
        "http://127.0.0.1:9/v1", experiments=experiments, stats={"alpha": 0.01, "min_samples": 100, "mde": 0.1}
    )
    policy = policy_for(Catalog(config).plans[EXP], config)
    assert (policy.primary, policy.alpha, policy.min_samples, policy.mde) == (SATISFACTION, 0.01, 100, 0.1)
    assert policy.guardrail_specs == (
        Guardrail(ERRORS, margin=0.01),  # a rate: one percentage point
        Guardrail("feedback.thumbs", margin=0.01),  # feedback within [0, 1] is a rate too
        Guardrail(LATENCY, relative_margin=0.2),
        Guardrail("cost_usd", margin=0.001),
    )
    assert policy.higher_is_better(SATISFACTION) and not policy.higher_is_better(LATENCY)
