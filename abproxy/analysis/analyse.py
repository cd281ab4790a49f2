"""From an experiment's counters to the statistics core's inputs, its verdict, and the typed
results everything downstream reads: which estimate each metric gets (per request, per unit, or
as a proportion), which way is better, the guardrails' margins, and what the look leaves for
the next one to extend. Pure: the counters and the kept state are read (and the state saved)
in live.py."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from datetime import datetime, timezone
from collections.abc import Mapping
from dataclasses import dataclass

from abproxy.analysis import state
from abproxy.analysis.state import KeptState, SampleRatioState, StateUpdate, Winner
from abproxy.catalog import ExperimentPlan
from abproxy.config import Config
from abproxy.recording import store
from abproxy.recording.store import ArmCounters, MetricCounters, Stop
from abproxy.stats.decisions import SRM_THRESHOLD, samples_per_arm
from abproxy.stats.estimates import Estimate, UnitSums, from_moments, from_unit_sums, proportion_from_moments
from abproxy.stats.estimates import interval as estimate_interval
from abproxy.stats.guardrails import DEFAULT_RATE_MARGIN, Guardrail
from abproxy.stats.histogram import capped_moments, quantiles
from abproxy.stats.power import conditional_samples_per_arm, sequential_samples_per_arm
from abproxy.stats.results import (
    ExperimentResult,
    MetricSummary,
    Revoked,
    SampleRatio,
    SinceDeclared,
    StoppedVariant,
    VariantResult,
)
from abproxy.stats.sequential import default_mixture
from abproxy.stats.summary import Moments
from abproxy.stats.verdict import COLLECTING, WINNER, ArmInput, MetricResult, Policy, StateKey, Verdict, decide

PERCENTILES = (0.5, 0.95, 0.99)
POWER = 0.8
FORECAST_POWER = 0.7
"""The boundary-crossing probability at the forecast's single look that makes it hold in about
80% of runs: the looks before it cross too, and the running intersection narrows what one look
alone would show (measured: tests/test_watch_simulation.py)."""
DESIGN_EFFECT_WARNING = 1.5
"""Above this, a ``unit: request`` experiment's users' requests are too correlated to pass as
independent (the per-request intervals of the means are too narrow by its square root)."""
UNITS_CORRELATED, CORRUPT_COUNTERS, STATE_NOT_SAVED = "units_correlated", "corrupt_counters", "state_not_saved"


def _is_binary(plan: ExperimentPlan, metric: str, counters: MetricCounters) -> bool:
    if metric == "error_rate":
        return True
    if not plan.settings.is_rate(metric):
        return False
    # 0/1 scores only (a [0, 1] scale may carry 0.5): then Σx = Σx²
    moments = counters.moments
    sum_squares = moments.total_squares + moments.shift * (2 * moments.total + moments.n * moments.shift)
    return abs(moments.sum - sum_squares) <= 1e-9 * max(1.0, moments.n)


def estimate(plan: ExperimentPlan, metric: str, counters: MetricCounters) -> Estimate | None:
    if counters.corrupt:
        return None
    moments = counters.moments
    if plan.per_unit:
        return from_unit_sums(
            UnitSums(
                counters.units, moments.total, moments.n, counters.unit_yy, counters.unit_nn, counters.unit_yn, moments.shift
            )
        )
    if _is_binary(plan, metric, counters):
        return proportion_from_moments(moments)
    return from_moments(moments)


CAPPED_METRICS = ("latency_ms", "ttft_ms")
"""Durations: heavy-tailed (a few requests take many times the median), so as guardrails they
are compared on values capped at the control's :data:`CAP_QUANTILE`."""
CAP_QUANTILE = 0.95


def capped_estimate(plan: ExperimentPlan, metric: str, counters: MetricCounters, cap: float) -> Estimate | None:
    """The mean of the metric with every request counted at most ``cap`` (winsorised), from its
    histogram. Per unit (``unit: user``), the per-request variance is scaled by the metric's
    design effect (per-user sums of capped values are not kept), never below 1."""
    if counters.corrupt:
        return None
    n, mean, variance = capped_moments(counters.histogram, cap)
    if n < 2 or not math.isfinite(variance):
        return None
    per_request = Estimate(mean, variance / n, n, n - 1)
    if not plan.per_unit:
        return per_request
    overall, raw = estimate(plan, metric, counters), from_moments(counters.moments)
    if overall is None or raw is None or raw.variance_of_mean <= 0:
        return None
    design = max(1.0, overall.variance_of_mean / raw.variance_of_mean)
    return Estimate(mean, per_request.variance_of_mean * design, overall.n, overall.dof)


def guardrail_caps(plan: ExperimentPlan, counters: Mapping[str, ArmCounters]) -> dict[str, float]:
    """The cap of each duration guardrail: the control's :data:`CAP_QUANTILE` at this look.

    Why capped, and at the 95th percentile: on a lognormal latency with σ = 1.5 and no true
    difference, looked at every 250 requests per arm, the plain mean shows non-inferiority (a 10%
    margin) by 5,000 per arm in 14% of runs, the log (the geometric mean) in 67%, a cap at the
    99th percentile in 47%, at the 95th in 81% (each look alone); through the verdict, 85%
    (tests/test_watch_simulation.py). A cap keeps what a guardrail on latency is for:
    a request the treatment makes slow counts as at least the cap, so a slower tail still shows;
    only how far beyond the control's 95th percentile it goes does not."""
    control = counters[plan.arms[plan.settings.control_name].arm_id]
    caps = {}
    for metric in plan.settings.guardrails:
        if metric in CAPPED_METRICS and metric in control.metrics:
            (cap,) = quantiles(control.metrics[metric].histogram, (CAP_QUANTILE,))
            if cap is not None and cap > 0:
                caps[metric] = cap
    return caps


def _per_request(plan: ExperimentPlan, metric: str, counters: MetricCounters, moments: Moments) -> Estimate | None:
    if _is_binary(plan, metric, counters):
        return proportion_from_moments(moments)
    return from_moments(moments)


def estimate_since(plan: ExperimentPlan, metric: str, counters: MetricCounters, then: Moments) -> Estimate | None:
    """The estimate on what was recorded after ``then`` (the metric's moments at an earlier look):
    the sums are additive, so the mean of the later requests is exact. Per unit, the later
    requests' variance is scaled by the design effect of the whole (units span the two periods,
    and their per-unit sums cannot be split). None when nothing was added, or the counters are
    smaller than they were (Redis lost data)."""
    if counters.corrupt:
        return None
    now = counters.moments
    added = now - then
    if added.n < 2 or then.n < 0 or added.n > now.n:
        return None
    recent = _per_request(plan, metric, counters, added)
    if recent is None or not plan.per_unit:
        return recent
    overall, per_request = estimate(plan, metric, counters), _per_request(plan, metric, counters, now)
    if overall is None or per_request is None or per_request.variance_of_mean <= 0:
        return None
    share = added.n / now.n
    units = overall.n * share
    design = overall.variance_of_mean / per_request.variance_of_mean
    return Estimate(recent.mean, recent.variance_of_mean * design, units, max(units - 1, 1.0))


def design_effect(plan: ExperimentPlan, counters: Mapping[str, ArmCounters]) -> float | None:
    """``unit: request`` with users: the variance of the primary metric's mean counted per user
    (the delta method on per-user sums) over that counted per request, pooled over the arms —
    Kish's design effect, 1 + (m − 1)·ICC for users of m requests each. None when no user sent
    more than one request."""
    if plan.per_unit:
        return None
    metric = plan.settings.primary
    per_user = per_request = 0.0
    for arm in plan.arms.values():
        found = counters[arm.arm_id].metrics.get(metric)
        if found is None or found.corrupt or not 0 < found.units < found.moments.n:
            continue
        moments = found.moments
        grouped = from_unit_sums(
            UnitSums(found.units, moments.total, moments.n, found.unit_yy, found.unit_nn, found.unit_yn, moments.shift)
        )
        single = estimate(plan, metric, found)
        if grouped is None or single is None:
            continue
        per_user += grouped.variance_of_mean
        per_request += single.variance_of_mean
    return per_user / per_request if per_request > 0 else None


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
        "primary": policy.primary,
        "control": plan.arms[plan.settings.control_name].arm_id,
        "guardrails": [[g.metric, g.margin, g.relative_margin] for g in policy.guardrail_specs],
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
    return {store.sequential_field(plan.arms[a].arm_id, plan.arms[b].arm_id, metric): (a, b, metric) for a, b, metric in keys}


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
) -> ExperimentResult:
    """The typed results of one look: every variant's numbers beside the verdict."""
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
