"""The verdict over time by simulation (issue 19). The sample-ratio check: sequential, so that
looking often raises no false alarms, and sticky, so that a mismatch once shown is not forgotten
as the counts grow. Harm that stops an arm: shown soon when it is there, never when it is not.

Measured with these seeds (sample-ratio level 0.001, Dirichlet concentration 100):

* a fair 50/50 split looked at every 20 requests up to 2,000 looks (40,000 requests): flagged in
  0.1% of 1,000 runs; the χ² test the proxy used before, at p < 0.001 at every look, in 2.1%;
* a real 52/48 split: flagged by 20,000 requests in 93.1% of 1,000 runs (median 10,180 requests);
* a 52/48 split for 20,000 requests then a fair one: once flagged, ``srm`` at every later look,
  although by 220,000 requests the cumulative χ² no longer sees it;
* a treatment whose error rate is 8% against the control's 2% from the start (guardrail
  ``error_rate``, margin 1 point), looked at every 100 requests per arm: its harm shown (the arm
  stopped) by 2,000 per arm in 100% of 300 runs, at a median of 500; with equal error rates, in
  none;
* a winner (+2×MDE on feedback.score) declared before its error rate rises from 2% to 8% at
  8,000 requests per arm, looked at every 200 up to 20,000: revoked in 189 of 189 runs, a median
  of 2,200 per arm after the rise; when its error rate stays at 2%, in none. On the cumulative
  interval alone (no re-check on what came after the declaration): 189 of 189, median 3,200;
  before an emptied intersection started the sequence again, 0 of 31 (the emptied interval
  could never show harm);
* a novelty effect (+2×MDE for the first 20% of 4,000 requests per arm, then none), looked at
  every 50: crowned in 300 of 300 runs, and ``effect_faded`` at the end in 95.0% (88.7% at 3,000
  per arm); a steady effect of 1× or 2× the MDE: crowned in all, said to fade in none; the
  interval since the declaration covers the true effect since then in 100% of runs in all three;
* three arms, t1 = +2×MDE and t2 = +1×MDE, looked at every 50 per arm: t2 shown as the winner at
  some look in 0.3% of 300 runs (choosing against the control alone: 3.0%), t1 the final winner
  in 100%; two arms equally better, one ten times the other's cost: the cheaper wins, the
  costlier named beside it, in 99.0% of 200 runs; the costlier crowned at some look in 1.0%;
* a lognormal latency (σ = 1.5) as guardrail with no true difference: non-inferior by 5,000 per
  arm in 85.0% of 300 runs (compared on values capped at the control's 95th percentile); 25%
  slower: never;
* ``samples_needed`` with a true effect of the MDE: runs still collecting at ½×, 1×, 2× the fixed
  horizon decide within it in 78.7%, 78.1%, 80.3% (of 1,658 / 972 / 244).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special
from simkit import (
    ERRORS,
    LATENCY,
    SCORE,
    binary_stream,
    experiment,
    fixed_horizon_per_arm,
    lognormal_stream,
    normal_stream,
    replay,
    share,
)

from abproxy.analysis import state
from abproxy.analysis.analyse import analyse
from abproxy.analysis.summarise import samples_needed
from abproxy.recording.counters import ArmCounters
from abproxy.stats.decisions import SRM_THRESHOLD, sequential_srm_p_value
from abproxy.stats.sequential import running_p_value

pytestmark = pytest.mark.slow

EVERY = 20


def first_flag(first_arm: np.ndarray, looks: int) -> int | None:
    """The first look at which the running sequential p-value falls below the level, with the
    first arm's cumulative count at each look (the other arm has the rest)."""
    kept = None
    for look in range(looks):
        n = EVERY * (look + 1)
        a = int(first_arm[look])
        now = sequential_srm_p_value([a, n - a], [1, 1])
        kept = running_p_value(kept, now) if now is not None else kept
        if kept is not None and kept < SRM_THRESHOLD:
            return look
    return None


def chi2_ever_flags(first_arm: np.ndarray, looks: int) -> bool:
    n = EVERY * np.arange(1, looks + 1)
    statistic = (2 * first_arm - n) ** 2 / n  # (a − n/2)²/(n/2) twice over
    return bool((special.chdtrc(1, statistic) < SRM_THRESHOLD).any())


def test_a_fair_split_looked_at_2000_times_is_flagged_in_at_most_1_percent():
    rng = np.random.default_rng(19)
    runs, looks = 1_000, 2_000
    flagged = chi2_flagged = 0
    for _ in range(runs):
        first_arm = np.cumsum(rng.binomial(EVERY, 0.5, size=looks))
        flagged += first_flag(first_arm, looks) is not None
        chi2_flagged += chi2_ever_flags(first_arm, looks)
    print(f"\nfair split, {looks} looks: flagged {flagged / runs:.1%}; χ² at every look {chi2_flagged / runs:.1%}")
    assert flagged / runs <= 0.01
    assert chi2_flagged / runs > flagged / runs, "what the sequential test is for"


def test_a_52_48_split_is_caught_by_20000_requests_in_at_least_90_percent():
    rng = np.random.default_rng(1952)
    runs, looks = 1_000, 20_000 // EVERY
    firsts = [first_flag(np.cumsum(rng.binomial(EVERY, 0.52, size=looks)), looks) for _ in range(runs)]
    caught = [EVERY * (look + 1) for look in firsts if look is not None]
    print(f"\n52/48: caught by 20,000 in {len(caught) / runs:.1%}, median {np.median(caught):.0f} requests")
    assert len(caught) / runs >= 0.90


def test_a_mismatch_once_shown_stays_shown_while_the_counts_even_out():
    """Through the verdict layer and the state kept between looks: 52/48 for 20,000 requests,
    then a fair split for 200,000 more."""
    plan, config = experiment()
    arms = [arm.arm_id for arm in plan.arms.values()]
    rng = np.random.default_rng(7)
    shares = [0.52] * 100 + [0.5] * 1_000
    kept, statuses = state.KeptState(), []
    a = n = 0
    for first_share in shares:
        a += int(rng.binomial(200, first_share))
        n += 200
        counters = {arms[0]: ArmCounters(arms[0], requests=a, units=a), arms[1]: ArmCounters(arms[1], requests=n - a, units=n - a)}
        analysis = analyse(plan, config, counters, kept)
        kept = state.apply(kept, analysis.update)
        statuses.append(analysis.verdict.status)
    flagged = statuses.index("srm")
    assert flagged < 100, "shown during the mismatch"
    assert set(statuses[flagged:]) == {"srm"}, "and never forgotten"
    assert special.chdtrc(1, (2 * a - n) ** 2 / n) > SRM_THRESHOLD, "though the cumulative χ² no longer sees it"


@pytest.mark.parametrize(("treatment_rate", "bound"), [(0.08, 0.95), (0.02, 0.0)], ids=["harm", "no-harm"])
def test_harm_from_the_start_is_shown_soon_and_never_without_it(treatment_rate: float, bound: float):
    plan, config = experiment(guardrails=[ERRORS])
    looks = np.arange(1, 21) * 100
    shown, when = [], []
    for index in range(300):
        rng = np.random.default_rng([1903, index])
        streams = {
            "a": {SCORE: normal_stream(rng, looks, 3.5), ERRORS: binary_stream(rng, looks, 0.02)},
            "b": {SCORE: normal_stream(rng, looks, 3.5), ERRORS: binary_stream(rng, looks, treatment_rate)},
        }
        run = replay(plan, config, streams, keep=True, stop=lambda analysis: bool(analysis.verdict.arms["b"].harmed))
        harmed = bool(run.analyses[-1].verdict.arms["b"].harmed)
        shown.append(harmed)
        if harmed:
            when.append(int(looks[len(run.analyses) - 1]))
    median = np.median(when) if when else float("nan")
    print(f"\nerror rate {treatment_rate:.0%} against 2%: harm shown in {share(shown):.1%} of 300 runs, median {median:.0f} per arm")
    if bound:
        assert share(shown) >= bound
    else:
        assert not any(shown), "no harm, no stop"


RISE = 8_000


@pytest.mark.parametrize(("later_rate", "bound"), [(0.08, 0.90), (0.02, 0.02)], ids=["rises", "stays"])
def test_a_winner_whose_error_rate_rises_after_it_was_declared_is_revoked(later_rate: float, bound: float):
    """Declared on feedback.score (+2×MDE) with error rates equal at 2%; from 8,000 requests per arm
    the winner's error rate is ``later_rate``. Looked at every 200 per arm up to 20,000."""
    plan, config = experiment(guardrails=[ERRORS])
    looks = np.arange(1, 101) * 200
    declared = revoked = 0
    after: list[int] = []
    for index in range(200):
        rng = np.random.default_rng([1919, index])
        treatment_errors = lambda i: np.where(i < RISE, 0.02, later_rate)  # noqa: E731
        streams = {
            "a": {SCORE: normal_stream(rng, looks, 3.5), ERRORS: binary_stream(rng, looks, 0.02)},
            "b": {SCORE: normal_stream(rng, looks, 3.85), ERRORS: binary_stream(rng, looks, treatment_errors)},
        }
        run = replay(plan, config, streams)
        if "b" not in run.winners[: RISE // 200]:
            continue  # not declared before the rise: not the case this test is about
        declared += 1
        if run.statuses[-1] == "revoked":
            revoked += 1
            after.append(int(looks[run.first("revoked")]) - RISE)
    median = np.median(after) if after else float("nan")
    print(f"\nerror rate 2% → {later_rate:.0%} after the declaration: revoked in {revoked} of {declared} runs, median {median:.0f} per arm after")
    assert declared >= 180, "the case arises: a winner declared before the rise"
    if later_rate > 0.02:
        assert revoked / declared >= bound
    else:
        assert revoked / declared <= bound, "a winner that stays as good is not revoked"


NOVELTY_TOTAL = 4_000
MDE = 0.05 * 3.5


@pytest.mark.parametrize(
    ("effect", "faded_at_least", "faded_at_most"),
    [
        (lambda i: np.where(i < 0.2 * NOVELTY_TOTAL, 2 * MDE, 0.0), 0.90, 1.0),
        (lambda i: np.full(i.shape, MDE), 0.0, 0.02),
        (lambda i: np.full(i.shape, 2 * MDE), 0.0, 0.02),
    ],
    ids=["novelty", "steady-at-MDE", "steady-at-2xMDE"],
)
def test_an_effect_that_fades_after_the_winner_is_declared_is_said_to_have(effect, faded_at_least, faded_at_most):
    """A treatment better by 2×MDE for the first 20% of 4,000 requests per arm only (a novelty
    effect), looked at every 50: crowned, and at the end ``effect_faded`` with the recent effect
    beside the cumulative one. A steady effect of the MDE or more is not said to fade."""
    plan, config = experiment()
    looks = np.arange(1, NOVELTY_TOTAL // 50 + 1) * 50
    crowned = faded = covered = 0
    for index in range(300):
        rng = np.random.default_rng([2020, index])
        streams = {"a": {SCORE: normal_stream(rng, looks, 3.5)}, "b": {SCORE: normal_stream(rng, looks, lambda i: 3.5 + effect(i))}}
        last = replay(plan, config, streams, stop=lambda analysis: False, keep=True).analyses[-1]
        crowned += last.verdict.winner == "b"
        faded += "effect_faded" in last.warnings
        declared_at = int(state.decode_since(last.answered.since)[plan.arms["b"].arm_id][SCORE].n)
        low, high = last.verdict.since_declared[SCORE].difference_ci
        covered += low <= float(np.mean(effect(np.arange(declared_at, NOVELTY_TOTAL)))) <= high
        assert last.verdict.arms["b"].metrics[SCORE].difference_ci is not None, "never an empty interval"
    print(f"\ncrowned and still the winner in {crowned} of 300 runs; effect_faded at the end in {faded / 300:.1%}; "
          f"the interval since the declaration covers the effect since then in {covered / 300:.1%}")  # fmt: skip
    assert crowned == 300
    assert faded_at_least <= faded / 300 <= faded_at_most
    assert covered / 300 >= 0.95


COST = "cost_usd"


def test_among_many_arms_the_best_wins_and_one_that_leads_by_chance_early_does_not():
    """Three arms looked at every 50 per arm up to 3,000: t1 = +2×MDE, t2 = +1×MDE over the
    control. A candidate wins only once no other arm can still be better than it by the MDE."""
    plan, config = experiment(arms=("a", "t1", "t2"))
    looks = np.arange(1, 61) * 50
    t2_ever = t1_final = 0
    for index in range(300):
        rng = np.random.default_rng([1933, index])
        streams = {
            "a": {SCORE: normal_stream(rng, looks, 3.5)},
            "t1": {SCORE: normal_stream(rng, looks, 3.5 + 2 * MDE)},
            "t2": {SCORE: normal_stream(rng, looks, 3.5 + MDE)},
        }
        run = replay(plan, config, streams)
        t2_ever += "t2" in run.winners
        t1_final += run.winners[-1] == "t1"
    print(f"\nthree arms: t2 shown as the winner at some look in {t2_ever / 300:.1%}; t1 the final winner in {t1_final / 300:.1%}")
    assert t2_ever / 300 <= 0.02
    assert t1_final / 300 >= 0.95


def test_of_two_arms_within_the_mde_of_each_other_the_cheaper_wins():
    """b and c equally better than the control (+2×MDE), c ten times b's cost per request."""
    plan, config = experiment(arms=("a", "b", "c"))
    looks = np.arange(1, 61) * 50
    cheaper = costlier = 0
    for index in range(200):
        rng = np.random.default_rng([1934, index])
        streams = {
            name: {SCORE: normal_stream(rng, looks, 3.5 + lift), COST: normal_stream(rng, looks, cost, cost / 10)}
            for name, lift, cost in (("a", 0.0, 0.001), ("b", 2 * MDE, 0.001), ("c", 2 * MDE, 0.01))
        }
        run = replay(plan, config, streams, keep=True)
        last = run.analyses[-1]
        cheaper += run.winners[-1] == "b" and last.verdict.cheaper_than == ("c",)
        costlier += "c" in run.winners
    print(f"\ntwo equal arms: the cheaper the winner, the costlier named beside it, in {cheaper / 200:.1%}; "
          f"the costlier crowned at some look in {costlier / 200:.1%} (beating its twin head to head by chance)")  # fmt: skip
    assert cheaper / 200 >= 0.95
    assert costlier / 200 <= 0.02


@pytest.mark.parametrize(("slower", "bound"), [(1.0, 0.80), (1.25, 0.0)], ids=["no-harm", "25%-slower"])
def test_a_heavy_tailed_latency_guardrail_is_cleared_when_there_is_no_harm(slower: float, bound: float):
    """Lognormal latency (σ = 1.5: the 99th percentile 33× the median) as the guardrail, its
    default margin 10%, looked at every 250 requests per arm up to 5,000. Compared on values
    capped at the control's 95th percentile: non-inferiority shown in at least 80% of runs
    without harm (on plain means: 19%), and never when the treatment is 25% slower."""
    plan, config = experiment(guardrails=[LATENCY])
    looks = np.arange(1, 21) * 250
    shown = []
    for index in range(300):
        rng = np.random.default_rng([1915, index])
        streams = {
            "a": {SCORE: normal_stream(rng, looks, 3.5), LATENCY: lognormal_stream(rng, looks, 800.0, 1.5)},
            "b": {SCORE: normal_stream(rng, looks, 3.5), LATENCY: lognormal_stream(rng, looks, 800.0 * slower, 1.5)},
        }
        last = replay(plan, config, streams, keep=True).analyses[-1]
        shown.append(bool(last.verdict.arms["b"].metrics[LATENCY].non_inferior))
    print(f"\nlognormal latency ×{slower}: non-inferiority shown by 5,000 per arm in {share(shown):.1%} of 300 runs")
    if bound:
        assert share(shown) >= bound
    else:
        assert not any(shown)


def test_samples_needed_is_a_forecast_given_what_has_been_seen():
    """True effect = the MDE on feedback.score, looked at every 1/25 of the fixed horizon n_f.
    At ½ n_f, n_f and 2 n_f, for every run still collecting: does it decide within the
    ``samples_needed`` it shows? In 70–90% of them at each (80% is what it forecasts)."""
    plan, config = experiment()
    fixed = fixed_horizon_per_arm(2.0, MDE)
    step = round(fixed / 25)
    looks = np.arange(1, int(8 * fixed / step) + 1) * step
    checks = {share_of: int(np.argmin(abs(looks - share_of * fixed))) for share_of in (0.5, 1.0, 2.0)}
    reached: dict[float, list[bool]] = {share_of: [] for share_of in checks}
    for index in range(2_000):
        rng = np.random.default_rng([1212, index])
        streams = {"a": {SCORE: normal_stream(rng, looks, 3.5)}, "b": {SCORE: normal_stream(rng, looks, 3.5 + MDE)}}
        run = replay(plan, config, streams, keep=True, stop=lambda analysis: analysis.verdict.status != "collecting")
        last = len(run.analyses) - 1
        decided_at = looks[last] if run.analyses[last].verdict.status != "collecting" else np.inf
        for share_of, look in checks.items():
            if look <= last and run.analyses[look].verdict.status == "collecting":
                needed, _ = samples_needed(run.analyses[look], "a")
                assert needed["b"] > 0, "never 0 while undecided"
                reached[share_of].append(bool(decided_at <= looks[look] + needed["b"]))
    shown = ", ".join(f"{share_of}× n_f: {np.mean(hits):.1%} of {len(hits)}" for share_of, hits in reached.items())
    print(f"\ndecided within samples_needed — {shown}")
    for hits in reached.values():
        assert len(hits) >= 150 and 0.70 <= np.mean(hits) <= 0.90
