"""Fixed-horizon comparison of a treatment arm against the control: Welch's t-test (or a
z-test for proportions), a confidence interval for the difference and, by the delta method,
for the relative lift."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import special

from abproxy.stats.estimates import Estimate, critical_value


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


def lift_variance(control: Estimate, treatment: Estimate) -> float | None:
    """Variance of treatment/control − 1 by the delta method: v_t / m_c² + m_t² v_c / m_c⁴."""
    if control.mean == 0:
        return None
    return treatment.variance_of_mean / control.mean**2 + treatment.mean**2 * control.variance_of_mean / control.mean**4


def relative_lift(
    control: Estimate, treatment: Estimate, alpha: float, dof: float = math.inf
) -> tuple[float, tuple[float, float]] | None:
    """treatment/control − 1 with its interval from the delta-method variance, on ``dof``
    degrees of freedom (Welch's, as for the difference; the normal's when infinite)."""
    variance = lift_variance(control, treatment)
    if variance is None:
        return None
    lift = treatment.mean / control.mean - 1
    half_width = critical_value(alpha, dof) * math.sqrt(variance)
    return lift, (lift - half_width, lift + half_width)


def _two_sided_p(statistic: float, dof: float) -> float:
    if math.isinf(dof):
        return float(special.erfc(abs(statistic) / math.sqrt(2)))
    return float(2 * special.stdtr(dof, -abs(statistic)))


def compare(control: Estimate, treatment: Estimate, alpha: float) -> Comparison | None:
    """Two-sided test of treatment − control; equals scipy's ``ttest_ind_from_stats(equal_var=False)``
    for per-request estimates.

    Two arms without any spread (every value the same) differ by exactly their difference:
    p = 1 when it is 0, else 0, and the interval is that one point."""
    standard_error = math.sqrt(control.variance_of_mean + treatment.variance_of_mean)
    difference = treatment.mean - control.mean
    lift = treatment.mean / control.mean - 1 if control.mean != 0 else None
    if standard_error == 0:
        point = (difference, difference)
        return Comparison(
            difference=difference,
            difference_ci=point,
            lift=lift,
            lift_ci=(lift, lift) if lift is not None else None,
            statistic=0.0 if difference == 0 else math.copysign(math.inf, difference),
            dof=math.inf,
            p_value=1.0 if difference == 0 else 0.0,
        )
    dof = welch_dof(control, treatment)
    statistic = difference / standard_error
    half_width = critical_value(alpha, dof) * standard_error
    lifted = relative_lift(control, treatment, alpha, dof)
    return Comparison(
        difference=difference,
        difference_ci=(difference - half_width, difference + half_width),
        lift=lifted[0] if lifted else None,
        lift_ci=lifted[1] if lifted else None,
        statistic=statistic,
        dof=dof,
        p_value=_two_sided_p(statistic, dof),
    )
