"""Which requests the LLM judges score: chosen on the request path, in O(1)."""

from __future__ import annotations

from abproxy.assignment import Draw, random_draw
from abproxy.catalog import ExperimentPlan
from abproxy.config import Config
from abproxy.metrics import ProxyMetrics
from abproxy.pacing import Pace


class JudgeSampler:
    """Each judge's ``sample_rate`` of its experiments' requests, thinned to its
    ``max_per_minute`` on this replica (paced: :class:`abproxy.pacing.Pace`, shared by the
    replica's ``processes``)."""

    def __init__(self, config: Config, metrics: ProxyMetrics, processes: int = 1, draw: Draw = random_draw):
        self._draw = draw
        self._purposes = {name: f"judge:{name}" for name in config.judges}
        self._rates = {name: judge.sample_rate for name, judge in config.judges.items()}
        self._paces = {name: Pace(judge.max_per_minute, processes) for name, judge in config.judges.items()}
        self._over_cap = {name: metrics.judge_failures.labels(name, "over_cap") for name in config.judges}

    def choose(self, plan: ExperimentPlan, request: bytes) -> tuple[str, ...]:
        """The judges that score this request (``request``: the body the client sent; empty:
        none does)."""
        return tuple(
            name
            for name in plan.settings.judges
            if self._draw(self._purposes[name], request) < self._rates[name] and self._take(name)
        )

    def _take(self, judge: str) -> bool:
        if self._paces[judge].take():
            return True
        self._over_cap[judge].inc()
        return False
