"""``abproxy promote``: close an experiment on its winner (SPEC §4b).

The variant is registered in MLflow's Prompt Registry as a new version of the prompt named after
the experiment (its prompt as the template, its model and params as the model config, the
verdict's numbers as tags), with ``alias`` pointing at it, so an app that loads
``prompts:/<experiment>@<alias>`` gets it. Then a key in Redis makes every replica serve it to
all of the experiment's new traffic (see :mod:`abproxy.proxy.overrides`); those requests are
counted in Prometheus but kept out of the statistics. ``undo`` removes the key.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from abproxy.analysis.live import experiment_results
from abproxy.analysis.report import notes
from abproxy.catalog import Arm, ExperimentPlan
from abproxy.config import Config
from abproxy.errors import Conflict, MlflowUnavailable, NotFound
from abproxy.recording import layout, store
from abproxy.stats.results import ExperimentResult

DEFAULT_ALIAS = "production"
CAUTIONS = ("effect_faded",)
"""Warnings promote repeats when it ships the winner they are about."""
_MODEL_CONFIG_FIELDS = ("temperature", "max_tokens", "top_p", "top_k", "frequency_penalty", "presence_penalty")


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

    def as_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "promoted": self.variant,
            "alias": self.alias,
            "version": self.version,
            "prompt_uri": self.prompt_uri,
            "cautions": list(self.cautions),
        }


def prompt_template(arm: Arm) -> str | list[dict[str, str]]:
    """The variant's prompt as a registry template: its chat template, else its system prompt and
    user template as messages (``{{input}}`` and variables keep their ``{{name}}`` form)."""
    definition = arm.definition
    if definition.chat_template is not None:
        return [{"role": m.role, "content": m.content} for m in definition.chat_template]
    messages = []
    if definition.system_prompt is not None:
        messages.append({"role": "system", "content": definition.system_prompt})
    messages.append({"role": "user", "content": definition.user_template or "{{input}}"})
    return messages


def model_config(arm: Arm) -> dict[str, Any]:
    params = dict(arm.definition.params)
    config: dict[str, Any] = {"model_name": arm.definition.model} if arm.definition.model else {}
    for name in _MODEL_CONFIG_FIELDS:
        if name in params:
            config[name] = params.pop(name)
    if "stop" in params:
        stop = params.pop("stop")
        config["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if params:
        config["extra_params"] = params
    return config


def verdict_tags(result: ExperimentResult, variant: str) -> dict[str, str]:
    chosen = result.variant(variant)
    main = chosen.metric(result.primary_metric)
    tags = {
        "abproxy.experiment": result.experiment,
        "abproxy.variant": variant,
        "abproxy.arm": chosen.arm,
        "abproxy.status": result.status,
        "abproxy.winner": result.winner or "none",
        "abproxy.primary_metric": result.primary_metric,
        "abproxy.requests": str(chosen.requests),
    }
    p_value = main.adjusted_p_value if main.adjusted_p_value is not None else main.p_value
    for name, value in (("mean", main.mean), ("lift", main.lift), ("p_value", p_value)):
        if value is not None:
            tags[f"abproxy.{name}"] = f"{value:.6g}"
    return tags


def _register(config: Config, plan: ExperimentPlan, variant: str, alias: str, tags: dict[str, str]) -> int:
    from mlflow.tracking import MlflowClient

    uri = config.mlflow.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    arm = plan.arms[variant]
    version = client.register_prompt(
        name=plan.name,
        template=prompt_template(arm),
        commit_message=f"abproxy promote: {variant} ({arm.arm_id})",
        tags=tags,
        model_config=model_config(arm),
    )
    client.set_prompt_alias(plan.name, alias, version.version)
    return int(version.version)


async def promote(
    redis: Any, config: Config, plan: ExperimentPlan, variant: str | None = None, alias: str = DEFAULT_ALIAS
) -> Promotion:
    """Register ``variant`` (default: the declared winner) and serve it to all new traffic."""
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
    try:
        version = await asyncio.to_thread(_register, config, plan, chosen, alias, verdict_tags(result, chosen))
    except Exception as error:
        raise MlflowUnavailable(f"registering the prompt in MLflow failed: {type(error).__name__}: {error}") from error
    with store.reachable():
        await redis.set(layout.promoted_key(plan.name), chosen)
    cautions = tuple(line for line in notes(result) if line.startswith(CAUTIONS)) if chosen == result.winner else ()
    return Promotion(plan.name, chosen, alias, version, f"prompts:/{plan.name}@{alias}", cautions)


async def undo(redis: Any, plan: ExperimentPlan) -> None:
    """Back to the experiment: new traffic is assigned over the weights again."""
    with store.reachable():
        await redis.delete(layout.promoted_key(plan.name))
