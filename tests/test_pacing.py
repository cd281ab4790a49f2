"""The per-minute caps of traces and judges (abproxy.pacing.Pace): exact over any 60 s, and
spread over the minute rather than spent at once."""

from __future__ import annotations

import random

import pytest

from abproxy.pacing import Pace

SECOND = 1_000_000_000


def taken_at(per_minute: int, arrivals_ns: list[int]) -> list[int]:
    now = [0]
    pace = Pace(per_minute, clock_ns=lambda: now[0])
    taken = []
    for at in arrivals_ns:
        now[0] = at
        if pace.take():
            taken.append(at)
    return taken


def most_in_any_window(taken: list[int], window_ns: int) -> int:
    """The most takes in any half-open window [t, t + window) (the busiest starts at a take):
    ``taken`` is in time order, so two pointers walk it once."""
    most, end = 0, 0
    for start, at in enumerate(taken):
        while end < len(taken) and taken[end] < at + window_ns:
            end += 1
        most = max(most, end - start)
    return most


@pytest.mark.parametrize("per_minute", [1, 2, 5, 59, 60, 61, 600, 6000])
def test_no_60_second_window_takes_more_than_the_cap(per_minute: int) -> None:
    rng = random.Random(per_minute)
    saturated = list(range(0, 300 * SECOND, SECOND // 100))  # 100 a second for 5 minutes
    bursty = sorted(rng.randrange(0, 300 * SECOND) for _ in range(20_000))
    for arrivals in (saturated, bursty):
        taken = taken_at(per_minute, arrivals)
        assert most_in_any_window(taken, 60 * SECOND) <= per_minute
        # and the cap is used: over 5 saturated minutes nearly all of it
        if arrivals is saturated:
            assert len(taken) >= 0.98 * 5 * (per_minute - Pace(per_minute).burst)


def test_a_saturated_minute_is_spread_not_spent_at_once() -> None:
    """600 a minute at 100 arrivals a second: about 10 a second in every 5 s, not 600 at first."""
    taken = taken_at(600, list(range(0, 60 * SECOND, SECOND // 100)))
    assert taken[:10] == [i * (SECOND // 100) for i in range(10)], "a burst of one second's worth at once"
    assert most_in_any_window(taken, 5 * SECOND) <= 10 + 5 * 10
    assert len(taken) >= 590


def test_a_cap_of_zero_takes_nothing() -> None:
    assert taken_at(0, list(range(0, 120 * SECOND, SECOND))) == []


@pytest.mark.parametrize(("per_minute", "processes"), [(60, 4), (600, 3), (7, 2), (6000, 8)])
def test_the_workers_of_one_replica_share_its_cap(per_minute: int, processes: int) -> None:
    """``abproxy serve --workers N``: N processes, each its own bucket, all within the one cap."""
    now = [0]
    paces = [Pace(per_minute, processes, clock_ns=lambda: now[0]) for _ in range(processes)]
    rng = random.Random(processes)
    taken = []
    for at in range(0, 300 * SECOND, SECOND // 200):  # 200 arrivals a second, spread over the workers
        now[0] = at
        if paces[rng.randrange(processes)].take():
            taken.append(at)
    assert most_in_any_window(taken, 60 * SECOND) <= per_minute
    assert len(taken) >= 0.9 * 5 * (per_minute - processes * paces[0].burst)
