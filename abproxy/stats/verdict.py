"""The verdict for one experiment: every treatment against the control on every metric, Holm
across treatments on the primary metric, guardrails, SRM, and the status a user acts on."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from abproxy.stats.compare import Comparison, compare
from abproxy.stats.decisions import SRM_THRESHOLD, holm, probability_to_be_best, samples_per_arm, srm_p_value
from abproxy.stats.estimates import Estimate
from abproxy.stats.sequential import RunningState, msprt

COLLECTING, WINNER, NO_DIFFERENCE, SRM = "collecting", "winner", "no_difference", "srm"

SEQUENTIAL_SAMPLE_FACTOR = 2.3
"""How much more data the always-valid test needs than a fixed-horizon one for 80% power:
measured by simulation (tests/test_simulation.py: 400 vs 175 per arm at 0.3σ)."""


@dataclass(frozen=True)
class ArmInput:
    name: str
    control: bool
    weight: float
    assigned: float
    """Assignment count for SRM: units when users are randomised, else requests."""
    estimates: Mapping[str, Estimate | None]


@dataclass(frozen=True)
class Policy:
    primary: str
    guardrails: Sequence[str]
    higher_is_better: Callable[[str], bool]
    alpha: float = 0.05
    min_samples: int = 30
    sequential: bool = True
    mde: float = 0.05
    """Minimal effect worth detecting, relative to the control's mean."""


@dataclass(frozen=True)
class MetricResult:
    comparison: Comparison | None = None
    sequential: RunningState | None = None
    adjusted_p: float | None = None

    @property
    def p_value(self) -> float | None:
        """The p-value decisions use: the always-valid one when sequential, else Welch's."""
        if self.sequential is not None:
            return self.sequential.p_value
        return self.comparison.p_value if self.comparison else None

    @property
    def difference_ci(self) -> tuple[float, float] | None:
        if self.sequential is not None:
            return (self.sequential.lower, self.sequential.upper)
        return self.comparison.difference_ci if self.comparison else None

    @property
    def direction(self) -> int:
        """The sign of treatment − control the evidence supports (0: none either way)."""
        if self.sequential is not None:
            return self.sequential.direction
        if self.comparison is None:
            return 0
        return (self.comparison.difference > 0) - (self.comparison.difference < 0)


@dataclass(frozen=True)
class ArmVerdict:
    name: str
    metrics: dict[str, MetricResult] = field(default_factory=dict)
    prob_best: float | None = None
    samples_needed: float | None = None


@dataclass(frozen=True)
class Verdict:
    status: str
    winner: str | None
    srm_p_value: float | None
    arms: dict[str, ArmVerdict]
    running: dict[tuple[str, str], RunningState]
    """The always-valid p-values and intervals after this look, to keep for the next one."""


def _significantly(result: MetricResult, better: bool, alpha: float, higher_is_better: bool, adjusted: bool) -> bool:
    p_value = result.adjusted_p if adjusted else result.p_value
    if p_value is None or p_value >= alpha or result.direction == 0:
        return False
    improves = (result.direction > 0) == higher_is_better
    return improves if better else not improves


def decide(
    arms: Sequence[ArmInput], policy: Policy, previous: Mapping[tuple[str, str], RunningState]
) -> Verdict:
    control = next(arm for arm in arms if arm.control)
    treatments = [arm for arm in arms if not arm.control]
    metrics = sorted({metric for arm in arms for metric in arm.estimates})
    running: dict[tuple[str, str], RunningState] = dict(previous)
    results: dict[str, dict[str, MetricResult]] = {arm.name: {} for arm in arms}

    for arm in treatments:
        for metric in metrics:
            base, other = control.estimates.get(metric), arm.estimates.get(metric)
            if base is None or other is None:
                results[arm.name][metric] = MetricResult()
                continue
            comparison = compare(base, other, policy.alpha)
            state = None
            if policy.sequential:
                look = msprt(base, other, policy.alpha)
                if look is not None:
                    key = (arm.name, metric)
                    before = previous.get(key)
                    state = running[key] = before.update(look) if before else RunningState.first(look)
            results[arm.name][metric] = MetricResult(comparison, state)

    primary_p = [results[arm.name][policy.primary].p_value for arm in treatments]
    if treatments and all(p is not None for p in primary_p):
        for arm, adjusted in zip(treatments, holm([p for p in primary_p if p is not None]), strict=True):
            result = results[arm.name][policy.primary]
            results[arm.name][policy.primary] = MetricResult(result.comparison, result.sequential, adjusted)

    higher = policy.higher_is_better(policy.primary)
    primary_estimates = [arm.estimates.get(policy.primary) for arm in arms]
    prob_best: list[float | None] = [None] * len(arms)
    if all(e is not None for e in primary_estimates):
        prob_best = list(probability_to_be_best([e for e in primary_estimates if e is not None], higher))

    needed = _samples_needed(control, arms, policy)
    verdicts = {
        arm.name: ArmVerdict(arm.name, results[arm.name], prob_best[index], needed.get(arm.name))
        for index, arm in enumerate(arms)
    }
    live = [arm for arm in arms if arm.weight > 0]
    srm = srm_p_value([arm.assigned for arm in live], [arm.weight for arm in live])
    status, winner = _status(control, treatments, results, policy, srm)
    return Verdict(status, winner, srm, verdicts, running)


def _samples_needed(control: ArmInput, arms: Sequence[ArmInput], policy: Policy) -> dict[str, float]:
    base = control.estimates.get(policy.primary)
    if base is None or base.mean == 0:
        return {}
    needed = {}
    for arm in arms:
        estimate = arm.estimates.get(policy.primary)
        if estimate is None:
            continue
        variance = (base.observation_variance + estimate.observation_variance) / 2
        total = samples_per_arm(variance, policy.mde * abs(base.mean), policy.alpha)
        if total is not None:
            if policy.sequential:
                total *= SEQUENTIAL_SAMPLE_FACTOR
            needed[arm.name] = max(0.0, total - estimate.n)
    return needed


def _status(
    control: ArmInput,
    treatments: Sequence[ArmInput],
    results: Mapping[str, Mapping[str, MetricResult]],
    policy: Policy,
    srm: float | None,
) -> tuple[str, str | None]:
    if srm is not None and srm < SRM_THRESHOLD:
        return SRM, None
    enough = all(
        (estimate := arm.estimates.get(policy.primary)) is not None and estimate.n >= policy.min_samples
        for arm in (control, *treatments)
        if arm.weight > 0 or arm.control
    )
    if not enough or not treatments:
        return COLLECTING, None
    higher = policy.higher_is_better(policy.primary)
    winners = []
    for arm in treatments:
        arm_results = results[arm.name]
        if not _significantly(arm_results[policy.primary], True, policy.alpha, higher, adjusted=True):
            continue
        harmed = any(
            _significantly(arm_results[g], False, policy.alpha, policy.higher_is_better(g), adjusted=False)
            for g in policy.guardrails
            if g in arm_results
        )
        if not harmed:
            winners.append(arm)
    if winners:
        best = max(
            winners,
            key=lambda arm: (1 if higher else -1) * (arm.estimates[policy.primary].mean),  # type: ignore[union-attr]
        )
        return WINNER, best.name
    if all(_significantly(results[arm.name][policy.primary], False, policy.alpha, higher, adjusted=True) for arm in treatments):
        return WINNER, control.name
    base = control.estimates[policy.primary]
    if base is not None and base.mean != 0:
        margin = policy.mde * abs(base.mean)
        intervals = [results[arm.name][policy.primary].difference_ci for arm in treatments]
        if all(ci is not None and -margin < ci[0] and ci[1] < margin for ci in intervals):
            return NO_DIFFERENCE, None
    return COLLECTING, None
