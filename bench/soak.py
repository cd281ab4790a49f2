"""A soak of a sick Redis under traffic: nothing lost, nothing doubled, nothing silent.

    python bench/soak.py [--phase-s 20] [--clients 6] [--users 300]

Starts its own redis-server, the simulated OpenAI-compatible provider and a real ``abproxy
serve`` (a process of its own, on that Redis), then sends requests with the real ``openai`` SDK
from ``--clients`` threads (JSON and streams, two experiments, ``--users`` users) and posts
feedback for some of the answers (some of it twice, which must update, not add). Meanwhile Redis
goes through, in turn, a phase of ``--phase-s`` seconds each:

* ``steady``: nothing wrong;
* ``killed``: SIGKILL, down for a third of the phase, restarted from its append-only file;
* ``stopped``: SIGSTOP for half the phase (it hangs: connections stay open, nothing answers);
* ``poisoned``: one arm's histogram replaced by a string (a hand edit), mended after half the phase;
* ``full``: ``maxmemory`` below what it holds, ``noeviction`` (every write refused: OOM) for half
  the phase;
* ``evicting``: ``allkeys-lru`` with ``maxmemory`` below what it holds (Redis evicts keys), half
  the phase;
* ``steady`` again.

Then it compares what the clients were served and told with what Redis holds, per arm: requests
sent, requests recorded, reported dropped (``abproxy_recorder_dropped_total{reason}``), lost
(sent, not recorded and not reported) and doubled (recorded beyond what was sent); feedback
accepted against feedback counted; and whether the live results said what happened
(``corrupt_counters`` while poisoned, ``redis_evicted_keys`` after evicting). Takes
``8 × --phase-s`` seconds and a little more.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from abproxy.catalog import Catalog
from abproxy.config import parse_config
from abproxy.recording import layout
from abproxy.recording.embedded_redis import EmbeddedRedis, free_port
from abproxy.simulation.fake_upstream import FakeUpstream
from abproxy.simulation.server import serve_in_thread

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS: dict[str, Any] = {
    "translation": {
        "match": {"model": "translation"},
        "unit": "user",
        "primary_metric": "feedback.satisfaction",
        "feedback": {"satisfaction": {"min": 1, "max": 5}},
        "variants": {
            "basic": {"control": True, "model": "gpt-4o-mini", "user_template": "Translate: {{input}}"},
            "professional": {"model": "gpt-4o-mini", "system_prompt": "You are a translator."},
        },
    },
    "sentiment": {
        "match": {"model": "sentiment"},
        "unit": "request",
        "feedback": {"accuracy": {"min": 0, "max": 1}},
        "variants": {
            "simple": {"control": True, "model": "gpt-4o-mini"},
            "detailed": {"model": "gpt-4o", "system_prompt": "Think about the sentiment first."},
        },
    },
}
FEEDBACK = {"translation": ("satisfaction", (1, 5)), "sentiment": ("accuracy", (0, 1))}
POISONED = ("translation", "professional")


def http_json(method: str, url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


class Tally:
    """What the clients were served and told, under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: Counter[tuple[str, str]] = Counter()
        self.scored: dict[tuple[str, str], set[str]] = {}
        """Per arm, the responses whose score the proxy accepted (a re-post replaces it)."""
        self.updated_feedback = 0
        self.updates_not_recognised = 0
        self.failures: Counter[str] = Counter()
        self.feedback_refused: Counter[int] = Counter()
        self.users: dict[str, set[str]] = {"translation": set(), "sentiment": set()}
        self.sent_by_phase: Counter[str] = Counter()
        self.never_accepted = 0


class Traffic(threading.Thread):
    def __init__(self, proxy_url: str, tally: Tally, users: int, seed: int, phase: list[str], stop: threading.Event):
        super().__init__(daemon=True)
        self.proxy_url = proxy_url
        self.client = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key="sk-soak", max_retries=0, timeout=30)
        self.tally = tally
        self.users = users
        self.rng = random.Random(seed)
        self.phase = phase
        self.stop_event = stop
        self.waiting: list[_Score] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.retry_scores()
                self.one()
            except openai.APIError as error:
                with self.tally.lock:
                    self.tally.failures[type(error).__name__] += 1
        deadline = time.monotonic() + 120
        while self.waiting and time.monotonic() < deadline:
            self.retry_scores()
            time.sleep(0.25)
        with self.tally.lock:
            self.tally.never_accepted += len(self.waiting)

    def one(self) -> None:
        experiment = self.rng.choice(("translation", "sentiment"))
        user = f"u{self.rng.randrange(self.users)}"
        kwargs: dict[str, Any] = dict(model=experiment, messages=[{"role": "user", "content": f"hello from {user}"}], user=user)
        if self.rng.random() < 0.3:
            raw = self.client.chat.completions.with_raw_response.create(**kwargs, stream=True)
            response_id = None
            for chunk in raw.parse():
                response_id = chunk.id
        else:
            raw = self.client.chat.completions.with_raw_response.create(**kwargs)
            response_id = raw.parse().id
        variant = raw.headers["x-abproxy-variant"]
        with self.tally.lock:
            self.tally.sent[(experiment, variant)] += 1
            self.tally.sent_by_phase[self.phase[0]] += 1
            self.tally.users[experiment].add(user)
        if self.rng.random() < 0.3:
            request_id = raw.headers["x-abproxy-request-id"] if self.rng.random() < 0.5 else response_id
            name, (low, high) = FEEDBACK[experiment]
            first = _Score((experiment, variant), {"request_id": request_id, "name": name, "score": self.rng.randint(low, high)})
            again = None
            if self.rng.random() < 0.2:
                again = _Score(first.arm, {**first.body, "score": self.rng.randint(low, high)}, repost=True)
            if not self.post(first):
                self.waiting.append(first)  # the re-post waits behind it: it must update, not add
                if again:
                    self.waiting.append(again)
            elif again and not self.post(again):
                self.waiting.append(again)

    def retry_scores(self) -> None:
        """Post again what the proxy could not take (Redis away or full): the app's part, since a
        503 tells it nothing was kept. Scores for one request go in order."""
        kept = []
        for score in self.waiting:
            if any(other.body["request_id"] == score.body["request_id"] for other in kept) or not self.post(score):
                kept.append(score)
        self.waiting = kept

    def post(self, score: _Score) -> bool:
        status, answer = http_json("POST", f"{self.proxy_url}/v1/feedback", score.body)
        with self.tally.lock:
            if status != 200:
                self.tally.feedback_refused[status] += 1
                return False
            self.tally.scored.setdefault(score.arm, set()).add(score.body["request_id"])
            if answer["status"] == "updated":
                self.tally.updated_feedback += 1
            elif score.repost:
                self.tally.updates_not_recognised += 1
        return True


@dataclass
class _Score:
    arm: tuple[str, str]
    body: dict[str, Any]
    repost: bool = False


def metric_samples(proxy_url: str, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{proxy_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        "/".join(sample.labels.values()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="abproxy-soak-"))
    redis_server = EmbeddedRedis(folder / "redis", password="")
    redis_server.start()
    upstream = serve_in_thread(FakeUpstream(record=False))
    port = free_port()
    proxy_url = f"http://127.0.0.1:{port}"
    config = {
        "redis_url": redis_server.url,
        "upstreams": {"sim": {"base_url": f"{upstream.url}/v1", "timeout_s": 30}},
        "default_upstream": "sim",
        "mlflow": {"tracking_uri": f"sqlite:///{folder}/mlflow.db", "flush_interval_s": 0, "trace_sample_rate": 0},
        "experiments": EXPERIMENTS,
    }
    (folder / "abproxy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABPROXY_", "MLFLOW_TRACKING"))}
    env["PYTHONPATH"] = str(REPO)
    log = (folder / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "abproxy", "serve", "--config", str(folder / "abproxy.yaml"), "--port", str(port)],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    for _ in range(600):
        try:
            if http_json("GET", f"{proxy_url}/healthz", timeout=1)[0] == 200:
                break
        except OSError:
            time.sleep(0.1)
    else:
        raise SystemExit(f"abproxy serve did not start; see {folder / 'serve.log'}")

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    plans = Catalog(parse_config(config, environ={})).plans
    arms = {(e, v): arm.arm_id for e, plan in plans.items() for v, arm in plan.arms.items()}
    tally, stop, phase = Tally(), threading.Event(), ["steady"]
    clients = [Traffic(proxy_url, tally, args.users, args.seed + i, phase, stop) for i in range(args.clients)]
    for thread in clients:
        thread.start()
    said: dict[str, set[str]] = {}
    watching = threading.Event()

    def watch_warnings() -> None:
        while not watching.is_set():
            try:
                status, body = http_json("GET", f"{proxy_url}/abproxy/experiments", timeout=5)
            except OSError:
                status, body = 0, None
            if status == 200:
                for experiment in body["experiments"]:
                    said.setdefault(phase[0], set()).update(experiment["warnings"])
            else:
                said.setdefault(phase[0], set()).add(f"http {status}")
            time.sleep(1)

    watcher = threading.Thread(target=watch_warnings, daemon=True)
    watcher.start()
    half = args.phase_s / 2

    def enter(name: str) -> None:
        phase[0] = name
        print(f"{time.strftime('%H:%M:%S')} {name}", flush=True)

    time.sleep(args.phase_s)
    enter("killed")
    redis_server.kill()
    time.sleep(args.phase_s / 3)
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    time.sleep(args.phase_s * 2 / 3)
    enter("stopped")
    redis_server.pause()
    time.sleep(half)
    redis_server.resume()
    time.sleep(half)
    enter("poisoned")
    experiment, variant = POISONED
    hist = layout.hist_key(experiment, arms[POISONED])
    client.rename(hist, hist + ":kept")
    client.set(hist, "a hand edit")
    time.sleep(half)
    client.delete(hist)
    client.rename(hist + ":kept", hist)
    time.sleep(half)
    enter("full")
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used // 2)
    time.sleep(half)
    client.config_set("maxmemory", 0)
    time.sleep(half)
    enter("evicting")
    used = int(client.info("memory")["used_memory"])
    evicted_before = int(client.info("stats")["evicted_keys"])
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.config_set("maxmemory", int(used * 0.9))
    time.sleep(half)
    client.config_set("maxmemory", 0)
    client.config_set("maxmemory-policy", "noeviction")
    evicted = int(client.info("stats")["evicted_keys"]) - evicted_before
    time.sleep(half)
    enter("steady again")
    time.sleep(args.phase_s)
    stop.set()
    for thread in clients:
        thread.join(60)
    time.sleep(2)
    for _ in range(300):
        if not any(metric_samples(proxy_url, "abproxy_recorder_buffered").values()):
            break
        time.sleep(0.2)
    time.sleep(1)
    watching.set()
    watcher.join(10)
    dropped = metric_samples(proxy_url, "abproxy_recorder_dropped_total")
    status, final = http_json("GET", f"{proxy_url}/abproxy/experiments")

    print()
    print(f"phases of {args.phase_s:g} s, {args.clients} clients, {args.users} users; requests per phase:")
    print("  " + ", ".join(f"{name} {count}" for name, count in tally.sent_by_phase.items()))
    print(f"client failures: {dict(tally.failures) or 'none'}; feedback posts refused, then posted again: "
          f"{dict(tally.feedback_refused)}; never accepted: {tally.never_accepted}")  # fmt: skip
    print(f"dropped and reported, by reason: { {k: int(v) for k, v in dropped.items() if v} or 'none'}")
    if any(v for k, v in dropped.items() if k != "corrupt_counters"):
        print("  (drops other than the poisoned arm's: the per-arm columns below cannot place them)")
    print(f"keys evicted in the evicting phase: {evicted}")
    print()
    print("| arm | sent | recorded | reported dropped | lost | doubled | feedback accepted | feedback counted |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    totals = Counter()
    reported = int(sum(dropped.values()))
    for key, arm in arms.items():
        experiment, variant = key
        stats = client.hgetall(layout.stats_key(experiment, arm))
        recorded = int(stats.get("requests", 0))
        sent = tally.sent[key]
        name = FEEDBACK[experiment][0]
        counted = int(stats.get(f"feedback.{name}|n", 0))
        # every drop this soak provokes is the poisoned arm's (the buffer never fills)
        arm_dropped = reported if key == POISONED else 0
        lost = max(0, sent - recorded - arm_dropped)
        doubled = max(0, recorded + arm_dropped - sent)
        row = dict(sent=sent, recorded=recorded, dropped=arm_dropped, lost=lost, doubled=doubled,
                   accepted=len(tally.scored.get(key, ())), counted=counted)  # fmt: skip
        totals.update(row)
        print(f"| {experiment}/{variant} | {sent} | {recorded} | {arm_dropped} | {lost} | {doubled} | {row['accepted']} | {counted} |")
    print(f"| **all** | {totals['sent']} | {totals['recorded']} | {totals['dropped']} | {totals['lost']} | {totals['doubled']} "
          f"| {totals['accepted']} | {totals['counted']} |")  # fmt: skip
    print()
    for experiment in ("translation", "sentiment"):
        units = sum(int(client.hget(layout.stats_key(experiment, arm), "units") or 0) for (e, _), arm in arms.items() if e == experiment)
        unit = EXPERIMENTS[experiment]["unit"]
        expected = len(tally.users[experiment]) if unit == "user" else sum(v for (e, _), v in tally.sent.items() if e == experiment)
        print(f"{experiment} (unit: {unit}): units counted {units}, expected {expected} "
              f"({'users who sent requests' if unit == 'user' else 'requests'})")  # fmt: skip
    print(f"feedback re-posts answered 'updated': {tally.updated_feedback}; re-posts answered 'recorded': {tally.updates_not_recognised}")
    print("what the live results said, by phase:")
    for name, warnings in said.items():
        print(f"  {name}: {', '.join(sorted(warnings)) or '-'}")
    if status == 200:
        print("at the end: " + "; ".join(f"{e['experiment']}: {', '.join(e['warnings']) or '-'}" for e in final["experiments"]))

    os.killpg(serve.pid, signal.SIGTERM)
    serve.wait(60)
    upstream.stop()
    redis_server.stop()
    print(f"\n(serve log and data in {folder})")
    return 0 if totals["lost"] + totals["doubled"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
