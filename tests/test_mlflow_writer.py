"""The MLflow side of a flush (tracking/writer.py) against a real sqlite MLflow store: the
layout docs/reference.md "MLflow layout" promises (the experiment, a ``summary`` run, one run and
one LoggedModel per variant arm, the winner's tags), read back with ``MlflowClient`` as a prompt
engineer's script would; a look written twice or lost by Redis doubles nothing, and later looks
log at later steps. The results written are those of a real look: counters as Redis holds them,
through ``analyse`` and ``summarise``, as the flusher's snapshot makes them."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from proxykit import BASE_EXPERIMENTS, make_config

from abproxy.analysis.analyse import analyse
from abproxy.analysis.summarise import summarise
from abproxy.catalog import Catalog, ExperimentPlan
from abproxy.config import Config
from abproxy.tracking.writer import LAST_STEP_TAG, STOPPED_TAG, MlflowWriter, variant_metrics
from abproxy.recording.counters import ArmCounters, parse_arm
from abproxy.recording.overrides import Stop
from abproxy.stats.histogram import bucket_counts
from abproxy.stats.results import ExperimentResult

EXP = "translation"  # control "basic", treatment "professional", primary feedback.satisfaction
SATISFACTION = "feedback.satisfaction"
GOOD = (0.0, 0.02, 0.05, 0.20, 0.73)
"""Probabilities of a satisfaction of 1..5: mean 4.64."""
BAD = (0.30, 0.45, 0.20, 0.05, 0.0)
"""Mean 2.0."""

Samples = dict[str, dict[str, np.ndarray]]
"""variant → metric → the raw per-request values."""


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local store writes artifacts under the working directory: keep them in the test's (the
    writer and the reads here name the store; no process-wide tracking URI is set)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture
def plan_and_config() -> tuple[ExperimentPlan, Config]:
    config = make_config("http://127.0.0.1:9/v1", experiments={EXP: copy.deepcopy(BASE_EXPERIMENTS[EXP])})
    return Catalog(config).plans[EXP], config


def samples(requests: int, seed: int = 1, scores: Mapping[str, tuple[float, ...]] | None = None) -> Samples:
    """``requests`` requests per arm, two per user; 2% fail (no latency, no score)."""
    rng = np.random.default_rng(seed)
    made: Samples = {}
    for name, p in (scores or {"basic": BAD, "professional": GOOD}).items():
        failed = rng.random(requests) < 0.02
        made[name] = {
            "users": np.arange(requests) // 2,
            "error_rate": failed.astype(float),
            "latency_ms": rng.lognormal(np.log(400.0), 0.5, requests)[~failed],
            SATISFACTION: rng.choice(np.arange(1.0, 6.0), size=requests, p=p)[~failed],
        }
    return made


def counters_of(plan: ExperimentPlan, made: Samples) -> dict[str, ArmCounters]:
    """Every arm's counters parsed from the hashes the recording scripts keep (sums about the
    first value; every metric of a ``unit: user`` experiment also per user)."""
    counters = {}
    for name, arm in plan.arms.items():
        arm_samples = made[name]
        users, failed = arm_samples["users"], arm_samples["error_rate"].astype(bool)
        stats = {"requests": str(users.size), "errors": str(int(failed.sum())), "units": str(np.unique(users).size)}
        hist: dict[str, str] = {}
        for metric in ("error_rate", "latency_ms", SATISFACTION):
            x = arm_samples[metric]
            owners = users if metric == "error_rate" else users[~failed]
            shift = float(x[0])
            y = x - shift
            _, index = np.unique(owners, return_inverse=True)
            per_user_y, per_user_n = np.bincount(index, weights=y), np.bincount(index).astype(float)
            stats |= {
                f"{metric}|n": str(x.size), f"{metric}|s": repr(float(x.sum())), f"{metric}|k": repr(shift),
                f"{metric}|t": repr(float(y.sum())), f"{metric}|q": repr(float(np.dot(y, y))),
                f"{metric}|uk": str(per_user_n.size), f"{metric}|uyy": repr(float(np.dot(per_user_y, per_user_y))),
                f"{metric}|unn": repr(float(np.dot(per_user_n, per_user_n))), f"{metric}|uyn": repr(float(np.dot(per_user_y, per_user_n))),
            }  # fmt: skip
            hist |= {f"{metric}|{bucket}": str(count) for bucket, count in bucket_counts(x).items()}
        counters[arm.arm_id] = parse_arm(arm.arm_id, stats, hist)
    return counters


def results(
    plan: ExperimentPlan, config: Config, made: Samples, stops: Mapping[str, Stop] | None = None
) -> ExperimentResult:
    counters = counters_of(plan, made)
    return summarise(plan, config, counters, analyse(plan, config, counters), stops=stops)


def runs_of(client: MlflowClient) -> dict[str, Run]:
    """The experiment's runs by name; two runs of one name fail the test."""
    experiment = client.get_experiment_by_name(EXP)
    assert experiment is not None, "the experiment was not created"
    found = client.search_runs([experiment.experiment_id])
    by_name = {run.info.run_name: run for run in found}
    assert len(by_name) == len(found), f"runs duplicated: {sorted(run.info.run_name for run in found)}"
    return by_name


def steps(client: MlflowClient, run: Run, key: str) -> list[tuple[int, float]]:
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, key))


# -- pure --------------------------------------------------------------------------------------------------


def test_a_variants_metrics_are_its_numbers_rounded_to_what_they_tell_and_only_a_treatment_is_compared(
    plan_and_config: tuple[ExperimentPlan, Config],
) -> None:
    plan, config = plan_and_config
    made = samples(300)
    result = results(plan, config, made)
    compared = (result.primary_metric, *result.guardrails)
    control, treatment = variant_metrics(result.variant("basic"), compared), variant_metrics(result.variant("professional"), compared)
    assert "latency_ms.lift" not in treatment and "latency_ms_mean" in treatment  # compared only where it decides
    for name, logged in (("basic", control), ("professional", treatment)):
        assert logged["requests"] == made[name]["users"].size
        assert logged["error_rate"] == pytest.approx(made[name]["error_rate"].mean(), rel=5e-4)
        assert logged[f"{SATISFACTION}.n"] == made[name][SATISFACTION].size
        assert logged[f"{SATISFACTION}.mean"] == pytest.approx(made[name][SATISFACTION].mean(), rel=5e-4)
        assert logged["latency_ms_mean"] == pytest.approx(made[name]["latency_ms"].mean(), rel=5e-4)
        assert logged["weight"] == 0.5
        assert "ttft_ms_p50" not in logged, "a metric with no data is left out, not logged as a number"
        assert "cost_usd_sum" not in logged, "no price, no cost: not a cost of $0"
    assert not any(key.endswith((".lift", ".p_value", ".ci_low")) for key in control), (
        "the control is not compared with itself"
    )
    lift = made["professional"][SATISFACTION].mean() / made["basic"][SATISFACTION].mean() - 1
    assert treatment[f"{SATISFACTION}.lift"] == pytest.approx(lift, rel=5e-4)
    assert treatment[f"{SATISFACTION}.p_value"] < 1e-6
    assert treatment[f"{SATISFACTION}.ci_low"] > 0
    assert treatment[f"{SATISFACTION}.p_value"] >= treatment[f"{SATISFACTION}.p_value_raw"], (
        "Holm never lowers a p-value"
    )
    # what the run page lists: no 0.999999999999061
    for logged in (control, treatment):
        assert logged["prob_best"] == round(logged["prob_best"], 3)
        assert all(float(f"{v:.4g}") == v for v in logged.values())
    assert float(f"{treatment[f'{SATISFACTION}.p_value']:.3g}") == treatment[f"{SATISFACTION}.p_value"]


# -- the layout ---------------------------------------------------------------------------------------------


def test_a_first_write_lays_out_the_experiment_the_summary_run_and_one_run_per_variant_with_the_winner_tagged(
    plan_and_config: tuple[ExperimentPlan, Config], uri: str
) -> None:
    plan, config = plan_and_config
    made = samples(300)
    result = results(plan, config, made)
    assert result.winner == "professional"
    written = MlflowWriter(uri).write(plan, result, {}, step=1)
    assert written.step == 1

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXP)
    assert experiment is not None and experiment.experiment_id == written.runs["experiment_id"]
    assert experiment.tags["abproxy.managed"] == "true"
    assert (experiment.tags["abproxy.status"], experiment.tags["abproxy.winner"]) == ("winner", "professional")
    assert experiment.tags["mlflow.note.content"].startswith("**Winner: professional")

    runs = runs_of(client)
    assert set(runs) == {"summary", "basic", "professional"}
    summary = runs["summary"]
    assert summary.info.run_id == written.runs["summary"]
    assert summary.data.tags["abproxy.role"] == "summary"
    assert (summary.data.tags["abproxy.status"], summary.data.tags["abproxy.winner"]) == ("winner", "professional")
    assert summary.data.tags[LAST_STEP_TAG] == "1"
    assert summary.data.metrics["srm_p_value"] == pytest.approx(result.srm.p_value, rel=5e-3)  # 3 digits
    report = json.loads(Path(client.download_artifacts(summary.info.run_id, "report.json")).read_text())
    assert (report["status"], report["winner"]) == ("winner", "professional")

    for name, arm in plan.arms.items():
        run = runs[name]
        assert run.info.run_id == written.runs[arm.arm_id]
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["abproxy.role"] == "variant" and tags["abproxy.variant"] == name
        assert tags["abproxy.control"] == ("true" if name == "basic" else "false")
        assert tags["abproxy.arm"] == f"{EXP}/{arm.arm_id}" and tags["abproxy.variant_hash"] == arm.definition_hash
        assert tags["abproxy.current"] == "true"
        assert "mlflow.parentRunId" not in tags  # beside the summary run, as MLflow's table shows it
        assert tags["abproxy.winner"] == ("true" if name == "professional" else "false")
        assert "abproxy.status" not in tags, "no experiment-wide tags on a variant's run"
        assert (params["model"], params["upstream"], params["weight"]) == ("gpt-4o-mini", "fake", "1")
        assert params["user_template"] == arm.definition.user_template
        assert metrics["requests"] == made[name]["users"].size
        assert metrics[f"{SATISFACTION}.mean"] == pytest.approx(made[name][SATISFACTION].mean(), rel=5e-4)
        prompt = Path(client.download_artifacts(run.info.run_id, "prompt/user_template.txt")).read_text()
        assert prompt == arm.definition.user_template
    assert runs["basic"].data.params["params.temperature"] == "0.7"
    assert runs["professional"].data.params["system_prompt"] == plan.arms["professional"].definition.system_prompt
    assert f"{SATISFACTION}.lift" in runs["professional"].data.metrics
    assert f"{SATISFACTION}.lift" not in runs["basic"].data.metrics

    models = {model.name: model for model in client.search_logged_models(experiment_ids=[experiment.experiment_id])}
    assert set(models) == {"basic", "professional"}
    assert models["professional"].tags["abproxy.winner"] == "true" and models["basic"].tags["abproxy.winner"] == "false"
    assert models["professional"].source_run_id == runs["professional"].info.run_id


# -- written twice, lost, later ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_same_look_written_again_with_or_without_its_run_ids_never_duplicates_a_run(
    plan_and_config: tuple[ExperimentPlan, Config], uri: str
) -> None:
    plan, config = plan_and_config
    result = results(plan, config, samples(300))
    writer = MlflowWriter(uri)
    first = writer.write(plan, result, {}, step=1)
    again = writer.write(plan, result, first.runs, step=2)
    assert again.runs == first.runs
    client = MlflowClient(uri)
    runs = runs_of(client)
    assert set(runs) == {"summary", "basic", "professional"}
    for name in ("basic", "professional"):
        assert steps(client, runs[name], "requests") == [(1, 300.0)], "nothing new to show: no new step"

    # The ids never reached Redis (a crash between MLflow and Redis): found again by their tags.
    lost = MlflowWriter(uri).write(plan, result, {}, step=3)
    assert {key: lost.runs[key] for key in ("experiment_id", "summary")} == {
        key: first.runs[key] for key in ("experiment_id", "summary")
    }
    assert all(lost.runs[arm.arm_id] == first.runs[arm.arm_id] for arm in plan.arms.values())
    assert set(runs_of(client)) == {"summary", "basic", "professional"}
    experiment = client.get_experiment_by_name(EXP)
    assert experiment is not None
    assert len(client.search_logged_models(experiment_ids=[experiment.experiment_id])) == 2


@pytest.mark.slow
def test_a_later_look_logs_at_a_later_step_on_the_same_runs_and_moves_the_winner_tags(
    plan_and_config: tuple[ExperimentPlan, Config], uri: str
) -> None:
    plan, config = plan_and_config
    early = results(plan, config, samples(20))  # 10 users per arm: too few to decide
    assert (early.status, early.winner) == ("collecting", None)
    writer = MlflowWriter(uri)
    first = writer.write(plan, early, {}, step=1)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXP)
    assert experiment is not None and experiment.tags["abproxy.winner"] == "none"
    assert {name: run.data.tags["abproxy.winner"] for name, run in runs_of(client).items() if name != "summary"} == {
        "basic": "false",
        "professional": "false",
    }

    made = samples(300, seed=2)
    later = results(plan, config, made)
    assert later.winner == "professional"
    second = writer.write(plan, later, first.runs, step=2)
    assert second.step == 2
    runs = runs_of(client)
    for name in ("basic", "professional"):
        assert runs[name].info.run_id == first.runs[plan.arms[name].arm_id]
        assert steps(client, runs[name], "requests") == [(1, 20.0), (2, 300.0)]
        assert runs[name].data.metrics[f"{SATISFACTION}.mean"] == pytest.approx(
            made[name][SATISFACTION].mean(), rel=5e-4
        )
    assert (
        runs["professional"].data.tags["abproxy.winner"] == "true"
        and runs["basic"].data.tags["abproxy.winner"] == "false"
    )
    assert runs["summary"].data.tags["abproxy.winner"] == "professional"
    assert runs["summary"].data.tags[LAST_STEP_TAG] == "2"
    experiment = client.get_experiment_by_name(EXP)
    assert experiment is not None and experiment.tags["abproxy.winner"] == "professional"


@pytest.mark.slow
def test_after_redis_lost_its_flush_count_the_next_look_logs_after_the_last_step_mlflow_holds(
    plan_and_config: tuple[ExperimentPlan, Config], uri: str
) -> None:
    plan, config = plan_and_config
    writer = MlflowWriter(uri)
    writer.write(plan, results(plan, config, samples(100)), {}, step=7)
    # FLUSHALL: no run ids, and the flush count starts again at 1
    written = writer.write(plan, results(plan, config, samples(300)), {}, step=1)
    assert written.step == 8
    client = MlflowClient(uri)
    runs = runs_of(client)
    assert steps(client, runs["professional"], "requests") == [(7, 100.0), (8, 300.0)]
    assert runs["professional"].data.metrics["requests"] == 300, "MLflow's latest number is the one Redis holds"
    assert runs["summary"].data.tags[LAST_STEP_TAG] == "8"


@pytest.mark.slow
def test_an_arm_stopped_for_harm_is_tagged_with_the_guardrail_until_it_is_resumed(
    plan_and_config: tuple[ExperimentPlan, Config], uri: str
) -> None:
    plan, config = plan_and_config
    arm_id = plan.arms["professional"].arm_id
    stopped_at = time.time()
    made = samples(300)
    writer = MlflowWriter(uri)
    first = writer.write(
        plan, results(plan, config, made, {arm_id: Stop("professional", "error_rate", stopped_at)}), {}, step=1
    )
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXP)
    assert experiment is not None

    def stopped_tags() -> dict[str, tuple[str | None, str | None]]:
        runs = runs_of(client)
        models = {m.name: m for m in client.search_logged_models(experiment_ids=[experiment.experiment_id])}
        return {name: (runs[name].data.tags.get(STOPPED_TAG), models[name].tags.get(STOPPED_TAG)) for name in plan.arms}

    assert stopped_tags() == {"professional": ("error_rate", "error_rate"), "basic": (None, None)}
    resumed = {arm_id: Stop("professional", "error_rate", stopped_at, resumed=stopped_at + 60)}
    writer.write(plan, results(plan, config, made, resumed), first.runs, step=2)
    assert stopped_tags() == {"professional": (None, None), "basic": (None, None)}


def test_arm_runs_an_earlier_version_nested_under_the_summary_are_moved_beside_it(
    plan_and_config: tuple[ExperimentPlan, Config], uri: str
) -> None:
    """Earlier versions made each arm's run a child of the summary run, which MLflow's table
    shows collapsed: one flush of this version lists them at the top level, once."""
    plan, config = plan_and_config
    result = results(plan, config, samples(40))
    writer = MlflowWriter(uri)
    first = writer.write(plan, result, {}, step=1)
    client = MlflowClient(uri)
    for name, run in runs_of(client).items():
        if name != "summary":  # as an earlier version left them
            client.set_tag(run.info.run_id, "mlflow.parentRunId", first.runs["summary"])
    earlier = {key: value for key, value in first.runs.items() if key != "digest:layout"}
    second = writer.write(plan, results(plan, config, samples(60)), earlier, step=2)
    assert all("mlflow.parentRunId" not in run.data.tags for run in runs_of(client).values())
    assert second.runs["digest:layout"] == "top-level"
