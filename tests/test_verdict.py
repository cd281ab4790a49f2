"""The verdict a user acts on (stats/verdict.py, analysis/analyse.py, analysis/state.py), case by
case: guardrails as non-inferiority and what holds a winner back, a winner that keeps its name,
drift, constant arms, the kept state and how a look extends it, directions, corrupt counters and
the design effect. Pure: no Redis (the Lua twin of state.apply is checked in test_live_results)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from simkit import ERRORS, SCORE, experiment

from abproxy.analysis import state
from abproxy.analysis.analyse import analyse, decision_context, guardrails, policy_for, state_keys
from abproxy.analysis.estimates import design_effect
from abproxy.analysis.summarise import samples_needed, summarise
from abproxy.analysis.report import verdict_sentence
from abproxy.recording import layout
from abproxy.recording.counters import ArmCounters, MetricCounters, parse_arm
from abproxy.stats.estimates import Estimate, from_moments
from abproxy.stats.guardrails import Guardrail
from abproxy.stats.sequential import RunningState
from abproxy.stats.summary import Moments
from abproxy.stats.verdict import COLLECTING, NO_DIFFERENCE, WINNER, ArmInput, Policy, decide

LATENCY = "latency_ms"


def est(mean: float, sd: float, n: int) -> Estimate:
    return from_moments(Moments(n, n * mean, (n - 1) * sd * sd + n * mean * mean))


def rate(p: float, n: int) -> Estimate:
    return Estimate(p, p * (1 - p) / n, n, math.inf)


def arm(name: str, control: bool = False, **metrics: Estimate) -> ArmInput:
    estimates = {metric.replace("__", "."): value for metric, value in metrics.items()}
    return ArmInput(name, control, 1.0, next(iter(estimates.values())).n, estimates)


def policy(guardrails=(), **kwargs) -> Policy:
    return Policy(
        primary=SCORE, guardrails=list(guardrails), higher_is_better=lambda m: m.startswith("feedback."), **kwargs
    )


# -- guardrails as non-inferiority -----------------------------------------------------------------


def test_better_but_harm_not_ruled_out_is_held_back_and_says_by_what():
    arms = [
        arm("a", control=True, feedback__score=est(3.5, 1.0, 400), error_rate=rate(0.02, 400)),
        arm("b", feedback__score=est(3.9, 1.0, 400), error_rate=rate(0.02, 400)),
    ]
    verdict = decide(arms, policy([Guardrail(ERRORS, margin=0.01)]), {})
    guard = verdict.arms["b"].metrics[ERRORS]
    assert verdict.arms["b"].metrics[SCORE].p_value < 1e-4, "clearly better on the primary metric"
    assert guard.margin == 0.01 and guard.non_inferior is False
    assert guard.difference_ci[1] > 0.01, "400 per arm cannot rule out a point of harm on a 2% rate"
    assert (verdict.status, verdict.winner) == (COLLECTING, None)
    assert verdict.arms["b"].held_back_by == (ERRORS,)


def test_harm_ruled_out_lets_the_winner_through():
    arms = [
        arm("a", control=True, feedback__score=est(3.5, 1.0, 20_000), error_rate=rate(0.02, 20_000)),
        arm("b", feedback__score=est(3.9, 1.0, 20_000), error_rate=rate(0.021, 20_000)),
    ]
    verdict = decide(arms, policy([Guardrail(ERRORS, margin=0.01)]), {})
    assert verdict.arms["b"].metrics[ERRORS].non_inferior is True
    assert (verdict.status, verdict.winner) == (WINNER, "b") and verdict.arms["b"].held_back_by == ()


def test_a_guardrail_that_should_go_up_is_harmed_by_going_down():
    """Harm is a fall for a higher-is-better guardrail: the interval's lower end is what counts."""
    arms = [
        arm("a", control=True, feedback__score=est(3.5, 1.0, 5000), feedback__thumbs=rate(0.80, 5000)),
        arm("b", feedback__score=est(3.9, 1.0, 5000), feedback__thumbs=rate(0.70, 5000)),
    ]
    verdict = decide(arms, policy([Guardrail("feedback.thumbs", margin=0.02)]), {})
    assert verdict.arms["b"].metrics["feedback.thumbs"].non_inferior is False
    assert verdict.arms["b"].held_back_by == ("feedback.thumbs",) and verdict.winner is None


def test_default_margins_from_the_config():
    plan, _ = experiment(guardrails={"error_rate": None, "latency_ms": None, "feedback.thumbs": {"margin": 0.05}})
    assert guardrails(plan) == (
        Guardrail("error_rate", margin=0.01),  # a rate: one percentage point
        Guardrail("latency_ms"),  # anything else: 10% of the control's mean
        Guardrail("feedback.thumbs", margin=0.05),
    )
    assert Guardrail("latency_ms").absolute_margin(700.0) == pytest.approx(70.0)


def test_samples_needed_names_what_a_held_back_winner_is_waiting_for():
    plan, config = experiment(guardrails=[ERRORS])
    counters = _counters(plan, {"a": (3.5, 0.02), "b": (3.9, 0.02)}, n=400)
    analysis = analyse(plan, config, counters)
    needed, by_guardrail = samples_needed(analysis, "a")
    assert analysis.verdict.arms["b"].held_back_by == (ERRORS,)
    assert 1_000 < by_guardrail[("b", ERRORS)] < 20_000
    # what a look at that many more samples per arm would see, with the same rates, clears the margin
    later = analyse(plan, config, _counters(plan, {"a": (3.5, 0.02), "b": (3.9, 0.02)}, n=400 + int(1.3 * by_guardrail[("b", ERRORS)])))
    assert later.verdict.arms["b"].metrics[ERRORS].non_inferior
    assert needed["b"] == 0, "the primary metric needs nothing more"



def test_the_one_sentence_verdict_names_the_winner_or_what_holds_it_back():
    """The sentence MLflow's experiment description opens with (tracking/writer.py)."""
    plan, config = experiment(guardrails=[ERRORS])
    held = analyse(plan, config, _counters(plan, {"a": (3.5, 0.02), "b": (3.9, 0.02)}, n=400))
    sentence = verdict_sentence(summarise(plan, config, _counters(plan, {"a": (3.5, 0.02), "b": (3.9, 0.02)}, n=400), held))
    # what holds it back, in the guardrail's units: percentage points of error rate
    assert sentence.startswith(
        "Collecting: b is better on feedback.score but held back by guardrail error_rate: harm beyond 1.0 pp not yet "
        "ruled out (difference +0.0 pp, 95% CI -3.2 to +3.2 pp; about 5,612 more samples per arm) (800 requests so far)."
    ), sentence
    counters = _counters(plan, {"a": (3.5, 0.02), "b": (3.9, 0.02)}, n=40_000)
    crowned = summarise(plan, config, counters, analyse(plan, config, counters))
    assert crowned.winner == "b"
    # the gain in the score's points, with its interval, then the lift and p
    assert verdict_sentence(crowned) == (
        "Winner: b: feedback.score 3.90 points against 3.50 points for the control a: +0.40 points, 95% CI +0.37 to "
        "+0.43 points (+11.4%, p<0.001), after 80,000 requests."
    )

def test_a_relative_margin_on_a_control_mean_of_0_says_it_can_never_be_met():
    """10% of a control's 0% error rate is a margin of 0: no interval rules out harm of 0, so the
    arm would wait forever. The verdict says so, and what to set instead."""
    plan, config = experiment(guardrails={ERRORS: {"relative_margin": 0.1}})
    counters = _counters(plan, {"a": (3.5, 0.0), "b": (3.9, 0.0)}, n=20_000)
    result = summarise(plan, config, counters, analyse(plan, config, counters))
    assert result.winner is None and result.variant("b").held_back_by == (ERRORS,)
    assert verdict_sentence(result).startswith(
        "Collecting: b is better on feedback.score but held back by guardrail error_rate: its margin is a share of "
        "the control's mean, which is 0, so no harm can ever be ruled out; give error_rate an absolute margin "
        "(guardrails: {error_rate: {margin: …}})"
    ), verdict_sentence(result)


def _counters(plan, arms: dict[str, tuple[float, float]], n: int, sd: float = 1.0) -> dict[str, ArmCounters]:
    """Exact means and spread: score N(mean, sd²), errors at the rate."""
    out = {}
    for name, (mean, errors) in arms.items():
        arm_id = plan.arms[name].arm_id
        ones = round(errors * n)
        out[arm_id] = ArmCounters(
            arm_id, requests=n, units=n,
            metrics={
                SCORE: MetricCounters(Moments(n, n * mean, (n - 1) * sd * sd + n * mean * mean)),
                ERRORS: MetricCounters(Moments(n, ones, ones)),
            },
        )  # fmt: skip
    return out


# -- a winner that keeps its name ------------------------------------------------------------------------


def test_a_declared_winner_stays_when_another_is_better_but_not_significantly_so_head_to_head():
    arms = [
        arm("a", control=True, feedback__score=est(3.5, 1.0, 600)),
        arm("b", feedback__score=est(3.80, 1.0, 600)),
        arm("c", feedback__score=est(3.85, 1.0, 600)),
    ]
    fresh = decide(arms, policy(), {})
    assert fresh.winner == "c", "undeclared: the best mean among the significant arms"
    kept = decide(arms, policy(), {}, declared="b")
    assert (kept.status, kept.winner) == (WINNER, "b")
    pair = kept.running[("c", "b", SCORE)]
    assert pair.lower < 0 < pair.upper, "c − b is not significant head to head"


def test_a_declared_winner_is_replaced_only_by_an_arm_significantly_better_head_to_head():
    arms = [
        arm("a", control=True, feedback__score=est(3.5, 1.0, 3000)),
        arm("b", feedback__score=est(3.7, 1.0, 3000)),
        arm("c", feedback__score=est(4.0, 1.0, 3000)),
    ]
    verdict = decide(arms, policy(), {}, declared="b")
    assert verdict.running[("c", "b", SCORE)].lower > 0
    assert (verdict.status, verdict.winner) == (WINNER, "c")


def test_the_first_winner_is_one_no_other_candidate_beats():
    """Among significant arms the best current mean, unless another beats it head to head; the
    pairs are kept from the first look at min_samples."""
    arms = [
        arm("a", control=True, feedback__score=est(3.5, 1.0, 5000)),
        arm("b", feedback__score=est(3.6, 1.0, 5000)),
        arm("c", feedback__score=est(3.9, 1.0, 5000)),
    ]
    verdict = decide(arms, policy(), {})
    assert verdict.winner == "c" and verdict.running[("c", "b", SCORE)].lower > 0


def test_a_declared_control_stays_and_srm_hides_any_winner():
    arms = [arm("a", control=True, feedback__score=est(4.0, 1.0, 2000)), arm("b", feedback__score=est(3.6, 1.0, 2000))]
    assert decide(arms, policy(), {}).winner == "a"
    skewed = [ArmInput("a", True, 1.0, 11_000, arms[0].estimates), ArmInput("b", False, 1.0, 9_000, arms[1].estimates)]
    verdict = decide(skewed, policy(), {}, declared="a")
    assert (verdict.status, verdict.winner) == ("srm", None)


# -- drift, constants, the kept state -------------------------------------------------------------------


def test_equal_constant_arms_end_as_no_difference_when_the_margin_allows_it():
    constant = [arm("a", control=True, feedback__score=est(4.0, 0.0, 40)), arm("b", feedback__score=est(4.0, 0.0, 40))]
    verdict = decide(constant, policy(), {})
    assert verdict.status == NO_DIFFERENCE
    assert verdict.arms["b"].metrics[SCORE].difference_ci == (0.0, 0.0)
    # a control mean of 0 leaves no margin (stats.mde is relative to it): not decided
    zero = [arm("a", control=True, feedback__score=est(0.0, 0.0, 40)), arm("b", feedback__score=est(0.0, 0.0, 40))]
    assert decide(zero, policy(), {}).status == COLLECTING
    # constant but apart: exactly different
    apart = [arm("a", control=True, feedback__score=est(4.0, 0.0, 40)), arm("b", feedback__score=est(5.0, 0.0, 40))]
    assert decide(apart, policy(), {}).winner == "b"


def test_the_running_state_starts_only_at_min_samples():
    early = [arm("a", control=True, feedback__score=est(3.0, 1.0, 20)), arm("b", feedback__score=est(4.5, 1.0, 20))]
    verdict = decide(early, policy(min_samples=30), {})
    assert verdict.running == {} and verdict.status == COLLECTING
    assert verdict.arms["b"].metrics[SCORE].comparison is not None  # Welch's is still shown


def test_a_look_that_cannot_keep_its_state_decides_on_the_kept_state_alone():
    looks = [arm("a", control=True, feedback__score=est(3.5, 1.0, 3000)), arm("b", feedback__score=est(3.8, 1.0, 3000))]
    kept = {("b", "a", SCORE): RunningState(0.3, -0.1, 0.4)}
    verdict = decide(looks, policy(), kept, extend=False)
    assert verdict.running[("b", "a", SCORE)] == kept[("b", "a", SCORE)]
    assert verdict.status == COLLECTING, "the clear effect of this look is not used: it could not be kept"
    assert decide(looks, policy(), kept).winner == "b"


def test_state_apply_merges_states_and_declares_a_winner_only_against_the_generation_read():
    empty = state.KeptState()
    first = state.StateUpdate({"f": RunningState(0.2, -1.0, 1.0)}, ("f",), expected_generation=0, winner="b@1")
    after = state.apply(empty, first)
    assert after.winner == state.Winner("b@1", 1) and after.running["f"] == RunningState(0.2, -1.0, 1.0)
    # a second replica that read generation 0 too, and would declare c: too late
    rival = state.StateUpdate({"f": RunningState(0.1, -0.5, 2.0)}, ("f",), expected_generation=0, winner="c@1")
    final = state.apply(after, rival)
    assert final.winner == state.Winner("b@1", 1)
    assert final.running["f"] == RunningState(0.1, -0.5, 1.0)
    assert not state.agrees(final, rival, state.Winner("c@1", 1))
    assert state.agrees(final, state.StateUpdate({"f": final.running["f"]}, ("f",), 1), state.Winner("b@1", 1))


def test_analyse_reads_the_winner_by_arm_and_proposes_a_new_one_once():
    plan, config = experiment()
    counters = _counters(plan, {"a": (3.5, 0.0), "b": (3.9, 0.0)}, n=2000)
    first = analyse(plan, config, counters)
    arm_b = plan.arms["b"].arm_id
    context = decision_context(plan, policy_for(plan, config))
    assert first.update.winner == arm_b and first.answered == state.Winner(arm_b, 1, context, since=first.update.since)
    since = state.decode_since(first.update.since)
    assert since[arm_b]["feedback.score"].n == 2000, "the counters it was declared on, kept beside it"
    assert set(first.update.running) <= set(state_keys(plan)) and first.update.running
    kept = state.apply(state.KeptState(), first.update)
    again = analyse(plan, config, counters, kept)
    assert again.verdict.winner == "b" and again.update.winner is None and again.answered == kept.winner
    # an edited arm (another hash) is not the declared winner of this plan
    stale = state.KeptState(kept.running, state.Winner("b@000000000000", 1, context))
    assert analyse(plan, config, counters, stale).update.winner == arm_b


def test_a_winner_declared_on_another_primary_metric_or_guardrails_is_no_winner_now():
    plan, config = experiment()
    counters = _counters(plan, {"a": (3.5, 0.0), "b": (3.9, 0.05)}, n=2000)  # b fails 5% of requests
    kept = state.apply(state.KeptState(), analyse(plan, config, counters).update)
    assert analyse(plan, config, counters, kept).update.winner is None, "the same decision: kept as it is"
    assert kept.winner.arm == plan.arms["b"].arm_id
    guarded_plan, guarded_config = experiment(guardrails=[ERRORS])
    guarded = analyse(guarded_plan, guarded_config, counters_for(guarded_plan, counters), kept)
    assert guarded.verdict.winner is None, "declared before a guardrail came in: not a winner by it"
    other_plan, other_config = experiment(primary="feedback.thumbs")
    assert analyse(other_plan, other_config, counters_for(other_plan, counters), kept).verdict.winner is None


# -- directions, corrupt counters, design effect ----------------------------------------------------------


def test_a_feedback_metric_that_should_go_down_wins_by_going_down():
    plan, config = experiment()
    lower = experiment_with_direction(False)
    counters = _counters(plan, {"a": (3.5, 0.0), "b": (3.1, 0.0)}, n=2000)
    assert analyse(plan, config, counters).verdict.winner == "a"
    assert analyse(lower[0], lower[1], counters_for(lower[0], counters)).verdict.winner == "b"


def experiment_with_direction(higher: bool):
    from abproxy.catalog import Catalog
    from abproxy.config import parse_config

    config = parse_config(
        {
            "upstreams": {"sim": {"base_url": "http://127.0.0.1:9/v1"}},
            "default_upstream": "sim",
            "experiments": {
                "sim": {
                    "unit": "request",
                    "primary_metric": SCORE,
                    "feedback": {"score": {"min": -1000, "max": 1000, "higher_is_better": higher}},
                    "variants": {"a": {"control": True}, "b": {}},
                }
            },
        },
        environ={},
    )
    return Catalog(config).plans["sim"], config


def counters_for(plan, counters: dict[str, ArmCounters]) -> dict[str, ArmCounters]:
    """The same counters under another plan's arm ids (variants a and b)."""
    by_variant = {arm_id.split("@")[0]: value for arm_id, value in counters.items()}
    return {arm.arm_id: by_variant[name] for name, arm in plan.arms.items()}


def test_counters_that_are_not_numbers_are_reported_and_never_decide():
    plan, config = experiment()
    counters = _counters(plan, {"a": (3.5, 0.0), "b": (4.5, 0.0)}, n=2000)
    arm_b = plan.arms["b"].arm_id
    raw = {"requests": "2000", "units": "2000", f"{SCORE}|n": "2000", f"{SCORE}|s": "9000", f"{SCORE}|q": "nan"}
    counters[arm_b] = parse_arm(arm_b, raw, {f"{SCORE}|12": "inf"})
    assert counters[arm_b].metrics[SCORE].corrupt and counters[arm_b].corrupt == [f"{SCORE}|q", f"{SCORE}|h:12"]
    analysis = analyse(plan, config, counters)
    assert (analysis.verdict.status, analysis.verdict.winner, analysis.update.winner) == (COLLECTING, None, None)
    assert analysis.corrupt == (f"b/{SCORE}|q", f"b/{SCORE}|h:12") and "corrupt_counters" in analysis.warnings
    assert parse_arm("x", {"requests": "lots"}, {}).corrupt == ["requests"]


def test_the_design_effect_of_correlated_users_in_a_unit_request_experiment():
    """Kish: 1 + (m − 1)·ICC for users of m requests each; above 1.5 the look warns."""
    plan, config = experiment()
    rng = np.random.default_rng(5)
    counters = {}
    for arm_plan in plan.arms.values():
        users, per_user, icc = 400, 10, 0.2
        y = rng.normal(0, math.sqrt(icc), (users, 1)) + rng.normal(0, math.sqrt(1 - icc), (users, per_user)) + 3.5
        totals = y.sum(axis=1)
        n = np.full(users, float(per_user))
        metric = MetricCounters(
            Moments(users * per_user, float(y.sum()), float((y * y).sum())),
            units=users, unit_yy=float((totals**2).sum()), unit_nn=float((n**2).sum()), unit_yn=float((totals * n).sum()),
        )  # fmt: skip
        counters[arm_plan.arm_id] = ArmCounters(arm_plan.arm_id, requests=users * per_user, units=users * per_user, metrics={SCORE: metric})
    deff = design_effect(plan, counters)
    assert deff == pytest.approx(1 + 9 * 0.2, rel=0.2)
    assert "units_correlated" in analyse(plan, config, counters).warnings


# -- a verdict that keeps watching: revoked winners, harm shown --------------------------------------


def test_a_declared_winner_that_harms_a_guardrail_is_revoked():
    arms = [
        arm("a", control=True, feedback__score=est(3.5, 1.0, 4000), error_rate=rate(0.02, 4000)),
        arm("b", feedback__score=est(3.8, 1.0, 4000), error_rate=rate(0.09, 4000)),
    ]
    verdict = decide(arms, policy(guardrails=[Guardrail(ERRORS, margin=0.01)]), {}, declared="b")
    assert (verdict.status, verdict.winner, verdict.revoked) == ("revoked", None, ("b", ERRORS))
    assert verdict.arms["b"].harmed == (ERRORS,)
    # not yet declared: no revocation, only harm (and no crown)
    fresh = decide(arms, policy(guardrails=[Guardrail(ERRORS, margin=0.01)]), {})
    assert fresh.status != "revoked" and fresh.winner != "b" and fresh.arms["b"].harmed == (ERRORS,)


def test_a_declared_winner_now_worse_on_the_primary_metric_is_revoked():
    arms = [arm("a", control=True, feedback__score=est(3.8, 1.0, 4000)), arm("b", feedback__score=est(3.5, 1.0, 4000))]
    verdict = decide(arms, policy(), {}, declared="b")
    assert (verdict.status, verdict.revoked) == ("revoked", ("b", SCORE))
    # noise around the control is no reason: the winner keeps its name
    level = [arm("a", control=True, feedback__score=est(3.5, 1.0, 400)), arm("b", feedback__score=est(3.52, 1.0, 400))]
    assert decide(level, policy(), {}, declared="b").status == WINNER


def test_a_revocation_is_kept_and_stays_whatever_the_data_do_next():
    plan, config = experiment(guardrails=[ERRORS])
    a, b = (arm.arm_id for arm in plan.arms.values())

    def counters(b_errors: float, n: int) -> dict[str, ArmCounters]:
        def one(arm_id: str, score: float, errors: float) -> ArmCounters:
            metrics = {
                SCORE: MetricCounters(Moments(n, n * score, n * (1 + score * score))),
                ERRORS: MetricCounters(Moments(n, n * errors, n * errors)),
            }
            return ArmCounters(arm_id, requests=n, units=n, metrics=metrics)

        return {a: one(a, 3.0, 0.02), b: one(b, 3.3, b_errors)}

    kept = state.KeptState()
    first = analyse(plan, config, counters(0.02, 20_000), kept)
    kept = state.apply(kept, first.update)
    assert first.verdict.winner == "b"
    # the error rate's running interval comes to show harm (as an interval that follows a moving
    # effect would: the kept intersection of fixed-effect intervals empties instead, see issue 19)
    field = layout.sequential_field(b, a, ERRORS)
    kept = dataclasses.replace(kept, running={**kept.running, field: RunningState(1e-6, 0.03, 0.05)})
    harmed = analyse(plan, config, counters(0.06, 40_000), kept)
    assert harmed.verdict.revoked == ("b", ERRORS) and harmed.update.revoked == ERRORS
    kept = state.apply(kept, harmed.update)
    assert kept.winner.revoked == ERRORS and kept.winner.arm == b
    later = analyse(plan, config, counters(0.02, 40_000), kept)
    assert later.verdict.status == "revoked" and later.update.revoked is None, "revoked once, for good"
    result = summarise(plan, config, counters(0.02, 40_000), later)
    assert result.revoked is not None and (result.revoked.variant, result.revoked.reason) == ("b", ERRORS)
    assert verdict_sentence(result).startswith("Revoked: b, declared the winner, no longer stands: it now harms guardrail")


def test_the_verdict_sentence_says_when_the_winners_effect_faded_and_by_how_much():
    from simkit import counters_at, normal_stream, replay

    plan, config = experiment()
    looks = np.arange(1, 81) * 50
    rng = np.random.default_rng([2020, 1])
    novelty = {"a": {SCORE: normal_stream(rng, looks, 3.5)}, "b": {SCORE: normal_stream(rng, looks, lambda i: 3.5 + np.where(i < 800, 0.35, 0.0))}}
    last = replay(plan, config, novelty, keep=True).analyses[-1]
    result = summarise(plan, config, counters_at(plan, novelty, len(looks) - 1), last)
    assert (result.status, result.winner, result.warnings) == (WINNER, "b", ("effect_drift", "effect_faded"))
    sentence = verdict_sentence(result)
    assert sentence.startswith("Winner: b:") and "But its effect has faded since it was declared: lift +" in sentence
    recent = result.since_declared.metrics[SCORE]
    assert f"over its last {recent.n:,} samples, against +2.7% over the whole experiment" in sentence
    assert recent.lift < result.variant("b").metric(SCORE).lift


def test_of_arms_within_the_mde_the_cheaper_wins_and_the_verdict_says_so():
    from simkit import counters_at, normal_stream, replay

    plan, config = experiment(arms=("a", "b", "c"))
    mde = 0.05 * 3.5
    looks = np.arange(1, 61) * 50
    rng = np.random.default_rng([1934, 3])
    streams = {
        name: {SCORE: normal_stream(rng, looks, 3.5 + lift), "cost_usd": normal_stream(rng, looks, cost, cost / 10)}
        for name, lift, cost in (("a", 0.0, 0.001), ("b", 2 * mde, 0.001), ("c", 2 * mde, 0.01))
    }
    run = replay(plan, config, streams, keep=True)
    result = summarise(plan, config, counters_at(plan, streams, len(looks) - 1), run.analyses[-1])
    assert (result.status, result.winner, result.cheaper_than) == (WINNER, "b", ("c",))
    sentence = verdict_sentence(result)
    assert "Cost: $1.00 per 1,000 requests, against $1.00 for the control, 1.0× as much." in sentence
    assert "c ($10.00 per 1,000 requests) is within the MDE of it on feedback.score but cost more (b: $1.00 per 1,000 requests)" in sentence


def test_while_no_arm_is_yet_shown_the_best_of_several_better_ones_the_verdict_names_them():
    """Two treatments better than the control, one better than the other by about the MDE: early
    on, which is best is not settled, and the sentence says which arms are in the running."""
    mde = 0.05 * 3.5
    arms = [
        arm("a", control=True, feedback__score=est(3.5, 1.0, 150)),
        arm("b", feedback__score=est(3.5 + 3 * mde, 1.0, 150)),
        arm("c", feedback__score=est(3.5 + 4 * mde, 1.0, 150)),
    ]
    verdict = decide(arms, policy(), {})
    assert all(verdict.arms[name].metrics[SCORE].adjusted_p < 0.05 for name in ("b", "c")), "both beat the control"
    assert (verdict.status, verdict.winner, verdict.unsettled) == (COLLECTING, None, ("b", "c"))
