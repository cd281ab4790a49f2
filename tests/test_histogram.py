import random

import numpy as np
import pytest

from abproxy.stats.histogram import RELATIVE_ACCURACY, bucket_of, bucket_value, quantiles


@pytest.mark.parametrize("value", [1e-7, 0.003, 0.5, 1.0, 7.0, 640.2, 1e6, -3.5, -0.01])
def test_bucket_value_is_within_the_relative_accuracy(value):
    assert abs(bucket_value(bucket_of(value)) - value) <= RELATIVE_ACCURACY * abs(value) * 1.0000001


def test_zero_has_its_own_bucket():
    assert bucket_of(0.0) == "z" and bucket_value("z") == 0.0


def test_quantiles_match_numpy_within_accuracy_and_merge_by_adding_counts():
    rng = random.Random(7)
    values = [rng.lognormvariate(6, 0.6) for _ in range(20_000)]
    first, second = {}, {}
    for index, value in enumerate(values):
        target = first if index % 2 else second
        key = bucket_of(value)
        target[key] = target.get(key, 0) + 1
    merged = {key: first.get(key, 0) + second.get(key, 0) for key in first.keys() | second.keys()}
    p50, p95, p99 = quantiles(merged, (0.5, 0.95, 0.99))
    for estimate, q in ((p50, 50), (p95, 95), (p99, 99)):
        exact = np.percentile(values, q)
        assert abs(estimate - exact) / exact < 0.02


def test_empty_histogram_has_no_quantiles():
    assert quantiles({}, (0.5,)) == [None]
