"""Prometheus metric objects, defined once here (SPEC §5). Label values come only from the
config (experiment, variant and upstream names) or from small fixed sets, so no request can
create a new series."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from abproxy.stats.results import ExperimentResult

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
FLUSH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
DROP_REASONS = ("buffer_full", "corrupt_counters", "redis_refused", "partly_written")
JUDGE_FAILURES = (
    "timeout", "unreachable", "rate_limited", "http_4xx", "http_5xx", "bad_answer", "out_of_range",
    "queue_full", "over_cap", "not_recorded",
)  # fmt: skip
"""Why a sampled answer got no judge's score (``abproxy_judge_failures_total{judge,reason}``)."""
"""Why the recorder may drop measurements (``abproxy_recorder_dropped_total{reason}``)."""


@dataclass(frozen=True, slots=True)
class VariantSeries:
    """The labelled children of one (experiment, variant), looked up once and kept."""

    duration: Any
    ttft: Any
    prompt_tokens: Any
    completion_tokens: Any
    cost: Any


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def exposition(registry: CollectorRegistry) -> bytes:
    """The /metrics text: this process's registry, or every worker's when ``--workers`` runs
    several (prometheus_client's multiprocess mode, values shared through files)."""
    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client import multiprocess

        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        return generate_latest(combined)
    return generate_latest(registry)


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._series: dict[tuple[str, str], VariantSeries] = {}
        self._requests: dict[tuple[str, str, str], Any] = {}
        self.requests = Counter(
            "abproxy_requests_total",
            "Proxied requests by experiment, variant and HTTP status (499: client went away).",
            ("experiment", "variant", "status"),
            registry=registry,
        )
        self.duration = Histogram(
            "abproxy_request_duration_seconds",
            "Proxy-observed time to the last byte of the response.",
            ("experiment", "variant"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "abproxy_time_to_first_token_seconds",
            "Time to the first content token of a streamed response.",
            ("experiment", "variant"),
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "abproxy_tokens_total",
            "Tokens reported by the upstream's usage, by kind (prompt, completion).",
            ("experiment", "variant", "kind"),
            registry=registry,
        )
        self.cost = Counter(
            "abproxy_cost_usd_total",
            "Cost in USD from the configured prices.",
            ("experiment", "variant"),
            registry=registry,
        )
        self.feedback = Counter(
            "abproxy_feedback_total",
            "Feedback scores posted, by metric name.",
            ("experiment", "variant", "name"),
            registry=registry,
        )
        self.upstream_errors = Counter(
            "abproxy_upstream_errors_total",
            "Failed upstream calls by reason (http_4xx, http_5xx, rate_limited, timeout, unreachable, broken_stream).",
            ("upstream", "reason"),
            registry=registry,
        )
        self.recorder_dropped = Counter(
            "abproxy_recorder_dropped_total",
            "Measurements not written to Redis, by reason (buffer_full: Redis unreachable too long; "
            "corrupt_counters: a key or counter Redis cannot add to; redis_refused: a batch Redis kept refusing; "
            "partly_written: a batch Redis stopped partway).",
            ("reason",),
            registry=registry,
        )
        for reason in DROP_REASONS:
            self.recorder_dropped.labels(reason)
        self.recorder_buffered = Gauge(
            "abproxy_recorder_buffered",
            "Measurements waiting to be written to Redis.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.recorder_write_errors = Counter(
            "abproxy_recorder_write_errors_total",
            "Failed attempts to write a batch of measurements to Redis (retried).",
            registry=registry,
        )
        self.flush_duration = Histogram(
            "abproxy_flush_duration_seconds",
            "Duration of flushes to MLflow.",
            buckets=FLUSH_BUCKETS,
            registry=registry,
        )
        self.flush_last_success = Gauge(
            "abproxy_flush_last_success_timestamp_seconds",
            "Unix time of the last successful flush to MLflow.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.p_value = Gauge(
            "abproxy_experiment_p_value",
            "Latest p-value of each variant against the control, per metric (always-valid when sequential).",
            ("experiment", "variant", "metric"),
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.feedback_mean = Gauge(
            "abproxy_feedback_mean",
            'Latest mean feedback score per variant (a judge\'s with name="judge.<name>").',
            ("experiment", "variant", "name"),
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.winner = Gauge(
            "abproxy_experiment_winner",
            "1 for the variant the statistics declare the winner, else 0.",
            ("experiment", "variant"),
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.variant_stopped = Gauge(
            "abproxy_variant_stopped",
            "1 for a variant stopped for harm on a guardrail (the control serves its users), else 0.",
            ("experiment", "variant"),
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.traces_dropped = Counter(
            "abproxy_traces_dropped_total",
            "Sampled requests not written to MLflow as traces, by reason (rate_limited, queue_full, mlflow_unavailable).",
            ("reason",),
            registry=registry,
        )
        self.assessments_dropped = Counter(
            "abproxy_assessments_dropped_total",
            "Feedback on traced requests not written to MLflow as assessments.",
            registry=registry,
        )
        self.judge_requests = Counter(
            "abproxy_judge_requests_total",
            "Calls to LLM judges, by judge and outcome (scored, failed).",
            ("judge", "status"),
            registry=registry,
        )
        self.judge_failures = Counter(
            "abproxy_judge_failures_total",
            "Sampled answers no judge's score was recorded for, by judge and reason (timeout, unreachable, "
            "rate_limited, http_4xx, http_5xx: the judge's upstream; bad_answer: no JSON score; out_of_range; "
            "queue_full: the judges' queue was full; over_cap: past max_per_minute; not_recorded: Redis refused it, "
            "or too many scores waited for Redis).",
            ("judge", "reason"),
            registry=registry,
        )
        self.judge_cost = Counter(
            "abproxy_judge_cost_usd_total",
            "Cost in USD of the judges' own calls (by prices), never added to a variant's cost.",
            ("judge",),
            registry=registry,
        )
        self.judge_agreement = Gauge(
            "abproxy_judge_agreement",
            "Spearman rank correlation between a judge's scores and the users' feedback on the same requests.",
            ("experiment", "judge", "name"),
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.flush_errors = Counter(
            "abproxy_flush_errors_total",
            "Flushes to MLflow that failed (retried at the next interval).",
            registry=registry,
        )

    def series(self, experiment: str, variant: str) -> VariantSeries:
        found = self._series.get((experiment, variant))
        if found is None:
            found = self._series[(experiment, variant)] = VariantSeries(
                duration=self.duration.labels(experiment, variant),
                ttft=self.ttft.labels(experiment, variant),
                prompt_tokens=self.tokens.labels(experiment, variant, "prompt"),
                completion_tokens=self.tokens.labels(experiment, variant, "completion"),
                cost=self.cost.labels(experiment, variant),
            )
        return found

    def count_request(self, experiment: str, variant: str, status: int, count: int = 1) -> None:
        key = (experiment, variant, str(status))
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(*key)
        child.inc(count)

    def publish_results(self, result: ExperimentResult) -> None:
        """The statistics of one experiment's live results, as gauges for dashboards."""
        stopped = {stop.variant for stop in result.stopped}
        for agreement in result.agreement:
            if agreement.spearman is not None:
                self.judge_agreement.labels(result.experiment, agreement.judge, agreement.feedback).set(agreement.spearman)
        for variant in result.variants:
            self.winner.labels(result.experiment, variant.name).set(1 if result.winner == variant.name else 0)
            self.variant_stopped.labels(result.experiment, variant.name).set(1 if variant.name in stopped else 0)
            for metric, summary in variant.metrics.items():
                if metric.startswith(("feedback.", "judge.")) and summary.mean is not None:
                    self.feedback_mean.labels(result.experiment, variant.name, metric.removeprefix("feedback.")).set(summary.mean)
                if not variant.control and summary.p_value is not None:
                    self.p_value.labels(result.experiment, variant.name, metric).set(summary.p_value)
