"""Always-valid inference: the mixture sequential probability ratio test (mSPRT) with a normal
mixing distribution — Johari, Koomen, Pekelis & Walsh, "Always Valid Inference: Continuous
Monitoring of A/B Tests" (Operations Research, 2022), the method behind Optimizely's Stats Engine.

For a difference estimate θ̂ with variance V and mixing distribution θ ~ N(0, τ²), the mixture
likelihood ratio against θ = 0 is

    Λ = sqrt(V / (V + τ²)) · exp(θ̂² τ² / (2 V (V + τ²)))

and p = min over looks of 1/Λ is a p-value that stays valid however often it is looked at.
Rejecting when Λ ≥ 1/α gives the always-valid confidence interval

    θ̂ ± sqrt(V (V + τ²) / τ² · (2 log(1/α) + log((V + τ²) / V))).

Tuning: τ = ρ·σ with σ the pooled per-observation standard deviation and ρ = 0.3, which puts
the mixture's weight on effects of about a third of a standard deviation, the size a prompt
change plausibly makes; smaller effects are still found, with more data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from abproxy.stats.estimates import Estimate

RHO = 0.3


@dataclass(frozen=True, slots=True)
class SequentialResult:
    p_value: float
    """1/Λ at this look, capped at 1 (combine looks with :func:`running_p_value`)."""
    difference_ci: tuple[float, float]


def mixing_variance(control: Estimate, treatment: Estimate, rho: float = RHO) -> float:
    pooled = (control.observation_variance + treatment.observation_variance) / 2
    return rho * rho * pooled


def msprt(control: Estimate, treatment: Estimate, alpha: float, rho: float = RHO) -> SequentialResult | None:
    variance = control.variance_of_mean + treatment.variance_of_mean
    tau2 = mixing_variance(control, treatment, rho)
    if variance <= 0 or tau2 <= 0:
        return None
    difference = treatment.mean - control.mean
    log_lambda = 0.5 * math.log(variance / (variance + tau2)) + difference**2 * tau2 / (
        2 * variance * (variance + tau2)
    )
    p_value = 1.0 if log_lambda <= 0 else math.exp(-log_lambda)
    half_width = math.sqrt(
        variance * (variance + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((variance + tau2) / variance))
    )
    return SequentialResult(min(1.0, p_value), (difference - half_width, difference + half_width))


def running_p_value(previous: float | None, current: float) -> float:
    """The always-valid p-value is the minimum over every look so far: it never goes back up."""
    return current if previous is None else min(previous, current)
