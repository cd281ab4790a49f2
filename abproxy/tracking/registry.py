"""Each arm's prompt as a version in MLflow's Prompt Registry (docs/mlflow.md, "Prompt Registry").

An experiment's arms are versions of one registry prompt named after the experiment: the arm's
system prompt and template (or messages) as the template, its model and params as the model
config, registered once per arm and found again by its ``abproxy.arm`` tag, so that a flush
repeated, a Redis that lost its ids or a promote never registers an arm twice. The version is
linked to the experiment (its Prompts page lists it), to the arm's run and LoggedModel, and to
its traces; ``abproxy promote`` moves an alias onto it.

Synchronous, on the caller's MLflow client (MLflow's own linking helpers look in the
process-wide tracking store, which need not be this one).
"""

from __future__ import annotations

import json
import threading
from typing import Any, NamedTuple

from abproxy.catalog import Arm, ExperimentPlan

EXPERIMENT_IDS_TAG = "_mlflow_experiment_ids"
"""The prompt's tag MLflow's experiment Prompts page searches: ``,1,7,`` (commas around each id)."""
LINKED_PROMPTS_TAG = "mlflow.linkedPrompts"
"""A run's, LoggedModel's or trace's tag naming the prompt versions it used, as JSON."""
ARM_TAG = "abproxy.arm"
_MODEL_CONFIG_FIELDS = ("temperature", "max_tokens", "top_p", "top_k", "frequency_penalty", "presence_penalty")


class PromptRef(NamedTuple):
    """A registry prompt version, as MLflow's linking calls read one (name and version)."""

    name: str
    version: int

    @property
    def linked(self) -> dict[str, str]:
        """This version as an entry of an ``mlflow.linkedPrompts`` tag."""
        return {"name": self.name, "version": str(self.version)}


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


def arm_ref(plan: ExperimentPlan, arm: Arm) -> str:
    return f"{plan.name}/{arm.arm_id}"


def arm_version(client: Any, plan: ExperimentPlan, arm: Arm, experiment_id: str | None = None) -> PromptRef:
    """The version holding ``arm``'s prompt: the one registered for it before, else a new one;
    linked to ``experiment_id`` when given."""
    found = find_arm_version(client, plan.name, arm_ref(plan, arm))
    if found is None:
        registered = client.register_prompt(
            name=plan.name,
            template=prompt_template(arm),
            commit_message=f"abproxy: variant {arm.variant} (arm {arm.arm_id})",
            tags={"abproxy.experiment": plan.name, "abproxy.variant": arm.variant, ARM_TAG: arm_ref(plan, arm)},
            model_config=model_config(arm),
        )
        found = PromptRef(plan.name, int(registered.version))
    if experiment_id is not None:
        link_to_experiment(client, plan.name, experiment_id)
    return found


def find_arm_version(client: Any, name: str, ref: str) -> PromptRef | None:
    if client.get_prompt(name) is None:
        return None
    page_token = None
    while True:
        page = client.search_prompt_versions(name, max_results=100, page_token=page_token)
        for version in page:
            if version.tags.get(ARM_TAG) == ref:
                return PromptRef(name, int(version.version))
        page_token = page.token
        if not page_token:
            return None


def link_to_experiment(client: Any, name: str, experiment_id: str) -> None:
    """As MLflow links a prompt to the active experiment, but to this one, and at once. MLflow's
    ``register_prompt`` also links it, later, in a thread of its own, to whichever experiment is
    active in the process (none here: its Default); both read and extend the same tag, so this
    holds the lock MLflow's thread holds, or one would overwrite the other (or, on sqlite, fail
    on the tag's unique key)."""
    with _mlflow_link_lock():
        prompt = client.get_prompt(name)
        ids = [i for i in (prompt.tags.get(EXPERIMENT_IDS_TAG, "") if prompt else "").split(",") if i]
        if experiment_id not in ids:
            client.set_prompt_tag(name, EXPERIMENT_IDS_TAG, f",{','.join([*ids, experiment_id])},")


_OWN_LINK_LOCK = threading.Lock()


def _mlflow_link_lock() -> Any:
    try:
        from mlflow.tracking.client import _prompt_experiment_link_lock  # private: MLflow 3's
    except ImportError:  # a later MLflow that moved it: this process's writes still take turns
        return _OWN_LINK_LOCK
    return _prompt_experiment_link_lock


def linked(current: str | None, prompt: PromptRef) -> str | None:
    """The ``mlflow.linkedPrompts`` value with ``prompt`` in it; None when it is there already."""
    try:
        entries = json.loads(current) if current else []
    except ValueError:
        entries = []
    if not isinstance(entries, list):
        entries = []
    if prompt.linked in entries:
        return None
    return json.dumps([*entries, prompt.linked])


def link_to_run_and_model(client: Any, prompt: PromptRef, run_id: str, model_id: str) -> None:
    run_tag = linked(client.get_run(run_id).data.tags.get(LINKED_PROMPTS_TAG), prompt)
    if run_tag is not None:
        client.set_tag(run_id, LINKED_PROMPTS_TAG, run_tag)
    model_tag = linked(client.get_logged_model(model_id).tags.get(LINKED_PROMPTS_TAG), prompt)
    if model_tag is not None:
        client.set_logged_model_tags(model_id, {LINKED_PROMPTS_TAG: model_tag})


def alias_version(client: Any, name: str, alias: str) -> int | None:
    """The version ``alias`` points at, None when it points at none (or the prompt is new)."""
    from mlflow.exceptions import MlflowException

    if client.get_prompt(name) is None:
        return None
    try:
        return int(client.get_prompt_version_by_alias(name, alias).version)
    except MlflowException:
        return None
