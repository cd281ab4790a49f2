"""`abproxy demo`: the whole loop on embedded defaults, in under a minute, with no network.

An embedded Redis, a simulated OpenAI-compatible provider, the real proxy, simulated users who
call it through the real ``openai`` SDK and post feedback whose distribution depends on the
variant they got, periodic flushes into a local MLflow store, and at the end the comparison
table, each experiment's winner and the commands that show the results again (see demo_folder).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import random
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from starlette.types import Scope

from abproxy.app import ABProxyApp, open_redis
from abproxy.assignment import seeded_draw
from abproxy.config import Config, parse_config
from abproxy.simulation.demo_folder import REDIS_DIR, claim, tracking_uri, viewing_commands, write_config
from abproxy.simulation.answers import simulated_answer
from abproxy.simulation.fake_upstream import FakeUpstream
from abproxy.simulation.replies import JUDGE_MODEL
from abproxy.simulation.scenario import ProviderManners, Rating, seed_scenario
from abproxy.simulation.server import serve_in_thread

def _flush(proxy_url: str, patience_s: float = 120.0) -> dict:
    """POST /abproxy/flush, waiting out a periodic flush that holds the lock just then (409)."""
    deadline = time.monotonic() + patience_s
    while True:
        request = urllib.request.Request(f"{proxy_url}/abproxy/flush", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=patience_s) as response:
                return orjson.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code != 409 or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def demo_settings(folder: Path, upstream_url: str, flush_interval_s: float) -> dict[str, Any]:
    """The seed scenario as a config document; ``folder`` holds the Redis data and the MLflow store."""
    scenario = seed_scenario()
    return {
        "redis_url": "",
        "data_dir": str(folder),
        "mlflow": {"tracking_uri": tracking_uri(folder), "flush_interval_s": flush_interval_s},
        "upstreams": {"simulated": {"base_url": upstream_url, "timeout_s": 30}},
        "default_upstream": "simulated",
        "prices": scenario.prices,
        # the simulated users' preferences differ by 15-30%: tests tuned to find 10% lifts
        "stats": {"alpha": 0.05, "min_samples": 30, "sequential": True, "mde": 0.10},
        "judges": scenario.judges,
        "experiments": scenario.experiments,
    }


NEVER_S = 365 * 24 * 3600.0


class SimulatedProvider:
    """The fake upstream with a provider's manners: answers that follow the prompt's instruction
    (:mod:`abproxy.simulation.answers`), latency by model and prompt length (and per streamed
    chunk), and occasional rate limits or server errors. The simulated judge model is one of its
    models (``fake-judge``)."""

    def __init__(self, seed: int, time_scale: float = 1.0, manners: ProviderManners | None = None):
        self._inner = FakeUpstream(record=False)
        self._manners = manners or seed_scenario().provider
        self._seed = seed
        self._time_scale = time_scale

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self._inner(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            request = {}
        # Each request's manners from its own body, not from a sequence shared by requests that
        # arrive in a different order each run: the same seed gives every request the same answer.
        rng = random.Random(f"{self._seed}:{hashlib.sha256(body).hexdigest()}")
        headers = list(scope["headers"]) + self._behaviour(request if isinstance(request, dict) else {}, rng)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._inner({**scope, "headers": headers}, replay, send)

    def _behaviour(self, request: dict[str, Any], rng: random.Random) -> list[tuple[bytes, bytes]]:
        prompt_chars = sum(len(str(m.get("content", ""))) for m in request.get("messages") or () if isinstance(m, dict))
        manners = self._manners
        base = manners.model_latency_ms.get(str(request.get("model")), manners.default_latency_ms)
        delay = (base + manners.per_prompt_char_ms * prompt_chars) * rng.uniform(0.7, 1.6) * self._time_scale
        injected = [(b"x-fake-delay-ms", f"{delay:.1f}".encode())]
        if request.get("stream"):
            injected.append((b"x-fake-chunk-delay-ms", f"{manners.chunk_delay_ms * self._time_scale:.1f}".encode()))
        if str(request.get("model")).startswith(JUDGE_MODEL):
            # The judge's own manners are in its model name (replies.py): two answers judged
            # alike must be scored alike, so no random error of the provider's here.
            return injected
        answer = simulated_answer(request, rng)
        if answer is not None:
            injected.append((b"x-fake-reply", answer.encode()))
        if rng.random() < manners.error_rate:
            injected.append((b"x-fake-status", b"429" if rng.random() < 0.5 else b"500"))
        return injected


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    width: int = 40

    def step(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        # Redraw in place on a terminal; in a log, a line every tenth of the way.
        every = 25 if sys.stderr.isatty() else max(1, self.total // 10)
        if self.done % every == 0 or self.done == self.total:
            filled = self.width * self.done // self.total
            bar = "#" * filled + "." * (self.width - filled)
            print(
                f"\r  [{bar}] {self.done}/{self.total} requests ({self.failed} upstream errors)",
                end="" if self.done < self.total and sys.stderr.isatty() else "\n",
                file=sys.stderr,
                flush=True,
            )


ROUND_REQUESTS = 300
"""The demo looks at its experiments after every this many requests, and flushes them to MLflow
at the end: looks at request counts, not at clock ticks, so that a seed replays the same looks
(a sequential test's verdict depends on when it looked)."""


@dataclass(frozen=True)
class UserRequest:
    number: int
    user: str
    experiment: str
    text: str
    stream: bool
    rated: bool


def plan_requests(requests: int, users: int, seed: int) -> list[UserRequest]:
    """What the simulated users will ask, in order: the same for the same seed."""
    scenario = seed_scenario()
    rng = random.Random(seed)
    planned = []
    for number in range(requests):
        user = f"user-{rng.randrange(users)}"
        experiment, text = scenario.pick_task(rng)
        stream = rng.random() < scenario.streamed_share
        planned.append(UserRequest(number, user, experiment, text, stream, rng.random() < scenario.rated_share))
    return planned


async def simulate_users(
    base_url: str, requests: int, users: int, seed: int, after_round: Callable[[], None] = lambda: None, concurrency: int = 24
) -> Progress:
    """Users send the seed's tasks through the proxy with the real SDK and rate most answers, in
    rounds of :data:`ROUND_REQUESTS`; ``after_round`` runs (in a thread) after each."""
    import openai

    scenario = seed_scenario()
    planned = plan_requests(requests, users, seed)
    progress = Progress(len(planned))
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-demo", max_retries=0) as client:
        for start in range(0, len(planned), ROUND_REQUESTS):
            waiting = collections.deque(planned[start : start + ROUND_REQUESTS])

            async def worker() -> None:
                while waiting:
                    request = waiting.popleft()
                    rating = scenario.ratings.get(request.experiment) if request.rated else None
                    # the user's score drawn for this request, whichever worker sends it
                    ok = await _one_request(client, request, rating, random.Random(f"{seed}:{request.number}"))
                    progress.step(ok)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            await asyncio.to_thread(after_round)
    return progress


async def _one_request(client: Any, request: UserRequest, rating: Rating | None, rng: random.Random) -> bool:
    import openai

    messages = [{"role": "user", "content": request.text}]
    # Its number makes each request's body its own: the proxy's seeded choices are drawn from it.
    metadata = {"demo_request": str(request.number)}
    try:
        if request.stream:
            response = await client.chat.completions.with_raw_response.create(
                model=request.experiment, messages=messages, user=request.user, stream=True, metadata=metadata
            )
            async for _ in response.parse():
                pass
        else:
            response = await client.chat.completions.with_raw_response.create(
                model=request.experiment, messages=messages, user=request.user, metadata=metadata
            )
    except openai.APIError:
        return False
    if rating is not None:
        score = rating.score(response.headers["x-abproxy-variant"], rng)
        await client.post(
            "/feedback",
            body={"request_id": response.headers["x-abproxy-request-id"], "name": rating.metric, "score": score},
            cast_to=object,
        )
    return True


def _settle(app: ABProxyApp, patience_s: float = 60.0) -> None:
    """Until every request so far is counted in Redis and every answer sampled for the judges is
    scored: what the next look sees is then the same on every run."""
    deadline = time.monotonic() + patience_s
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        idle = not app.proxy.in_flight and not app.recorder.buffered and not (app.judges is not None and app.judges.busy)
        quiet = quiet + 1 if idle else 0
        time.sleep(0.01)


def _wait_for_traces(app: ABProxyApp, patience_s: float = 120.0) -> None:
    """Until the traces (every judged answer is one) and their assessments are in MLflow: the
    proxy's shutdown gives them only seconds."""
    deadline = time.monotonic() + patience_s
    while app.traces is not None and app.traces.queued and time.monotonic() < deadline:
        time.sleep(0.2)


def _prepare_mlflow(config: Config, artifacts: Path) -> None:
    """Create the MLflow experiments with artifacts inside the demo folder (not ./mlruns)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=config.mlflow.tracking_uri)
    for name in config.experiments:
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name, artifact_location=(artifacts / name).resolve().as_uri())


def run_demo(requests: int, seed: int, keep: bool, directory: Path, time_scale: float = 1.0) -> int:
    """The whole loop in ``directory``; raises :class:`FolderRefused` before starting anything
    when that folder holds files the demo did not create."""
    from abproxy.recording.embedded_redis import EmbeddedRedis

    started = time.monotonic()
    folder = claim(directory)
    redis_server = EmbeddedRedis(folder / REDIS_DIR)
    upstream = serve_in_thread(SimulatedProvider(seed, time_scale))
    proxy = None
    try:
        redis_url = redis_server.start()
        settings = demo_settings(folder, f"{upstream.url}/v1", flush_interval_s=5)
        write_config(folder, settings)  # as `abproxy serve` would run it later: flushing every 5 s
        # Here the demo looks, and flushes, itself: after each round of requests, never on a timer.
        config = parse_config({**settings, "mlflow": {**settings["mlflow"], "flush_interval_s": 0}}, environ={})
        print(f"abproxy demo: embedded Redis on 127.0.0.1:{redis_server.port}, simulated provider at {upstream.url}")
        _prepare_mlflow(config, folder / "artifacts")
        app = ABProxyApp(config, redis_url=redis_url, draw=seeded_draw(seed), look_every_s=NEVER_S)
        proxy = serve_in_thread(app, timeout_graceful_shutdown=10)
        print(f"proxy at {proxy.url}/v1 — {requests} requests from simulated users (experiments: "
              f"{', '.join(config.experiments)})")
        looks = 0

        def look() -> None:
            nonlocal looks
            _settle(app)
            looks += 1
            if looks == 1:
                _flush(proxy.url)  # MLflow laid out early: the traces go in while the users go on
                return
            with urllib.request.urlopen(f"{proxy.url}/abproxy/experiments", timeout=60) as answer:
                answer.read()  # every read of the results is a look (docs/statistics.md)

        progress = asyncio.run(simulate_users(proxy.url, requests, max(60, requests // 8), seed, after_round=look))
        flushed = _flush(proxy.url)  # one more look, at the same counts, and MLflow written
        _wait_for_traces(app)
        _print_results(app, flushed)
        _promote_winners(proxy.url, flushed)
        print(f"{progress.done} requests ({progress.failed} simulated upstream errors) in "
              f"{time.monotonic() - started:.1f} s.\n")
        _print_where_to_look(folder, keep)
        if keep:
            _keep_running(proxy.url)
        return 0
    finally:
        if proxy is not None:
            proxy.stop(timeout=15)
        upstream.stop()
        redis_server.stop()


def _print_results(app: ABProxyApp, flushed: dict[str, Any]) -> None:
    from abproxy.analysis.live import experiment_results
    from abproxy.analysis.report import terminal

    async def tables() -> list[str]:
        redis = open_redis(app.redis_url)
        try:
            return [terminal(await experiment_results(redis, app.config, plan)) for plan in app.catalog.plans.values()]
        finally:
            await redis.aclose()

    print()
    for table in asyncio.run(tables()):
        print(table)
    print("Winners:")
    for name, outcome in flushed["experiments"].items():
        print(f"  {name:14s} {outcome['winner'] or 'none yet'} ({outcome['status']})")
    print()


def _promote_winners(proxy_url: str, flushed: dict[str, Any]) -> None:
    """What a prompt engineer does next: ``abproxy promote`` each experiment that has a winner."""
    promoted = []
    for name, outcome in flushed["experiments"].items():
        if outcome.get("status") != "winner":
            continue
        request = urllib.request.Request(f"{proxy_url}/abproxy/experiments/{name}/promote", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            promoted.append(orjson.loads(response.read()))
    if promoted:
        print("Promoted (every replica now serves the winner; apps can load it from the Prompt Registry):")
        for promotion in promoted:
            print(f"  {promotion['experiment']:14s} {promotion['promoted']:18s} {promotion['prompt_uri']}")
        print()


def _print_where_to_look(folder: Path, keep: bool) -> None:
    when = "now, while the proxy keeps running, or later" if keep else "from any folder"
    print(f"The demo's config, Redis data and MLflow store are in {folder}. See its results ({when}):\n")
    print(viewing_commands(folder), end="\n\n", flush=True)


def _keep_running(proxy_url: str) -> None:
    print(f"The proxy keeps running at {proxy_url}/v1 (Ctrl-C to stop). Try also:\n"
          f"  curl {proxy_url}/abproxy/experiments/translation\n  curl {proxy_url}/metrics", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
