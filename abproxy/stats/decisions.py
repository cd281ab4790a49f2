"""Across arms: Holm's correction, sample-ratio mismatch, probability to be best, sample size."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats

from abproxy.stats.estimates import Estimate

SRM_THRESHOLD = 0.001


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


def srm_p_value(observed: Sequence[float], weights: Sequence[float]) -> float | None:
    """χ² goodness of fit of assignment counts against the configured weights."""
    total = sum(observed)
    weight_total = sum(weights)
    if total == 0 or len(observed) < 2 or weight_total <= 0:
        return None
    expected = [total * w / weight_total for w in weights]
    if any(e == 0 for e in expected):
        return 0.0 if any(o > 0 and e == 0 for o, e in zip(observed, expected, strict=True)) else None
    return float(scipy_stats.chisquare(observed, expected).pvalue)


def probability_to_be_best(
    estimates: Sequence[Estimate], higher_is_better: bool, draws: int = 20_000, seed: int = 20240611
) -> list[float]:
    """P(arm is best) under independent normal posteriors N(mean, variance of mean), flat priors.
    A fixed seed keeps the figure stable between looks at the same data."""
    rng = np.random.default_rng(seed)
    means = np.array([e.mean for e in estimates])
    scales = np.sqrt(np.array([e.variance_of_mean for e in estimates]))
    samples = rng.standard_normal((draws, len(estimates))) * scales + means
    best = samples.argmax(axis=1) if higher_is_better else samples.argmin(axis=1)
    counts = np.bincount(best, minlength=len(estimates))
    return [float(c) / draws for c in counts]


def samples_per_arm(
    observation_variance: float, absolute_effect: float, alpha: float, power: float = 0.8
) -> float | None:
    """Fixed-horizon sample size per arm to detect ``absolute_effect`` with a two-sided test:
    n = 2 (z₁₋α/₂ + z_power)² σ² / δ²."""
    if absolute_effect == 0 or not math.isfinite(observation_variance):
        return None
    z = scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power)
    return float(2 * z * z * observation_variance / absolute_effect**2)
