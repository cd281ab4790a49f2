"""What a judge is asked and what its answer means: pure functions, no I/O (docs/reference.md,
"LLM judges").

The judge sees the client's own last user message and the answer, never the variant's name or
prompt, so it cannot favour an arm by its wording; it is asked at ``temperature: 0`` for a JSON
object ``{"score": <number>, "rationale": "<text>"}``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from abproxy.config import Judge, Price
from abproxy.recording.outcome import MAX_JUDGED_CHARS

_FENCED = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Judgement:
    score: float
    rationale: str | None


class BadAnswer(ValueError):
    """A judge's answer that is no score: ``reason`` is the failure's label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def render(template: str, judged_input: str, output: str) -> str:
    """The judge's prompt: ``{{input}}`` and ``{{output}}`` replaced in one pass (text inside
    them that looks like a placeholder stays as it is)."""
    values = {"{{input}}": judged_input[:MAX_JUDGED_CHARS], "{{output}}": output[:MAX_JUDGED_CHARS]}
    return re.sub(r"\{\{(?:input|output)\}\}", lambda match: values[match.group(0)], template)


def request_body(judge: Judge, prompt: str) -> bytes:
    return orjson.dumps(
        {
            "model": judge.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "response_format": {"type": "json_object"},
        }
    )


def read_answer(judge: Judge, payload: Any) -> Judgement:
    """The judgement in a chat completion (its JSON body, parsed; None when it was no JSON);
    raises :class:`BadAnswer` (``bad_answer``: no JSON score; ``out_of_range``: a score outside
    [min, max])."""
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as error:
        raise BadAnswer("bad_answer", f"not a chat completion ({type(error).__name__})") from None
    if not isinstance(content, str):
        raise BadAnswer("bad_answer", "the answer has no text")
    text = content.strip()
    fenced = _FENCED.match(text)
    try:
        verdict = orjson.loads(fenced.group(1) if fenced else text)
    except orjson.JSONDecodeError:
        raise BadAnswer("bad_answer", f"the answer is not JSON: {text[:80]!r}") from None
    score = verdict.get("score") if isinstance(verdict, dict) else None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise BadAnswer("bad_answer", f"the answer has no numeric 'score': {text[:80]!r}")
    if not judge.min <= score <= judge.max:
        raise BadAnswer("out_of_range", f"score {score:g} is outside [{judge.min:g}, {judge.max:g}]")
    rationale = verdict.get("rationale")
    return Judgement(float(score), rationale if isinstance(rationale, str) and rationale else None)


def cost_usd(payload: Any, price: Price | None) -> float | None:
    """What a judge call cost by ``prices`` and its answer's usage (paid whether or not the
    answer is a score); None when either is unknown."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if price is None or not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int:
        return None
    return (prompt * price.input + completion * price.output) / 1_000_000
