"""How many samples per arm a comparison needs to conclude, from its actual boundary.

A fixed-horizon test at n per arm rejects with probability ``power`` when the effect δ satisfies
δ = (z₁₋α/₂ + z_power) σ_d / √n. The always-valid test rejects at a look where |θ̂| exceeds its
half-width h(V), V = σ_d²/n; so the same reasoning on its boundary gives the n with

    gap = h(σ_d²/n) + z_power σ_d / √n,

where ``gap`` is the effect to detect (the MDE), or, for a guardrail, the margin less the harm
estimated now. It counts only the look at n (earlier looks may have rejected already), so it
errs on the side of more samples."""

from __future__ import annotations

import math

from scipy import special
from scipy.optimize import brentq

from abproxy.stats.sequential import Mixture, half_width

MAX_SAMPLES = 1e12


def sequential_samples_per_arm(
    difference_variance: float, gap: float, mixture: Mixture, alpha: float, power: float = 0.8
) -> float | None:
    """The n per arm at which ``gap`` clears the always-valid boundary with probability
    ``power``; ``difference_variance`` is σ²_control + σ²_treatment of one observation each.
    None when no n does (a gap of 0 or less, or one beyond :data:`MAX_SAMPLES`)."""
    if not gap > 0 or not difference_variance > 0 or not mixture.usable:
        return None
    z = float(special.ndtri(power))

    def shortfall(log_n: float) -> float:
        variance = difference_variance / math.exp(log_n)
        return half_width(variance, mixture, alpha) + z * math.sqrt(variance) - gap

    low, high = 0.0, math.log(MAX_SAMPLES)
    if shortfall(high) > 0:
        return None
    if shortfall(low) <= 0:
        return 1.0
    return math.exp(brentq(shortfall, low, high, xtol=1e-4))


def conditional_samples_per_arm(
    n: float, difference: float, difference_variance: float, effect: float, mixture: Mixture, alpha: float, power: float = 0.8
) -> float | None:
    """The n per arm (more than ``n``) at which the always-valid test, having seen ``difference``
    with ``n`` per arm, crosses its boundary with probability ``power`` if what is still to come
    has an effect of ``effect`` in the direction seen so far: a forecast given what has been seen.

    With x = |θ̂ₙ| and the N − n observations to come averaging ``effect``, N θ̂_N ~
    N(n x + (N − n) effect, (N − n) σ_d²), so the look at N crosses with probability ``power``
    where n x + (N − n) effect − N h(σ_d²/N) − z_power σ_d √(N − n) ≥ 0. Counting only that look
    (earlier ones may cross already) errs on the side of more samples. None when no N up to
    :data:`MAX_SAMPLES` does."""
    if not effect > 0 or not difference_variance > 0 or not mixture.usable or not n > 0:
        return None
    z = float(special.ndtri(power))
    seen = n * abs(difference)

    def surplus(log_n: float) -> float:
        total = math.exp(log_n)
        to_come = total - n
        h = half_width(difference_variance / total, mixture, alpha)
        return (seen + to_come * effect - total * h - z * math.sqrt(difference_variance * to_come)) / total

    low = math.log(n) + 1e-9
    if surplus(low) >= 0:
        return n + 1.0
    grid = [low + step * 0.1 for step in range(1, int((math.log(MAX_SAMPLES) - low) / 0.1) + 1)]
    previous = low
    for point in grid:
        if surplus(point) >= 0:
            return math.exp(brentq(surplus, previous, point, xtol=1e-6))
        previous = point
    return None
