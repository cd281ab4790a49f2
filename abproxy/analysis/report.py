"""The comparison table a prompt engineer reads: in the terminal (`abproxy report`) and as
``report.md`` in MLflow. Built from the same typed results, so both show the same numbers."""

from __future__ import annotations

from abproxy.stats.results import ExperimentResult, JudgeAgreement, MetricSummary


def _fmt(value: float | None, digits: int = 2, percent: bool = False) -> str:
    if value is None:
        return "-"
    if percent:
        return f"{value * 100:+.{digits}f}%"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if 0 < abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


_DURATIONS = ("latency_ms", "ttft_ms")
_COUNTS = {"total_tokens": "tokens", "prompt_tokens": "tokens", "completion_tokens": "tokens", "response_chars": "characters"}


def _in_unit(result: ExperimentResult, metric: str, value: float, *, difference: bool, signed: bool) -> tuple[str, str]:
    """``value`` rounded to what a reader can use, and its unit: a rate in percent (a difference
    of rates in percentage points), a duration in whole milliseconds, a cost in dollars, a
    count in tokens or characters, a score in points of its scale."""
    sign = "+" if signed else ""
    if metric in result.rates:
        return f"{value * 100:{sign}.1f}", "pp" if difference else "%"
    if metric in _DURATIONS:
        return f"{value:{sign},.0f}", "ms"
    if metric == "cost_usd":
        return ("+" if signed and value >= 0 else "-" if value < 0 else "") + dollars(abs(value)), ""
    if metric in _COUNTS:
        return f"{value:{sign},.1f}", _COUNTS[metric]
    return f"{value:{sign}.2f}", "points"


def amount(result: ExperimentResult, metric: str, value: float | None, *, difference: bool = False, signed: bool = False) -> str:
    """``value`` of ``metric`` in its own unit (``difference``: a difference of two values;
    ``signed``: a difference with its sign)."""
    if value is None:
        return "-"
    number, unit = _in_unit(result, metric, value, difference=difference or signed, signed=signed)
    return f"{number}{unit}" if unit in ("", "%") else f"{number} {unit}"


def change(result: ExperimentResult, metric: str, difference: float | None, interval: tuple[float, float] | None) -> str:
    """A difference to the control with its interval, the unit said once: ``+0.40 points, 95%
    CI +0.37 to +0.43``."""
    if difference is None:
        return "-"
    shown = amount(result, metric, difference, signed=True)
    if interval is None:
        return shown
    low, unit = _in_unit(result, metric, interval[0], difference=True, signed=True)
    high, _ = _in_unit(result, metric, interval[1], difference=True, signed=True)
    return f"{shown}, 95% CI {low} to {high}{' ' + unit if unit else ''}"


def _cost_against_control(result: ExperimentResult, variant: str) -> str:
    """``variant``'s cost per request beside the control's, per 1,000 requests (a request costs
    millionths of a dollar)."""
    control = next((v for v in result.variants if v.control), None)
    cost = result.variant(variant).metric("cost_usd").mean
    if cost is None or control is None:
        return ""
    base = control.metric("cost_usd").mean
    said = f"Cost: {dollars(cost * 1000)} per 1,000 requests"
    if base is None or control.name == variant:
        return said + "."
    ratio = f", {cost / base:.1f}× as much" if base > 0 else ""
    return said + f", against {dollars(base * 1000)} for the control{ratio}."


def table_rows(result: ExperimentResult) -> tuple[list[str], list[list[str]]]:
    primary = result.primary_metric
    headers = [
        "variant",
        "requests",
        "errors",
        f"{primary} mean",
        "95% CI",
        "lift",
        "p",
        "P(best)",
        "latency p50 ms",
        "latency p95 ms",
        "TTFT p50 ms",
        "tokens mean",
        "USD per 1k req",
    ]
    rows = []
    for variant in result.variants:
        main = variant.metric(primary)
        ci = main.ci
        name = variant.name + (" (control)" if variant.control else "")
        if result.winner == variant.name:
            name += " *"
        latency = variant.metric("latency_ms")
        rows.append(
            [
                name,
                str(variant.requests),
                str(variant.errors),
                _fmt(main.mean, 3),
                f"[{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]" if ci else "-",
                _fmt(main.lift, 1, percent=True),
                _p(main.adjusted_p_value if main.adjusted_p_value is not None else main.p_value),
                "-" if variant.prob_best is None else f"{variant.prob_best:.2f}",
                _fmt(latency.p50, 0),
                _fmt(latency.p95, 0),
                _fmt(variant.metric("ttft_ms").p50, 0),
                _fmt(variant.metric("total_tokens").mean, 1),
                _per_thousand(variant.metric("cost_usd").mean),
            ]
        )
    return headers, rows


def _per_thousand(cost: float | None) -> str:
    return "-" if cost is None else dollars(cost * 1000).lstrip("$")


def _p_is(value: float | None) -> str:
    shown = _p(value)
    return f"p{shown}" if shown.startswith("<") else f"p={shown}"


def headline(result: ExperimentResult) -> str:
    srm = result.srm.p_value
    srm_text = f"SRM {_p_is(srm)}" if srm is not None else "SRM: not enough data"
    test = "always-valid (sequential)" if result.sequential else "fixed-horizon Welch"
    promoted = f", promoted={result.promoted} (serving all new traffic)" if result.promoted else ""
    warnings = f", WARNINGS: {', '.join(result.warnings)}" if result.warnings else ""
    return (
        f"{result.experiment}: status={result.status}, winner={result.winner or 'none'}{promoted}{warnings} "
        f"(primary {result.primary_metric}, {test} p-values, unit={result.unit}, {srm_text})"
    )


_EXPLAINED = {
    "effect_drift": "effect_drift: the looks contradicted each other, the effect moved over time; the always-valid "
    "sequence started again from the look that showed it, and no_difference is never concluded",
    "effect_faded": "effect_faded: since {winner} was declared, its effect on {primary} is shown smaller than the "
    "MDE: {since}",
    "units_correlated": "units_correlated: a user's requests are correlated (design effect {deff}); consider unit: user",
    "corrupt_counters": "corrupt_counters: counters that are not numbers, left out of every verdict: {corrupt}",
    "state_not_saved": "state_not_saved: Redis refused this look's always-valid state; shown: the state saved before",
    "redis_evicted_keys": "redis_evicted_keys: Redis evicted keys when its memory was full (its maxmemory-policy is not "
    "noeviction): counts, feedback and per-user sums may be missing, and a re-posted score counted as new",
}


def notes(result: ExperimentResult) -> list[str]:
    """What the table cannot say: variants stopped for harm, guardrails holding a variant back,
    variants better than the control of which none is yet the best, and each warning."""
    lines = [
        f"{stop.variant}: stopped at {stop.at} for harm on guardrail {stop.reason}: its users get the control "
        f"(abproxy resume {result.experiment} {stop.variant} gives it its traffic back)"
        for stop in result.stopped
    ]
    for variant in result.variants:
        for metric in variant.held_back_by:
            lines.append(f"{variant.name}: better on {result.primary_metric}, {held_back(result, variant.name, metric)}")
    if result.unsettled:
        lines.append(
            f"{', '.join(result.unsettled)}: each better than the control on {result.primary_metric}; not yet settled "
            "which is best (better than the others by the MDE, or as good and cheaper)"
        )
    lines += [agreement_line(agreement) for agreement in result.agreement]
    deff = "-" if result.design_effect is None else f"{result.design_effect:.2f}"
    for warning in result.warnings:
        lines.append(
            _EXPLAINED.get(warning, warning).format(
                deff=deff, corrupt=", ".join(result.corrupt), winner=result.winner, primary=result.primary_metric,
                since=since_declared(result),
            )
        )
    return lines


def held_back(result: ExperimentResult, variant: str, metric: str) -> str:
    """Why guardrail ``metric`` holds ``variant`` back, in the metric's units."""
    summary = result.variant(variant).metric(metric)
    if summary.margin == 0:
        return (
            f"held back by guardrail {metric}: its margin is a share of the control's mean, which is 0, so no harm "
            f"can ever be ruled out; give {metric} an absolute margin (guardrails: {{{metric}: {{margin: …}}}})"
        )
    more = f"; about {summary.samples_needed:,} more samples per arm" if summary.samples_needed is not None else ""
    return (
        f"held back by guardrail {metric}: harm beyond {amount(result, metric, summary.margin, difference=True)} "
        f"not yet ruled out (difference {change(result, metric, _difference(summary), summary.difference_ci)}{more})"
    )


def _difference(summary: MetricSummary) -> float | None:
    if summary.difference_ci is None:
        return None
    return (summary.difference_ci[0] + summary.difference_ci[1]) / 2


def agreement_line(agreement: JudgeAgreement) -> str:
    """How far a judge orders answers as the users do, in words a reader can act on."""
    where = f"judge {agreement.judge} against feedback {agreement.feedback}"
    if agreement.spearman is None:
        return f"{where}: {agreement.n} request(s) scored by both, too few (or too uniform) to compare"
    return (
        f"{where}: Spearman rank correlation {agreement.spearman:+.2f} (p {_p(agreement.p_value)}) "
        f"on {agreement.n:,} requests scored by both"
    )


def markdown(result: ExperimentResult) -> str:
    headers, rows = table_rows(result)
    lines = [f"### {headline(result)}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "`*` marks the winner. p: versus the control on the primary metric, Holm-adjusted across variants."]
    lines += [f"- {line}" for line in notes(result)]
    return "\n".join(lines) + "\n"


def terminal(result: ExperimentResult) -> str:
    headers, rows = table_rows(result)
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    body = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([headline(result), line, "-" * len(line), *body, *notes(result)]) + "\n"


def verdict_sentence(result: ExperimentResult) -> str:
    """The verdict in one sentence, as MLflow's experiment description opens with it (and one
    more for a winner whose effect faded, and one for the variants stopped for harm)."""
    sentence = _verdict(result)
    if result.status == "winner" and result.winner is not None and result.cheaper_than:
        others = " and ".join(f"{name}{_cost(result, name)}" for name in result.cheaper_than)
        verb = "is" if len(result.cheaper_than) == 1 else "are"
        sentence += (
            f" {others} {verb} within the MDE of it on {result.primary_metric} but cost more "
            f"({result.winner}: {_cost(result, result.winner).strip(' ()')}): among arms that good, the cheaper wins."
        )
    if result.status == "winner" and "effect_faded" in result.warnings:
        sentence += f" But its effect has faded since it was declared: {since_declared(result)}."
    if result.stopped:
        names = ", ".join(f"{stop.variant} (on {stop.reason})" for stop in result.stopped)
        sentence += f" Stopped for harm: {names}: the control serves their users."
    return sentence


def since_declared(result: ExperimentResult) -> str:
    """The winner's lift on the primary metric since its declaration, beside the whole
    experiment's: what an effect that faded looks like."""
    since = result.since_declared
    recent = since.metrics.get(result.primary_metric) if since is not None else None
    if since is None or recent is None:
        return ""
    overall = result.variant(since.variant).metric(result.primary_metric)
    interval = f" ({_fmt(recent.lift_ci[0], 1, percent=True)} to {_fmt(recent.lift_ci[1], 1, percent=True)})" if recent.lift_ci else ""
    return (
        f"lift {_fmt(recent.lift, 1, percent=True)}{interval} over its last {recent.n:,} samples, "
        f"against {_fmt(overall.lift, 1, percent=True)} over the whole experiment"
    )


def _cost(result: ExperimentResult, variant: str) -> str:
    cost = result.variant(variant).metric("cost_usd").mean
    return f" ({dollars(cost * 1000)} per 1,000 requests)" if cost is not None else ""


def dollars(value: float) -> str:
    """Cents from a dime up ($0.35, $12.50); below, two significant digits ($0.0075)."""
    return f"${value:,.2f}" if abs(value) >= 0.1 else f"${value:.2g}"


def _verdict(result: ExperimentResult) -> str:
    primary = result.primary_metric
    control = next((variant for variant in result.variants if variant.control), None)
    requests = sum(variant.requests for variant in result.variants)
    if result.status == "srm":
        return (
            f"Sample-ratio mismatch ({_p_is(result.srm.p_value)}): the assignment counts disagree with the "
            "weights, so the results cannot be trusted until that is explained."
        )
    if result.status == "revoked" and result.revoked is not None:
        revoked = result.revoked
        failure = (
            f"its {primary} is now significantly worse than the control's"
            if revoked.reason == primary
            else f"it now harms guardrail {revoked.reason} beyond its margin"
        )
        return f"Revoked: {revoked.variant}, declared the winner, no longer stands: {failure} ({requests:,} requests)."
    if result.status == "winner" and result.winner is not None:
        best = result.variant(result.winner)
        if best.control or control is None:
            return f"Winner: {best.name}, the control: every other variant is significantly worse on {primary}."
        main, base = best.metric(primary), control.metric(primary)
        p_value = main.adjusted_p_value if main.adjusted_p_value is not None else main.p_value
        gain = None if main.mean is None or base.mean is None else main.mean - base.mean
        return (
            f"Winner: {best.name}: {primary} {amount(result, primary, main.mean)} against "
            f"{amount(result, primary, base.mean)} for the control {control.name}: "
            f"{change(result, primary, gain, main.difference_ci)} ({_fmt(main.lift, 1, percent=True)}, "
            f"{_p_is(p_value)}), after {requests:,} requests. {_cost_against_control(result, best.name)}"
        ).rstrip()
    if result.status == "no_difference":
        return f"No difference: every variant is as good as the control {control.name if control else ''} on {primary}."
    if result.unsettled:
        names = " and ".join(f"{name}{_cost(result, name)}" for name in result.unsettled)
        return (
            f"Collecting: {names} {'are each' if len(result.unsettled) > 1 else 'is'} better than the control on "
            f"{primary}; not yet settled which is best (better by the MDE, or as good and cheaper) "
            f"({requests:,} requests so far)."
        )
    held = [variant for variant in result.variants if variant.held_back_by]
    if held:
        reasons = "; ".join(
            f"{variant.name} is better on {primary} but {held_back(result, variant.name, metric)}"
            for variant in held
            for metric in variant.held_back_by
        )
        return f"Collecting: {reasons} ({requests:,} requests so far)."
    return f"Collecting: no variant differs significantly from the control on {primary} yet ({requests:,} requests so far)."
