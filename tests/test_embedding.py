"""abproxy inside someone else's ASGI app: ``from abproxy import create_app``, mounted under
``/llm`` in a host Starlette app whose lifespan is abproxy's, served by uvicorn; the OpenAI SDK,
feedback and the admin API all through the prefix, and 405s that say what is allowed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from abproxy import create_app
from abproxy.simulation.fake_upstream import FakeUpstream
from abproxy.simulation.server import RunningServer, serve_in_thread
from proxykit import RedisServer, make_config
from helpers import assert_openai_error, http, http_json, metrics_text, sample, wait_until


async def _host_home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("the host's own page")


def starlette_host(ab: Starlette) -> Starlette:
    return Starlette(routes=[Route("/", _host_home), Mount("/llm", app=ab)], lifespan=ab.router.lifespan_context)


def fastapi_host(ab: Starlette) -> Any:
    """As the README shows it."""
    from fastapi import FastAPI  # MLflow's server depends on it

    app = FastAPI(lifespan=ab.router.lifespan_context)
    app.add_api_route("/", _host_home)
    app.mount("/llm", ab)
    return app


@pytest.fixture(scope="module", params=[starlette_host, fastapi_host], ids=["starlette", "fastapi"])
def host_url(
    request: pytest.FixtureRequest, redis_server: RedisServer, fake_upstream: tuple[FakeUpstream, RunningServer]
) -> Iterator[str]:
    """A host app: its own route at ``/``, abproxy under ``/llm``, abproxy's lifespan as its own."""
    ab = create_app(make_config(f"{fake_upstream[1].url}/v1"), redis_url=redis_server.url)
    with serve_in_thread(request.param(ab)) as running:
        yield running.url


def test_the_sdk_feedback_and_results_all_answer_under_the_hosts_prefix(
    host_url: str, upstream: FakeUpstream, redis_client: redis.Redis
) -> None:
    client = openai.OpenAI(base_url=f"{host_url}/llm/v1", api_key="sk-client", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="translation", messages=[{"role": "user", "content": "Hello"}], user="u-1"
    )
    completion = raw.parse()
    assert raw.headers["x-abproxy-experiment"] == "translation"
    variant = raw.headers["x-abproxy-variant"]
    # The upstream is asked at its own path: the host's prefix is not passed on.
    assert upstream.received[-1].path == "/v1/chat/completions"
    assert upstream.received[-1].json["model"] == "gpt-4o-mini"

    chunks = list(
        client.chat.completions.create(
            model="translation", messages=[{"role": "user", "content": "Hello"}], user="u-1", stream=True
        )
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

    status, answer = http_json("POST", f"{host_url}/llm/v1/feedback", {"request_id": completion.id, "score": 5})
    assert (status, answer["variant"]) == (200, variant), answer

    # The recorder runs (the host ran abproxy's lifespan): both calls and the score are counted.
    def counted() -> dict[str, Any] | None:
        status, results = http_json("GET", f"{host_url}/llm/abproxy/experiments/translation")
        assert status == 200
        arm = next(arm for arm in results["variants"] if arm["name"] == variant)
        return results if arm["requests"] == 2 and arm["metrics"]["feedback.satisfaction"]["n"] == 1 else None

    wait_until(counted)
    assert [model.id for model in client.models.list()].count("translation") == 1
    assert http("GET", f"{host_url}/llm/healthz").json()["status"] == "ok"
    assert http("GET", f"{host_url}/llm/readyz").json()["status"] == "ready"
    assert sample(metrics_text(f"{host_url}/llm"), "abproxy_requests_total", experiment="translation", variant=variant) >= 2
    # The host's own route is untouched, and abproxy's paths are not answered outside its prefix.
    assert http("GET", f"{host_url}/").body == b"the host's own page"
    assert http("GET", f"{host_url}/healthz").status == 404


def test_passthrough_under_a_prefix_forwards_the_path_below_it_still_encoded(host_url: str, upstream: FakeUpstream) -> None:
    raw = http("GET", f"{host_url}/llm/v1/files/a%2Fb%3Fx=1", headers={"Authorization": "Bearer sk-client"})
    assert raw.status == 404  # the fake upstream's answer, passed on
    assert upstream.received[-1].path == "/v1/files/a/b?x=1"
    assert_openai_error(http("GET", f"{host_url}/llm/v1/files/../../admin"), 400, "invalid_path")


WRONG_METHODS = [
    ("GET", "/v1/chat/completions", {"POST"}),
    ("PUT", "/v1/responses", {"POST"}),
    ("GET", "/v1/feedback", {"POST"}),
    ("DELETE", "/v1/models", {"GET", "HEAD"}),
    ("POST", "/healthz", {"GET", "HEAD"}),
    ("POST", "/abproxy/experiments/translation", {"GET", "HEAD"}),
    ("GET", "/abproxy/flush", {"POST"}),
    ("GET", "/abproxy/experiments/translation/promote", {"POST", "DELETE"}),
]


def test_a_method_an_endpoint_does_not_take_is_a_405_naming_the_ones_it_does(host_url: str, upstream: FakeUpstream) -> None:
    for method, path, allowed in WRONG_METHODS:
        raw = http(method, f"{host_url}/llm{path}", headers={"Authorization": "Bearer sk-client"})
        error = assert_openai_error(raw, 405, "method_not_allowed")
        assert set(raw.headers["allow"].split(", ")) == allowed, (method, path)
        assert path in error["message"]
    assert upstream.received == [], "a method abproxy refuses was forwarded"


def test_create_app_takes_a_yaml_path_and_answers_503_until_its_lifespan_has_run(
    tmp_path: Path, redis_server: RedisServer, upstream_url: str
) -> None:
    config_file = tmp_path / "abproxy.yaml"
    config_file.write_text(yaml.safe_dump({"upstreams": {"fake": {"base_url": upstream_url}}, "default_upstream": "fake"}))
    ab = create_app(config_file, redis_url=redis_server.url)
    assert isinstance(ab, Starlette)
    forgot_lifespan = Starlette(routes=[Mount("/llm", app=ab)])  # the host did not pass abproxy's lifespan
    with serve_in_thread(forgot_lifespan) as running:
        raw = http("POST", f"{running.url}/llm/v1/chat/completions", json.dumps({"model": "m", "messages": []}).encode())
        error = assert_openai_error(raw, 503, "not_started")
        assert "lifespan" in error["message"]
    with serve_in_thread(ab) as running:  # served on its own, it runs its lifespan itself
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="sk-client", max_retries=0)
        assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices
