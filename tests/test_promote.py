"""`abproxy promote`: the winner registered in MLflow's Prompt Registry under an alias, and served
to all new traffic by every replica at once, until `--undo`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from flushkit import EXP, drive, flush, live
from helpers import REPO, http_json, metrics_text, sample, wait_until
from mlflow.tracking import MlflowClient

from proxykit import BASE_EXPERIMENTS, make_config


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
        "experiment": EXP, "promoted": "professional", "alias": "production",
        "version": 1, "prompt_uri": f"prompts:/{EXP}@production", "cautions": [],
    }  # fmt: skip

    prompt = MlflowClient(tracking_uri=uri, registry_uri=uri).load_prompt(f"prompts:/{EXP}@production")
    professional = BASE_EXPERIMENTS[EXP]["variants"]["professional"]
    assert prompt.template == [
        {"role": "system", "content": professional["system_prompt"]},
        {"role": "user", "content": professional["user_template"]},
    ]
    assert prompt.tags["abproxy.variant"] == "professional" and prompt.tags["abproxy.status"] == "winner"
    assert prompt.model_config["model_name"] == "gpt-4o-mini"

    assert new_users_get(proxy, "after") == {"professional"}  # at once on the replica that promoted
    wait_until(lambda: new_users_get(other, "other", 4) == {"professional"}, timeout=10)  # within a second on the other
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
    assert status == 200 and body["promoted"] is None
    assert new_users_get(proxy, "undone", 16) == {"basic", "professional"}
    assert live(proxy)["promoted"] is None

    status, again = http_json("POST", f"{proxy.url}/abproxy/experiments/{EXP}/promote", {"variant": "basic", "alias": "staging"})
    assert status == 200 and again["version"] == 2 and again["prompt_uri"] == f"prompts:/{EXP}@staging"
    staging = MlflowClient(tracking_uri=uri, registry_uri=uri).load_prompt(f"prompts:/{EXP}@staging")
    assert staging.template[-1]["content"] == BASE_EXPERIMENTS[EXP]["variants"]["basic"]["user_template"]


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
    wait_until(lambda: new_users_get(proxy, "verb-after", 6) == {"professional"}, timeout=10)
    undone = verb("--undo")
    assert undone.returncode == 0 and "undone" in undone.stdout
    assert verb("no-such-variant").returncode == 1
    assert flush(proxy)[0] == 200
