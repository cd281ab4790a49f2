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
  stopped) by 2,000 per arm in 100% of 300 runs, at a median of 800; with equal error rates, in
  none.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special
from simkit import ERRORS, SCORE, binary_stream, experiment, normal_stream, replay, share

from abproxy.analysis import state
from abproxy.analysis.analyse import analyse
from abproxy.recording.store import ArmCounters
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
    for share in shares:
        a += int(rng.binomial(200, share))
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
