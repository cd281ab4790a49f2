"""Tests for abproxy.simulation.fake_upstream against the real openai SDK."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import urllib.request

import openai
import pytest

from abproxy.simulation.answers import simulated_answer
from abproxy.simulation.fake_upstream import FakeUpstream
from abproxy.simulation.replies import judge_reply
from abproxy.simulation.server import serve_in_thread

MSGS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello there world"},
]


@pytest.fixture(scope="module")
def fake_server():
    fake = FakeUpstream()
    srv = serve_in_thread(fake)
    try:
        yield fake, srv
    finally:
        srv.stop()


@pytest.fixture
def fake(fake_server):
    fake_server[0].clear()
    return fake_server[0]


@pytest.fixture
def base_url(fake_server):
    return fake_server[1].url + "/v1"


@pytest.fixture
def client(base_url):
    with openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=5) as c:
        yield c


def test_chat_non_stream(client, fake):
    r = client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, temperature=0.3)
    assert re.fullmatch(r"chatcmpl-[A-Za-z0-9]{24}", r.id)
    assert r.object == "chat.completion" and r.model == "gpt-4o-mini"
    assert r.choices[0].message.content == "Echo: hello there world"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 4, 10)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    rec = fake.received[-1]
    assert rec.method == "POST" and rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == "Bearer sk-test"
    assert rec.json["temperature"] == 0.3 and rec.json["messages"] == MSGS


def test_chat_content_parts(client):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}]}]
    r = client.chat.completions.create(model="m", messages=msgs)
    assert r.choices[0].message.content == "Echo: a b c"
    assert r.usage.prompt_tokens == 3


def test_chat_stream_with_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MSGS, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: hello there world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_no_usage_by_default_and_header_overrides(client):
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=MSGS,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-fake-reply": "custom  reply text", "x-fake-usage": "0"},
        )
    )
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "custom  reply text"
    r = client.chat.completions.create(model="m", messages=MSGS, extra_headers={"x-fake-usage": "0"})
    assert r.usage is None


def test_async_chat_and_completions(base_url):
    async def go():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=5) as c:
            r, s = await asyncio.gather(
                c.chat.completions.create(model="m", messages=MSGS),
                c.chat.completions.create(model="m", messages=MSGS, stream=True),
            )
            parts = [ch.choices[0].delta.content or "" async for ch in s]
            comp = await c.completions.create(model="m", prompt="one two")
            cs = await c.completions.create(
                model="m", prompt=["x y z"], stream=True, stream_options={"include_usage": True}
            )
            cchunks = [ch async for ch in cs]
            return r, "".join(parts), comp, cchunks

    r, streamed, comp, cchunks = asyncio.run(go())
    assert r.choices[0].message.content == streamed == "Echo: hello there world"
    assert comp.object == "text_completion" and comp.choices[0].text == "Echo: one two"
    assert comp.usage.prompt_tokens == 2 and comp.usage.completion_tokens == 3
    assert "".join(c.choices[0].text for c in cchunks if c.choices) == "Echo: x y z"
    assert cchunks[-1].usage.total_tokens == 3 + 4


def test_responses_api(client):
    r = client.responses.create(model="gpt-4o-mini", input="what is up", instructions="be brief")
    assert r.id.startswith("resp_") and r.status == "completed"
    assert r.output_text == "Echo: what is up" and r.instructions == "be brief"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (5, 4, 9)

    msgs = [{"role": "user", "content": [{"type": "input_text", "text": "hi you"}]}]
    with client.responses.stream(model="gpt-4o-mini", input=msgs) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Echo: hi you"
    assert final.usage.total_tokens == 2 + 3

    events = list(client.responses.create(model="m", input="a b", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "Echo: a b"


def test_embeddings_and_models(client):
    e1 = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    e2 = client.embeddings.create(model="text-embedding-3-small", input="a")
    assert len(e1.data) == 2 and len(e1.data[0].embedding) == 8
    assert e1.data[0].embedding == e2.data[0].embedding != e1.data[1].embedding
    assert e1.usage.prompt_tokens == 2
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini", "gpt-4o"]


def test_errors(client, base_url):
    with pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model="m", messages=MSGS, extra_headers={"x-fake-status": "429"})
    assert ei.value.status_code == 429 and ei.value.body["message"] == "fake error 429"
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="m", input="x", extra_headers={"x-fake-status": "503"})
    with pytest.raises(openai.NotFoundError):
        client.post("/nope", cast_to=object, body={})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="", messages=MSGS)


def test_api_key_required():
    srv = serve_in_thread(FakeUpstream(api_key="sk-right"))
    try:
        url = srv.url + "/v1"
        with openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError) as ei:
                c.models.list()
            assert ei.value.code == "invalid_api_key"
        with openai.OpenAI(base_url=url, api_key="sk-right", max_retries=0) as c:
            assert c.models.list().data
    finally:
        srv.stop()


def test_break_after(client, fake):
    before = fake.disconnects
    got = []
    with pytest.raises(openai.APIConnectionError):
        for ch in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a b c d e"}], stream=True,
            extra_headers={"x-fake-break-after": "2"},
        ):
            got.append(ch)
    # role chunk + 2 word chunks, never a finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in got) == "Echo: a"
    assert all(c.choices[0].finish_reason is None for c in got)
    assert fake.wait_for(lambda: fake.active == 0, timeout=30)
    assert fake.disconnects == before  # a server-side break is not a client disconnect


def test_delay_and_hang_disconnect(client, fake):
    t0 = time.perf_counter()
    client.chat.completions.create(model="m", messages=MSGS, extra_headers={"x-fake-delay-ms": "150"})
    assert time.perf_counter() - t0 >= 0.15

    before = fake.disconnects
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(
            model="m", messages=MSGS, extra_headers={"x-fake-hang": "1"}, timeout=0.2
        )
    assert fake.wait_for(lambda: fake.disconnects == before + 1, timeout=30)
    assert fake.wait_for(lambda: fake.active == 0, timeout=30)


def test_stream_disconnect_is_counted(client, fake):
    before = fake.disconnects
    # a slow stream read to the end is not a disconnect
    s = client.chat.completions.create(
        model="m", messages=MSGS, stream=True, extra_headers={"x-fake-chunk-delay-ms": "5"}
    )
    assert "".join(c.choices[0].delta.content or "" for c in s) == "Echo: hello there world"
    time.sleep(0.05)
    assert fake.disconnects == before

    # the client goes away after the first chunk
    s = client.chat.completions.create(
        model="m", messages=MSGS, stream=True, extra_headers={"x-fake-chunk-delay-ms": "100"}
    )
    next(iter(s))
    s.close()
    assert fake.wait_for(lambda: fake.disconnects == before + 1, timeout=30)
    assert fake.wait_for(lambda: fake.active == 0, timeout=30)


def test_introspection_endpoints(client, fake, fake_server):
    client.chat.completions.create(model="m", messages=MSGS)
    url = fake_server[1].url + "/_fake/requests"
    with urllib.request.urlopen(url) as r:
        data = json.loads(r.read())
    assert data[-1]["path"] == "/v1/chat/completions" and data[-1]["json"]["model"] == "m"
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE")) as r:
        assert r.status == 200
    assert fake.received == []


def test_the_simulated_judge_scores_an_answer_by_its_sentences_and_fails_on_request(client):
    """``fake-judge`` answers as a judge: JSON with a score (the quoted answer's sentences, 1 to
    5) and a rationale; its ``-nonsense``, ``-out-of-range`` and ``-error`` kin fail the ways a
    real judge does."""

    def ask(model, answer):
        prompt = f"Rate it.\n<question>Say hi.</question>\n<answer>{answer}</answer>\nReply with JSON."
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}])

    verdict = json.loads(ask("fake-judge", "Hello. How are you? Fine!").choices[0].message.content)
    assert verdict == {"score": 3, "rationale": "The answer gives 3 sentences of substance."}
    assert json.loads(ask("fake-judge", "").choices[0].message.content)["score"] == 1
    assert json.loads(ask("fake-judge", "A. B. C. D. E. F. G.").choices[0].message.content)["score"] == 5
    assert ask("fake-judge-nonsense", "Hello.").choices[0].message.content == "Looks good to me!"
    assert json.loads(ask("fake-judge-out-of-range", "Hello.").choices[0].message.content)["score"] == 99
    with pytest.raises(openai.InternalServerError):
        ask("fake-judge-error", "Hello.")


def test_the_demo_models_answers_follow_the_prompts_instruction():
    """The demo's simulated model answers what the prompt asks (never the variant's name): three
    bullet points are two or three sentences, a short paragraph one or two."""
    text = "The council approved a budget, funds two libraries and delays the stadium."
    rng = random.Random(3)

    def sentences(instruction):
        answer = simulated_answer({"messages": [{"role": "user", "content": f"{instruction}\n{text}"}]}, rng)
        return json.loads(judge_reply("fake-judge", f"<answer>{answer}</answer>"))["score"]

    bullets = [sentences("Summarize as three bullet points:") for _ in range(40)]
    paragraph = [sentences("Summarize in one short paragraph:") for _ in range(40)]
    assert set(bullets) == {2, 3} and set(paragraph) == {1, 2}
    assert simulated_answer({"messages": [{"role": "user", "content": "hello there"}]}, rng) is None, "else it echoes"
