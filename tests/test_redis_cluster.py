"""abproxy on a real Redis Cluster (three masters, one replica each, on loopback): pointed at
any node it finds the cluster itself, and counts, joins feedback and flushes exactly as on one
Redis, also with two replicas of abproxy, also when a master dies under traffic."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from abproxy.app import ABProxyApp, open_redis
from abproxy.recording import layout
from clusterkit import FAILOVER_NODE_TIMEOUT_MS, RedisCluster, server_binaries
from proxykit import BASE_EXPERIMENTS, Proxy, make_config, serve
from flushkit import flush, users_for
from helpers import http_json, wait_until

EXPERIMENTS = ("translation", "sentiment")


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(binary, id=name, marks=() if index == 0 else pytest.mark.slow)
        for index, (name, binary) in enumerate(server_binaries().items())
    ],
)
def redis_binary(request: pytest.FixtureRequest) -> str:
    """Each Redis and Valkey server this machine has (the suite's own in the fast lane)."""
    return str(request.param)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_binary: str) -> Iterator[RedisCluster]:
    running = RedisCluster(tmp_path_factory.mktemp("cluster"), binary=redis_binary)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def clean_cluster(cluster: RedisCluster) -> RedisCluster:
    cluster.flushall()
    return cluster


@pytest.fixture
def start_on(upstream_url: str) -> Iterator[Callable[..., Proxy]]:
    """Start a proxy on a given Redis URL (a cluster node's, or one Redis's)."""
    started: list[Proxy] = []

    def start(redis_url: str, **overrides: Any) -> Proxy:
        # sentiment by user too: the same users then make the same traffic on every Redis
        experiments = copy.deepcopy(BASE_EXPERIMENTS)
        experiments["sentiment"]["unit"] = "user"
        config = make_config(upstream_url, experiments=experiments, **overrides)
        proxy = serve(ABProxyApp(config, redis_url=redis_url))
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def ask(client: Any, model: str, user: str, content: str = "hi") -> Any:
    """One request to an experiment's model, with the variables its templates need."""
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], user=user,
        extra_body={"abproxy_variables": {"product": "a phone"}},
    )  # fmt: skip


def traffic(proxies: list[Proxy], prefix: str, per_variant: int = 6) -> dict[str, int]:
    """Deterministic traffic to both experiments: users chosen per variant, requests spread over
    ``proxies`` in turn, a feedback score per request posted to the next proxy (by request id or
    by response id, in turn). Returns the
    requests sent per experiment."""
    sent = {experiment: 0 for experiment in EXPERIMENTS}
    plans = proxies[0].app.catalog.plans
    turn = 0
    for experiment, model, name in (("translation", "translation", "satisfaction"), ("sentiment", "sentiment", "accuracy")):
        plan = plans[experiment]
        for variant in plan.arms:
            for i, user in enumerate(users_for(plan, variant, per_variant, f"{prefix}-{experiment}-{variant}")):
                proxy = proxies[turn % len(proxies)]
                raw = ask(proxy.client(), model, user, f"sentence {i}")
                sent[experiment] += 1
                score = (1 + (i * 7 + len(variant)) % 5) if name == "satisfaction" else (i + len(variant)) % 2
                feedback_to = proxies[(turn + 1) % len(proxies)]
                if feedback_to is not proxy:
                    proxy.settle()  # another replica finds only what this one has written
                # by the proxy's request id, or every other time by the upstream's response id
                named = raw.headers["x-abproxy-request-id"] if i % 2 == 0 else raw.parse().id
                feedback = {"request_id": named, "name": name, "score": score}
                status, body = http_json("POST", f"{feedback_to.url}/v1/feedback", feedback)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if not (status == 503 and "post it again" in body["error"]["message"]):
                        break
                    # No replica confirmed the score within 200 ms (a loaded machine: it happened
                    # twice in a row in CI): as the answer says, post it again, as a client that
                    # retries would. Had an earlier one been written after all, the next updates
                    # it: the exact totals below show nothing counted twice.
                    time.sleep(0.2)
                    status, body = http_json("POST", f"{feedback_to.url}/v1/feedback", feedback)
                assert status == 200, body
                turn += 1
    for proxy in proxies:
        proxy.settle()
    return sent


def totals(proxy: Proxy, experiment: str, feedback: str) -> tuple[int, int]:
    status, body = http_json("GET", f"{proxy.url}/abproxy/experiments/{experiment}")
    assert status == 200, body
    requests = sum(v["requests"] for v in body["variants"])
    scores = sum(v["metrics"].get(f"feedback.{feedback}", {}).get("n", 0) for v in body["variants"])
    return requests, scores


def mlflow_numbers(uri: str) -> dict[tuple[str, str], dict[str, float]]:
    """(experiment, run name) → the metrics of its last step that do not depend on timing."""
    client = MlflowClient(uri)
    numbers = {}
    for experiment in EXPERIMENTS:
        found = client.get_experiment_by_name(experiment)
        assert found is not None, experiment
        for run in client.search_runs([found.experiment_id]):
            numbers[(experiment, run.info.run_name)] = {
                key: value for key, value in run.data.metrics.items() if not any(t in key for t in ("latency", "ttft", "duration"))
            }
    return numbers


def test_cluster_mode_is_told_from_any_node_and_the_keys_of_a_flush_share_a_slot(clean_cluster: RedisCluster, redis_server: Any) -> None:
    """No setting: a master's URL or a replica's gives a cluster client, one Redis a plain one."""

    async def kinds() -> list[type]:
        clients = [open_redis(clean_cluster.nodes[0].url), open_redis(clean_cluster.nodes[-1].url), open_redis(redis_server.url)]
        try:
            for client in clients:
                await client.set(layout.FLUSH_LOCK_KEY, "x")
                await client.set(layout.FLUSH_FENCE_KEY, "1")
                await client.set(layout.FLUSH_INTERVAL_KEY, "x")
                await client.delete(layout.FLUSH_LOCK_KEY, layout.FLUSH_FENCE_KEY, layout.FLUSH_INTERVAL_KEY)  # one slot, or it fails
            return [type(client) for client in clients]
        finally:
            for client in clients:
                await client.aclose()

    assert asyncio.run(kinds()) == [ClusterClient, ClusterClient, Redis]


@pytest.mark.slow
def test_traffic_feedback_and_flush_on_a_cluster_give_exact_totals_and_the_mlflow_results_of_one_redis(
    clean_cluster: RedisCluster, redis_server: Any, redis_client: Any, start_on: Callable[..., Proxy], tmp_path: Path
) -> None:
    # The two experiments live on different masters, the flush keys on one of them.
    masters = {clean_cluster.master_of(layout.experiment_tag(e)).port for e in EXPERIMENTS}
    assert len(masters) == 2
    uris = {}
    for where, url in (("cluster", clean_cluster.nodes[-1].url), ("one redis", redis_server.url)):
        uris[where] = f"sqlite:///{tmp_path}/{where.replace(' ', '_')}.db"
        proxy = start_on(url, mlflow={"tracking_uri": uris[where], "flush_interval_s": 0})
        sent = traffic([proxy], "same")
        assert totals(proxy, "translation", "satisfaction") == (sent["translation"],) * 2
        assert totals(proxy, "sentiment", "accuracy") == (sent["sentiment"],) * 2
        status, body = flush(proxy)
        assert status == 200 and all("error" not in e for e in body["experiments"].values()), body
        assert body["step"] == 1
    on_cluster, on_one = mlflow_numbers(uris["cluster"]), mlflow_numbers(uris["one redis"])
    assert on_cluster.keys() == on_one.keys() and len(on_cluster) == 6
    differing = {
        (run, key): (value, on_one[run].get(key)) for run, metrics in on_cluster.items() for key, value in metrics.items() if on_one[run].get(key) != value
    }
    assert differing == {}


@pytest.mark.slow
def test_two_abproxy_replicas_on_a_cluster_count_exactly_and_flush_once(
    clean_cluster: RedisCluster, start_on: Callable[..., Proxy], tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    replicas = [start_on(clean_cluster.nodes[i].url, mlflow={"tracking_uri": uri, "flush_interval_s": 0}) for i in (1, 2)]
    sent = traffic(replicas, "two")
    for replica in replicas:
        assert totals(replica, "translation", "satisfaction") == (sent["translation"],) * 2
        assert totals(replica, "sentiment", "accuracy") == (sent["sentiment"],) * 2
    # One fencing token for both: their flushes are steps 1 and 2 of the same runs.
    assert [flush(replica)[1]["step"] for replica in replicas] == [1, 2]
    numbers = mlflow_numbers(uri)
    assert len(numbers) == 6
    assert sum(m["requests"] for (_, name), m in numbers.items() if name != "summary") == sum(sent.values())


@pytest.mark.slow
def test_a_master_killed_under_traffic_loses_nothing_and_doubles_nothing(
    tmp_path: Path, start_on: Callable[..., Proxy], redis_binary: str
) -> None:
    """The recorder drops a batch from memory only once a replica has it: the replica that takes
    over has every batch abproxy let go of, and the ones it had not are written again (their
    dedupe keys make a second write of one it had change nothing)."""
    cluster = RedisCluster(tmp_path / "cluster", binary=redis_binary, node_timeout_ms=FAILOVER_NODE_TIMEOUT_MS)
    cluster.start()
    try:
        proxy = start_on(cluster.url)
        victim = cluster.master_of(layout.experiment_tag("translation"))
        answered = {experiment: 0 for experiment in EXPERIMENTS}
        scored = {experiment: 0 for experiment in EXPERIMENTS}
        stop = threading.Event()

        def send(experiment: str, feedback: str) -> None:
            client = proxy.client()
            i = 0
            while not stop.is_set():
                raw = ask(client, experiment, f"kill-{experiment}-{i}")
                answered[experiment] += 1
                i += 1
                if i % 3 == 0:
                    body = {"request_id": raw.headers["x-abproxy-request-id"], "name": feedback, "score": 1}
                    # 503 while the slot has no master (or the score is not confirmed): post again
                    deadline = time.monotonic() + 30
                    while http_json("POST", f"{proxy.url}/v1/feedback", body)[0] != 200:
                        assert time.monotonic() < deadline
                        time.sleep(0.1)
                    scored[experiment] += 1

        senders = [threading.Thread(target=send, args=pair) for pair in (("translation", "satisfaction"), ("sentiment", "accuracy"))]
        for sender in senders:
            sender.start()
        wait_until(lambda: answered["translation"] >= 40, timeout=30)
        victim.kill()
        cluster.wait_failover(victim)
        seen_at_failover = dict(answered)
        wait_until(lambda: answered["translation"] >= seen_at_failover["translation"] + 40, timeout=30)
        stop.set()
        for sender in senders:
            sender.join()
        proxy.settle(timeout_s=60)
        assert totals(proxy, "translation", "satisfaction") == (answered["translation"], scored["translation"])
        assert totals(proxy, "sentiment", "accuracy") == (answered["sentiment"], scored["sentiment"])
    finally:
        cluster.stop()


@pytest.mark.slow
def test_the_client_finds_the_cluster_again_while_the_first_master_is_down(tmp_path: Path, redis_binary: str) -> None:
    """redis-py re-learns the whole layout after a CLUSTERDOWN or a closed client, and asks the
    first master listed (slot 0's) for the command table: with that master and its replica
    down, a plain client reached no node at all. abproxy's asks the next master."""
    cluster = RedisCluster(
        tmp_path / "cluster", require_full_coverage=False, binary=redis_binary, node_timeout_ms=FAILOVER_NODE_TIMEOUT_MS
    )
    cluster.start()
    try:
        first = cluster.master_of("{06S}")  # a key in slot 0
        elsewhere = next(key for key in ("{a}", "{b}", "{c}", "{d}") if cluster.master_of(key) is not first)

        async def after_relearning() -> str | None:
            client = open_redis(cluster.nodes[-1].url)
            try:
                await client.set(elsewhere, "before")
                first.kill()
                cluster.nodes[cluster.nodes.index(first) + cluster.masters].kill()
                await client.aclose()  # what redis-py does itself on CLUSTERDOWN
                # as abproxy's writes do: learn the layout first (redis-py sends the command that
                # makes it re-learn to a random master, possibly the dead one)
                await client.initialize()
                await client.set(elsewhere, "after")
                return await client.get(elsewhere)
            finally:
                await client.aclose()

        assert asyncio.run(after_relearning()) == "after"
    finally:
        cluster.stop()


@pytest.mark.slow
def test_a_slot_without_any_master_holds_up_no_other_experiment_and_catches_up_when_back(
    tmp_path: Path, start_on: Callable[..., Proxy], redis_binary: str
) -> None:
    """Translation's master and its replica both down: its batches wait in memory while
    sentiment's keep being written; once the two are back, translation's totals are exact."""
    cluster = RedisCluster(
        tmp_path / "cluster", require_full_coverage=False, binary=redis_binary, node_timeout_ms=FAILOVER_NODE_TIMEOUT_MS
    )
    cluster.start()
    try:
        proxy = start_on(cluster.url)
        master = cluster.master_of(layout.experiment_tag("translation"))
        replica = cluster.nodes[cluster.nodes.index(master) + cluster.masters]
        assert cluster.master_of(layout.experiment_tag("sentiment")) is not master
        client = proxy.client()
        for i in range(10):
            ask(client, "translation", f"down-{i}"), ask(client, "sentiment", f"down-{i}")
        proxy.settle()
        replica.kill()
        master.kill()
        for i in range(10, 40):
            ask(client, "translation", f"down-{i}"), ask(client, "sentiment", f"down-{i}")
        # Sentiment is written while translation's 30 wait.
        wait_until(lambda: totals(proxy, "sentiment", "accuracy")[0] == 40, timeout=20)
        assert proxy.app.recorder.buffered == 30
        master.start()
        replica.start()
        proxy.settle(timeout_s=60)
        assert totals(proxy, "translation", "satisfaction")[0] == 40
        assert totals(proxy, "sentiment", "accuracy")[0] == 40
    finally:
        cluster.stop()


def test_on_one_redis_too_an_experiment_whose_write_fails_holds_up_no_other(
    redis_server: Any, redis_client: Any, start_on: Callable[..., Proxy]
) -> None:
    """abproxy's Redis user may not touch translation's keys for a while (an ACL: Redis refuses
    the script before it runs): translation's batches wait in memory while sentiment's are
    written. Allowed again, nothing is lost."""
    redis_client.execute_command("ACL", "SETUSER", "limited", "on", ">secret", "+@all", "resetkeys", "~abproxy:{sentiment}:*")
    try:
        proxy = start_on(redis_server.url.replace("redis://", "redis://limited:secret@"))
        client = proxy.client()
        for i in range(5):
            ask(client, "translation", f"one-{i}"), ask(client, "sentiment", f"one-{i}")
        wait_until(lambda: totals(proxy, "sentiment", "accuracy")[0] == 5, timeout=10)
        assert proxy.app.recorder.buffered == 5
        redis_client.execute_command("ACL", "SETUSER", "limited", "~*")
        proxy.settle()
        assert totals(proxy, "translation", "satisfaction")[0] == 5
    finally:
        redis_client.execute_command("ACL", "DELUSER", "limited")
