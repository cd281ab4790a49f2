from collections import Counter

import pytest
from scipy import stats

from abproxy.assignment import Allocation, seeded_draw, unit_position


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


def test_a_seeded_draw_replays_each_requests_choices_in_any_order_and_keeps_them_apart():
    """The demo's draws: the same request gets the same choices whatever order requests arrive
    in; each purpose draws independently, uniformly, and another seed draws anew."""
    draw = seeded_draw(7)
    bodies = [f'{{"metadata": {{"demo_request": "{i}"}}}}'.encode() for i in range(20_000)]
    variant = [draw("variant", body) for body in bodies]
    assert variant == [seeded_draw(7)("variant", body) for body in reversed(bodies)][::-1]
    assert stats.kstest(variant, "uniform").pvalue > 0.001
    judged = [draw("judge:helpfulness", body) for body in bodies]
    assert abs(stats.pearsonr(variant, judged).statistic) < 0.03  # |r| < 0.03 is 4 standard errors
    reseeded = [seeded_draw(8)("variant", body) for body in bodies]
    assert abs(stats.pearsonr(variant, reseeded).statistic) < 0.03
