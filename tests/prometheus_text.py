"""Reading the proxy's /metrics exposition in tests."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def metrics_text(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def sample(text: str, metric: str, **labels: str) -> float:
    """The value of the one sample named ``metric`` whose labels include ``labels`` (0.0 when the
    series does not exist)."""
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(values) <= 1, (metric, labels, values)
    return values[0] if values else 0.0
