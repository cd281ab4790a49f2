"""One batch of outcomes, reduced per arm to the deltas the Redis batch script applies.

Values are collected in plain lists as outcomes arrive (an append each) and reduced once per
batch with numpy: sums, sums of squares, histogram buckets, and per-unit totals by ``bincount``.
This keeps the recorder's cost per request small; it shares the CPU with the request path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from abproxy import store
from abproxy.outcome import Outcome, ResponseFacts
from abproxy.stats.histogram import bucket_counts


def metric_values(outcome: Outcome, facts: ResponseFacts | None, cost: float | None) -> dict[str, float]:
    """The per-request metric values of SPEC §3: ``error_rate`` 0/1 for every request that was
    not cancelled; latency, TTFT, length, tokens and cost for successful ones."""
    if outcome.cancelled:
        return {}
    values: dict[str, float] = {"error_rate": 1.0 if outcome.failed else 0.0}
    if outcome.failed:
        return values
    values["latency_ms"] = outcome.latency_s * 1000.0
    if outcome.ttft_s is not None:
        values["ttft_ms"] = outcome.ttft_s * 1000.0
    if facts is not None:
        if facts.chars is not None:
            values["response_chars"] = float(facts.chars)
        if facts.words is not None:
            values["response_words"] = float(facts.words)
        if facts.prompt_tokens is not None:
            values["prompt_tokens"] = float(facts.prompt_tokens)
        if facts.completion_tokens is not None:
            values["completion_tokens"] = float(facts.completion_tokens)
        if facts.total_tokens is not None:
            values["total_tokens"] = float(facts.total_tokens)
    if cost is not None:
        values["cost_usd"] = cost
    return values


ANONYMOUS = -1
"""The unit index of a request that is a unit of its own (no unit id, or ``unit: request``)."""


@dataclass(slots=True)
class ArmBatch:
    """One arm's share of a batch."""

    meta: str
    per_unit: bool
    counters: dict[str, int] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    value_units: dict[str, list[int]] = field(default_factory=dict)
    unit_index: dict[str, int] = field(default_factory=dict)

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def add(self, outcome: Outcome, values: dict[str, float], unit: str | None) -> None:
        self.count("requests")
        if outcome.cancelled:
            self.count("cancelled")
        elif outcome.failed:
            self.count("errors")
        if unit is None or not self.per_unit:
            self.count("units")
            index = ANONYMOUS
        else:
            index = self.unit_index.setdefault(unit, len(self.unit_index))
        for metric, value in values.items():
            column = self.values.get(metric)
            if column is None:
                column = self.values[metric] = []
                self.value_units[metric] = []
            column.append(value)
            self.value_units[metric].append(index)

    def payload(self, experiment: str, arm_id: str) -> dict[str, Any]:
        """The arm's part of the batch script's argument."""
        ints = dict(self.counters)
        sums: dict[str, str] = {}
        hist: dict[str, int] = {}
        units = list(self.unit_index)
        unit_dy = np.zeros((len(units), len(self.values)))
        unit_dn = np.zeros((len(units), len(self.values)), dtype=np.int64)
        for column, (metric, raw) in enumerate(self.values.items()):
            values = np.asarray(raw, dtype=np.float64)
            ints[f"{metric}|n"] = len(raw)
            # repr of a float round-trips exactly: Redis adds the very number computed here
            sums[f"{metric}|s"] = repr(float(values.sum()))
            sums[f"{metric}|q"] = repr(float(np.dot(values, values)))
            for bucket, count in bucket_counts(values).items():
                hist[f"{metric}|{bucket}"] = count
            if not self.per_unit:
                continue
            owners = np.asarray(self.value_units[metric], dtype=np.int64)
            anonymous = owners == ANONYMOUS
            if anonymous.any():
                # units of one request each: Y_u = value, N_u = 1
                alone = values[anonymous]
                ints[f"{metric}|uk"] = int(alone.size)
                sums[f"{metric}|uyy"] = repr(float(np.dot(alone, alone)))
                sums[f"{metric}|unn"] = repr(float(alone.size))
                sums[f"{metric}|uyn"] = repr(float(alone.sum()))
            if units:
                named = ~anonymous
                unit_dy[:, column] = np.bincount(owners[named], weights=values[named], minlength=len(units))
                unit_dn[:, column] = np.bincount(owners[named], minlength=len(units))
        metric_names = list(self.values)
        unit_payloads = []
        for unit, dy, dn in zip(units, unit_dy.tolist(), unit_dn.tolist(), strict=True):
            if all(dn):
                names = metric_names
            else:  # this unit's requests did not produce every metric (errors, no stream)
                present = [column for column, count in enumerate(dn) if count]
                names = [metric_names[column] for column in present]
                dy = [dy[column] for column in present]
                dn = [dn[column] for column in present]
            unit_payloads.append(
                {"key": store.unit_key(experiment, arm_id, unit), "names": names, "dy": dy, "dn": dn}
            )
        return {
            "arm": arm_id,
            "meta": self.meta,
            "arms_key": store.arms_key(experiment),
            "stats": store.stats_key(experiment, arm_id),
            "hist_key": store.hist_key(experiment, arm_id),
            "ints": ints,
            "sums": sums,
            "hist": hist,
            "units": unit_payloads,
        }
