"""The estimate of one arm's metric — a mean and the variance of that mean — from its
sufficient statistics, per request or per randomisation unit."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import special

from abproxy.stats.summary import Moments


@dataclass(frozen=True, slots=True)
class Estimate:
    mean: float
    variance_of_mean: float
    n: float
    """Observations behind the estimate: requests, or units when analysed per unit."""
    dof: float
    """Degrees of freedom of the variance estimate (``inf`` for a normal approximation)."""

    @property
    def std_error(self) -> float:
        return math.sqrt(self.variance_of_mean)

    @property
    def observation_variance(self) -> float:
        """The variance of one observation this estimate implies (for effect sizes and power)."""
        return self.variance_of_mean * self.n


@dataclass(frozen=True, slots=True)
class UnitSums:
    """Per-unit sufficient statistics of a metric: K units with totals Y_u over N_u requests,
    the totals taken about ``shift`` (Y_u = Σ (x − shift) over the unit's requests)."""

    units: float
    sum_y: float
    sum_n: float
    sum_yy: float
    sum_nn: float
    sum_yn: float
    shift: float = 0.0


def critical_value(alpha: float, dof: float) -> float:
    """Two-sided critical value: Student's t on ``dof`` degrees of freedom, the normal's when
    ``dof`` is infinite."""
    if math.isinf(dof):
        return float(special.ndtri(1 - alpha / 2))
    return float(special.stdtrit(dof, 1 - alpha / 2))


def interval(estimate: Estimate, alpha: float) -> tuple[float, float]:
    """Two-sided (1 − alpha) interval for the mean: Student's t on its degrees of freedom, or
    the normal when the estimate is a normal approximation."""
    half_width = critical_value(alpha, estimate.dof) * estimate.std_error
    return (estimate.mean - half_width, estimate.mean + half_width)


def from_moments(moments: Moments) -> Estimate | None:
    """Per-request analysis: the sample mean and s²/n, with n - 1 degrees of freedom."""
    if moments.n < 2 or moments.variance is None:
        return None
    return Estimate(moments.mean, moments.variance / moments.n, moments.n, moments.n - 1)  # type: ignore[arg-type]


def proportion_from_moments(moments: Moments) -> Estimate | None:
    """A 0/1 metric (error rate, thumbs) with the normal approximation p(1 - p)/n.

    At a rate of exactly 0 or 1 that variance is 0, and "no error in 30 requests" would read as
    certainty; there the variance is taken at (x + 1)/(n + 2), the adjusted rate of Agresti &
    Caffo ("Simple and effective confidence intervals for proportions and differences of
    proportions result from adding two successes and two failures", The American Statistician
    2000), about what one more error would make it."""
    n = moments.n
    if n < 2:
        return None
    successes = moments.sum
    p = successes / n
    q = (successes + 1) / (n + 2) if at_edge(moments) else p
    return Estimate(p, q * (1 - q) / n, n, math.inf)


def at_edge(moments: Moments) -> bool:
    """A 0/1 metric whose every value is 0, or every one 1: its sample variance is 0."""
    return moments.sum <= 0 or moments.sum >= moments.n


def from_unit_sums(sums: UnitSums) -> Estimate | None:
    """Per-request mean Σ Y_u / Σ N_u when units (users) were randomised, with its variance
    by the delta method for a ratio of means (as GrowthBook and Eppo do for ratio metrics):

        Var(R) ≈ (σ²_Y / μ_N² − 2 μ_Y σ_YN / μ_N³ + μ_Y² σ²_N / μ_N⁴) / K
               = Σ (Y_u − R N_u)² / ((K − 1) K μ_N²),

    the second form (the variance of the linearised residual) computed from the sums as they
    are kept, about the shift, where R is small and nothing cancels."""
    k = sums.units
    if k < 2 or sums.sum_n <= 0:
        return None
    ratio = sums.sum_y / sums.sum_n
    residual_squares = sums.sum_yy - 2 * ratio * sums.sum_yn + ratio * ratio * sums.sum_nn
    mean_n = sums.sum_n / k
    variance = residual_squares / ((k - 1) * k * mean_n * mean_n)
    return Estimate(sums.shift + ratio, max(variance, 0.0), k, k - 1)
