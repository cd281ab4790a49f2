"""The command line: a thin layer mapping verbs and flags onto the config and the app."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from abproxy.config import CONFIG_ENV, Config, ConfigError, ConfigNotFound, find_config_file, load_config
from abproxy.errors import DomainError, StoreUnavailable
from abproxy.tracking.prompts import resolve_prompts
from abproxy.recording.eviction import startup_problem

EXIT_CONFIG = 2

MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""MLflow's own defaults (7 retries with exponential backoff, 120 s per try) keep a flush against a
server that is down busy for minutes; a failed flush loses nothing and is tried again at the next
interval, so ``serve`` and ``flush`` fail within seconds unless the environment says otherwise."""


def _mlflow_fails_fast() -> None:
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _load(path: str | None) -> Config:
    """The config every verb runs on; exit 2 with the reason when there is none, or it is invalid."""
    try:
        return resolve_prompts(load_config(path))
    except ConfigNotFound as error:
        print(f"abproxy: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    except ConfigError as error:
        print(f"abproxy: invalid config\n{error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def open_relay_problem(config: Config, host: str) -> str | None:
    """Why binding ``host`` would make this proxy an open relay for its upstream keys, if it would."""
    from abproxy.proxy.auth import is_loopback, open_relay_refusal, open_relay_upstreams

    upstreams = open_relay_upstreams(config)
    if not upstreams or is_loopback(host):
        return None
    return open_relay_refusal(upstreams, f"refusing to listen on {host}")


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.file or args.config)
    print(f"ok: {len(config.experiments)} experiment(s): {', '.join(config.experiments) or '-'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)  # before the heavy imports: a config error is answered at once
    problem = open_relay_problem(config, args.host) or (startup_problem(config) if config.redis_url else None)
    if problem:
        print(f"abproxy: {problem}", file=sys.stderr)
        return EXIT_CONFIG

    import uvicorn

    from abproxy.app import EMBEDDED_REDIS_ENV, WORKERS_ENV, create_app
    from abproxy.recording.embedded_redis import EmbeddedRedis
    from abproxy.metrics import MULTIPROCESS_ENV
    from abproxy.serving import server_options

    _mlflow_fails_fast()
    embedded = None
    redis_url = config.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(config.data_dir / "redis")
        redis_url = embedded.start()
        logging.getLogger("abproxy").info("embedded Redis on 127.0.0.1:%d, data in %s", embedded.port, embedded.data_dir)
    options = server_options(config, host=args.host, port=args.port, log_level=args.log_level)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler
    # it found: make that handler end this function normally, so the embedded Redis is stopped.
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    metrics_dir: str | None = None
    try:
        if args.workers > 1:
            # Workers count into shared files so /metrics adds them up, whichever one answers.
            metrics_dir = tempfile.mkdtemp(prefix="abproxy-metrics-")
            os.environ[MULTIPROCESS_ENV] = metrics_dir
            os.environ[EMBEDDED_REDIS_ENV] = redis_url
            os.environ[WORKERS_ENV] = str(args.workers)  # the workers share the per-minute caps
            # Each worker loads the config again: the very file this process found.
            os.environ[CONFIG_ENV] = str(find_config_file(args.config, os.environ).resolve())
            uvicorn.run("abproxy.app:app_from_env", factory=True, workers=args.workers, **options)
        else:
            uvicorn.Server(uvicorn.Config(create_app(config, redis_url=redis_url, tune_process=True), **options)).run()
    except _Stopped:
        pass
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if embedded is not None:
            embedded.stop()
    return 0


class _Stopped(Exception):
    """A stop signal arrived after uvicorn's graceful shutdown."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped()


def _redis_for_command(config: Config) -> tuple[str, object | None]:
    """The configured Redis, or the embedded one of a running `abproxy serve`, or a private
    embedded Redis on the same data (stopped again when the command ends)."""
    from abproxy.recording.embedded_redis import EmbeddedRedis, running_url

    if config.redis_url:
        return config.redis_url, None
    data_dir = config.data_dir / "redis"
    url = running_url(data_dir)
    if url:
        return url, None
    embedded = EmbeddedRedis(data_dir)
    return embedded.start(), embedded


def _with_redis(config: Config, work: Callable[[Any], Awaitable[int]]) -> int:
    import asyncio

    from abproxy.recording.connection import UNAVAILABLE

    from abproxy.app import open_redis

    url, embedded = _redis_for_command(config)

    async def main() -> int:
        redis = open_redis(url)
        try:
            return await work(redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(main())
    except StoreUnavailable as error:
        print(f"abproxy: Redis failed: {error.message}", file=sys.stderr)
        return 1
    except UNAVAILABLE as error:
        print(f"abproxy: Redis failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except DomainError as error:  # MLflow away, another flush running: say so, without a traceback
        print(f"abproxy: {error.message}", file=sys.stderr)
        return 1
    finally:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]


def cmd_flush(args: argparse.Namespace) -> int:
    config = _load(args.config)
    _mlflow_fails_fast()

    from abproxy.catalog import Catalog
    from abproxy.tracking.flusher import Flusher

    async def work(redis: Any) -> int:
        report = await Flusher(redis, config, Catalog(config)).flush()
        for name, outcome in report.experiments.items():
            print(f"{name}: status={outcome['status']} winner={outcome['winner'] or 'none'}")
        print(f"flushed {len(report.experiments)} experiment(s) to {config.mlflow.shown_tracking_uri} (step {report.step}, {report.duration_s:.2f}s)")
        return 0

    return _with_redis(config, work)


def cmd_promote(args: argparse.Namespace) -> int:
    config = _load(args.config)
    _mlflow_fails_fast()

    from abproxy.catalog import Catalog
    from abproxy.tracking.promote import promote, undo
    plan = Catalog(config).plans.get(args.experiment)
    if plan is None:
        print(f"abproxy: unknown experiment {args.experiment!r}; one of {', '.join(config.experiments) or '-'}", file=sys.stderr)
        return 1

    async def work(redis: Any) -> int:
        if args.undo:
            undone = await undo(redis, config, plan)
            print(f"{plan.name}: promotion undone; new traffic is assigned over the weights again")
            for line in undone.lines():
                print(f"Prompt Registry: {plan.name} {line}")
            if undone.problem is not None:
                print(f"abproxy: {undone.problem}", file=sys.stderr)
                return 1
            return 0
        promotion = await promote(redis, config, plan, args.variant, args.alias)
        if promotion.warning is not None:
            print(f"warning: {promotion.warning}", file=sys.stderr)
        print(
            f"{plan.name}: promoted {promotion.variant}: every replica now serves it to all new traffic.\n"
            f"Prompt Registry: {promotion.prompt_uri} (version {promotion.version}) in {config.mlflow.shown_tracking_uri}"
        )
        for caution in promotion.cautions:
            print(f"Note: {caution}")
        return 0

    return _with_redis(config, work)


def cmd_resume(args: argparse.Namespace) -> int:
    config = _load(args.config)

    from abproxy.analysis.stops import resume
    from abproxy.catalog import Catalog

    plan = Catalog(config).plans.get(args.experiment)
    if plan is None:
        print(f"abproxy: unknown experiment {args.experiment!r}; one of {', '.join(config.experiments) or '-'}", file=sys.stderr)
        return 1

    async def work(redis: Any) -> int:
        resumed = await resume(redis, plan, args.variant)
        print(
            f"{plan.name}: {args.variant} resumed (it was stopped for harm on {resumed.reason}): every replica gives it "
            "its share of new traffic again within a second; it will not be stopped again on its own"
        )
        return 0

    return _with_redis(config, work)


def cmd_report(args: argparse.Namespace) -> int:
    config = _load(args.config)

    from abproxy.catalog import Catalog
    from abproxy.analysis.report import terminal
    from abproxy.analysis.live import experiment_results
    from abproxy.stats.results import as_json

    catalog = Catalog(config)
    if args.experiment and args.experiment not in catalog.plans:
        print(f"abproxy: unknown experiment {args.experiment!r}; one of {', '.join(catalog.plans) or '-'}", file=sys.stderr)
        return 1
    names = [args.experiment] if args.experiment else list(catalog.plans)
    if not names:
        print("abproxy: the config has no experiments", file=sys.stderr)
        return 1

    async def work(redis: Any) -> int:
        results = [await experiment_results(redis, config, catalog.plans[name]) for name in names]
        if args.json:
            shown = [as_json(result) for result in results]
            print(json.dumps(shown[0] if args.experiment else {"experiments": shown}, indent=2, ensure_ascii=False))
        else:
            print("\n".join(terminal(result) for result in results), end="")
        return 0

    return _with_redis(config, work)


def cmd_demo(args: argparse.Namespace) -> int:
    from abproxy.simulation.demo import run_demo
    from abproxy.simulation.demo_folder import FolderRefused

    logging.getLogger().setLevel(logging.WARNING)
    try:
        return run_demo(args.requests, args.seed, args.keep, Path(args.dir))
    except FolderRefused as refusal:
        print(f"abproxy: {refusal}", file=sys.stderr)
        return EXIT_CONFIG


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abproxy", description="A/B testing proxy for LLM prompts.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="config file (default: $ABPROXY_CONFIG or config/abproxy.yaml)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(handler=cmd_serve)

    flush = verbs.add_parser("flush", help="flush the experiments to MLflow once, then exit")
    flush.add_argument("--config")
    flush.set_defaults(handler=cmd_flush)

    report = verbs.add_parser("report", help="the live comparison table")
    report.add_argument("experiment", nargs="?")
    report.add_argument("--config")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.set_defaults(handler=cmd_report)

    demo = verbs.add_parser("demo", help="the whole loop on embedded defaults, with simulated users")
    demo.add_argument("--requests", type=int, default=2400, help="simulated requests (default 2400)")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--keep", action="store_true", help="leave the proxy running afterwards")
    demo.add_argument(
        "--dir",
        default=".abproxy/demo",
        help="where the demo keeps its config, Redis data and MLflow store: a new or empty folder, or an earlier demo's",
    )
    demo.set_defaults(handler=cmd_demo)

    promote = verbs.add_parser("promote", help="serve a variant (default: the winner) to all traffic, and register it")
    promote.add_argument("experiment")
    promote.add_argument("variant", nargs="?", help="default: the declared winner")
    promote.add_argument("--config")
    promote.add_argument("--alias", default="production", help="Prompt Registry alias (default production)")
    promote.add_argument("--undo", action="store_true", help="remove the promotion")
    promote.set_defaults(handler=cmd_promote)

    resume_verb = verbs.add_parser("resume", help="give a variant stopped for harm its traffic back")
    resume_verb.add_argument("experiment")
    resume_verb.add_argument("variant")
    resume_verb.add_argument("--config")
    resume_verb.set_defaults(handler=cmd_resume)

    check = verbs.add_parser("check-config", help="validate a config file")
    check.add_argument("file", nargs="?")
    check.add_argument("--config")
    check.set_defaults(handler=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
