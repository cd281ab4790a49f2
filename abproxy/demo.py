"""`abproxy demo`: the whole loop on embedded defaults, in under a minute, with no network.

An embedded Redis, a simulated OpenAI-compatible provider, the real proxy, simulated users who
call it through the real ``openai`` SDK and post feedback whose distribution depends on the
variant they got, periodic flushes into a local MLflow store, and at the end the comparison
table, each experiment's winner and the commands that show the results again (see demo_folder).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from abproxy.config import Config, parse_config
from abproxy.demo_folder import REDIS_DIR, claim, tracking_uri, viewing_commands, write_config
from abproxy.fake_upstream import FakeUpstream, serve_in_thread

TRANSLATION_SENTENCES = (
    "The weather is lovely today.",
    "Could you tell me where the nearest subway station is?",
    "I have been learning Korean for three years.",
    "Thank you so much for inviting me to dinner.",
    "The meeting has been moved to next Tuesday afternoon.",
    "Please send me the report before the end of the week.",
)
SENTIMENT_TEXTS = (
    "I absolutely love this phone, the battery lasts forever.",
    "The delivery was late and the box was damaged.",
    "It works as described, nothing more, nothing less.",
    "Worst customer service I have ever dealt with.",
    "Great value for the price, would buy again.",
)
ARTICLES = (
    "The city council approved a new budget on Monday that increases spending on public transport "
    "by twelve percent, funds two new libraries and delays the renovation of the central stadium.",
    "Researchers reported that a four-day working week trial across sixty companies kept productivity "
    "stable while reducing burnout, and most participating firms decided to continue the policy.",
)

# What simulated users think of each variant: satisfaction mean (1..5) or accuracy (0..1).
SATISFACTION = {
    "translation": {"basic": 3.2, "professional": 4.1, "context_aware": 3.6, "step_by_step": 3.4},
    "summarization": {"one_paragraph": 3.4, "bullets": 3.9},
}
ACCURACY = {"sentiment": {"simple": 0.68, "detailed": 0.80, "chain_of_thought": 0.86}}

# Simulated provider latency (ms) before the first byte: by model, plus per prompt character.
MODEL_LATENCY_MS = {"gpt-4o-mini": 18.0, "gpt-4o": 35.0}
PER_PROMPT_CHAR_MS = 0.04
ERROR_RATE = 0.01


def _final_flush(proxy_url: str, patience_s: float = 120.0) -> dict:
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
    """The scenario as a config document; ``folder`` holds the Redis data and the MLflow store."""
    translation_params = {"temperature": 0.7, "max_tokens": 100}
    return {
        "redis_url": "",
        "data_dir": str(folder),
        "mlflow": {"tracking_uri": tracking_uri(folder), "flush_interval_s": flush_interval_s},
        "upstreams": {"simulated": {"base_url": upstream_url, "timeout_s": 30}},
        "default_upstream": "simulated",
        "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.60}, "gpt-4o": {"input": 2.50, "output": 10.00}},
        "stats": {"alpha": 0.05, "min_samples": 30, "sequential": True},
        "experiments": {
            "translation": {
                "match": {"model": "translation"},
                "unit": "user",
                "primary_metric": "feedback.satisfaction",
                "guardrails": ["error_rate"],
                "feedback": {"satisfaction": {"min": 1, "max": 5}},
                "variants": {
                    "basic": {
                        "control": True,
                        "model": "gpt-4o-mini",
                        "params": translation_params,
                        "user_template": "Translate into Korean: {{input}}",
                    },
                    "professional": {
                        "model": "gpt-4o-mini",
                        "params": translation_params,
                        "system_prompt": "You are a professional translator with ten years of experience.",
                        "user_template": "Translate this English sentence into natural, fluent Korean:\n{{input}}",
                    },
                    "context_aware": {
                        "model": "gpt-4o-mini",
                        "params": translation_params,
                        "system_prompt": "You translate English into Korean, matching register and politeness.",
                        "user_template": "Consider who is speaking to whom, then translate into Korean:\n{{input}}",
                    },
                    "step_by_step": {
                        "model": "gpt-4o",
                        "params": {"temperature": 0.3, "max_tokens": 300},
                        "system_prompt": "You are a careful English-to-Korean translator.",
                        "user_template": (
                            "Translate into Korean step by step: identify the key phrases, translate them, "
                            "then give the final sentence on the last line.\n{{input}}"
                        ),
                    },
                },
            },
            "sentiment": {
                "match": {"model": "sentiment"},
                "unit": "request",
                "primary_metric": "feedback.accuracy",
                "feedback": {"accuracy": {"min": 0, "max": 1}},
                "variants": {
                    "simple": {
                        "control": True,
                        "model": "gpt-4o-mini",
                        "user_template": "Positive, negative or neutral? {{input}}",
                    },
                    "detailed": {
                        "model": "gpt-4o-mini",
                        "system_prompt": "You are a sentiment analyst. Answer positive, negative or neutral.",
                        "user_template": "Text: {{input}}",
                    },
                    "chain_of_thought": {
                        "model": "gpt-4o",
                        "system_prompt": "You are a sentiment analyst.",
                        "user_template": (
                            "Think step by step about tone, wording and intent, then answer positive, "
                            "negative or neutral on the last line.\nText: {{input}}"
                        ),
                    },
                },
            },
            "summarization": {
                "match": {"model": "summarization"},
                "unit": "user",
                "primary_metric": "feedback.satisfaction",
                "guardrails": ["latency_ms"],
                "feedback": {"satisfaction": {"min": 1, "max": 5}},
                "variants": {
                    "one_paragraph": {
                        "control": True,
                        "model": "gpt-4o-mini",
                        "user_template": "Summarize in one short paragraph:\n{{input}}",
                    },
                    "bullets": {
                        "model": "gpt-4o-mini",
                        "system_prompt": "You write crisp executive summaries.",
                        "user_template": "Summarize as three bullet points:\n{{input}}",
                    },
                },
            },
        },
    }


class SimulatedProvider:
    """The fake upstream with a provider's manners: latency by model and prompt length (and
    per streamed chunk), and occasional rate limits or server errors."""

    def __init__(self, seed: int, time_scale: float = 1.0):
        self._inner = FakeUpstream(record=False)
        self._rng = random.Random(seed)
        self._time_scale = time_scale

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
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
        headers = list(scope["headers"]) + self._behaviour(request if isinstance(request, dict) else {})
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._inner({**scope, "headers": headers}, replay, send)

    def _behaviour(self, request: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        prompt_chars = sum(len(str(m.get("content", ""))) for m in request.get("messages") or () if isinstance(m, dict))
        base = MODEL_LATENCY_MS.get(str(request.get("model")), 25.0)
        delay = (base + PER_PROMPT_CHAR_MS * prompt_chars) * self._rng.uniform(0.7, 1.6) * self._time_scale
        injected = [(b"x-fake-delay-ms", f"{delay:.1f}".encode())]
        if request.get("stream"):
            injected.append((b"x-fake-chunk-delay-ms", f"{1.5 * self._time_scale:.1f}".encode()))
        if self._rng.random() < ERROR_RATE:
            injected.append((b"x-fake-status", b"429" if self._rng.random() < 0.5 else b"500"))
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


def _task(rng: random.Random) -> tuple[str, str]:
    experiment = rng.choices(("translation", "sentiment", "summarization"), weights=(5, 3, 2))[0]
    text = {
        "translation": TRANSLATION_SENTENCES,
        "sentiment": SENTIMENT_TEXTS,
        "summarization": ARTICLES,
    }[experiment]
    return experiment, rng.choice(text)


def _score(experiment: str, variant: str, rng: random.Random) -> tuple[str, float]:
    if experiment in ACCURACY:
        return "accuracy", 1.0 if rng.random() < ACCURACY[experiment][variant] else 0.0
    mean = SATISFACTION[experiment][variant]
    return "satisfaction", float(min(5, max(1, round(rng.gauss(mean, 0.9)))))


async def simulate_users(base_url: str, requests: int, users: int, seed: int, concurrency: int = 24) -> Progress:
    """Users send the seed's tasks through the proxy with the real SDK and rate most answers."""
    import openai

    rng = random.Random(seed)
    plan = [(f"user-{rng.randrange(users)}", *_task(rng), rng.random() < 0.3, rng.random()) for _ in range(requests)]
    progress = Progress(len(plan))
    queue: asyncio.Queue[tuple[str, str, str, bool, float]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-demo", max_retries=0) as client:

        async def worker(worker_seed: int) -> None:
            local = random.Random(worker_seed)
            while not queue.empty():
                user, experiment, text, stream, feedback_roll = queue.get_nowait()
                ok = await _one_request(client, user, experiment, text, stream, feedback_roll, local)
                progress.step(ok)

        await asyncio.gather(*(worker(seed * 1000 + i) for i in range(concurrency)))
    return progress


async def _one_request(
    client: Any, user: str, experiment: str, text: str, stream: bool, feedback_roll: float, rng: random.Random
) -> bool:
    import openai

    messages = [{"role": "user", "content": text}]
    try:
        if stream:
            response = await client.chat.completions.with_raw_response.create(
                model=experiment, messages=messages, user=user, stream=True
            )
            async for _ in response.parse():
                pass
        else:
            response = await client.chat.completions.with_raw_response.create(
                model=experiment, messages=messages, user=user
            )
    except openai.APIError:
        return False
    if feedback_roll < 0.8:  # most users leave a rating
        name, score = _score(experiment, response.headers["x-abproxy-variant"], rng)
        await client.post(
            "/feedback",
            body={"request_id": response.headers["x-abproxy-request-id"], "name": name, "score": score},
            cast_to=object,
        )
    return True


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
    from abproxy.app import ABProxyApp
    from abproxy.recording.embedded_redis import EmbeddedRedis

    started = time.monotonic()
    folder = claim(directory)
    redis_server = EmbeddedRedis(folder / REDIS_DIR)
    upstream = serve_in_thread(SimulatedProvider(seed, time_scale))
    proxy = None
    try:
        redis_url = redis_server.start()
        settings = demo_settings(folder, f"{upstream.url}/v1", flush_interval_s=5)
        config = parse_config(settings, environ={})
        write_config(folder, settings)
        print(f"abproxy demo: embedded Redis on 127.0.0.1:{redis_server.port}, simulated provider at {upstream.url}")
        _prepare_mlflow(config, folder / "artifacts")
        app = ABProxyApp(config, redis_url=redis_url)
        proxy = serve_in_thread(app, timeout_graceful_shutdown=10)
        print(f"proxy at {proxy.url}/v1 — {requests} requests from simulated users (experiments: "
              f"{', '.join(config.experiments)})")
        progress = asyncio.run(simulate_users(proxy.url, requests, users=max(60, requests // 8), seed=seed))
        _print_results(proxy.url, config, _final_flush(proxy.url))
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


def _print_results(proxy_url: str, config: Config, flushed: dict[str, Any]) -> None:
    from abproxy.analysis.report import terminal

    print()
    for name in config.experiments:
        with urllib.request.urlopen(f"{proxy_url}/abproxy/experiments/{name}", timeout=30) as response:
            print(terminal(orjson.loads(response.read())))
    print("Winners:")
    for name, outcome in flushed["experiments"].items():
        print(f"  {name:14s} {outcome['winner'] or 'none yet'} ({outcome['status']})")
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
