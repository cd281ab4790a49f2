from collections import Counter

import pytest
from scipy import stats

from abproxy.assignment import Allocation, unit_position


def test_assignment_is_deterministic_and_sticky():
    allocation = Allocation("translation", {"a": 1, "b": 1})
    again = Allocation("translation", {"a": 1, "b": 1})
    for user in (f"user-{i}" for i in range(200)):
        assert allocation.choose(user) == allocation.choose(user) == again.choose(user)


def test_positions_are_stable_across_processes():
    # A fixed value: replicas, restarts and Python versions must all agree.
    # sha256(b"translation\x00alice"), first 8 bytes big-endian over 2**64.
    assert unit_position("translation", "alice") == 0.06925767715808674
    assert unit_position("translation", "alice") != unit_position("sentiment", "alice")


def test_shares_follow_the_weights():
    allocation = Allocation("exp", {"a": 1, "b": 2, "c": 1})
    counts = Counter(allocation.choose(f"u{i}") for i in range(40_000))
    observed = [counts["a"], counts["b"], counts["c"]]
    expected = [10_000, 20_000, 10_000]
    assert stats.chisquare(observed, expected).pvalue > 0.001


def test_zero_weight_gets_no_new_traffic():
    allocation = Allocation("exp", {"old": 0, "a": 1, "b": 1})
    assert "old" not in {allocation.choose(f"u{i}") for i in range(5_000)}


def test_all_zero_weights_are_rejected():
    with pytest.raises(ValueError):
        Allocation("exp", {"a": 0, "b": 0})
