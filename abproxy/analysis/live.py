"""Live results of an experiment, from the counters in Redis (not from MLflow): the same
numbers and verdict the flusher writes, computed on demand, off the request path.

Every look — ``GET /abproxy/experiments/{name}``, ``abproxy report``, the gauges, the flush —
saves its always-valid state and its winner in Redis before it answers, and answers from what
Redis then keeps (analysis/state.py): looks by any replica, in any order, extend one sequence,
so a p-value never goes back up (unless the effect moved and the sequence started again) and
a declared winner keeps its name. MLflow plays no part.

When Redis reads but refuses the write (out of memory, a read-only replica, a timeout), the
look still answers, from the state saved before it alone, adding none of its own evidence, and
says so (``state_not_saved``): nothing it shows can be taken back by the next look."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from abproxy.analysis import state
from abproxy.analysis.stops import stop_harmful_arms
from abproxy.analysis.analyse import STATE_NOT_SAVED, Analysis, analyse
from abproxy.analysis.summarise import summarise
from abproxy.catalog import ExperimentPlan
from abproxy.config import Config
from abproxy.recording import connection, eviction, layout, store
from abproxy.recording.overrides import Overrides
from abproxy.recording.counters import ArmCounters
from abproxy.stats.agreement import parse_pairs, rank_agreement
from abproxy.stats.results import ExperimentResult, JudgeAgreement

log = logging.getLogger("abproxy.analysis.live")

SAVE_ATTEMPTS = 3
"""Looks that raced another replica's re-decide on the merged state; more would be contention
no deployment has (each attempt is one script call)."""


@dataclass(frozen=True)
class Snapshot:
    """Everything known about an experiment at one look."""

    plan: ExperimentPlan
    counters: dict[str, ArmCounters]
    analysis: Analysis
    kept: state.KeptState
    """The state in Redis after this look."""
    result: ExperimentResult


async def _save(redis: Any, plan: ExperimentPlan, update: state.StateUpdate) -> state.KeptState:
    encoded = {name: running.encode() for name, running in update.running.items()}
    states = [(name, encoded.get(name, "")) for name in update.fields]
    sample_ratio = update.sample_ratio.encode() if update.sample_ratio is not None else ""
    raw_states, raw_winner = await store.save_state(
        redis, plan.name, states, update.expected_generation, update.winner, update.context, sample_ratio,
        update.revoked or "", update.since,
    )  # fmt: skip
    return state.decode(raw_states, raw_winner)


async def take_snapshot(redis: Any, config: Config, plan: ExperimentPlan) -> Snapshot:
    arm_ids = [arm.arm_id for arm in plan.arms.values()]
    with store.reachable():
        counters, raw_states, raw_winner = await store.read_experiment(redis, plan.name, arm_ids, plan.stored_names)
        overrides = (await store.read_overrides(redis, [plan.name])).get(plan.name, Overrides())
        pairs = agreement_pairs(plan)
        tables = await store.read_hashes(redis, [layout.agreement_key(plan.name, plan.stored(j), f) for j, f in pairs])
    kept = state.decode(raw_states, raw_winner)
    warnings = await eviction.warnings(redis)  # Redis evicted keys: any counter may be short
    stopped = overrides.stopped
    for _ in range(SAVE_ATTEMPTS):
        analysis = analyse(plan, config, counters, kept, stopped=stopped)
        try:
            saved = await _save(redis, plan, analysis.update)
        except connection.UNAVAILABLE as error:
            log.warning("could not save experiment %s's always-valid state (%s: %s); answering from the saved one",
                        plan.name, type(error).__name__, error)  # fmt: skip
            analysis = analyse(plan, config, counters, kept, extend=False, stopped=stopped)
            warnings += (STATE_NOT_SAVED,)
            break
        if state.agrees(saved, analysis.update, analysis.answered):
            kept = saved
            break
        kept = saved  # another look came in between: decide again on what Redis keeps now
    else:
        analysis = analyse(plan, config, counters, kept, extend=False, stopped=stopped)
    stops = await stop_harmful_arms(redis, plan, analysis, overrides.stops)
    agreement = tuple(
        JudgeAgreement(judge.removeprefix("judge."), feedback, *rank_agreement(parse_pairs(table)))
        for (judge, feedback), table in zip(pairs, tables, strict=True)
    )
    result = summarise(plan, config, counters, analysis, overrides.promoted, warnings, stops, agreement)
    return Snapshot(plan, counters, analysis, kept, result)


def agreement_pairs(plan: ExperimentPlan) -> list[tuple[str, str]]:
    """(``judge.<name>``, feedback name) for every judge and feedback metric of the experiment."""
    return [(f"judge.{judge}", feedback) for judge in plan.settings.judges for feedback in plan.settings.feedback]


async def experiment_results(redis: Any, config: Config, plan: ExperimentPlan) -> ExperimentResult:
    return (await take_snapshot(redis, config, plan)).result
