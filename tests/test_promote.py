"""`abproxy promote`: the winner registered in MLflow's Prompt Registry under an alias, and served
to all new traffic by every replica at once, until `--undo`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from flushkit import EXP, drive, flush, live
from helpers import REPO, http_json, metrics_text, sample, wait_until
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from proxykit import BASE_EXPERIMENTS, make_config

from abproxy.app import open_redis
from abproxy.proxy.overrides import LiveOverrides


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def new_users_get(proxy: Any, prefix: str, count: int = 12) -> set[str]:
    client = proxy.client()
    served = set()
    for i in range(count):
        raw = client.chat.completions.with_raw_response.create(
            model="translation", messages=[{"role": "user", "content": f"hello {i}"}], user=f"{prefix}-{i}"
        )
        served.add(raw.headers["x-abproxy-variant"])
    return served


@pytest.mark.slow
def test_promote_registers_the_winner_and_every_replica_serves_it_until_undone(
    start_proxy: Any, upstream_url: str, uri: str
) -> None:
    config = make_config(upstream_url, mlflow={"tracking_uri": uri, "flush_interval_s": 0})
    proxy, other = start_proxy(config), start_proxy(config)  # two replicas on one Redis
    status, body = http_json("POST", f"{proxy.url}/abproxy/experiments/{EXP}/promote", {})
    assert status == 409 and body["error"]["code"] == "no_winner", body  # nothing to promote yet
    assert "no winner yet" in body["error"]["message"]

    drive(proxy, {"basic": 40, "professional": 40}, "promote")
    assert live(proxy)["winner"] == "professional"
    status, promotion = http_json("POST", f"{proxy.url}/abproxy/experiments/{EXP}/promote", {})
    assert status == 200, promotion
    assert promotion == {
        "experiment": EXP, "promoted": "professional", "alias": "production", "version": 1,
        "prompt_uri": f"prompts:/{EXP}@production", "status": "winner", "cautions": [],
    }  # fmt: skip

    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    prompt = registry.load_prompt(f"prompts:/{EXP}@production")
    professional = BASE_EXPERIMENTS[EXP]["variants"]["professional"]
    assert prompt.template == [
        {"role": "system", "content": professional["system_prompt"]},
        {"role": "user", "content": professional["user_template"]},
    ]
    assert prompt.tags["abproxy.variant"] == "professional" and prompt.tags["abproxy.status"] == "winner"
    assert prompt.model_config["model_name"] == "gpt-4o-mini"
    assert flush(proxy)[0] == 200  # the flush finds the promoted arm's version, and registers the other arm
    experiment = registry.get_experiment_by_name(EXP)
    assert [p.name for p in registry.search_prompts(f"experiment_id = '{experiment.experiment_id}'")] == [EXP]
    status, again = http_json("POST", f"{proxy.url}/abproxy/experiments/{EXP}/promote", {})
    assert status == 200 and again["version"] == 1  # the same version, never a copy
    assert sorted(v.tags["abproxy.variant"] for v in registry.search_prompt_versions(EXP)) == ["basic", "professional"]

    assert new_users_get(proxy, "after") == {"professional"}  # at once on the replica that promoted
    wait_until(lambda: new_users_get(other, "other", 4) == {"professional"}, timeout=60)  # within a second on the other
    proxy.settle()
    other.settle()
    before = {v["name"]: v["requests"] for v in live(proxy)["variants"]}
    assert new_users_get(proxy, "later") == new_users_get(other, "later-other") == {"professional"}
    proxy.settle()
    other.settle()
    after = live(proxy)
    assert after["promoted"] == "professional"
    assert {v["name"]: v["requests"] for v in after["variants"]} == before  # the test is over: kept out
    text = metrics_text(proxy.url)
    assert sample(text, "abproxy_requests_total", experiment=EXP, variant="professional", status="200") >= 12

    status, body = http_json("DELETE", f"{proxy.url}/abproxy/experiments/{EXP}/promote")
    assert status == 200, body
    assert body == {"experiment": EXP, "promoted": None, "aliases": {"production": None}, "aliases_restored": True}
    assert new_users_get(proxy, "undone", 16) == {"basic", "professional"}
    assert live(proxy)["promoted"] is None
    with pytest.raises(MlflowException):  # the alias pointed nowhere before the promotion: removed
        registry.get_prompt_version_by_alias(EXP, "production")

    status, manual = http_json("POST", f"{proxy.url}/abproxy/experiments/{EXP}/promote", {"variant": "basic", "alias": "staging"})
    assert status == 200, manual
    assert manual["version"] == 2 and manual["status"] == "manual" and manual["prompt_uri"] == f"prompts:/{EXP}@staging"
    staging = registry.load_prompt(f"prompts:/{EXP}@staging")
    assert staging.template[-1]["content"] == BASE_EXPERIMENTS[EXP]["variants"]["basic"]["user_template"]
    assert staging.tags["abproxy.status"] == "manual" and staging.tags["abproxy.winner"] == "professional"
    assert len(registry.search_prompt_versions(EXP)) == 2


def test_a_promote_during_a_refresh_is_not_taken_back_by_what_the_refresh_read(redis_client: Any, redis_server: Any) -> None:
    """Every replica re-reads the overrides from Redis each second. A promote on this replica
    while such a read is on its way (begun before the promote was written) serves the promoted
    variant at once and after the read; the next refresh follows Redis again."""

    async def main() -> tuple[str | None, str | None]:
        redis = open_redis(redis_server.url)
        try:
            overrides = LiveOverrides([EXP])
            reading = asyncio.create_task(overrides.refresh(redis))
            await asyncio.sleep(0)  # the read is on its way; its answer cannot have come yet
            overrides.set_promoted(EXP, "professional")
            await reading
            after_the_read = overrides.promoted(EXP)
            await overrides.refresh(redis)  # Redis holds no promotion (this test wrote none)
            return after_the_read, overrides.promoted(EXP)
        finally:
            await redis.aclose()

    assert asyncio.run(main()) == ("professional", None)


@pytest.mark.slow
def test_undo_puts_an_alias_back_on_the_version_it_had(start_proxy: Any, upstream_url: str, uri: str) -> None:
    """The alias already named a release (the control, say) before the winner was promoted:
    undo puts it back there, and a second promote before the undo does not change that."""
    proxy = start_proxy(make_config(upstream_url, mlflow={"tracking_uri": uri, "flush_interval_s": 0}))
    drive(proxy, {"basic": 40, "professional": 40}, "restore")
    assert flush(proxy)[0] == 200
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {v.tags["abproxy.variant"]: int(v.version) for v in registry.search_prompt_versions(EXP)}
    registry.set_prompt_alias(EXP, "production", versions["basic"])  # today's release

    for _ in range(2):
        status, promotion = http_json("POST", f"{proxy.url}/abproxy/experiments/{EXP}/promote", {})
        assert status == 200 and promotion["version"] == versions["professional"], promotion
    assert int(registry.get_prompt_version_by_alias(EXP, "production").version) == versions["professional"]
    status, body = http_json("DELETE", f"{proxy.url}/abproxy/experiments/{EXP}/promote")
    assert status == 200 and body["aliases"] == {"production": versions["basic"]}, body
    assert int(registry.get_prompt_version_by_alias(EXP, "production").version) == versions["basic"]
    status, body = http_json("DELETE", f"{proxy.url}/abproxy/experiments/{EXP}/promote")
    assert status == 200 and body["aliases"] == {}  # nothing left to undo: the alias stays
    assert int(registry.get_prompt_version_by_alias(EXP, "production").version) == versions["basic"]


@pytest.mark.slow
def test_the_promote_verb(start_proxy: Any, upstream_url: str, redis_server: Any, uri: str, tmp_path: Path) -> None:
    settings = {
        "redis_url": redis_server.url,
        "mlflow": {"tracking_uri": uri, "flush_interval_s": 0},
        "upstreams": {"fake": {"base_url": upstream_url}},
        "default_upstream": "fake",
        "experiments": {EXP: BASE_EXPERIMENTS[EXP]},
    }
    path = tmp_path / "abproxy.yaml"
    path.write_text(yaml.safe_dump(settings))

    def verb(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "abproxy", "promote", EXP, *args, "--config", str(path)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip

    refused = verb()
    assert refused.returncode == 1 and "no winner yet" in refused.stderr, refused
    proxy = start_proxy(make_config(upstream_url, mlflow={"tracking_uri": uri, "flush_interval_s": 0}))
    drive(proxy, {"basic": 40, "professional": 40}, "verb")
    promoted = verb()
    assert promoted.returncode == 0, promoted.stderr
    assert f"prompts:/{EXP}@production" in promoted.stdout and "promoted professional" in promoted.stdout
    assert "warning" not in promoted.stderr
    wait_until(lambda: new_users_get(proxy, "verb-after", 6) == {"professional"}, timeout=60)
    undone = verb("--undo")
    assert undone.returncode == 0 and "undone" in undone.stdout
    assert f"Prompt Registry: {EXP} alias production: removed" in undone.stdout
    by_hand = verb("basic")
    assert by_hand.returncode == 0, by_hand.stderr
    assert "warning: basic is not the winner (the declared winner is professional)" in by_hand.stderr
    assert verb("no-such-variant").returncode == 1
    assert flush(proxy)[0] == 200


@pytest.mark.slow
def test_undo_with_mlflow_away_gives_the_traffic_back_and_a_second_undo_restores_the_alias(
    start_proxy: Any, upstream_url: str, uri: str, tmp_path: Path
) -> None:
    proxy = start_proxy(make_config(upstream_url, mlflow={"tracking_uri": uri, "flush_interval_s": 0}))
    drive(proxy, {"basic": 40, "professional": 40}, "away")
    assert flush(proxy)[0] == 200
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {v.tags["abproxy.variant"]: int(v.version) for v in registry.search_prompt_versions(EXP)}
    registry.set_prompt_alias(EXP, "production", versions["basic"])
    status, _ = http_json("POST", f"{proxy.url}/abproxy/experiments/{EXP}/promote", {})
    assert status == 200

    database = tmp_path / "mlflow.db"
    database.rename(tmp_path / "mlflow.db.away")  # the store is gone: the undo meets an empty one
    status, body = http_json("DELETE", f"{proxy.url}/abproxy/experiments/{EXP}/promote")
    assert status == 200, body
    assert body["aliases_restored"] is False and "run the undo again" in body["problem"]
    assert live(proxy)["promoted"] is None  # the traffic is back on the experiment all the same
    assert new_users_get(proxy, "away-undone", 16) == {"basic", "professional"}

    database.unlink(missing_ok=True)
    (tmp_path / "mlflow.db.away").rename(database)  # the store is back
    status, body = http_json("DELETE", f"{proxy.url}/abproxy/experiments/{EXP}/promote")
    assert status == 200 and body["aliases"] == {"production": versions["basic"]} and body["aliases_restored"], body
    assert int(registry.get_prompt_version_by_alias(EXP, "production").version) == versions["basic"]
