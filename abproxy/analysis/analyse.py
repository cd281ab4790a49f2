"""From an experiment's counters to the statistics core's inputs and its verdict: which way is
better, the guardrails' margins, the decision's context, and what the look leaves for the next
one to extend (the estimates: estimates.py; the typed results: summarise.py). Pure: the counters
and the kept state are read (and the state saved) in live.py."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass

from abproxy.analysis import state
from abproxy.analysis.state import KeptState, SampleRatioState, StateUpdate, Winner
from abproxy.analysis.estimates import capped_estimate, design_effect, estimate, estimate_since, guardrail_caps
from abproxy.catalog import ExperimentPlan
from abproxy.config import Config
from abproxy.recording import layout
from abproxy.recording.counters import ArmCounters, MetricCounters
from abproxy.stats.estimates import Estimate
from abproxy.stats.guardrails import DEFAULT_RATE_MARGIN, Guardrail
from abproxy.stats.summary import Moments
from abproxy.stats.verdict import COLLECTING, WINNER, ArmInput, Policy, StateKey, Verdict, decide


DESIGN_EFFECT_WARNING = 1.5
"""Above this, a ``unit: request`` experiment's users' requests are too correlated to pass as
independent (the per-request intervals of the means are too narrow by its square root)."""
UNITS_CORRELATED, CORRUPT_COUNTERS, STATE_NOT_SAVED = "units_correlated", "corrupt_counters", "state_not_saved"


def guardrails(plan: ExperimentPlan) -> tuple[Guardrail, ...]:
    """The configured guardrails with their margins: as written, else 1 percentage point for a
    rate and 10% of the control's mean for anything else."""
    settings = plan.settings
    found = []
    for metric, margin in settings.guardrails.items():
        if margin.margin is None and margin.relative_margin is None and settings.is_rate(metric):
            found.append(Guardrail(metric, margin=DEFAULT_RATE_MARGIN))
        else:
            found.append(Guardrail(metric, margin.margin, margin.relative_margin))
    return tuple(found)


def policy_for(plan: ExperimentPlan, config: Config) -> Policy:
    return Policy(
        primary=plan.settings.primary,
        guardrails=guardrails(plan),
        higher_is_better=plan.settings.higher_is_better,
        alpha=config.stats.alpha,
        min_samples=config.stats.min_samples,
        sequential=config.stats.sequential,
        mde=config.stats.mde,
    )


def decision_context(plan: ExperimentPlan, policy: Policy) -> str:
    """A short hash of what a winner is decided on: a declared winner holds only while these stay."""
    described = {
        "primary": plan.stored(policy.primary),
        "control": plan.arms[plan.settings.control_name].arm_id,
        "guardrails": [[plan.stored(g.metric), g.margin, g.relative_margin] for g in policy.guardrail_specs],
        "alpha": policy.alpha,
        "mde": policy.mde,
        "sequential": policy.sequential,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]


def sample_ratio_context(plan: ExperimentPlan, stopped: frozenset[str] = frozenset()) -> str:
    """A short hash of what the sample-ratio test checks: the arms that get new traffic (not
    stopped) and their weights. Its running p-value holds only while these stay."""
    checked = sorted((arm.arm_id, _weight(plan, name, stopped)) for name, arm in plan.arms.items())
    live = [[arm_id, weight] for arm_id, weight in checked if weight > 0]
    return hashlib.sha256(json.dumps(live).encode()).hexdigest()[:12]


def _weight(plan: ExperimentPlan, variant: str, stopped: frozenset[str]) -> float:
    """The variant's weight now: 0 for an arm stopped for harm (the control serves its units)."""
    return 0.0 if plan.arms[variant].arm_id in stopped else plan.settings.variants[variant].weight


def state_keys(plan: ExperimentPlan) -> dict[str, StateKey]:
    """Every running state a look may keep, by its field in Redis: each treatment against the
    control on every metric, and each pair of treatments on the primary metric."""
    settings = plan.settings
    control = settings.control_name
    treatments = sorted(name for name in plan.arms if name != control)
    keys: list[StateKey] = [(name, control, metric) for name in treatments for metric in settings.metric_names]
    keys += [(later, earlier, settings.primary) for earlier, later in itertools.combinations(treatments, 2)]
    return {
        layout.sequential_field(plan.arms[a].arm_id, plan.arms[b].arm_id, plan.stored(metric)): (a, b, metric)
        for a, b, metric in keys
    }


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    estimates: dict[str, dict[str, Estimate | None]]
    """variant → metric → estimate."""
    policy: Policy
    update: StateUpdate
    """What this look asks Redis to keep."""
    answered: Winner
    """The winner record this answer stands on: what Redis keeps once ``update`` is merged."""
    warnings: tuple[str, ...] = ()
    corrupt: tuple[str, ...] = ()
    design_effect: float | None = None
    since_declared: Mapping[str, Mapping[str, Estimate | None]] | None = None
    """variant → metric → the estimate on what came after the winner's declaration."""
    caps: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Duration guardrails compared on capped values, and the cap (:func:`guardrail_caps`)."""


def _corrupt(plan: ExperimentPlan, counters: Mapping[str, ArmCounters]) -> tuple[list[str], bool]:
    """``variant/counter`` of every counter that is not a finite number and every key Redis
    cannot read, and whether one of them is one a verdict would rest on (the primary metric, a
    guardrail, the assignment counts; an unreadable key holds all of them)."""
    deciding = {plan.settings.primary, *plan.settings.guardrails, "requests", "units"}
    found, decisive = [], False
    for name, arm in plan.arms.items():
        arm_counters = counters[arm.arm_id]
        for counter in arm_counters.corrupt:
            found.append(f"{name}/{counter}")
            metric = counter.split("|", 1)[0]
            decisive |= metric in deciding
        found += [f"{name}/{why}" for why in arm_counters.unreadable]
        decisive |= bool(arm_counters.unreadable)
    return found, decisive


def analyse(
    plan: ExperimentPlan,
    config: Config,
    counters: Mapping[str, ArmCounters],
    kept: KeptState | None = None,
    extend: bool = True,
    stopped: frozenset[str] = frozenset(),
) -> Analysis:
    """One look: the verdict on the counters and on what earlier looks kept (None: nothing yet).
    ``extend=False``: on the kept state alone, adding nothing of this look's (see :func:`decide`);
    ``stopped``: the arm ids stopped for harm (they get no traffic: the sample-ratio test leaves
    them out)."""
    kept = kept if kept is not None else KeptState()
    settings = plan.settings
    estimates: dict[str, dict[str, Estimate | None]] = {}
    arms = []
    caps = guardrail_caps(plan, counters)
    for name, arm in plan.arms.items():
        arm_counters = counters[arm.arm_id]
        estimates[name] = {
            metric: estimate(plan, metric, arm_counters.metrics.get(metric, MetricCounters()))
            for metric in settings.metric_names
        }
        for metric, cap in caps.items():
            estimates[name][metric] = capped_estimate(plan, metric, arm_counters.metrics.get(metric, MetricCounters()), cap)
        arms.append(
            ArmInput(
                name=name,
                control=name == settings.control_name,
                weight=_weight(plan, name, stopped),
                assigned=arm_counters.units if plan.per_unit else arm_counters.requests,
                estimates=estimates[name],
            )
        )
    keys = state_keys(plan)
    previous = {keys[name]: state for name, state in kept.running.items() if name in keys}
    policy = policy_for(plan, config)
    context = decision_context(plan, policy)
    by_arm_id = {arm.arm_id: name for name, arm in plan.arms.items()}
    declared = by_arm_id.get(kept.winner.arm or "") if kept.winner.context == context else None
    ratio_context = sample_ratio_context(plan, stopped)
    kept_ratio = kept.sample_ratio
    kept_p = kept_ratio.p_value if kept_ratio is not None and kept_ratio.context == ratio_context else None
    revoked = kept.winner.revoked if declared is not None else None
    deciding = (settings.primary, *settings.guardrails)
    since = _estimates_since(plan, counters, state.decode_since(kept.winner.since), deciding) if declared else None
    verdict = decide(arms, policy, previous, declared, extend, kept_p, revoked, since)

    corrupt, decisive = _corrupt(plan, counters)
    deff = design_effect(plan, counters)
    warnings = list(verdict.warnings)
    if deff is not None and deff > DESIGN_EFFECT_WARNING:
        warnings.append(UNITS_CORRELATED)
    if corrupt:
        warnings.append(CORRUPT_COUNTERS)
    if decisive and not revoked:
        verdict = dataclasses.replace(verdict, status=COLLECTING, winner=None, revoked=None)
    revocation = verdict.revoked[1] if verdict.revoked is not None and not revoked else None

    fields = {key: name for name, key in keys.items()}
    proposal = None
    if verdict.status == WINNER and verdict.winner is not None and verdict.winner != declared:
        proposal = plan.arms[verdict.winner].arm_id
    update = StateUpdate(
        running={fields[key]: state for key, state in verdict.running.items()},
        fields=tuple(keys),
        expected_generation=kept.winner.generation,
        winner=proposal,
        context=context,
        sample_ratio=SampleRatioState(ratio_context, verdict.srm_p_value) if verdict.srm_p_value is not None else None,
        revoked=revocation,
        since=state.encode_since(_moments(plan, counters, deciding)) if proposal else "",
    )
    answered = kept.winner
    if proposal:
        answered = Winner(proposal, kept.winner.generation + 1, context, None, update.since)
    elif revocation:
        answered = dataclasses.replace(kept.winner, revoked=revocation)
    return Analysis(verdict, estimates, policy, update, answered, tuple(warnings), tuple(corrupt), deff, since, caps)


def _moments(plan: ExperimentPlan, counters: Mapping[str, ArmCounters], metrics: tuple[str, ...]) -> state.Since:
    found = {}
    for arm in plan.arms.values():
        arm_metrics = counters[arm.arm_id].metrics
        found[arm.arm_id] = {metric: arm_metrics[metric].moments for metric in metrics if metric in arm_metrics}
    return found


def _estimates_since(
    plan: ExperimentPlan, counters: Mapping[str, ArmCounters], since: state.Since, metrics: tuple[str, ...]
) -> dict[str, dict[str, Estimate | None]] | None:
    """variant → metric → the estimate on what was recorded after the winner was declared; None
    when the declaration kept no counters (declared before abproxy kept them, or corrupt)."""
    if not since:
        return None
    found: dict[str, dict[str, Estimate | None]] = {}
    for name, arm in plan.arms.items():
        if arm.arm_id not in since:
            continue
        then, arm_metrics = since[arm.arm_id], counters[arm.arm_id].metrics
        found[name] = {
            metric: estimate_since(plan, metric, arm_metrics[metric], then.get(metric, Moments()))
            for metric in metrics
            if metric in arm_metrics
        }
    return found
