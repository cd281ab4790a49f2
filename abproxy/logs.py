"""Warnings about a condition that lasts: said at once, then at most once per interval, with how
many were held back, so that a fault hit by every request or batch neither floods the log nor
goes unsaid."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable


class ThrottledLog:
    def __init__(self, logger: logging.Logger, every_s: float, clock: Callable[[], float] = time.monotonic):
        self._logger = logger
        self._every_s = every_s
        self._clock = clock
        self._last: dict[Hashable, tuple[float, int]] = {}
        """Per condition: when it was last logged, and how many times it was held back since."""

    def warning(self, condition: Hashable, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``condition`` was logged less than the interval ago (a
        warning within the interval that is held back ends no sooner, so a lasting condition is
        logged once per interval); True when it was logged."""
        now = self._clock()
        last = self._last.get(condition)
        if last is not None and now - last[0] < self._every_s:
            self._last[condition] = (last[0], last[1] + 1)
            return False
        self._last[condition] = (now, 0)
        if last is not None and last[1]:
            message = f"{message}; {last[1]} more like it since the last warning"
        self._logger.warning(message, *args)
        return True
