"""The results of analysing one experiment, as frozen dataclasses (as gbstats' models/results):
what the live-results endpoint, ``abproxy report``, the Prometheus gauges and the MLflow flush
all read. They become JSON only at the edges (:func:`as_json`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

Interval = tuple[float, float]


@dataclass(frozen=True, slots=True)
class MetricSummary:
    """One metric of one variant: its distribution, and versus the control (None for the
    control itself, or while there is too little data)."""

    n: int = 0
    sum: float | None = None
    mean: float | None = None
    std: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    ci: Interval | None = None
    """Interval of the mean (of the per-unit ratio, for ``unit: user``)."""
    lift: float | None = None
    """(treatment − control) / control."""
    lift_ci: Interval | None = None
    difference_ci: Interval | None = None
    """Interval of treatment − control: always-valid when the test is sequential."""
    p_value: float | None = None
    """The p-value decisions use: always-valid when sequential, else Welch's."""
    welch_p_value: float | None = None
    adjusted_p_value: float | None = None
    """Holm-adjusted across treatments (primary metric only)."""
    margin: float | None = None
    """Guardrails only: the harm (in the metric's units) the interval must rule out."""
    non_inferior: bool | None = None
    """Guardrails only: whether ``difference_ci`` rules out harm of ``margin`` or more."""
    capped_at: float | None = None
    """Duration guardrails (``latency_ms``, ``ttft_ms``): the comparison with the control (lift,
    intervals, p-value, margin) is on values capped at this, the control's 95th percentile, as
    heavy tails would otherwise drown any difference; the distribution columns are uncapped."""
    samples_needed: int | None = None
    """Guardrails only, while not ``non_inferior``: about how many more samples per arm (units
    for ``unit: user``) until it would be, if the difference stays what it is now."""


@dataclass(frozen=True, slots=True)
class VariantResult:
    name: str
    arm: str
    """``variant@definition-hash``: an edited variant is a new arm."""
    control: bool
    weight: float
    """Share of new traffic (the weights normalised to 1)."""
    requests: int
    errors: int
    cancelled: int
    units: int
    prob_best: float | None
    samples_needed: int | None
    """A forecast: about how many more samples per arm until the primary metric's comparison
    decides, in about 80% of cases, given what has been seen and an effect of ``stats.mde`` in
    what is to come; 0 once it is decided, never before."""
    metrics: Mapping[str, MetricSummary] = field(default_factory=dict)
    held_back_by: tuple[str, ...] = ()
    """Guardrails that keep this variant from winning although it is significantly better on
    the primary metric: their intervals do not yet rule out harm beyond the margin."""

    def metric(self, name: str) -> MetricSummary:
        return self.metrics.get(name, MetricSummary())


@dataclass(frozen=True, slots=True)
class SampleRatio:
    p_value: float | None
    ok: bool | None
    """False: a sample-ratio mismatch (the results cannot be trusted); None: too little data."""


@dataclass(frozen=True, slots=True)
class StoppedVariant:
    """A treatment stopped for harm: the control serves its units until ``abproxy resume``."""

    variant: str
    reason: str
    """The guardrail on which harm beyond the margin was shown."""
    at: str
    """When (ISO 8601, UTC)."""


@dataclass(frozen=True, slots=True)
class Revoked:
    """A declared winner that later failed: status ``revoked``, and promote refuses it."""

    variant: str
    reason: str
    """The metric it failed on: a guardrail showing harm beyond its margin, or the primary metric."""


@dataclass(frozen=True, slots=True)
class SinceDeclared:
    """The declared winner against the control on what came after its declaration alone: the
    recent effect, beside the cumulative one in ``variants``."""

    variant: str
    metrics: Mapping[str, MetricSummary] = field(default_factory=dict)
    """The primary metric and the guardrails: ``n`` (the winner's samples since), ``mean``, ``lift``,
    ``lift_ci``, ``difference_ci`` and ``p_value`` of a sequence that starts at the declaration."""


@dataclass(frozen=True, slots=True)
class JudgeAgreement:
    """A judge against the users' feedback on the requests both scored."""

    judge: str
    feedback: str
    n: int
    """Requests scored by both (the judge's current version)."""
    spearman: float | None
    """Rank correlation: 1, they order answers alike; 0, the judge's order says nothing of the users'."""
    p_value: float | None


@dataclass(frozen=True, slots=True)
class ExperimentResult:
    experiment: str
    status: str
    winner: str | None
    primary_metric: str
    guardrails: tuple[str, ...]
    unit: str
    sequential: bool
    alpha: float
    srm: SampleRatio
    variants: tuple[VariantResult, ...]
    promoted: str | None = None
    """The variant ``abproxy promote`` made every replica serve: the test is over."""
    warnings: tuple[str, ...] = ()
    """``effect_drift`` (the looks contradicted each other: the effect moved over time),
    ``effect_faded`` (since it was declared, the winner's effect is shown smaller than the MDE:
    see ``since_declared``),
    ``units_correlated`` (a ``unit: request`` experiment whose users' requests are correlated:
    design effect above 1.5), ``corrupt_counters`` (see ``corrupt``), ``state_not_saved``
    (Redis refused this look's always-valid state: the answer rests on the state saved before)."""
    corrupt: tuple[str, ...] = ()
    """``variant/counter`` of every counter in Redis that is not a finite number; none of them
    feeds a verdict."""
    design_effect: float | None = None
    """``unit: request`` with users: the variance of the primary metric's mean counted per user
    over that counted per request (1: users' requests are independent)."""
    stopped: tuple[StoppedVariant, ...] = ()
    revoked: Revoked | None = None
    since_declared: SinceDeclared | None = None
    cheaper_than: tuple[str, ...] = ()
    """Variants shown within ``stats.mde`` of the winner on the primary metric, head to head,
    that cost more per request: among arms that good, the cheaper wins."""
    unsettled: tuple[str, ...] = ()
    """While collecting: variants each significantly better than the control (and held back by
    no guardrail), of which none is yet shown the best."""
    agreement: tuple[JudgeAgreement, ...] = ()
    """Each judge against each feedback metric of the experiment (docs/reference.md, "LLM judges")."""
    rates: tuple[str, ...] = ()
    """The metrics that are shares of 0/1 outcomes (``error_rate``, a 0/1 score): their
    differences are read in percentage points."""

    def variant(self, name: str) -> VariantResult:
        return next(variant for variant in self.variants if variant.name == name)


def _number(value: float | None, significant: int = 7) -> float | None:
    """A JSON-friendly number: finite, to ``significant`` digits (costs per request are ~1e-6)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{float(value):.{significant}g}")


def _plain(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}


def as_json(result: ExperimentResult) -> dict[str, Any]:
    """The result as the JSON of ``GET /abproxy/experiments/{name}``: numbers to seven
    significant digits, and null for anything not finite."""
    return _plain(result)
