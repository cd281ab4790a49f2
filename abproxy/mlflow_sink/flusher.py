"""Writing the experiments into MLflow (SPEC §4): counters from Redis → statistics → one run
per variant arm plus a ``summary`` parent run, with the winner tagged.

Exactly one replica flushes at a time: a Redis lock with a TTL, and a fencing token (a Redis
counter) that is also the flush number, MLflow's ``step``. Every flush re-logs cumulative
numbers, so a crash mid-flush, a retry or MLflow being away loses nothing and doubles nothing.
MLflow's client is synchronous; its calls run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from abproxy.errors import Conflict, DomainError, MlflowUnavailable, StoreUnavailable
from abproxy.recording import store
from abproxy.catalog import Arm, Catalog, ExperimentPlan
from abproxy.config import Config, redact_credentials
from abproxy.metrics import ProxyMetrics
from abproxy.analysis.report import markdown
from abproxy.analysis.live import Snapshot, experiment_results, take_snapshot
from abproxy.stats.results import ExperimentResult, VariantResult, as_json

if TYPE_CHECKING:
    from mlflow.entities import Run

log = logging.getLogger("abproxy.mlflow_sink.flusher")

LOCK_TTL_MS = 5 * 60 * 1000
MAX_PARAM_LENGTH = 6000

_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

# Per-variant metrics logged every flush: (MLflow name, metric, statistic).
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


class FlushBusy(Conflict):
    """Another flush holds the lock."""

    code = "flush_in_progress"


@dataclass
class FlushReport:
    step: int
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    duration_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"step": self.step, "duration_s": round(self.duration_s, 3), "experiments": self.experiments}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def variant_metrics(variant: VariantResult) -> dict[str, float]:
    """The numbers of one variant as MLflow metric name → value."""
    values: dict[str, Any] = {
        "requests": variant.requests,
        "errors": variant.errors,
        "units": variant.units,
        "prob_best": variant.prob_best,
        "cost_usd_sum": variant.metric("cost_usd").sum,
    }
    for name, metric, statistic in _LOGGED:
        values[name] = getattr(variant.metric(metric), statistic)
    for metric, summary in variant.metrics.items():
        if metric.startswith("feedback."):
            values[f"{metric}.n"] = summary.n
            values[f"{metric}.mean"] = summary.mean
        if not variant.control:
            values[f"{metric}.lift"] = summary.lift
            values[f"{metric}.p_value"] = summary.p_value
    return {name: float(value) for name, value in values.items() if _finite(value)}


def _variant_params(arm: Arm, weight: float) -> dict[str, str]:
    definition = arm.definition
    params = {"model": definition.model or "", "upstream": arm.upstream, "weight": f"{weight:g}"}
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


def _as_domain_error(error: Exception) -> DomainError:
    """Why a flush wrote nothing, as the edge reports it: Redis, or else MLflow."""
    if isinstance(error, DomainError):
        return error
    if isinstance(error, RedisError):
        return StoreUnavailable("Redis is unavailable; retry later")
    detail = str(error).splitlines()[0][:200] if str(error) else ""
    return MlflowUnavailable(f"flush to MLflow failed: {type(error).__name__}: {detail}")


class MlflowWriter:
    """The synchronous MLflow side of a flush (run in a worker thread)."""

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.shown_uri = redact_credentials(tracking_uri)  # kept in Redis: never a password
        self.client = MlflowClient(tracking_uri=tracking_uri)

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
        return True

    def _live_run(self, run_id: str, experiment_id: str) -> bool:
        """Whether a cached run id is a run of this experiment in this store (restored if deleted)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        if run.info.experiment_id != experiment_id:
            return False
        if run.info.lifecycle_stage == "deleted":
            self.client.restore_run(run_id)
        return True

    def _log_batch(self, run_id: str, experiment_id: str, **kwargs: Any) -> bool:
        """log_batch; False when the run is gone (deleted for good, or of another store)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_batch(run_id, **kwargs)
            return True
        except MlflowException:
            if not self._live_run(run_id, experiment_id):
                return False
            self.client.log_batch(run_id, **kwargs)
            return True

    def _experiment_id(self, name: str) -> str:
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                self.client.restore_experiment(existing.experiment_id)
            return existing.experiment_id
        return self.client.create_experiment(name, tags={"abproxy.managed": "true"})

    def _find_run(self, experiment_id: str, tag: str, value: str) -> Run | None:
        """A run created by an earlier flush whose id never reached Redis (crash in between)."""
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
        return found[0] if found else None

    def write(self, plan: ExperimentPlan, result: ExperimentResult, runs: dict[str, str], step: int) -> dict[str, str]:
        """Log one experiment at ``step``; returns the run ids to keep (new ones included)."""
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

        summary_id = runs.get("summary")
        if summary_id is not None and not self._live_run(summary_id, experiment_id):
            summary_id = None
        if summary_id is None:
            found = self._find_run(experiment_id, "abproxy.summary_of", plan.name)
            summary_id = found.info.run_id if found is not None else None
        if summary_id is None:
            summary_id = self.client.create_run(
                experiment_id,
                run_name="summary",
                tags={"abproxy.role": "summary", "abproxy.experiment": plan.name, "abproxy.summary_of": plan.name},
            ).info.run_id
        runs["summary"] = summary_id

        current = set()
        for variant in result.variants:
            arm = plan.arms[variant.name]
            current.add(arm.arm_id)
            run_id = runs.get(arm.arm_id) or self._variant_run(experiment_id, summary_id, plan, arm)
            metrics = [Metric(name, value, now, step) for name, value in variant_metrics(variant).items()]
            metrics.append(Metric("weight", variant.weight, now, step))
            tags = [
                RunTag("abproxy.winner", "true" if winner == variant.name else "false"),
                RunTag("abproxy.status", result.status),
            ]
            if not self._log_batch(run_id, experiment_id, metrics=metrics, tags=tags):
                run_id = self._variant_run(experiment_id, summary_id, plan, arm)
                self.client.log_batch(run_id, metrics=metrics, tags=tags)
            runs[arm.arm_id] = run_id

        for key, run_id in runs.items():
            if key not in current and key not in ("experiment_id", "summary", "tracking_uri"):
                # An arm edited away keeps its run and data, but can no longer be the winner.
                self._log_batch(
                    run_id, experiment_id, tags=[RunTag("abproxy.winner", "false"), RunTag("abproxy.current", "false")]
                )

        summary_metrics = []
        if _finite(result.srm.p_value):
            summary_metrics.append(Metric("srm_p_value", float(result.srm.p_value), now, step))  # type: ignore[arg-type]
        summary_tags = [
            RunTag("abproxy.status", result.status),
            RunTag("abproxy.winner", winner or "none"),
            RunTag("abproxy.warnings", ",".join(result.warnings) or "none"),
        ]
        self.client.log_batch(summary_id, metrics=summary_metrics, tags=summary_tags)
        self.client.log_text(summary_id, json.dumps(as_json(result), indent=2, ensure_ascii=False), "report.json")
        self.client.log_text(summary_id, markdown(result), "report.md")
        return runs

    def _variant_run(self, experiment_id: str, summary_id: str, plan: ExperimentPlan, arm: Arm) -> str:
        """The arm's run when Redis holds no id for it: the one an earlier flush created, else a
        new one. An earlier flush may have died between creating the run and logging its params
        and prompts, so whatever of those is missing is logged now."""
        from mlflow.entities import Param

        found = self._find_run(experiment_id, "abproxy.arm", f"{plan.name}/{arm.arm_id}")
        if found is not None:
            run_id, logged = found.info.run_id, found.data.params
        else:
            run_id, logged = self._create_variant_run(experiment_id, summary_id, plan, arm), {}
        # Only the missing ones: MLflow refuses to change a param, and the weight may have changed.
        wanted = _variant_params(arm, arm.definition.weight)
        params = [Param(name, value) for name, value in wanted.items() if name not in logged]
        if params:
            self.client.log_batch(run_id, params=params)
        for path, text in _prompt_artifacts(arm).items():
            self.client.log_text(run_id, text, path)
        return run_id

    def _create_variant_run(self, experiment_id: str, summary_id: str, plan: ExperimentPlan, arm: Arm) -> str:
        tags = {
            "abproxy.experiment": plan.name,
            "abproxy.variant": arm.variant,
            "abproxy.role": "variant",
            "abproxy.control": "true" if arm.variant == plan.settings.control_name else "false",
            "abproxy.variant_hash": arm.definition_hash,
            "abproxy.arm": f"{plan.name}/{arm.arm_id}",
            "abproxy.current": "true",
            "mlflow.parentRunId": summary_id,
        }
        return self.client.create_run(experiment_id, run_name=arm.variant, tags=tags).info.run_id


class Flusher:
    def __init__(
        self,
        redis: Any,
        config: Config,
        catalog: Catalog,
        metrics: ProxyMetrics | None = None,
        writer_factory: Callable[[str], MlflowWriter] = MlflowWriter,
    ):
        """``writer_factory`` builds the MLflow side from the tracking URI, on first use."""
        self._redis = redis
        self._config = config
        self._catalog = catalog
        self._metrics = metrics
        self._writer_factory = writer_factory
        self._writer: MlflowWriter | None = None

    def _mlflow(self) -> MlflowWriter:
        if self._writer is None:
            self._writer = self._writer_factory(self._config.mlflow.tracking_uri)
        return self._writer

    async def flush(self) -> FlushReport:
        """One flush now; raises :class:`FlushBusy` while another flush is running."""
        report = await self._flush(periodic=False)
        assert report is not None
        return report

    async def flush_if_due(self) -> FlushReport | None:
        """The periodic flush: None when another replica has this interval, or another flush runs."""
        return await self._flush(periodic=True)

    async def _flush(self, *, periodic: bool) -> FlushReport | None:
        token = secrets.token_hex(16)
        with store.reachable():
            if periodic:
                interval_ms = max(1, int(self._config.mlflow.flush_interval_s * 1000 * 0.9))
                if not await self._redis.set(store.FLUSH_INTERVAL_KEY, token, nx=True, px=interval_ms):
                    return None
            if not await self._redis.set(store.FLUSH_LOCK_KEY, token, nx=True, px=LOCK_TTL_MS):
                if periodic:
                    return None
                raise FlushBusy("another flush is running; try again shortly")
        started = time.perf_counter()
        try:
            with store.reachable():
                step = int(await self._redis.incr(store.FLUSH_FENCE_KEY))
            # Building the client opens the store (sqlite runs its migrations): not on the loop.
            writer = await asyncio.to_thread(self._mlflow)
            report = FlushReport(step)
            failures = []
            for plan in self._catalog.plans.values():
                try:
                    report.experiments[plan.name] = await self._flush_experiment(writer, plan, step, token)
                except Exception as error:  # one experiment MLflow refuses must not block the others
                    log.warning("flush of experiment %s failed: %s: %s", plan.name, type(error).__name__, error)
                    report.experiments[plan.name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
                    failures.append(error)
            report.duration_s = time.perf_counter() - started
            if failures and len(failures) == len(self._catalog.plans):
                raise _as_domain_error(failures[0]) from failures[0]
            if self._metrics is not None:
                self._metrics.flush_duration.observe(report.duration_s)
                if not failures:
                    self._metrics.flush_last_success.set(time.time())
                else:
                    self._metrics.flush_errors.inc()
            return report
        except Exception:
            if self._metrics is not None:
                self._metrics.flush_errors.inc()
            raise
        finally:
            with store.reachable():
                await self._redis.eval(_RELEASE_LUA, 1, store.FLUSH_LOCK_KEY, token)

    async def _flush_experiment(self, writer: MlflowWriter, plan: ExperimentPlan, step: int, token: str) -> dict[str, Any]:
        snapshot: Snapshot = await take_snapshot(self._redis, self._config, plan)
        result = snapshot.result
        runs = await self._redis.hgetall(store.runs_key(plan.name))
        updated = await asyncio.to_thread(writer.write, plan, result, runs, step)
        if await self._redis.get(store.FLUSH_LOCK_KEY) != token:
            log.warning("flush %d lost its lock mid-way; its run ids are not kept", step)
            return {"status": result.status, "winner": result.winner, "kept": False}
        # The always-valid state was saved by the look itself (analysis/live.py), MLflow or not.
        await self._redis.hset(store.runs_key(plan.name), mapping=updated)
        return {
            "status": result.status,
            "winner": result.winner,
            "mlflow_experiment_id": updated["experiment_id"],
            "summary_run_id": updated["summary"],
            "runs": {name: updated[arm.arm_id] for name, arm in plan.arms.items()},
        }

    async def publish_gauges(self) -> None:
        """Every replica, every interval: the statistics as Prometheus gauges, so that any
        replica scraped shows the same numbers (they all read the same Redis)."""
        if self._metrics is None:
            return
        for plan in self._catalog.plans.values():
            self._metrics.publish_results(await experiment_results(self._redis, self._config, plan))

    async def run_periodically(self) -> None:
        interval = self._config.mlflow.flush_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                report = await self.flush_if_due()
                if report is not None:
                    log.info("flushed %d experiment(s) to MLflow in %.2fs (step %d)", len(report.experiments), report.duration_s, report.step)
            except Exception as error:  # MLflow or Redis away: warn, count, retry next interval
                log.warning("flush to MLflow failed (%s: %s); retrying next interval", type(error).__name__, error)
            try:
                await self.publish_gauges()
            except Exception as error:
                log.warning("could not refresh the statistics gauges (%s: %s)", type(error).__name__, error)
