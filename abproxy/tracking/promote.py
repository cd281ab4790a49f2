"""``abproxy promote``: close an experiment on one of its arms (docs/mlflow.md, "Promote").

Every arm's prompt is a version of the registry prompt named after the experiment (registered by
the flusher, :mod:`abproxy.tracking.registry`); promote points ``alias`` at the chosen arm's
version — the same version each time, never a copy — and tags it with the verdict, so an app that
loads ``prompts:/<experiment>@<alias>`` gets it. Then a key in Redis makes every replica serve it
to all of the experiment's new traffic (see :mod:`abproxy.proxy.overrides`); those requests are
counted in Prometheus but kept out of the statistics.

``undo`` removes the key, and puts each alias the promotion moved back on the version it had
before (or removes it): where that was is kept in Redis before the alias first moves.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from abproxy.analysis.live import experiment_results
from abproxy.analysis.report import notes
from abproxy.catalog import ExperimentPlan
from abproxy.config import Config
from abproxy.errors import Conflict, DomainError, MlflowUnavailable, NotFound
from abproxy.recording import layout, store
from abproxy.stats.results import ExperimentResult
from abproxy.tracking import registry

DEFAULT_ALIAS = "production"
CAUTIONS = ("effect_faded",)
"""Warnings promote repeats when it ships the winner they are about."""


@dataclass(frozen=True)
class Promotion:
    experiment: str
    variant: str
    alias: str
    version: int
    prompt_uri: str
    """``prompts:/<experiment>@<alias>``: what an app loads to get the promoted prompt."""
    cautions: tuple[str, ...] = ()
    """What the verdict warns of that a user should read before shipping (``effect_faded``)."""
    manual: bool = False
    """Promoted by hand: not the declared winner (tagged ``abproxy.status: manual``)."""
    winner: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "promoted": self.variant,
            "alias": self.alias,
            "version": self.version,
            "prompt_uri": self.prompt_uri,
            "status": "manual" if self.manual else "winner",
            "cautions": list(self.cautions),
        }

    @property
    def warning(self) -> str | None:
        if not self.manual:
            return None
        why = f"the declared winner is {self.winner}" if self.winner else "the experiment has declared no winner"
        return f"{self.variant} is not the winner ({why}): promoted by hand, tagged abproxy.status=manual"


def verdict_tags(result: ExperimentResult, variant: str, manual: bool) -> dict[str, str]:
    """What the verdict said of ``variant`` when it was promoted, as its version's tags."""
    chosen = result.variant(variant)
    main = chosen.metric(result.primary_metric)
    tags = {
        "abproxy.status": "manual" if manual else "winner",
        "abproxy.experiment_status": result.status,
        "abproxy.winner": result.winner or "none",
        "abproxy.primary_metric": result.primary_metric,
        "abproxy.requests": str(chosen.requests),
    }
    p_value = main.adjusted_p_value if main.adjusted_p_value is not None else main.p_value
    for name, value in (("mean", main.mean), ("lift", main.lift), ("p_value", p_value)):
        if value is not None:
            tags[f"abproxy.{name}"] = f"{value:.6g}"
    return tags


@dataclass(frozen=True)
class Undone:
    experiment: str
    aliases: dict[str, int | None]
    """Each alias the promotion had moved, and the version it is back on (None: removed)."""
    problem: str | None = None
    """Why the aliases could not be put back (MLflow away): a later undo tries again."""

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "experiment": self.experiment,
            "promoted": None,
            "aliases": self.aliases,
            "aliases_restored": self.problem is None,
        }
        if self.problem is not None:
            body["problem"] = self.problem
        return body

    def lines(self) -> list[str]:
        said = []
        for alias, version in self.aliases.items():
            where = f"back on version {version}" if version is not None else "removed (it pointed at no version before)"
            said.append(f"alias {alias}: {where}")
        return said


def _client(config: Config) -> Any:
    from mlflow.tracking import MlflowClient

    uri = config.mlflow.tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias_before(config: Config, plan: ExperimentPlan, alias: str) -> int | None:
    return registry.alias_version(_client(config), plan.name, alias)


def _point_alias(config: Config, plan: ExperimentPlan, variant: str, alias: str, tags: dict[str, str]) -> int:
    """The alias onto the arm's version (registered now if no flush has yet), its verdict tagged."""
    client = _client(config)
    experiment = client.get_experiment_by_name(plan.settings.mlflow_experiment or plan.name)
    prompt = registry.arm_version(client, plan, plan.arms[variant], experiment.experiment_id if experiment else None)
    for key, value in tags.items():
        client.set_prompt_version_tag(plan.name, str(prompt.version), key, value)
    client.set_prompt_alias(plan.name, alias, prompt.version)
    return prompt.version


def _restore_aliases(config: Config, plan: ExperimentPlan, before: dict[str, int | None]) -> None:
    client = _client(config)
    for alias, version in before.items():
        if version is not None:
            client.set_prompt_alias(plan.name, alias, version)
        elif registry.alias_version(client, plan.name, alias) is not None:
            client.delete_prompt_alias(plan.name, alias)


async def promote(
    redis: Any, config: Config, plan: ExperimentPlan, variant: str | None = None, alias: str = DEFAULT_ALIAS
) -> Promotion:
    """Point ``alias`` at ``variant``'s registry version (default: the declared winner's) and
    serve it to all new traffic. A variant that is not the winner is promoted by hand: tagged
    ``abproxy.status: manual``, and said so."""
    result = await experiment_results(redis, config, plan)
    chosen = variant or (result.winner if result.status == "winner" else None)
    if chosen is None and result.revoked is not None:
        raise Conflict(
            f"experiment {plan.name!r}: the winner {result.revoked.variant!r} was revoked ({result.revoked.reason} "
            "failed after it was declared); name a variant to promote one anyway",
            "winner_revoked",
        )
    if chosen is None:
        raise Conflict(
            f"experiment {plan.name!r} has no winner yet (status {result.status}); name the variant to promote",
            "no_winner",
        )
    if chosen not in plan.arms:
        raise NotFound(f"experiment {plan.name!r} has no variant {chosen!r}", "variant_not_found")
    manual = not (result.status == "winner" and chosen == result.winner)
    try:
        before = await asyncio.to_thread(_alias_before, config, plan, alias)
        with store.reachable():
            # Before the alias moves: where it was, the first time this promotion moved it.
            await redis.hsetnx(layout.aliases_before_key(plan.name), alias, "" if before is None else str(before))
        version = await asyncio.to_thread(_point_alias, config, plan, chosen, alias, verdict_tags(result, chosen, manual))
    except DomainError:
        raise
    except Exception as error:
        raise MlflowUnavailable(f"pointing the alias in MLflow's Prompt Registry failed: {type(error).__name__}: {error}") from error
    with store.reachable():
        await redis.set(layout.promoted_key(plan.name), chosen)
    cautions = tuple(line for line in notes(result) if line.startswith(CAUTIONS)) if not manual else ()
    return Promotion(plan.name, chosen, alias, version, f"prompts:/{plan.name}@{alias}", cautions, manual, result.winner)


async def undo(redis: Any, config: Config, plan: ExperimentPlan) -> Undone:
    """Back to the experiment: new traffic is assigned over the weights again, at once; then each
    alias the promotion moved goes back where it was (or is removed if it pointed nowhere)."""
    with store.reachable():
        await redis.delete(layout.promoted_key(plan.name))
        saved = await redis.hgetall(layout.aliases_before_key(plan.name))
    before = {_text(alias): (int(_text(v)) if _text(v) else None) for alias, v in saved.items()}
    if not before:
        return Undone(plan.name, {})
    try:
        await asyncio.to_thread(_restore_aliases, config, plan, before)
    except Exception as error:  # the traffic is back on the experiment; the aliases wait for a retry
        return Undone(plan.name, before, f"the aliases could not be put back ({type(error).__name__}: {error}); run the undo again")
    with store.reachable():
        await redis.delete(layout.aliases_before_key(plan.name))
    return Undone(plan.name, before)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
