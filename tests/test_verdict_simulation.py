"""The verdict layer by simulation, through ``analysis.analyse()`` and ``stats.verdict.decide()``
with the state kept between looks as Redis keeps it (tests/simkit.py): every row of issue 12's
table, seeded, 1,000 runs each (fewer for the comparisons beside them). ``pytest -s`` prints the
figures; the README quotes them. (The branch point's figures come from a script run against that
checkout, not kept here; on 300 runs each.)

Measured with these seeds (α = 0.05, min_samples = 30, stats.mde = 0.05, the multi-scale
mixture); in brackets, the branch point's verdict on the same data (the state kept at every
look, as its flusher kept it):

* guardrail harm (+0.3σ on the primary, error rate 2% → 4%, default margin 1 point, 40 looks up to
  4,000 per arm): crowned in 0 of 1,000 runs [95.7%, withdrawn later in 96.5% of those]; held back
  by ``error_rate`` at the end in all. With equal error rates the same treatment is crowned once
  a point of harm is ruled out: in 97.0% of 200 runs, at a median of 3,000 per arm.
* two treatments equally better (+0.3σ each): the name changed after it was first declared in
  0.1% of the 1,000 runs that declared one [65.3%].
* A/B at 0.2σ, 60 looks: a winner later not the winner in 0 of 1,000 runs with the state kept at
  every look; kept only every 6th look, or never, 26.3% / 43.3% of 300 runs [27.0% / 44.7%].
* an effect that vanishes (+0.5σ for the first 300 per arm, then none): the intersection of the
  always-valid intervals would empty in 98.9% of runs (the sequence starts again there);
  ``effect_drift`` is raised at every look from then on, ``no_difference`` is never reached from
  it, and the winner declared before keeps its name (in 988 of 989; the other revoked, what came
  after the declaration showing it worse: at most α is the price of that re-check).
* A/A: ever a winner in 1.4% (1,000 runs, 20 looks), 2.2% (1,000 runs, 100 looks) and
  3.5% (400 runs, 1,000 looks) [1.0% of 300 runs with 20 looks].
* samples by which 80% of runs decide, over the fixed-horizon n at the true effect (looks every
  1/25 of it), and beside it on the same data GrowthBook's default sequential test (N* = 5,000),
  the former mixture sharp at ±δ, and Johari et al.'s N(0, δ²) and N(0, (0.3σ)²): a score at ¼,
  1, 4 × the MDE 1.92× / 1.72× / 2.00× (GrowthBook 1.76× / 1.88× / more than 3×; sharp: more
  than 3× / 1.56× / 2.53×; N(0, δ²) 2.12× / 1.80× / 2.37×; N(0, (0.3σ)²) 2.32× / 1.88× / 1.94×);
  a 10% thumbs rate at the MDE 1.64× (2.08×, 1.56×, 1.72×, 2.68×). ``samples_needed`` at the
  first look forecast 0.88× / 0.96× of the n by which 80% of runs decided at the MDE (its
  calibration later on: tests/test_watch_simulation.py).
* correlated users in a ``unit: request`` A/A (ICC 0.3, 200 users of 5–50 requests): design
  effect 5.9 (requests split per request) / 10.8 (each user's in one arm); ``units_correlated``
  in every run; the per-request Welch test p < 0.05 in 4.3% / 56.9%.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from simkit import (
    ERRORS,
    SCORE,
    THUMBS,
    binary_stream,
    experiment,
    fixed_horizon_per_arm,
    normal_stream,
    replay,
    share,
)

from abproxy.analysis.analyse import analyse
from abproxy.analysis.summarise import samples_needed
from abproxy.recording.counters import ArmCounters, MetricCounters
from abproxy.stats.estimates import Estimate, from_moments, proportion_from_moments
from abproxy.stats.sequential import Component, Mixture, default_mixture, msprt
from abproxy.stats.summary import Moments

pytestmark = pytest.mark.slow

SIMS = 1_000
ALPHA = 0.05
BOUND = ALPHA  # the table's "must be" for false winners


def per_arm(step: int, count: int) -> np.ndarray:
    return np.arange(1, count + 1) * step


# -- guardrails as non-inferiority ----------------------------------------------------------------


def test_a_treatment_that_doubles_the_error_rate_is_not_crowned():
    plan, config = experiment(guardrails=[ERRORS])
    looks = per_arm(100, 40)
    crowned, held_back = [], []
    for index in range(SIMS):
        rng = np.random.default_rng([1201, index])
        streams = {
            "a": {SCORE: normal_stream(rng, looks, 3.5), ERRORS: binary_stream(rng, looks, 0.02)},
            "b": {SCORE: normal_stream(rng, looks, 3.8), ERRORS: binary_stream(rng, looks, 0.04)},
        }
        run = replay(plan, config, streams, keep=True)
        crowned.append(run.ever_winner)
        held_back.append(run.analyses[-1].verdict.arms["b"].held_back_by == (ERRORS,))
    print(f"\nguardrail harm: crowned in {share(crowned):.4f} of {SIMS} runs; held back by error_rate at the end in {share(held_back):.4f}")
    assert share(crowned) <= BOUND
    assert share(held_back) >= 0.95


def test_with_equal_error_rates_the_same_treatment_is_crowned_once_harm_is_ruled_out():
    plan, config = experiment(guardrails=[ERRORS])
    looks = per_arm(150, 60)
    crowned_at = []
    for index in range(200):
        rng = np.random.default_rng([1202, index])
        streams = {
            "a": {SCORE: normal_stream(rng, looks, 3.5), ERRORS: binary_stream(rng, looks, 0.02)},
            "b": {SCORE: normal_stream(rng, looks, 3.8), ERRORS: binary_stream(rng, looks, 0.02)},
        }
        run = replay(plan, config, streams, stop=lambda analysis: analysis.verdict.winner is not None)
        first = run.first("winner")
        crowned_at.append(looks[first] if first is not None else math.inf)
    median = float(np.median(crowned_at))
    print(f"\nno harm: crowned in {share([math.isfinite(n) for n in crowned_at]):.3f} of 200 runs, median at {median:.0f} per arm")
    assert share([math.isfinite(n) for n in crowned_at]) >= 0.9
    assert 1_000 < median < 8_000  # a point of harm on a 2% rate takes thousands per arm to rule out


# -- a stable winner --------------------------------------------------------------------------------


def test_two_equally_better_treatments_the_winner_keeps_its_name():
    plan, config = experiment(arms=("a", "b", "c"))
    looks = per_arm(40, 40)
    declared, changed = 0, 0
    for index in range(SIMS):
        rng = np.random.default_rng([1203, index])
        streams = {name: {SCORE: normal_stream(rng, looks, mean)} for name, mean in (("a", 3.5), ("b", 3.8), ("c", 3.8))}
        run = replay(plan, config, streams)
        if run.ever_winner:
            declared += 1
            changed += run.name_changes > 0
    print(f"\ntwo equal winners: declared in {declared} of {SIMS} runs, the name changed afterwards in {changed / declared:.4f}")
    assert declared >= 0.9 * SIMS
    assert changed / declared <= 0.05


@pytest.mark.parametrize(("save_every", "sims", "bound"), [(1, SIMS, 0.01), (6, 300, None), (None, 300, None)])
def test_a_winner_stays_the_winner_when_every_look_keeps_its_state(save_every, sims, bound):
    """Every look keeps its state now (live results, report, flush alike); keeping it only
    every 6th look, or never, is what let a winner fall back."""
    plan, config = experiment()
    looks = per_arm(25, 60)
    lost, declared = [], 0
    for index in range(sims):
        rng = np.random.default_rng([1204, index])
        streams = {"a": {SCORE: normal_stream(rng, looks, 3.5)}, "b": {SCORE: normal_stream(rng, looks, 3.7)}}
        run = replay(plan, config, streams, save_every=save_every)
        declared += run.ever_winner
        lost.append(run.lost_winner)
    kept = f"every {save_every} look(s)" if save_every else "never"
    print(f"\nA/B at 0.2σ, {sims} runs, state kept {kept}: declared {declared}, a winner later lost in {share(lost):.4f}")
    if bound is not None:
        assert declared >= 0.5 * sims
        assert share(lost) <= bound
    else:
        assert share(lost) > 0.01, "without the kept state the mechanism the issue measured should show"


# -- drift --------------------------------------------------------------------------------------------


def test_an_effect_that_vanishes_is_drift_not_no_difference():
    plan, config = experiment()
    looks = per_arm(150, 40)
    drifted, held, problems = [], [], []

    def vanishing(index: np.ndarray) -> np.ndarray:
        return np.where(index < 300, 3.5 + 0.5, 3.5)

    for index in range(SIMS):
        rng = np.random.default_rng([1205, index])
        streams = {"a": {SCORE: normal_stream(rng, looks, 3.5)}, "b": {SCORE: normal_stream(rng, looks, vanishing)}}
        run = replay(plan, config, streams, keep=True)
        start = next((i for i, w in enumerate(run.warnings) if "effect_drift" in w), None)
        drifted.append(start is not None)
        if start is None:
            continue
        if not all("effect_drift" in w for w in run.warnings[start:]):
            problems.append(f"run {index}: effect_drift not raised at every look after {start}")
        if "no_difference" in run.statuses[start:]:
            problems.append(f"run {index}: no_difference from contradictory evidence")
        winner_before = run.winners[start - 1] if start else None
        if winner_before is not None:
            held.append(all(w == winner_before for w in run.winners[start:]))
            if not held[-1] and run.statuses[-1] != "revoked":
                problems.append(f"run {index}: the winner declared before the drift was renamed")
    print(f"\nvanishing effect: drift detected in {share(drifted):.4f} of {SIMS} runs; a winner declared before kept "
          f"its name in {share(held):.4f} of {len(held)}, revoked in the others")
    assert not problems, problems[:5]
    assert share(drifted) >= 0.8
    assert held and share(held) >= 0.99, "revoked only when what came after the declaration shows it losing: at most α"


# -- A/A ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("looks", "runs"), [(20, SIMS), (100, SIMS), (1_000, 400)])
def test_aa_ever_declares_a_winner_at_most_5_percent(looks, runs):
    plan, config = experiment()
    at = per_arm(50, looks)
    ever = []
    for index in range(runs):
        rng = np.random.default_rng([1206, looks, index])
        streams = {"a": {SCORE: normal_stream(rng, at, 3.5)}, "b": {SCORE: normal_stream(rng, at, 3.5)}}
        ever.append(replay(plan, config, streams, stop=lambda analysis: analysis.verdict.winner is not None).ever_winner)
    print(f"\nA/A, {runs} runs × {looks} looks: ever a winner in {share(ever):.4f}")
    assert share(ever) <= BOUND


# -- efficiency ---------------------------------------------------------------------------------------


def _estimates_at_looks(streams, looks, rate: bool) -> Iterator[tuple[float, Estimate, Estimate]]:
    """(n per arm, control, treatment) at each look once both arms have 30 observations."""
    make = proportion_from_moments if rate else from_moments
    for look in range(len(looks)):
        control, treatment = (make(Moments(s.n[look], s.s[look], s.q[look])) for s in (streams["a"], streams["b"]))
        if control is not None and treatment is not None and control.n >= 30:
            yield float(looks[look]), control, treatment


def _msprt_decided(streams, looks, rate: bool, mixture_for: Callable[[Estimate, Estimate], Mixture]) -> float:
    """When the mSPRT with this mixture alone would first reject, its p-value a running minimum."""
    running = 1.0
    for at, control, treatment in _estimates_at_looks(streams, looks, rate):
        running = min(running, msprt(control, treatment, ALPHA, mixture_for(control, treatment)).p_value)
        if running < ALPHA:
            return at
    return math.inf


def _centred_msprt_decided(streams, looks, rate: bool, tau2: float | None) -> float:
    """When Johari et al.'s N(0, τ²) mixture alone would first reject (τ² None: the former
    default, (0.3σ)²)."""
    return _msprt_decided(
        streams, looks, rate, lambda c, t: Mixture.normal(tau2) if tau2 is not None else default_mixture(c, t)
    )


def _sharp_mixture_decided(streams, looks, rate: bool, relative_effect: float) -> float:
    """When abproxy's former mixture, ½N(±δ, (δ/4)²) alone, would first reject."""

    def sharp(control: Estimate, _: Estimate) -> Mixture:
        delta = relative_effect * abs(control.mean)
        return Mixture((Component(1.0, delta, (delta / 4) ** 2),))

    return _msprt_decided(streams, looks, rate, sharp)


def _growthbook_decided(streams, looks, rate: bool, tuning: float = 5_000.0) -> float:
    """When GrowthBook's default sequential test would first call the difference significant:
    Waudby-Smith et al.'s normal-mixture confidence sequence, ρ tuned to be tightest at N* =
    5,000 observations in all (gbstats' ``sequential_tuning_parameter``), on the per-observation
    variance SE²·N, N the two arms' observations."""
    log_alpha = math.log(ALPHA)
    rho2 = (-2 * log_alpha + math.log(-2 * log_alpha + 1)) / tuning
    for at, control, treatment in _estimates_at_looks(streams, looks, rate):
        total = control.n + treatment.n
        s2 = (control.variance_of_mean + treatment.variance_of_mean) * total
        spread = total * rho2 + 1
        half = math.sqrt(s2) * math.sqrt(2 * spread * math.log(math.sqrt(spread) / ALPHA) / (total * total * rho2))
        if abs(treatment.mean - control.mean) > half:
            return at
    return math.inf


EFFICIENCY = [("score", 0.25, 2.1), ("score", 1.0, 1.8), ("score", 4.0, 2.1), ("thumbs", 1.0, 1.75)]


@pytest.mark.parametrize(("kind", "times_mde", "bound"), EFFICIENCY, ids=[f"{k}-{m}xMDE" for k, m, _ in EFFICIENCY])
def test_samples_to_decide_at_any_effect_size(kind, times_mde, bound):
    """A true effect of ``times_mde`` × ``stats.mde``: the per-arm n by which 80% of runs crowned
    the treatment, over the fixed-horizon n for 80% power at that effect; beside it, on the same
    data, GrowthBook's default sequential test, abproxy's former mixture (sharp at ±δ) and
    Johari et al.'s N(0, τ²) (τ = δ, and the fallback τ = 0.3σ); and, at the MDE, what
    ``samples_needed`` forecast at the first look."""
    metric = SCORE if kind == "score" else THUMBS
    plan, config = experiment(primary=metric)
    if kind == "score":
        control_mean, effect = 3.5, times_mde * 0.05 * 3.5
        variance_sum = 2.0
    else:
        control_mean, effect = 0.10, times_mde * 0.05 * 0.10
        variance_sum = 0.10 * 0.90 + (0.10 + effect) * (0.90 - effect)
    fixed = fixed_horizon_per_arm(variance_sum, effect)
    looks = np.unique(np.round(np.linspace(fixed / 25, 3 * fixed, 75)).astype(int))
    decided, growthbook, sharp, centred_tuned, centred_former, predicted = [], [], [], [], [], []
    for index in range(SIMS):
        rng = np.random.default_rng([1207, index])
        if kind == "score":
            arms = {"a": normal_stream(rng, looks, control_mean), "b": normal_stream(rng, looks, control_mean + effect)}
        else:
            arms = {"a": binary_stream(rng, looks, control_mean), "b": binary_stream(rng, looks, control_mean + effect)}
        streams = {name: {metric: stream} for name, stream in arms.items()}
        run = replay(plan, config, streams, keep=True, stop=lambda analysis: analysis.verdict.winner is not None)
        first = run.first("winner")
        decided.append(looks[first] if first is not None else math.inf)
        growthbook.append(_growthbook_decided(arms, looks, kind == "thumbs"))
        if times_mde == 1.0:
            needed, _ = samples_needed(run.analyses[0], "a")
            predicted.append(needed["b"] + looks[0])
        if index < 300:
            sharp.append(_sharp_mixture_decided(arms, looks, kind == "thumbs", 0.05))
            mde_effect = 0.05 * control_mean
            centred_tuned.append(_centred_msprt_decided(arms, looks, kind == "thumbs", mde_effect**2))
            centred_former.append(_centred_msprt_decided(arms, looks, kind == "thumbs", None))

    def at_80(times: list[float]) -> float:
        """inf when more than a fifth of the runs never decided within 3× the fixed horizon."""
        return float(np.quantile(np.array(times, dtype=float), 0.8, method="higher")) / fixed

    ratio, gb = at_80(decided), at_80(growthbook)
    print(f"\n{kind} at {times_mde}× the MDE: fixed horizon {fixed:,.0f} per arm; 80% decided by {ratio:.2f}× it "
          f"(GrowthBook's default on the same data: {gb:.2f}×; the former ±δ mixture {at_80(sharp):.2f}×; "
          f"N(0, δ²) {at_80(centred_tuned):.2f}×; N(0, (0.3σ)²) {at_80(centred_former):.2f}×)", end="")  # fmt: skip
    if predicted:
        prediction = float(np.median(predicted)) / float(np.quantile(decided, 0.8))
        print(f"; samples_needed at the first look / measured: {prediction:.2f}", end="")
        assert 0.85 <= prediction <= 1.15, "samples_needed at the first look forecasts when 80% of runs decide"
    assert ratio <= bound
    if times_mde >= 1:
        assert ratio < gb, "ahead of GrowthBook's default (tuned to 5,000 observations) on the same data"
    if times_mde != 1:
        assert ratio < at_80(sharp), "ahead of the mixture sharp at ±δ away from δ"
    else:
        assert ratio < 1.15 * at_80(sharp), "and little behind it at δ"


# -- units: the design effect of a unit: request experiment -----------------------------------------


def _user_sums(rng: np.random.Generator, users: int, icc: float, split: bool) -> dict[str, MetricCounters]:
    """One A/A run: users of 5–50 requests each, y = b_u + e with Var(b) = icc; each request
    assigned at random (``split``, as ``unit: request`` does) or each user's all to one arm."""
    counts = rng.integers(5, 51, users)
    effects = rng.standard_normal(users) * math.sqrt(icc)
    owner = np.repeat(np.arange(users), counts)
    y = effects[owner] + rng.standard_normal(owner.size) * math.sqrt(1 - icc) + 3.5
    arm_of = rng.integers(0, 2, owner.size) if split else rng.integers(0, 2, users)[owner]
    found = {}
    for arm, name in enumerate(("a", "b")):
        mine = arm_of == arm
        totals = np.bincount(owner[mine], weights=y[mine], minlength=users)
        sizes = np.bincount(owner[mine], minlength=users).astype(float)
        seen = sizes > 0
        found[name] = MetricCounters(
            Moments(float(mine.sum()), float(y[mine].sum()), float((y[mine] ** 2).sum())),
            units=int(seen.sum()), unit_yy=float((totals**2).sum()), unit_nn=float((sizes**2).sum()),
            unit_yn=float((totals * sizes).sum()),
        )  # fmt: skip
    return found


@pytest.mark.parametrize("split", [True, False], ids=["requests-split", "users-in-one-arm"])
def test_correlated_users_of_a_unit_request_experiment_are_warned_about(split):
    """ICC 0.3, 200 users of 5–50 requests, no difference. Split at random per request (what
    ``unit: request`` does) the per-request test holds α — a user's effect lands on both arms —
    while each arm's own interval is √(design effect) too narrow; kept in one arm per user (an app
    that pins users), the per-request test finds differences that are not there. Either way the
    look says ``units_correlated``."""
    plan, config = experiment()
    warned, welch, verdicts, effects = [], [], [], []
    for index in range(SIMS):
        rng = np.random.default_rng([1208, split, index])
        sums = _user_sums(rng, 200, 0.3, split)
        counters = {
            plan.arms[name].arm_id: ArmCounters(plan.arms[name].arm_id, requests=int(m.moments.n), units=int(m.moments.n), metrics={SCORE: m})
            for name, m in sums.items()
        }
        analysis = analyse(plan, config, counters)
        warned.append("units_correlated" in analysis.warnings)
        effects.append(analysis.design_effect)
        comparison = analysis.verdict.arms["b"].metrics[SCORE].comparison
        welch.append(comparison.p_value < ALPHA)
        verdicts.append(analysis.verdict.winner is not None)
    how = "split per request" if split else "users kept in one arm"
    print(f"\ncorrelated users ({how}), {SIMS} A/A runs: design effect median {np.median(effects):.1f}, "
          f"units_correlated in {share(warned):.4f}; per-request Welch p < 0.05 in {share(welch):.4f}, a winner in {share(verdicts):.4f}")
    assert share(warned) >= 0.99
    if split:
        assert share(welch) <= BOUND + 0.02
    else:
        assert share(welch) > 0.3
