"""Sufficient statistics of one metric and what follows from them alone."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Moments:
    """n, sum and sum of squares of a sample: enough for its mean and variance."""

    n: float = 0
    total: float = 0.0
    total_squares: float = 0.0

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n > 0 else None

    @property
    def variance(self) -> float | None:
        """Sample variance (n - 1 denominator), clamped at zero against rounding."""
        if self.n < 2:
            return None
        return max(0.0, (self.total_squares - self.total * self.total / self.n) / (self.n - 1))

    @property
    def std_error(self) -> float | None:
        variance = self.variance
        return math.sqrt(variance / self.n) if variance is not None else None

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.total + other.total, self.total_squares + other.total_squares)

