"""From an experiment's counters in Redis to the statistics core's inputs and verdict: which
estimate each metric gets (per request, per unit, or as a proportion) and which way is better."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from abproxy.catalog import ExperimentPlan
from abproxy.config import Config
from abproxy.stats.estimates import Estimate, UnitSums, from_moments, from_unit_sums, proportion_from_moments
from abproxy.stats.sequential import RunningState
from abproxy.stats.verdict import ArmInput, Policy, Verdict, decide
from abproxy.recording import store
from abproxy.recording.store import ArmCounters, MetricCounters


def higher_is_better(metric: str) -> bool:
    """Feedback scores should go up; latency, tokens, cost and errors down."""
    return metric.startswith("feedback.")


def _is_binary(plan: ExperimentPlan, metric: str, counters: MetricCounters) -> bool:
    if metric == "error_rate":
        return True
    if metric.startswith("feedback."):
        bounds = plan.settings.feedback.get(metric.removeprefix("feedback."))
        return bounds is not None and (bounds.min, bounds.max) == (0, 1) and counters.moments.total == counters.moments.total_squares
    return False


def estimate(plan: ExperimentPlan, metric: str, counters: MetricCounters) -> Estimate | None:
    if plan.per_unit:
        moments = counters.moments
        return from_unit_sums(
            UnitSums(counters.units, moments.total, moments.n, counters.unit_yy, counters.unit_nn, counters.unit_yn)
        )
    if _is_binary(plan, metric, counters):
        return proportion_from_moments(counters.moments)
    return from_moments(counters.moments)


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    estimates: dict[str, dict[str, Estimate | None]]
    """variant → metric → estimate."""


def sequential_state_field(plan: ExperimentPlan, variant: str, metric: str) -> str:
    """Where a treatment's running always-valid p-value is kept (see :func:`store.sequential_field`)."""
    return store.sequential_field(plan.arms[variant].arm_id, plan.arms[plan.settings.control_name].arm_id, metric)


def analyse(
    plan: ExperimentPlan, config: Config, counters: Mapping[str, ArmCounters], sequential_state: Mapping[str, str]
) -> Analysis:
    settings = plan.settings
    estimates: dict[str, dict[str, Estimate | None]] = {}
    arms = []
    for name, arm in plan.arms.items():
        arm_counters = counters[arm.arm_id]
        estimates[name] = {
            metric: estimate(plan, metric, arm_counters.metrics.get(metric, MetricCounters()))
            for metric in settings.metric_names
        }
        arms.append(
            ArmInput(
                name=name,
                control=name == settings.control_name,
                weight=settings.variants[name].weight,
                assigned=arm_counters.units if plan.per_unit else arm_counters.requests,
                estimates=estimates[name],
            )
        )
    previous = {}
    for name in plan.arms:
        for metric in settings.metric_names:
            stored = sequential_state.get(sequential_state_field(plan, name, metric))
            state = RunningState.decode(stored) if stored is not None else None
            if state is not None:
                previous[(name, metric)] = state
    policy = Policy(
        primary=settings.primary,
        guardrails=settings.guardrails,
        higher_is_better=higher_is_better,
        alpha=config.stats.alpha,
        min_samples=config.stats.min_samples,
        sequential=config.stats.sequential,
        mde=config.stats.mde,
    )
    return Analysis(decide(arms, policy, previous), estimates)
