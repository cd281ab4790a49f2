"""The seed scenario (``scenario.yaml``, shipped with the package): the experiments abproxy ships
with, and how the demo's simulated users and provider behave."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml


@dataclass(frozen=True)
class Task:
    experiment: str
    weight: float
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Rating:
    """How users rate one experiment's answers: a 1–5 score around a mean per variant, or right
    or wrong with a rate per variant."""

    metric: str
    means: dict[str, float]
    rates: dict[str, float]
    spread: float

    def score(self, variant: str, rng: random.Random) -> float:
        if self.rates:
            return 1.0 if rng.random() < self.rates[variant] else 0.0
        return float(min(5, max(1, round(rng.gauss(self.means[variant], self.spread)))))


@dataclass(frozen=True)
class ProviderManners:
    model_latency_ms: dict[str, float]
    default_latency_ms: float
    per_prompt_char_ms: float
    chunk_delay_ms: float
    error_rate: float


@dataclass(frozen=True)
class Scenario:
    experiments: dict[str, Any]
    """In the config's shape (``experiments:`` of abproxy.yaml)."""
    prices: dict[str, Any]
    judges: dict[str, Any]
    """In the config's shape (``judges:``): the simulated judge model scores the answers."""
    tasks: tuple[Task, ...]
    ratings: dict[str, Rating]
    rated_share: float
    streamed_share: float
    provider: ProviderManners

    def pick_task(self, rng: random.Random) -> tuple[str, str]:
        task = rng.choices(self.tasks, weights=[t.weight for t in self.tasks])[0]
        return task.experiment, rng.choice(task.texts)


def raw_scenario() -> dict[str, Any]:
    return yaml.safe_load(resources.files("abproxy.simulation").joinpath("scenario.yaml").read_text(encoding="utf-8"))


@cache
def seed_scenario() -> Scenario:
    raw = raw_scenario()
    simulation = raw["simulation"]
    tasks = tuple(Task(name, float(t["weight"]), tuple(t["texts"])) for name, t in simulation["tasks"].items())
    ratings = {
        name: Rating(r["metric"], r.get("means", {}), r.get("rates", {}), float(r.get("spread", 0.0)))
        for name, r in simulation["ratings"].items()
    }
    return Scenario(
        experiments=raw["experiments"],
        prices=raw["prices"],
        judges=raw.get("judges", {}),
        tasks=tasks,
        ratings=ratings,
        rated_share=float(simulation["rated_share"]),
        streamed_share=float(simulation["streamed_share"]),
        provider=ProviderManners(**simulation["provider"]),
    )
