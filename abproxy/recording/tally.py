"""A batch's Prometheus updates, summed while the recorder interprets the batch and applied once
per series: the request path itself never touches a Prometheus metric."""

from __future__ import annotations

from dataclasses import dataclass, field

from abproxy.metrics import ProxyMetrics
from abproxy.recording.interpret import ResponseFacts
from abproxy.recording.outcome import Outcome


@dataclass(slots=True)
class SeriesTally:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)


class PrometheusTally:
    """A batch's Prometheus updates: counters summed and applied once per series per batch;
    histograms observed per value, as they must be."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.series: dict[tuple[str, str], SeriesTally] = {}

    def add(self, outcome: Outcome, facts: ResponseFacts | None, cost: float | None) -> None:
        experiment, variant = (outcome.route.experiment, outcome.route.variant) if outcome.route else ("", "")
        key = (experiment, variant, outcome.status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if outcome.error_reason is not None:
            reason = (outcome.upstream, outcome.error_reason)
            self.errors[reason] = self.errors.get(reason, 0) + 1
        if outcome.cancelled or outcome.failed:
            return
        tally = self.series.get((experiment, variant))
        if tally is None:
            tally = self.series[(experiment, variant)] = SeriesTally()
        tally.latencies.append(outcome.latency_s)
        if outcome.ttft_s is not None:
            tally.ttfts.append(outcome.ttft_s)
        if facts is not None:
            tally.prompt_tokens += facts.prompt_tokens or 0
            tally.completion_tokens += facts.completion_tokens or 0
        if cost:
            tally.cost += cost

    def apply(self, metrics: ProxyMetrics) -> None:
        for (experiment, variant, status), count in self.requests.items():
            metrics.count_request(experiment, variant, status, count)
        for (upstream, reason), count in self.errors.items():
            metrics.upstream_errors.labels(upstream, reason).inc(count)
        for (experiment, variant), tally in self.series.items():
            series = metrics.series(experiment, variant)
            for latency in tally.latencies:
                series.duration.observe(latency)
            for ttft in tally.ttfts:
                series.ttft.observe(ttft)
            if tally.prompt_tokens:
                series.prompt_tokens.inc(tally.prompt_tokens)
            if tally.completion_tokens:
                series.completion_tokens.inc(tally.completion_tokens)
            if tally.cost:
                series.cost.inc(tally.cost)
