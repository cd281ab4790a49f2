"""The experiments of a config, prepared once for the request path: allocations, arm ids,
and lookup by matched model or by name."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from abproxy.assignment import Allocation
from abproxy.config import Config, Experiment, Variant


@dataclass(frozen=True, slots=True)
class Arm:
    """A variant as defined now: editing its definition makes a new arm."""

    experiment: str
    variant: str
    definition_hash: str
    definition: Variant
    upstream: str

    @property
    def arm_id(self) -> str:
        return f"{self.variant}@{self.definition_hash}"

    def metadata_json(self) -> str:
        return json.dumps(
            {"variant": self.variant, "hash": self.definition_hash, "definition": self.definition.model_dump()},
            sort_keys=True,
        )


@dataclass(frozen=True)
class ExperimentPlan:
    name: str
    settings: Experiment
    allocation: Allocation
    arms: dict[str, Arm]
    stored_names: dict[str, str] = field(default_factory=dict)
    """``judge.<name>`` → ``judge.<name>@<version>``, the name its scores are counted under in
    Redis: an edited judge's scores are counted apart from the old one's."""

    def stored(self, metric: str) -> str:
        """The name ``metric`` is counted (and its running state kept) under in Redis."""
        return self.stored_names.get(metric, metric)

    def judge_version(self, judge: str) -> str:
        return self.stored(f"judge.{judge}").rpartition("@")[2]

    @property
    def per_unit(self) -> bool:
        """Whether metrics are analysed per unit (users are randomised, not requests)."""
        return self.settings.unit == "user"

    @property
    def per_user_metrics(self) -> tuple[str, ...]:
        """The metrics Redis keeps per-user sums of: every one when users are randomised; for
        ``unit: request``, the primary one alone, for its design effect."""
        return self.settings.metric_names if self.per_unit else (self.settings.primary,)


class Catalog:
    def __init__(self, config: Config):
        self.plans: dict[str, ExperimentPlan] = {}
        self._by_model: dict[str, ExperimentPlan] = {}
        for name, experiment in config.experiments.items():
            arms = {
                variant_name: Arm(
                    experiment=name,
                    variant=variant_name,
                    definition_hash=variant.definition_hash(config.default_upstream),
                    definition=variant,
                    upstream=variant.upstream or config.default_upstream,
                )
                for variant_name, variant in experiment.variants.items()
            }
            weights = {variant_name: variant.weight for variant_name, variant in experiment.variants.items()}
            stored_names = {
                f"judge.{judge_name}": f"judge.{judge_name}@{judge.version(config.default_upstream)}"
                for judge_name, judge in experiment.judges.items()
            }
            plan = ExperimentPlan(name, experiment, Allocation(name, weights), arms, stored_names)
            self.plans[name] = plan
            if experiment.match.model is not None:
                self._by_model[experiment.match.model] = plan

    def by_model(self, model: object) -> ExperimentPlan | None:
        return self._by_model.get(model) if isinstance(model, str) else None
