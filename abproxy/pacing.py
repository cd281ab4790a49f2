"""Work paced evenly over the minute: at most ``per_minute`` in any 60 seconds, and never a
minute's worth at once. A sliding window would let a saturated replica spend its whole minute
in the first second (600 traces in a burst, a visible dip in throughput); a token bucket of
``per_minute``/60 per second with a burst of one second's worth spreads it."""

from __future__ import annotations

import time
from collections.abc import Callable

_NS_PER_MINUTE = 60_000_000_000


class Pace:
    """A token bucket that holds its cap exactly: it starts with ``burst`` tokens and refills
    ``per_minute - burst`` tokens a minute, so no 60 s window takes more than ``per_minute``
    (``burst`` at its start, the refill within it). Kept in integers (one token is
    60·10⁹·``processes`` units, the refill ``per_minute - burst`` units per nanosecond), so no
    rounding lets a token in early.

    ``processes`` share the cap (the workers of one replica, ``abproxy serve --workers``): each
    holds its own ``burst`` and refills its share of the rest, so together they stay within it."""

    def __init__(self, per_minute: int, processes: int = 1, clock_ns: Callable[[], int] = time.monotonic_ns):
        self._clock_ns = clock_ns
        self.burst = max(1, per_minute // 60 // processes) if per_minute > 0 else 0
        bursts = self.burst * processes
        # A cap no larger than the bursts (1 a minute, say) refills whole: exact over half-open windows.
        self._refill = per_minute - bursts if per_minute > bursts else per_minute
        self._token = _NS_PER_MINUTE * processes
        self._capacity = self.burst * self._token
        self._level = self._capacity
        self._at = clock_ns()

    def take(self) -> bool:
        """Whether one more may go now (and count it)."""
        if not self._capacity:
            return False
        now = self._clock_ns()
        self._level = min(self._capacity, self._level + (now - self._at) * self._refill)
        self._at = now
        if self._level < self._token:
            return False
        self._level -= self._token
        return True
