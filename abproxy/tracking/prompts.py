"""Prompt fields that name an MLflow Prompt Registry entry (``prompts:/name/3`` or
``prompts:/name@alias``), resolved to their text when the config loads."""

from __future__ import annotations

from typing import Any

from abproxy.config import ChatMessage, Config, ConfigError, Judge

REGISTRY_PREFIX = "prompts:/"
TEXT_FIELDS = ("system_prompt", "user_template")


def uses_registry(config: Config) -> bool:
    return any(judge.prompt.startswith(REGISTRY_PREFIX) for judge in config.judges.values()) or any(
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
    judges = {name: _resolved_judge(name, judge, load, problems) for name, judge in config.judges.items()}
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
                path = f"experiments.{exp_name}.variants.{var_name}.{field_name}"
                prompt = _loaded(load, value, path, problems)
                if prompt is None:
                    continue
                template = prompt.template
                if field_name == "messages":
                    try:
                        updates[field_name] = _messages(template)
                    except (KeyError, TypeError, ValueError) as error:
                        problems.append((path, f"{value} is not a chat template abproxy can use: {error}"))
                        continue
                elif isinstance(template, str):
                    updates[field_name] = template
                else:
                    problems.append((path, f"{value} is a chat prompt; use it as `messages`"))
                    continue
                sources[field_name] = _source(value, prompt)
            if updates:
                updates["prompt_sources"] = sources
                variant = variant.model_copy(update=updates)
            variants[var_name] = variant
        own_judges = {name: judges[name] for name in experiment.judges}
        experiments[exp_name] = experiment.model_copy(update={"variants": variants, "judges": own_judges})
    if problems:
        raise ConfigError(problems)
    return config.model_copy(update={"experiments": experiments, "judges": judges})


def _resolved_judge(name: str, judge: Judge, load: Any, problems: list[tuple[str, str]]) -> Judge:
    uri = judge.prompt
    if not uri.startswith(REGISTRY_PREFIX):
        return judge
    path = f"judges.{name}.prompt"
    prompt = _loaded(load, uri, path, problems)
    if prompt is None:
        return judge
    if not isinstance(prompt.template, str):
        problems.append((path, f"{uri} is a chat prompt; a judge's prompt is one text with {{{{input}}}} and {{{{output}}}}"))
        return judge
    if "{{output}}" not in prompt.template:
        problems.append((path, f"{uri} must contain {{{{output}}}} (the answer judged)"))
        return judge
    return judge.model_copy(update={"prompt": prompt.template, "prompt_source": _source(uri, prompt)})


def _loaded(load: Any, uri: str, path: str, problems: list[tuple[str, str]]) -> Any | None:
    """The registry's prompt for ``uri``; None, and the problem noted at ``path``, when it cannot be loaded."""
    try:
        return load(uri)
    except Exception as error:  # the registry's own errors vary by store
        problems.append((path, f"cannot load {uri} from the MLflow Prompt Registry: {error}"))
        return None


def _source(uri: str, prompt: Any) -> str:
    """Where a prompt came from, as runs and assessments record it."""
    return f"{uri} (name={prompt.name}, version={prompt.version})"
