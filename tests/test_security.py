"""Keys never leak: after a run of ``abproxy serve`` (a real subprocess, at its most verbose log
level) through every path a key could travel — JSON and streamed calls with the real openai SDK,
wrong client and admin keys, upstream errors, an unreachable and a slow upstream, feedback, a
manual and a periodic flush to MLflow — none of the keys is in anything the proxy wrote or
answered: its log, every response body and header, /metrics, the live results, every Redis key
and value, the MLflow store and every file under the test's directory."""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml
from proxykit import BASE_EXPERIMENTS
from helpers import free_port, http
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
KEYLESS_PROMPT = "Route check: the keyless upstream."


class Keys:
    """Distinctive secrets; ``core`` is each one's random part, so a key that was cut or masked
    around its middle is still caught."""

    def __init__(self) -> None:
        self.upstream = f"sk-upstream-SECRET-{secrets.token_hex(12)}"
        self.client = f"sk-client-SECRET-{secrets.token_hex(12)}"
        self.admin = f"sk-admin-SECRET-{secrets.token_hex(12)}"
        self.wrong = f"sk-wrong-SECRET-{secrets.token_hex(12)}"  # a client's typo is a key too

    def all(self) -> dict[str, str]:
        return {"upstream": self.upstream, "client": self.client, "admin": self.admin, "wrong": self.wrong}

    def leaks(self, collected: dict[str, bytes]) -> list[str]:
        """Where any key (so also its ``Bearer ...`` form), or its random core, was found."""
        found = []
        for name, key in self.all().items():
            for needle in (key, key.rsplit("-", 1)[1]):
                found += [
                    f"{name} key ({needle[:12]}...) in {source}"
                    for source, blob in collected.items()
                    if needle.encode() in blob
                ]
        return found


def _config(tmp_path: Path, redis_url: str, upstream_url: str) -> Path:
    """Keys come from the environment, as in production: the file itself holds none."""
    routes = {
        "match": {"model": "routes"},
        "unit": "request",
        "feedback": {"thumbs": {"min": 0, "max": 1}},
        "variants": {
            "keyed": {"control": True, "model": "gpt-4o-mini"},
            "dead": {"weight": 0, "upstream": "dead", "model": "gpt-4o-mini"},
            "slow": {"weight": 0, "upstream": "slow", "model": "gpt-4o-mini"},
            "keyless": {"weight": 0, "upstream": "keyless", "model": "gpt-4o-mini", "system_prompt": KEYLESS_PROMPT},
        },
    }
    config = {
        "redis_url": redis_url,
        "data_dir": str(tmp_path / "data"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "flush_interval_s": 1},
        "server": {"api_keys": ["${ABPROXY_CLIENT_KEY}"], "admin_key": "${ABPROXY_ADMIN_KEY}"},
        "upstreams": {
            "fake": {"base_url": upstream_url, "api_key": "${OPENAI_API_KEY}", "timeout_s": 5},
            "slow": {"base_url": upstream_url, "api_key": "${OPENAI_API_KEY}", "timeout_s": 0.3},
            "dead": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key": "${OPENAI_API_KEY}", "timeout_s": 2},
            "keyless": {"base_url": upstream_url, "timeout_s": 5},
        },
        "default_upstream": "fake",
        "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.60}},
        "experiments": {"translation": copy.deepcopy(BASE_EXPERIMENTS["translation"]), "routes": routes},
    }
    path = tmp_path / "abproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _port_of(tmp_path: Path, upstream: str) -> str:
    """The port of an upstream's base URL in the config ``_config`` wrote."""
    config = yaml.safe_load((tmp_path / "abproxy.yaml").read_text())
    return config["upstreams"][upstream]["base_url"].split(":")[2].split("/")[0]


def _environment(keys: Keys) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABPROXY_", "MLFLOW_", "OPENAI_"))}
    env.update(
        PYTHONPATH=str(REPO),
        OPENAI_API_KEY=keys.upstream,
        ABPROXY_CLIENT_KEY=keys.client,
        ABPROXY_ADMIN_KEY=keys.admin,
    )
    return env


@pytest.fixture
def serve(
    tmp_path: Path, redis_client: redis.Redis, redis_server: Any, upstream_url: str
) -> Iterator[Callable[[Keys], tuple[str, subprocess.Popen[bytes]]]]:
    """Start ``abproxy serve --log-level debug`` with ``keys`` on the suite's Redis (emptied by
    ``redis_client``); returns its base URL and process. Its log is ``tmp_path/serve.log``;
    stopped (SIGTERM) after the test if still running."""
    started: list[subprocess.Popen[bytes]] = []

    def start(keys: Keys) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        with (tmp_path / "serve.log").open("wb") as log:
            config = _config(tmp_path, redis_server.url, upstream_url)
            process = subprocess.Popen(
                [sys.executable, "-m", "abproxy", "serve", "--config", str(config),
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "debug"],
                cwd=tmp_path, env=_environment(keys), stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        started.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "abproxy serve not ready within 30 s"
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return base, process
            except OSError:
                pass
            time.sleep(0.1)

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Received:
    """Everything the test got back from the proxy, and the request ids among it."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.request_ids: list[str] = []

    def keep(self, what: str, headers: Any, body: bytes | str, proxied: bool = True) -> None:
        """``proxied``: an answer to a proxied ``/v1`` call, which must carry a request id."""
        assert what not in self.blobs, what
        rendered = "".join(f"{k}: {v}\n" for k, v in headers.items())
        self.blobs[what] = rendered.encode() + b"\n" + (body.encode() if isinstance(body, str) else body)
        if proxied:
            assert "x-abproxy-request-id" in headers, f"{what}: no X-ABProxy-Request-Id"
            self.request_ids.append(headers["x-abproxy-request-id"])

    def raw(self, what: str, response: Any) -> Any:
        """An SDK ``with_raw_response`` result: kept, then parsed."""
        self.keep(what, response.headers, response.content)
        return response.parse()

    def stream(self, what: str, response: Any) -> str:
        """A parsed SDK stream: every chunk kept; returns the streamed text."""
        chunks, text = [], ""
        for chunk in response.parse():
            chunks.append(chunk.model_dump_json())
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        self.keep(what, response.headers, "\n".join(chunks))
        return text

    def error(self, what: str, status: int, call: Callable[[], Any], proxied: bool = True) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        error = caught.value
        assert error.status_code == status, (what, error.status_code, error.response.text)
        self.keep(what, error.response.headers, error.response.content + b"\n" + str(error).encode(), proxied)
        return error

    def http(
        self, what: str, method: str, url: str, key: str | None = None, body: bytes | None = None, proxied: bool = False
    ) -> tuple[int, Any]:
        """A plain HTTP call, kept: (status, parsed JSON or the raw bytes)."""
        headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
        answer = http(method, url, body, headers, timeout=30)
        self.keep(what, answer.headers, answer.body, proxied)
        try:
            return answer.status, answer.json()
        except ValueError:
            return answer.status, answer.body


def _drive(base: str, keys: Keys, got: Received) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=keys.client, max_retries=0, timeout=30)
    chat = client.chat.completions
    hello = [{"role": "user", "content": "Hello there, how are you?"}]

    first = None
    for i in range(6):
        completion = got.raw(
            f"chat json {i}", chat.with_raw_response.create(model="translation", messages=hello, user=f"sec-{i}")
        )
        assert completion.choices[0].message.content.startswith("Echo:")
        first = first or (got.request_ids[-1], completion.id)
    for i in range(2):
        raw = chat.with_raw_response.create(model="translation", messages=hello, user=f"sec-stream-{i}", stream=True)
        assert got.stream(f"chat stream {i}", raw).startswith("Echo:")
    with chat.with_streaming_response.create(
        model="translation", messages=hello, user="sec-raw", stream=True
    ) as response:
        got.keep("chat stream bytes", response.headers, b"".join(response.iter_bytes()))
    got.raw(
        "responses", client.responses.with_raw_response.create(model="translation", input="Hello again", user="sec-r")
    )
    got.raw(
        "embeddings (passthrough)",
        client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hi"),
    )
    got.raw("models", client.models.with_raw_response.list())
    keyless = got.raw(
        "keyless upstream",
        chat.with_raw_response.create(model="routes", messages=hello, extra_headers={"X-ABProxy-Variant": "keyless"}),
    )
    assert keyless.choices[0].message.content.startswith("Echo:")

    # the upstream's own errors, passed through; the proxy's own: unreachable, timed out, broken
    for status in (401, 403, 429, 500):
        call = partial(chat.create, model="translation", messages=hello, extra_headers={"x-fake-status": str(status)})
        got.error(f"upstream {status}", status, call)
    got.error(
        "passthrough upstream 401", 401,
        lambda: client.embeddings.create(model="e", input="hi", extra_headers={"x-fake-status": "401"}),
    )  # fmt: skip
    unreachable = got.error(
        "unreachable upstream", 502,
        lambda: chat.create(model="routes", messages=hello, extra_headers={"X-ABProxy-Variant": "dead"}),
    )  # fmt: skip
    assert "unreachable" in unreachable.message
    got.error(
        "upstream timeout", 504,
        lambda: chat.create(
            model="routes", messages=hello, extra_headers={"X-ABProxy-Variant": "slow", "x-fake-delay-ms": "2000"}
        ),
    )  # fmt: skip
    broken = chat.with_raw_response.create(
        model="translation", messages=hello, user="sec-broken", stream=True, extra_headers={"x-fake-break-after": "1"}
    )
    with pytest.raises(openai.APIError) as caught:
        got.stream("broken stream", broken)
    got.keep("broken stream error", broken.headers, str(caught.value))

    # wrong, missing and misplaced keys
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key=keys.wrong, max_retries=0)
    admin_as_client = openai.OpenAI(base_url=f"{base}/v1", api_key=keys.admin, max_retries=0)
    got.error("wrong key chat", 401, lambda: wrong.chat.completions.create(model="translation", messages=hello))
    got.error(
        "wrong key stream", 401, lambda: wrong.chat.completions.create(model="translation", messages=hello, stream=True)
    )
    got.error("wrong key models", 401, lambda: wrong.models.list())
    got.error("wrong key passthrough", 401, lambda: wrong.embeddings.create(model="e", input="hi"))
    got.error(
        "admin key as client key",
        401,
        lambda: admin_as_client.chat.completions.create(model="translation", messages=hello),
    )
    no_key = got.http("no key", "POST", f"{base}/v1/chat/completions", body=b'{"model": "translation"}', proxied=True)
    assert no_key[0] == 401

    # feedback
    request_id, completion_id = first
    posted = client.post("/feedback", body={"request_id": request_id, "score": 4}, cast_to=object)
    got.keep("feedback", {}, json.dumps(posted), proxied=False)
    assert posted["status"] == "recorded"
    thumbs = json.dumps({"request_id": completion_id, "name": "thumbs", "score": 1}).encode()
    status, posted = got.http("feedback by completion id", "POST", f"{base}/v1/feedback", keys.client, thumbs)
    assert status == 200 and posted["status"] == "recorded", posted
    for what, status, sender, body in (
        ("feedback wrong key", 401, wrong, {"request_id": request_id, "score": 4}),
        ("feedback unknown id", 404, client, {"request_id": "0" * 32, "score": 4}),
        ("feedback bad score", 422, client, {"request_id": request_id, "score": 9}),
    ):
        got.error(what, status, partial(sender.post, "/feedback", body=body, cast_to=object), proxied=False)
    assert got.http("feedback malformed", "POST", f"{base}/v1/feedback", keys.client, b"{")[0] == 400

    # the admin endpoints: only with the admin key
    for who, key in (("no key", None), ("client key", keys.client), ("wrong key", keys.wrong)):
        assert got.http(f"experiments, {who}", "GET", f"{base}/abproxy/experiments", key)[0] == 401
        assert got.http(f"flush, {who}", "POST", f"{base}/abproxy/flush", key)[0] == 401
    for attempt in range(600):  # the periodic flush may hold the lock this instant (the first creates every run)
        status, flushed = got.http(f"flush {attempt}", "POST", f"{base}/abproxy/flush", keys.admin)
        if status != 409:
            break
        time.sleep(0.2)
    assert status == 200, flushed
    assert set(flushed["experiments"]) == {"translation", "routes"}
    client.close()


def _redis_dump(url: str) -> bytes:
    """Every key and every value, whatever its type (raw bytes: HyperLogLogs, MessagePack)."""
    raw = redis.Redis.from_url(url)
    parts: list[bytes] = []
    try:
        for key in raw.scan_iter(count=1000):
            kind = raw.type(key).decode()
            if kind == "string":
                values: list[bytes] = [raw.get(key) or b""]
            elif kind == "hash":
                values = [item for pair in raw.hgetall(key).items() for item in pair]
            elif kind == "set":
                values = list(raw.smembers(key))
            elif kind == "list":
                values = raw.lrange(key, 0, -1)
            elif kind == "zset":
                values = [member for member, _ in raw.zrange(key, 0, -1, withscores=True)]
            else:
                values = [raw.dump(key) or b""]
            parts += [key, *values]
    finally:
        raw.close()
    return b"\n".join(parts)


def _mlflow_dump(uri: str) -> bytes:
    client = MlflowClient(uri)
    parts = []
    for experiment in client.search_experiments():
        parts.append(repr((experiment.name, experiment.tags)))
        for run in client.search_runs([experiment.experiment_id]):
            parts.append(repr((run.info, run.data.params, run.data.tags, run.data.metrics)))
    return "\n".join(parts).encode()


@pytest.mark.slow
def test_no_key_reaches_logs_metrics_redis_mlflow_or_any_response(
    serve: Callable[[Keys], tuple[str, subprocess.Popen[bytes]]],
    tmp_path: Path,
    redis_server: Any,
    upstream: Any,
    upstream_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    keys = Keys()
    base, process = serve(keys)
    got = Received()
    _drive(base, keys, got)

    log_path = tmp_path / "serve.log"
    deadline = time.monotonic() + 120
    while "flushed" not in log_path.read_text():  # the periodic flush has logged too
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)
    assert got.http("metrics", "GET", f"{base}/metrics", keys.admin)[0] == 200
    for path in ("/abproxy/experiments", "/abproxy/experiments/translation", "/abproxy/experiments/routes"):
        assert got.http(f"live {path}", "GET", f"{base}{path}", keys.admin)[0] == 200
    got.http("healthz", "GET", f"{base}/healthz")
    got.http("readyz", "GET", f"{base}/readyz")

    process.send_signal(signal.SIGTERM)  # drained and stopped: everything it would log is logged
    assert process.wait(timeout=20) == 0

    collected = {f"response: {what}": blob for what, blob in got.blobs.items()}
    collected["redis"] = _redis_dump(redis_server.url)
    collected["mlflow runs"] = _mlflow_dump(f"sqlite:///{tmp_path / 'mlflow.db'}")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    collected.update({f"file {p.relative_to(tmp_path)}": p.read_bytes() for p in files})

    # the search is not vacuous: each source holds what it should
    log = log_path.read_text()
    # the upstreams the proxy failed to get an answer from are named (host only), once each
    upstream_warnings = [line for line in log.splitlines() if " abproxy.upstream: " in line]
    fake_host = upstream_url.split("/")[2]
    assert sorted(re.search(r"abproxy\.upstream: (upstream .+?\) [^:]+):", line)[1] for line in upstream_warnings) == [
        f"upstream 'dead' (127.0.0.1:{_port_of(tmp_path, 'dead')}) is unreachable",
        f"upstream 'fake' ({fake_host}) broke off its answer",  # the broken stream
        f"upstream 'slow' ({fake_host}) timed out",
    ], upstream_warnings
    rest = "\n".join(line for line in log.splitlines() if " abproxy.upstream: " not in line)
    assert "flushed" in rest and "failed" not in rest and "Traceback" not in log, log
    assert b":fb:" in collected["redis"] and b":a:" in collected["redis"], "counters and scores missing from the Redis dump"
    runs = collected["mlflow runs"].decode()
    assert "'abproxy.role': 'summary'" in runs and "'abproxy.variant': 'professional'" in runs
    assert any(p.name == "user_template.txt" for p in files) and any(p.name == "report.md" for p in files), files
    assert b"abproxy_requests_total" in collected["response: metrics"]

    assert keys.leaks(collected) == []

    # request ids: 128 random bits in hex, or signed for experiment requests, one per proxied
    # response (errors too), never twice
    assert len(got.request_ids) >= 25, got.request_ids
    assert all(re.fullmatch(r"[0-9a-f]{32}|r1\.[A-Za-z0-9_-]{40,}", rid) for rid in got.request_ids), got.request_ids
    assert len(set(got.request_ids)) == len(got.request_ids)

    # the upstream got the upstream key, never a client's; the keyless upstream got no key at all
    assert upstream.received, "the fake upstream recorded nothing"
    sent = {}
    for request in upstream.received:
        seen = repr(request.headers).encode() + request.body
        for name in ("client", "admin", "wrong"):
            assert keys.all()[name].encode() not in seen, f"the {name} key reached the upstream: {request.path}"
        sent.setdefault(request.headers.get("authorization"), []).append(request)
    assert set(sent) == {f"Bearer {keys.upstream}", None}, set(sent)
    assert len(sent[None]) == 1 and KEYLESS_PROMPT.encode() in sent[None][0].body


@pytest.mark.slow
def test_config_errors_and_refusals_do_not_echo_keys(tmp_path: Path) -> None:
    """A config that cannot start prints why — without the keys it holds."""
    keys = Keys()
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        f"upstreams:\n  openai:\n    base_url: https://api.openai.com/v1\n    api_key: {keys.upstream}: oops\n"
        f"server:\n  api_keys: [{keys.client}]\n"
    )
    checked = subprocess.run(
        [sys.executable, "-m", "abproxy", "check-config", str(broken)],
        capture_output=True, cwd=tmp_path, env=_environment(keys), timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 2, checked
    assert b"not valid YAML" in checked.stderr and b"line 4" in checked.stderr, checked.stderr
    assert keys.leaks({"check-config": checked.stdout + checked.stderr}) == []

    # an open relay is refused, naming the upstream that holds a key, not the key
    relay = tmp_path / "relay.yaml"
    relay.write_text(
        yaml.safe_dump(
            {"upstreams": {"openai": {"base_url": "https://api.openai.com/v1", "api_key": "${OPENAI_API_KEY}"}}}
        )
    )
    refused = subprocess.run(
        [sys.executable, "-m", "abproxy", "serve", "--config", str(relay),
         "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True, cwd=tmp_path, env=_environment(keys), timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2, refused
    assert b"openai" in refused.stderr and b"refusing" in refused.stderr, refused.stderr
    assert keys.leaks({"serve": refused.stdout + refused.stderr}) == []
