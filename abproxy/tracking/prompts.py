"""Prompt fields that name an MLflow Prompt Registry entry (``prompts:/name/3`` or
``prompts:/name@alias``), resolved to their text when the config loads."""

from __future__ import annotations

from typing import Any

from abproxy.config import ChatMessage, Config, ConfigError

REGISTRY_PREFIX = "prompts:/"
TEXT_FIELDS = ("system_prompt", "user_template")


def uses_registry(config: Config) -> bool:
    return any(
        isinstance(getattr(variant, name), str) and getattr(variant, name).startswith(REGISTRY_PREFIX)
        for experiment in config.experiments.values()
        for variant in experiment.variants.values()
        for name in (*TEXT_FIELDS, "messages")
    )


def _load(uri: str, tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    # A client of its own: no process-wide tracking URI is set as a side effect.
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).load_prompt(uri)


def _messages(template: Any) -> list[ChatMessage]:
    if isinstance(template, str):
        return [ChatMessage(role="user", content=template)]
    return [ChatMessage(role=m["role"], content=m["content"]) for m in template]


def resolve_prompts(config: Config, loader: Any = None) -> Config:
    """Replace registry URIs by their text; the URI and version go to ``prompt_sources``."""
    if not uses_registry(config):
        return config
    load = loader or (lambda uri: _load(uri, config.mlflow.tracking_uri))
    problems: list[tuple[str, str]] = []
    experiments = {}
    for exp_name, experiment in config.experiments.items():
        variants = {}
        for var_name, variant in experiment.variants.items():
            updates: dict[str, Any] = {}
            sources = dict(variant.prompt_sources)
            for field_name in (*TEXT_FIELDS, "messages"):
                value = getattr(variant, field_name)
                if not (isinstance(value, str) and value.startswith(REGISTRY_PREFIX)):
                    continue
                try:
                    prompt = load(value)
                except Exception as error:  # the registry's own errors vary by store
                    path = f"experiments.{exp_name}.variants.{var_name}.{field_name}"
                    problems.append((path, f"cannot load {value} from the MLflow Prompt Registry: {error}"))
                    continue
                template = prompt.template
                if field_name == "messages":
                    try:
                        updates[field_name] = _messages(template)
                    except (KeyError, TypeError, ValueError) as error:
                        path = f"experiments.{exp_name}.variants.{var_name}.{field_name}"
                        problems.append((path, f"{value} is not a chat template abproxy can use: {error}"))
                        continue
                elif isinstance(template, str):
                    updates[field_name] = template
                else:
                    path = f"experiments.{exp_name}.variants.{var_name}.{field_name}"
                    problems.append((path, f"{value} is a chat prompt; use it as `messages`"))
                    continue
                sources[field_name] = f"{value} (name={prompt.name}, version={prompt.version})"
            if updates:
                updates["prompt_sources"] = sources
                variant = variant.model_copy(update=updates)
            variants[var_name] = variant
        experiments[exp_name] = experiment.model_copy(update={"variants": variants})
    if problems:
        raise ConfigError(problems)
    return config.model_copy(update={"experiments": experiments})
