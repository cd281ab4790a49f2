"""What the fake upstream answers (:mod:`abproxy.simulation.fake_upstream`), as pure functions.

Each builder takes the parsed request body and the ``x-fake-*`` headers (names lower-cased,
without the ``x-fake-`` prefix; ``None`` when the request had none) and returns either a JSON
body (``bytes``) or, for ``"stream": true``, the SSE events to send (:class:`Events`). A request
the real API would refuse raises :class:`ReplyError`; :func:`error_body` is OpenAI's error shape.

Replies echo the last user text (``"Echo: " + text``) unless ``x-fake-reply`` says otherwise, or
the model is the simulated LLM judge (``fake-judge``: :func:`judge_reply`);
usage counts whitespace-separated words and is left out when ``x-fake-usage`` is ``0``. Ids are
random and ``created`` is the current time; everything else depends on the input alone.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import struct
import time
from typing import Any, NamedTuple, TypeAlias

import orjson

__all__ = ["Events", "Fake", "Reply", "ReplyError", "chat", "completions", "embeddings", "error_body", "header_text",
           "model_entry", "model_list", "responses"]

_dumps = orjson.dumps

Fake: TypeAlias = dict[bytes, bytes]
"""The request's ``x-fake-*`` headers: ``{b"reply": b"...", b"usage": b"0", ...}``."""

_DONE = b"data: [DONE]\n\n"
_MODELS = ("gpt-4o-mini", "gpt-4o")

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout", "timeout"),
    409: ("invalid_request_error", "conflict"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
}

_TEXT_PART_TYPES = frozenset(("text", "input_text", "output_text"))


class Events(NamedTuple):
    """A streamed reply: the SSE events in order, the index of the first one that carries a word
    of the reply, and how many do (``x-fake-break-after`` cuts the stream by words)."""

    events: list[bytes]
    first_word: int
    words: int


Reply: TypeAlias = bytes | Events


class ReplyError(Exception):
    """A request the API would refuse: answered with ``status`` and :func:`error_body`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def error_body(status: int, message: str | None = None, *, code: str | None = None, type_: str | None = None,
               param: str | None = None) -> bytes:
    """OpenAI's error body for ``status`` (type and code as the real API gives them)."""
    t, c = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return _dumps(
        {
            "error": {
                "message": message if message is not None else f"fake error {status}",
                "type": type_ or t,
                "param": param,
                "code": code if code is not None else c,
            }
        }
    )


def header_text(v: bytes) -> str:
    """A header value as text: UTF-8 if it is, else Latin-1."""
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return v.decode("latin-1")


def _rand_hex(nbytes: int) -> str:
    return os.urandom(nbytes).hex()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, dict) and p.get("type") in _TEXT_PART_TYPES:
                t = p.get("text")
                if isinstance(t, str):
                    out.append(t)
            elif isinstance(p, str):
                out.append(p)
        return " ".join(out)
    return ""


def _words(text: str) -> int:
    return len(text.split())


def _pieces(reply: str) -> list[str]:
    """Word deltas whose concatenation is exactly ``reply``."""
    parts = reply.split(" ")
    out = [parts[0]] if parts[0] else []
    for p in parts[1:]:
        out.append(" " + p)
    return out


def _model_of(req: dict[str, Any]) -> str:
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise ReplyError(400, "you must provide a model parameter", param="model")
    return model


def _usage_on(fake: Fake | None) -> bool:
    if fake is None:
        return True
    v = fake.get(b"usage")
    return v is None or v not in (b"0", b"false", b"no")


JUDGE_MODEL = "fake-judge"
"""The simulated LLM judge: a chat model whose name starts with this answers as a judge
(:func:`judge_reply`)."""

_SENTENCE = re.compile(r"[^.!?]*[A-Za-z0-9][^.!?]*[.!?]")


def judged_answer(prompt: str) -> str:
    """The answer a judge's prompt quotes: between ``<answer>`` and ``</answer>``, else after the
    last ``Answer:``, else the whole prompt."""
    start = prompt.rfind("<answer>")
    if start >= 0:
        end = prompt.find("</answer>", start)
        return prompt[start + len("<answer>") : end if end >= 0 else None]
    marker = prompt.rfind("Answer:")
    return prompt[marker + len("Answer:") :] if marker >= 0 else prompt


def judge_reply(model: str, prompt: str) -> str:
    """The simulated judge's answer: ``{"score": <its answer's sentences, 1 to 5>, "rationale":
    ...}``. ``fake-judge-nonsense`` answers prose, ``fake-judge-out-of-range`` a score of 99,
    ``fake-judge-error`` fails with 503."""
    if model.endswith("-error"):
        raise ReplyError(503, "The judge model is overloaded.")
    if model.endswith("-nonsense"):
        return "Looks good to me!"
    sentences = len(_SENTENCE.findall(judged_answer(prompt)))
    score = 99 if model.endswith("-out-of-range") else max(1, min(5, sentences))
    rationale = f"The answer gives {sentences} sentence{'s' if sentences != 1 else ''} of substance."
    return _dumps({"score": score, "rationale": rationale}).decode()


def _reply_text(fake: Fake | None, default_text: str) -> str:
    if fake is not None:
        r = fake.get(b"reply")
        if r is not None:
            return header_text(r)
    return "Echo: " + default_text


# ---------------------------------------------------------------------------
# The builders: bytes (a JSON body) or Events (a stream)
# ---------------------------------------------------------------------------


def model_list(created: int) -> bytes:
    """``GET /v1/models``: the models on offer, all created at ``created``."""
    return _dumps(
        {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": created, "owned_by": "fake"} for m in _MODELS],
        }
    )


def model_entry(path: str) -> bytes:
    """``GET /v1/models/{id}``: whichever model ``path`` names exists."""
    mid = path[len("/v1/models/"):]
    return _dumps({"id": mid, "object": "model", "created": 1700000000, "owned_by": "fake"})


def chat(req: dict[str, Any], fake: Fake | None) -> Reply:
    """``POST /v1/chat/completions``."""
    model = _model_of(req)
    messages = req.get("messages")
    if not isinstance(messages, list):
        raise ReplyError(400, "Missing required parameter: 'messages'.", param="messages")
    prompt_tokens = 0
    last_user = ""
    for m in messages:
        if not isinstance(m, dict):
            continue
        t = _text_of(m.get("content"))
        prompt_tokens += _words(t)
        if m.get("role") == "user":
            last_user = t
    reply = judge_reply(model, last_user) if model.startswith(JUDGE_MODEL) else _reply_text(fake, last_user)
    completion_tokens = _words(reply)
    usage_on = _usage_on(fake)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }
    cid = "chatcmpl-" + _rand_hex(12)
    created = int(time.time())
    if not req.get("stream"):
        out = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": reply, "refusal": None, "annotations": []},
                         "logprobs": None, "finish_reason": "stop"}],
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        if usage_on:
            out["usage"] = usage
        return _dumps(out)

    so = req.get("stream_options")
    include_usage = usage_on and isinstance(so, dict) and bool(so.get("include_usage"))
    head = b"".join(
        (
            b'data: {"id":"',
            cid.encode(),
            b'","object":"chat.completion.chunk","created":',
            b"%d" % created,
            b',"model":',
            _dumps(model),
            b',"service_tier":"default","system_fingerprint":"fp_fake","choices":[',
        )
    )
    tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
    events = [head + b'{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
                     b'"logprobs":null,"finish_reason":null}' + tail]
    pieces = _pieces(reply)
    for p in pieces:
        events.append(head + b'{"index":0,"delta":{"content":' + _dumps(p)
                      + b'},"logprobs":null,"finish_reason":null}' + tail)
    events.append(head + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}' + tail)
    if include_usage:
        events.append(head + b'],"usage":' + _dumps(usage) + b"}\n\n")
    events.append(_DONE)
    return Events(events, 1, len(pieces))


def completions(req: dict[str, Any], fake: Fake | None) -> Reply:
    """``POST /v1/completions`` (the legacy API: the first prompt of a list is answered)."""
    model = _model_of(req)
    prompt = req.get("prompt", "")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    if not isinstance(prompt, str):
        prompt = str(prompt)
    reply = _reply_text(fake, prompt)
    prompt_tokens = _words(prompt)
    completion_tokens = _words(reply)
    usage_on = _usage_on(fake)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    cid = "cmpl-" + _rand_hex(12)
    created = int(time.time())
    if not req.get("stream"):
        out = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": reply, "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "system_fingerprint": "fp_fake",
        }
        if usage_on:
            out["usage"] = usage
        return _dumps(out)

    so = req.get("stream_options")
    include_usage = usage_on and isinstance(so, dict) and bool(so.get("include_usage"))
    head = b"".join(
        (
            b'data: {"id":"',
            cid.encode(),
            b'","object":"text_completion","created":',
            b"%d" % created,
            b',"model":',
            _dumps(model),
            b',"system_fingerprint":"fp_fake","choices":[',
        )
    )
    tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
    pieces = _pieces(reply)
    events = [
        head + b'{"text":' + _dumps(p) + b',"index":0,"logprobs":null,"finish_reason":null}' + tail
        for p in pieces
    ]
    events.append(head + b'{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}' + tail)
    if include_usage:
        events.append(head + b'],"usage":' + _dumps(usage) + b"}\n\n")
    events.append(_DONE)
    return Events(events, 0, len(pieces))


def responses(req: dict[str, Any], fake: Fake | None) -> Reply:
    """``POST /v1/responses``: a response object, or its named events when streamed."""
    model = _model_of(req)
    inp = req.get("input", "")
    instructions = req.get("instructions")
    input_tokens = _words(instructions) if isinstance(instructions, str) else 0
    last_user = ""
    if isinstance(inp, str):
        last_user = inp
        input_tokens += _words(inp)
    elif isinstance(inp, list):
        for item in inp:
            if isinstance(item, str):
                t = item
                role = "user"
            elif isinstance(item, dict):
                if item.get("type", "message") != "message":
                    output = item.get("output")
                    t = output if isinstance(output, str) else ""
                    input_tokens += _words(t)
                    continue
                t = _text_of(item.get("content"))
                role = str(item.get("role"))
            else:
                continue
            input_tokens += _words(t)
            if role == "user":
                last_user = t
    reply = _reply_text(fake, last_user)
    output_tokens = _words(reply)
    usage = None
    if _usage_on(fake):
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
    rid = "resp_" + _rand_hex(24)
    mid = "msg_" + _rand_hex(24)
    created = int(time.time())
    text_part = {"type": "output_text", "text": reply, "annotations": [], "logprobs": []}
    message = {"type": "message", "id": mid, "status": "completed", "role": "assistant", "content": [text_part]}

    def response(status: str, output: list, usage_obj) -> dict:
        r = {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": instructions,
            "max_output_tokens": req.get("max_output_tokens"),
            "model": model,
            "output": output,
            "parallel_tool_calls": bool(req.get("parallel_tool_calls", True)),
            "previous_response_id": req.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": bool(req.get("store", True)),
            "temperature": req.get("temperature", 1.0),
            "text": req.get("text") or {"format": {"type": "text"}},
            "tool_choice": req.get("tool_choice", "auto"),
            "tools": req.get("tools") or [],
            "top_p": req.get("top_p", 1.0),
            "truncation": req.get("truncation", "disabled"),
            "usage": usage_obj,
            "user": req.get("user"),
            "metadata": req.get("metadata") or {},
        }
        if status == "completed":
            r["completed_at"] = created
        return r

    if not req.get("stream"):
        out = response("completed", [message], usage)
        if usage is None:
            del out["usage"]
        return _dumps(out)

    seq = 0

    def ev(obj: dict) -> bytes:
        nonlocal seq
        obj["sequence_number"] = seq
        seq += 1
        return b"event: " + obj["type"].encode() + b"\ndata: " + _dumps(obj) + b"\n\n"

    events = [
        ev({"type": "response.created", "response": response("in_progress", [], None)}),
        ev({"type": "response.in_progress", "response": response("in_progress", [], None)}),
        ev({"type": "response.output_item.added", "output_index": 0,
            "item": {"type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": []}}),
        ev({"type": "response.content_part.added", "item_id": mid, "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
    ]
    first = len(events)
    pieces = _pieces(reply)
    for p in pieces:
        events.append(ev({"type": "response.output_text.delta", "item_id": mid, "output_index": 0, "content_index": 0,
                          "delta": p, "logprobs": []}))
    events.append(ev({"type": "response.output_text.done", "item_id": mid, "output_index": 0, "content_index": 0,
                      "text": reply, "logprobs": []}))
    events.append(ev({"type": "response.content_part.done", "item_id": mid, "output_index": 0, "content_index": 0,
                      "part": text_part}))
    events.append(ev({"type": "response.output_item.done", "output_index": 0, "item": message}))
    final = response("completed", [message], usage)
    if usage is None:
        del final["usage"]
    events.append(ev({"type": "response.completed", "response": final}))
    return Events(events, first, len(pieces))


def embeddings(req: dict[str, Any], fake: Fake | None) -> bytes:
    """``POST /v1/embeddings``: 8 dimensions derived from a hash of each input, floats or base64."""
    model = _model_of(req)
    inp = req.get("input")
    if isinstance(inp, str):
        inputs = [inp]
    elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
        inputs = [" ".join(map(str, inp))]
    elif isinstance(inp, list):
        inputs = [x if isinstance(x, str) else " ".join(map(str, x)) if isinstance(x, list) else str(x)
                  for x in inp]
    else:
        raise ReplyError(400, "Missing required parameter: 'input'.", param="input")
    b64 = req.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for i, text in enumerate(inputs):
        tokens += _words(text)
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        vec = [round(v / 32767.5 - 1.0, 6) for v in struct.unpack("<8H", digest)]
        emb: Any = base64.b64encode(struct.pack("<8f", *vec)).decode() if b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    out: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if _usage_on(fake):
        out["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return _dumps(out)
