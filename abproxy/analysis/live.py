"""Live results of an experiment, from the counters in Redis (not from MLflow): the same
numbers and verdict the flusher writes, computed on demand, off the request path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from abproxy.analysis.analyse import Analysis, analyse, summarise
from abproxy.catalog import ExperimentPlan
from abproxy.config import Config
from abproxy.recording import store
from abproxy.recording.store import ArmCounters
from abproxy.stats.results import ExperimentResult


@dataclass(frozen=True)
class Snapshot:
    """Everything known about an experiment at one look."""

    plan: ExperimentPlan
    counters: dict[str, ArmCounters]
    analysis: Analysis
    sequential_state: dict[str, str]
    result: ExperimentResult


async def take_snapshot(redis: Any, config: Config, plan: ExperimentPlan) -> Snapshot:
    arm_ids = [arm.arm_id for arm in plan.arms.values()]
    with store.reachable():
        counters, state = await store.read_experiment(redis, plan.name, arm_ids)
        promoted = (await store.read_promotions(redis, [plan.name])).get(plan.name)
    analysis = analyse(plan, config, counters, state)
    return Snapshot(plan, counters, analysis, state, summarise(plan, config, counters, analysis, promoted))


async def experiment_results(redis: Any, config: Config, plan: ExperimentPlan) -> ExperimentResult:
    return (await take_snapshot(redis, config, plan)).result
