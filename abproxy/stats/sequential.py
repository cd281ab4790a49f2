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


@dataclass(frozen=True, slots=True)
class RunningState:
    """What one treatment-versus-control comparison keeps between looks: the running minimum
    p-value and, with it, the running intersection of the always-valid intervals (Johari et al.
    pair them this way: p ≤ α exactly when 0 lies outside the intersection)."""

    p_value: float
    lower: float
    upper: float

    def update(self, look: SequentialResult) -> RunningState:
        return RunningState(
            running_p_value(self.p_value, look.p_value),
            max(self.lower, look.difference_ci[0]),
            min(self.upper, look.difference_ci[1]),
        )

    @classmethod
    def first(cls, look: SequentialResult) -> RunningState:
        return cls(look.p_value, look.difference_ci[0], look.difference_ci[1])

    @property
    def direction(self) -> int:
        """+1 or −1 when the interval excludes 0 on one side; 0 when it holds 0, or when the looks
        contradict each other (an empty intersection: the effect drifted over time)."""
        if self.lower > self.upper:
            return 0
        if self.lower > 0:
            return 1
        if self.upper < 0:
            return -1
        return 0

    def encode(self) -> str:
        return f"{self.p_value!r}|{self.lower!r}|{self.upper!r}"

    @classmethod
    def decode(cls, text: str) -> RunningState | None:
        parts = text.split("|")
        if len(parts) != 3:
            return None
        try:
            return cls(float(parts[0]), float(parts[1]), float(parts[2]))
        except ValueError:
            return None
