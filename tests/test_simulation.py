"""Simulations of the statistics core (fixed seeds, reproducible; well under a minute): Johari
et al.'s centred mixture N(0, (0.3σ)²) on its own — the fallback of ``msprt`` when the MDE gives
no effect size — and the per-user delta method. The verdict as abproxy reaches it (the mixture
tuned to ``stats.mde``, guardrails, the kept state) is simulated in test_verdict_simulation.py.

Measured with the seeds in this file (RHO = 0.3, α = 0.05), `pytest -s` prints them again:

* A/A with peeking, 1,000 experiments × 20 looks of 50 per arm (normal data): the sequential
  path (msprt + running minimum) ever declares
  significance in 0.017 of experiments (bound 0.05 + 3·sqrt(0.05·0.95/1000) = 0.0707; mean over
  five other seeds 0.013); naive fixed-horizon Welch at every look in 0.258 (≈ 0.25 over seeds).
  RHO = 0.2 / 0.5 on the same data: 0.016 / 0.010.
* Power for a true 0.3σ effect, 1,000 runs, looks every 50 per arm up to n (and at n), stopping
  at the first rejection: n = 175 (the fixed-horizon n for power 0.8) → 0.468, n = 300 → 0.788,
  **n = 400 per arm → 0.894** (the n pinned here, ≥ 0.85 asserted). With 2,000 runs and other
  seeds n = 350 gives ≈ 0.85, so the always-valid test needs ≈ 2–2.3× the fixed-horizon 175.
* Clustered users (200 users per arm, 5–50 requests each, ICC 0.3, no true difference),
  1,000 A/A experiments, fixed-horizon compare(): per-request Welch rejects in 0.530, the
  per-user delta method (from_unit_sums on the Redis-style sums) in 0.035 (0.042–0.062 on
  other seeds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from abproxy.stats.compare import compare
from abproxy.stats.estimates import UnitSums, from_moments, from_unit_sums
from abproxy.stats.sequential import msprt, running_p_value
from abproxy.stats.summary import Moments

ALPHA = 0.05
SIMS = 1_000
BOUND = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / SIMS)  # ≈ 0.0707


def cumulative_looks(rng: np.random.Generator, sims: int, looks: list[int], effect: float):
    """Normal data (σ = 1) for two arms, summarised as the Redis counters would be at each look:
    cumulative n, Σy and Σy² per experiment, arm (0 control, 1 treatment) and look."""
    total = looks[-1]
    x = rng.standard_normal((sims, 2, total))
    x[:, 1] += effect
    s = np.cumsum(x, axis=2)[:, :, np.array(looks) - 1]
    q = np.cumsum(x * x, axis=2)[:, :, np.array(looks) - 1]
    return np.array(looks, dtype=float), s, q


def sequential_ever_rejects(n, s, q, alpha=ALPHA, rho=None) -> np.ndarray:
    """msprt with the centred mixture at every look, the running minimum p-value."""
    kwargs = {} if rho is None else {"rho": rho}
    sims, _, looks = s.shape
    ever = np.zeros(sims, dtype=bool)
    for i in range(sims):
        running = None
        for k in range(looks):
            control = from_moments(Moments(n[k], s[i, 0, k], q[i, 0, k]))
            treatment = from_moments(Moments(n[k], s[i, 1, k], q[i, 1, k]))
            running = running_p_value(running, msprt(control, treatment, alpha, **kwargs).p_value)
            if running < alpha:
                ever[i] = True
                break  # stopping at the first rejection is what a user does
    return ever


def naive_ever_rejects(n, s, q, alpha=ALPHA) -> np.ndarray:
    """Fixed-horizon Welch at every look (vectorised; compare() equals scipy, see test_stats)."""
    mean = s / n
    sd = np.sqrt((q - s * s / n) / (n - 1))
    p = stats.ttest_ind_from_stats(mean[:, 1], sd[:, 1], n, mean[:, 0], sd[:, 0], n, equal_var=False).pvalue
    return (p < alpha).any(axis=1)


@pytest.mark.slow
def test_aa_with_peeking_sequential_holds_alpha_naive_inflates():
    rng = np.random.default_rng(20240601)
    looks = list(range(50, 1001, 50))  # 20 looks, 50 per arm per batch
    n, s, q = cumulative_looks(rng, SIMS, looks, effect=0.0)

    # spot-check the vectorised naive p-values against compare() itself
    for i in range(5):
        c = from_moments(Moments(n[-1], s[i, 0, -1], q[i, 0, -1]))
        t = from_moments(Moments(n[-1], s[i, 1, -1], q[i, 1, -1]))
        sd = np.sqrt((q[i, :, -1] - s[i, :, -1] ** 2 / n[-1]) / (n[-1] - 1))
        mean = s[i, :, -1] / n[-1]
        ref = stats.ttest_ind_from_stats(mean[1], sd[1], n[-1], mean[0], sd[0], n[-1], equal_var=False)
        assert compare(c, t, ALPHA).p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-12)

    sequential = sequential_ever_rejects(n, s, q).mean()
    naive = naive_ever_rejects(n, s, q).mean()
    print(f"\nA/A, {SIMS} experiments × {len(looks)} looks: sequential (mSPRT) ever-significant rate {sequential:.4f} "
          f"(bound {BOUND:.4f}); naive Welch at every look {naive:.4f}")
    assert sequential <= BOUND, f"sequential false-positive rate {sequential:.4f} > {BOUND:.4f} (naive {naive:.4f})"
    assert naive > 0.10, f"naive peeking rate {naive:.4f} should be inflated above 0.05 (sequential {sequential:.4f})"


def sequential_power(n_max: int, effect: float, sims: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    looks = sorted(set(range(50, n_max, 50)) | {n_max})
    n, s, q = cumulative_looks(rng, sims, looks, effect)
    return float(sequential_ever_rejects(n, s, q).mean())


@pytest.mark.slow
def test_sequential_power_for_a_third_of_a_standard_deviation():
    fixed_horizon = 2 * (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) ** 2 / 0.3**2
    assert math.ceil(fixed_horizon) == 175
    powers = {n: sequential_power(n, 0.3, SIMS, seed=7_000 + n) for n in (175, 300, 400)}
    print(f"\nsequential power at 0.3σ, {SIMS} runs, looks every 50 per arm: "
          + ", ".join(f"n={n}: {p:.3f}" for n, p in powers.items()))
    # the price of peeking freely: at the fixed-horizon n the sequential test is underpowered …
    assert powers[175] < 0.8, powers
    # … and reaches 0.8 comfortably by 400 per arm (≈ 2.3× the fixed-horizon n)
    assert powers[400] >= 0.85, powers
    assert powers[175] < powers[300] < powers[400]


def clustered_experiments(rng: np.random.Generator, sims: int, users: int, icc: float):
    """Per-request values y = b_u + e with Var(b) = icc, Var(e) = 1 - icc, 5–50 requests per user,
    no difference between arms; returns, per experiment and arm, the request-level moments
    and the per-user sums exactly as the Redis counters keep them."""
    n_u = rng.integers(5, 51, size=(sims, 2, users))
    b_u = rng.standard_normal((sims, 2, users)) * math.sqrt(icc)
    counts = n_u.ravel()
    y = np.repeat(b_u.ravel(), counts) + rng.standard_normal(counts.sum()) * math.sqrt(1 - icc)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    y_u = np.add.reduceat(y, starts).reshape(n_u.shape)  # Σ over a user's requests
    yy = np.add.reduceat(y * y, starts).reshape(n_u.shape)
    n_u = n_u.astype(float)
    moments = (n_u.sum(2), y_u.sum(2), yy.sum(2))  # m|n, m|s, m|q
    unit = (y_u.sum(2), n_u.sum(2), (y_u * y_u).sum(2), (n_u * n_u).sum(2), (y_u * n_u).sum(2))  # s, n, uyy, unn, uyn
    return moments, unit


@pytest.mark.slow
def test_clustered_users_naive_per_request_inflates_delta_method_holds():
    rng = np.random.default_rng(31337)
    users = 200
    (n, s, q), (sy, sn, syy, snn, syn) = clustered_experiments(rng, SIMS, users, icc=0.3)
    naive = delta = 0
    for i in range(SIMS):
        per_request = [from_moments(Moments(n[i, a], s[i, a], q[i, a])) for a in (0, 1)]
        per_user = [
            from_unit_sums(UnitSums(users, sy[i, a], sn[i, a], syy[i, a], snn[i, a], syn[i, a])) for a in (0, 1)
        ]
        naive += compare(*per_request, ALPHA).p_value < ALPHA
        delta += compare(*per_user, ALPHA).p_value < ALPHA
    naive_rate, delta_rate = naive / SIMS, delta / SIMS
    print(f"\nclustered A/A ({SIMS} experiments, {users} users/arm, ICC 0.3): per-request Welch {naive_rate:.4f}, "
          f"per-user delta method {delta_rate:.4f} (bound {BOUND:.4f})")
    assert naive_rate > 0.10, f"per-request Welch rate {naive_rate:.4f} should be inflated (delta {delta_rate:.4f})"
    assert delta_rate <= BOUND, f"delta-method rate {delta_rate:.4f} > {BOUND:.4f} (naive {naive_rate:.4f})"
