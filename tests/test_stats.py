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

from abproxy.analysis.estimates import estimate
from abproxy.catalog import Catalog
from abproxy.stats.compare import compare, relative_lift, welch_dof
from abproxy.stats.decisions import holm, probability_to_be_best, samples_per_arm, sequential_srm_p_value
from abproxy.stats.estimates import (
    Estimate,
    UnitSums,
    from_moments,
    from_unit_sums,
    interval,
    proportion_from_moments,
)
from abproxy.stats.sequential import RHO, Mixture, RunningState, half_width, log_lambda, mixing_variance, msprt, running_p_value
from abproxy.stats.summary import Moments
from abproxy.stats.verdict import COLLECTING, NO_DIFFERENCE, SRM, WINNER, ArmInput, Policy, decide
from abproxy.recording.counters import MetricCounters
from proxykit import make_config

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
    assert relative_lift(Estimate(0.0, 0.01, 10, 9), treatment, 0.05) is None


def test_lift_interval_uses_t_on_welchs_degrees_of_freedom():
    """Beside the difference, the lift's interval takes Student's t on the same Welch–Satterthwaite
    degrees of freedom (the normal's 1.96 is too narrow for small samples)."""
    control = Estimate(10.0, 0.04, 100, 99)
    treatment = Estimate(11.0, 0.09, 100, 99)
    comparison = compare(control, treatment, 0.05)
    dof = (0.04 + 0.09) ** 2 / (0.04**2 / 99 + 0.09**2 / 99)
    assert comparison.dof == pytest.approx(dof, rel=1e-12) and dof == pytest.approx(172.4845360825, rel=1e-9)
    critical = stats.t.ppf(0.975, dof)
    half = critical * math.sqrt(0.001384)
    assert comparison.lift == pytest.approx(0.1, rel=1e-12)
    assert comparison.lift_ci == (pytest.approx(0.1 - half, rel=1e-12), pytest.approx(0.1 + half, rel=1e-12))
    assert comparison.lift_ci == relative_lift(control, treatment, 0.05, dof)[1]
    # few samples: t widens it clearly beyond the normal interval
    small = compare(Estimate(10.0, 0.04, 5, 4), Estimate(11.0, 0.09, 5, 4), 0.05)
    normal_half = Z975 * math.sqrt(0.001384)
    width = small.lift_ci[1] - small.lift
    assert width == pytest.approx(stats.t.ppf(0.975, small.dof) * math.sqrt(0.001384), rel=1e-12)
    assert width > 1.2 * normal_half


def test_constant_arms_differ_by_exactly_their_difference():
    same = compare(Estimate(4.0, 0.0, 40, 39), Estimate(4.0, 0.0, 40, 39), 0.05)
    assert (same.p_value, same.difference_ci, same.lift_ci) == (1.0, (0.0, 0.0), (0.0, 0.0))
    apart = compare(Estimate(4.0, 0.0, 40, 39), Estimate(5.0, 0.0, 40, 39), 0.05)
    assert (apart.p_value, apart.difference_ci, apart.lift) == (0.0, (1.0, 1.0), 0.25)


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


def _dirichlet_multinomial_p(counts: list[int], weights: list[float], concentration: float = 100.0) -> float:
    """1 / BF computed independently, with scipy's distributions: the Dirichlet-multinomial
    likelihood of the counts over the multinomial's at the weights."""
    shares = np.array(weights, dtype=float) / sum(weights)
    n = sum(counts)
    log_bf = stats.dirichlet_multinomial.logpmf(counts, concentration * shares, n) - stats.multinomial.logpmf(counts, n, shares)
    return min(1.0, math.exp(-log_bf))


@pytest.mark.parametrize(
    "counts, weights",
    [([5_100, 4_900], [1, 1]), ([10_500, 9_500], [1, 1]), ([3_100, 5_900], [1, 2]), ([120, 95, 301], [1, 1, 3]), ([7, 0], [1, 1])],
)
def test_sequential_srm_is_the_dirichlet_multinomial_bayes_factor(counts: list[int], weights: list[float]) -> None:
    assert sequential_srm_p_value(counts, weights) == pytest.approx(_dirichlet_multinomial_p(counts, weights), rel=1e-9)


def test_sequential_srm_flags_a_real_mismatch_and_not_chance():
    assert sequential_srm_p_value([10_500, 9_500], [1, 1]) < 1e-9  # 52.5 / 47.5
    assert sequential_srm_p_value([10_200, 9_800], [1, 1]) > 0.1  # within chance for 20,000
    assert sequential_srm_p_value([3_000, 6_000], [1, 2]) == 1.0
    assert sequential_srm_p_value([4_500, 4_500], [1, 2]) < 1e-6
    assert sequential_srm_p_value([0, 0], [1, 1]) is None
    assert sequential_srm_p_value([10, 5], [1, 0]) == 0.0


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
    # no spread at all: the difference is known exactly
    constant = msprt(Estimate(1.0, 0.0, 100, 99), Estimate(1.0, 0.0, 100, 99), 0.05)
    assert (constant.p_value, constant.difference_ci) == (1.0, (0.0, 0.0))


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


def higher_is_better(metric):
    """The default directions (each experiment's own: Experiment.higher_is_better, test_config)."""
    return metric.startswith("feedback.")


def policy(primary=FEEDBACK, guardrails=(), **kwargs):
    return Policy(primary=primary, guardrails=list(guardrails), higher_is_better=higher_is_better, **kwargs)


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
    assert verdict.running[("b", "a", FEEDBACK)] == result.sequential
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
        expected = running_p_value(expected, msprt(c, t, 0.05, Mixture.tuned(0.05 * abs(c.mean))).p_value)
        running = verdict.running
        assert running[("b", "a", FEEDBACK)].p_value == expected
        assert verdict.arms["b"].metrics[FEEDBACK].p_value == expected
        assert verdict.arms["b"].metrics[FEEDBACK].comparison.p_value == compare(c, t, 0.05).p_value


def test_decide_running_p_value_and_interval_stay_consistent():
    """With sequential=True the reported p-value is the running minimum over looks; it must travel
    with the running intersection of the always-valid intervals (Johari et al.), and the direction
    of the effect must come from that interval, not from the current point estimate. Otherwise an
    earlier look that rejected with the treatment *better* lets a later look whose estimate has
    drifted slightly negative declare the *control* the winner. When the looks contradict each
    other outright (an empty intersection), that is an effect that moved: the sequence starts
    again from that look, never `no_difference`, and said as `effect_drift`; the winner declared
    earlier keeps its name."""
    early = [
        arm("a", control=True, feedback__satisfaction=est(3.5, 1.0, 200)),
        arm("b", feedback__satisfaction=est(3.9, 1.0, 200)),
    ]
    first = decide(early, policy(), {})
    assert first.arms["b"].metrics[FEEDBACK].p_value < 0.05
    assert first.arms["b"].metrics[FEEDBACK].difference_ci[0] > 0
    assert first.winner == "b" and first.warnings == ()
    # later, with more data, the treatment's point estimate is a hair below the control's
    later = [
        arm("a", control=True, feedback__satisfaction=est(3.5, 1.0, 3000)),
        arm("b", feedback__satisfaction=est(3.49, 1.0, 3000)),
    ]
    second = decide(later, policy(), first.running, declared="b")
    result = second.arms["b"].metrics[FEEDBACK]
    assert result.sequential.drifted and result.sequential.restarts == 1 and result.direction == 0
    low, high = result.difference_ci
    assert low < -0.01 < high and low > first.arms["b"].metrics[FEEDBACK].difference_ci[0] - 0.4, (
        "the sequence starts again from the look that contradicted the others: its interval, not an empty one"
    )
    assert result.p_value == 1.0, "nor a p-value frozen at the early look's"
    assert (second.status, second.winner) == (WINNER, "b"), "the control must not win on the strength of an earlier look"
    assert second.warnings == ("effect_drift",)
    # without a declared winner the same evidence concludes nothing, and is not `no_difference`
    undeclared = decide(later, policy(), first.running)
    assert (undeclared.status, undeclared.winner, undeclared.warnings) == (COLLECTING, None, ("effect_drift",))


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


# --------------------------------------------------------------------------- precision: shifted sums


def test_moments_about_a_shift_keep_the_variance_of_values_around_1e12():
    """Σx² − (Σx)²/n of values around 1e12 subtracts numbers of 1e26 to find one of 1e2: every
    digit is lost. About a shift near the mean nothing cancels (Chan, Golub & LeVeque 1983)."""
    rng = np.random.default_rng(12)
    for level in (1e8, 1e10, 1e12):
        x = level + rng.normal(0.0, 3.0, 500)
        exact_variance = np.var(x - level, ddof=1)  # the spread itself, computed where it is exact
        naive = Moments(len(x), float(x.sum()), float((x * x).sum()))
        shift = float(x[:50].mean())
        shifted = Moments(len(x), float((x - shift).sum()), float(((x - shift) ** 2).sum()), shift)
        assert shifted.variance == pytest.approx(exact_variance, rel=1e-9)
        assert shifted.mean == pytest.approx(x.mean(), rel=1e-15)
        assert shifted.sum == pytest.approx(x.sum(), rel=1e-15)
        if level >= 1e10:
            assert naive.variance != pytest.approx(exact_variance, rel=1e-3), "the naive sums should have lost it"
        # moving the shift, and adding samples taken about other shifts, keep it exact
        assert shifted.about(level).variance == pytest.approx(exact_variance, rel=1e-9)
        halves = Moments(250, float((x[:250] - level).sum()), float(((x[:250] - level) ** 2).sum()), level) + Moments(
            250, float((x[250:] - shift).sum()), float(((x[250:] - shift) ** 2).sum()), shift
        )
        assert halves.n == 500 and halves.variance == pytest.approx(exact_variance, rel=1e-9)


def test_per_unit_delta_method_about_a_shift_matches_the_unshifted_and_keeps_large_values():
    rng = np.random.default_rng(13)
    n_u = rng.integers(1, 9, 300).astype(float)
    base = np.array([rng.normal(4.0, 1.0, int(k)).sum() for k in n_u])
    plain = from_unit_sums(unit_sums_of(base, n_u))
    shift = 3.7
    shifted_y = base - shift * n_u
    about = from_unit_sums(
        UnitSums(len(n_u), shifted_y.sum(), n_u.sum(), (shifted_y**2).sum(), (n_u**2).sum(), (shifted_y * n_u).sum(), shift)
    )
    assert about.mean == pytest.approx(plain.mean, rel=1e-13)
    assert about.variance_of_mean == pytest.approx(plain.variance_of_mean, rel=1e-10)
    # the same users at 1e12 (where a float64 holds a value to about 1e-4): the variance of the
    # mean is still the one at 4.0 about a shift, and garbage about 0
    level = 1e12
    y_big = base + (level - 4.0) * n_u
    y_about = y_big - level * n_u
    big = from_unit_sums(
        UnitSums(len(n_u), y_about.sum(), n_u.sum(), (y_about**2).sum(), (n_u**2).sum(), (y_about * n_u).sum(), level)
    )
    assert big.variance_of_mean == pytest.approx(plain.variance_of_mean, rel=1e-4)
    assert big.mean - level == pytest.approx(plain.mean - 4.0, abs=1e-3)
    naive = from_unit_sums(unit_sums_of(y_big, n_u))
    assert naive.variance_of_mean != pytest.approx(plain.variance_of_mean, rel=0.1)


def test_a_rate_of_exactly_0_or_1_is_not_taken_for_certainty():
    """p(1 − p)/n is 0 at p = 0; the variance is taken at the add-two rate (x + 1)/(n + 2) of
    Agresti & Caffo (2000) there, and at p̂ elsewhere (the pinned z-test above is unchanged)."""
    none = proportion_from_moments(Moments(30, 0.0, 0.0))
    assert none.mean == 0.0 and none.variance_of_mean == pytest.approx((1 / 32) * (31 / 32) / 30, rel=1e-12)
    every = proportion_from_moments(Moments(30, 30.0, 30.0))
    assert every.mean == 1.0 and every.variance_of_mean == pytest.approx(none.variance_of_mean, rel=1e-12)
    one = proportion_from_moments(Moments(30, 1.0, 1.0))
    assert one.variance_of_mean == pytest.approx((1 / 30) * (29 / 30) / 30, rel=1e-12)
    # about what one error more would make it: continuous across the edge
    assert 0.5 < none.variance_of_mean / one.variance_of_mean < 1.0


# --------------------------------------------------------------------------- the tuned mixture


def test_tuned_mixture_likelihood_ratio_matches_numerical_integration():
    """Λ = ∫ exp(θθ̂/V − θ²/(2V)) dH(θ) for H = Σ wₖ (½N(−cₖδ, sₖ²) + ½N(cₖδ, sₖ²)), sₖ = cₖδ/4,
    against scipy's quad."""
    from scipy import integrate

    from abproxy.stats.sequential import SCALES

    def integrand(theta, observed, variance, delta):
        density = sum(
            weight * 0.5 * (stats.norm.pdf(theta, c * delta, c * delta / 4) + stats.norm.pdf(theta, -c * delta, c * delta / 4))
            for c, weight in SCALES
        )
        return math.exp(theta * observed / variance - theta * theta / (2 * variance)) * density

    assert sum(weight for _, weight in SCALES) == pytest.approx(1.0)
    for observed, variance, delta in [(0.3, 0.01, 0.2), (-0.05, 0.004, 0.1), (0.0, 0.02, 0.3), (1.2, 0.05, 0.25)]:
        mixture = Mixture.tuned(delta)
        assert [k.center for k in mixture.components] == pytest.approx([c * delta for c, _ in SCALES])
        assert mixture.components[2].spread2 == pytest.approx((delta / 4) ** 2)
        points = sorted({sign * c * delta for c, _ in SCALES for sign in (1, -1)} | {0.0})
        numeric, _ = integrate.quad(
            integrand, -24 * delta, 24 * delta, args=(observed, variance, delta), points=points,
            epsabs=0, epsrel=1e-12, limit=200,
        )  # fmt: skip
        assert math.exp(log_lambda(observed, variance, mixture)) == pytest.approx(numeric, rel=1e-8)
    # centred on 0 it is Johari et al.'s N(0, τ²)
    v, tau2, x = 0.01, 0.09, 0.25
    johari = 0.5 * math.log(v / (v + tau2)) + x * x * tau2 / (2 * v * (v + tau2))
    assert log_lambda(x, v, Mixture.normal(tau2)) == pytest.approx(johari, rel=1e-14)


def test_tuned_mixture_interval_is_where_lambda_reaches_one_over_alpha_and_agrees_with_p():
    rng = np.random.default_rng(17)
    checked = 0
    for _ in range(2000):
        n = int(rng.integers(30, 20_000))
        sd = float(rng.uniform(0.1, 5))
        delta = float(rng.uniform(0.02, 0.5)) * sd
        alpha = float(rng.choice([0.01, 0.05, 0.1]))
        c = Estimate(0.0, sd**2 / n, n, n - 1)
        t = Estimate(float(rng.normal(0, 1)) * sd / math.sqrt(n) * float(rng.choice([0.5, 2, 5])), sd**2 / n, n, n - 1)
        mixture = Mixture.tuned(delta)
        h = half_width(2 * sd**2 / n, mixture, alpha)
        assert log_lambda(h, 2 * sd**2 / n, mixture) == pytest.approx(math.log(1 / alpha), abs=1e-9)
        result = msprt(c, t, alpha, mixture)
        low, high = result.difference_ci
        assert (low, high) == (pytest.approx(t.mean - h), pytest.approx(t.mean + h))
        if abs(math.log(max(result.p_value, 1e-300)) - math.log(alpha)) < 1e-9:
            continue
        checked += 1
        assert (result.p_value < alpha) == (not low <= 0 <= high)
    assert checked > 1990


def test_the_tuned_mixture_pays_little_at_its_effect_and_wins_much_at_others():
    """Against a mixture sharp at ±δ alone (½N(±δ, (δ/4)²), abproxy's before), the interval is at
    most 8% wider where effects of δ are decided (1×–2× their fixed horizon), and much narrower
    where effects of δ/4 (16× it) and 4δ (1/16 of it) are."""
    from abproxy.stats.sequential import Component

    delta, alpha = 1.0, 0.05
    fixed = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) ** 2 / delta**2  # n with V = 1/n
    tuned, sharp = Mixture.tuned(delta), Mixture((Component(1.0, delta, (delta / 4) ** 2),))
    for ratio in (1.0, 1.5, 2.0):
        v = 1 / (ratio * fixed)
        assert half_width(v, tuned, alpha) < 1.08 * half_width(v, sharp, alpha)
    for ratio in (16.0, 1 / 16):
        v = 1 / (ratio * fixed)
        assert half_width(v, tuned, alpha) < 0.9 * half_width(v, sharp, alpha)


# --------------------------------------------------------------------------- running state


def test_running_state_merge_is_commutative_associative_and_idempotent_while_the_looks_agree():
    rng = np.random.default_rng(21)

    def random_state():
        """Intervals that all hold 0: looks of one effect, which never contradict each other."""
        low, high = -float(rng.uniform(0, 2)), float(rng.uniform(0, 2))
        lift = (-float(rng.uniform(0, 1)), float(rng.uniform(0, 1))) if rng.random() < 0.7 else (None, None)
        return RunningState(float(rng.uniform()), low, high, *lift)

    for _ in range(500):
        a, b, c = random_state(), random_state(), random_state()
        assert a.merge(b) == b.merge(a)
        assert a.merge(b).merge(c) == a.merge(b.merge(c))
        assert a.merge(a) == a and a.merge(b).merge(b) == a.merge(b)
        assert a.merge(b).p_value == min(a.p_value, b.p_value)
        assert a.merge(b).restarts == 0


def test_looks_that_contradict_each_other_start_the_sequence_again_from_the_newer():
    early = RunningState(1e-9, 0.3, 0.5, 0.1, 0.2)
    later = RunningState(0.4, -0.1, 0.2)
    restarted = early.merge(later)
    assert restarted == RunningState(0.4, -0.1, 0.2, restarts=1), "the newer look's p and interval, not an empty one"
    assert restarted.drifted and restarted.interval == (-0.1, 0.2)
    assert restarted.merge(early) == restarted, "a look of the older sequence arriving late changes nothing"
    assert early.merge(restarted) == restarted
    narrower = restarted.merge(RunningState(0.3, 0.0, 0.3, restarts=1))
    assert narrower == RunningState(0.3, 0.0, 0.2, restarts=1), "the new sequence narrows as the first did"


def test_running_state_encoding_round_trips_and_refuses_what_is_not_a_state():
    state = RunningState(0.0123456789012345, -0.1 / 3, 2 / 3, 0.01, 0.2)
    assert RunningState.decode(state.encode()) == state
    bare = RunningState(0.5, -1.0, 1.0)
    assert RunningState.decode(bare.encode()) == bare and bare.encode().count("|") == 2
    restarted = RunningState(0.2, -1.0, 1.0, restarts=2)
    assert RunningState.decode(restarted.encode()) == restarted and restarted.encode().endswith("|2")
    for text in ("nan|0|1", "0.5|-inf|1", "0.5|0", "x|0|1", "0.5|0|1|-1", "0.5|0|1|0.5", "0.5|0|1|2|3|4|5", "1.5|0|1", ""):
        assert RunningState.decode(text) is None, text
    drifted = RunningState(1e-9, 0.3, 0.1)
    assert drifted.drifted and drifted.interval is None and drifted.direction == 0


# --------------------------------------------------------------------------- guardrails and power


def test_non_inferiority_rules_out_harm_beyond_the_margin():
    from abproxy.stats.guardrails import Guardrail, harm_bound, non_inferior

    # lower is better (error rate): harm is the upper end of treatment − control
    assert non_inferior((-0.004, 0.008), 0.01, higher_is_better=False)
    assert not non_inferior((-0.004, 0.012), 0.01, higher_is_better=False)
    # higher is better (a score): harm is minus the lower end
    assert non_inferior((-0.09, 0.4), 0.1, higher_is_better=True)
    assert not non_inferior((-0.11, 0.4), 0.1, higher_is_better=True)
    assert harm_bound((-0.11, 0.4), True) == pytest.approx(0.11)
    assert not non_inferior(None, 0.01, False) and not non_inferior((-1, 1), None, False)
    assert Guardrail("latency_ms").absolute_margin(800.0) == pytest.approx(80.0)  # 10% of the control's mean
    assert Guardrail("latency_ms", relative_margin=0.05).absolute_margin(-800.0) == pytest.approx(40.0)
    assert Guardrail("error_rate", margin=0.02).absolute_margin(0.5) == 0.02


def test_sequential_samples_per_arm_sits_on_the_boundary():
    from abproxy.stats.power import sequential_samples_per_arm

    variance, delta, alpha = 2.0, 0.3, 0.05  # σ² = 1 per arm, a 0.3σ effect
    for mixture in (Mixture.tuned(delta), Mixture.normal(0.09)):
        n = sequential_samples_per_arm(variance, delta, mixture, alpha)
        v = variance / n
        assert half_width(v, mixture, alpha) + Z80 * math.sqrt(v) == pytest.approx(delta, rel=1e-6)
        # the always-valid test needs more than the fixed-horizon 174.4, by its boundary
        assert 1.2 * 174.4 < n < 2.5 * 174.4
    assert sequential_samples_per_arm(variance, 0.0, Mixture.tuned(delta), alpha) is None
    assert sequential_samples_per_arm(variance, -0.1, Mixture.tuned(delta), alpha) is None


def test_the_interval_of_a_lift_on_a_mean_near_0_is_found_not_a_crash():
    """A control mean near 0 makes the lift's variance enormous beside the mixture (here 2.9e12
    against 1.6e-4, from a simulated score around 0): 1/(2V) − 1/(2(V + s²)) cancels to 0 in
    floating point, which divided by zero in every look of such an experiment."""
    mixture = Mixture.tuned(0.05)
    variance = 2931138114450.105
    h = half_width(variance, mixture, 0.05)
    assert math.isfinite(h) and h > 0
    assert log_lambda(h, variance, mixture) == pytest.approx(math.log(1 / 0.05), rel=1e-9)
