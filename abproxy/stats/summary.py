"""Sufficient statistics of one metric and what follows from them alone."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Moments:
    """n, and the sum and sum of squares of a sample taken about ``shift``: enough for its mean
    and variance.

    Sums of squares about 0 lose every digit of the variance once the mean dwarfs the spread
    (values around 1e12 ± 1: Σx² − (Σx)²/n subtracts two numbers of 1e28 to find one of 1e4).
    About a shift close to the mean they do not (Chan, Golub & LeVeque, "Algorithms for
    computing the sample variance", The American Statistician 1983): Redis keeps them so, with
    the shift of each arm and metric fixed by its first batch."""

    n: float = 0
    total: float = 0.0
    """Σ (x − shift)."""
    total_squares: float = 0.0
    """Σ (x − shift)²."""
    shift: float = 0.0

    @property
    def sum(self) -> float:
        """Σ x."""
        return self.total + self.n * self.shift

    @property
    def mean(self) -> float | None:
        return self.shift + self.total / self.n if self.n > 0 else None

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

    def about(self, shift: float) -> Moments:
        """The same sample with its sums taken about another shift."""
        move = self.shift - shift
        return Moments(
            self.n,
            self.total + self.n * move,
            self.total_squares + 2 * move * self.total + self.n * move * move,
            shift,
        )

    def __add__(self, other: Moments) -> Moments:
        other = other.about(self.shift)
        return Moments(self.n + other.n, self.total + other.total, self.total_squares + other.total_squares, self.shift)

    def __sub__(self, earlier: Moments) -> Moments:
        """What was added since ``earlier`` (the same sample when it was smaller): the sums are
        additive, so the difference is the later observations' own moments."""
        earlier = earlier.about(self.shift)
        return Moments(
            self.n - earlier.n, self.total - earlier.total, self.total_squares - earlier.total_squares, self.shift
        )
