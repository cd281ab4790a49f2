"""The typed results of one look (what the live-results endpoint, ``abproxy report``, the gauges
and the flush read): every variant's numbers beside the verdict, and ``samples_needed``, a
forecast of when each comparison decides. Pure."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timezone
from collections.abc import Mapping

from abproxy.analysis.analyse import Analysis
from abproxy.analysis.estimates import estimate
from abproxy.catalog import ExperimentPlan
from abproxy.config import Config
from abproxy.recording.counters import ArmCounters, MetricCounters
from abproxy.recording.overrides import Stop
from abproxy.stats.decisions import SRM_THRESHOLD, samples_per_arm
from abproxy.stats.estimates import Estimate
from abproxy.stats.estimates import interval as estimate_interval
from abproxy.stats.histogram import quantiles
from abproxy.stats.power import conditional_samples_per_arm, sequential_samples_per_arm
from abproxy.stats.results import (
    ExperimentResult,
    JudgeAgreement,
    MetricSummary,
    Revoked,
    SampleRatio,
    SinceDeclared,
    StoppedVariant,
    VariantResult,
)
from abproxy.stats.sequential import default_mixture
from abproxy.stats.verdict import MetricResult, Policy


PERCENTILES = (0.5, 0.95, 0.99)
POWER = 0.8
FORECAST_POWER = 0.7
"""The boundary-crossing probability at the forecast's single look that makes it hold in about
80% of runs: the looks before it cross too, and the running intersection narrows what one look
alone would show (measured: tests/test_watch_simulation.py)."""


def metric_summary(
    counters: MetricCounters, result: MetricResult | None, interval: tuple[float, float] | None
) -> MetricSummary:
    moments = counters.moments
    p50, p95, p99 = quantiles(counters.histogram, PERCENTILES)
    comparison = result.comparison if result else None
    return MetricSummary(
        n=int(moments.n),
        sum=moments.sum,
        mean=moments.mean,
        std=moments.variance**0.5 if moments.variance is not None else None,
        p50=p50,
        p95=p95,
        p99=p99,
        ci=interval,
        lift=comparison.lift if comparison else None,
        lift_ci=result.lift_ci if result else None,
        difference_ci=result.difference_ci if result else None,
        p_value=result.p_value if result else None,
        welch_p_value=comparison.p_value if comparison else None,
        adjusted_p_value=result.adjusted_p if result else None,
        margin=result.margin if result else None,
        non_inferior=result.non_inferior if result else None,
    )


def _needed_per_arm(policy: Policy, metric: str, base: Estimate, other: Estimate, gap: float, alpha: float) -> float | None:
    """Samples per arm at which ``gap`` would be detected (or, for a guardrail, the margin
    cleared) with 80% probability, on the boundary the test actually uses."""
    variance = base.observation_variance + other.observation_variance
    if not policy.sequential:
        return samples_per_arm(variance / 2, gap, alpha, POWER) if gap > 0 else None
    mixture = policy.mixture(metric, base) or default_mixture(base, other)
    return sequential_samples_per_arm(variance, gap, mixture, alpha, POWER)


def _forecast_per_arm(policy: Policy, base: Estimate, other: Estimate, effect: float, alpha: float) -> float | None:
    """Samples per arm by which the primary metric's comparison decides with 80% probability,
    given the difference seen so far and an effect of ``effect`` in what is still to come (the
    always-valid test); the fixed-horizon test's n for ``effect`` otherwise."""
    if not policy.sequential:
        return _needed_per_arm(policy, policy.primary, base, other, effect, alpha)
    variance = base.observation_variance + other.observation_variance
    mixture = policy.mixture(policy.primary, base) or default_mixture(base, other)
    n = min(base.n, other.n)
    return conditional_samples_per_arm(n, other.mean - base.mean, variance, effect, mixture, alpha, FORECAST_POWER)


def _decided(result: MetricResult | None, alpha: float, effect: float) -> bool:
    """Already significant either way, or already within ±effect: more samples change nothing."""
    if result is None:
        return False
    p_value = result.adjusted_p if result.adjusted_p is not None else result.p_value
    interval = result.difference_ci
    significant = p_value is not None and p_value < alpha and result.direction != 0
    return significant or (interval is not None and -effect < interval[0] and interval[1] < effect)


def samples_needed(analysis: Analysis, control: str) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Per variant, the samples still needed to detect an effect of ``stats.mde`` on the primary
    metric (the first Holm step's α: α / number of treatments), given what has been seen, 0 once
    its comparison is decided (never 0 before);
    per (treatment, guardrail) not yet shown non-inferior, the samples still needed to show it if
    the difference stays as it is."""
    policy, estimates = analysis.policy, analysis.estimates
    base = estimates[control].get(policy.primary)
    treatments = [name for name in estimates if name != control]
    per_variant: dict[str, float] = {}
    per_guardrail: dict[tuple[str, str], float] = {}
    if base is not None and base.mean != 0 and treatments:
        alpha = policy.alpha / len(treatments)
        effect = policy.mde * abs(base.mean)
        for name in treatments:
            other = estimates[name].get(policy.primary)
            if other is None:
                continue
            enough = min(base.n, other.n) >= policy.min_samples  # before, the verdict acts on nothing
            if enough and _decided(analysis.verdict.arms[name].metrics.get(policy.primary), policy.alpha, effect):
                per_variant[name] = 0.0
                continue
            total = _forecast_per_arm(policy, base, other, effect, alpha)
            if total is not None:
                per_variant[name] = max(1.0, total - other.n)  # not decided: never 0
                per_variant[control] = max(per_variant.get(control, 0.0), total - base.n)
        if per_variant:
            per_variant.setdefault(control, 0.0)  # every treatment it is compared with is decided
    for name in treatments:
        for guardrail in policy.guardrail_specs:
            result = analysis.verdict.arms[name].metrics.get(guardrail.metric)
            g_base, g_other = estimates[control].get(guardrail.metric), estimates[name].get(guardrail.metric)
            if result is None or result.non_inferior or result.margin is None or g_base is None or g_other is None:
                continue
            difference = g_other.mean - g_base.mean
            harm = -difference if policy.higher_is_better(guardrail.metric) else difference
            total = _needed_per_arm(policy, guardrail.metric, g_base, g_other, result.margin - harm, policy.alpha)
            if total is not None:
                per_guardrail[(name, guardrail.metric)] = max(0.0, total - min(g_base.n, g_other.n))
    return per_variant, per_guardrail


def _ceil(value: float | None) -> int | None:
    return None if value is None or not math.isfinite(value) else math.ceil(value)


def summarise(
    plan: ExperimentPlan,
    config: Config,
    counters: Mapping[str, ArmCounters],
    analysis: Analysis,
    promoted: str | None = None,
    extra_warnings: tuple[str, ...] = (),
    stops: Mapping[str, Stop] | None = None,
    agreement: tuple[JudgeAgreement, ...] = (),
) -> ExperimentResult:
    """The typed results of one look: every variant's numbers beside the verdict (and how far
    each judge agrees with the users)."""
    settings, verdict = plan.settings, analysis.verdict
    total_weight = sum(v.weight for v in settings.variants.values())
    needed, guardrail_needed = samples_needed(analysis, settings.control_name)
    variants = []
    for name, arm in plan.arms.items():
        arm_counters = counters[arm.arm_id]
        arm_verdict = verdict.arms[name]
        metrics = {}
        for metric in settings.metric_names:
            metric_counters = arm_counters.metrics.get(metric, MetricCounters())
            shown = analysis.estimates[name].get(metric) if metric not in analysis.caps else estimate(plan, metric, metric_counters)
            interval = estimate_interval(shown, config.stats.alpha) if shown is not None else None
            summary = metric_summary(metric_counters, arm_verdict.metrics.get(metric), interval)
            if metric in analysis.caps:
                summary = dataclasses.replace(summary, capped_at=analysis.caps[metric])
            if (name, metric) in guardrail_needed:
                summary = dataclasses.replace(summary, samples_needed=_ceil(guardrail_needed[(name, metric)]))
            metrics[metric] = summary
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
                samples_needed=_ceil(needed.get(name)),
                metrics=metrics,
                held_back_by=arm_verdict.held_back_by,
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
        warnings=tuple(dict.fromkeys(analysis.warnings + extra_warnings)),
        corrupt=analysis.corrupt,
        design_effect=analysis.design_effect,
        revoked=Revoked(*verdict.revoked) if verdict.revoked is not None else None,
        since_declared=_since_declared(analysis),
        cheaper_than=verdict.cheaper_than,
        unsettled=verdict.unsettled,
        agreement=agreement,
        rates=tuple(metric for metric in settings.metric_names if settings.is_rate(metric)),
        stopped=tuple(
            StoppedVariant(stop.variant, stop.reason, _utc(stop.at))
            for arm_id, stop in (stops or {}).items()
            if stop.active and any(arm.arm_id == arm_id for arm in plan.arms.values())
        ),
    )


def _since_declared(analysis: Analysis) -> SinceDeclared | None:
    """The declared winner (or the revoked one) against the control since its declaration."""
    verdict = analysis.verdict
    variant = verdict.revoked[0] if verdict.revoked is not None else verdict.winner
    if variant is None or not verdict.since_declared or analysis.since_declared is None:
        return None
    metrics = {}
    for metric, result in verdict.since_declared.items():
        recent = analysis.since_declared.get(variant, {}).get(metric)
        metrics[metric] = MetricSummary(
            n=int(recent.n) if recent is not None else 0,
            mean=recent.mean if recent is not None else None,
            lift=result.comparison.lift if result.comparison else None,
            lift_ci=result.lift_ci,
            difference_ci=result.difference_ci,
            p_value=result.p_value,
        )
    return SinceDeclared(variant, metrics)


def _utc(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
