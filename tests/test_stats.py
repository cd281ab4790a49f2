"""The statistics core against numbers published elsewhere: scipy's Welch test, the textbook
Welch examples, the unpooled two-proportion z-test, the delta method for a relative lift and
for a per-user ratio, Holm, the χ² SRM check, probability to be best, the fixed-horizon
sample size, the mixture SPRT and the verdict each status comes from.

Pure: no Redis, no proxy, no network (the conftest fixtures are not used)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from abproxy.analysis.analyse import estimate, higher_is_better
from abproxy.catalog import Catalog
from abproxy.stats.compare import compare, relative_lift, welch_dof
from abproxy.stats.decisions import holm, probability_to_be_best, samples_per_arm, srm_p_value
from abproxy.stats.estimates import (
    Estimate,
    UnitSums,
    from_moments,
    from_unit_sums,
    interval,
    proportion_from_moments,
)
from abproxy.stats.sequential import RHO, mixing_variance, msprt, running_p_value
from abproxy.stats.summary import Moments
from abproxy.stats.verdict import COLLECTING, NO_DIFFERENCE, SRM, WINNER, ArmInput, Policy, decide
from abproxy.recording.store import MetricCounters
from conftest import make_config

Z975 = 1.959963984540054  # Φ⁻¹(0.975)
Z80 = 0.8416212335729143  # Φ⁻¹(0.8)


def moments_of(values: np.ndarray) -> Moments:
    values = np.asarray(values, dtype=float)
    return Moments(float(len(values)), float(values.sum()), float((values * values).sum()))


def moments_from(mean: float, sd: float, n: int) -> Moments:
    """Moments with exactly this mean and sample standard deviation."""
    return Moments(n, n * mean, (n - 1) * sd * sd + n * mean * mean)


# --------------------------------------------------------------------------- Moments


def test_moments_mean_variance_and_interval_match_numpy_and_scipy():
    rng = np.random.default_rng(11)
    x = rng.normal(3.0, 2.0, 57)
    m = moments_of(x)
    assert m.mean == pytest.approx(x.mean(), rel=1e-12)
    assert m.variance == pytest.approx(x.var(ddof=1), rel=1e-10)
    assert m.std_error == pytest.approx(stats.sem(x), rel=1e-10)
    low, high = interval(from_moments(m), 0.05)
    ref = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    assert low == pytest.approx(ref.low, rel=1e-10)
    assert high == pytest.approx(ref.high, rel=1e-10)
    both = m + moments_of(x[:5])
    assert (both.n, both.total) == (62, pytest.approx(x.sum() + x[:5].sum()))
    assert Moments(1, 2.0, 4.0).variance is None
    assert Moments().mean is None


# --------------------------------------------------------------------------- Welch


@pytest.mark.parametrize("seed", range(6))
def test_compare_equals_scipy_welch(seed):
    rng = np.random.default_rng(seed)
    n_c, n_t = int(rng.integers(5, 400)), int(rng.integers(5, 400))
    control = rng.normal(rng.normal(10, 1), rng.uniform(0.5, 5), n_c)
    treatment = rng.normal(rng.normal(10, 1), rng.uniform(0.5, 5), n_t)
    c, t = from_moments(moments_of(control)), from_moments(moments_of(treatment))
    result = compare(c, t, 0.05)

    ref = stats.ttest_ind_from_stats(
        treatment.mean(), treatment.std(ddof=1), n_t, control.mean(), control.std(ddof=1), n_c, equal_var=False
    )
    assert result.statistic == pytest.approx(ref.statistic, rel=1e-9, abs=1e-12)
    assert result.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)
    raw = stats.ttest_ind(treatment, control, equal_var=False)
    assert result.dof == pytest.approx(raw.df, rel=1e-9)
    assert result.p_value == pytest.approx(raw.pvalue, rel=1e-9, abs=1e-15)
    ci = raw.confidence_interval(0.95)
    assert result.difference == pytest.approx(treatment.mean() - control.mean(), rel=1e-10, abs=1e-12)
    assert result.difference_ci[0] == pytest.approx(ci.low, rel=1e-9, abs=1e-12)
    assert result.difference_ci[1] == pytest.approx(ci.high, rel=1e-9, abs=1e-12)
    ci90 = raw.confidence_interval(0.90)
    result90 = compare(c, t, 0.10)
    assert result90.difference_ci == (pytest.approx(ci90.low, rel=1e-9), pytest.approx(ci90.high, rel=1e-9))


# Welch's t-test, Wikipedia "Examples": (A1, A2, published t, published dof, published p).
WIKIPEDIA_WELCH = [
    (
        [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4],
        [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4],
        -2.46,
        24.99,
        0.021,
    ),
    (
        [17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8],
        [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8,
         20.7, 21.7, 21.5, 22.5, 23.6, 21.5, 22.5, 23.5, 21.5, 21.8],
        -1.57,
        9.90,
        0.149,
    ),
    (
        [19.8, 20.4, 19.6, 17.8, 18.5, 18.9, 18.3, 18.9, 19.5, 22.0],
        [28.2, 26.6, 20.1, 23.3, 25.2, 22.1, 17.7, 27.6, 20.6, 13.7,
         23.2, 17.5, 20.6, 18.0, 23.9, 21.6, 24.3, 20.4, 23.9, 13.3],
        -2.22,
        24.5,
        0.036,
    ),
]


@pytest.mark.parametrize(("a1", "a2", "t", "dof", "p"), WIKIPEDIA_WELCH)
def test_textbook_welch_examples(a1, a2, t, dof, p):
    # t = (mean(A1) - mean(A2)) / se, so A2 plays the control and A1 the treatment.
    result = compare(from_moments(moments_of(a2)), from_moments(moments_of(a1)), 0.05)
    # agreement to the precision the values are published at
    assert result.statistic == pytest.approx(t, abs=0.006)
    assert result.dof == pytest.approx(dof, abs=0.06)
    assert result.p_value == pytest.approx(p, abs=0.0006)
    # and to many decimals against scipy on the raw data
    ref = stats.ttest_ind(a1, a2, equal_var=False)
    assert result.statistic == pytest.approx(ref.statistic, rel=1e-10)
    assert result.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert result.dof == pytest.approx(ref.df, rel=1e-10)


def test_first_wikipedia_example_pinned():
    a1, a2 = WIKIPEDIA_WELCH[0][:2]
    result = compare(from_moments(moments_of(a2)), from_moments(moments_of(a1)), 0.05)
    assert result.statistic == pytest.approx(-2.455356398286006, rel=1e-9)
    assert result.dof == pytest.approx(24.988529290231416, rel=1e-9)
    assert result.p_value == pytest.approx(0.021378001462866992, rel=1e-8)


def test_welch_dof_mixed_normal_and_t():
    t_side = Estimate(1.0, 0.04, 50, 49)
    z_side = Estimate(1.0, 0.01, 1000, math.inf)
    # A normal-approximation side contributes no uncertainty about its variance.
    assert welch_dof(z_side, t_side) == pytest.approx((0.05**2) / (0.04**2 / 49), rel=1e-12)
    assert math.isinf(welch_dof(z_side, z_side))


# --------------------------------------------------------------------------- proportions


def test_two_proportion_unpooled_z_test_120_vs_150_of_1000():
    control = proportion_from_moments(Moments(1000, 120, 120))
    treatment = proportion_from_moments(Moments(1000, 150, 150))
    assert control.mean == 0.12 and treatment.mean == 0.15
    assert math.isinf(control.dof)
    result = compare(control, treatment, 0.05)

    se = math.sqrt(0.12 * 0.88 / 1000 + 0.15 * 0.85 / 1000)  # 0.0152676128
    z = 0.03 / se
    p = math.erfc(z / math.sqrt(2))
    assert se == pytest.approx(0.01526761278, rel=1e-9)
    assert result.statistic == pytest.approx(z, rel=1e-12)
    assert result.statistic == pytest.approx(1.9649437297, rel=1e-9)
    assert result.p_value == pytest.approx(p, rel=1e-10)
    assert result.p_value == pytest.approx(0.0494207507, rel=1e-8)
    assert math.isinf(result.dof)
    assert result.difference_ci[0] == pytest.approx(0.03 - Z975 * se, rel=1e-10)
    assert result.difference_ci[1] == pytest.approx(0.03 + Z975 * se, rel=1e-10)
    # 0.03 ± 0.029925: just excludes zero, agreeing with p just below 0.05
    assert result.difference_ci[0] == pytest.approx(7.602882e-05, rel=1e-6)


# --------------------------------------------------------------------------- relative lift


def test_relative_lift_delta_method_worked_example():
    control = Estimate(10.0, 0.04, 100, 99)
    treatment = Estimate(11.0, 0.09, 100, 99)
    lift, (low, high) = relative_lift(control, treatment, 0.05)
    # GrowthBook's frequentist relative CI: Var = v_t/m_c² + m_t² v_c/m_c⁴
    variance = 0.09 / 10.0**2 + 11.0**2 * 0.04 / 10.0**4
    assert variance == pytest.approx(0.001384, rel=1e-12)
    assert lift == pytest.approx(0.1, rel=1e-12)
    assert low == pytest.approx(0.1 - Z975 * math.sqrt(variance), rel=1e-12)
    assert high == pytest.approx(0.1 + Z975 * math.sqrt(variance), rel=1e-12)
    assert (low, high) == (pytest.approx(0.0270851249206, rel=1e-10), pytest.approx(0.1729148750794, rel=1e-11))
    comparison = compare(control, treatment, 0.05)
    assert comparison.lift == pytest.approx(0.1) and comparison.lift_ci == (low, high)
    assert relative_lift(Estimate(0.0, 0.01, 10, 9), treatment, 0.05) is None


def test_relative_lift_interval_covers_true_lift_95_percent():
    rng = np.random.default_rng(2024)
    sims, n_c, n_t = 2000, 200, 150
    mu_c, mu_t = 10.0, 11.0
    control = rng.normal(mu_c, 3.0, (sims, n_c))
    treatment = rng.normal(mu_t, 4.0, (sims, n_t))
    true_lift = mu_t / mu_c - 1
    covered = 0
    for c, t in zip(control, treatment, strict=True):
        _, (low, high) = relative_lift(from_moments(moments_of(c)), from_moments(moments_of(t)), 0.05)
        covered += low <= true_lift <= high
    coverage = covered / sims
    print(f"\nrelative-lift 95% CI coverage over {sims} simulations: {coverage:.4f}")
    assert 0.93 <= coverage <= 0.97, coverage


# --------------------------------------------------------------------------- per-unit delta method


def unit_sums_of(y: np.ndarray, n: np.ndarray) -> UnitSums:
    """What the Redis counters hold for one arm: units, Σ Y_u, Σ N_u, Σ Y_u², Σ N_u², Σ Y_u N_u."""
    y, n = np.asarray(y, float), np.asarray(n, float)
    return UnitSums(len(y), y.sum(), n.sum(), (y * y).sum(), (n * n).sum(), (y * n).sum())


def test_from_unit_sums_with_one_request_per_unit_is_from_moments():
    rng = np.random.default_rng(5)
    x = rng.normal(4.0, 1.5, 321)
    per_request = from_moments(moments_of(x))
    per_unit = from_unit_sums(unit_sums_of(x, np.ones_like(x)))
    # With N_u = 1: μ_N = 1, σ²_N = 0, σ_YN = 0, so Var(R) = σ²_Y / K = s²/n exactly (both use
    # the K - 1 denominator), and the degrees of freedom agree too: the ratio is 1, not n/(n-1).
    assert per_unit.mean == pytest.approx(per_request.mean, rel=1e-13)
    assert per_unit.variance_of_mean / per_request.variance_of_mean == pytest.approx(1.0, rel=1e-12)
    assert per_unit.n == per_request.n and per_unit.dof == per_request.dof


def test_from_unit_sums_hand_computed_delta_method():
    y_u = np.array([12.0, 3.5, 40.0, 7.0, 0.0, 22.5, 9.0, 15.0])  # per-user totals of the metric
    n_u = np.array([4.0, 1.0, 10.0, 2.0, 1.0, 6.0, 3.0, 5.0])  # per-user request counts
    k = len(y_u)
    mu_y, mu_n = y_u.mean(), n_u.mean()
    var_y, var_n = y_u.var(ddof=1), n_u.var(ddof=1)
    cov_yn = np.cov(y_u, n_u, ddof=1)[0, 1]
    ratio = y_u.sum() / n_u.sum()
    expected = (var_y / mu_n**2 - 2 * mu_y * cov_yn / mu_n**3 + mu_y**2 * var_n / mu_n**4) / k
    # the same thing as the variance of the linearised per-unit residual Y_u - R N_u
    linearised = np.var(y_u - ratio * n_u, ddof=1) / (k * mu_n**2)
    assert expected == pytest.approx(linearised, rel=1e-12)

    result = from_unit_sums(unit_sums_of(y_u, n_u))
    assert result.mean == pytest.approx(ratio, rel=1e-14)
    assert result.mean == pytest.approx(109.0 / 32.0, rel=1e-14)
    assert result.variance_of_mean == pytest.approx(expected, rel=1e-10)
    assert result.n == k and result.dof == k - 1
    assert from_unit_sums(UnitSums(1, 1.0, 1.0, 1.0, 1.0, 1.0)) is None


# --------------------------------------------------------------------------- Holm


def reference_holm(p_values):
    """statsmodels' multipletests(method='holm'): step-down, cumulative max, capped at 1."""
    p = np.asarray(p_values, float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = stepped
    return out


def test_holm_published_example():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)


def test_holm_semantics_monotone_and_capped():
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([0.02]) == [0.02]
    assert holm([]) == []
    rng = np.random.default_rng(7)
    for _ in range(200):
        m = int(rng.integers(1, 8))
        p = rng.uniform(0, 1, m) ** 3
        adjusted = holm(list(p))
        assert adjusted == pytest.approx(list(reference_holm(p)), abs=1e-15)
        assert all(a >= raw for a, raw in zip(adjusted, p, strict=True))
        assert all(a <= 1.0 for a in adjusted)
        order = np.argsort(p)
        assert all(np.diff(np.asarray(adjusted)[order]) >= 0)


# --------------------------------------------------------------------------- SRM


def test_srm_equals_scipy_chisquare():
    assert srm_p_value([5100, 4900], [1, 1]) == pytest.approx(stats.chisquare([5100, 4900]).pvalue, rel=1e-12)
    assert srm_p_value([5100, 4900], [1, 1]) == pytest.approx(0.04550026389635842, rel=1e-9)  # χ²=4, 1 dof


def test_srm_threshold_cases():
    mild = srm_p_value([10_200, 9_800], [1, 1])
    assert mild == pytest.approx(0.004677734981047266, rel=1e-9)  # χ² = 8
    assert mild > 0.001
    severe = srm_p_value([10_500, 9_500], [1, 1])
    assert severe < 0.001  # χ² = 50
    assert severe == pytest.approx(stats.chi2.sf(50, 1), rel=1e-9)


def test_srm_unequal_weights():
    # 1:2 → expected 3,000 and 6,000
    p = srm_p_value([3_100, 5_900], [1, 2])
    assert p == pytest.approx(stats.chisquare([3_100, 5_900], [3_000, 6_000]).pvalue, rel=1e-12)
    assert srm_p_value([3_000, 6_000], [1, 2]) == pytest.approx(1.0)
    assert srm_p_value([4_500, 4_500], [1, 2]) < 0.001
    assert srm_p_value([0, 0], [1, 1]) is None
    assert srm_p_value([10, 5], [1, 0]) == 0.0


# --------------------------------------------------------------------------- probability to be best


def test_probability_to_be_best_two_arms_matches_normal_cdf():
    a, b = Estimate(10.0, 0.04, 100, 99), Estimate(10.3, 0.05, 100, 99)
    exact = stats.norm.cdf((b.mean - a.mean) / math.sqrt(a.variance_of_mean + b.variance_of_mean))
    assert exact == pytest.approx(0.8413447460685, rel=1e-12)  # Φ(1)
    p_a, p_b = probability_to_be_best([a, b], higher_is_better=True)
    assert p_b == pytest.approx(exact, abs=0.01)
    assert p_a + p_b == pytest.approx(1.0, abs=1e-12)
    low_a, low_b = probability_to_be_best([a, b], higher_is_better=False)
    assert low_a == pytest.approx(exact, abs=0.01)
    assert low_b == pytest.approx(1 - exact, abs=0.01)
    three = probability_to_be_best([a, b, Estimate(9.0, 0.01, 100, 99)], higher_is_better=True)
    assert sum(three) == pytest.approx(1.0, abs=1e-12)
    assert three[2] < 0.001
    assert probability_to_be_best([a, b], True) == [p_a, p_b]  # fixed seed → stable between looks


# --------------------------------------------------------------------------- sample size


def test_samples_per_arm_textbook():
    n = samples_per_arm(1.0, 0.3, 0.05, 0.8)
    assert n == pytest.approx(2 * (Z975 + Z80) ** 2 / 0.09, rel=1e-12)
    assert n == pytest.approx(174.4, abs=0.05)
    assert math.ceil(n) == 175
    # scale invariance: σ = 20, δ = 6 is the same 0.3σ effect
    assert samples_per_arm(400.0, 6.0, 0.05) == pytest.approx(n, rel=1e-12)
    assert samples_per_arm(400.0, -6.0, 0.05) == pytest.approx(n, rel=1e-12)
    assert samples_per_arm(1.0, 0.0, 0.05) is None


# --------------------------------------------------------------------------- mSPRT


def test_msprt_matches_johari_formula():
    c, t = Estimate(0.0, 1 / 200, 200, 199), Estimate(0.25, 1 / 200, 200, 199)
    v = 2 / 200
    tau2 = RHO**2 * 1.0
    assert mixing_variance(c, t) == pytest.approx(tau2, rel=1e-12)
    lam = math.sqrt(v / (v + tau2)) * math.exp(0.25**2 * tau2 / (2 * v * (v + tau2)))
    result = msprt(c, t, 0.05)
    assert result.p_value == pytest.approx(1 / lam, rel=1e-12)
    half = math.sqrt(v * (v + tau2) / tau2 * (2 * math.log(20) + math.log((v + tau2) / v)))
    assert result.difference_ci == (pytest.approx(0.25 - half, rel=1e-12), pytest.approx(0.25 + half, rel=1e-12))


def test_msprt_p_value_at_most_one_and_falls_as_evidence_grows():
    # the same true 0.4σ effect observed on ever more data
    previous = 1.0
    for n in range(50, 2001, 50):
        c, t = Estimate(0.0, 1 / n, n, n - 1), Estimate(0.4, 1 / n, n, n - 1)
        p = msprt(c, t, 0.05).p_value
        assert 0 < p <= 1
        assert p < previous or previous < 1e-300
        previous = p
    assert previous < 1e-10
    # no difference at all: no evidence, p stays at 1
    assert msprt(Estimate(1.0, 0.01, 100, 99), Estimate(1.0, 0.01, 100, 99), 0.05).p_value == 1.0
    assert msprt(Estimate(1.0, 0.0, 100, 99), Estimate(1.0, 0.0, 100, 99), 0.05) is None


def test_running_p_value_is_monotone():
    rng = np.random.default_rng(3)
    running = None
    history = []
    for p in rng.uniform(0, 1, 100):
        running = running_p_value(running, float(p))
        history.append(running)
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert history[-1] == pytest.approx(min(history))
    assert running_p_value(None, 0.3) == 0.3


def test_msprt_interval_and_p_value_agree_on_random_inputs():
    """reject ⇔ Λ ≥ 1/α ⇔ 0 outside the always-valid interval, at each look."""
    rng = np.random.default_rng(99)
    checked = rejected = 0
    for _ in range(5000):
        n_c, n_t = rng.integers(2, 5000, 2)
        sd_c, sd_t = rng.uniform(0.1, 10, 2)
        mean_c = rng.normal(0, 5)
        mean_t = mean_c + rng.normal(0, 1) * rng.choice([0.01, 0.1, 1.0]) * max(sd_c, sd_t)
        alpha = float(rng.choice([0.01, 0.05, 0.1]))
        c = Estimate(mean_c, sd_c**2 / n_c, n_c, n_c - 1)
        t = Estimate(mean_t, sd_t**2 / n_t, n_t, n_t - 1)
        result = msprt(c, t, alpha)
        low, high = result.difference_ci
        assert low <= mean_t - mean_c <= high
        if result.p_value > 0 and abs(math.log(result.p_value) - math.log(alpha)) < 1e-9:
            continue  # on the boundary itself
        checked += 1
        rejected += result.p_value < alpha
        assert (result.p_value < alpha) == (not low <= 0 <= high), (result, alpha)
    assert checked > 4900 and 500 < rejected < checked - 500


# --------------------------------------------------------------------------- decide()

FEEDBACK, LATENCY = "feedback.satisfaction", "latency_ms"


def arm(name, control=False, assigned=None, weight=1.0, **metrics):
    estimates = {metric.replace("__", "."): value for metric, value in metrics.items()}
    n = next(iter(estimates.values())).n if estimates else 0
    return ArmInput(name, control, weight, n if assigned is None else assigned, estimates)


def est(mean, sd, n):
    return from_moments(moments_from(mean, sd, n))


def policy(primary=FEEDBACK, guardrails=(), **kwargs):
    return Policy(primary=primary, guardrails=list(guardrails), higher_is_better=higher_is_better, **kwargs)


def test_higher_is_better_direction():
    assert higher_is_better("feedback.satisfaction") and higher_is_better("feedback.thumbs")
    assert not higher_is_better("latency_ms") and not higher_is_better("error_rate")


def test_decide_collecting_below_min_samples():
    arms = [
        arm("a", control=True, feedback__satisfaction=est(3.0, 1.0, 20)),
        arm("b", feedback__satisfaction=est(4.5, 1.0, 20)),  # huge effect, but only 20 each
    ]
    verdict = decide(arms, policy(min_samples=30), {})
    assert verdict.status == COLLECTING and verdict.winner is None


def test_decide_winner_higher_is_better_feedback():
    arms = [
        arm("a", control=True, feedback__satisfaction=est(3.5, 1.0, 2000)),
        arm("b", feedback__satisfaction=est(3.7, 1.0, 2000)),
    ]
    verdict = decide(arms, policy(), {})
    assert verdict.status == WINNER and verdict.winner == "b"
    result = verdict.arms["b"].metrics[FEEDBACK]
    assert result.p_value < 0.05 and result.difference_ci[0] > 0
    assert verdict.running[("b", FEEDBACK)] == result.sequential
    assert verdict.arms["b"].prob_best > 0.99


def test_decide_winner_lower_is_better_latency():
    arms = [
        arm("a", control=True, latency_ms=est(900.0, 200.0, 1000)),
        arm("b", latency_ms=est(800.0, 200.0, 1000)),
    ]
    verdict = decide(arms, policy(primary=LATENCY), {})
    assert verdict.status == WINNER and verdict.winner == "b"
    # a slower treatment is not a winner: the control is
    arms[1] = arm("b", latency_ms=est(1000.0, 200.0, 1000))
    verdict = decide(arms, policy(primary=LATENCY), {})
    assert verdict.status == WINNER and verdict.winner == "a"


def test_decide_guardrail_blocks_winner():
    arms = [
        arm("a", control=True, feedback__satisfaction=est(3.5, 1.0, 2000), latency_ms=est(800.0, 200.0, 2000)),
        arm("b", feedback__satisfaction=est(3.7, 1.0, 2000), latency_ms=est(1100.0, 250.0, 2000)),
    ]
    verdict = decide(arms, policy(guardrails=[LATENCY]), {})
    assert verdict.arms["b"].metrics[FEEDBACK].p_value < 0.05  # better on the primary …
    assert verdict.arms["b"].metrics[LATENCY].p_value < 0.05  # … but much slower
    assert verdict.status == COLLECTING and verdict.winner is None
    # a faster treatment passes the same guardrail
    arms[1] = arm("b", feedback__satisfaction=est(3.7, 1.0, 2000), latency_ms=est(700.0, 200.0, 2000))
    assert decide(arms, policy(guardrails=[LATENCY]), {}).winner == "b"


def test_decide_control_wins_when_every_treatment_is_worse():
    arms = [
        arm("a", control=True, feedback__satisfaction=est(4.0, 1.0, 2000)),
        arm("b", feedback__satisfaction=est(3.7, 1.0, 2000)),
        arm("c", feedback__satisfaction=est(3.6, 1.0, 2000)),
    ]
    verdict = decide(arms, policy(), {})
    assert verdict.status == WINNER and verdict.winner == "a"
    # one treatment merely equal: no verdict for the control
    arms[2] = arm("c", feedback__satisfaction=est(4.0, 1.0, 2000))
    assert decide(arms, policy(), {}).winner != "a"


def test_decide_no_difference_when_intervals_are_tight():
    arms = [
        arm("a", control=True, latency_ms=est(1000.0, 100.0, 20_000)),
        arm("b", latency_ms=est(1001.0, 100.0, 20_000)),
    ]
    verdict = decide(arms, policy(primary=LATENCY, mde=0.05), {})
    assert verdict.status == NO_DIFFERENCE and verdict.winner is None
    low, high = verdict.arms["b"].metrics[LATENCY].difference_ci
    assert -50 < low < 0 < high < 50
    # same data, but wide intervals (few samples): still collecting
    arms = [arm("a", control=True, latency_ms=est(1000.0, 100.0, 40)), arm("b", latency_ms=est(1001.0, 100.0, 40))]
    assert decide(arms, policy(primary=LATENCY, mde=0.05), {}).status == COLLECTING


def test_decide_srm_overrides_a_clear_effect():
    arms = [
        arm("a", control=True, assigned=10_500, feedback__satisfaction=est(3.0, 1.0, 10_500)),
        arm("b", assigned=9_500, feedback__satisfaction=est(4.0, 1.0, 9_500)),
    ]
    verdict = decide(arms, policy(), {})
    assert verdict.status == SRM and verdict.winner is None
    assert verdict.srm_p_value < 0.001
    # a 10,200 / 9,800 split is within chance
    arms = [
        arm("a", control=True, assigned=10_200, feedback__satisfaction=est(3.0, 1.0, 10_200)),
        arm("b", assigned=9_800, feedback__satisfaction=est(4.0, 1.0, 9_800)),
    ]
    assert decide(arms, policy(), {}).status == WINNER


def test_decide_holm_across_treatments():
    arms = [
        arm("a", control=True, feedback__satisfaction=est(3.5, 1.0, 400)),
        arm("b", feedback__satisfaction=est(3.62, 1.0, 400)),
        arm("c", feedback__satisfaction=est(3.70, 1.0, 400)),
    ]
    for sequential in (True, False):
        verdict = decide(arms, policy(sequential=sequential), {})
        raw = [verdict.arms[name].metrics[FEEDBACK].p_value for name in ("b", "c")]
        adjusted = [verdict.arms[name].metrics[FEEDBACK].adjusted_p for name in ("b", "c")]
        assert adjusted == pytest.approx(holm(raw), rel=1e-12)
        assert all(a >= p for a, p in zip(adjusted, raw, strict=True))
        assert adjusted[1] == pytest.approx(min(1.0, 2 * raw[1]))  # the smaller p is doubled
    # with a single treatment Holm leaves the p-value as it is
    single = decide(arms[:2], policy(), {}).arms["b"].metrics[FEEDBACK]
    assert single.adjusted_p == single.p_value


def test_decide_sequential_path_is_msprt_with_running_minimum():
    """What test_simulation replays: decide(sequential=True) keeps min over looks of msprt's p."""
    rng = np.random.default_rng(8)
    running: dict = {}
    expected = None
    data_a, data_b = np.empty(0), np.empty(0)
    for _ in range(6):
        data_a = np.concatenate([data_a, rng.normal(0, 1, 50)])
        data_b = np.concatenate([data_b, rng.normal(0.1, 1, 50)])
        c, t = from_moments(moments_of(data_a)), from_moments(moments_of(data_b))
        arms = [ArmInput("a", True, 1, len(data_a), {FEEDBACK: c}), ArmInput("b", False, 1, len(data_b), {FEEDBACK: t})]
        verdict = decide(arms, policy(), running)
        expected = running_p_value(expected, msprt(c, t, 0.05).p_value)
        running = verdict.running
        assert running[("b", FEEDBACK)].p_value == expected
        assert verdict.arms["b"].metrics[FEEDBACK].p_value == expected
        assert verdict.arms["b"].metrics[FEEDBACK].comparison.p_value == compare(c, t, 0.05).p_value


def test_decide_running_p_value_and_interval_stay_consistent():
    """With sequential=True the reported p-value is the running minimum over looks; it must travel
    with the running intersection of the always-valid intervals (Johari et al.), and the direction
    of the effect must come from that interval, not from the current point estimate. Otherwise an
    earlier look that rejected with the treatment *better* lets a later look whose estimate has
    drifted slightly negative declare the *control* the winner."""
    early = [
        arm("a", control=True, feedback__satisfaction=est(3.5, 1.0, 200)),
        arm("b", feedback__satisfaction=est(3.9, 1.0, 200)),
    ]
    first = decide(early, policy(), {})
    assert first.arms["b"].metrics[FEEDBACK].p_value < 0.05
    assert first.arms["b"].metrics[FEEDBACK].difference_ci[0] > 0
    assert first.winner == "b"
    # later, with more data, the treatment's point estimate is a hair below the control's
    later = [
        arm("a", control=True, feedback__satisfaction=est(3.5, 1.0, 3000)),
        arm("b", feedback__satisfaction=est(3.49, 1.0, 3000)),
    ]
    second = decide(later, policy(), first.running)
    result = second.arms["b"].metrics[FEEDBACK]
    low, high = result.difference_ci
    problems = []
    if second.winner == "a":
        problems.append(
            f"control declared winner (Welch p now {result.comparison.p_value:.2f}) on the strength of an earlier"
            " look at which the treatment was better"
        )
    if result.p_value < 0.05 and low <= 0 <= high:
        problems.append(
            f"reported p = {result.p_value:.3g} < α yet the reported interval {low:.3f}..{high:.3f} covers 0"
        )
    assert not problems, "; ".join(problems)


# --------------------------------------------------------------------------- analysis mapping


@pytest.fixture(scope="module")
def catalog():
    return Catalog(make_config("http://127.0.0.1:9/v1"))


def test_analysis_estimate_per_unit_plan_uses_unit_sums(catalog):
    plan = catalog.plans["translation"]  # unit: user
    assert plan.per_unit
    y_u = np.array([12.0, 3.0, 40.0, 7.0, 1.0, 22.0])
    n_u = np.array([4.0, 1.0, 10.0, 2.0, 1.0, 6.0])
    requests = np.repeat(y_u / n_u, n_u.astype(int))  # each user's requests at its mean
    sums = unit_sums_of(y_u, n_u)
    counters = MetricCounters(
        moments=moments_of(requests), units=len(y_u), unit_yy=sums.sum_yy, unit_nn=sums.sum_nn, unit_yn=sums.sum_yn
    )
    got = estimate(plan, LATENCY, counters)
    assert got == from_unit_sums(sums)
    assert got.n == len(y_u) and got != from_moments(moments_of(requests))
    # a 0/1 feedback metric in a per-user experiment also goes per unit, not to the z-test
    assert estimate(plan, "feedback.thumbs", counters) == from_unit_sums(sums)


def test_analysis_estimate_per_request_plan(catalog):
    plan = catalog.plans["sentiment"]  # unit: request; feedback.accuracy in [0, 1]
    assert not plan.per_unit
    latency = MetricCounters(moments=moments_of(np.array([100.0, 120.0, 90.0, 130.0])))
    assert estimate(plan, LATENCY, latency) == from_moments(latency.moments)
    accuracy = MetricCounters(moments=Moments(50, 30, 30))
    assert estimate(plan, "feedback.accuracy", accuracy) == proportion_from_moments(accuracy.moments)
    errors = MetricCounters(moments=Moments(200, 3, 3))
    assert estimate(plan, "error_rate", errors) == proportion_from_moments(errors.moments)
