"""One batch of outcomes, reduced per arm to the deltas the Redis batch script applies.

Each outcome becomes one row of metric values (one append), and a batch is reduced once with
numpy: sums, sums of squares, histogram buckets, and per-unit totals by ``bincount``. This keeps
the recorder's cost per request small: it shares the CPU with the request path."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from abproxy.recording import layout
from abproxy.config import BUILTIN_METRICS
from abproxy.recording.interpret import ResponseFacts
from abproxy.recording.outcome import Outcome
from abproxy.stats.histogram import bucket_counts

MetricRow = tuple[float, ...]
"""One request's value of each of ``BUILTIN_METRICS``, in that order; NaN where it has none."""

_NONE = math.nan
_FAILED_ROW: MetricRow = (1.0,) + (_NONE,) * (len(BUILTIN_METRICS) - 1)


def _value(count: int | None) -> float:
    return _NONE if count is None else float(count)


def metric_row(outcome: Outcome, facts: ResponseFacts | None, cost: float | None) -> MetricRow | None:
    """The per-request metric values of SPEC §3, None for a cancelled request: ``error_rate``
    0/1 for every other request; latency, TTFT, length, tokens and cost for successful ones."""
    if outcome.cancelled:
        return None
    if outcome.failed:
        return _FAILED_ROW
    ttft = _NONE if outcome.ttft_s is None else outcome.ttft_s * 1000.0
    cost_value = _NONE if cost is None else cost
    if facts is None:
        return (0.0, outcome.latency_s * 1000.0, ttft, _NONE, _NONE, _NONE, _NONE, _NONE, cost_value)
    return (
        0.0,
        outcome.latency_s * 1000.0,
        ttft,
        _value(facts.chars),
        _value(facts.words),
        _value(facts.prompt_tokens),
        _value(facts.completion_tokens),
        _value(facts.total_tokens),
        cost_value,
    )


ANONYMOUS = -1
"""The unit index of a request that is a unit of its own (no user, or no per-user sums kept)."""


@dataclass(slots=True)
class ArmBatch:
    """One arm's share of a batch."""

    meta: str
    counts_units: bool
    """``unit: user``: ``units`` counts users (and requests without one); else every request."""
    unit_metrics: tuple[str, ...] = ()
    """The metrics whose per-user sums Redis keeps (``ExperimentPlan.per_user_metrics``)."""
    requests: int = 0
    cancelled: int = 0
    anonymous_units: int = 0
    rows: list[MetricRow] = field(default_factory=list)
    row_units: list[int] = field(default_factory=list)
    unit_index: dict[str, int] = field(default_factory=dict)

    def add(self, row: MetricRow | None, unit: str | None) -> None:
        """One request; ``unit`` is its user's hash (None without one)."""
        self.requests += 1
        if unit is None or not self.counts_units:
            self.anonymous_units += 1
        if unit is None or not self.unit_metrics:
            index = ANONYMOUS
        else:
            # a cancelled request still makes its user a unit of the arm
            index = self.unit_index.setdefault(unit, len(self.unit_index))
        if row is None:
            self.cancelled += 1
            return
        self.rows.append(row)
        self.row_units.append(index)

    def payload(self, experiment: str, arm_id: str) -> dict[str, Any]:
        """The arm's part of the batch script's argument. Sums of squares go about each
        metric's mean in this batch (its center), computed here in float64 where nothing
        cancels; the script moves them to the arm's shift (see layout.py and lua/record_batch.lua)."""
        ints: dict[str, int] = {"requests": self.requests}
        if self.cancelled:
            ints["cancelled"] = self.cancelled
        if self.anonymous_units:
            ints["units"] = self.anonymous_units
        sums: dict[str, str] = {}
        hist: dict[str, int] = {}
        metrics: list[list[Any]] = []
        units = list(self.unit_index)
        unit_metrics: list[str] = []
        unit_dy: list[np.ndarray] = []
        unit_dn: list[np.ndarray] = []
        if self.rows:
            matrix = np.array(self.rows, dtype=np.float64)
            owners = np.array(self.row_units, dtype=np.int64)
            errors = int(matrix[:, 0].sum())
            if errors:
                ints["errors"] = errors
            named = owners != ANONYMOUS
            for column, metric in enumerate(BUILTIN_METRICS):
                present = ~np.isnan(matrix[:, column])
                values = matrix[present, column]
                if values.size == 0:
                    continue
                ints[f"{metric}|n"] = int(values.size)
                # repr of a float round-trips exactly: Redis adds the very number computed here
                sums[f"{metric}|s"] = repr(float(values.sum()))
                center = float(values.mean())
                deviations = values - center
                entry: list[Any] = [metric, int(values.size), center, float(deviations.sum()), float(np.dot(deviations, deviations)), 0, 0.0, 0.0]
                metrics.append(entry)
                for bucket, count in bucket_counts(values).items():
                    hist[f"{metric}|{bucket}"] = count
                if metric not in self.unit_metrics:
                    continue
                alone = deviations[~named[present]]
                if alone.size:
                    # units of one request each: Y_u = value, N_u = 1
                    entry[5:8] = [int(alone.size), float(alone.sum()), float(np.dot(alone, alone))]
                if units:
                    mine = present & named
                    unit_metrics.append(metric)
                    unit_dy.append(
                        np.bincount(owners[mine], weights=matrix[mine, column] - center, minlength=len(units))
                    )
                    unit_dn.append(np.bincount(owners[mine], minlength=len(units)))
        unit_payloads: list[list[Any]] = []
        if units and unit_metrics:
            dy_rows = np.column_stack(unit_dy).tolist()
            dn_rows = np.column_stack(unit_dn).tolist()
            unit_payloads = [
                [layout.unit_key(experiment, arm_id, unit), dy, dn]
                for unit, dy, dn in zip(units, dy_rows, dn_rows, strict=True)
            ]
        elif units and self.counts_units:
            # users whose requests all failed or were cancelled are units of the arm all the same
            unit_payloads = [[layout.unit_key(experiment, arm_id, unit), [], []] for unit in units]
        return {
            "arm": arm_id,
            "meta": self.meta,
            "arms_key": layout.arms_key(experiment),
            "stats": layout.stats_key(experiment, arm_id),
            "hist_key": layout.hist_key(experiment, arm_id),
            "ints": ints,
            "sums": sums,
            "hist": hist,
            "metrics": metrics,
            "unit_metrics": unit_metrics,
            "units": unit_payloads,
            "count_units": self.counts_units,
        }
