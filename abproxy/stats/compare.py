"""Fixed-horizon comparison of a treatment arm against the control: Welch's t-test (or a
z-test for proportions), a confidence interval for the difference and, by the delta method,
for the relative lift."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as scipy_stats

from abproxy.stats.estimates import Estimate


@dataclass(frozen=True, slots=True)
class Comparison:
    difference: float
    difference_ci: tuple[float, float]
    lift: float | None
    lift_ci: tuple[float, float] | None
    statistic: float
    dof: float
    p_value: float


def welch_dof(control: Estimate, treatment: Estimate) -> float:
    """Welch–Satterthwaite degrees of freedom (infinite when both sides are normal approximations)."""
    if math.isinf(control.dof) and math.isinf(treatment.dof):
        return math.inf
    numerator = (control.variance_of_mean + treatment.variance_of_mean) ** 2
    denominator = control.variance_of_mean**2 / control.dof + treatment.variance_of_mean**2 / treatment.dof
    return numerator / denominator if denominator > 0 else math.inf


def _critical(alpha: float, dof: float) -> float:
    if math.isinf(dof):
        return float(scipy_stats.norm.ppf(1 - alpha / 2))
    return float(scipy_stats.t.ppf(1 - alpha / 2, dof))


def relative_lift(control: Estimate, treatment: Estimate, alpha: float) -> tuple[float, tuple[float, float]] | None:
    """treatment/control − 1 with a normal interval from the delta method:
    Var ≈ v_t / m_c² + m_t² v_c / m_c⁴."""
    if control.mean == 0:
        return None
    lift = treatment.mean / control.mean - 1
    variance = (
        treatment.variance_of_mean / control.mean**2 + treatment.mean**2 * control.variance_of_mean / control.mean**4
    )
    half_width = float(scipy_stats.norm.ppf(1 - alpha / 2)) * math.sqrt(variance)
    return lift, (lift - half_width, lift + half_width)


def compare(control: Estimate, treatment: Estimate, alpha: float) -> Comparison | None:
    """Two-sided test of treatment − control; equals scipy's ``ttest_ind_from_stats(equal_var=False)``
    for per-request estimates."""
    standard_error = math.sqrt(control.variance_of_mean + treatment.variance_of_mean)
    difference = treatment.mean - control.mean
    if standard_error == 0:
        return None
    dof = welch_dof(control, treatment)
    statistic = difference / standard_error
    if math.isinf(dof):
        p_value = float(2 * scipy_stats.norm.sf(abs(statistic)))
    else:
        p_value = float(2 * scipy_stats.t.sf(abs(statistic), dof))
    half_width = _critical(alpha, dof) * standard_error
    lift = relative_lift(control, treatment, alpha)
    return Comparison(
        difference=difference,
        difference_ci=(difference - half_width, difference + half_width),
        lift=lift[0] if lift else None,
        lift_ci=lift[1] if lift else None,
        statistic=statistic,
        dof=dof,
        p_value=p_value,
    )
