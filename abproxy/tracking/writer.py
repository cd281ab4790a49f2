"""The MLflow side of a flush: the layout a prompt engineer looks at (experiment, ``summary``
run, one run and one LoggedModel per variant arm) and the numbers of one look written into it.

Synchronous (MLflow's client is); the flusher runs it in a worker thread. Everything it creates
is found again by tags when its id did not reach Redis (a crash between the two), so nothing is
created twice. A run, a LoggedModel, the experiment's tags and its description are written only
when what they show changed since the last flush: a digest of it is kept beside the ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

from abproxy.analysis.report import markdown, verdict_sentence
from abproxy.catalog import Arm, ExperimentPlan
from abproxy.config import redact_credentials
from abproxy.tracking import registry
from abproxy.tracking_uri import tracking_uri_problem
from abproxy.stats.results import ExperimentResult, VariantResult, as_json

if TYPE_CHECKING:
    from mlflow.entities import Run

log = logging.getLogger("abproxy.tracking")

MAX_PARAM_LENGTH = 6000
DESCRIPTION = "mlflow.note.content"
"""The tag MLflow shows as an experiment's or a run's description."""
MODEL_TYPE = "prompt-variant"

# Per-variant metrics logged at a step: (MLflow name, metric, statistic).
_LOGGED = (
    ("error_rate", "error_rate", "mean"),
    ("latency_ms_mean", "latency_ms", "mean"),
    ("latency_ms_p50", "latency_ms", "p50"),
    ("latency_ms_p95", "latency_ms", "p95"),
    ("ttft_ms_p50", "ttft_ms", "p50"),
    ("response_chars_mean", "response_chars", "mean"),
    ("total_tokens_mean", "total_tokens", "mean"),
    ("cost_usd_mean", "cost_usd", "mean"),
)
_IDS = ("tracking_uri", "experiment_id", "summary")
"""Keys of the runs hash that are not an arm's run id."""
PARENT_TAG = "mlflow.parentRunId"
LAYOUT_DIGEST, TOP_LEVEL = "digest:layout", "top-level"
"""Kept with the ids once the arm runs sit at the top level (earlier versions nested them)."""
STOPPED_TAG = "abproxy.stopped"
"""On an arm's run and LoggedModel while it is stopped for harm: the guardrail it harmed."""
LAST_STEP_TAG = "abproxy.last_step"
"""On the summary run: the highest step logged to the experiment's runs, written before them. The
step is the flush's fencing token, a counter in Redis; should Redis lose it (FLUSHALL, a new
empty Redis, an older RDB file), the next steps would fall below the ones MLflow shows as latest."""


class Written(NamedTuple):
    runs: dict[str, str]
    """The ids and digests to keep in Redis."""
    step: int
    """The step logged at: the flush's, or past the summary run's last step if Redis lost count."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def variant_metrics(variant: VariantResult, compared: tuple[str, ...] = ()) -> dict[str, float]:
    """The numbers of one variant as MLflow metric name → value: its distribution, and for the
    ``compared`` metrics (the primary metric and the guardrails: what the verdict used) its
    comparison with the control — ``<metric>.p_value`` the p-value that decided (Holm-adjusted
    on the primary metric, always-valid when sequential), ``<metric>.p_value_raw`` the same
    before adjustment, ``ci_low``/``ci_high`` the interval of the difference. Comparisons
    nothing decides on would only bury these among some seventy charts."""
    cost = variant.metric("cost_usd")
    values: dict[str, Any] = {
        "requests": variant.requests,
        "errors": variant.errors,
        "units": variant.units,
        "weight": variant.weight,
        "prob_best": variant.prob_best,
        "cost_usd_sum": cost.sum if cost.n else None,  # no price known: no cost, rather than a free arm
    }
    for name, metric, statistic in _LOGGED:
        values[name] = getattr(variant.metric(metric), statistic)
    for metric, summary in variant.metrics.items():
        if metric.startswith(("feedback.", "judge.")):
            values[f"{metric}.n"] = summary.n
            values[f"{metric}.mean"] = summary.mean
        if not variant.control and metric in compared:
            decided = summary.adjusted_p_value if summary.adjusted_p_value is not None else summary.p_value
            values[f"{metric}.lift"] = summary.lift
            values[f"{metric}.p_value"] = decided
            values[f"{metric}.p_value_raw"] = summary.p_value
            if summary.difference_ci is not None:
                values[f"{metric}.ci_low"], values[f"{metric}.ci_high"] = summary.difference_ci
    return {name: rounded(name, value) for name, value in values.items() if _finite(value)}


def rounded(name: str, value: float) -> float:
    """A number as MLflow shows it, rounded to what it can tell: a p-value to 3 significant
    digits, a probability to 3 decimals, a count as it is, the rest to 4 significant digits
    (the live results keep 7)."""
    if name == "prob_best":
        return round(float(value), 3)
    if name.endswith(("p_value", "p_value_raw", ".spearman")):
        return float(f"{value:.3g}")
    if float(value).is_integer():
        return float(value)
    return float(f"{value:.4g}")


def arm_params(arm: Arm, *, weight: float | None = None) -> dict[str, str]:
    """What defines an arm, as MLflow params: model, upstream, params, prompt fields."""
    definition = arm.definition
    params = {"model": definition.model or "", "upstream": arm.upstream}
    if weight is not None:
        params["weight"] = f"{weight:g}"
    for name, value in definition.params.items():
        params[f"params.{name}"] = json.dumps(value) if not isinstance(value, str) else value
    if definition.system_prompt is not None:
        params["system_prompt"] = definition.system_prompt
    if definition.user_template is not None:
        params["user_template"] = definition.user_template
    if definition.chat_template is not None:
        params["messages"] = json.dumps([m.model_dump() for m in definition.chat_template], ensure_ascii=False)
    for field_name, reference in definition.prompt_sources.items():
        params[f"prompt_registry.{field_name}"] = reference
    return {name: value[:MAX_PARAM_LENGTH] for name, value in params.items()}


def agreement_metrics(result: ExperimentResult) -> dict[str, float]:
    """``agreement.<judge>.<feedback>.spearman`` and ``.n`` for the summary run."""
    metrics: dict[str, float] = {}
    for agreement in result.agreement:
        name = f"agreement.{agreement.judge}.{agreement.feedback}"
        metrics[f"{name}.n"] = float(agreement.n)
        if agreement.spearman is not None and _finite(agreement.spearman):
            metrics[f"{name}.spearman"] = rounded(f"{name}.spearman", agreement.spearman)
    return metrics


def judge_tags(plan: ExperimentPlan) -> dict[str, str]:
    """Which judge scored each ``judge.<name>`` metric: its model and version (a new version's
    scores are counted afresh), and the Prompt Registry entry of its prompt."""
    tags = {}
    for name, judge in plan.settings.judges.items():
        source = f", prompt {judge.prompt_source}" if judge.prompt_source else ""
        tags[f"abproxy.judge.{name}"] = f"{judge.model}, version {plan.judge_version(name)}{source}"
    return tags


def _prompt_artifacts(arm: Arm) -> dict[str, str]:
    definition = arm.definition
    artifacts = {}
    if definition.system_prompt is not None:
        artifacts["prompt/system_prompt.txt"] = definition.system_prompt
    if definition.user_template is not None:
        artifacts["prompt/user_template.txt"] = definition.user_template
    if definition.chat_template is not None:
        artifacts["prompt/messages.json"] = json.dumps(
            [m.model_dump() for m in definition.chat_template], ensure_ascii=False, indent=2
        )
    return artifacts


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def description(result: ExperimentResult) -> str:
    """The experiment's description in MLflow: the verdict in one sentence, where to read the
    winner's sampled answers (MLflow's URLs carry no trace filter to link to), then the table."""
    where = ""
    if result.winner is not None:
        where = (
            f"The winner's sampled answers: **Traces**, **Filters**, Field *Trace name* = "
            f"`{result.experiment}/{result.winner}`.\n\n"
        )
    return f"**{verdict_sentence(result)}**\n\n{where}{markdown(result)}"


def artifact_root(tracking_uri: str) -> Path | None:
    """Where an sqlite store's experiments keep their artifacts (traces among them): beside the
    database, in ``mlartifacts/`` — MLflow's own default, ``./mlruns``, depends on the working
    directory of whichever process creates the experiment. None for other stores, which choose."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = tracking_uri.removeprefix("sqlite:///").partition("?")[0]  # absolute if it starts with /
    return Path(database).resolve().parent / "mlartifacts"


class StoreNotThere(Exception):
    """The tracking URI no longer names a store MLflow can open (checked at start, gone since)."""


def check_store(tracking_uri: str) -> None:
    """The config's check again, as a client is built: MLflow creates a missing folder of a sqlite
    database, and a folder removed since start-up (a volume not mounted) would then silently get
    an empty store of its own."""
    problem = tracking_uri_problem(tracking_uri, os.environ)
    if problem:
        raise StoreNotThere(problem)


class MlflowWriter:
    """The synchronous MLflow side of a flush (run in a worker thread)."""

    def __init__(self, tracking_uri: str):
        check_store(tracking_uri)
        from mlflow.tracking import MlflowClient

        self.shown_uri = redact_credentials(tracking_uri)  # kept in Redis: never a password
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._artifacts = artifact_root(tracking_uri)
        self._registry_refusals: set[tuple[str, str]] = set()

    # -- finding what exists ------------------------------------------------------------------

    def _live_experiment(self, experiment_id: str, name: str) -> bool:
        """Whether a cached experiment id is ``name`` in this store (restored if deleted)."""
        from mlflow.exceptions import MlflowException

        try:
            experiment = self.client.get_experiment(experiment_id)
        except MlflowException:
            return False
        if experiment.name != name:
            return False
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment_id)
            return False  # its runs may have gone with it: everything is checked and written again
        return True

    def _live_run(self, run_id: str, experiment_id: str) -> Run | None:
        """The run of a cached id if it is a run of this experiment in this store (restored if
        deleted), else None."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        if run.info.experiment_id != experiment_id:
            return None
        if run.info.lifecycle_stage == "deleted":
            self.client.restore_run(run_id)
        return run

    def _log_batch(self, run_id: str, experiment_id: str, **kwargs: Any) -> bool:
        """log_batch; False when the run is gone (deleted for good, or of another store)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_batch(run_id, **kwargs)
            return True
        except MlflowException:
            if self._live_run(run_id, experiment_id) is None:
                return False
            self.client.log_batch(run_id, **kwargs)
            return True

    def _experiment_id(self, name: str) -> str:
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                self.client.restore_experiment(existing.experiment_id)
            return str(existing.experiment_id)
        location = (self._artifacts / quote(name, safe="")).as_uri() if self._artifacts is not None else None
        return str(self.client.create_experiment(name, artifact_location=location, tags={"abproxy.managed": "true"}))

    def _find_run(self, experiment_id: str, tag: str, value: str) -> Run | None:
        """A run created by an earlier flush whose id never reached Redis (crash in between)."""
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
        return found[0] if found else None

    # -- one flush ----------------------------------------------------------------------------

    def write(self, plan: ExperimentPlan, result: ExperimentResult, runs: dict[str, str], step: int) -> Written:
        """Log one experiment at ``step`` (or past the last step MLflow holds, should that be
        higher); returns the ids and digests to keep (new ones included) and the step used."""
        from mlflow.entities import Metric, RunTag

        runs = dict(runs)
        now = int(time.time() * 1000)
        mlflow_name = plan.settings.mlflow_experiment or plan.name
        if runs.get("tracking_uri") != self.shown_uri:
            runs = {"tracking_uri": self.shown_uri}  # ids of another store mean nothing here
        if "experiment_id" in runs and not self._live_experiment(runs["experiment_id"], mlflow_name):
            runs = {"tracking_uri": self.shown_uri}
        if "experiment_id" not in runs:
            runs["experiment_id"] = self._experiment_id(mlflow_name)
        experiment_id = runs["experiment_id"]
        winner = result.winner
        summary_id, last_step = self._summary_run(experiment_id, plan, runs)
        step, runs = _after_last_step(step, last_step, runs)
        arms = _arm_rows(plan, result)
        shown = as_json(result)
        summary_digest = _digest(shown)
        if step > last_step and _anything_new(runs, arms, summary_digest):
            self.client.set_tag(summary_id, LAST_STEP_TAG, str(step))  # before the steps it covers

        if runs.get(LAYOUT_DIGEST) != TOP_LEVEL:
            self._unnest(runs)
            runs[LAYOUT_DIGEST] = TOP_LEVEL

        current = set()
        for arm, metrics, is_winner, stopped, digest in arms:
            current.add(arm.arm_id)
            run_id = runs.get(arm.arm_id)
            if run_id is not None and runs.get(f"digest:{arm.arm_id}") == digest:
                self._arm_model(experiment_id, plan, arm, run_id, runs, is_winner, stopped)
                continue  # nothing new to show: no new step
            run_id = run_id or self._variant_run(experiment_id, plan, arm)
            logged = [Metric(name, value, now, step) for name, value in metrics.items()]
            tags = [RunTag("abproxy.winner", is_winner)] + ([RunTag(STOPPED_TAG, stopped)] if stopped else [])
            if not self._log_batch(run_id, experiment_id, metrics=logged, tags=tags):
                run_id = self._variant_run(experiment_id, plan, arm)
                self.client.log_batch(run_id, metrics=logged, tags=tags)
            if not stopped and runs.get(f"stopped:{arm.arm_id}"):
                self.client.delete_tag(run_id, STOPPED_TAG)  # resumed
            runs[arm.arm_id] = run_id
            runs[f"digest:{arm.arm_id}"] = digest
            runs[f"stopped:{arm.arm_id}"] = stopped
            self._arm_model(experiment_id, plan, arm, run_id, runs, is_winner, stopped)

        for key, run_id in list(runs.items()):
            if key in _IDS or ":" in key or key in current:
                continue
            if runs.get(f"digest:{key}") != "retired":
                # An arm edited away keeps its run and data, but can no longer be the winner.
                tags = [RunTag("abproxy.winner", "false"), RunTag("abproxy.current", "false")]
                self._log_batch(run_id, experiment_id, tags=tags)
                if f"model:{key}" in runs:
                    self.client.set_logged_model_tags(runs[f"model:{key}"], {"abproxy.winner": "false", "abproxy.current": "false"})
                runs[f"digest:{key}"] = "retired"

        if runs.get("digest:summary") != summary_digest:
            srm = result.srm.p_value
            summary_metrics = [Metric("srm_p_value", rounded("srm_p_value", srm), now, step)] if srm is not None and _finite(srm) else []
            summary_metrics += [Metric(name, value, now, step) for name, value in agreement_metrics(result).items()]
            verdict_tags = {
                "abproxy.status": result.status,
                "abproxy.winner": winner or "none",
                "abproxy.warnings": ",".join(result.warnings) or "none",
                DESCRIPTION: description(result),
                **judge_tags(plan),
            }
            self.client.log_batch(summary_id, metrics=summary_metrics, tags=[RunTag(k, v) for k, v in verdict_tags.items()])
            self.client.log_text(summary_id, json.dumps(shown, indent=2, ensure_ascii=False), "report.json")
            self.client.log_text(summary_id, markdown(result), "report.md")
            for key, value in verdict_tags.items():
                self.client.set_experiment_tag(experiment_id, key, value)
            runs["digest:summary"] = summary_digest
        return Written(runs, step)

    def _unnest(self, runs: dict[str, str]) -> None:
        """Arm runs an earlier version created under the summary run, moved beside it."""
        from mlflow.exceptions import MlflowException

        for key, run_id in runs.items():
            if key in _IDS or ":" in key:
                continue
            try:
                self.client.delete_tag(run_id, PARENT_TAG)
            except MlflowException:
                pass  # not nested (a run of this version), or gone: nothing to move

    def _summary_run(self, experiment_id: str, plan: ExperimentPlan, runs: dict[str, str]) -> tuple[str, int]:
        """The summary run's id (found, or created) and the last step logged under it."""
        cached = runs.get("summary")
        run = self._live_run(cached, experiment_id) if cached is not None else None
        if run is None:
            run = self._find_run(experiment_id, "abproxy.summary_of", plan.name)
        if run is None:
            run = self.client.create_run(
                experiment_id,
                run_name="summary",
                tags={"abproxy.role": "summary", "abproxy.experiment": plan.name, "abproxy.summary_of": plan.name},
            )
        summary_id = str(run.info.run_id)
        if cached != summary_id:
            runs.pop("digest:summary", None)  # a new summary run: show the verdict on it
        runs["summary"] = summary_id
        return summary_id, _last_step(run)

    def _variant_run(self, experiment_id: str, plan: ExperimentPlan, arm: Arm) -> str:
        """The arm's run when Redis holds no id for it: the one an earlier flush created, else a
        new one. An earlier flush may have died between creating the run and logging its params
        and prompts, so whatever of those is missing is logged now."""
        from mlflow.entities import Param

        found = self._find_run(experiment_id, "abproxy.arm", f"{plan.name}/{arm.arm_id}")
        if found is not None:
            run_id, logged = found.info.run_id, found.data.params
        else:
            run_id, logged = self._create_variant_run(experiment_id, plan, arm), {}
        # Only the missing ones: MLflow refuses to change a param, and the weight may have changed.
        wanted = arm_params(arm, weight=arm.definition.weight)
        params = [Param(name, value) for name, value in wanted.items() if name not in logged]
        if params:
            self.client.log_batch(run_id, params=params)
        for path, text in _prompt_artifacts(arm).items():
            self.client.log_text(run_id, text, path)
        return run_id

    def _create_variant_run(self, experiment_id: str, plan: ExperimentPlan, arm: Arm) -> str:
        tags = {
            "abproxy.experiment": plan.name,
            "abproxy.variant": arm.variant,
            "abproxy.role": "variant",
            "abproxy.control": "true" if arm.variant == plan.settings.control_name else "false",
            "abproxy.variant_hash": arm.definition_hash,
            "abproxy.arm": f"{plan.name}/{arm.arm_id}",
            "abproxy.current": "true",
        }
        # Beside the summary run, not under it: MLflow's runs table shows a parent's children
        # collapsed, and a newcomer would see one "summary" row and none of the arms.
        return str(self.client.create_run(experiment_id, run_name=arm.variant, tags=tags).info.run_id)

    # -- LoggedModels ---------------------------------------------------------------------------

    def _arm_model(
        self, experiment_id: str, plan: ExperimentPlan, arm: Arm, run_id: str, runs: dict[str, str], is_winner: str, stopped: str
    ) -> None:
        """The arm as an MLflow LoggedModel (MLflow's "version" of a GenAI app), with its
        params and its run as the source; its winner and stopped tags kept in step with the run's."""
        key = f"model:{arm.arm_id}"
        model_id = runs.get(key)
        if model_id is None:
            model_id = self._find_model(experiment_id, plan, arm) or self._create_model(experiment_id, plan, arm, run_id)
            runs[key] = model_id
        if f"prompt:{arm.arm_id}" not in runs:
            self._arm_prompt(experiment_id, plan, arm, run_id, model_id, runs)
        shown = f"{is_winner}|{stopped}"
        before = runs.get(f"digest:{key}", "")
        if before != shown:
            self.client.set_logged_model_tags(model_id, {"abproxy.winner": is_winner, **({STOPPED_TAG: stopped} if stopped else {})})
            if not stopped and before.partition("|")[2]:
                self.client.delete_logged_model_tag(model_id, STOPPED_TAG)  # resumed
            runs[f"digest:{key}"] = shown

    def _arm_prompt(
        self, experiment_id: str, plan: ExperimentPlan, arm: Arm, run_id: str, model_id: str, runs: dict[str, str]
    ) -> None:
        """The arm's prompt as a Prompt Registry version, linked to the experiment, the run and
        the LoggedModel. The registry is a side of MLflow a store may refuse (a registered model
        of the experiment's name, a registry not configured): the flush goes on without it, and
        tries again next time."""
        try:
            prompt = registry.arm_version(self.client, plan, arm, experiment_id)
            registry.link_to_run_and_model(self.client, prompt, run_id, model_id)
        except Exception as error:
            if (plan.name, str(error)) not in self._registry_refusals:  # once, not every flush
                self._registry_refusals.add((plan.name, str(error)))
                log.warning("%s: variant %s not registered in the Prompt Registry (%s)", plan.name, arm.variant, error)
            return
        runs[f"prompt:{arm.arm_id}"] = str(prompt.version)

    def _find_model(self, experiment_id: str, plan: ExperimentPlan, arm: Arm) -> str | None:
        found = self.client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"tags.`abproxy.arm` = '{plan.name}/{arm.arm_id}'", max_results=1
        )
        return str(found[0].model_id) if found else None

    def _create_model(self, experiment_id: str, plan: ExperimentPlan, arm: Arm, run_id: str) -> str:
        """As ``mlflow.create_external_model`` does, on this writer's own client (that function
        uses the process-wide tracking URI): created, its MLmodel stub logged, marked READY."""
        from mlflow.entities import LoggedModelStatus
        from mlflow.models.model import MLMODEL_FILE_NAME
        from mlflow.models.utils import get_external_mlflow_model_spec
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

        tags = {
            "abproxy.experiment": plan.name,
            "abproxy.variant": arm.variant,
            "abproxy.variant_hash": arm.definition_hash,
            "abproxy.arm": f"{plan.name}/{arm.arm_id}",
            "abproxy.current": "true",
            "abproxy.winner": "false",
            MLFLOW_MODEL_IS_EXTERNAL: "true",
        }
        model = self.client.create_logged_model(
            experiment_id=experiment_id,
            name=arm.variant,
            source_run_id=run_id,
            tags=tags,
            params=arm_params(arm),
            model_type=MODEL_TYPE,
        )
        with tempfile.TemporaryDirectory() as folder:
            get_external_mlflow_model_spec(model).save(str(Path(folder) / MLMODEL_FILE_NAME))
            self.client.log_model_artifacts(model.model_id, folder)
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return str(model.model_id)


_ArmRow = tuple[Arm, dict[str, float], str, str, str]
"""An arm, its metrics, whether it is the winner ("true"/"false"), the guardrail it was stopped
for ('' unless stopped), their digest."""


def _arm_rows(plan: ExperimentPlan, result: ExperimentResult) -> list[_ArmRow]:
    stopped = {stop.variant: stop.reason for stop in result.stopped}
    rows = []
    for variant in result.variants:
        metrics = variant_metrics(variant, (result.primary_metric, *result.guardrails))
        is_winner = "true" if result.winner == variant.name else "false"
        reason = stopped.get(variant.name, "")
        digest = _digest(metrics, is_winner, reason) if reason else _digest(metrics, is_winner)
        rows.append((plan.arms[variant.name], metrics, is_winner, reason, digest))
    return rows


def _anything_new(runs: dict[str, str], arms: list[_ArmRow], summary_digest: str) -> bool:
    """Whether this flush logs a step: some run's numbers (or the verdict) changed since the last."""
    return runs.get("digest:summary") != summary_digest or any(
        arm.arm_id not in runs or runs.get(f"digest:{arm.arm_id}") != digest for arm, _, _, _, digest in arms
    )


def _after_last_step(step: int, last_step: int, runs: dict[str, str]) -> tuple[int, dict[str, str]]:
    """The step to log at, and the ids and digests to go by. A step at or below MLflow's last
    means Redis lost its count, and with it what it knew was logged: go on after MLflow's last
    step, and log every run again, so that MLflow's latest numbers are the ones Redis holds."""
    if step > last_step:
        return step, runs
    return last_step + 1, {key: value for key, value in runs.items() if not key.startswith("digest:")}


def _last_step(run: Run) -> int:
    try:
        return int(run.data.tags.get(LAST_STEP_TAG, 0))
    except ValueError:  # edited by hand: the steps in Redis are all there is to go by
        return 0
