"""Guardrails as non-inferiority: a treatment may win only when, on every guardrail metric, the
interval of treatment − control rules out harm larger than a margin — the harm must be shown
small, not merely fail to be shown large (ICH E9 and the FDA's 2016 guidance on non-inferiority
trials; Kohavi, Tang & Xu, "Trustworthy Online Controlled Experiments", ch. 21, on guardrail
metrics)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_RATE_MARGIN = 0.01
"""One percentage point, for 0/1 metrics such as ``error_rate``."""
DEFAULT_RELATIVE_MARGIN = 0.10
"""Ten per cent of the control's mean, for continuous metrics such as ``latency_ms``."""


@dataclass(frozen=True, slots=True)
class Guardrail:
    """A metric a winner may not be worse on by more than ``margin`` (absolute) or
    ``relative_margin`` × |control's mean|; with neither, the relative default."""

    metric: str
    margin: float | None = None
    relative_margin: float | None = None

    def absolute_margin(self, control_mean: float | None) -> float | None:
        if self.margin is not None:
            return self.margin
        if control_mean is None:
            return None
        relative = DEFAULT_RELATIVE_MARGIN if self.relative_margin is None else self.relative_margin
        return relative * abs(control_mean)


def harm_bound(interval: tuple[float, float], higher_is_better: bool) -> float:
    """The largest harm (worsening, as a positive number) the interval of treatment − control
    leaves possible."""
    low, high = interval
    return -low if higher_is_better else high


def non_inferior(interval: tuple[float, float] | None, margin: float | None, higher_is_better: bool) -> bool:
    """Whether the interval rules out harm of ``margin`` or more. No interval (too little data,
    or looks that contradict each other), or no margin: not shown."""
    if interval is None or margin is None or margin <= 0:
        return False
    return harm_bound(interval, higher_is_better) < margin


def harm_shown(interval: tuple[float, float] | None, margin: float | None, higher_is_better: bool) -> bool:
    """Whether the interval shows harm beyond ``margin``: even its most favourable end is worse
    than the control by more than the margin (what stops an arm, or revokes a winner)."""
    if interval is None or margin is None or margin <= 0:
        return False
    low, high = interval
    least_harm = -high if higher_is_better else low
    return least_harm > margin
