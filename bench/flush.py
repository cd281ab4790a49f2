"""Flush timing: 20 experiments × 5 variants into a sqlite-backed MLflow store.

    python bench/flush.py [--experiments 20] [--variants 5] [--requests 200]

(``bench/run.py`` also calls :func:`measure` for a growing number of experiments.)

Counters are filled through the real recorder (its Lua batch script) with synthetic outcomes,
then the flusher runs: the first flush creates every MLflow experiment, run and LoggedModel; the
steady state is a flush after more traffic reached every arm (every run gets a new step), and a
flush with no new traffic writes nothing but checks. Prints the timings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from abproxy.app import open_redis
from abproxy.catalog import Catalog
from abproxy.config import parse_config
from abproxy.recording.embedded_redis import EmbeddedRedis
from abproxy.tracking.flusher import Flusher
from abproxy.metrics import ProxyMetrics
from abproxy.recording.outcome import ExperimentRoute, Outcome
from abproxy.recording.recorder import Recorder


def build_config(tmp: Path, experiments: int, variants: int) -> dict:
    return {
        "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "flush_interval_s": 0},
        "upstreams": {"fake": {"base_url": "http://127.0.0.1:9/v1"}},
        "default_upstream": "fake",
        "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}},
        "experiments": {
            f"exp{e:02d}": {
                "match": {"model": f"exp{e:02d}"},
                "feedback": {"satisfaction": {"min": 1, "max": 5}},
                "variants": {
                    f"v{v}": {"model": "gpt-4o-mini", "system_prompt": f"Variant {v} of experiment {e}."}
                    for v in range(variants)
                },
            }
            for e in range(experiments)
        },
    }


def synthetic_outcomes(catalog: Catalog, per_variant: int, rng: random.Random, start: int = 0) -> list[Outcome]:
    outcomes = []
    for plan in catalog.plans.values():
        for name, arm in plan.arms.items():
            for i in range(start, start + per_variant):
                reply = "word " * rng.randint(5, 40)
                body = (
                    '{"id":"chatcmpl-%d","choices":[{"message":{"content":"%s"}}],'
                    '"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}'
                ) % (i, reply, 20, len(reply.split()), 20 + len(reply.split()))
                outcome = Outcome(
                    request_id=f"{plan.name}-{name}-{i}",
                    endpoint="chat",
                    upstream="fake",
                    model="gpt-4o-mini",
                    started_at=time.time(),
                    route=ExperimentRoute(plan.name, name, arm.arm_id, f"user-{i}", False),
                    status=200,
                    latency_s=rng.lognormvariate(-0.5, 0.4),
                    body=body.encode(),
                )
                outcomes.append(outcome)
    return outcomes


async def measure(experiments: int, variants: int, per_variant: int, *, quiet: bool = False) -> dict[str, float]:
    """Seconds taken by the first flush (which creates every run) and the steady-state flush."""
    timings: dict[str, float] = {}
    # MLflow's default artifact root is ./mlruns: keep it in the temporary directory
    with tempfile.TemporaryDirectory() as directory, contextlib.chdir(directory):
        tmp = Path(directory)
        redis_server = EmbeddedRedis(tmp / "redis")
        url = redis_server.start()
        try:
            config = parse_config(build_config(tmp, experiments, variants), environ={})
            catalog = Catalog(config)
            redis = open_redis(url)
            metrics = ProxyMetrics(CollectorRegistry())
            recorder = Recorder(redis, config, catalog, metrics)
            flusher = Flusher(redis, config, catalog, metrics)
            rng = random.Random(1)
            for round_number, label in enumerate(("first", "steady", "steady", "unchanged")):
                if label != "unchanged":
                    for outcome in synthetic_outcomes(catalog, per_variant, rng, start=round_number * per_variant):
                        recorder.record(outcome)
                    assert await recorder.flush(), "recorder could not write to Redis"
                started = time.perf_counter()
                report = await flusher.flush()
                elapsed = time.perf_counter() - started
                timings[label] = elapsed  # the last steady-state flush is kept
                if not quiet:
                    print(f"{label} flush: {elapsed:.2f} s for {experiments} experiments × {variants} variants (step {report.step})")
            await redis.aclose()
        finally:
            redis_server.stop()
    return timings


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--variants", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="synthetic requests per variant")
    args = parser.parse_args()
    asyncio.run(measure(args.experiments, args.variants, args.requests))
