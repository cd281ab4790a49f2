"""The verdict for one experiment: every treatment against the control on every metric, Holm
across treatments on the primary metric, guardrails as non-inferiority, SRM, the best of many
arms and the cheaper of equals, a winner that keeps its name once declared and is re-checked on
what came after, and the status a user acts on.

Over 450 lines on purpose: these rules interlock (a guardrail holds back a candidate, the
candidates decide who is settled, the declared winner decides what is re-checked), and each reads
best beside the others; the arithmetic they rest on lives in the modules beside this one."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from abproxy.stats.compare import Comparison, compare, lift_variance
from abproxy.stats.decisions import SRM_THRESHOLD, holm, probability_to_be_best, sequential_srm_p_value
from abproxy.stats.estimates import Estimate
from abproxy.stats.guardrails import Guardrail, harm_shown, non_inferior
from abproxy.stats.sequential import Mixture, RunningState, msprt, running_p_value

COLLECTING, WINNER, NO_DIFFERENCE, SRM, REVOKED = "collecting", "winner", "no_difference", "srm", "revoked"
EFFECT_DRIFT, EFFECT_FADED = "effect_drift", "effect_faded"

StateKey = tuple[str, str, str]
"""(arm, the arm it is compared with, metric): the state of arm − other on that metric."""


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
    guardrails: Sequence[Guardrail | str]
    higher_is_better: Callable[[str], bool]
    alpha: float = 0.05
    min_samples: int = 30
    sequential: bool = True
    mde: float = 0.05
    """Minimal effect worth detecting, relative to the control's mean."""

    @property
    def guardrail_specs(self) -> tuple[Guardrail, ...]:
        return tuple(g if isinstance(g, Guardrail) else Guardrail(g) for g in self.guardrails)

    def mixture(self, metric: str, control: Estimate) -> Mixture | None:
        """Where the always-valid test puts its weight: on the guardrail's margin, else on the
        MDE; None (the fallback mixture) when that is 0."""
        guardrail = next((g for g in self.guardrail_specs if g.metric == metric), None)
        effect = guardrail.absolute_margin(control.mean) if guardrail else self.mde * abs(control.mean)
        return Mixture.tuned(effect) if effect else None


@dataclass(frozen=True)
class MetricResult:
    comparison: Comparison | None = None
    sequential: RunningState | None = None
    adjusted_p: float | None = None
    margin: float | None = None
    """A guardrail's margin in the metric's units (the harm it must rule out)."""
    non_inferior: bool | None = None
    """A guardrail's: whether the interval rules out harm of ``margin`` or more."""

    @property
    def p_value(self) -> float | None:
        """The p-value decisions use: the always-valid one when sequential, else Welch's."""
        if self.sequential is not None:
            return self.sequential.p_value
        return self.comparison.p_value if self.comparison else None

    @property
    def difference_ci(self) -> tuple[float, float] | None:
        """Interval of treatment − control; None while the looks contradict each other."""
        if self.sequential is not None:
            return self.sequential.interval
        return self.comparison.difference_ci if self.comparison else None

    @property
    def lift_ci(self) -> tuple[float, float] | None:
        if self.sequential is not None:
            return self.sequential.lift_interval
        return self.comparison.lift_ci if self.comparison else None

    @property
    def drifted(self) -> bool:
        return self.sequential is not None and self.sequential.drifted

    @property
    def direction(self) -> int:
        """The sign of treatment − control the evidence supports (0: none either way)."""
        if self.sequential is not None:
            return self.sequential.direction
        if self.comparison is None:
            return 0
        low, high = self.comparison.difference_ci
        return 1 if low > 0 else -1 if high < 0 else 0


@dataclass(frozen=True)
class ArmVerdict:
    name: str
    metrics: dict[str, MetricResult] = field(default_factory=dict)
    prob_best: float | None = None
    held_back_by: tuple[str, ...] = ()
    """Guardrails that keep this arm from winning although it is better on the primary metric:
    their intervals do not yet rule out harm beyond the margin."""
    harmed: tuple[str, ...] = ()
    """Guardrails on which this arm's always-valid interval shows harm beyond the margin."""


@dataclass(frozen=True)
class Verdict:
    status: str
    winner: str | None
    srm_p_value: float | None
    """The sequential sample-ratio test's running p-value after this look (keep it for the next)."""
    arms: dict[str, ArmVerdict]
    running: dict[StateKey, RunningState]
    """The always-valid p-values and intervals after this look, to keep for the next one."""
    warnings: tuple[str, ...] = ()
    revoked: tuple[str, str] | None = None
    """(variant, metric): the declared winner that failed, and on what: a guardrail whose
    always-valid interval shows harm beyond its margin, or the primary metric's lying wholly on
    the losing side — over the whole experiment, or since the winner was declared."""
    since_declared: Mapping[str, MetricResult] = field(default_factory=dict)
    """The declared winner against the control on what came after its declaration alone, by
    metric (the primary and the guardrails): a sequence of its own, started at the declaration."""
    cheaper_than: tuple[str, ...] = ()
    """Treatments shown within the MDE of the winner on the primary metric (both ways, head to
    head) that cost more per request: what the winner was chosen over, or would be."""
    unsettled: tuple[str, ...] = ()
    """While collecting: treatments each better than the control, none yet shown the best (no
    other may be better by the MDE, or cheaper and within it)."""


def _significant(result: MetricResult, alpha: float, adjusted: bool) -> int:
    """+1 / −1: treatment − control significantly above / below 0; 0: neither."""
    p_value = result.adjusted_p if adjusted else result.p_value
    if p_value is None or p_value >= alpha:
        return 0
    return result.direction


def _better(sign: int, higher_is_better: bool) -> bool:
    return sign != 0 and (sign > 0) == higher_is_better


def _worse(sign: int, higher_is_better: bool) -> bool:
    return sign != 0 and (sign > 0) != higher_is_better


def _enough(estimate: Estimate | None, policy: Policy) -> bool:
    return estimate is not None and estimate.n >= policy.min_samples


def _compare(
    key: StateKey,
    base: Estimate | None,
    other: Estimate | None,
    policy: Policy,
    mixture: Mixture | None,
    previous: Mapping[StateKey, RunningState],
    running: dict[StateKey, RunningState],
    extend: bool,
    with_lift: bool = True,
) -> MetricResult:
    """other − base at this look, and (sequential) the running state after it. The running
    state starts only once both sides have ``min_samples``: earlier variances are too rough."""
    comparison = compare(base, other, policy.alpha) if base is not None and other is not None else None
    if not policy.sequential:
        return MetricResult(comparison)
    state = previous.get(key)
    if extend and base is not None and other is not None and _enough(base, policy) and _enough(other, policy):
        variance = lift_variance(base, other) if with_lift else None
        look = msprt(base, other, policy.alpha, mixture, variance)
        if look is not None:
            state = state.update(look) if state is not None else RunningState.first(look)
    if state is not None:
        running[key] = state
    return MetricResult(comparison, state)


def decide(
    arms: Sequence[ArmInput],
    policy: Policy,
    previous: Mapping[StateKey, RunningState],
    declared: str | None = None,
    extend: bool = True,
    sample_ratio: float | None = None,
    revoked: str | None = None,
    since_declared: Mapping[str, Mapping[str, Estimate | None]] | None = None,
) -> Verdict:
    """The verdict at this look. ``previous``: the running states kept so far; ``declared``: the
    winner declared at an earlier look, if any; ``sample_ratio``: the sample-ratio test's running
    p-value kept so far (for these arms and weights); ``revoked``: why the declared winner was
    revoked at an earlier look, if it was (it stays revoked); ``since_declared``: each arm's
    estimates on what came after the declaration (the winner is re-checked on them, and its
    effect there compared with the MDE); ``extend=False`` decides on the kept
    states alone (when this look's could not be kept, so that no answer rests on evidence the next
    look will not have)."""
    control = next(arm for arm in arms if arm.control)
    treatments = [arm for arm in arms if not arm.control]
    metrics = sorted({metric for arm in arms for metric in arm.estimates})
    running: dict[StateKey, RunningState] = {}
    results: dict[str, dict[str, MetricResult]] = {arm.name: {} for arm in arms}

    for arm in treatments:
        for metric in metrics:
            base, other = control.estimates.get(metric), arm.estimates.get(metric)
            mixture = policy.mixture(metric, base) if base is not None else None
            results[arm.name][metric] = _compare(
                (arm.name, control.name, metric), base, other, policy, mixture, previous, running, extend
            )

    head_to_head = _head_to_head(control, treatments, policy, previous, running, extend)

    primary_p = [results[arm.name][policy.primary].p_value for arm in treatments]
    if treatments and all(p is not None for p in primary_p):
        for arm, adjusted in zip(treatments, holm([p for p in primary_p if p is not None]), strict=True):
            result = results[arm.name][policy.primary]
            results[arm.name][policy.primary] = MetricResult(result.comparison, result.sequential, adjusted)

    held_back, harmed = _apply_guardrails(control, treatments, results, policy)

    higher = policy.higher_is_better(policy.primary)
    primary_estimates = [arm.estimates.get(policy.primary) for arm in arms]
    prob_best: list[float | None] = [None] * len(arms)
    if all(e is not None for e in primary_estimates):
        prob_best = list(probability_to_be_best([e for e in primary_estimates if e is not None], higher))

    verdicts = {
        arm.name: ArmVerdict(
            arm.name, results[arm.name], prob_best[index], held_back.get(arm.name, ()), harmed.get(arm.name, ())
        )
        for index, arm in enumerate(arms)
    }
    live = [arm for arm in arms if arm.weight > 0]
    srm = sample_ratio
    if extend:
        now = sequential_srm_p_value([arm.assigned for arm in live], [arm.weight for arm in live])
        srm = running_p_value(sample_ratio, now) if now is not None else sample_ratio
    decision_metrics = {policy.primary, *(g.metric for g in policy.guardrail_specs)}
    drifted = any(
        result.drifted for arm in treatments for metric, result in results[arm.name].items() if metric in decision_metrics
    )
    warnings: tuple[str, ...] = (EFFECT_DRIFT,) if drifted else ()
    since: dict[str, MetricResult] = {}
    if declared is not None and declared != control.name and since_declared:
        since = _since_declared(declared, control, since_declared, policy)
    if srm is None or srm >= SRM_THRESHOLD:
        failed = revoked or (_failure(declared, verdicts, since, control, policy) if declared != control.name else None)
        if declared is not None and failed is not None:
            return Verdict(REVOKED, None, srm, verdicts, running, warnings, (declared, failed), since)
    status, winner = _status(control, treatments, results, head_to_head, held_back, policy, srm, declared)
    cheaper_than = _costlier_equals(winner, treatments, head_to_head, control, policy) if status == WINNER else ()
    unsettled = tuple(arm.name for arm in _candidates(treatments, results, held_back, policy)) if status == COLLECTING else ()
    if winner is not None and winner == declared and _faded(since.get(policy.primary), control, policy):
        warnings += (EFFECT_FADED,)
    return Verdict(status, winner, srm, verdicts, running, warnings, None, since, cheaper_than, unsettled)


def _since_declared(
    declared: str, control: ArmInput, estimates: Mapping[str, Mapping[str, Estimate | None]], policy: Policy
) -> dict[str, MetricResult]:
    """The declared winner against the control on the primary metric and the guardrails, on
    what came after the declaration: one always-valid look of a sequence that starts there. A
    look of an always-valid sequence needs no state of its own to be valid at every look; the
    running intersection only sharpens it, and here it would keep what an effect that moves
    has left behind."""
    results: dict[str, MetricResult] = {}
    metrics = (policy.primary, *(g.metric for g in policy.guardrail_specs))
    for metric in metrics:
        base, other = estimates.get(control.name, {}).get(metric), estimates.get(declared, {}).get(metric)
        if base is None or other is None or not _enough(base, policy) or not _enough(other, policy):
            continue
        overall = control.estimates.get(metric)
        mixture = policy.mixture(metric, overall if overall is not None else base)
        look = msprt(base, other, policy.alpha, mixture, lift_variance(base, other))
        if look is not None:
            results[metric] = MetricResult(compare(base, other, policy.alpha), RunningState.first(look))
    return results


def _faded(result: MetricResult | None, control: ArmInput, policy: Policy) -> bool:
    """Since the declaration, the winner's effect on the primary metric is shown smaller than
    the MDE: its interval's most favourable end falls short of it."""
    overall = control.estimates.get(policy.primary)
    if result is None or result.difference_ci is None or overall is None:
        return False
    effect = policy.mde * abs(overall.mean)
    low, high = result.difference_ci
    best_case = high if policy.higher_is_better(policy.primary) else -low
    return effect > 0 and best_case < effect


def _failure(
    declared: str | None,
    verdicts: Mapping[str, ArmVerdict],
    since: Mapping[str, MetricResult],
    control: ArmInput,
    policy: Policy,
) -> str | None:
    """Why the declared winner no longer stands, if it does not: a guardrail whose always-valid
    interval shows harm beyond its margin, or the primary metric's interval wholly on the losing
    side of the control — over the whole experiment, or since it was declared (a winner that
    turns harmful later is diluted in the whole by what came before)."""
    verdict = verdicts.get(declared) if declared is not None else None
    if verdict is None:
        return None
    if verdict.harmed:
        return verdict.harmed[0]
    higher = policy.higher_is_better(policy.primary)
    primary = verdict.metrics.get(policy.primary)
    if primary is not None and _worse(primary.direction, higher):
        return policy.primary
    for guardrail in policy.guardrail_specs:
        result, overall = since.get(guardrail.metric), control.estimates.get(guardrail.metric)
        margin = guardrail.absolute_margin(overall.mean if overall is not None else None)
        if result is not None and harm_shown(result.difference_ci, margin, policy.higher_is_better(guardrail.metric)):
            return guardrail.metric
    recent = since.get(policy.primary)
    if recent is not None and _worse(recent.direction, higher):
        return policy.primary
    return None


def _head_to_head(
    control: ArmInput,
    treatments: Sequence[ArmInput],
    policy: Policy,
    previous: Mapping[StateKey, RunningState],
    running: dict[StateKey, RunningState],
    extend: bool,
) -> dict[tuple[str, str], MetricResult]:
    """Every pair of treatments on the primary metric, as (later − earlier by name): what it
    takes to replace a declared winner, or to be the best of several. The MDE is relative to the
    control's mean; α is Bonferroni-corrected across the other treatments each one is compared
    with (:func:`_pair_alpha`)."""
    pairs: dict[tuple[str, str], MetricResult] = {}
    policy = dataclasses.replace(policy, alpha=_pair_alpha(policy, treatments))
    base = control.estimates.get(policy.primary)
    mixture = policy.mixture(policy.primary, base) if base is not None else None
    for first, second in itertools.combinations(sorted(treatments, key=lambda arm: arm.name), 2):
        earlier, later = first.estimates.get(policy.primary), second.estimates.get(policy.primary)
        key = (second.name, first.name, policy.primary)
        pairs[(second.name, first.name)] = _compare(
            key, earlier, later, policy, mixture, previous, running, extend, with_lift=False
        )
    return pairs


def _pair_alpha(policy: Policy, treatments: Sequence[ArmInput]) -> float:
    """α for one head-to-head comparison: a treatment is the best of k once it is settled
    against each of the other k − 1, so each of those comparisons gets α / (k − 1)."""
    return policy.alpha / max(1, len(treatments) - 1)


def _apply_guardrails(
    control: ArmInput, treatments: Sequence[ArmInput], results: dict[str, dict[str, MetricResult]], policy: Policy
) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """Marks each guardrail result with its margin and whether harm beyond it is ruled out;
    returns, for each treatment better on the primary metric, the guardrails still in its way,
    and for each treatment, the guardrails on which harm beyond the margin is shown."""
    higher = policy.higher_is_better(policy.primary)
    held_back: dict[str, tuple[str, ...]] = {}
    harmed: dict[str, tuple[str, ...]] = {}
    for arm in treatments:
        blocking, harm = [], []
        for guardrail in policy.guardrail_specs:
            result = results[arm.name].get(guardrail.metric) or MetricResult()
            base = control.estimates.get(guardrail.metric)
            margin = guardrail.absolute_margin(base.mean if base is not None else None)
            shown = non_inferior(result.difference_ci, margin, policy.higher_is_better(guardrail.metric))
            results[arm.name][guardrail.metric] = MetricResult(
                result.comparison, result.sequential, result.adjusted_p, margin, shown
            )
            if not shown:
                blocking.append(guardrail.metric)
            if harm_shown(result.difference_ci, margin, policy.higher_is_better(guardrail.metric)):
                harm.append(guardrail.metric)
        if blocking and _better(_significant(results[arm.name][policy.primary], policy.alpha, adjusted=True), higher):
            held_back[arm.name] = tuple(blocking)
        if harm:
            harmed[arm.name] = tuple(harm)
    return held_back, harmed


def _status(
    control: ArmInput,
    treatments: Sequence[ArmInput],
    results: Mapping[str, Mapping[str, MetricResult]],
    head_to_head: Mapping[tuple[str, str], MetricResult],
    held_back: Mapping[str, tuple[str, ...]],
    policy: Policy,
    srm: float | None,
    declared: str | None,
) -> tuple[str, str | None]:
    if srm is not None and srm < SRM_THRESHOLD:
        return SRM, None
    higher = policy.higher_is_better(policy.primary)
    signs = {arm.name: _significant(results[arm.name][policy.primary], policy.alpha, adjusted=True) for arm in treatments}
    candidates = _candidates(treatments, results, held_back, policy)

    def beats(challenger: ArmInput, incumbent: str) -> bool:
        """Significantly better than the incumbent, head to head."""
        if incumbent == control.name:
            return True  # a candidate is significantly better than the control
        pair_alpha = _pair_alpha(policy, treatments)
        pair = head_to_head.get((challenger.name, incumbent))
        if pair is not None:
            return _better(_significant(pair, pair_alpha, adjusted=False), higher)
        pair = head_to_head.get((incumbent, challenger.name))
        return pair is not None and _worse(_significant(pair, pair_alpha, adjusted=False), higher)

    def best(arms: Sequence[ArmInput]) -> ArmInput:
        # Among arms none of which beats another, the best mean now; the name then sticks.
        unbeaten = [a for a in arms if not any(beats(b, a.name) for b in arms if b is not a)] or list(arms)
        return max(unbeaten, key=lambda arm: (1 if higher else -1) * arm.estimates[policy.primary].mean)  # type: ignore[union-attr]

    if declared is not None and declared in {arm.name for arm in (control, *treatments)}:
        challengers = [arm for arm in candidates if arm.name != declared and beats(arm, declared)]
        return WINNER, best(challengers).name if challengers else declared

    enough = all(
        _enough(arm.estimates.get(policy.primary), policy) for arm in (control, *treatments) if arm.weight > 0 or arm.control
    )
    if not enough or not treatments:
        return COLLECTING, None
    if candidates:
        effect = _mde(control, policy)
        if effect is None:
            return WINNER, best(candidates).name
        # Best of many: a candidate wins only once no other live treatment can still be better
        # than it by the MDE or more (head to head), so an arm that leads early by chance is not
        # crowned over a better one still collecting.
        live = [arm for arm in treatments if arm.weight > 0]
        settled = [
            arm for arm in candidates if all(_settled(head_to_head, arm, other, effect, higher) for other in live if other is not arm)
        ]
        # Among arms that good, the cheaper wins: a costlier one waits for each cheaper arm to be
        # settled beside it (then the cheapest of them wins) or beaten by it head to head.
        eligible = [
            arm
            for arm in settled
            if all(other in settled or beats(arm, other.name) for other in live if _cheaper(other, arm))
        ]
        if not eligible:
            return COLLECTING, None
        return WINNER, _cheapest(eligible, policy.primary, higher).name
    if all(_worse(signs[arm.name], higher) for arm in treatments):
        return WINNER, control.name
    if _no_difference(control, treatments, results, policy):
        return NO_DIFFERENCE, None
    return COLLECTING, None


def _candidates(
    treatments: Sequence[ArmInput],
    results: Mapping[str, Mapping[str, MetricResult]],
    held_back: Mapping[str, tuple[str, ...]],
    policy: Policy,
) -> list[ArmInput]:
    """Treatments significantly better than the control on the primary metric (Holm) and held
    back by no guardrail: each would win if it were the only one."""
    higher = policy.higher_is_better(policy.primary)
    return [
        arm
        for arm in treatments
        if _better(_significant(results[arm.name][policy.primary], policy.alpha, adjusted=True), higher)
        and arm.name not in held_back
    ]


def _mde(control: ArmInput, policy: Policy) -> float | None:
    base = control.estimates.get(policy.primary)
    effect = policy.mde * abs(base.mean) if base is not None else 0.0
    return effect if effect > 0 else None


def _pair_interval(head_to_head: Mapping[tuple[str, str], MetricResult], arm: str, other: str) -> tuple[float, float] | None:
    """The always-valid interval of ``other`` − ``arm`` on the primary metric."""
    pair = head_to_head.get((other, arm))
    if pair is not None:
        return pair.difference_ci
    pair = head_to_head.get((arm, other))
    if pair is None or pair.difference_ci is None:
        return None
    low, high = pair.difference_ci
    return (-high, -low)


def _settled(head_to_head: Mapping[tuple[str, str], MetricResult], arm: ArmInput, other: ArmInput, effect: float, higher: bool) -> bool:
    """Whether ``other`` is shown not better than ``arm`` by ``effect`` or more, head to head."""
    interval = _pair_interval(head_to_head, arm.name, other.name)
    if interval is None:
        return False
    best_case = interval[1] if higher else -interval[0]
    return best_case < effect


COST = "cost_usd"


def _cheaper(arm: ArmInput, than: ArmInput) -> bool:
    cost, other = arm.estimates.get(COST), than.estimates.get(COST)
    return cost is not None and other is not None and cost.mean < other.mean


def _cheapest(arms: Sequence[ArmInput], primary: str, higher: bool) -> ArmInput:
    """Among arms shown within the MDE of each other on the primary metric: the one that costs
    least per request (where every one has a cost), else the best mean now."""
    costs = [arm.estimates.get(COST) for arm in arms]
    if all(cost is not None for cost in costs):
        return min(arms, key=lambda arm: arm.estimates[COST].mean)  # type: ignore[union-attr]
    return max(arms, key=lambda arm: (1 if higher else -1) * arm.estimates[primary].mean)  # type: ignore[union-attr]


def _costlier_equals(
    winner: str | None,
    treatments: Sequence[ArmInput],
    head_to_head: Mapping[tuple[str, str], MetricResult],
    control: ArmInput,
    policy: Policy,
) -> tuple[str, ...]:
    chosen = next((arm for arm in treatments if arm.name == winner), None)
    effect = _mde(control, policy)
    cost = chosen.estimates.get(COST) if chosen is not None else None
    if chosen is None or effect is None or cost is None:
        return ()
    higher = policy.higher_is_better(policy.primary)
    found = []
    for other in treatments:
        other_cost = other.estimates.get(COST)
        if other is chosen or other.weight <= 0 or other_cost is None or other_cost.mean <= cost.mean:
            continue
        if _settled(head_to_head, chosen, other, effect, higher) and _settled(head_to_head, other, chosen, effect, higher):
            found.append(other.name)
    return tuple(found)


def _no_difference(
    control: ArmInput, treatments: Sequence[ArmInput], results: Mapping[str, Mapping[str, MetricResult]], policy: Policy
) -> bool:
    """Every treatment's interval lies within ±MDE of the control's mean. Never once the looks
    contradicted each other: an effect that moved is not one that is 0."""
    base = control.estimates.get(policy.primary)
    if base is None:
        return False
    margin = policy.mde * abs(base.mean)
    if margin <= 0:
        return False
    primary = [results[arm.name][policy.primary] for arm in treatments]
    if any(result.drifted for result in primary):
        return False
    intervals = [result.difference_ci for result in primary]
    return all(ci is not None and -margin < ci[0] and ci[1] < margin for ci in intervals)
