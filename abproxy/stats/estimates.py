"""The estimate of one arm's metric — a mean and the variance of that mean — from its
sufficient statistics, per request or per randomisation unit."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    """Per-unit sufficient statistics of a metric: K units with totals Y_u over N_u requests."""

    units: float
    sum_y: float
    sum_n: float
    sum_yy: float
    sum_nn: float
    sum_yn: float


def interval(estimate: Estimate, alpha: float) -> tuple[float, float]:
    """Two-sided (1 − alpha) interval for the mean: Student's t on its degrees of freedom, or
    the normal when the estimate is a normal approximation."""
    from scipy import stats as scipy_stats

    if math.isinf(estimate.dof):
        critical = float(scipy_stats.norm.ppf(1 - alpha / 2))
    else:
        critical = float(scipy_stats.t.ppf(1 - alpha / 2, estimate.dof))
    half_width = critical * estimate.std_error
    return (estimate.mean - half_width, estimate.mean + half_width)


def from_moments(moments: Moments) -> Estimate | None:
    """Per-request analysis: the sample mean and s²/n, with n - 1 degrees of freedom."""
    if moments.n < 2 or moments.variance is None:
        return None
    return Estimate(moments.total / moments.n, moments.variance / moments.n, moments.n, moments.n - 1)


def proportion_from_moments(moments: Moments) -> Estimate | None:
    """A 0/1 metric (error rate, thumbs) with the normal approximation p(1 - p)/n."""
    if moments.n < 2:
        return None
    p = moments.total / moments.n
    return Estimate(p, p * (1 - p) / moments.n, moments.n, math.inf)


def from_unit_sums(sums: UnitSums) -> Estimate | None:
    """Per-request mean Σ Y_u / Σ N_u when units (users) were randomised, with its variance
    by the delta method for a ratio of means (as GrowthBook and Eppo do for ratio metrics):

        Var(R) ≈ (σ²_Y / μ_N² − 2 μ_Y σ_YN / μ_N³ + μ_Y² σ²_N / μ_N⁴) / K
    """
    k = sums.units
    if k < 2 or sums.sum_n <= 0:
        return None
    mean_y, mean_n = sums.sum_y / k, sums.sum_n / k
    var_y = (sums.sum_yy - k * mean_y * mean_y) / (k - 1)
    var_n = (sums.sum_nn - k * mean_n * mean_n) / (k - 1)
    cov_yn = (sums.sum_yn - k * mean_y * mean_n) / (k - 1)
    variance = (
        var_y / mean_n**2 - 2 * mean_y * cov_yn / mean_n**3 + mean_y**2 * var_n / mean_n**4
    ) / k
    return Estimate(sums.sum_y / sums.sum_n, max(variance, 0.0), k, k - 1)
