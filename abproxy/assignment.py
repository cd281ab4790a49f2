"""Deterministic assignment of a unit to a variant: the same unit gets the same variant on
every replica, with no lookup and no shared state."""

from __future__ import annotations

import bisect
import functools
import hashlib
import random
from collections.abc import Callable, Mapping

CACHED_UNITS = 65_536

Draw = Callable[[str, bytes], float]
"""A number in [0, 1) for one of a request's random choices — ``purpose`` names which
(``variant`` for a unit of one request, ``trace``, ``judge:<name>``) — given the body the
client sent."""


def random_draw(purpose: str, request: bytes) -> float:
    """Every choice an independent random draw: what a proxy in production makes."""
    return random.random()


def seeded_draw(seed: int) -> Draw:
    """Each choice a keyed hash of the request's body: the same requests get the same choices on
    every run, in whatever order they arrive (``abproxy demo --seed``). Requests that should be
    told apart must differ in body (the demo's carry their number in ``metadata``)."""
    key = hashlib.sha256(f"abproxy-seed-{seed}".encode()).digest()

    def draw(purpose: str, request: bytes) -> float:
        digest = hashlib.blake2b(purpose.encode() + b"\x00" + request, key=key, digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    return draw


def unit_position(experiment: str, unit_id: str) -> float:
    """A uniform position in [0, 1) from the experiment name and unit id."""
    digest = hashlib.sha256(f"{experiment}\x00{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Allocation:
    """Variants of one experiment laid out over [0, 1) in proportion to their weights."""

    def __init__(self, experiment: str, weights: Mapping[str, float]):
        self.experiment = experiment
        live = [(name, weight) for name, weight in weights.items() if weight > 0]
        total = sum(weight for _, weight in live)
        if total <= 0:
            raise ValueError("at least one variant needs a positive weight")
        self._names = [name for name, _ in live]
        self._upper_bounds: list[float] = []
        running = 0.0
        for _, weight in live:
            running += weight / total
            self._upper_bounds.append(running)
        self._upper_bounds[-1] = 1.0
        # Users come back: remember recent ones rather than hash them again.
        self._cached_choose = functools.lru_cache(maxsize=CACHED_UNITS)(self._choose)

    def _choose(self, unit_id: str) -> str:
        return self.choose_at(unit_position(self.experiment, unit_id))

    def choose(self, unit_id: str) -> str:
        return self._cached_choose(unit_id)

    def choose_at(self, position: float) -> str:
        """The variant at a position drawn by the caller (for units of one request)."""
        return self._names[bisect.bisect_right(self._upper_bounds, position)]
