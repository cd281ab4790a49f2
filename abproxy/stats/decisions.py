"""Across arms: Holm's correction, sample-ratio mismatch, probability to be best, sample size."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special
from scipy import stats as scipy_stats

from abproxy.stats.estimates import Estimate

SRM_THRESHOLD = 0.001
"""The level of the sequential sample-ratio test: an experiment whose assignment really follows
its weights is flagged with probability at most this, however often it is looked at."""
SRM_CONCENTRATION = 100.0
"""The Dirichlet prior's concentration k (its parameters are k × the weights): Lindon & Malek's
default, which puts the prior's spread of each arm's share near ±5 percentage points."""


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def sequential_srm_p_value(
    observed: Sequence[float], weights: Sequence[float], concentration: float = SRM_CONCENTRATION
) -> float | None:
    """An always-valid p-value that assignment counts follow the weights: Lindon & Malek,
    "Anytime-Valid Inference for Multinomial Count Data" (NeurIPS 2022), Optimizely's sequential
    SRM test. With θ₀ the weights as shares and a Dirichlet(k θ₀) prior on the true shares, the
    Bayes factor of the counts x (n in all) against θ₀,

        BF = Γ(k) / Γ(k + n) · Π Γ(k θ₀ᵢ + xᵢ) / Γ(k θ₀ᵢ) / Π θ₀ᵢ^xᵢ,

    is a martingale under θ₀ (the Dirichlet-multinomial likelihood over the multinomial's), so
    1/BF, kept as a running minimum over looks, is a p-value however often it is looked at.
    None without counts; 0 when an arm of weight 0 has any."""
    total = sum(observed)
    weight_total = sum(weights)
    if total == 0 or len(observed) < 2 or weight_total <= 0:
        return None
    shares = [w / weight_total for w in weights]
    if any(share == 0 and count > 0 for share, count in zip(shares, observed, strict=True)):
        return 0.0
    pairs = [(share, count) for share, count in zip(shares, observed, strict=True) if share > 0]
    log_bf = special.gammaln(concentration) - special.gammaln(concentration + total)
    for share, count in pairs:
        prior = concentration * share
        log_bf += special.gammaln(prior + count) - special.gammaln(prior) - count * math.log(share)
    return 1.0 if log_bf <= 0 else float(math.exp(-log_bf))


def probability_to_be_best(estimates: Sequence[Estimate], higher_is_better: bool) -> list[float]:
    """P(arm is best) under independent normal posteriors N(mean, variance of mean), flat priors:

        P(i best) = ∫ φ_i(x) Π_{j≠i} Φ((x − μ_j)/s_j) dx      (higher is better),

    by the trapezoidal rule on a grid that resolves every arm's own scale (exact for two arms to
    about 1e-9, and the same number at every look at the same data, unlike random draws)."""
    if len(estimates) == 2:
        a, b = estimates
        scale = math.sqrt(max(a.variance_of_mean, 0.0) + max(b.variance_of_mean, 0.0))
        if scale > 0:
            second = float(special.ndtr((1 if higher_is_better else -1) * (b.mean - a.mean) / scale))
            return [1.0 - second, second]
    means = np.array([e.mean for e in estimates], dtype=float)
    scales = np.sqrt(np.array([max(e.variance_of_mean, 0.0) for e in estimates], dtype=float))
    sign = 1.0 if higher_is_better else -1.0
    spread = scales > 0
    if not spread.any():
        best = means == (means.max() if higher_is_better else means.min())
        return [float(b) / float(best.sum()) for b in best]
    steps = np.linspace(-10.0, 10.0, 401)
    grid = np.unique(np.concatenate([means[j] + scales[j] * steps for j in np.flatnonzero(spread)] + [means]))
    # below[j]: P(arm j's value is worse than x) at each grid point
    below = np.empty((len(estimates), grid.size))
    for j in range(len(estimates)):
        if spread[j]:
            below[j] = special.ndtr(sign * (grid - means[j]) / scales[j])
        else:
            below[j] = np.where(sign * (grid - means[j]) > 0, 1.0, np.where(grid == means[j], 0.5, 0.0))
    chances = np.zeros(len(estimates))
    for i in range(len(estimates)):
        others = np.prod(np.delete(below, i, axis=0), axis=0)
        if spread[i]:
            density = np.exp(-0.5 * ((grid - means[i]) / scales[i]) ** 2) / (scales[i] * math.sqrt(2 * math.pi))
            values = density * others
            chances[i] = float(np.sum((values[1:] + values[:-1]) * np.diff(grid)) / 2)
        else:
            chances[i] = others[np.searchsorted(grid, means[i])]
    total = chances.sum()
    return [float(c / total) for c in chances] if total > 0 else [1.0 / len(estimates)] * len(estimates)


def samples_per_arm(
    observation_variance: float, absolute_effect: float, alpha: float, power: float = 0.8
) -> float | None:
    """Fixed-horizon sample size per arm to detect ``absolute_effect`` with a two-sided test:
    n = 2 (z₁₋α/₂ + z_power)² σ² / δ²."""
    if absolute_effect == 0 or not math.isfinite(observation_variance):
        return None
    z = scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power)
    return float(2 * z * z * observation_variance / absolute_effect**2)
