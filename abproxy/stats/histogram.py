"""A mergeable log-bucketed histogram (DDSketch-style): quantiles within ~1% relative error.

A value ``x > 0`` falls in bucket ``ceil(log(x) / log(GAMMA))`` (key ``"<index>"``, an index that
is negative below 1); zero has its own bucket and a negative value ``-x`` has key ``"n<index>"``. Bucket counts from any number of replicas simply add.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(GAMMA)
ZERO_BUCKET = "z"


def bucket_of(value: float) -> str:
    """The bucket key for ``value``; stable across processes and versions."""
    if value == 0 or not math.isfinite(value):
        return ZERO_BUCKET
    index = math.ceil(math.log(abs(value)) / _LOG_GAMMA)
    return str(index) if value > 0 else f"n{index}"


def bucket_value(key: str) -> float:
    """The representative value of a bucket: within RELATIVE_ACCURACY of every value in it."""
    if key == ZERO_BUCKET:
        return 0.0
    negative = key.startswith("n")
    index = int(key[1:] if negative else key)
    value = 2 * GAMMA**index / (GAMMA + 1)
    return -value if negative else value


def quantiles(counts: Mapping[str, int], qs: Iterable[float]) -> list[float | None]:
    """Quantiles (0..1) of a histogram given as ``{bucket key: count}``; None when empty."""
    points = sorted((bucket_value(key), count) for key, count in counts.items() if count > 0)
    total = sum(count for _, count in points)
    if total == 0:
        return [None for _ in qs]
    results: list[float | None] = []
    for q in qs:
        rank = q * (total - 1)
        seen = 0
        for value, count in points:
            seen += count
            if seen > rank:
                results.append(value)
                break
    return results


def capped_moments(counts: Mapping[str, int], cap: float) -> tuple[float, float, float]:
    """n, mean and sample variance of the histogram's values with each counted at most ``cap``
    (winsorised from above), every value taken as its bucket's representative (within 1%)."""
    n = total = 0.0
    points = []
    for key, count in counts.items():
        if count > 0:
            value = min(bucket_value(key), cap)
            points.append((value, count))
            n += count
            total += value * count
    if n < 2:
        return n, math.nan, math.nan
    mean = total / n
    variance = sum(count * (value - mean) ** 2 for value, count in points) / (n - 1)
    return n, mean, variance


def bucket_counts(values: np.ndarray) -> dict[str, int]:
    """``{bucket key: count}`` for many values at once (the vectorised :func:`bucket_of`)."""
    import numpy as np

    counts: dict[str, int] = {}
    finite = np.isfinite(values)
    zero = (values == 0) | ~finite
    if zero.any():
        counts[ZERO_BUCKET] = int(zero.sum())
    for sign, selected in ((1, values > 0), (-1, values < 0)):
        chosen = values[selected & finite]
        if chosen.size == 0:
            continue
        indexes, how_many = np.unique(np.ceil(np.log(np.abs(chosen)) / _LOG_GAMMA).astype(np.int64), return_counts=True)
        prefix = "" if sign > 0 else "n"
        for index, count in zip(indexes.tolist(), how_many.tolist(), strict=True):
            counts[f"{prefix}{index}"] = count
    return counts
