"""Live results of an experiment, from the counters in Redis (not from MLflow): the same
numbers and verdict the flusher writes, computed on demand, off the request path."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from abproxy.recording import store
from abproxy.analysis.analyse import Analysis, analyse
from abproxy.catalog import ExperimentPlan
from abproxy.config import Config
from abproxy.stats.decisions import SRM_THRESHOLD
from abproxy.stats.estimates import interval as estimate_interval
from abproxy.stats.histogram import quantiles
from abproxy.stats.verdict import MetricResult
from abproxy.recording.store import ArmCounters, MetricCounters

PERCENTILES = (0.5, 0.95, 0.99)


def _number(value: float | None, significant: int = 7) -> float | None:
    """A JSON-friendly number: finite, to ``significant`` digits (costs per request are ~1e-6)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{float(value):.{significant}g}")


def _pair(values: tuple[float, float] | None) -> list[float | None] | None:
    return [_number(values[0]), _number(values[1])] if values is not None else None


@dataclass(frozen=True)
class Snapshot:
    """Everything known about an experiment at one look."""

    plan: ExperimentPlan
    counters: dict[str, ArmCounters]
    analysis: Analysis
    sequential_state: dict[str, str]


async def take_snapshot(redis: Any, config: Config, plan: ExperimentPlan) -> Snapshot:
    arm_ids = [arm.arm_id for arm in plan.arms.values()]
    with store.reachable():
        counters, state = await store.read_experiment(redis, plan.name, arm_ids)
    return Snapshot(plan, counters, analyse(plan, config, counters, state), state)


def metric_summary(
    counters: MetricCounters, result: MetricResult | None, interval: tuple[float, float] | None
) -> dict[str, Any]:
    moments = counters.moments
    p50, p95, p99 = quantiles(counters.histogram, PERCENTILES)
    comparison = result.comparison if result else None
    return {
        "n": int(moments.n),
        "sum": _number(moments.total),
        "mean": _number(moments.mean),
        "std": _number(moments.variance**0.5 if moments.variance is not None else None),
        "p50": _number(p50),
        "p95": _number(p95),
        "p99": _number(p99),
        "ci": _pair(interval),
        "lift": _number(comparison.lift) if comparison else None,
        "lift_ci": _pair(comparison.lift_ci) if comparison else None,
        "difference_ci": _pair(result.difference_ci) if result else None,
        "p_value": _number(result.p_value) if result else None,
        "welch_p_value": _number(comparison.p_value) if comparison else None,
        "adjusted_p_value": _number(result.adjusted_p) if result else None,
    }


def snapshot_json(snapshot: Snapshot, config: Config) -> dict[str, Any]:
    plan, verdict = snapshot.plan, snapshot.analysis.verdict
    settings = plan.settings
    total_weight = sum(v.weight for v in settings.variants.values())
    variants = []
    for name, arm in plan.arms.items():
        counters = snapshot.counters[arm.arm_id]
        arm_verdict = verdict.arms[name]
        metrics = {}
        for metric in settings.metric_names:
            estimate = snapshot.analysis.estimates[name].get(metric)
            interval = estimate_interval(estimate, config.stats.alpha) if estimate is not None else None
            metrics[metric] = metric_summary(
                counters.metrics.get(metric, MetricCounters()), arm_verdict.metrics.get(metric), interval
            )
        variants.append(
            {
                "name": name,
                "arm": arm.arm_id,
                "control": name == settings.control_name,
                "weight": settings.variants[name].weight / total_weight,
                "requests": counters.requests,
                "errors": counters.errors,
                "cancelled": counters.cancelled,
                "units": counters.units,
                "prob_best": _number(arm_verdict.prob_best),
                "samples_needed": None if arm_verdict.samples_needed is None else math.ceil(arm_verdict.samples_needed),
                "metrics": metrics,
            }
        )
    srm = verdict.srm_p_value
    return {
        "experiment": plan.name,
        "status": verdict.status,
        "winner": verdict.winner,
        "primary_metric": settings.primary,
        "guardrails": list(settings.guardrails),
        "unit": settings.unit,
        "sequential": config.stats.sequential,
        "alpha": config.stats.alpha,
        "srm": {"p_value": _number(srm), "ok": None if srm is None else srm >= SRM_THRESHOLD},
        "variants": variants,
    }


async def experiment_results(redis: Any, config: Config, plan: ExperimentPlan) -> dict[str, Any]:
    return snapshot_json(await take_snapshot(redis, config, plan), config)
