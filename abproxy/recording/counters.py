"""An arm's counters as read back from Redis, parsed: pure, so that the statistics and their
tests need no Redis client (the layout: keys.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from abproxy.stats.summary import Moments


@dataclass(slots=True)
class MetricCounters:
    """One metric of one arm as read back from Redis."""

    moments: Moments = Moments()
    histogram: dict[str, int] = field(default_factory=dict)
    units: int = 0
    unit_yy: float = 0.0
    """Σ Y_u², with Y_u about ``moments.shift``; likewise the other two."""
    unit_nn: float = 0.0
    unit_yn: float = 0.0
    corrupt: bool = False
    """Some counter of it is not a finite number: nothing may be concluded from it."""


@dataclass(slots=True)
class ArmCounters:
    arm: str
    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    units: int = 0
    metrics: dict[str, MetricCounters] = field(default_factory=dict)
    corrupt: list[str] = field(default_factory=list)
    """Every counter of the arm that is not a finite number (``requests``, ``latency_ms|q``, …)."""
    unreadable: list[str] = field(default_factory=list)
    """Keys of the arm that Redis could not read as hashes (a key of another type), with why:
    nothing of the arm can be trusted."""


def _finite(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_arm(
    arm: str, stats: dict[str, str], hist: dict[str, str], stored_names: Mapping[str, str] | None = None
) -> ArmCounters:
    """The counters of one arm; a counter that is not a finite number, or a count that is no
    integer (a hand edit, a bug), is listed in ``corrupt`` and counts as 0, and its metric is
    marked corrupt. ``stored_names`` maps a metric to the name Redis counts it under (a judge's
    carries its version): those are read under the metric's name, other versions' are left out."""
    renamed = {stored: metric for metric, stored in (stored_names or {}).items()}
    corrupt: list[str] = []

    def count(name: str) -> int:
        value = _finite(stats.get(name, "0"))
        if value is None or not value.is_integer():
            corrupt.append(name)
            return 0
        return int(value)

    counters = ArmCounters(
        arm=arm, requests=count("requests"), errors=count("errors"), cancelled=count("cancelled"), units=count("units")
    )
    raw: dict[str, dict[str, Any]] = {}
    for key, value in stats.items():
        metric, sep, part = key.rpartition("|")
        if sep:
            parts = raw.setdefault(metric, {})
            number = _finite(value)
            if number is None:
                corrupt.append(key)
                parts["corrupt"] = True
            else:
                parts[part] = number
    for key, value in hist.items():
        metric, sep, bucket = key.partition("|")
        if not sep:
            continue
        number = _finite(value)
        if number is None or not number.is_integer():
            corrupt.append(f"{metric}|h:{bucket}")
            raw.setdefault(metric, {})["corrupt"] = True
        elif number != 0:
            raw.setdefault(metric, {}).setdefault("hist", {})[bucket] = int(number)
    for stored, parts in raw.items():
        metric = renamed.get(stored, stored)
        if "@" in metric:
            continue  # a judge's earlier version: not comparable with the current one's scores
        shift = parts.get("k", 0.0)
        total = parts.get("t", 0.0) if shift != 0 else parts.get("s", 0.0)
        counters.metrics[metric] = MetricCounters(
            moments=Moments(parts.get("n", 0.0), total, parts.get("q", 0.0), shift),
            histogram=parts.get("hist", {}),
            units=int(parts.get("uk", 0)),
            unit_yy=parts.get("uyy", 0.0),
            unit_nn=parts.get("unn", 0.0),
            unit_yn=parts.get("uyn", 0.0),
            corrupt=bool(parts.get("corrupt")),
        )
    counters.corrupt = corrupt
    return counters

