"""Simulated experiments through the verdict code itself: counters as Redis would hold them at
each look, :func:`abproxy.analysis.analyse.analyse` on them, and the look's state merged as
``scripts.SAVE_STATE_LUA`` merges it (:func:`abproxy.analysis.state.apply`, checked against the
Lua in tests/test_live_state.py). Seeded; vectorised where the data are made, one analysis per
look where the verdict is."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from abproxy.analysis import state
from abproxy.analysis.analyse import Analysis, analyse
from abproxy.catalog import Catalog, ExperimentPlan
from abproxy.config import Config, parse_config
from abproxy.recording.counters import ArmCounters, MetricCounters
from abproxy.stats.histogram import bucket_counts
from abproxy.stats.summary import Moments

SCORE, THUMBS, ERRORS, LATENCY = "feedback.score", "feedback.thumbs", "error_rate", "latency_ms"


def experiment(
    arms: Sequence[str] = ("a", "b"),
    guardrails: Any = (),
    stats: dict[str, Any] | None = None,
    unit: str = "request",
    primary: str = SCORE,
) -> tuple[ExperimentPlan, Config]:
    """One experiment: ``arms[0]`` the control, a continuous ``feedback.score`` and a 0/1
    ``feedback.thumbs``, analysed per request (as the counters below are kept)."""
    config = parse_config(
        {
            "upstreams": {"sim": {"base_url": "http://127.0.0.1:9/v1"}},
            "default_upstream": "sim",
            "stats": stats or {},
            "experiments": {
                "sim": {
                    "unit": unit,
                    "primary_metric": primary,
                    "guardrails": list(guardrails) if not isinstance(guardrails, dict) else guardrails,
                    "feedback": {"score": {"min": -1000, "max": 1000}, "thumbs": {"min": 0, "max": 1}},
                    "variants": {name: {"control": index == 0} for index, name in enumerate(arms)},
                }
            },
        },
        environ={},
    )
    return Catalog(config).plans["sim"], config


@dataclass
class Stream:
    """One metric of one arm over a run's looks: cumulative n, Σy, Σy² at each look (and the
    histogram, for a metric whose tail matters)."""

    n: np.ndarray
    s: np.ndarray
    q: np.ndarray
    hist: list[dict[str, int]] | None = None


def lognormal_stream(rng: np.random.Generator, looks: np.ndarray, median: float, sigma: float) -> Stream:
    """Heavy-tailed durations, with their histogram at each look as Redis keeps it."""
    x = median * rng.lognormal(0.0, sigma, int(looks[-1]))
    at = looks - 1
    return Stream(looks.astype(float), np.cumsum(x)[at], np.cumsum(x * x)[at], [bucket_counts(x[:n]) for n in looks])


def normal_stream(rng: np.random.Generator, looks: np.ndarray, mean: float | Callable[[np.ndarray], np.ndarray], sd: float = 1.0) -> Stream:
    """Normal observations; ``mean`` may depend on the observation's index (an effect that drifts)."""
    total = int(looks[-1])
    index = np.arange(total)
    centre = mean(index) if callable(mean) else np.full(total, float(mean))
    x = centre + sd * rng.standard_normal(total)
    at = looks - 1
    return Stream(looks.astype(float), np.cumsum(x)[at], np.cumsum(x * x)[at])


def binary_stream(rng: np.random.Generator, looks: np.ndarray, rate: float | Callable[[np.ndarray], np.ndarray]) -> Stream:
    """0/1 observations at ``rate`` (cumulative counts drawn batch by batch); ``rate`` may depend
    on the observation's index (a rate that changes)."""
    if callable(rate):
        x = (rng.random(int(looks[-1])) < rate(np.arange(int(looks[-1])))).astype(float)
        ones = np.cumsum(x)[looks - 1]
        return Stream(looks.astype(float), ones, ones)
    batches = np.diff(np.concatenate([[0], looks]))
    ones = np.cumsum(rng.binomial(batches, rate)).astype(float)
    return Stream(looks.astype(float), ones, ones)


def counters_at(plan: ExperimentPlan, streams: dict[str, dict[str, Stream]], look: int) -> dict[str, ArmCounters]:
    counters = {}
    for name, arm in plan.arms.items():
        metrics = {
            metric: MetricCounters(
                Moments(float(stream.n[look]), float(stream.s[look]), float(stream.q[look])),
                stream.hist[look] if stream.hist is not None else {},
            )
            for metric, stream in streams[name].items()
        }
        requests = int(max(stream.n[look] for stream in streams[name].values()))
        counters[arm.arm_id] = ArmCounters(arm.arm_id, requests=requests, units=requests, metrics=metrics)
    return counters


@dataclass
class Run:
    """What a run showed at each look."""

    statuses: list[str] = field(default_factory=list)
    winners: list[str | None] = field(default_factory=list)
    warnings: list[tuple[str, ...]] = field(default_factory=list)
    analyses: list[Analysis] = field(default_factory=list)

    def first(self, status: str) -> int | None:
        return next((i for i, s in enumerate(self.statuses) if s == status), None)

    @property
    def ever_winner(self) -> bool:
        return any(w is not None for w in self.winners)

    @property
    def name_changes(self) -> int:
        named = [w for w in self.winners if w is not None]
        return sum(1 for a, b in itertools.pairwise(named) if a != b)

    @property
    def lost_winner(self) -> bool:
        """A winner at one look, and no winner (or another) at a later one."""
        first = next((i for i, w in enumerate(self.winners) if w is not None), None)
        return first is not None and any(w != self.winners[first] for w in self.winners[first:])


def replay(
    plan: ExperimentPlan,
    config: Config,
    streams: dict[str, dict[str, Stream]],
    save_every: int | None = 1,
    keep: bool = False,
    stop: Callable[[Analysis], bool] | None = None,
) -> Run:
    """Look at every point of the streams, keeping the state every ``save_every`` looks (every
    look, as abproxy does now; None: never) and stopping early when ``stop`` says so."""
    kept = state.KeptState()
    run = Run()
    looks = len(next(iter(next(iter(streams.values())).values())).n)
    for look in range(looks):
        analysis = analyse(plan, config, counters_at(plan, streams, look), kept)
        if save_every is not None and look % save_every == 0:
            kept = state.apply(kept, analysis.update)
        verdict = analysis.verdict
        run.statuses.append(verdict.status)
        run.winners.append(verdict.winner)
        run.warnings.append(analysis.warnings)
        if keep:
            run.analyses.append(analysis)
        if stop is not None and stop(analysis):
            break
    return run


def runs(count: int, seed: int, make: Callable[[np.random.Generator], dict[str, dict[str, Stream]]], **replay_options: Any) -> Iterator[Run]:
    plan, config = replay_options.pop("experiment")
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        yield replay(plan, config, make(rng), **replay_options)


def fixed_horizon_per_arm(variance_sum: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """n per arm of a two-sided fixed-horizon z-test: (z₁₋α/₂ + z_power)² (σ²_c + σ²_t) / δ²."""
    from scipy import stats

    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return z * z * variance_sum / effect**2


def share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan
