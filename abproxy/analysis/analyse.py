"""From an experiment's counters to the statistics core's inputs, its verdict, and the typed
results everything downstream reads: which estimate each metric gets (per request, per unit, or
as a proportion) and which way is better. Pure: the counters are read elsewhere."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from abproxy.catalog import ExperimentPlan
from abproxy.config import Config
from abproxy.stats.decisions import SRM_THRESHOLD
from abproxy.stats.estimates import Estimate, UnitSums, from_moments, from_unit_sums, proportion_from_moments
from abproxy.stats.estimates import interval as estimate_interval
from abproxy.stats.histogram import quantiles
from abproxy.stats.results import ExperimentResult, MetricSummary, SampleRatio, VariantResult
from abproxy.stats.sequential import RunningState
from abproxy.stats.verdict import ArmInput, MetricResult, Policy, Verdict, decide

PERCENTILES = (0.5, 0.95, 0.99)
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


def metric_summary(
    counters: MetricCounters, result: MetricResult | None, interval: tuple[float, float] | None
) -> MetricSummary:
    moments = counters.moments
    p50, p95, p99 = quantiles(counters.histogram, PERCENTILES)
    comparison = result.comparison if result else None
    return MetricSummary(
        n=int(moments.n),
        sum=moments.total,
        mean=moments.mean,
        std=moments.variance**0.5 if moments.variance is not None else None,
        p50=p50,
        p95=p95,
        p99=p99,
        ci=interval,
        lift=comparison.lift if comparison else None,
        lift_ci=comparison.lift_ci if comparison else None,
        difference_ci=result.difference_ci if result else None,
        p_value=result.p_value if result else None,
        welch_p_value=comparison.p_value if comparison else None,
        adjusted_p_value=result.adjusted_p if result else None,
    )


def summarise(
    plan: ExperimentPlan,
    config: Config,
    counters: Mapping[str, ArmCounters],
    analysis: Analysis,
    promoted: str | None = None,
) -> ExperimentResult:
    """The typed results of one look: every variant's numbers beside the verdict."""
    settings, verdict = plan.settings, analysis.verdict
    total_weight = sum(v.weight for v in settings.variants.values())
    variants = []
    for name, arm in plan.arms.items():
        arm_counters = counters[arm.arm_id]
        arm_verdict = verdict.arms[name]
        metrics = {}
        for metric in settings.metric_names:
            estimate = analysis.estimates[name].get(metric)
            interval = estimate_interval(estimate, config.stats.alpha) if estimate is not None else None
            metrics[metric] = metric_summary(
                arm_counters.metrics.get(metric, MetricCounters()), arm_verdict.metrics.get(metric), interval
            )
        variants.append(
            VariantResult(
                name=name,
                arm=arm.arm_id,
                control=name == settings.control_name,
                weight=settings.variants[name].weight / total_weight,
                requests=arm_counters.requests,
                errors=arm_counters.errors,
                cancelled=arm_counters.cancelled,
                units=arm_counters.units,
                prob_best=arm_verdict.prob_best,
                samples_needed=None if arm_verdict.samples_needed is None else math.ceil(arm_verdict.samples_needed),
                metrics=metrics,
            )
        )
    srm = verdict.srm_p_value
    return ExperimentResult(
        experiment=plan.name,
        status=verdict.status,
        winner=verdict.winner,
        primary_metric=settings.primary,
        guardrails=tuple(settings.guardrails),
        unit=settings.unit,
        sequential=config.stats.sequential,
        alpha=config.stats.alpha,
        srm=SampleRatio(srm, None if srm is None else srm >= SRM_THRESHOLD),
        variants=tuple(variants),
        promoted=promoted,
    )
