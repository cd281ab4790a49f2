"""Property-based fuzzing of every endpoint of a live proxy (SPEC §2): whatever a client sends —
junk bytes, JSON of any shape, near-valid requests with a field of the wrong type, odd headers,
query strings and paths — the proxy never answers a 5xx of its own, every error is in OpenAI's
shape, no traceback reaches a response or the log, and recording keeps counting exactly.

Each test starts one proxy and runs a hypothesis loop against it over real HTTP (``http.client``,
so any body bytes and header values can be sent). Runs are derandomized: CI sees the same inputs
every time."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest
import redis
from proxykit import BASE_EXPERIMENTS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers import assert_error_shape

from abproxy.recording import layout
from abproxy.simulation.fake_upstream import FakeUpstream

REQUEST_ID = re.compile(r"[0-9a-f]{32}|r1\.[A-Za-z0-9_-]{40,}")  # random, or signed (experiment requests)
EXPERIMENTS = {name: tuple(experiment["variants"]) for name, experiment in BASE_EXPERIMENTS.items()}
FEEDBACK = {
    name: {metric: (bounds["min"], bounds["max"]) for metric, bounds in experiment["feedback"].items()}
    for name, experiment in BASE_EXPERIMENTS.items()
}
GENERATION_PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "completions": "/v1/completions"}
PROMPT_FIELD = {"chat": "messages", "responses": "input", "completions": "prompt"}
CLIENT_KEY, ADMIN_KEY = "sk-fuzz-client", "sk-fuzz-admin"


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# -- raw HTTP ------------------------------------------------------------------------------------


@dataclass
class Reply:
    method: str
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Header = tuple[str, bytes]


class RawClient:
    """HTTP/1.1 with any body bytes, any header value and any (ASCII) request target."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def send(
        self, method: str, target: str, body: bytes | None = None, headers: Sequence[Header] = (), chunked: bool = False
    ) -> Reply:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers:
                connection.putheader(name, value)
            if chunked:
                connection.putheader("Transfer-Encoding", "chunked")
                data = body or b""  # in several small chunks: the proxy receives the body in several messages
                connection.endheaders([data[i : i + 7] for i in range(0, len(data), 7)], encode_chunked=True)
            else:
                if body is not None:
                    connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body)
            response = connection.getresponse()
            data = response.read()
            return Reply(method, response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        finally:
            connection.close()


@dataclass
class Fuzzer:
    """A running proxy, the fake upstream behind it, and the checks every answer must pass."""

    proxy: Any
    upstream: FakeUpstream
    client: RawClient
    upstream_client: RawClient

    def call(
        self, method: str, target: str, body: bytes | None = None, headers: Sequence[Header] = (), chunked: bool = False
    ) -> Reply:
        forwarded = len(self.upstream.received)
        reply = self.client.send(method, target, body, headers, chunked)
        assert b"Traceback" not in reply.body and b'File "' not in reply.body, reply
        if reply.status >= 500:
            self._assert_the_upstream_said_so(reply, forwarded)
        elif reply.status >= 400 and method != "HEAD":
            try:
                payload = reply.json()
            except ValueError:
                raise AssertionError(f"{method} {target}: {reply.status} is not JSON: {reply.body[:300]!r}") from None
            assert_error_shape(payload)
        return reply

    def _assert_the_upstream_said_so(self, reply: Reply, forwarded: int) -> None:
        """A 5xx is allowed only as the upstream's own answer, passed through: the proxy forwarded
        this one request, and sending it to the upstream directly gets the same status and body."""
        sent = self.upstream.received[forwarded:]
        assert len(sent) == 1, f"the proxy answered {reply.status} itself: {reply.body[:300]!r}"
        request = sent[0]
        fake_headers = [(k, v.encode()) for k, v in request.headers.items() if k.startswith("x-fake-")]
        direct = self.upstream_client.send(request.method, quote(request.path, safe="/"), request.body, fake_headers)
        assert (direct.status, direct.body) == (reply.status, reply.body), (direct, reply)


@pytest.fixture
def fuzzer_for(start_proxy: Callable[..., Any], upstream: FakeUpstream, upstream_url: str) -> Callable[..., Fuzzer]:
    def start(**config: Any) -> Fuzzer:
        proxy = start_proxy(socket=True, **config)
        return Fuzzer(proxy, upstream, RawClient(proxy.url), RawClient(upstream_url))

    return start


def raised_by_the_upstream(record: logging.LogRecord) -> bool:
    """Logged by the fake upstream's own server (the same uvicorn logger): the upstream's 5xx,
    which the proxy must pass through, not an error of the proxy."""
    traceback_ = record.exc_info[2] if record.exc_info else None
    return any(frame.f_globals["__name__"] == FakeUpstream.__module__ for frame, _ in traceback.walk_tb(traceback_))


@contextlib.contextmanager
def no_unhandled_errors() -> Iterator[None]:
    """Fail if the proxy, or uvicorn on its behalf ("Exception in ASGI application"), logs an
    error meanwhile. uvicorn's loggers do not propagate to the root logger caplog listens on,
    and each server start re-configures them: enter this after the proxy has started."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger("abproxy"), logging.getLogger("uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    formatter = logging.Formatter("%(name)s: %(message)s")
    errors = [formatter.format(record) for record in records if not raised_by_the_upstream(record)]
    assert errors == [], "\n".join(errors)


# -- strategies ------------------------------------------------------------------------------------


def mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any], one_in: int = 4) -> st.SearchStrategy[Any]:
    """``odd`` once in ``one_in`` draws, else ``usual``: a fuzzed request should be wrong in a
    place or two, not everywhere (the first error found would hide the rest of the request path)."""
    # hypothesis favours the simplest draw (the lowest integer): make it the usual one
    return st.integers(min_value=1, max_value=one_in).flatmap(lambda pick: odd if pick == one_in else usual)


def rarely(strategy: st.SearchStrategy[Any], one_in: int = 4) -> st.SearchStrategy[Any]:
    return mostly(st.none(), strategy, one_in)


def present(headers: dict[str, bytes | None]) -> dict[str, bytes]:
    return {name: value for name, value in headers.items() if value is not None}


ODD_TEXTS = (
    "", " ", "\x00", "\U0001f600", "\u2028\u2029", "é" * 20, "a" * 5000, "{{input}}", "{{product}}",
    "{{ missing }}", "{{", "}}", "\\", '"', "%s%n", "\r\n\r\n", "data: [DONE]\n\n", ',"usage":null', "NaN",
    "-1e999",
)  # fmt: skip
TEXT = st.text(max_size=30) | st.sampled_from(ODD_TEXTS)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12
)


@dataclass(frozen=True)
class Deep:
    """A JSON value nested ``depth`` levels deep (json.dumps would recurse too far to write it)."""

    depth: int


# orjson reads up to 1024 levels and writes up to 254
DEEP = st.builds(Deep, st.sampled_from([100, 254, 255, 300, 990, 1000, 1020, 1100]))
_DEEP_MARK = re.compile(r'"\\u0000deep(\d+)\\u0000"')


def encode(value: Any, ascii_only: bool = True) -> bytes:
    """JSON text of ``value``: lone surrogates escaped (``\\ud800``) or written as invalid UTF-8,
    :class:`Deep` values as raw nested arrays."""
    text = json.dumps(value, ensure_ascii=ascii_only, default=lambda deep: f"\x00deep{deep.depth}\x00")
    text = _DEEP_MARK.sub(lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text)
    return text.encode("utf-8", "surrogatepass")


ENCODED = st.builds(encode, JSON | DEEP, st.booleans())
WITH_LONE_SURROGATE = st.builds(
    lambda text, ascii_only: encode(
        {"model": "translation", "messages": [{"role": "user", "content": text}]}, ascii_only
    ),
    st.sampled_from(["\ud800", "\udfff", "a\udc00b"]),
    st.booleans(),
)
MALFORMED_BODIES = st.one_of(
    st.binary(max_size=200),
    ENCODED,
    WITH_LONE_SURROGATE,
    st.just(b""),
    st.sampled_from(
        [
            b'{"model":"translation","messages":[{"role":"user","content":"\xff\xfe"}]}',
            b'{"model":"translation","messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
            b'{"model":"translation","messages":[{"role":"user","content":"hi"}],"max_tokens":1e999}',
            b'{"model":"translation","messages":[{"role":"user","content":"hi"}]',
            b'{"model":"translation","model":"sentiment","messages":[]}',
            b'\xef\xbb\xbf{"model":"translation","messages":[]}',
            b"[" * 2000,
        ]
    ),
)

HEADER_TEXT = st.one_of(
    st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=40),
    st.integers(min_value=200, max_value=8000).map(lambda n: "u" * n),
).map(lambda text: text.encode("utf-8"))
CONTENT_TYPES = st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/json; charset=latin-1", ""]
)  # fmt: skip
VARIANT_NAMES = [name.encode() for variants in EXPERIMENTS.values() for name in variants]
ROUTING_HEADERS = st.fixed_dictionaries(
    {
        "Content-Type": rarely(CONTENT_TYPES.map(str.encode)),
        "X-ABProxy-User": st.none() | HEADER_TEXT,
        "X-ABProxy-Experiment": rarely(mostly(st.sampled_from([name.encode() for name in EXPERIMENTS]), HEADER_TEXT)),
        "X-ABProxy-Variant": rarely(mostly(st.sampled_from([*VARIANT_NAMES, b" "]), HEADER_TEXT), one_in=8),
        "Authorization": rarely(HEADER_TEXT),
    }
).map(present)
# Odd upstream answers, as the fake upstream gives them on request: errors of any status (5xx
# included, to be passed through), replies of any text, no usage, streams broken off.
UPSTREAM_HEADERS = st.fixed_dictionaries(
    {
        "x-fake-status": rarely(st.sampled_from([b"400", b"404", b"422", b"429", b"500", b"503", b"oops"]), one_in=8),
        "x-fake-reply": rarely(HEADER_TEXT),
        "x-fake-usage": rarely(st.just(b"0"), one_in=8),
        "x-fake-break-after": rarely(st.sampled_from([b"0", b"1", b"2"]), one_in=8),
    }
).map(present)
QUERY = st.just("") | st.text(max_size=30).map(lambda text: "?" + quote(text, safe="=&%;/:@+$,"))
METHODS = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "PROPFIND"])

MODELS = mostly(st.sampled_from(list(EXPERIMENTS)), st.sampled_from(["gpt-4o-mini", "gpt-4o"]) | TEXT)
ROLES = mostly(st.sampled_from(["user", "system", "developer", "assistant"]), TEXT)
PART = mostly(st.fixed_dictionaries({"type": st.sampled_from(["text", "input_text", "image_url"]), "text": TEXT}), JSON)
CONTENT = mostly(TEXT | st.lists(PART, max_size=3), JSON)
MESSAGE = mostly(st.fixed_dictionaries({"role": ROLES, "content": CONTENT}), JSON)
PROMPTS = {
    "chat": st.lists(MESSAGE, min_size=1, max_size=3),
    "responses": TEXT | st.lists(MESSAGE, max_size=3),
    "completions": mostly(TEXT, st.lists(TEXT, max_size=2)),
}
VARIABLES = mostly(
    st.fixed_dictionaries({"product": TEXT}, optional={"input": TEXT, "x": JSON | DEEP}),
    st.dictionaries(st.sampled_from(["product", "input"]) | TEXT, JSON | DEEP, max_size=3) | JSON,
)
REQUIRED_FIELDS = {"model": MODELS, "stream": st.booleans(), "abproxy_variables": VARIABLES}
OPTIONAL_FIELDS = {
    "user": mostly(TEXT, JSON),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()}), JSON),
    "temperature": st.floats(min_value=0, max_value=2),
    "max_tokens": st.integers(min_value=-(2**70), max_value=2**70),
    "instructions": TEXT,
}
MUTABLE_FIELDS = [*REQUIRED_FIELDS, *PROMPT_FIELD.values(), *OPTIONAL_FIELDS]
DELETE = object()


@st.composite
def near_valid_bodies(draw: st.DrawFn, endpoint: str) -> dict[str, Any]:
    """A request the SDK would send, then up to two fields replaced by anything (or removed)."""
    body = draw(
        st.fixed_dictionaries({**REQUIRED_FIELDS, PROMPT_FIELD[endpoint]: PROMPTS[endpoint]}, optional=OPTIONAL_FIELDS)
    )
    mutations = draw(st.dictionaries(st.sampled_from(MUTABLE_FIELDS), JSON | DEEP | st.just(DELETE), max_size=2))
    for name, value in mutations.items():
        if value is DELETE:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def header_list(*groups: dict[str, bytes]) -> list[Header]:
    return [item for group in groups for item in group.items()]


# -- checks ------------------------------------------------------------------------------------------


def assert_request_id(reply: Reply) -> None:
    assert REQUEST_ID.fullmatch(reply.headers.get("x-abproxy-request-id", "")), reply.headers


def recorded_requests(client: redis.Redis, proxy: Any) -> int:
    """Requests counted in Redis over every arm of every experiment."""
    return sum(
        int(client.hget(layout.stats_key(name, arm.arm_id), "requests") or 0)
        for name, plan in proxy.app.catalog.plans.items()
        for arm in plan.arms.values()
    )


def assert_still_recording(proxy: Any, client: redis.Redis) -> None:
    """The recorder holds nothing back, and an ordinary SDK request is still counted."""
    proxy.settle()
    assert proxy.app.recorder.buffered == 0
    before = recorded_requests(client, proxy)
    completion = proxy.client().chat.completions.create(
        model="translation", messages=[{"role": "user", "content": "still there?"}], user="after-fuzzing"
    )
    assert completion.choices[0].message.content.startswith("Echo: ")
    proxy.settle()
    assert recorded_requests(client, proxy) == before + 1


def assert_still_serving(fuzzer: Fuzzer) -> None:
    reply = fuzzer.client.send("GET", "/healthz")
    assert reply.status == 200 and reply.json()["status"] == "ok"


# -- generation endpoints ------------------------------------------------------------------------------


@pytest.mark.slow
def test_generation_endpoints_answer_malformed_requests_with_openai_errors(
    fuzzer_for: Callable[..., Fuzzer], redis_client: redis.Redis
) -> None:
    fuzzer = fuzzer_for()
    codes: set[str] = set()

    @fuzz(200)
    @given(
        method=mostly(st.just("POST"), METHODS),
        endpoint=st.sampled_from(list(GENERATION_PATHS)),
        body=MALFORMED_BODIES,
        content_type=CONTENT_TYPES,
        chunked=st.booleans(),
    )
    def case(method: str, endpoint: str, body: bytes, content_type: str, chunked: bool) -> None:
        path = GENERATION_PATHS[endpoint]
        reply = fuzzer.call(method, path, body, [("Content-Type", content_type.encode())], chunked)
        if method != "POST":
            assert (reply.status, reply.headers["allow"]) == (405, "POST"), reply
            return
        assert_request_id(reply)
        if reply.status >= 400:
            codes.add(reply.json()["error"]["code"])

    with no_unhandled_errors():
        case()
        assert_still_serving(fuzzer)
        assert_still_recording(fuzzer.proxy, redis_client)
    assert "invalid_json" in codes and fuzzer.upstream.received, "the bodies were all rejected, or none were"


@pytest.mark.slow
def test_generation_endpoints_survive_near_valid_requests_and_count_each_exactly_once(
    fuzzer_for: Callable[..., Fuzzer], redis_client: redis.Redis
) -> None:
    fuzzer = fuzzer_for()
    counted = 0
    served: set[tuple[str, bool]] = set()

    @fuzz(300)
    @given(
        endpoint=st.sampled_from(list(GENERATION_PATHS)),
        data=st.data(),
        ascii_only=st.booleans(),
        routing=ROUTING_HEADERS,
        upstream_answer=UPSTREAM_HEADERS,
        query=QUERY,
    )
    def case(
        endpoint: str,
        data: st.DataObject,
        ascii_only: bool,
        routing: dict[str, bytes],
        upstream_answer: dict[str, bytes],
        query: str,
    ) -> None:
        nonlocal counted
        body = data.draw(near_valid_bodies(endpoint))
        headers = header_list({"Content-Type": b"application/json"}, routing, upstream_answer)
        reply = fuzzer.call("POST", GENERATION_PATHS[endpoint] + query, encode(body, ascii_only), headers)
        assert_request_id(reply)
        experiment = reply.headers.get("x-abproxy-experiment")
        if experiment is None:
            return
        assert reply.headers.get("x-abproxy-variant") in EXPERIMENTS[experiment], reply.headers
        if reply.status == 200:
            served.add((experiment, reply.headers["content-type"].startswith("text/event-stream")))
        if not routing.get("X-ABProxy-Variant", b"").strip(b" \t"):
            counted += 1  # forced variants are served but kept out of the statistics

    with no_unhandled_errors():
        case()
        assert_still_serving(fuzzer)
        fuzzer.proxy.settle()
        assert recorded_requests(redis_client, fuzzer.proxy) == counted
        assert_still_recording(fuzzer.proxy, redis_client)
    # Not vacuous: both experiments served answers, as JSON and as streams.
    assert served == {(name, streamed) for name in EXPERIMENTS for streamed in (False, True)}, served


def test_template_variables_and_bodies_nested_too_deep_are_400_not_500(
    fuzzer_for: Callable[..., Fuzzer], upstream: FakeUpstream
) -> None:
    """Found by the fuzzing above: a variable nested ~1000 levels deep crashed rendering the
    template (RecursionError), and an experiment body nested deeper than orjson writes (254
    levels) crashed re-serialising it; both were bare 500s with a traceback in the log."""
    fuzzer = fuzzer_for()
    headers = [("Content-Type", b"application/json"), ("X-ABProxy-Variant", b"detailed")]
    messages = [{"role": "user", "content": "great shoes"}]
    cases = [
        ({"abproxy_variables": {"product": Deep(1000)}}, "template_error"),
        ({"abproxy_variables": {"product": "shoes"}, "metadata": Deep(300)}, "invalid_json"),
    ]
    with no_unhandled_errors():
        for extra, code in cases:
            body = {"model": "sentiment", "messages": messages, **extra}
            reply = fuzzer.call("POST", "/v1/chat/completions", encode(body), headers)
            assert (reply.status, reply.json()["error"]["code"]) == (400, code), reply
        assert upstream.received == []
        # Variables that are not strings are rendered as the JSON the client sent.
        variables = {"product": {"name": "shoes", "sizes": [41, 42]}}
        body = {"model": "sentiment", "messages": messages, "abproxy_variables": variables}
        reply = fuzzer.call("POST", "/v1/chat/completions", encode(body), headers)
        assert reply.status == 200, reply
    system = upstream.received[-1].json["messages"][0]["content"]
    assert system == 'You are a sentiment analyst for {"name":"shoes","sizes":[41,42]}.'


# -- passthrough, models, ops and unknown paths ------------------------------------------------------


SEGMENTS = st.sampled_from([".", "..", "%2e", "%2E%2e", "embeddings", "models", "files", ""]) | st.text(
    max_size=12
).map(lambda text: quote(text, safe="%;:@!$'()*+,="))
# Half the paths start at a route the upstream has, so that some calls go all the way through.
PASSTHROUGH_SEGMENTS = st.lists(SEGMENTS, min_size=1, max_size=4) | st.sampled_from(["models", "embeddings"]).flatmap(
    lambda route: st.lists(SEGMENTS, max_size=2).map(lambda rest: [route, *rest])
)
EMBEDDING = b'{"model": "e", "input": "x"}'


@pytest.mark.slow
def test_passthrough_forwards_any_path_and_refuses_dot_segments(fuzzer_for: Callable[..., Fuzzer]) -> None:
    fuzzer = fuzzer_for()
    statuses: set[int] = set()

    @fuzz(200)
    @given(
        method=mostly(st.sampled_from(["GET", "POST"]), METHODS, one_in=3),
        segments=PASSTHROUGH_SEGMENTS,
        query=QUERY,
        body=st.none() | st.just(EMBEDDING) | st.binary(max_size=100) | ENCODED,
        headers=ROUTING_HEADERS,
    )
    def case(method: str, segments: list[str], query: str, body: bytes | None, headers: dict[str, bytes]) -> None:
        path = "/v1/" + "/".join(segments)
        decoded = unquote(path)
        reply = fuzzer.call(method, path + query, body, header_list(headers))
        if decoded in GENERATION_PATHS.values() or decoded in ("/v1/feedback", "/v1/models"):
            return  # the proxy's own endpoints, fuzzed in their own tests
        assert_request_id(reply)
        statuses.add(reply.status)
        if {".", ".."} & set(decoded.split("/")):
            assert reply.status == 400, reply
            assert method == "HEAD" or reply.json()["error"]["code"] == "invalid_path", reply

    with no_unhandled_errors():
        case()
        forwarded = len(fuzzer.upstream.received)
        # An ordinary passthrough call still works.
        reply = fuzzer.call("POST", "/v1/embeddings", EMBEDDING, [("Content-Type", b"application/json")])
        assert reply.status == 200 and len(reply.json()["data"]) == 1
        assert_still_serving(fuzzer)
    assert 400 in statuses and forwarded, "no dot segment was refused, or nothing was forwarded"


OPS_PATHS = st.sampled_from(
    ["/healthz", "/readyz", "/metrics", "/metrics/", "/", "/v1", "/v2/chat/completions", "/abproxy", "/favicon.ico"]
) | st.text(max_size=20).map(lambda text: "/" + quote(text, safe="/%;:@!$'()*+,="))


@pytest.mark.slow
def test_models_ops_and_unknown_paths(fuzzer_for: Callable[..., Fuzzer]) -> None:
    fuzzer = fuzzer_for()

    @fuzz(100)
    @given(query=QUERY, headers=ROUTING_HEADERS)
    def models(query: str, headers: dict[str, bytes]) -> None:
        reply = fuzzer.call("GET", "/v1/models" + query, None, header_list(headers))
        assert reply.status == 200, reply
        assert_request_id(reply)
        assert set(EXPERIMENTS) <= {model["id"] for model in reply.json()["data"]}

    @fuzz(150)
    @given(method=METHODS, path=OPS_PATHS, query=QUERY, body=st.none() | st.binary(max_size=50))
    def ops(method: str, path: str, query: str, body: bytes | None) -> None:
        decoded = unquote(path)
        if decoded.startswith(("/v1/", "/abproxy/")):
            return  # fuzzed in their own tests
        reply = fuzzer.call(method, path + query, body)
        if decoded not in ("/healthz", "/readyz", "/metrics"):
            assert reply.status == 404, reply
        elif method in ("GET", "HEAD"):
            assert reply.status == 200, reply
        else:
            assert reply.status == 405 and set(reply.headers["allow"].split(", ")) == {"GET", "HEAD"}, reply

    with no_unhandled_errors():
        models()
        ops()
        metrics = fuzzer.client.send("GET", "/metrics")
        assert metrics.status == 200 and b"abproxy_requests_total" in metrics.body


# -- feedback ------------------------------------------------------------------------------------------


def real_ids(proxy: Any) -> dict[str, str]:
    """Request ids and response ids (JSON and stream) of real experiment responses → experiment."""
    client = proxy.client()
    known: dict[str, str] = {}
    for experiment, user in (("translation", "fb-1"), ("translation", "fb-2"), ("sentiment", "fb-3")):
        raw = client.chat.completions.with_raw_response.create(
            model=experiment, messages=[{"role": "user", "content": "hello"}], user=user,
            extra_body={"abproxy_variables": {"product": "shoes"}},
        )  # fmt: skip
        known[raw.headers["x-abproxy-request-id"]] = experiment
        known[raw.parse().id] = experiment
    stream = client.chat.completions.create(
        model="translation", messages=[{"role": "user", "content": "hello"}], user="fb-4", stream=True
    )
    known[list(stream)[0].id] = "translation"
    proxy.settle()
    return known


MISSING = object()


def expected_feedback_statuses(body: Any, known: dict[str, str]) -> set[int]:
    """SPEC §2: 400 malformed; else 404 unknown id, 422 unknown name or a score that is not a
    number in [min, max] — any of those that apply; else 200."""
    if not isinstance(body, dict):
        return {400}
    request_id, name, score = body.get("request_id"), body.get("name"), body.get("score", MISSING)
    if not isinstance(request_id, str) or not request_id or len(request_id) > 256:
        return {400}
    if (name is not None and not isinstance(name, str)) or score is MISSING:
        return {400}
    problems = set()
    is_number = isinstance(score, (int, float)) and not isinstance(score, bool) and abs(score) != float("inf")
    if not is_number:
        problems.add(422)
    experiment = known.get(request_id)
    if experiment is None:
        problems.add(404)
    else:
        metrics = FEEDBACK[experiment]
        bounds = metrics.get(name if name is not None else next(iter(metrics)))
        if bounds is None or (is_number and not bounds[0] <= score <= bounds[1]):
            problems.add(422)
    return problems or {200}


@pytest.mark.slow
def test_feedback_answers_every_body_as_the_spec_says(
    fuzzer_for: Callable[..., Fuzzer], redis_client: redis.Redis
) -> None:
    fuzzer = fuzzer_for()
    known = real_ids(fuzzer.proxy)
    ids = st.sampled_from(sorted(known)) | st.sampled_from(["", "x" * 257, "f" * 32, "chatcmpl-unknown"]) | TEXT | JSON
    names = st.sampled_from(["satisfaction", "thumbs", "accuracy", "", "nope"]) | JSON
    scores = st.integers(min_value=-3, max_value=7) | st.floats(allow_nan=False, allow_infinity=False) | JSON
    bodies = st.fixed_dictionaries({}, optional={"request_id": ids, "name": names, "score": scores, "extra": JSON})
    plausible = st.fixed_dictionaries(
        {
            "request_id": st.sampled_from([*sorted(known), "f" * 32, "chatcmpl-unknown"]),
            "score": st.integers(min_value=-1, max_value=6) | st.floats(-1, 6),
        },
        optional={"name": st.sampled_from(["satisfaction", "thumbs", "accuracy"])},
    )
    answered: set[int] = set()

    @fuzz(250)
    @given(body=plausible | bodies | JSON, content_type=CONTENT_TYPES)
    def structured(body: Any, content_type: str) -> None:
        reply = fuzzer.call("POST", "/v1/feedback", encode(body), [("Content-Type", content_type.encode())])
        expected = expected_feedback_statuses(body, known)
        assert reply.status in expected, (body, reply, expected)
        answered.add(reply.status)
        if reply.status == 200:
            answer = reply.json()
            assert answer["status"] in ("recorded", "updated") and answer["experiment"] == known[body["request_id"]]

    @fuzz(100)
    @given(method=METHODS, body=st.none() | MALFORMED_BODIES, query=QUERY)
    def malformed(method: str, body: bytes | None, query: str) -> None:
        reply = fuzzer.call(method, "/v1/feedback" + query, body)
        assert reply.status in ((400, 404, 422) if method == "POST" else (405,)), reply
        if reply.status == 405:
            assert reply.headers["allow"] == "POST", reply

    with no_unhandled_errors():
        structured()
        malformed()
        assert_still_serving(fuzzer)
    assert {200, 400, 404, 422} <= answered, answered


# -- admin endpoints -----------------------------------------------------------------------------------


def expected_admin_status(method: str, path: str) -> int:
    """200 for the admin routes (a trailing slash is tolerated), 400 for a path with ``.`` or
    ``..`` segments, 405 for a route's path asked with a method it does not take, 404 for an
    unknown experiment or any other path."""
    path = unquote(path)
    if {".", ".."} & set(path.split("/")):
        return 400
    path = path.rstrip("/")
    name = path.removeprefix("/abproxy/experiments/")
    if path == "/abproxy/experiments" or (path.startswith("/abproxy/experiments/") and "/" not in name):
        if method not in ("GET", "HEAD"):
            return 405
        return 200 if path == "/abproxy/experiments" or name in EXPERIMENTS else 404
    if path == "/abproxy/flush":
        return 200 if method == "POST" else 405
    return 404


@pytest.mark.slow
def test_admin_endpoints_answer_any_request(
    fuzzer_for: Callable[..., Fuzzer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow's local store writes artifacts under the working directory
    fuzzer = fuzzer_for(mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "flush_interval_s": 0})
    names = st.sampled_from(["translation", "sentiment", "translation/", "", "/"]) | st.text(max_size=20).map(
        lambda text: quote(text, safe="/%")
    )

    @fuzz(150)
    @given(method=METHODS, name=names, query=QUERY, body=st.none() | st.binary(max_size=50), headers=ROUTING_HEADERS)
    def experiments(method: str, name: str, query: str, body: bytes | None, headers: dict[str, bytes]) -> None:
        path = "/abproxy/experiments/" + name
        reply = fuzzer.call(method, path + query, body, header_list(headers))
        assert reply.status == expected_admin_status(method, path), reply
        if reply.status == 405:
            assert set(reply.headers["allow"].split(", ")) == {"GET", "HEAD"}, reply
        if reply.status == 200 and method == "GET":
            answer = reply.json()
            results = answer.get("experiments", [answer])
            assert {result["experiment"] for result in results} <= set(EXPERIMENTS)

    @fuzz(6)
    @given(method=st.sampled_from(["POST", "GET"]), slash=st.booleans(), query=QUERY, body=st.none() | MALFORMED_BODIES)
    def flush(method: str, slash: bool, query: str, body: bytes | None) -> None:
        path = "/abproxy/flush" + ("/" if slash else "")
        reply = fuzzer.call(method, path + query, body)
        assert reply.status == expected_admin_status(method, path), reply

    with no_unhandled_errors():
        experiments()
        flush()
        reply = fuzzer.call("POST", "/abproxy/flush")
        written = reply.json()["experiments"]
        assert reply.status == 200 and set(written) == set(EXPERIMENTS), reply
        assert not [outcome for outcome in written.values() if "error" in outcome], written
        assert_still_serving(fuzzer)


# -- keys --------------------------------------------------------------------------------------------


AUTH_CALLS = {
    "chat": (
        "POST",
        "/v1/chat/completions",
        b'{"model": "translation", "messages": [{"role": "user", "content": "x"}]}',
    ),
    "models": ("GET", "/v1/models", None),
    "embeddings": ("POST", "/v1/embeddings", EMBEDDING),
    "feedback": ("POST", "/v1/feedback", b'{"request_id": "unknown", "score": 3}'),
    "experiments": ("GET", "/abproxy/experiments", None),
    "one experiment": ("GET", "/abproxy/experiments/translation", None),
}
ADMIN_CALLS = {"experiments", "one experiment"}
KEYS = (
    st.sampled_from([CLIENT_KEY, ADMIN_KEY])
    | st.sampled_from([CLIENT_KEY + "x", CLIENT_KEY[:-1], CLIENT_KEY.upper(), f"{CLIENT_KEY},{ADMIN_KEY}", ""])
    | st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=20)
)
BEARER = st.builds(
    lambda scheme, gap, key, tail: f"{scheme}{gap}{key}{tail}".encode(),
    mostly(st.sampled_from(["Bearer", "bearer", "BEARER"]), st.sampled_from(["Basic", "Token", ""])),
    mostly(st.just(" "), st.sampled_from(["  ", ""])),
    KEYS,
    st.sampled_from(["", " "]),
)
AUTHORIZATION = mostly(BEARER, st.none() | HEADER_TEXT)


def accepted_key(authorization: bytes | None) -> str | None:
    """The key an ``Authorization: Bearer <key>`` header presents (scheme case-insensitive)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.decode("utf-8").strip(" \t").partition(" ")
    return token.strip(" \t") if scheme.lower() == "bearer" else None


@pytest.mark.slow
def test_keys_are_checked_on_every_endpoint_whatever_the_authorization_header(
    fuzzer_for: Callable[..., Fuzzer],
) -> None:
    fuzzer = fuzzer_for(server={"api_keys": [CLIENT_KEY], "admin_key": ADMIN_KEY})
    statuses: set[int] = set()

    @fuzz(150)
    @given(call=st.sampled_from(sorted(AUTH_CALLS)), authorization=AUTHORIZATION)
    def case(call: str, authorization: bytes | None) -> None:
        method, path, body = AUTH_CALLS[call]
        headers = [("Content-Type", b"application/json")]
        if authorization is not None:
            headers.append(("Authorization", authorization))
        reply = fuzzer.call(method, path, body, headers)
        statuses.add(reply.status)
        if accepted_key(authorization) == (ADMIN_KEY if call in ADMIN_CALLS else CLIENT_KEY):
            assert reply.status == (404 if call == "feedback" else 200), reply
        else:
            assert reply.status == 401, reply
            presented = (accepted_key(authorization) or "").encode()
            assert len(presented) < 8 or presented not in reply.body, "a rejected key is echoed back"

    with no_unhandled_errors():
        case()
        assert_still_serving(fuzzer)
    assert {200, 401} <= statuses, statuses
